//! Direct calls of a tenant's module (the API's `call` route): the reference resolved
//! (a bare name through its release, so a canary may serve it), the module's manifest as
//! the grant, narrowed by the caller, and around the call what the agent keeps of it: a
//! tape when the call is sampled, its outcome counted towards a canary, its tape handed
//! to a shadow rollout.

use std::time::{Duration, SystemTime};

use deadlift_engine::registry::{ModuleError, ModuleId};
use deadlift_engine::{CallContext, CallError, CallOutput, Code, Grant};

use crate::Agent;
use crate::keeping::{Keeping, Kept};
use crate::manifest::ManifestError;
use crate::releases::{Routed, counts_against_version};

/// What the caller narrows the module's grant to.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallLimits {
    pub timeout: Option<Duration>,
    pub fuel: Option<u64>,
}

/// A direct call made: which module served it and how, and its outcome.
#[derive(Debug)]
pub struct DirectCall {
    pub module: ModuleId,
    pub name: String,
    /// The version's label, when it has one.
    pub version: Option<String>,
    /// Whether a canary served the call.
    pub canary: bool,
    /// The grant the call ran with.
    pub grant: Grant,
    pub started: SystemTime,
    pub result: Result<CallOutput, CallError>,
}

/// Why a direct call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DirectCallError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl DirectCallError {
    pub fn code(&self) -> Code {
        match self {
            Self::Module(e) => e.code(),
            Self::Manifest(e) => e.code(),
        }
    }
}

impl Agent {
    /// Calls `function` of the tenant's module `reference` with `input`.
    pub async fn call_module(
        &self,
        tenant: &str,
        reference: &str,
        function: &str,
        input: &[u8],
        limits: CallLimits,
    ) -> Result<DirectCall, DirectCallError> {
        let routed = self.releases().route(tenant, reference, None);
        let (module, name, version) = match &routed {
            Some(routed) => (
                routed.version.module,
                routed.name.clone(),
                routed.version.version.clone(),
            ),
            None => {
                let (engine, owner, reference) = (
                    self.engine().clone(),
                    tenant.to_owned(),
                    reference.to_owned(),
                );
                let info = tokio::task::spawn_blocking(move || {
                    engine.registry().resolve(&owner, &reference)
                })
                .await
                .map_err(|e| {
                    ModuleError::Storage(deadlift_engine::registry::StoreError(e.to_string()))
                })??;
                (info.id, info.name, info.version)
            }
        };
        // The module's manifest when it has one (held to the policy), else the default;
        // the call itself may only narrow it.
        let mut grant = self.call_grant(tenant, &module).await?;
        if let Some(timeout) = limits.timeout {
            grant.timeout = grant.timeout.min(timeout);
        }
        if let Some(fuel) = limits.fuel {
            grant.fuel = Some(grant.fuel.map_or(fuel, |granted| granted.min(fuel)));
        }
        let (started, result) = self
            .call_kept(
                tenant,
                (&module, Some(&name)),
                function,
                input,
                &grant,
                routed.as_ref(),
            )
            .await;
        Ok(DirectCall {
            module,
            name,
            version,
            canary: routed.as_ref().is_some_and(|r| r.canary),
            grant,
            started,
            result,
        })
    }

    /// Calls one module as given (no release routes it) under `grant`, recorded on tape
    /// when sampled: the Deadlift v1 execute route's call.
    pub async fn call_pinned(
        &self,
        tenant: &str,
        module: &ModuleId,
        function: &str,
        input: &[u8],
        grant: &Grant,
    ) -> (SystemTime, Result<CallOutput, CallError>) {
        self.call_kept(tenant, (module, None), function, input, grant, None)
            .await
    }

    /// The call, and what the agent keeps of it: the tape when sampled (under `name`, or
    /// the module's own name), the outcome counted towards a canary, the tape handed to
    /// a shadow rollout.
    async fn call_kept(
        &self,
        tenant: &str,
        (module, name): (&ModuleId, Option<&str>),
        function: &str,
        input: &[u8],
        grant: &Grant,
        routed: Option<&Routed>,
    ) -> (SystemTime, Result<CallOutput, CallError>) {
        let started = SystemTime::now();
        let keeping = Keeping::begin(self.tapes(), tenant, &module.to_string(), function, routed);
        let ctx = match keeping.tape() {
            Some(tape) => CallContext::new(tenant).with_tape(tape.clone()),
            None => CallContext::new(tenant),
        };
        let result = self
            .engine()
            .call_direct(module, function, input, grant, &ctx)
            .await;
        if let Some(routed) = routed {
            let failed = result.as_ref().err().is_some_and(counts_against_version);
            self.releases().observe(tenant, routed, failed);
        }
        keeping.end(
            self.tapes(),
            self.releases(),
            Kept {
                tenant,
                routed,
                module_id: module.to_string(),
                module_name: name.map(str::to_owned),
                function,
                input,
                grant,
                result: &result,
                duration_us: u64::try_from(started.elapsed().unwrap_or_default().as_micros())
                    .unwrap_or(u64::MAX),
            },
        );
        (started, result)
    }
}
