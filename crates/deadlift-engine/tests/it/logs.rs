//! Guest log lines in the agent's own log: a guest must not be able to forge lines of
//! it, while the call's record keeps what the guest wrote.

use std::io::Write;
use std::sync::{Arc, Mutex};

use deadlift_engine::{Grant, LogLevel};

use crate::common::{self, TENANT, add_bytes, call};

/// A guest that logs its input as a warning.
const SHOUTER: &str = r#"
(module
  (import "extism:host/env" "input_offset" (func $input (result i64)))
  (import "extism:host/env" "log_warn" (func $warn (param i64)))
  (memory (export "memory") 1)
  (func (export "shout") (result i32)
    (call $warn (call $input))
    (i32.const 0)))
"#;

/// Everything the subscriber writes, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Issue 11: a guest logged "…\n<timestamp>  WARN … admin token rotated" with ANSI
/// escapes, and the agent's log showed a forged line of its own.
#[test]
fn guest_log_lines_cannot_forge_lines_of_the_agent_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let forged = "hello\n2026-12-06T00:00:00.000000Z  WARN deadlift: admin token rotated\u{1b}[31m";
    let out = tracing::subscriber::with_default(subscriber, || {
        let engine = common::engine();
        let module = add_bytes(&engine, TENANT, "shouter", common::wat(SHOUTER));
        call(
            &engine,
            &module,
            "shout",
            forged.as_bytes(),
            &Grant::default(),
        )
        .unwrap()
    });
    // The record keeps the line verbatim.
    assert_eq!(out.logs.len(), 1);
    assert_eq!(out.logs[0].level, LogLevel::Warn);
    assert_eq!(out.logs[0].message, forged);
    // The agent's log has it on one line, escaped.
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let guest_lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("deadlift::guest"))
        .collect();
    assert_eq!(guest_lines.len(), 1, "{text}");
    assert!(guest_lines[0].contains(r"hello\n2026-12-06"), "{text}");
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert!(
        !text
            .lines()
            .any(|line| line.starts_with("2026-12-06T00:00:00")),
        "{text}"
    );
}

/// A guest that logs a line of 100 `x` as many times as its input is long (each line
/// in a block of its own: logging consumes the block).
const CHATTY: &str = r#"
(module
  (import "extism:host/env" "input_length" (func $length (result i64)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
  (import "extism:host/env" "log_info" (func $info (param i64)))
  (memory (export "memory") 1)
  (func (export "chatter") (result i32)
    (local $left i64)
    (local $line i64)
    (local $at i64)
    (local.set $left (call $length))
    (block $done
      (loop $again
        (br_if $done (i64.eqz (local.get $left)))
        (local.set $line (call $alloc (i64.const 100)))
        (local.set $at (i64.const 0))
        (block $filled
          (loop $fill
            (br_if $filled (i64.eq (local.get $at) (i64.const 100)))
            (call $store (i64.add (local.get $line) (local.get $at)) (i32.const 120))
            (local.set $at (i64.add (local.get $at) (i64.const 1)))
            (br $fill)))
        (call $info (local.get $line))
        (local.set $left (i64.sub (local.get $left) (i64.const 1)))
        (br $again)))
    (i32.const 0)))
"#;

/// Issue 12 (its log part): guest logs were uncapped; 50 MiB of log lines became a
/// 315 MB answer. A call keeps at most the grant's lines and bytes, then says how many
/// it dropped.
#[test]
fn a_calls_logs_are_capped_in_lines_and_bytes_with_a_count_of_the_rest() {
    let engine = common::engine();
    let module = add_bytes(&engine, TENANT, "chatty", common::wat(CHATTY));
    let input = vec![b'x'; 100];
    let by_lines = Grant {
        max_log_lines: 10,
        ..Grant::default()
    };
    let out = call(&engine, &module, "chatter", &input, &by_lines).unwrap();
    assert_eq!(out.logs.len(), 11);
    assert_eq!(out.logs_dropped, 90);
    assert!(
        out.logs[10].message.contains("90 log lines dropped"),
        "{:?}",
        out.logs[10]
    );
    let by_bytes = Grant {
        max_log_bytes: 250,
        ..Grant::default()
    };
    let out = call(&engine, &module, "chatter", &input, &by_bytes).unwrap();
    // Two lines of 100 bytes fit in 250; the third does not.
    assert_eq!(out.logs.len(), 3);
    assert_eq!(out.logs_dropped, 98);
    // The next call on the same (warm) instance starts from nothing.
    let out = call(&engine, &module, "chatter", b"xy", &by_bytes).unwrap();
    assert_eq!((out.logs.len(), out.logs_dropped), (2, 0));
}
