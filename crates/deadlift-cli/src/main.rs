//! The `deadlift` command: the argument grammar (clap derive) and the dispatch to the
//! module that runs each command group. Everything a command does is a call into the
//! `deadlift` library, either in process (`serve`, `run`, `inspect`, `showcase`) or over
//! HTTP to an agent (every other command).

#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod admin;
mod client;
mod config;
mod hooks;
mod local;
mod modules;
mod peers;
mod releases;
mod runs;
mod serve;
mod showcase;
mod workflows;

use client::Remote;

#[derive(Debug, Parser)]
#[command(
    name = "deadlift",
    version,
    about = "Run Extism plug-ins next to your data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch the payments ↔ merchant story: two agents, a hook, a signed event, one trace
    Showcase {
        /// Keep the two agents' data here (default: a temporary directory, removed after)
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
        /// Stop the agents after the story instead of serving their consoles until Ctrl-C
        #[arg(long)]
        exit: bool,
    },
    /// Run an agent: the HTTP API on embedded storage in a data directory
    Serve {
        /// TOML file with settings (flags and environment override it)
        #[arg(long, env = "DEADLIFT_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<config::ServeConfig>,
    },
    /// Manage modules on an agent
    #[command(subcommand)]
    Module(modules::ModuleCommand),
    /// Read and write a tenant's key-value entries on an agent
    #[command(subcommand)]
    Kv(modules::KvCommand),
    /// Manage tenants (admin)
    #[command(subcommand)]
    Tenant(admin::TenantCommand),
    /// Manage API tokens (admin)
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Apply, list and run workflows
    #[command(subcommand)]
    Workflow(workflows::WorkflowCommand),
    /// Publish events
    #[command(subcommand)]
    Event(workflows::EventCommand),
    /// Watch, inspect, retry and cancel runs
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// List and replay dead letters
    #[command(subcommand)]
    Dlq(runs::DlqCommand),
    /// Print an agent's name and public key
    Identity {
        #[command(flatten)]
        remote: Remote,
    },
    /// Manage peer agents and deliveries to them (admin)
    #[command(subcommand)]
    Peer(peers::PeerCommand),
    /// Bind your modules to the extension points an agent offers
    #[command(subcommand)]
    Hook(hooks::HookCommand),
    /// Load a plug-in locally (no agent) and call one of its functions
    Run(local::RunArgs),
    /// Validate a plug-in and list its imports and exports
    Inspect {
        /// The .wasm file
        file: PathBuf,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    // `deadlift module list | head -1` closes stdout early; `println!` then panics. That
    // is the reader's choice, not an error: leave quietly, as Unix tools do.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(error) = dispatch(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        // No Tokio runtime here: `run` calls `Engine::call_blocking`, which must not be
        // called from async code.
        Command::Inspect { file, json } => local::inspect(&file, json),
        Command::Run(args) => local::run(args),
        Command::Serve { config, settings } => {
            let resolved = serve::settings(config.as_deref(), *settings)?;
            runtime()?.block_on(serve::serve(resolved, config))
        }
        Command::Module(command) => runtime()?.block_on(modules::module(command)),
        Command::Kv(command) => runtime()?.block_on(modules::kv(command)),
        Command::Tenant(command) => runtime()?.block_on(admin::tenant(command)),
        Command::Token(command) => runtime()?.block_on(admin::token(command)),
        Command::Workflow(command) => runtime()?.block_on(workflows::workflow(command)),
        Command::Event(command) => runtime()?.block_on(workflows::event(command)),
        Command::Runs(command) => runtime()?.block_on(runs::runs(command)),
        Command::Dlq(command) => runtime()?.block_on(runs::dlq(command)),
        Command::Identity { remote } => runtime()?.block_on(peers::identity(remote)),
        Command::Showcase {
            data_dir,
            json,
            exit,
        } => runtime()?.block_on(showcase::command(
            data_dir,
            json,
            exit,
            serve::shutdown_signal(),
        )),
        Command::Peer(command) => runtime()?.block_on(peers::peer(command)),
        Command::Hook(command) => runtime()?.block_on(hooks::hook(command)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// Issue 14: 24 positional arguments and several options had no help text.
    #[test]
    fn every_argument_of_every_command_has_help() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let generated = matches!(
                    arg.get_action(),
                    clap::ArgAction::Help
                        | clap::ArgAction::HelpShort
                        | clap::ArgAction::HelpLong
                        | clap::ArgAction::Version
                );
                if !generated && arg.get_help().is_none() {
                    missing.push(format!("{path} <{}>", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "deadlift", &mut missing);
        assert!(missing.is_empty(), "without help:\n{}", missing.join("\n"));
    }
}
