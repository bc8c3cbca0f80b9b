//! The module registry: validates Extism plug-ins, names them by content
//! (`sha256:<hex>`), and keeps their metadata and bytes behind the [`ModuleStore`] trait.
//!
//! Validation happens once, here, so that a module that could never link is refused at
//! upload with an error naming the problem, not at its first call.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmparser::{CompositeInnerType, FuncType, Validator, WasmFeatures, types::EntityType};

use crate::code::Code;
use crate::executor::abi::{ENV_FUNCTIONS, Ty};
use crate::executor::{ENV, USER, WASI_P1};

/// A module's identity: the SHA-256 of its bytes, written `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId([u8; 32]);

impl ModuleId {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The lowercase hex digest without the `sha256:` prefix (the v1 API's form).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `sha256:<64 hex digits>` or the bare 64 hex digits.
impl FromStr for ModuleId {
    type Err = ModuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("sha256:").unwrap_or(s);
        let invalid = || ModuleError::InvalidId {
            id: s.chars().take(80).collect(),
        };
        if digits.len() != 64 {
            return Err(invalid());
        }
        let mut id = [0u8; 32];
        hex::decode_to_slice(digits.to_ascii_lowercase(), &mut id).map_err(|_| invalid())?;
        Ok(Self(id))
    }
}

impl Serialize for ModuleId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ModuleId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An import or export of a module, with its Wasm type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Item {
    /// The import's module (empty for exports).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub module: String,
    pub name: String,
    /// `function`, `memory`, `table`, `global` or `tag`.
    pub kind: String,
    /// The function signature, e.g. `(func (param i64) (result i64))`, when a function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// What inspecting a module's bytes finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub id: ModuleId,
    pub exports: Vec<Item>,
    pub imports: Vec<Item>,
}

impl Inspection {
    /// Exported functions the host can call (`() -> i32` or `() -> ()`).
    pub fn has_function(&self, name: &str) -> bool {
        self.exports
            .iter()
            .any(|e| e.name == name && e.kind == "function")
    }
}

/// A module to register.
#[derive(Debug, Clone, Default)]
pub struct NewModule {
    pub name: String,
    /// A human title (the v1 API's `title`).
    pub title: Option<String>,
    pub version: Option<String>,
    pub description: Option<String>,
    pub bytes: Vec<u8>,
}

/// A registered module's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModuleInfo {
    #[schema(value_type = String, example = "sha256:65717b2e7d32dab905d6dd0aaec9937af4eedf8eb0e04fd75f5ddd7edc8a0824")]
    pub id: ModuleId,
    pub tenant: String,
    pub name: String,
    #[serde(default)]
    pub title: Option<String>,
    pub version: Option<String>,
    pub description: Option<String>,
    pub size_bytes: u64,
    pub exports: Vec<Item>,
    pub imports: Vec<Item>,
    pub created_unix_ms: u64,
}

/// Why a module was refused or could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("not a valid WebAssembly module: {reason}")]
    Invalid { reason: String },
    #[error("WebAssembly components are not supported; upload a core module (an Extism plug-in)")]
    Component,
    #[error("the module imports `{name}` from extism:host/env, which Extism does not define")]
    UnknownEnvImport { name: String },
    #[error(
        "the module imports a {kind} `{name}` from extism:host/env; only functions may be imported from it"
    )]
    EnvImportNotFunction { name: String, kind: String },
    #[error("the module imports extism:host/env `{name}` as {found}, but it is {expected}")]
    EnvImportSignature {
        name: String,
        expected: String,
        found: String,
    },
    #[error(
        "the module imports a {kind} `{name}` from extism:host/user; host functions must be functions"
    )]
    UserImportNotFunction { name: String, kind: String },
    #[error(
        "the module imports `{name}` from `{module}`; only extism:host/env, extism:host/user and wasi_snapshot_preview1 are available"
    )]
    UnsupportedImport { module: String, name: String },
    #[error("the module could not be compiled: {reason}")]
    Compile { reason: String },
    #[error("the module is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("tenant `{tenant}` is still compiling another module; try again when it is done")]
    TenantCompiling { tenant: String },
    #[error("the compiler is busy (waited {} s for a slot); try again later", waited.as_secs())]
    CompilerBusy { waited: std::time::Duration },
    #[error("module name must be 1-128 characters of letters, digits, '.', '-' or '_'")]
    InvalidName,
    #[error("`{id}` is not a module id (expected sha256:<64 hex digits>)")]
    InvalidId { id: String },
    #[error("{name}{} is already registered with different bytes ({existing})", version.as_ref().map(|v| format!("@{v}")).unwrap_or_default())]
    NameConflict {
        name: String,
        version: Option<String>,
        existing: ModuleId,
    },
    #[error("these bytes are already registered as module `{name}` ({id})")]
    AlreadyRegistered { id: ModuleId, name: String },
    #[error("module {reference} not found")]
    NotFound { reference: String },
    #[error(transparent)]
    Storage(#[from] StoreError),
}

impl ModuleError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } | Self::Component | Self::Compile { .. } => Code::ModuleInvalid,
            Self::TooLarge { .. } => Code::ModuleTooLarge,
            Self::TenantCompiling { .. } => Code::TenantOverloaded,
            Self::CompilerBusy { .. } => Code::Overloaded,
            Self::UnknownEnvImport { .. }
            | Self::EnvImportNotFunction { .. }
            | Self::EnvImportSignature { .. }
            | Self::UserImportNotFunction { .. }
            | Self::UnsupportedImport { .. } => Code::ModuleImportInvalid,
            Self::InvalidName => Code::ModuleNameInvalid,
            Self::InvalidId { .. } => Code::ModuleIdInvalid,
            Self::NameConflict { .. } | Self::AlreadyRegistered { .. } => Code::ModuleConflict,
            Self::NotFound { .. } => Code::ModuleNotFound,
            Self::Storage(_) => Code::Storage,
        }
    }
}

/// A failure of the storage behind the registry.
#[derive(Debug, thiserror::Error)]
#[error("module storage failed: {0}")]
pub struct StoreError(pub String);

fn ty_to_val(ty: Ty) -> wasmparser::ValType {
    match ty {
        Ty::I32 => wasmparser::ValType::I32,
        Ty::I64 => wasmparser::ValType::I64,
    }
}

fn kind_name(entity: &EntityType) -> &'static str {
    match entity {
        EntityType::Func(_) | EntityType::FuncExact(_) => "function",
        EntityType::Table(_) => "table",
        EntityType::Memory(_) => "memory",
        EntityType::Global(_) => "global",
        EntityType::Tag(_) => "tag",
    }
}

/// Validates `bytes` as an Extism plug-in and lists what it imports and exports.
pub fn inspect(bytes: &[u8]) -> Result<Inspection, ModuleError> {
    let mut validator = Validator::new_with_features(WasmFeatures::default());
    let types = validator
        .validate_all(bytes)
        .map_err(|e| ModuleError::Invalid {
            reason: e.to_string(),
        })?;
    let types = types.as_ref();
    let func_type = |entity: &EntityType| -> Option<FuncType> {
        let (EntityType::Func(id) | EntityType::FuncExact(id)) = entity else {
            return None;
        };
        match &types.get(*id)?.composite_type.inner {
            CompositeInnerType::Func(f) => Some(f.clone()),
            _ => None,
        }
    };
    let (Some(raw_imports), Some(raw_exports)) = (types.core_imports(), types.core_exports())
    else {
        return Err(ModuleError::Component);
    };

    let mut imports = Vec::new();
    for (module, name, entity) in raw_imports {
        let kind = kind_name(&entity);
        let ty = func_type(&entity);
        match module {
            ENV => {
                let Some(ty) = &ty else {
                    return Err(ModuleError::EnvImportNotFunction {
                        name: name.to_owned(),
                        kind: kind.to_owned(),
                    });
                };
                let Some((_, params, results)) = ENV_FUNCTIONS.iter().find(|(n, ..)| *n == name)
                else {
                    return Err(ModuleError::UnknownEnvImport {
                        name: name.to_owned(),
                    });
                };
                let expected = FuncType::new(
                    params.iter().map(|t| ty_to_val(*t)),
                    results.iter().map(|t| ty_to_val(*t)),
                );
                if *ty != expected {
                    return Err(ModuleError::EnvImportSignature {
                        name: name.to_owned(),
                        expected: expected.to_string(),
                        found: ty.to_string(),
                    });
                }
            }
            USER if ty.is_none() => {
                return Err(ModuleError::UserImportNotFunction {
                    name: name.to_owned(),
                    kind: kind.to_owned(),
                });
            }
            USER | WASI_P1 => {}
            _ => {
                return Err(ModuleError::UnsupportedImport {
                    module: module.to_owned(),
                    name: name.to_owned(),
                });
            }
        }
        imports.push(Item {
            module: module.to_owned(),
            name: name.to_owned(),
            kind: kind.to_owned(),
            signature: ty.map(|t| t.to_string()),
        });
    }
    let exports = raw_exports
        .map(|(name, entity)| Item {
            module: String::new(),
            name: name.to_owned(),
            kind: kind_name(&entity).to_owned(),
            signature: func_type(&entity).map(|t| t.to_string()),
        })
        .collect();
    Ok(Inspection {
        id: ModuleId::of(bytes),
        exports,
        imports,
    })
}

/// Storage of module metadata (per tenant) and bytes (shared by content).
pub trait ModuleStore: Send + Sync + 'static {
    /// Stores a new record and its bytes. The registry has already checked conflicts.
    fn insert(&self, info: &ModuleInfo, bytes: &[u8]) -> Result<(), StoreError>;
    fn get(&self, tenant: &str, id: &ModuleId) -> Result<Option<ModuleInfo>, StoreError>;
    /// All of a tenant's modules, by name then version.
    fn list(&self, tenant: &str) -> Result<Vec<ModuleInfo>, StoreError>;
    /// The tenant's module of this name and version (`None`: registered without one).
    /// Stores with an index override it: calls resolve names on every request.
    fn named(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<ModuleInfo>, StoreError> {
        Ok(self
            .list(tenant)?
            .into_iter()
            .find(|m| m.name == name && m.version.as_deref() == version))
    }
    /// The tenant's newest registration of this name, whatever its version.
    fn newest(&self, tenant: &str, name: &str) -> Result<Option<ModuleInfo>, StoreError> {
        Ok(self
            .list(tenant)?
            .into_iter()
            .filter(|m| m.name == name)
            .max_by_key(|m| m.created_unix_ms))
    }
    /// The version a bare name means: by default the newest registration. Stores that
    /// keep a live version per name (the agent's releases) override it.
    fn current(&self, tenant: &str, name: &str) -> Result<Option<ModuleInfo>, StoreError> {
        self.newest(tenant, name)
    }
    fn bytes(&self, id: &ModuleId) -> Result<Option<Arc<[u8]>>, StoreError>;
    /// Removes a tenant's record (bytes go when no tenant refers to them). Returns
    /// whether there was one.
    fn delete(&self, tenant: &str, id: &ModuleId) -> Result<bool, StoreError>;
}

/// A [`ModuleStore`] in process memory.
#[derive(Debug, Default)]
pub struct MemoryModuleStore {
    inner: Mutex<MemoryModules>,
}

#[derive(Debug, Default)]
struct MemoryModules {
    records: BTreeMap<(String, ModuleId), ModuleInfo>,
    bytes: HashMap<ModuleId, Arc<[u8]>>,
}

impl MemoryModuleStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ModuleStore for MemoryModuleStore {
    fn insert(&self, info: &ModuleInfo, bytes: &[u8]) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        inner.bytes.entry(info.id).or_insert_with(|| bytes.into());
        inner
            .records
            .insert((info.tenant.clone(), info.id), info.clone());
        Ok(())
    }

    fn get(&self, tenant: &str, id: &ModuleId) -> Result<Option<ModuleInfo>, StoreError> {
        let inner = self.inner.lock();
        Ok(inner.records.get(&(tenant.to_owned(), *id)).cloned())
    }

    fn list(&self, tenant: &str) -> Result<Vec<ModuleInfo>, StoreError> {
        let inner = self.inner.lock();
        let mut list: Vec<ModuleInfo> = inner
            .records
            .values()
            .filter(|m| m.tenant == tenant)
            .cloned()
            .collect();
        list.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(list)
    }

    fn bytes(&self, id: &ModuleId) -> Result<Option<Arc<[u8]>>, StoreError> {
        let inner = self.inner.lock();
        Ok(inner.bytes.get(id).cloned())
    }

    fn delete(&self, tenant: &str, id: &ModuleId) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock();
        let existed = inner.records.remove(&(tenant.to_owned(), *id)).is_some();
        if !inner.records.keys().any(|(_, other)| other == id) {
            inner.bytes.remove(id);
        }
        Ok(existed)
    }
}

/// The registry: validation and naming rules over a [`ModuleStore`].
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn ModuleStore>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(store: Arc<dyn ModuleStore>) -> Self {
        Self { store }
    }

    /// Checks a new module against the registry's rules without storing it. Returns the
    /// inspection and, when the identical module is already registered, its record.
    pub fn check(
        &self,
        tenant: &str,
        module: &NewModule,
    ) -> Result<(Inspection, Option<ModuleInfo>), ModuleError> {
        if crate::names::module_name(&module.name).is_err()
            || module
                .version
                .as_deref()
                .is_some_and(|v| crate::names::module_name(v).is_err())
        {
            return Err(ModuleError::InvalidName);
        }
        let inspection = inspect(&module.bytes)?;
        if let Some(existing) = self.store.get(tenant, &inspection.id)? {
            if existing.name == module.name && existing.version == module.version {
                return Ok((inspection, Some(existing)));
            }
            return Err(ModuleError::AlreadyRegistered {
                id: existing.id,
                name: existing.name,
            });
        }
        if let Some(other) = self
            .store
            .named(tenant, &module.name, module.version.as_deref())?
        {
            return Err(ModuleError::NameConflict {
                name: module.name.clone(),
                version: module.version.clone(),
                existing: other.id,
            });
        }
        Ok((inspection, None))
    }

    /// Validates and stores a module for `tenant`. Adding the identical module with the
    /// same name and version again is idempotent.
    pub fn add(&self, tenant: &str, module: NewModule) -> Result<ModuleInfo, ModuleError> {
        let (inspection, existing) = self.check(tenant, &module)?;
        if let Some(existing) = existing {
            return Ok(existing);
        }
        self.insert_checked(tenant, module, inspection)
    }

    /// Stores a module [`check`](Self::check) accepted. If a concurrent add won the race
    /// in between, the answer is what `check` says now: the same module (idempotent) or
    /// the conflict, never a storage error.
    pub(crate) fn insert_checked(
        &self,
        tenant: &str,
        module: NewModule,
        inspection: Inspection,
    ) -> Result<ModuleInfo, ModuleError> {
        let info = ModuleInfo {
            id: inspection.id,
            tenant: tenant.to_owned(),
            name: module.name,
            title: module.title,
            version: module.version,
            description: module.description,
            size_bytes: module.bytes.len() as u64,
            exports: inspection.exports,
            imports: inspection.imports,
            created_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        if let Err(error) = self.store.insert(&info, &module.bytes) {
            let recheck = NewModule {
                name: info.name.clone(),
                title: info.title.clone(),
                version: info.version.clone(),
                description: info.description.clone(),
                bytes: module.bytes,
            };
            return match self.check(tenant, &recheck)? {
                (_, Some(existing)) => Ok(existing),
                (_, None) => Err(error.into()),
            };
        }
        Ok(info)
    }

    pub fn get(&self, tenant: &str, id: &ModuleId) -> Result<ModuleInfo, ModuleError> {
        self.store
            .get(tenant, id)?
            .ok_or_else(|| ModuleError::NotFound {
                reference: id.to_string(),
            })
    }

    pub fn list(&self, tenant: &str) -> Result<Vec<ModuleInfo>, ModuleError> {
        Ok(self.store.list(tenant)?)
    }

    /// Finds a module by `sha256:<hex>`, `name@version`, or `name` (the version the
    /// store says is current: the newest registration, or the agent's live version).
    pub fn resolve(&self, tenant: &str, reference: &str) -> Result<ModuleInfo, ModuleError> {
        if reference.starts_with("sha256:") {
            return self.get(tenant, &reference.parse()?);
        }
        let (name, version) = match reference.split_once('@') {
            Some((name, version)) => (name, Some(version)),
            None => (reference, None),
        };
        let found = match version {
            Some(version) => self.store.named(tenant, name, Some(version))?,
            None => self.store.current(tenant, name)?,
        };
        found.ok_or_else(|| ModuleError::NotFound {
            reference: reference.to_owned(),
        })
    }

    pub fn bytes(&self, id: &ModuleId) -> Result<Arc<[u8]>, ModuleError> {
        self.store.bytes(id)?.ok_or_else(|| ModuleError::NotFound {
            reference: id.to_string(),
        })
    }

    pub fn delete(&self, tenant: &str, id: &ModuleId) -> Result<(), ModuleError> {
        if self.store.delete(tenant, id)? {
            Ok(())
        } else {
            Err(ModuleError::NotFound {
                reference: id.to_string(),
            })
        }
    }
}
