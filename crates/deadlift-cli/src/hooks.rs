//! The extension-point commands: `hook` (list, bind, unbind), thin clients of the
//! agent's `/v1/hooks`. The embedding application declares the hooks; a tenant binds one
//! of its own modules' functions to each.

use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use crate::client::{Remote, cell, joined, path_segment, print_json, report, rows, table};

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// List the hooks this agent declares, with your bindings
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Bind one of your modules' functions to a hook
    Bind {
        /// The hook's name, as `hook list` shows it
        hook: String,
        /// Module reference: name, name@version or sha256:...
        module: String,
        /// The module's exported function to bind
        #[arg(long)]
        function: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove your binding from a hook
    Unbind {
        /// The hook's name
        hook: String,
        #[command(flatten)]
        remote: Remote,
    },
}

pub async fn hook(command: HookCommand) -> anyhow::Result<()> {
    match command {
        HookCommand::List { remote } => {
            let client = remote.client()?;
            let hooks = client
                .json(client.request(Method::GET, "/v1/hooks"))
                .await?;
            if remote.json {
                return print_json(&hooks);
            }
            let rows = rows(&hooks, |h| {
                let offered = joined(&h["host_functions"]);
                let bound = match h["binding"].as_object() {
                    Some(b) => format!("{} {}", cell(&b["module"]), cell(&b["function"])),
                    None => "-".into(),
                };
                vec![cell(&h["name"]), offered, cell(&h["timeout_ms"]), bound]
            });
            table(&["hook", "host functions", "timeout ms", "bound to"], &rows);
        }
        HookCommand::Bind {
            hook,
            module,
            function,
            remote,
        } => {
            let client = remote.client()?;
            client
                .send(
                    client
                        .request(
                            Method::PUT,
                            &format!("/v1/hooks/{}/binding", path_segment(&hook)),
                        )
                        .json(&json!({ "module": module, "function": function })),
                )
                .await?;
            println!("{module} {function} bound to {hook}");
        }
        HookCommand::Unbind { hook, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/hooks/{}/binding", path_segment(&hook)),
                ))
                .await?;
            report(
                &remote,
                json!({ "hook": hook, "unbound": true }),
                format!("unbound from {hook}"),
            )?;
        }
    }
    Ok(())
}
