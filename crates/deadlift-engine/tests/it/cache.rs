//! Compiled modules are cached on disk, so a restart does not recompile.

use std::sync::Arc;

use deadlift_engine::registry::MemoryModuleStore;
use deadlift_engine::{Engine, Grant, ModuleStore};

use crate::common::{TENANT, add, call, text};

fn engine_on(dir: &std::path::Path, store: Arc<dyn ModuleStore>) -> Engine {
    Engine::builder()
        .workers(1)
        .max_instances(8)
        .data_dir(dir)
        .modules(store)
        .build()
        .unwrap()
}

#[test]
fn a_restart_loads_compiled_code_instead_of_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ModuleStore> = Arc::new(MemoryModuleStore::new());
    let first = engine_on(dir.path(), store.clone());
    let module = add(&first, TENANT, "add_ten");
    assert_eq!(first.stats().compiled, 1);
    assert_eq!(first.stats().loaded_from_cache, 0);
    drop(first);

    let second = engine_on(dir.path(), store);
    assert_eq!(
        text(call(&second, &module, "_main", b"5", &Grant::default())),
        "15"
    );
    assert_eq!(second.stats().compiled, 0, "the restart compiled again");
    assert_eq!(second.stats().loaded_from_cache, 1);
}

#[test]
fn a_corrupt_cached_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ModuleStore> = Arc::new(MemoryModuleStore::new());
    let first = engine_on(dir.path(), store.clone());
    let module = add(&first, TENANT, "add_ten");
    drop(first);
    for entry in walk(dir.path()) {
        if entry.extension().is_some_and(|e| e == "cwasm") {
            std::fs::write(&entry, b"garbage").unwrap();
        }
    }
    let second = engine_on(dir.path(), store);
    assert_eq!(
        text(call(&second, &module, "_main", b"5", &Grant::default())),
        "15"
    );
    assert_eq!(second.stats().compiled, 1);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
