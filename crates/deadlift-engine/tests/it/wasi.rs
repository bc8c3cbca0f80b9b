//! WASI preview 1 under a grant: off by default, stdout captured into the call's logs,
//! only mapped directories visible, read-only mappings refusing writes, and `_start`
//! command modules with `proc_exit`.

use deadlift_engine::{CallError, Grant};

use crate::common::{self, TENANT, add, add_bytes, call, wat};

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from the host\n").unwrap();
    dir
}

fn wasi_grant(dir: &tempfile::TempDir, read_only: bool) -> Grant {
    Grant::default().allow(["reflect"]).with_wasi().with_dir(
        dir.path().to_str().unwrap(),
        "/data",
        read_only,
    )
}

#[test]
fn a_wasi_guest_reads_mapped_files_and_its_stdout_becomes_logs() {
    let dir = data_dir();
    let engine = common::engine();
    let module = add(&engine, TENANT, "zig_guest");
    let out = call(
        &engine,
        &module,
        "read_file",
        b"/data/hello.txt",
        &wasi_grant(&dir, true),
    )
    .unwrap();
    assert_eq!(out.output, b"hello from the host\n");
    assert!(
        out.logs
            .iter()
            .any(|l| l.message == "zig_guest: read_file /data/hello.txt"),
        "{:?}",
        out.logs
    );
    // Nothing outside the mapping is visible.
    for outside in [
        "/etc/passwd",
        "/data/../../etc/passwd",
        "/data/../hello.txt",
    ] {
        match call(
            &engine,
            &module,
            "read_file",
            outside.as_bytes(),
            &wasi_grant(&dir, false),
        ) {
            Err(CallError::Guest { message, .. }) => {
                assert!(message.starts_with("read_file: "), "{message}")
            }
            other => panic!("{outside} must not be readable: {other:?}"),
        }
    }
}

#[test]
fn wasi_needs_the_grant() {
    let engine = common::engine();
    let module = add(&engine, TENANT, "zig_guest");
    match call(
        &engine,
        &module,
        "greet",
        b"Ada",
        &Grant::default().allow(["reflect"]),
    ) {
        Err(CallError::ImportDenied { module, reason, .. }) => {
            assert_eq!(module, "wasi_snapshot_preview1");
            assert!(reason.contains("does not allow WASI"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A mapping of a directory that does not exist is a grant error, not a crash.
    let bad = Grant::default().allow(["reflect"]).with_wasi().with_dir(
        "/no/such/directory",
        "/data",
        true,
    );
    assert!(matches!(
        call(&engine, &module, "greet", b"Ada", &bad),
        Err(CallError::GrantInvalid { .. })
    ));
}

/// `create`: opens `new.txt` for writing (O_CREAT) in the first preopened directory and
/// (rights: read and write) returns WASI's errno; `_start`: a command that exits with code 3.
const CREATOR: &str = r#"(module
    (import "wasi_snapshot_preview1" "path_open"
        (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
    (memory (export "memory") 1)
    (data (i32.const 16) "new.txt")
    (func (export "create") (result i32)
        (call $open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 7)
            (i32.const 1) (i64.const 66) (i64.const 0) (i32.const 0) (i32.const 64)))
    (func (export "_start") (call $exit (i32.const 3)))
    (func (export "exit_zero") (result i32) (call $exit (i32.const 0)) (i32.const 7)))"#;

#[test]
fn read_only_mappings_refuse_writes_and_read_write_ones_allow_them() {
    let engine = common::engine();
    let module = add_bytes(&engine, TENANT, "creator", wat(CREATOR));
    let dir = data_dir();
    let read_only = wasi_grant(&dir, true).allow(Vec::<String>::new());
    match call(&engine, &module, "create", b"", &read_only) {
        Err(CallError::ExitCode { code }) => assert_ne!(code, 0),
        other => panic!("a read-only mapping must refuse to create a file: {other:?}"),
    }
    assert!(!dir.path().join("new.txt").exists());
    let mut writable = Grant::default().with_wasi();
    writable = writable.with_dir(dir.path().to_str().unwrap(), "/data", false);
    call(&engine, &module, "create", b"", &writable).unwrap();
    assert!(dir.path().join("new.txt").exists());
}

#[test]
fn proc_exit_zero_is_success_and_other_codes_are_exit_codes() {
    let engine = common::engine();
    let module = add_bytes(&engine, TENANT, "creator", wat(CREATOR));
    let grant = Grant::default().with_wasi();
    call(&engine, &module, "exit_zero", b"", &grant).unwrap();
    assert_eq!(
        call(&engine, &module, "_start", b"", &grant).unwrap_err(),
        CallError::ExitCode { code: 3 }
    );
    // The engine keeps serving the module after a command exited.
    call(&engine, &module, "exit_zero", b"", &grant).unwrap();
}

/// Opens `hello.txt` in the first mapped directory for reading only, then sets its
/// modification time to the epoch; returns `fd_filestat_set_times`' errno (or 1000 +
/// `path_open`'s).
const TOUCH: &str = r#"
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_set_times"
    (func $times (param i32 i64 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello.txt")
  (func (export "touch") (result i32)
    (local $errno i32)
    ;; rights: fd_read | fd_filestat_set_times
    (local.set $errno
      (call $open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 9) (i32.const 0)
        (i64.const 0x800002) (i64.const 0) (i32.const 0) (i32.const 0)))
    (if (local.get $errno) (then (return (i32.add (i32.const 1000) (local.get $errno)))))
    ;; fst_flags: set mtime to the given time (0)
    (call $times (i32.load (i32.const 0)) (i64.const 0) (i64.const 0) (i32.const 4))))
"#;

/// Issue 11: a read-only mapping let a guest change a file's times
/// (`fd_filestat_set_times` on a file opened for reading).
#[test]
fn read_only_mappings_refuse_metadata_changes() {
    let dir = data_dir();
    let file = dir.path().join("hello.txt");
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    let engine = common::engine();
    let module = add_bytes(&engine, TENANT, "toucher", wat(TOUCH));
    let refused = call(&engine, &module, "touch", b"", &wasi_grant(&dir, true));
    let after = std::fs::metadata(&file).unwrap().modified().unwrap();
    assert_eq!(before, after, "the file's time changed: {refused:?}");
    // EPERM (63), not a failure to open the file (1000 + errno).
    let error = refused.expect_err("changing times must fail");
    assert!(format!("{error:?}").contains("63"), "{error:?}");
    // The same guest may change times under a writable mapping.
    let writable = call(&engine, &module, "touch", b"", &wasi_grant(&dir, false));
    assert!(writable.is_ok(), "{writable:?}");
    assert_ne!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before
    );
}
