//! The module and key-value commands: `module` (push, manifest, list, show, call,
//! delete) and
//! `kv` (list, get, set, delete), thin clients of the agent's `/v1/modules` and `/v1/kv`
//! routes, acting for the caller's tenant.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Remote, cell, path_segment, print_json, report, rows, table};
use crate::local::read_module;

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Upload a .wasm file
    Push {
        /// The .wasm file
        file: PathBuf,
        /// The module's name: calls and workflows refer to it
        #[arg(long)]
        name: String,
        /// A version; `name@version` then refers to exactly these bytes
        #[arg(long)]
        version: Option<String>,
        /// What the module does, for people
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        manifest: ManifestArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a module's manifest, or store one (any option given replaces it whole)
    Manifest {
        /// Module reference: name, name@version or sha256:...
        module: String,
        #[command(flatten)]
        manifest: ManifestArgs,
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
        /// Module reference: name, name@version or sha256:...
        module: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Call a module's function
    Call {
        /// Module reference: name, name@version or sha256:...
        module: String,
        /// The exported function to call
        function: String,
        /// Input (JSON or any text)
        #[arg(long, default_value = "")]
        input: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Replay a module's recorded calls through new bytes: what would change
    Test {
        /// The candidate .wasm file (pushed as `<against>-candidate`, which nothing calls)
        file: PathBuf,
        /// The module name whose recorded calls are replayed
        #[arg(long)]
        against: String,
        /// Only the newest this many calls (default 100)
        #[arg(long)]
        last: Option<u32>,
        /// Only calls recorded since this time (RFC 3339)
        #[arg(long)]
        since: Option<String>,
        /// Only calls of this function
        #[arg(long)]
        function: Option<String>,
        /// Config for the candidate, replacing the module's own (repeatable): the same
        /// bytes configured otherwise are a new version too
        #[arg(long, value_name = "KEY=VALUE")]
        config: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Roll a version out beside the live one: as a canary serving a share of calls
    /// (rolled back by itself when its error rate passes the live one's by more than
    /// the threshold), or in shadow, compared on live calls and serving none
    Rollout(crate::releases::RolloutArgs),
    /// Make a version live: NAME promotes the rollout's candidate, NAME@VERSION that
    /// version
    Promote(crate::releases::PromoteArgs),
    /// End the rollout; without one, go back to the version live before the last
    /// promotion
    Rollback(crate::releases::NameArgs),
    /// Show which version serves a name, the rollout in progress and the history
    Release(crate::releases::NameArgs),
    /// Delete a module
    Delete {
        /// Module reference: name, name@version or sha256:...
        module: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// The Extism manifest options stored with a module: direct calls run with them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ManifestArgs {
    /// A config value the module reads (repeatable)
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// A host `http_request` may reach (repeatable; globs over names)
    #[arg(long = "allow-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,
    /// Let the module import WASI (no directories)
    #[arg(long)]
    wasi: bool,
    /// A host function the module is granted (repeatable)
    #[arg(long = "host-function", value_name = "NAME")]
    host_functions: Vec<String>,
    /// Most 64 KiB pages of memory, as the SDK's `max_pages`
    #[arg(long)]
    max_pages: Option<u32>,
    /// Wall-clock limit of one call, in ms
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Instruction budget of one call
    #[arg(long)]
    fuel: Option<u64>,
}

impl ManifestArgs {
    /// The manifest document, or `None` when no option was given.
    fn document(&self) -> anyhow::Result<Option<Value>> {
        let given = !self.config.is_empty()
            || !self.allowed_hosts.is_empty()
            || self.wasi
            || !self.host_functions.is_empty()
            || self.max_pages.is_some()
            || self.timeout_ms.is_some()
            || self.fuel.is_some();
        if !given {
            return Ok(None);
        }
        let mut config = serde_json::Map::new();
        for pair in &self.config {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--config takes KEY=VALUE, not `{pair}`"))?;
            config.insert(key.to_owned(), Value::String(value.to_owned()));
        }
        let mut manifest = json!({
            "config": config,
            "allowed_hosts": self.allowed_hosts,
            "wasi": self.wasi,
            "host_functions": self.host_functions,
        });
        if let Some(pages) = self.max_pages {
            manifest["memory"] = json!({ "max_pages": pages });
        }
        if let Some(ms) = self.timeout_ms {
            manifest["timeout_ms"] = json!(ms);
        }
        if let Some(fuel) = self.fuel {
            manifest["fuel"] = json!(fuel);
        }
        Ok(Some(manifest))
    }
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// List keys
    List {
        /// Only keys that start with this
        #[arg(long, default_value = "")]
        prefix: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a value
    Get {
        /// The key
        key: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Set a value
    Set {
        /// The key
        key: String,
        /// The value (stored as these bytes)
        value: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a key
    Delete {
        /// The key
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
            manifest,
            remote,
        } => {
            let client = remote.client()?;
            let manifest = manifest.document()?;
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
            if let Some(manifest) = manifest {
                let path = format!("/v1/modules/{}/manifest", path_segment(&cell(&info["id"])));
                client
                    .json(client.request(Method::PUT, &path).json(&manifest))
                    .await?;
            }
            if remote.json {
                return print_json(&info);
            }
            let name = match info["version"].as_str() {
                Some(version) => format!("{}@{version}", cell(&info["name"])),
                None => cell(&info["name"]),
            };
            println!("pushed {} as {name}", cell(&info["id"]));
        }
        ModuleCommand::Manifest {
            module,
            manifest,
            remote,
        } => {
            let client = remote.client()?;
            let path = format!("/v1/modules/{}/manifest", path_segment(&module));
            let shown = match manifest.document()? {
                Some(manifest) => {
                    client
                        .json(client.request(Method::PUT, &path).json(&manifest))
                        .await?
                }
                None => client.json(client.request(Method::GET, &path)).await?,
            };
            print_json(&shown)?;
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
        ModuleCommand::Test {
            file,
            against,
            last,
            since,
            function,
            config,
            remote,
        } => {
            let client = remote.client()?;
            let bytes = read_module(&file)?;
            let mut entries = serde_json::Map::new();
            for entry in &config {
                let (key, value) = entry
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--config {entry}: use KEY=VALUE"))?;
                entries.insert(key.to_owned(), json!(value));
            }
            // Bytes the tenant has already (under any name) are replayed as they are.
            let id = deadlift::registry::ModuleId::of(&bytes).to_string();
            let known = client
                .json(client.request(Method::GET, &format!("/v1/modules/{}", path_segment(&id))))
                .await;
            let candidate = match known {
                Ok(info) => info,
                Err(_) => {
                    client
                        .json(
                            client
                                .request(Method::POST, "/v1/modules")
                                .query(&[("name", format!("{against}-candidate"))])
                                .body(bytes),
                        )
                        .await?
                }
            };
            let mut query = vec![("against", against)];
            query.extend(last.map(|n| ("last", n.to_string())));
            if let Some(since) = since {
                query.push(("since", crate::runs::rfc3339_ms(&since)?.to_string()));
            }
            query.extend(function.map(|f| ("function", f)));
            let path = format!(
                "/v1/modules/{}/replay",
                path_segment(&cell(&candidate["id"]))
            );
            let report = client
                .json(
                    client
                        .request(Method::POST, &path)
                        .query(&query)
                        .json(&json!({ "config": entries })),
                )
                .await?;
            if remote.json {
                return print_json(&report);
            }
            print_replay(&report);
            // A changed behaviour is what the command is for, not a failure; a candidate
            // that now fails calls is.
            if report["failed"].as_u64().unwrap_or(0) > 0 {
                std::process::exit(1);
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
            let served = match (out["version"].as_str(), out["canary"].as_bool()) {
                (Some(version), Some(true)) => format!(" · version {version} (canary)"),
                (Some(version), _) => format!(" · version {version}"),
                (None, _) => String::new(),
            };
            eprintln!(
                "fuel {} · {} µs{served}",
                cell(&out["fuel_used"]),
                cell(&out["duration_us"])
            );
        }
        ModuleCommand::Rollout(args) => crate::releases::rollout(args).await?,
        ModuleCommand::Promote(args) => crate::releases::promote(args).await?,
        ModuleCommand::Rollback(args) => crate::releases::rollback(args).await?,
        ModuleCommand::Release(args) => crate::releases::release(args).await?,
        ModuleCommand::Delete { module, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/modules/{}", path_segment(&module)),
                ))
                .await?;
            report(
                &remote,
                json!({ "deleted": module }),
                format!("deleted {module}"),
            )?;
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
            report(
                &remote,
                json!({ "key": key, "stored": true }),
                format!("stored {key}"),
            )?;
        }
        KvCommand::Delete { key, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::DELETE, &format!("/v1/kv/{}", path_segment(&key))))
                .await?;
            report(
                &remote,
                json!({ "key": key, "deleted": true }),
                format!("deleted {key}"),
            )?;
        }
    }
    Ok(())
}

/// The replay report as a table and totals.
fn print_replay(report: &serde_json::Value) {
    let rows = rows(&report["calls"], |c| {
        vec![
            cell(&c["tape"]),
            cell(&c["function"]),
            cell(&c["verdict"]),
            outcome(&c["recorded"]),
            outcome(&c["replayed"]),
        ]
    });
    table(
        &["tape", "function", "verdict", "recorded", "replayed"],
        &rows,
    );
    println!(
        "{} calls: {} identical, {} changed, {} newly failing, {} no longer failing, {} diverged",
        cell(&report["total"]),
        cell(&report["identical"]),
        cell(&report["changed"]),
        cell(&report["failed"]),
        cell(&report["fixed"]),
        cell(&report["diverged"]),
    );
    let totals = &report["totals"];
    if totals["calls"].as_u64().unwrap_or(0) > 0 {
        println!(
            "over the {} calls that succeeded both times: fuel {} -> {}, time {} µs -> {} µs",
            cell(&totals["calls"]),
            cell(&totals["fuel_recorded"]),
            cell(&totals["fuel_replayed"]),
            cell(&totals["duration_us_recorded"]),
            cell(&totals["duration_us_replayed"]),
        );
    }
}

fn outcome(outcome: &serde_json::Value) -> String {
    match (&outcome["output"], &outcome["error"]) {
        (serde_json::Value::Null, error) => format!("error {}", cell(&error["code"])),
        (output, _) => output.to_string(),
    }
}
