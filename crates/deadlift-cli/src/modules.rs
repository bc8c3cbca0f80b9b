//! The module and key-value commands: `module` (push, list, show, call, delete) and
//! `kv` (list, get, set, delete), thin clients of the agent's `/v1/modules` and `/v1/kv`
//! routes, acting for the caller's tenant.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Remote, cell, path_segment, print_json, table};
use crate::local::read_module;

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
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
pub enum KvCommand {
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

pub async fn module(command: ModuleCommand) -> anyhow::Result<()> {
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
                .json(client.request(
                    Method::GET,
                    &format!("/v1/modules/{}", path_segment(&module)),
                ))
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
            let path = format!(
                "/v1/modules/{}/call/{}",
                path_segment(&module),
                path_segment(&function)
            );
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
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/modules/{}", path_segment(&module)),
                ))
                .await?;
            if !remote.json {
                println!("deleted {module}");
            }
        }
    }
    Ok(())
}

pub async fn kv(command: KvCommand) -> anyhow::Result<()> {
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
                .send(client.request(Method::GET, &format!("/v1/kv/{}", path_segment(&key))))
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
                        .request(Method::PUT, &format!("/v1/kv/{}", path_segment(&key)))
                        .body(value),
                )
                .await?;
        }
        KvCommand::Delete { key, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::DELETE, &format!("/v1/kv/{}", path_segment(&key))))
                .await?;
        }
    }
    Ok(())
}
