//! The `deadlift` command. It only parses arguments and wires library types together;
//! everything it does is a call into the `deadlift` library.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use deadlift::{CallContext, Engine, Grant, LogLevel, NewModule, registry};
use reqwest::Method;
use serde_json::{Value, json};

mod client;
mod config;
mod peers;
mod showcase;
mod workflows;

use client::{Client, cell, table};

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
    },
    /// Run an agent: the HTTP API on embedded storage in a data directory
    Serve {
        /// TOML file with settings (flags and environment override it)
        #[arg(long, env = "DEADLIFT_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: config::ServeConfig,
    },
    /// Manage modules on an agent
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Read and write a tenant's key-value entries on an agent
    #[command(subcommand)]
    Kv(KvCommand),
    /// Manage tenants (admin)
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage API tokens (admin)
    #[command(subcommand)]
    Token(TokenCommand),
    /// Apply, list and run workflows
    #[command(subcommand)]
    Workflow(workflows::WorkflowCommand),
    /// Publish events
    #[command(subcommand)]
    Event(workflows::EventCommand),
    /// Watch, inspect, retry and cancel runs
    #[command(subcommand)]
    Runs(workflows::RunsCommand),
    /// List and replay dead letters
    #[command(subcommand)]
    Dlq(workflows::DlqCommand),
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
    Hook(peers::HookCommand),
    /// Load a plug-in locally (no agent) and call one of its functions
    Run(RunArgs),
    /// Validate a plug-in and list its imports and exports
    Inspect {
        /// The .wasm file
        file: PathBuf,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// How to reach an agent.
#[derive(Debug, Args)]
struct Remote {
    /// The agent's URL
    #[arg(long, env = "DEADLIFT_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// API token
    #[arg(long, env = "DEADLIFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Act for this tenant (with the admin token)
    #[arg(long, env = "DEADLIFT_TENANT")]
    tenant: Option<String>,
    /// Print JSON instead of tables
    #[arg(long)]
    json: bool,
}

impl Remote {
    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.server, self.token.clone(), self.tenant.clone())
    }
}

#[derive(Debug, Subcommand)]
enum ModuleCommand {
    /// Upload a .wasm file
    Push {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List modules
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one module (by name, name@version or sha256:...)
    Show {
        module: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Call a module's function
    Call {
        module: String,
        function: String,
        /// Input (JSON or any text)
        #[arg(long, default_value = "")]
        input: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a module
    Delete {
        module: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum KvCommand {
    /// List keys
    List {
        #[arg(long, default_value = "")]
        prefix: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a value
    Get {
        key: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Set a value
    Set {
        key: String,
        value: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a key
    Delete {
        key: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant
    Create {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List tenants
    List {
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token for a tenant (printed once)
    Create {
        /// The tenant the token acts for
        #[arg(value_name = "TENANT")]
        owner: String,
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List tokens
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke a token by id
    Revoke {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The .wasm file
    file: PathBuf,
    /// The exported function to call
    function: String,
    /// Input bytes, given as text
    #[arg(long, default_value = "", conflicts_with = "input_file")]
    input: String,
    /// Read the input from a file instead
    #[arg(long)]
    input_file: Option<PathBuf>,
    /// Call the function this many times on the same warm instance
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Grant a host function (repeatable)
    #[arg(long = "allow", value_name = "HOST_FUNCTION")]
    allow: Vec<String>,
    /// Config value for the plug-in, KEY=VALUE (repeatable)
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    config: Vec<(String, String)>,
    /// Wall-clock limit per call
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Instruction budget per call
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory budget of the instance
    #[arg(long, default_value_t = deadlift::grant::DEFAULT_MEMORY_BYTES)]
    memory_bytes: u64,
    /// Tenant the call runs for (scopes the built-in key-value store)
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Let the plug-in reach hosts matching this glob with http_request (repeatable;
    /// an IP address must be given exactly)
    #[arg(long = "allow-host", value_name = "PATTERN")]
    allow_host: Vec<String>,
    /// Allow WASI preview 1 (stdout and stderr are printed as log lines)
    #[arg(long)]
    wasi: bool,
    /// Map a directory for WASI, HOST:GUEST or HOST:GUEST:ro (repeatable; implies --wasi)
    #[arg(long = "dir", value_name = "HOST:GUEST[:ro]", value_parser = parse_dir)]
    dirs: Vec<(String, String, bool)>,
}

fn parse_dir(raw: &str) -> Result<(String, String, bool), String> {
    let (rest, read_only) = match raw.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (raw, false),
    };
    rest.split_once(':')
        .filter(|(host, guest)| !host.is_empty() && !guest.is_empty())
        .map(|(host, guest)| (host.to_owned(), guest.to_owned(), read_only))
        .ok_or_else(|| format!("expected HOST:GUEST or HOST:GUEST:ro, got `{raw}`"))
}

fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got `{raw}`"))
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
        .init();
    if let Err(error) = run(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Run(args) => call(args),
        Command::Serve { config, settings } => {
            let file = match config {
                Some(path) => config::ServeConfig::from_file(&path)?,
                None => config::ServeConfig::default(),
            };
            runtime()?.block_on(serve(settings.over(file).resolve()))
        }
        Command::Module(command) => runtime()?.block_on(module(command)),
        Command::Kv(command) => runtime()?.block_on(kv(command)),
        Command::Tenant(command) => runtime()?.block_on(tenant(command)),
        Command::Token(command) => runtime()?.block_on(token(command)),
        Command::Workflow(command) => runtime()?.block_on(workflows::workflow(command)),
        Command::Event(command) => runtime()?.block_on(workflows::event(command)),
        Command::Runs(command) => runtime()?.block_on(workflows::runs(command)),
        Command::Dlq(command) => runtime()?.block_on(workflows::dlq(command)),
        Command::Identity { remote } => runtime()?.block_on(peers::identity(remote)),
        Command::Showcase { data_dir, json } => {
            runtime()?.block_on(showcase_command(data_dir, json))
        }
        Command::Peer(command) => runtime()?.block_on(peers::peer(command)),
        Command::Hook(command) => runtime()?.block_on(peers::hook(command)),
    }
}

async fn showcase_command(data_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let (dir, temporary) = match data_dir {
        Some(dir) => (dir, false),
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir()
                .join(format!("deadlift-showcase-{}-{stamp}", std::process::id()));
            (dir, true)
        }
    };
    let report = showcase::run(dir.clone()).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report?;
    if json {
        return print_json(&serde_json::to_value(&report)?);
    }
    showcase::print(&report);
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn serve(config: config::Resolved) -> anyhow::Result<()> {
    let mut builder = deadlift::Agent::builder(&config.data_dir)
        .admin_token(config.admin_token.clone())
        .v1_requires_token(config.v1_require_token)
        .max_body_bytes(config.max_body_bytes)
        .default_grant(config.grant.clone())
        .max_concurrent_runs(config.max_concurrent_runs)
        .retention(config.retention)
        .durability(config.durability)
        .name(&config.name);
    if let Some(workers) = config.workers {
        builder = builder.workers(workers);
    }
    let (agent, new_admin_token) = tokio::task::spawn_blocking(move || builder.build()).await??;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    println!("data directory: {}", config.data_dir.display());
    let identity = agent.workflows().identity();
    println!(
        "agent {} (public key {}; peers register it with `deadlift peer add`)",
        identity.name,
        identity.public_key()
    );
    let resumed = agent.workflows().resumed_runs();
    if resumed > 0 {
        println!("resumed {resumed} runs left open by the previous process");
    }
    if let Some(token) = new_admin_token {
        println!("admin token (shown once, keep it safe): {token}");
    }
    // Printed last: once this line is out, the agent accepts connections.
    println!(
        "deadlift agent listening on http://{}",
        listener.local_addr()?
    );
    let agent = std::sync::Arc::new(agent);
    deadlift::server::serve(agent.clone(), listener, shutdown_signal()).await?;
    agent.shutdown().await;
    println!("deadlift agent stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn module_rows(modules: &[Value]) -> Vec<Vec<String>> {
    modules
        .iter()
        .map(|m| {
            vec![
                cell(&m["name"]),
                cell(&m["version"]),
                cell(&m["id"]),
                cell(&m["size_bytes"]),
                m["exports"]
                    .as_array()
                    .map(|e| {
                        e.iter()
                            .filter(|x| x["kind"] == "function")
                            .map(|x| cell(&x["name"]))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default(),
            ]
        })
        .collect()
}

async fn module(command: ModuleCommand) -> anyhow::Result<()> {
    match command {
        ModuleCommand::Push {
            file,
            name,
            version,
            description,
            remote,
        } => {
            let client = remote.client()?;
            let bytes = read_module(&file)?;
            let mut query = vec![("name", name)];
            query.extend(version.map(|v| ("version", v)));
            query.extend(description.map(|d| ("description", d)));
            let info = client
                .json(
                    client
                        .request(Method::POST, "/v1/modules")
                        .query(&query)
                        .body(bytes),
                )
                .await?;
            if remote.json {
                return print_json(&info);
            }
            println!("pushed {} as {}", cell(&info["id"]), cell(&info["name"]));
        }
        ModuleCommand::List { remote } => {
            let client = remote.client()?;
            let list = client
                .json(client.request(Method::GET, "/v1/modules"))
                .await?;
            if remote.json {
                return print_json(&list);
            }
            let modules = list.as_array().cloned().unwrap_or_default();
            table(
                &["name", "version", "id", "bytes", "functions"],
                &module_rows(&modules),
            );
        }
        ModuleCommand::Show { module, remote } => {
            let client = remote.client()?;
            let info = client
                .json(client.request(Method::GET, &format!("/v1/modules/{}", encode(&module))))
                .await?;
            if remote.json {
                return print_json(&info);
            }
            table(
                &["name", "version", "id", "bytes", "functions"],
                &module_rows(std::slice::from_ref(&info)),
            );
            for import in info["imports"].as_array().cloned().unwrap_or_default() {
                println!(
                    "imports {}::{}",
                    cell(&import["module"]),
                    cell(&import["name"])
                );
            }
        }
        ModuleCommand::Call {
            module,
            function,
            input,
            remote,
        } => {
            let client = remote.client()?;
            let path = format!("/v1/modules/{}/call/{}", encode(&module), encode(&function));
            let out = client
                .json(client.request(Method::POST, &path).body(input))
                .await?;
            if remote.json {
                return print_json(&out);
            }
            for line in out["logs"].as_array().cloned().unwrap_or_default() {
                eprintln!(
                    "[guest {}] {}",
                    cell(&line["level"]),
                    cell(&line["message"])
                );
            }
            let output = if !out["output"].is_null() {
                out["output"].to_string()
            } else if let Some(text) = out["output_text"].as_str() {
                text.to_owned()
            } else {
                format!("(hex) {}", cell(&out["output_hex"]))
            };
            println!("{output}");
            eprintln!(
                "fuel {} · {} µs",
                cell(&out["fuel_used"]),
                cell(&out["duration_us"])
            );
        }
        ModuleCommand::Delete { module, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::DELETE, &format!("/v1/modules/{}", encode(&module))))
                .await?;
            if !remote.json {
                println!("deleted {module}");
            }
        }
    }
    Ok(())
}

async fn kv(command: KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::List { prefix, remote } => {
            let client = remote.client()?;
            let keys = client
                .json(
                    client
                        .request(Method::GET, "/v1/kv")
                        .query(&[("prefix", prefix)]),
                )
                .await?;
            if remote.json {
                return print_json(&keys);
            }
            for key in keys["keys"].as_array().cloned().unwrap_or_default() {
                println!("{}", cell(&key));
            }
        }
        KvCommand::Get { key, remote } => {
            let client = remote.client()?;
            let response = client
                .send(client.request(Method::GET, &format!("/v1/kv/{}", encode(&key))))
                .await?;
            let bytes = response.bytes().await?;
            if remote.json {
                return print_json(
                    &json!({ "key": key, "value": String::from_utf8_lossy(&bytes) }),
                );
            }
            std::io::stdout().write_all(&bytes)?;
            println!();
        }
        KvCommand::Set { key, value, remote } => {
            let client = remote.client()?;
            client
                .send(
                    client
                        .request(Method::PUT, &format!("/v1/kv/{}", encode(&key)))
                        .body(value),
                )
                .await?;
        }
        KvCommand::Delete { key, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::DELETE, &format!("/v1/kv/{}", encode(&key))))
                .await?;
        }
    }
    Ok(())
}

async fn tenant(command: TenantCommand) -> anyhow::Result<()> {
    match command {
        TenantCommand::Create { name, remote } => {
            let client = remote.client()?;
            let created = client
                .json(
                    client
                        .request(Method::POST, "/v1/tenants")
                        .json(&json!({ "name": name })),
                )
                .await?;
            if remote.json {
                return print_json(&created);
            }
            println!("created tenant {name}");
        }
        TenantCommand::List { remote } => {
            let client = remote.client()?;
            let list = client
                .json(client.request(Method::GET, "/v1/tenants"))
                .await?;
            if remote.json {
                return print_json(&list);
            }
            for name in list["tenants"].as_array().cloned().unwrap_or_default() {
                println!("{}", cell(&name));
            }
        }
    }
    Ok(())
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            owner: tenant,
            description,
            remote,
        } => {
            let client = remote.client()?;
            let body = json!({ "description": description });
            let created = client
                .json(
                    client
                        .request(
                            Method::POST,
                            &format!("/v1/tenants/{}/tokens", encode(&tenant)),
                        )
                        .json(&body),
                )
                .await?;
            if remote.json {
                return print_json(&created);
            }
            println!(
                "token for {tenant} (shown once): {}",
                cell(&created["token"])
            );
        }
        TokenCommand::List { remote } => {
            let client = remote.client()?;
            let list = client
                .json(client.request(Method::GET, "/v1/tokens"))
                .await?;
            if remote.json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list["tokens"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    vec![
                        cell(&t["id"]),
                        cell(&t["tenant"]),
                        cell(&t["admin"]),
                        cell(&t["description"]),
                    ]
                })
                .collect();
            table(&["id", "tenant", "admin", "description"], &rows);
        }
        TokenCommand::Revoke { id, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::DELETE, &format!("/v1/tokens/{}", encode(&id))))
                .await?;
        }
    }
    Ok(())
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' | b':' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn read_module(file: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn inspect(file: &PathBuf, json: bool) -> anyhow::Result<()> {
    let inspection = registry::inspect(&read_module(file)?)?;
    if json {
        let value = serde_json::json!({
            "id": inspection.id,
            "exports": inspection.exports,
            "imports": inspection.imports,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{}", inspection.id);
    for (title, items) in [
        ("exports", &inspection.exports),
        ("imports", &inspection.imports),
    ] {
        println!("{title}:");
        for item in items {
            let name = if item.module.is_empty() {
                item.name.clone()
            } else {
                format!("{}::{}", item.module, item.name)
            };
            println!(
                "  {:<8} {name:<40} {}",
                item.kind,
                item.signature.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn call(args: RunArgs) -> anyhow::Result<()> {
    let bytes = read_module(&args.file)?;
    let input = match &args.input_file {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => args.input.clone().into_bytes(),
    };
    let engine = Engine::builder()
        .workers(1)
        .log_level(LogLevel::Trace)
        .build()?;
    let name = args
        .file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("module")
        .replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "-",
        );
    let module = engine.add_module(
        &args.tenant,
        NewModule {
            name,
            bytes,
            ..NewModule::default()
        },
    )?;
    let mut grant = Grant::default()
        .allow(args.allow)
        .with_timeout(Duration::from_millis(args.timeout_ms))
        .with_memory_bytes(args.memory_bytes);
    grant.fuel = args.fuel;
    grant.allowed_hosts = args.allow_host;
    grant.wasi = args.wasi || !args.dirs.is_empty();
    for (host, guest, read_only) in args.dirs {
        grant = grant.with_dir(host, guest, read_only);
    }
    grant.config.extend(args.config);
    let ctx = CallContext::new(args.tenant);
    let mut stdout = std::io::stdout().lock();
    for _ in 0..args.repeat.max(1) {
        let out = match engine.call_blocking(&module.id, &args.function, &input, &grant, &ctx) {
            Ok(out) => out,
            Err(error) => bail!("{} ({})", error, error.code()),
        };
        for line in &out.logs {
            eprintln!("[guest {:?}] {}", line.level, line.message);
        }
        stdout.write_all(&out.output)?;
        writeln!(stdout)?;
        eprintln!(
            "module {}: {} in {:?}, {} fuel",
            module.id, args.function, out.duration, out.fuel_used
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
