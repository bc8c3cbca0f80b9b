//! The agent's configuration: one struct, read from a TOML file, then the environment,
//! then flags (each later source wins), with embedded defaults for everything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

/// Settings of `deadlift serve`. Every field is optional so that sources can be layered;
/// [`ServeConfig::resolve`] fills in the defaults.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// This agent's name, as its peers know it [default: deadlift]
    #[arg(long, env = "DEADLIFT_NAME")]
    pub name: Option<String>,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "DEADLIFT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database and compiled modules [default: ./deadlift-data]
    #[arg(long, env = "DEADLIFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin token to use instead of generating one at first start (prefer
    /// --admin-token-file: a flag's value is visible to every user in `ps`). A new one
    /// revokes the previous; it must have at least 128 bits of entropy
    #[arg(long, env = "DEADLIFT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin token (its first line)
    #[arg(long, env = "DEADLIFT_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Require a token (of tenant `v1`, or an admin's) on the Deadlift v1 routes even
    /// on loopback [default: false: open on loopback only]
    #[arg(long, env = "DEADLIFT_V1_REQUIRE_TOKEN")]
    pub v1_require_token: Option<bool>,
    /// Open the Deadlift v1 routes without a token wherever the agent listens, as the
    /// original was [default: false]
    #[arg(long, env = "DEADLIFT_V1_OPEN")]
    pub v1_open: Option<bool>,
    /// Largest request body in bytes [default: 16 MiB]
    #[arg(long, env = "DEADLIFT_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Threads that run plug-in calls [default: number of CPUs + 1, the one more kept
    /// for tenants with nothing running]
    #[arg(long, env = "DEADLIFT_WORKERS")]
    pub workers: Option<usize>,
    /// Calls of one tenant running at once [default: every worker]
    #[arg(long, env = "DEADLIFT_TENANT_IN_FLIGHT")]
    pub tenant_in_flight: Option<usize>,
    /// Calls of one tenant waiting for a worker at once; more are answered 429
    /// [default: 1024]
    #[arg(long, env = "DEADLIFT_TENANT_QUEUE")]
    pub tenant_queue: Option<usize>,
    /// A call that waited this many ms for a worker is answered 429 [default: 2000]
    #[arg(long, env = "DEADLIFT_MAX_QUEUE_WAIT_MS")]
    pub max_queue_wait_ms: Option<u64>,
    /// Compiled code kept in memory, in bytes; the least recently used modules beyond it
    /// are reloaded from the disk cache when called [default: 256 MiB]
    #[arg(long, env = "DEADLIFT_MODULE_CACHE_BYTES")]
    pub module_cache_bytes: Option<u64>,
    /// The largest module accepted, in bytes; larger uploads are answered 413
    /// [default: 8 MiB]
    #[arg(long, env = "DEADLIFT_MAX_MODULE_BYTES")]
    pub max_module_bytes: Option<u64>,
    /// Cooperative time slicing: a running call gives its worker to others after this
    /// many ms (every call then runs on a fiber, about 10% slower) [default: off]
    #[arg(long, env = "DEADLIFT_TIME_SLICE_MS")]
    pub time_slice_ms: Option<u64>,
    /// Export runs, steps and calls as OpenTelemetry spans to this OTLP/HTTP collector
    /// (its base URL; `/v1/traces` is added) [default: no export]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Wall-clock limit of one call through the API, in ms [default: 1000]
    #[arg(long, env = "DEADLIFT_CALL_TIMEOUT_MS")]
    pub call_timeout_ms: Option<u64>,
    /// Memory budget of a module instance, in bytes [default: 16 MiB]
    #[arg(long, env = "DEADLIFT_CALL_MEMORY_BYTES")]
    pub call_memory_bytes: Option<u64>,
    /// Instruction budget of one call [default: unmetered]
    #[arg(long, env = "DEADLIFT_CALL_FUEL")]
    pub call_fuel: Option<u64>,
    /// Workflow runs executing at once [default: 256]
    #[arg(long, env = "DEADLIFT_MAX_CONCURRENT_RUNS")]
    pub max_concurrent_runs: Option<usize>,
    /// Finished runs older than this many hours are deleted; 0 keeps them [default: 168]
    #[arg(long, env = "DEADLIFT_RUN_RETENTION_HOURS")]
    pub run_retention_hours: Option<u64>,
    /// At most this many finished runs are kept per tenant; 0 = no limit [default: 100000]
    #[arg(long, env = "DEADLIFT_RUN_RETENTION_COUNT")]
    pub run_retention_count: Option<u64>,
    /// Event ids are remembered for deduplication this many hours [default: 24]
    #[arg(long, env = "DEADLIFT_DEDUPE_WINDOW_HOURS")]
    pub dedupe_window_hours: Option<u64>,
    /// What a commit survives: `power-loss` (fsync every commit) or `process-crash`
    /// [default: power-loss]
    #[arg(long, env = "DEADLIFT_DURABILITY", value_parser = parse_durability)]
    pub durability: Option<deadlift::store::Durability>,
    /// Cluster mode: NATS server URLs, comma-separated (`nats://10.0.0.1:4222,...`);
    /// events go to the cluster's JetStream stream and agents share them out
    /// [default: no cluster]
    #[arg(long, env = "DEADLIFT_NATS")]
    pub nats: Option<String>,
    /// A NATS credentials file (a user JWT and its NKey seed) for cluster mode
    #[arg(long, env = "DEADLIFT_NATS_CREDENTIALS")]
    pub nats_credentials: Option<PathBuf>,
    /// Replicas of the cluster's streams: 1 on one NATS server, 3 on a cluster of three
    /// or more [default: 1]
    #[arg(long, env = "DEADLIFT_NATS_REPLICAS")]
    pub nats_replicas: Option<usize>,
    /// Seconds an event may be in an agent's hands without news before the cluster
    /// hands it to another agent: how soon a dead agent's events run elsewhere
    /// [default: 30]
    #[arg(long, env = "DEADLIFT_NATS_ACK_WAIT_SECS")]
    pub nats_ack_wait_secs: Option<u64>,
    /// The operator's ceilings on the grants tenants write: the config file's `[policy]`
    /// section only (`examples/agent.toml`)
    #[arg(skip)]
    pub policy: Option<deadlift::policy::Policy>,
}

fn parse_durability(text: &str) -> Result<deadlift::store::Durability, String> {
    match text {
        "power-loss" => Ok(deadlift::store::Durability::PowerLoss),
        "process-crash" => Ok(deadlift::store::Durability::ProcessCrash),
        other => Err(format!("`{other}`: use power-loss or process-crash")),
    }
}

/// [`ServeConfig`] with every default applied.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub admin_token: Option<String>,
    pub v1_access: deadlift::V1Access,
    pub max_body_bytes: usize,
    pub workers: Option<usize>,
    pub tenant_in_flight: Option<usize>,
    pub tenant_queue: Option<usize>,
    pub max_queue_wait: Option<std::time::Duration>,
    pub module_cache_bytes: Option<u64>,
    pub max_module_bytes: Option<u64>,
    pub time_slice: Option<std::time::Duration>,
    pub otlp_endpoint: Option<String>,
    pub grant: deadlift::Grant,
    pub max_concurrent_runs: usize,
    pub retention: deadlift::workflow::Retention,
    pub durability: deadlift::store::Durability,
    pub policy: deadlift::policy::Policy,
    /// Cluster mode, when NATS URLs are given.
    pub cluster: Option<deadlift::cluster::ClusterConfig>,
}

impl ServeConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// `self` (environment and flags) over `file`.
    pub fn over(self, file: Self) -> Self {
        Self {
            name: self.name.or(file.name),
            listen: self.listen.or(file.listen),
            data_dir: self.data_dir.or(file.data_dir),
            admin_token: self.admin_token.or(file.admin_token),
            admin_token_file: self.admin_token_file.or(file.admin_token_file),
            v1_require_token: self.v1_require_token.or(file.v1_require_token),
            v1_open: self.v1_open.or(file.v1_open),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            workers: self.workers.or(file.workers),
            tenant_in_flight: self.tenant_in_flight.or(file.tenant_in_flight),
            tenant_queue: self.tenant_queue.or(file.tenant_queue),
            max_queue_wait_ms: self.max_queue_wait_ms.or(file.max_queue_wait_ms),
            module_cache_bytes: self.module_cache_bytes.or(file.module_cache_bytes),
            max_module_bytes: self.max_module_bytes.or(file.max_module_bytes),
            time_slice_ms: self.time_slice_ms.or(file.time_slice_ms),
            otlp_endpoint: self.otlp_endpoint.or(file.otlp_endpoint),
            call_timeout_ms: self.call_timeout_ms.or(file.call_timeout_ms),
            call_memory_bytes: self.call_memory_bytes.or(file.call_memory_bytes),
            call_fuel: self.call_fuel.or(file.call_fuel),
            max_concurrent_runs: self.max_concurrent_runs.or(file.max_concurrent_runs),
            run_retention_hours: self.run_retention_hours.or(file.run_retention_hours),
            run_retention_count: self.run_retention_count.or(file.run_retention_count),
            dedupe_window_hours: self.dedupe_window_hours.or(file.dedupe_window_hours),
            durability: self.durability.or(file.durability),
            nats: self.nats.or(file.nats),
            nats_credentials: self.nats_credentials.or(file.nats_credentials),
            nats_replicas: self.nats_replicas.or(file.nats_replicas),
            nats_ack_wait_secs: self.nats_ack_wait_secs.or(file.nats_ack_wait_secs),
            policy: self.policy.or(file.policy),
        }
    }

    pub fn resolve(self) -> anyhow::Result<Resolved> {
        let admin_token = match (
            self.admin_token.filter(|t| !t.is_empty()),
            &self.admin_token_file,
        ) {
            (Some(_), Some(_)) => {
                anyhow::bail!("give the admin token or the admin token file, not both")
            }
            (given, None) => given,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read the admin token file {}", path.display())
                })?;
                let token = text.lines().next().unwrap_or_default().trim().to_owned();
                anyhow::ensure!(
                    !token.is_empty(),
                    "the admin token file {} is empty",
                    path.display()
                );
                Some(token)
            }
        };
        let mut grant = deadlift::Grant::default();
        if let Some(ms) = self.call_timeout_ms {
            grant.timeout = std::time::Duration::from_millis(ms);
        }
        if let Some(bytes) = self.call_memory_bytes {
            grant.memory_bytes = bytes;
        }
        grant.fuel = self.call_fuel;
        let defaults = deadlift::workflow::Retention::default();
        let hours = |h: u64| i64::try_from(h.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
        let retention = deadlift::workflow::Retention {
            max_age_ms: match self.run_retention_hours {
                Some(0) => None,
                Some(h) => Some(hours(h)),
                None => defaults.max_age_ms,
            },
            max_runs_per_tenant: match self.run_retention_count {
                Some(0) => None,
                Some(n) => Some(n),
                None => defaults.max_runs_per_tenant,
            },
            dedupe_window_ms: self
                .dedupe_window_hours
                .map_or(defaults.dedupe_window_ms, hours),
        };
        let cluster = match self
            .nats
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            None => None,
            Some(urls) => {
                let replicas = self.nats_replicas.unwrap_or(1);
                anyhow::ensure!(
                    (1..=5).contains(&replicas),
                    "nats_replicas must be between 1 and 5 (JetStream's limit)"
                );
                Some(deadlift::cluster::ClusterConfig {
                    urls: urls.split(',').map(|u| u.trim().to_owned()).collect(),
                    credentials: self.nats_credentials.clone(),
                    replicas,
                    dedupe_window: std::time::Duration::from_millis(
                        u64::try_from(retention.dedupe_window_ms).unwrap_or(0),
                    )
                    .max(std::time::Duration::from_secs(1)),
                    ack_wait: std::time::Duration::from_secs(
                        self.nats_ack_wait_secs.unwrap_or(30).clamp(1, 3600),
                    ),
                    history_kept: retention
                        .max_age_ms
                        .and_then(|ms| u64::try_from(ms).ok())
                        .map_or(
                            deadlift::cluster::ClusterConfig::default().history_kept,
                            std::time::Duration::from_millis,
                        ),
                })
            }
        };
        Ok(Resolved {
            cluster,
            name: self.name.unwrap_or_else(|| "deadlift".to_owned()),
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("deadlift-data")),
            admin_token,
            v1_access: match (
                self.v1_require_token.unwrap_or(false),
                self.v1_open.unwrap_or(false),
            ) {
                (true, true) => anyhow::bail!("give v1_require_token or v1_open, not both"),
                (true, false) => deadlift::V1Access::Token,
                (false, true) => deadlift::V1Access::Open,
                (false, false) => deadlift::V1Access::OpenOnLoopback,
            },
            max_body_bytes: self.max_body_bytes.unwrap_or(16 * 1024 * 1024),
            workers: self.workers,
            tenant_in_flight: self.tenant_in_flight,
            tenant_queue: self.tenant_queue,
            max_queue_wait: self.max_queue_wait_ms.map(std::time::Duration::from_millis),
            module_cache_bytes: self.module_cache_bytes,
            max_module_bytes: self.max_module_bytes,
            time_slice: self
                .time_slice_ms
                .filter(|ms| *ms > 0)
                .map(std::time::Duration::from_millis),
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.is_empty()),
            grant,
            max_concurrent_runs: self.max_concurrent_runs.unwrap_or(256),
            retention,
            durability: self.durability.unwrap_or_default(),
            policy: {
                let policy = self.policy.unwrap_or_default();
                policy.validate().map_err(anyhow::Error::msg)?;
                policy
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_environment_win_over_the_file() {
        let file: ServeConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/file\"\ncall_timeout_ms = 50\n",
        )
        .unwrap();
        let flags = ServeConfig {
            data_dir: Some(PathBuf::from("/tmp/flag")),
            ..ServeConfig::default()
        };
        let resolved = flags.over(file).resolve().unwrap();
        assert_eq!(resolved.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(resolved.data_dir, PathBuf::from("/tmp/flag"));
        assert_eq!(resolved.grant.timeout.as_millis(), 50);
    }

    #[test]
    fn defaults_listen_on_loopback_only() {
        let resolved = ServeConfig::default().resolve().unwrap();
        assert!(resolved.listen.ip().is_loopback());
        assert_eq!(resolved.v1_access, deadlift::V1Access::OpenOnLoopback);
    }

    /// Issue 11: the admin token was only given on the command line, visible in `ps`.
    #[test]
    fn the_admin_token_comes_from_a_file_and_not_from_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        std::fs::write(&path, "Zq3xV9pL2mR7tK4wY8nB6cH1jF5gD0sA\n").unwrap();
        let from_file = ServeConfig {
            admin_token_file: Some(path.clone()),
            ..ServeConfig::default()
        };
        assert_eq!(
            from_file.resolve().unwrap().admin_token.as_deref(),
            Some("Zq3xV9pL2mR7tK4wY8nB6cH1jF5gD0sA")
        );
        let both = ServeConfig {
            admin_token: Some("x".into()),
            admin_token_file: Some(path),
            ..ServeConfig::default()
        };
        assert!(both.resolve().is_err());
        let missing = ServeConfig {
            admin_token_file: Some(dir.path().join("nowhere")),
            ..ServeConfig::default()
        };
        assert!(missing.resolve().is_err());
    }

    #[test]
    fn the_example_configuration_reads_with_its_policy() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agent.toml");
        let resolved = ServeConfig::from_file(&path).unwrap().resolve().unwrap();
        assert_eq!(resolved.policy.default.max_timeout_ms, 10_000);
        let acme = resolved.policy.limits("acme");
        assert_eq!(acme.max_fuel, Some(50_000_000));
        assert_eq!(acme.allowed_hosts, ["api.acme.example"]);
        // Unlisted fields of a tenant take the built-in defaults.
        assert_eq!(
            acme.max_memory_bytes,
            deadlift::policy::Limits::default().max_memory_bytes
        );
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        assert!(toml::from_str::<ServeConfig>("lisen = \"x\"").is_err());
    }
}
