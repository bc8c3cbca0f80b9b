//! The administrator's commands: `tenant` (create, list) and `token` (create, list,
//! revoke), thin clients of the agent's `/v1/tenants` and `/v1/tokens` routes. The agent
//! refuses them without the admin token.

use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use crate::client::{Remote, cell, path_segment, print_json, report, table};

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant
    Create {
        /// The tenant's name (lowercase letters, digits, `-`)
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
pub enum TokenCommand {
    /// Create a token for a tenant (printed once)
    Create {
        /// The tenant the token acts for
        #[arg(value_name = "TENANT")]
        owner: String,
        /// What the token is for, shown in `token list`
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
        /// The token's id, as `token list` shows it
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

pub async fn tenant(command: TenantCommand) -> anyhow::Result<()> {
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

pub async fn token(command: TokenCommand) -> anyhow::Result<()> {
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
                            &format!("/v1/tenants/{}/tokens", path_segment(&tenant)),
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
                .send(client.request(Method::DELETE, &format!("/v1/tokens/{}", path_segment(&id))))
                .await?;
            report(
                &remote,
                json!({ "revoked": id }),
                format!("token {id} revoked"),
            )?;
        }
    }
    Ok(())
}
