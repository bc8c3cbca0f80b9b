//! Grants: what a module may do when it runs. Deny by default.
//!
//! A grant is checked when a module is bound to an instance (host functions it imports)
//! and enforced on every call (memory, time, fuel, input and output sizes). Grants are
//! plain data so that later layers can load them from workflow files and API requests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The default memory budget: enough for a Rust guest (about 17 pages) with room to work.
pub const DEFAULT_MEMORY_BYTES: u64 = 16 * 1024 * 1024;
/// The default wall-clock limit of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// The default maximum input and output size of one call.
pub const DEFAULT_MAX_IO_BYTES: u64 = 4 * 1024 * 1024;
/// The default cap on an instance's Extism vars, as the SDK's.
pub const DEFAULT_MAX_VAR_BYTES: u64 = 1024 * 1024;
/// Default cap on an HTTP response body.
pub const DEFAULT_MAX_HTTP_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;
/// Default cap on what one call emits: events, and their bytes.
pub const DEFAULT_MAX_EMITS: u64 = 100;
pub const DEFAULT_MAX_EMIT_BYTES: u64 = 1024 * 1024;
/// Default cap on what one call logs: lines, and their bytes.
pub const DEFAULT_MAX_LOG_LINES: u64 = 1000;
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 * 1024;

/// What a module may do when it runs. `Grant::default()` allows no host function and
/// modest limits; everything else must be granted explicitly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grant {
    /// Host functions (in `extism:host/user`) the module may import, by name.
    pub host_functions: BTreeSet<String>,
    /// Budget for all memory of one instance: guest linear memory and Extism memory.
    pub memory_bytes: u64,
    /// Wall-clock limit of one call.
    #[serde(with = "duration_ms", rename = "timeout_ms")]
    pub timeout: Duration,
    /// Instruction budget of one call; `None` means unmetered (still bounded by time).
    pub fuel: Option<u64>,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
    /// Cap on the total size of the instance's vars; 0 disables vars.
    pub max_var_bytes: u64,
    /// Most events one call may emit; one more fails the call.
    pub max_emits: u64,
    /// Most bytes of events one call may emit.
    pub max_emit_bytes: u64,
    /// Most log lines one call keeps; the rest are dropped and counted.
    pub max_log_lines: u64,
    /// Most bytes of log lines one call keeps; the rest are dropped and counted.
    pub max_log_bytes: u64,
    /// Config values the module reads with `config_get`.
    pub config: BTreeMap<String, String>,
    /// Hosts `http_request` may reach: globs over the URL's host name
    /// (`api.example.com`, `*.example.com`). An IP address must be listed exactly.
    /// Empty: no outbound HTTP.
    pub allowed_hosts: Vec<String>,
    /// Largest HTTP response body `http_request` accepts.
    pub max_http_response_bytes: u64,
    /// Whether the module may import WASI preview 1 (no environment, no arguments;
    /// stdout and stderr go to the call's logs; clocks and random).
    pub wasi: bool,
    /// Directories WASI opens for the module: host directory (prefixed `ro:` for
    /// read-only) → the path the guest sees. Nothing else of the file system is visible.
    pub allowed_paths: BTreeMap<String, String>,
}

impl Default for Grant {
    fn default() -> Self {
        Self {
            host_functions: BTreeSet::new(),
            memory_bytes: DEFAULT_MEMORY_BYTES,
            timeout: DEFAULT_TIMEOUT,
            fuel: None,
            max_input_bytes: DEFAULT_MAX_IO_BYTES,
            max_output_bytes: DEFAULT_MAX_IO_BYTES,
            max_var_bytes: DEFAULT_MAX_VAR_BYTES,
            max_emits: DEFAULT_MAX_EMITS,
            max_emit_bytes: DEFAULT_MAX_EMIT_BYTES,
            max_log_lines: DEFAULT_MAX_LOG_LINES,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            config: BTreeMap::new(),
            allowed_hosts: Vec::new(),
            max_http_response_bytes: DEFAULT_MAX_HTTP_RESPONSE_BYTES,
            wasi: false,
            allowed_paths: BTreeMap::new(),
        }
    }
}

impl Grant {
    /// Grants the named host functions in addition to what is already granted.
    pub fn allow<I, S>(mut self, host_functions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.host_functions
            .extend(host_functions.into_iter().map(Into::into));
        self
    }

    pub fn with_memory_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_fuel(mut self, fuel: u64) -> Self {
        self.fuel = Some(fuel);
        self
    }

    pub fn with_max_input_bytes(mut self, bytes: u64) -> Self {
        self.max_input_bytes = bytes;
        self
    }

    pub fn with_max_output_bytes(mut self, bytes: u64) -> Self {
        self.max_output_bytes = bytes;
        self
    }

    pub fn with_max_var_bytes(mut self, bytes: u64) -> Self {
        self.max_var_bytes = bytes;
        self
    }

    /// Lets `http_request` reach hosts matching `pattern` (see `allowed_hosts`).
    pub fn allow_host(mut self, pattern: impl Into<String>) -> Self {
        self.allowed_hosts.push(pattern.into());
        self
    }

    /// Allows WASI preview 1.
    pub fn with_wasi(mut self) -> Self {
        self.wasi = true;
        self
    }

    /// Maps a host directory into the guest's WASI file system (read-only or not).
    pub fn with_dir(
        mut self,
        host: impl Into<String>,
        guest: impl Into<String>,
        read_only: bool,
    ) -> Self {
        let host = host.into();
        let key = if read_only {
            format!("ro:{host}")
        } else {
            host
        };
        self.allowed_paths.insert(key, guest.into());
        self
    }

    pub fn with_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// The part of the grant an instance is built with: calls whose grants agree on it may
    /// share warm instances; the rest (time, fuel, sizes, config) applies per call.
    pub(crate) fn instance_shape(&self) -> InstanceShape {
        InstanceShape {
            metered: self.fuel.is_some(),
            host_functions: self.host_functions.clone(),
            memory_bytes: self.memory_bytes,
            max_var_bytes: self.max_var_bytes,
            wasi: self.wasi,
            allowed_paths: self.allowed_paths.clone(),
        }
    }
}

/// See [`Grant::instance_shape`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct InstanceShape {
    /// Instances that count fuel come from the metered runtime, the others from the
    /// plain one (metering costs about a third of guest speed).
    pub metered: bool,
    pub host_functions: BTreeSet<String>,
    pub memory_bytes: u64,
    pub max_var_bytes: u64,
    pub wasi: bool,
    pub allowed_paths: BTreeMap<String, String>,
}

impl InstanceShape {
    /// Whether instances of this shape serve calls under `grant` (compared in place,
    /// without building the grant's shape).
    pub(crate) fn admits(&self, grant: &Grant) -> bool {
        self.metered == grant.fuel.is_some()
            && self.memory_bytes == grant.memory_bytes
            && self.max_var_bytes == grant.max_var_bytes
            && self.host_functions == grant.host_functions
            && self.wasi == grant.wasi
            && self.allowed_paths == grant.allowed_paths
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grant_denies_every_host_function() {
        assert!(Grant::default().host_functions.is_empty());
    }

    #[test]
    fn grant_round_trips_as_json_with_millisecond_timeouts() {
        let grant = Grant::default()
            .allow(["kv_get"])
            .with_timeout(Duration::from_millis(250));
        let json = serde_json::to_value(&grant).unwrap();
        assert_eq!(json["timeout_ms"], 250);
        let back: Grant = serde_json::from_value(json).unwrap();
        assert_eq!(back, grant);
    }

    #[test]
    fn unknown_grant_fields_are_rejected() {
        let err = serde_json::from_str::<Grant>(r#"{"host_function":["kv_get"]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
