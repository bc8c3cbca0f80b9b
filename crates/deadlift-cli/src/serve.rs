//! `deadlift serve`: the agent itself. It resolves the settings, builds an `Agent` on its
//! data directory and runs the HTTP server until SIGINT or SIGTERM; SIGHUP reads the
//! config file's policy again. What it prints at start is read by people and by the
//! integration tests (the last line says it listens).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::config::{Resolved, ServeConfig};

/// The agent's settings: the file given with `--config` (if any), overridden by the
/// environment and flags in `settings`.
pub fn settings(config_file: Option<&Path>, settings: ServeConfig) -> anyhow::Result<Resolved> {
    let file = match config_file {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    settings.over(file).resolve()
}

pub async fn serve(config: Resolved, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let mut builder = deadlift::Agent::builder(&config.data_dir)
        .admin_token(config.admin_token.clone())
        .v1_access(config.v1_access)
        .policy(config.policy.clone())
        .max_body_bytes(config.max_body_bytes)
        .default_grant(config.grant.clone())
        .max_concurrent_runs(config.max_concurrent_runs)
        .retention(config.retention)
        .durability(config.durability)
        .otlp_endpoint(config.otlp_endpoint.clone())
        .name(&config.name)
        .clustered(config.cluster.is_some());
    let settings = config.clone();
    builder = builder.engine(move |mut engine| {
        if let Some(workers) = settings.workers {
            engine = engine.workers(workers);
        }
        if let Some(calls) = settings.tenant_in_flight {
            engine = engine.tenant_in_flight(calls);
        }
        if let Some(calls) = settings.tenant_queue {
            engine = engine.tenant_queue(calls);
        }
        if let Some(wait) = settings.max_queue_wait {
            engine = engine.max_queue_wait(wait);
        }
        if let Some(bytes) = settings.module_cache_bytes {
            engine = engine.module_cache_bytes(bytes);
        }
        if let Some(bytes) = settings.max_module_bytes {
            engine = engine.max_module_bytes(bytes);
        }
        engine.time_slice(settings.time_slice)
    });
    let (agent, new_admin_token) = tokio::task::spawn_blocking(move || builder.build()).await??;
    let agent = Arc::new(agent);
    if let Some(cluster) = &config.cluster {
        agent
            .join_cluster(cluster)
            .await
            .context("cannot join the cluster")?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    println!("data directory: {}", config.data_dir.display());
    let identity = agent.federation().identity();
    println!(
        "agent {} (public key {}; peers register it with `deadlift peer add`)",
        identity.name,
        identity.public_key()
    );
    if let Some(cluster) = &config.cluster {
        println!(
            "cluster mode: NATS {} (streams with {} replica{})",
            cluster.urls.join(","),
            cluster.replicas,
            if cluster.replicas == 1 { "" } else { "s" }
        );
    }
    let resumed = agent.workflows().resumed_runs();
    if resumed > 0 {
        println!("resumed {resumed} runs left open by the previous process");
    }
    if let Some(token) = new_admin_token {
        println!("admin token (shown once, keep it safe): {token}");
    }
    let loopback = listener.local_addr()?.ip().is_loopback();
    match config.v1_access {
        deadlift::V1Access::Open if !loopback => println!(
            "warning: the Deadlift v1 routes are open without a token to anyone who can reach {} (--v1-open)",
            config.listen
        ),
        deadlift::V1Access::OpenOnLoopback if !loopback => println!(
            "the Deadlift v1 routes need a token of tenant `{}` or an admin's: the agent listens beyond loopback",
            deadlift::V1_TENANT
        ),
        _ => {}
    }
    // Printed last: once this line is out, the agent accepts connections.
    println!(
        "deadlift agent listening on http://{}",
        listener.local_addr()?
    );
    let reload = config_file.map(|path| tokio::spawn(reload_policy_on_hangup(agent.clone(), path)));
    deadlift::server::serve(agent.clone(), listener, shutdown_signal()).await?;
    if let Some(reload) = reload {
        reload.abort();
    }
    agent.shutdown().await;
    println!("deadlift agent stopped");
    Ok(())
}

/// On every SIGHUP, puts the config file's policy in force (from the next call on). A
/// file that no longer reads keeps the policy in force, and says why.
async fn reload_policy_on_hangup(agent: Arc<deadlift::Agent>, path: PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            let read = ServeConfig::from_file(&path).and_then(|file| {
                let policy = file.policy.unwrap_or_default();
                policy.validate().map_err(anyhow::Error::msg)?;
                Ok(policy)
            });
            match read {
                Ok(policy) => {
                    agent.policy().replace(policy);
                    agent.changed(deadlift::cluster::Setting::Policy).await;
                    println!("policy reloaded from {}", path.display());
                }
                Err(error) => {
                    println!("policy not reloaded, the one in force stays: {error:#}")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (agent, path);
    }
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
