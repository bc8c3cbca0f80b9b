//! Compiled modules: from memory, else from the on-disk cache under
//! `<data_dir>/compiled/<compatibility key>/`, else by compiling (then caching). The
//! one `unsafe` block of the crate (`load_artifact`) reads only artifacts this code
//! wrote.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::Module;

use std::sync::atomic::Ordering;

use super::Inner;
use crate::executor::{USER, WASI_P1};
use crate::registry::{ModuleError, ModuleId};

/// A directory name that changes whenever compiled code would be incompatible: another
/// wasmtime version, another target or other compilation settings.
pub(super) fn compatibility_key(engine: &wasmtime::Engine) -> String {
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = Sha(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    hex::encode(&hasher.0.finalize()[..12])
}

/// A compiled module ready to be instantiated.
pub(super) struct Compiled {
    pub(super) module: Module,
    /// `extism:host/user` and WASI imports, checked against each grant.
    pub(super) user_imports: Vec<String>,
    pub(super) wasi_imports: Vec<String>,
}

impl Inner {
    /// The compiled form of a module: from memory, else from the disk cache, else by
    /// compiling (and then caching) it.
    pub(super) fn compiled(
        &self,
        id: &ModuleId,
        bytes: &[u8],
    ) -> Result<Arc<Compiled>, ModuleError> {
        if let Some(compiled) = self.compiled.read().get(id) {
            return Ok(compiled.clone());
        }
        let module = match self.load_cached(id) {
            Some(module) => module,
            None => {
                let module =
                    Module::new(&self.wasmtime, bytes).map_err(|e| ModuleError::Compile {
                        reason: format!("{e:#}"),
                    })?;
                self.stats.compiled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(module = %id, "compiled module");
                self.store_cached(id, &module);
                module
            }
        };
        let imports_from = |namespace: &str| {
            module
                .imports()
                .filter(|i| i.module() == namespace)
                .map(|i| i.name().to_owned())
                .collect()
        };
        let compiled = Arc::new(Compiled {
            user_imports: imports_from(USER),
            wasi_imports: imports_from(WASI_P1),
            module,
        });
        self.compiled.write().insert(*id, compiled.clone());
        Ok(compiled)
    }

    pub(super) fn cache_path(&self, id: &ModuleId) -> Option<PathBuf> {
        Some(self.cache_dir.as_ref()?.join(format!("{}.cwasm", id.hex())))
    }

    pub(super) fn load_cached(&self, id: &ModuleId) -> Option<Module> {
        let path = self.cache_path(id)?;
        if !path.exists() {
            return None;
        }
        match load_artifact(&self.wasmtime, &path) {
            Ok(module) => {
                self.stats.loaded_from_cache.fetch_add(1, Ordering::Relaxed);
                tracing::info!(module = %id, "loaded compiled module from cache");
                Some(module)
            }
            Err(e) => {
                tracing::warn!(module = %id, path = %path.display(), "ignoring unusable compiled artifact: {e:#}");
                None
            }
        }
    }

    pub(super) fn store_cached(&self, id: &ModuleId, module: &Module) {
        let Some(path) = self.cache_path(id) else {
            return;
        };
        let written = module.serialize().and_then(|bytes| {
            // Write then rename, so a crash never leaves a torn artifact under the name.
            let temp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&temp, bytes)?;
            std::fs::rename(&temp, &path)?;
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!(module = %id, "could not cache compiled module: {e:#}");
        }
    }
}

/// Loads a compiled artifact this engine wrote.
#[allow(unsafe_code)]
fn load_artifact(engine: &wasmtime::Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime requires that the file be an artifact it produced, since it maps it
    // as executable code. Only `store_cached` writes into the cache directory (under the
    // agent's own data directory, by atomic rename), and the directory's name changes
    // with every wasmtime version and setting that affects compiled code; wasmtime
    // further checks the artifact's header and compatibility before using it.
    unsafe { Module::deserialize_file(engine, path) }
}
