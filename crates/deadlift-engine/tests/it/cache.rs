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

/// A tiny Extism guest whose `_main` answers `n`, distinct per `n`.
fn numbered(n: u32) -> Vec<u8> {
    crate::common::wat(&format!(
        r#"(module
            (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
            (memory (export "memory") 1)
            (func (export "_main") (result i32) i32.const {n} drop i32.const 0))"#
    ))
}

/// Issue 12: the compiled-module map was never evicted (~22 MiB per 1,000 tiny
/// modules). Compiled code now stays under its budget; a module dropped from memory is
/// reloaded from the disk cache when called.
#[test]
fn compiled_code_stays_under_its_budget_and_reloads_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 256 * 1024;
    let engine = Engine::builder()
        .workers(1)
        .data_dir(dir.path())
        .module_cache_bytes(budget)
        .build()
        .unwrap();
    let modules: Vec<_> = (0..40)
        .map(|n| crate::common::add_bytes(&engine, TENANT, &format!("m{n}"), numbered(n)))
        .collect();
    let stats = engine.stats();
    assert!(stats.code_bytes <= budget, "{stats:?}");
    assert!(stats.code_evicted > 0, "{stats:?}");
    assert!(stats.code_modules < 40, "{stats:?}");
    // Every module still answers; the ones dropped come back from disk, not the compiler.
    for module in &modules {
        call(&engine, module, "_main", b"", &Grant::default()).unwrap();
    }
    let stats = engine.stats();
    assert_eq!(stats.compiled, 40, "{stats:?}");
    assert!(stats.loaded_from_cache > 0, "{stats:?}");
    assert!(stats.code_bytes <= budget, "{stats:?}");
}

/// Issue 12: deleting a module freed nothing. Identical bytes from two tenants share one
/// compiled module; it leaves memory and the disk cache with its last owner.
#[test]
fn deleting_a_module_frees_its_code_once_no_tenant_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_on(dir.path(), Arc::new(MemoryModuleStore::new()));
    let module = add(&engine, "tenant-a", "add_ten");
    assert_eq!(add(&engine, "tenant-b", "add_ten"), module);
    assert_eq!(engine.stats().compiled, 1, "identical bytes compiled twice");
    let artifacts = || {
        walk(dir.path())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .count()
    };
    assert_eq!(artifacts(), 1);
    engine.delete_module("tenant-a", &module).unwrap();
    assert_eq!(engine.stats().code_modules, 1);
    assert_eq!(artifacts(), 1);
    engine.delete_module("tenant-b", &module).unwrap();
    assert_eq!(engine.stats().code_modules, 0);
    assert_eq!(engine.stats().code_bytes, 0);
    assert_eq!(artifacts(), 0);
}

/// Issue 12: a 15 MB module was taken without a limit and compiled for 25 s. Modules
/// over the size cap are refused before any work, with their own code.
#[test]
fn a_module_over_the_size_cap_is_refused_before_compiling() {
    let engine = Engine::builder()
        .workers(1)
        .max_module_bytes(1024)
        .build()
        .unwrap();
    let error = engine
        .add_module(
            TENANT,
            deadlift_engine::NewModule {
                name: "big".into(),
                bytes: crate::common::fixture("add_ten"),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(error.code(), deadlift_engine::Code::ModuleTooLarge);
    assert_eq!(engine.stats().compiled, 0);
}
