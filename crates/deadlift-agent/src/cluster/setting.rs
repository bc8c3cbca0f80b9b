//! One shared setting: its key in the bucket (`Setting`), its value here as the bucket
//! holds it (`local`), making the local one what the bucket holds (`apply`, through the
//! agent's own methods), and everything this agent holds when it joins
//! (`local_settings`).

use async_nats::jetstream::object_store;
use deadlift_engine::registry::{ModuleId, NewModule};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::ClusterError;
use crate::Agent;
use crate::workflow::{WorkflowError, WorkflowSpec};

/// A setting changed through this agent's API (or found here when it joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    Tenant(String),
    /// A tenant token, by id.
    Token(String),
    Module {
        tenant: String,
        id: ModuleId,
    },
    Manifest {
        tenant: String,
        id: ModuleId,
    },
    Workflow {
        tenant: String,
        name: String,
    },
    /// A module name's release: its live version and rollout.
    Release {
        tenant: String,
        name: String,
    },
    /// A tenant's binding to a hook (the hook must be declared on every agent).
    Binding {
        tenant: String,
        hook: String,
    },
    /// A peer, by name: every agent delivers to it and accepts its deliveries.
    Peer(String),
    /// The operator's policy: one for the cluster (the newest `PUT /v1/policy`, reload
    /// or agent to join sets it).
    Policy,
}

impl Setting {
    pub(super) fn key(&self) -> String {
        match self {
            Self::Tenant(tenant) => format!("tenants.{tenant}"),
            Self::Token(id) => format!("tokens.{id}"),
            Self::Module { tenant, id } => format!("modules.{tenant}.{}", id.hex()),
            Self::Manifest { tenant, id } => format!("manifests.{tenant}.{}", id.hex()),
            Self::Workflow { tenant, name } => format!("workflows.{tenant}.{name}"),
            Self::Release { tenant, name } => format!("releases.{tenant}.{name}"),
            Self::Binding { tenant, hook } => format!("bindings.{tenant}.{hook}"),
            Self::Peer(name) => format!("peers.{name}"),
            Self::Policy => "policy.all".into(),
        }
    }

    pub(super) fn from_key(key: &str) -> Option<Self> {
        let (kind, rest) = key.split_once('.')?;
        let tenant_and = |rest: &str| -> Option<(String, String)> {
            let (tenant, rest) = rest.split_once('.')?;
            deadlift_engine::names::tenant_name(tenant).ok()?;
            Some((tenant.to_owned(), rest.to_owned()))
        };
        match kind {
            "tenants" => {
                deadlift_engine::names::tenant_name(rest).ok()?;
                Some(Self::Tenant(rest.to_owned()))
            }
            "tokens" => Some(Self::Token(rest.to_owned())),
            "modules" => {
                let (tenant, hex) = tenant_and(rest)?;
                Some(Self::Module {
                    tenant,
                    id: hex.parse().ok()?,
                })
            }
            "manifests" => {
                let (tenant, hex) = tenant_and(rest)?;
                Some(Self::Manifest {
                    tenant,
                    id: hex.parse().ok()?,
                })
            }
            "workflows" => {
                let (tenant, name) = tenant_and(rest)?;
                Some(Self::Workflow { tenant, name })
            }
            "releases" => {
                let (tenant, name) = tenant_and(rest)?;
                Some(Self::Release { tenant, name })
            }
            "bindings" => {
                let (tenant, hook) = tenant_and(rest)?;
                Some(Self::Binding { tenant, hook })
            }
            "policy" if rest == "all" => Some(Self::Policy),
            "peers" => {
                crate::workflow::spec::validate_name(rest).ok()?;
                Some(Self::Peer(rest.to_owned()))
            }
            _ => None,
        }
    }
}

/// What this agent holds that the cluster shares, to name to the publisher when it
/// joins.
pub(crate) async fn local_settings(agent: &Agent) -> Result<Vec<Setting>, ClusterError> {
    let lookup =
        |e: &dyn std::fmt::Display| ClusterError::Setup(format!("reading the local settings: {e}"));
    let db = agent.db().clone();
    let engine = agent.engine().clone();
    let (tenants, tokens, modules) = tokio::task::spawn_blocking(move || {
        let tenants = db.tenants()?;
        let tokens = db.tokens(None)?;
        let mut modules = Vec::new();
        for tenant in &tenants {
            for info in engine
                .registry()
                .list(tenant)
                .map_err(|e| crate::store::DbError::Corrupt(e.to_string()))?
            {
                modules.push((tenant.clone(), info.id));
            }
        }
        Ok::<_, crate::store::DbError>((tenants, tokens, modules))
    })
    .await
    .map_err(|e| lookup(&e))?
    .map_err(|e| lookup(&e))?;
    let mut seed: Vec<Setting> = tenants.iter().cloned().map(Setting::Tenant).collect();
    for (tenant, id) in modules {
        seed.push(Setting::Module {
            tenant: tenant.clone(),
            id,
        });
        seed.push(Setting::Manifest { tenant, id });
    }
    for tenant in &tenants {
        for workflow in agent
            .workflows()
            .workflows(tenant)
            .await
            .map_err(|e| lookup(&e))?
        {
            seed.push(Setting::Workflow {
                tenant: tenant.clone(),
                name: workflow.name,
            });
        }
    }
    for tenant in &tenants {
        for name in agent.db().releases().names(tenant) {
            seed.push(Setting::Release {
                tenant: tenant.clone(),
                name,
            });
        }
        for hook in agent.hooks().list(tenant).await.map_err(|e| lookup(&e))? {
            if hook.binding.is_some() {
                seed.push(Setting::Binding {
                    tenant: tenant.clone(),
                    hook: hook.name,
                });
            }
        }
    }
    seed.push(Setting::Policy);
    seed.extend(
        agent
            .federation()
            .peers()
            .into_iter()
            .map(|peer| Setting::Peer(peer.name)),
    );
    seed.extend(
        tokens
            .into_iter()
            .filter(|token| !token.admin)
            .map(|token| Setting::Token(token.id)),
    );
    Ok(seed)
}

/// The setting's value here, as the bucket holds it; `None` when it is not here.
pub(super) async fn local(agent: &Agent, setting: &Setting) -> Result<Option<Value>, String> {
    match setting {
        Setting::Tenant(tenant) => {
            let (db, tenant) = (agent.db().clone(), tenant.clone());
            let exists = tokio::task::spawn_blocking(move || db.tenant_exists(&tenant))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok(exists.then(|| json!({})))
        }
        Setting::Token(id) => {
            let (db, id) = (agent.db().clone(), id.clone());
            let record = tokio::task::spawn_blocking(move || db.token_record(&id))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok(record
                .filter(|record| record.tenant.is_some())
                .map(|record| json!(record)))
        }
        Setting::Module { tenant, id } => {
            let (engine, tenant, id) = (agent.engine().clone(), tenant.clone(), *id);
            let info = tokio::task::spawn_blocking(move || engine.registry().get(&tenant, &id))
                .await
                .map_err(|e| e.to_string())?;
            Ok(info.ok().map(|info| {
                json!({
                    "name": info.name,
                    "version": info.version,
                    "title": info.title,
                    "description": info.description,
                })
            }))
        }
        Setting::Manifest { tenant, id } => Ok(agent
            .manifest(tenant, id)
            .await
            .map_err(|e| e.to_string())?
            .map(|manifest| json!(manifest))),
        Setting::Workflow { tenant, name } => {
            match agent.workflows().workflow(tenant, name).await {
                Ok(version) => Ok(Some(shared_spec(version.spec))),
                Err(WorkflowError::NotFound(_)) => Ok(None),
                Err(error) => Err(error.to_string()),
            }
        }
        Setting::Release { tenant, name } => Ok(agent
            .db()
            .releases()
            .get(tenant, name)
            .map(|release| json!(*release))),
        Setting::Binding { tenant, hook } => Ok(agent
            .hooks()
            .binding(tenant, hook)
            .await
            .map_err(|e| e.to_string())?
            .map(|binding| json!({"module": binding.module, "function": binding.function}))),
        Setting::Policy => Ok(Some(json!(*agent.policy().current()))),
        // When it was registered differs from agent to agent.
        Setting::Peer(name) => Ok(agent.federation().peer(name).map(|peer| {
            json!(crate::federation::Peer {
                created_unix_ms: 0,
                ..peer
            })
        })),
    }
}

/// A workflow document as shared: what the agent pins at apply is left out, since each
/// agent pins it again.
pub(super) fn shared_spec(mut spec: WorkflowSpec) -> Value {
    for step in &mut spec.steps {
        step.pinned = None;
    }
    json!(spec)
}

/// Makes the local setting under `key` what the cluster holds (`None`: deleted).
pub(super) async fn apply(
    agent: &Agent,
    modules: &object_store::ObjectStore,
    key: &str,
    there: Option<Value>,
) -> Result<(), String> {
    let Some(setting) = Setting::from_key(key) else {
        return Ok(());
    };
    let here = local(agent, &setting).await?;
    if here == there {
        return Ok(());
    }
    match (setting, there) {
        (Setting::Tenant(tenant), Some(_)) => {
            let db = agent.db().clone();
            tokio::task::spawn_blocking(move || db.create_tenant(&tenant))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        // Tenants are never deleted.
        (Setting::Tenant(_), None) => {}
        (Setting::Token(_), Some(value)) => {
            let record: crate::store::TokenRecord =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            let db = agent.db().clone();
            tokio::task::spawn_blocking(move || db.put_token_record(&record))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        (Setting::Token(id), None) => {
            let db = agent.db().clone();
            tokio::task::spawn_blocking(move || db.revoke_token(&id))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        (Setting::Module { tenant, id }, Some(value)) => {
            // The metadata is immutable: a module here under this id is the one.
            if here.is_some() {
                return Ok(());
            }
            let mut object = modules.get(id.hex()).await.map_err(|e| e.to_string())?;
            let mut bytes = Vec::new();
            object
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| e.to_string())?;
            if ModuleId::of(&bytes) != id {
                return Err(format!("the cluster's bytes of {id} are not that module"));
            }
            let text = |field: &str| value[field].as_str().map(str::to_owned);
            let module = NewModule {
                name: text("name").unwrap_or_default(),
                version: text("version"),
                title: text("title"),
                description: text("description"),
                bytes,
            };
            let engine = agent.engine().clone();
            tokio::task::spawn_blocking(move || engine.add_module(&tenant, module))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        (Setting::Module { tenant, id }, None) => {
            let engine = agent.engine().clone();
            let _ = tokio::task::spawn_blocking(move || engine.delete_module(&tenant, &id))
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Manifest { tenant, id }, Some(value)) => {
            let manifest: crate::manifest::Manifest =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            agent
                .set_manifest(&tenant, &id.to_string(), manifest)
                .await
                .map_err(|e| e.to_string())?;
        }
        // A manifest goes with its module.
        (Setting::Manifest { .. }, None) => {}
        (Setting::Workflow { tenant, name }, Some(value)) => {
            let spec: WorkflowSpec = serde_json::from_value(value).map_err(|e| e.to_string())?;
            agent
                .workflows()
                .apply(&tenant, spec, Some(&name))
                .await
                .map_err(|e| e.to_string())?;
            // A v1 workflow another agent created is that v1 workflow here too.
            if tenant == crate::V1_TENANT
                && let Some(id) = name
                    .strip_prefix("v1-workflow-")
                    .and_then(|id| id.parse::<i64>().ok())
            {
                agent
                    .workflows()
                    .register_v1(&tenant, id)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        (Setting::Release { tenant, name }, there) => {
            let release: Option<crate::releases::Release> = there
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| e.to_string())?;
            agent
                .releases()
                .replicate(&tenant, &name, release)
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Binding { tenant, hook }, Some(value)) => {
            let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
            let binding = crate::hooks::Binding {
                hook,
                module: text("module"),
                function: text("function"),
                pinned: None,
                updated_unix_ms: 0,
            };
            agent
                .hooks()
                .bind(&tenant, binding)
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Binding { tenant, hook }, None) => {
            match agent.hooks().unbind(&tenant, &hook).await {
                Ok(()) | Err(crate::hooks::HookError::NotBound { .. }) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        (Setting::Policy, Some(value)) => {
            let policy: crate::policy::Policy =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            policy.validate()?;
            agent.policy().replace(policy);
        }
        // The policy is never deleted.
        (Setting::Policy, None) => {}
        (Setting::Peer(_), Some(value)) => {
            let peer: crate::federation::Peer =
                serde_json::from_value(value).map_err(|e| e.to_string())?;
            agent
                .federation()
                .add_peer(peer)
                .await
                .map_err(|e| e.to_string())?;
        }
        (Setting::Peer(name), None) => match agent.federation().remove_peer(&name).await {
            Ok(()) | Err(crate::federation::FederationError::PeerNotFound(_)) => {}
            Err(error) => return Err(error.to_string()),
        },
        (Setting::Workflow { tenant, name }, None) => {
            match agent.workflows().delete(&tenant, &name).await {
                Ok(()) | Err(WorkflowError::NotFound(_)) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_found_again_from_its_key() {
        let id = ModuleId::of(b"m");
        for setting in [
            Setting::Tenant("acme".into()),
            Setting::Token("0a1b2c3d4e5f".into()),
            Setting::Module {
                tenant: "acme".into(),
                id,
            },
            Setting::Manifest {
                tenant: "acme".into(),
                id,
            },
            Setting::Workflow {
                tenant: "acme".into(),
                name: "orders.v2".into(),
            },
            Setting::Peer("acme.eu".into()),
            Setting::Policy,
        ] {
            assert_eq!(Setting::from_key(&setting.key()), Some(setting));
        }
        assert_eq!(Setting::from_key("tenants.Bad"), None);
        assert_eq!(Setting::from_key("modules.acme.nothex"), None);
        assert_eq!(Setting::from_key("other.x"), None);
    }
}
