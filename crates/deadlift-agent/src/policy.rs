//! The operator's policy: the most a tenant may grant its own plug-ins. Every grant a
//! tenant writes (today: a workflow step's) is checked against it when it is applied,
//! and refused, field by field, when it asks for more; and at every call the grant is
//! clamped to the policy in force then, so that a policy tightened later holds for
//! versions applied before it (the run records what was clamped).
//!
//! Grants the operator or the embedding application writes (the agent's default grant,
//! a hook's) are not held to it: nobody grants more than they hold, and the operator
//! holds everything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use deadlift_engine::Grant;

/// Ceilings for one tenant's grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest wall-clock limit of one call, in ms.
    pub max_timeout_ms: u64,
    pub max_memory_bytes: u64,
    /// Largest fuel budget; when set, a grant must meter fuel (no unmetered calls).
    pub max_fuel: Option<u64>,
    pub max_input_bytes: u64,
    pub max_output_bytes: u64,
    pub max_var_bytes: u64,
    pub max_http_response_bytes: u64,
    /// Most events, and bytes of them, one call may emit.
    pub max_emits: u64,
    pub max_emit_bytes: u64,
    /// Most log lines, and bytes of them, one call may keep.
    pub max_log_lines: u64,
    pub max_log_bytes: u64,
    /// Host patterns a grant's `allowed_hosts` must fall within (globs over names).
    /// Addresses, and so any loopback, private or link-local one, must be listed here
    /// exactly to be grantable.
    pub allowed_hosts: Vec<String>,
    /// Host functions a tenant may grant (the built-ins by default; the embedding
    /// application's own functions only when the operator lists them). A set: a name
    /// listed twice is listed once.
    #[schema(value_type = Vec<String>)]
    pub host_functions: BTreeSet<String>,
    /// Whether a tenant may grant WASI (never directories: those are the operator's).
    pub wasi: bool,
    /// Recorded calls (tapes) kept per module name and function; 0 records none.
    pub tapes_kept: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_timeout_ms: 5 * 60 * 1000,
            max_memory_bytes: 256 << 20,
            max_fuel: None,
            max_input_bytes: 64 << 20,
            max_output_bytes: 64 << 20,
            max_var_bytes: 16 << 20,
            max_http_response_bytes: 64 << 20,
            max_emits: 1_000,
            max_emit_bytes: 16 << 20,
            max_log_lines: 10_000,
            max_log_bytes: 1 << 20,
            allowed_hosts: vec!["*".into()],
            host_functions: ["kv_get", "kv_set", "kv_delete", "emit"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            wasi: true,
            tapes_kept: 1000,
        }
    }
}

/// The policy: defaults, and tenants with limits of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub default: Limits,
    pub tenants: BTreeMap<String, Limits>,
}

/// A grant field over the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excess {
    /// The grant's field, as a document names it (`timeout_ms`, `host_functions`, …).
    pub field: &'static str,
    pub message: String,
}

impl Policy {
    /// Refuses limits for a tenant that could not exist (a name tenants cannot have).
    pub fn validate(&self) -> Result<(), String> {
        for tenant in self.tenants.keys() {
            deadlift_engine::names::tenant_name(tenant)
                .map_err(|e| format!("policy for tenant `{tenant}`: the name {e}"))?;
        }
        // Limits are documented (and stored) as 64-bit signed integers; beyond, a limit
        // means nothing a grant could reach anyway.
        let scopes = std::iter::once(("the default", &self.default)).chain(
            self.tenants
                .iter()
                .map(|(name, limits)| (name.as_str(), limits)),
        );
        for (scope, limits) in scopes {
            let fields = serde_json::to_value(limits).map_err(|e| e.to_string())?;
            for (field, value) in fields.as_object().into_iter().flatten() {
                if value.as_u64().is_some_and(|n| n > i64::MAX as u64) {
                    return Err(format!(
                        "policy for {scope}: {field} is over {}, the largest limit",
                        i64::MAX
                    ));
                }
            }
        }
        Ok(())
    }

    /// The limits of `tenant`.
    pub fn limits(&self, tenant: &str) -> &Limits {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// Every way `grant` asks for more than `tenant` may grant.
    pub fn check(&self, tenant: &str, grant: &Grant) -> Vec<Excess> {
        let limits = self.limits(tenant);
        let mut excess = Vec::new();
        let mut over = |field, value: u64, max: u64, unit: &str| {
            if value > max {
                excess.push(Excess {
                    field,
                    message: format!("is {value}{unit}; the operator allows at most {max}{unit}"),
                });
            }
        };
        over(
            "timeout_ms",
            millis(grant.timeout),
            limits.max_timeout_ms,
            " ms",
        );
        over(
            "memory_bytes",
            grant.memory_bytes,
            limits.max_memory_bytes,
            " bytes",
        );
        over(
            "max_input_bytes",
            grant.max_input_bytes,
            limits.max_input_bytes,
            " bytes",
        );
        over(
            "max_output_bytes",
            grant.max_output_bytes,
            limits.max_output_bytes,
            " bytes",
        );
        over(
            "max_var_bytes",
            grant.max_var_bytes,
            limits.max_var_bytes,
            " bytes",
        );
        over(
            "max_http_response_bytes",
            grant.max_http_response_bytes,
            limits.max_http_response_bytes,
            " bytes",
        );
        over("max_emits", grant.max_emits, limits.max_emits, "");
        over(
            "max_emit_bytes",
            grant.max_emit_bytes,
            limits.max_emit_bytes,
            " bytes",
        );
        over(
            "max_log_lines",
            grant.max_log_lines,
            limits.max_log_lines,
            "",
        );
        over(
            "max_log_bytes",
            grant.max_log_bytes,
            limits.max_log_bytes,
            " bytes",
        );
        if let Some(max) = limits.max_fuel {
            match grant.fuel {
                None => excess.push(Excess {
                    field: "fuel",
                    message: format!("must be set: the operator allows at most {max}"),
                }),
                Some(fuel) => over("fuel", fuel, max, ""),
            }
        }
        for name in &grant.host_functions {
            if !limits.host_functions.contains(name) {
                excess.push(Excess {
                    field: "host_functions",
                    message: format!("`{name}` is not a host function tenants may grant here"),
                });
            }
        }
        for host in &grant.allowed_hosts {
            if !host_permitted(limits, host) {
                excess.push(Excess {
                    field: "allowed_hosts",
                    message: format!("`{host}` is outside the hosts the operator allows"),
                });
            }
        }
        if grant.wasi && !limits.wasi {
            excess.push(Excess {
                field: "wasi",
                message: "the operator does not let tenants grant WASI".into(),
            });
        }
        if !grant.allowed_paths.is_empty() {
            excess.push(Excess {
                field: "allowed_paths",
                message: "directories are mapped by the operator only".into(),
            });
        }
        excess
    }

    /// `grant` held to `tenant`'s limits, and the fields that had to be narrowed.
    pub fn clamp(&self, tenant: &str, grant: &Grant) -> (Grant, Vec<&'static str>) {
        if self.check(tenant, grant).is_empty() {
            return (grant.clone(), Vec::new());
        }
        let limits = self.limits(tenant);
        let mut clamped = Vec::new();
        let mut held = grant.clone();
        let mut narrow = |field, value: &mut u64, max: u64| {
            if *value > max {
                *value = max;
                clamped.push(field);
            }
        };
        let mut timeout = millis(held.timeout);
        narrow("timeout_ms", &mut timeout, limits.max_timeout_ms);
        held.timeout = Duration::from_millis(timeout);
        narrow(
            "memory_bytes",
            &mut held.memory_bytes,
            limits.max_memory_bytes,
        );
        narrow(
            "max_input_bytes",
            &mut held.max_input_bytes,
            limits.max_input_bytes,
        );
        narrow(
            "max_output_bytes",
            &mut held.max_output_bytes,
            limits.max_output_bytes,
        );
        narrow(
            "max_var_bytes",
            &mut held.max_var_bytes,
            limits.max_var_bytes,
        );
        narrow(
            "max_http_response_bytes",
            &mut held.max_http_response_bytes,
            limits.max_http_response_bytes,
        );
        narrow("max_emits", &mut held.max_emits, limits.max_emits);
        narrow(
            "max_emit_bytes",
            &mut held.max_emit_bytes,
            limits.max_emit_bytes,
        );
        narrow(
            "max_log_lines",
            &mut held.max_log_lines,
            limits.max_log_lines,
        );
        narrow(
            "max_log_bytes",
            &mut held.max_log_bytes,
            limits.max_log_bytes,
        );
        if let Some(max) = limits.max_fuel
            && held.fuel.is_none_or(|fuel| fuel > max)
        {
            held.fuel = Some(max);
            clamped.push("fuel");
        }
        let functions = held.host_functions.len();
        held.host_functions
            .retain(|name| limits.host_functions.contains(name));
        if held.host_functions.len() != functions {
            clamped.push("host_functions");
        }
        let hosts = held.allowed_hosts.len();
        held.allowed_hosts
            .retain(|host| host_permitted(limits, host));
        if held.allowed_hosts.len() != hosts {
            clamped.push("allowed_hosts");
        }
        if held.wasi && !limits.wasi {
            held.wasi = false;
            clamped.push("wasi");
        }
        if !held.allowed_paths.is_empty() {
            held.allowed_paths.clear();
            clamped.push("allowed_paths");
        }
        (held, clamped)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a grant's host entry falls within the operator's patterns: an address only
/// when the policy lists it exactly, a name (or a glob over names) when a pattern
/// matches it.
fn host_permitted(limits: &Limits, host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(address) = bare.parse::<IpAddr>() {
        return limits.allowed_hosts.iter().any(|entry| {
            entry
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                == Ok(address)
        });
    }
    limits.allowed_hosts.iter().any(|pattern| {
        pattern == host || glob::Pattern::new(pattern).is_ok_and(|glob| glob.matches(host))
    })
}

/// The policy in force, shared by whoever checks or clamps grants; replaced whole.
#[derive(Debug, Clone, Default)]
pub struct PolicyHandle(Arc<RwLock<Arc<Policy>>>);

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(policy))))
    }

    pub fn current(&self) -> Arc<Policy> {
        self.0.read().clone()
    }

    pub fn replace(&self, policy: Policy) {
        *self.0.write() = Arc::new(policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: tenants chose their own workflow grants with no ceiling.
    #[test]
    fn grants_over_the_policy_are_refused_field_by_field() {
        let policy = Policy::default();
        let greedy = Grant {
            timeout: Duration::from_millis(u64::MAX),
            memory_bytes: u64::MAX,
            max_var_bytes: u64::MAX,
            allowed_hosts: vec!["*".into(), "127.0.0.1".into(), "169.254.169.254".into()],
            ..Grant::default()
        }
        .allow(["kv_get", "send_email"]);
        let fields: Vec<&str> = policy
            .check("acme", &greedy)
            .iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "timeout_ms",
                "memory_bytes",
                "max_var_bytes",
                "host_functions",
                "allowed_hosts",
                "allowed_hosts"
            ]
        );
        assert!(
            policy
                .check("acme", &Grant::default().allow(["kv_get"]))
                .is_empty()
        );
    }

    #[test]
    fn a_tenant_may_have_limits_of_its_own() {
        let mut policy = Policy::default();
        policy.tenants.insert(
            "payments".into(),
            Limits {
                allowed_hosts: vec!["*.payments.example".into(), "10.0.0.7".into()],
                host_functions: ["lookup_purchases".to_owned()].into(),
                max_fuel: Some(1_000),
                ..Limits::default()
            },
        );
        let grant = Grant::default()
            .allow(["lookup_purchases"])
            .allow_host("api.payments.example")
            .allow_host("10.0.0.7")
            .with_fuel(500);
        assert!(policy.check("payments", &grant).is_empty());
        assert!(!policy.check("acme", &grant).is_empty());
        let unmetered = Grant::default();
        assert_eq!(policy.check("payments", &unmetered)[0].field, "fuel");
    }

    #[test]
    fn a_tightened_policy_clamps_and_says_what() {
        let policy = Policy {
            default: Limits {
                max_timeout_ms: 100,
                ..Limits::default()
            },
            ..Policy::default()
        };
        let grant = Grant::default()
            .with_timeout(Duration::from_secs(10))
            .allow(["kv_get", "send_email"]);
        let (held, clamped) = policy.clamp("acme", &grant);
        assert_eq!(held.timeout, Duration::from_millis(100));
        assert_eq!(held.host_functions, ["kv_get".to_owned()].into());
        assert_eq!(clamped, ["timeout_ms", "host_functions"]);
        let (same, none) = policy.clamp(
            "acme",
            &Grant::default().with_timeout(Duration::from_millis(50)),
        );
        assert!(none.is_empty());
        assert_eq!(same.timeout, Duration::from_millis(50));
    }
}
