//! Module validation, export discovery and naming rules.

use deadlift_engine::registry::{self, ModuleError};
use deadlift_engine::{ModuleId, NewModule};

use crate::common::{self, TENANT, fixture, wat};

fn new_module(name: &str, bytes: Vec<u8>) -> NewModule {
    NewModule {
        name: name.to_owned(),
        bytes,
        ..NewModule::default()
    }
}

#[test]
fn garbage_bytes_are_refused_and_nothing_is_stored() {
    let engine = common::engine();
    let err = engine
        .add_module(TENANT, new_module("junk", b"this is not wasm".to_vec()))
        .unwrap_err();
    assert!(matches!(err, ModuleError::Invalid { .. }), "{err:?}");
    assert_eq!(err.code().as_str(), "module_invalid");
    assert!(engine.registry().list(TENANT).unwrap().is_empty());
}

#[test]
fn truncated_module_is_refused() {
    let mut bytes = fixture("add_ten");
    bytes.truncate(bytes.len() / 2);
    let err = registry::inspect(&bytes).unwrap_err();
    assert!(matches!(err, ModuleError::Invalid { .. }), "{err:?}");
}

#[test]
fn unknown_env_import_is_named() {
    let bytes = wat(r#"(module (import "extism:host/env" "frobnicate" (func (param i64))))"#);
    let err = registry::inspect(&bytes).unwrap_err();
    match err {
        ModuleError::UnknownEnvImport { name } => assert_eq!(name, "frobnicate"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn non_function_env_import_is_refused() {
    let bytes = wat(r#"(module (import "extism:host/env" "memory" (memory 1)))"#);
    let err = registry::inspect(&bytes).unwrap_err();
    assert!(
        matches!(&err, ModuleError::EnvImportNotFunction { name, kind } if name == "memory" && kind == "memory"),
        "{err:?}"
    );
}

#[test]
fn env_import_with_wrong_signature_is_refused() {
    let bytes =
        wat(r#"(module (import "extism:host/env" "alloc" (func (param i32) (result i32))))"#);
    let err = registry::inspect(&bytes).unwrap_err();
    assert!(
        matches!(&err, ModuleError::EnvImportSignature { name, .. } if name == "alloc"),
        "{err:?}"
    );
    assert!(err.to_string().contains("i64"), "{err}");
}

#[test]
fn imports_from_unknown_namespaces_are_refused() {
    let bytes = wat(r#"(module (import "env" "abort" (func)))"#);
    let err = registry::inspect(&bytes).unwrap_err();
    assert!(
        matches!(err, ModuleError::UnsupportedImport { .. }),
        "{err:?}"
    );
}

#[test]
fn exports_and_imports_are_discovered() {
    let inspection = registry::inspect(&fixture("kv_counter")).unwrap();
    for function in ["increment", "get", "reset"] {
        assert!(
            inspection.has_function(function),
            "missing export {function}"
        );
    }
    let user: Vec<&str> = inspection
        .imports
        .iter()
        .filter(|i| i.module == "extism:host/user")
        .map(|i| i.name.as_str())
        .collect();
    assert!(
        user.contains(&"kv_get") && user.contains(&"kv_set"),
        "{user:?}"
    );
    assert!(inspection.exports.iter().any(|e| e.kind == "memory"));
}

#[test]
fn identity_is_the_sha256_of_the_bytes() {
    let bytes = fixture("add_ten");
    let id = ModuleId::of(&bytes);
    let text = id.to_string();
    assert!(
        text.starts_with("sha256:") && text.len() == 7 + 64,
        "{text}"
    );
    assert_eq!(text.parse::<ModuleId>().unwrap(), id);
    assert_eq!(id.hex().parse::<ModuleId>().unwrap(), id);
    assert!("sha256:xyz".parse::<ModuleId>().is_err());
    assert_eq!(registry::inspect(&bytes).unwrap().id, id);
}

#[test]
fn identical_re_add_is_idempotent_and_names_do_not_collide() {
    let engine = common::engine();
    let first = engine
        .add_module(TENANT, new_module("add-ten", fixture("add_ten")))
        .unwrap();
    let again = engine
        .add_module(TENANT, new_module("add-ten", fixture("add_ten")))
        .unwrap();
    assert_eq!(first, again);
    let err = engine
        .add_module(TENANT, new_module("add-ten", fixture("multiply_by_five")))
        .unwrap_err();
    assert!(matches!(err, ModuleError::NameConflict { .. }), "{err:?}");
    let err = engine
        .add_module(TENANT, new_module("other-name", fixture("add_ten")))
        .unwrap_err();
    assert!(
        matches!(err, ModuleError::AlreadyRegistered { .. }),
        "{err:?}"
    );
    assert_eq!(engine.registry().list(TENANT).unwrap().len(), 1);
    // Another tenant may register the same bytes under its own name.
    engine
        .add_module("globex", new_module("adder", fixture("add_ten")))
        .unwrap();
}

#[test]
fn modules_resolve_by_name_version_and_id() {
    let engine = common::engine();
    let v1 = engine
        .add_module(
            TENANT,
            NewModule {
                name: "math".into(),
                title: None,
                version: Some("1".into()),
                description: Some("adds ten".into()),
                bytes: fixture("add_ten"),
            },
        )
        .unwrap();
    let v2 = engine
        .add_module(
            TENANT,
            NewModule {
                name: "math".into(),
                title: None,
                version: Some("2".into()),
                description: None,
                bytes: fixture("multiply_by_five"),
            },
        )
        .unwrap();
    let registry = engine.registry();
    assert_eq!(registry.resolve(TENANT, "math@1").unwrap().id, v1.id);
    assert_eq!(registry.resolve(TENANT, "math").unwrap().id, v2.id);
    assert_eq!(
        registry.resolve(TENANT, &v1.id.to_string()).unwrap().id,
        v1.id
    );
    assert!(matches!(
        registry.resolve(TENANT, "math@3"),
        Err(ModuleError::NotFound { .. })
    ));
    assert!(matches!(
        registry.resolve("globex", "math"),
        Err(ModuleError::NotFound { .. })
    ));
}

#[test]
fn invalid_names_are_refused() {
    let engine = common::engine();
    for name in ["", "has space", "slash/name", &"x".repeat(200)] {
        let err = engine
            .add_module(TENANT, new_module(name, fixture("add_ten")))
            .unwrap_err();
        assert!(matches!(err, ModuleError::InvalidName), "{name}: {err:?}");
    }
}
