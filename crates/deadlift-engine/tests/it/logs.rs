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
