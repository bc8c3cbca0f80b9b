//! The CLI's federation commands: `identity` and `peer` (add, list, remove, outbox,
//! replay: the admin's; view, views, unview: a tenant's tokens on its peers' agents),
//! thin clients of the agent's `/v1/identity`, `/v1/peers`, `/v1/outbox` and
//! `/v1/peer-views`.

use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use crate::client::{Remote, cell, joined, path_segment, print_json, report, rows, table};

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Register (or replace) a peer agent (admin)
    Add {
        /// The peer's name here (its agent's name)
        name: String,
        /// The peer's base URL, e.g. http://127.0.0.1:8081
        url: String,
        /// The peer's public key (`deadlift identity` on the peer prints it)
        #[arg(long)]
        public_key: String,
        /// Subject patterns of events sent to the peer (repeatable or comma-separated)
        #[arg(long, value_delimiter = ',')]
        send: Vec<String>,
        /// Subject patterns of events accepted from the peer (repeatable or comma-separated)
        #[arg(long, value_delimiter = ',')]
        accept: Vec<String>,
        /// The tenant here whose events go to the peer and into which its events arrive
        #[arg(long)]
        local_tenant: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List peers (admin)
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a peer (admin)
    Remove {
        /// The peer's name
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Deliveries to peers: pending, delivered or dead (admin)
    Outbox {
        /// pending, delivered or dead
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Send a dead delivery again (admin)
    Replay {
        /// The delivery's id, as `peer outbox` shows it
        id: i64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Store the token your tenant holds on a peer's agent, so that traces show that side
    /// (the token is read from DEADLIFT_PEER_TOKEN, never from a flag `ps` would show)
    View {
        /// A peer serving your tenant
        peer: String,
        /// Your token on the peer's agent
        #[arg(long, env = "DEADLIFT_PEER_TOKEN", hide_env_values = true)]
        peer_token: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the peers whose side of a trace your tenant can see (never the tokens)
    Views {
        #[command(flatten)]
        remote: Remote,
    },
    /// Forget your tenant's token on a peer's agent
    Unview {
        /// The peer
        peer: String,
        #[command(flatten)]
        remote: Remote,
    },
}

pub async fn identity(remote: Remote) -> anyhow::Result<()> {
    let client = remote.client()?;
    let identity = client
        .json(client.request(Method::GET, "/v1/identity"))
        .await?;
    if remote.json {
        return print_json(&identity);
    }
    println!("name        {}", cell(&identity["name"]));
    println!("public key  {}", cell(&identity["public_key"]));
    Ok(())
}

pub async fn peer(command: PeerCommand) -> anyhow::Result<()> {
    match command {
        PeerCommand::Add {
            name,
            url,
            public_key,
            send,
            accept,
            local_tenant,
            remote,
        } => {
            let client = remote.client()?;
            let body = json!({
                "name": name, "url": url, "public_key": public_key,
                "tenant": local_tenant, "send": send, "accept": accept,
            });
            let added = client
                .json(client.request(Method::POST, "/v1/peers").json(&body))
                .await?;
            if remote.json {
                return print_json(&added);
            }
            println!("peer {name} added");
        }
        PeerCommand::List { remote } => {
            let client = remote.client()?;
            let peers = client
                .json(client.request(Method::GET, "/v1/peers"))
                .await?;
            if remote.json {
                return print_json(&peers);
            }
            let rows = rows(&peers, |p| {
                vec![
                    cell(&p["name"]),
                    cell(&p["url"]),
                    cell(&p["tenant"]),
                    joined(&p["send"]),
                    joined(&p["accept"]),
                    cell(&p["public_key"]),
                ]
            });
            table(
                &["name", "url", "tenant", "send", "accept", "public key"],
                &rows,
            );
        }
        PeerCommand::Remove { name, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/peers/{}", path_segment(&name)),
                ))
                .await?;
            report(
                &remote,
                json!({ "removed": name }),
                format!("peer {name} removed"),
            )?;
        }
        PeerCommand::Outbox { status, remote } => {
            let client = remote.client()?;
            let mut request = client.request(Method::GET, "/v1/outbox");
            if let Some(status) = status {
                request = request.query(&[("status", status)]);
            }
            let entries = client.json(request).await?;
            if remote.json {
                return print_json(&entries);
            }
            let rows = rows(&entries, |e| {
                vec![
                    cell(&e["id"]),
                    cell(&e["peer"]),
                    cell(&e["event_id"]),
                    cell(&e["status"]),
                    cell(&e["attempts"]),
                    cell(&e["last_error"]),
                ]
            });
            table(
                &["id", "peer", "event", "status", "attempts", "last error"],
                &rows,
            );
        }
        PeerCommand::View {
            peer,
            peer_token,
            remote,
        } => {
            let client = remote.client()?;
            let stored = client
                .json(
                    client
                        .request(
                            Method::PUT,
                            &format!("/v1/peer-views/{}", path_segment(&peer)),
                        )
                        .json(&json!({ "token": peer_token })),
                )
                .await?;
            report(
                &remote,
                stored,
                format!("traces now show peer {peer}'s side"),
            )?;
        }
        PeerCommand::Views { remote } => {
            let client = remote.client()?;
            let views = client
                .json(client.request(Method::GET, "/v1/peer-views"))
                .await?;
            if remote.json {
                return print_json(&views);
            }
            let rows = rows(&views, |v| vec![cell(&v["peer"]), cell(&v["url"])]);
            table(&["peer", "url"], &rows);
        }
        PeerCommand::Unview { peer, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/peer-views/{}", path_segment(&peer)),
                ))
                .await?;
            report(
                &remote,
                json!({ "forgotten": peer }),
                format!("token for peer {peer} forgotten"),
            )?;
        }
        PeerCommand::Replay { id, remote } => {
            let client = remote.client()?;
            client
                .send(client.request(Method::POST, &format!("/v1/outbox/{id}/replay")))
                .await?;
            report(
                &remote,
                json!({ "delivery": id, "queued": true }),
                format!("delivery {id} queued again"),
            )?;
        }
    }
    Ok(())
}
