//! What a guest logs during one call: the lines (within the grant's caps of lines and
//! bytes, the rest dropped and counted, a closing line saying how many), and their echo
//! in the agent's own log, escaped so that a guest cannot forge lines of it.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Severity of a guest log line; the numbers are the ABI's `get_log_level` values.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

impl LogLevel {
    pub(crate) const ALL: [LogLevel; 5] = [
        Self::Trace,
        Self::Debug,
        Self::Info,
        Self::Warn,
        Self::Error,
    ];

    pub(crate) fn import_name(self) -> &'static str {
        match self {
            Self::Trace => "log_trace",
            Self::Debug => "log_debug",
            Self::Info => "log_info",
            Self::Warn => "log_warn",
            Self::Error => "log_error",
        }
    }
}

/// One line a guest logged during a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogLine {
    pub level: LogLevel,
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    pub message: String,
}

/// The log lines of the call under way, and its caps.
#[derive(Debug, Default)]
pub(crate) struct CallLogs {
    lines: Vec<LogLine>,
    /// Bytes of `lines`, against `max_bytes`.
    bytes: u64,
    max_lines: u64,
    max_bytes: u64,
    /// Lines dropped over the caps.
    dropped: u64,
}

impl CallLogs {
    /// A call starts with no lines and the grant's caps.
    pub(crate) fn start(&mut self, max_lines: u64, max_bytes: u64) {
        self.discard();
        self.max_lines = max_lines;
        self.max_bytes = max_bytes;
    }

    /// Forgets the lines so far (an initialiser's: not the call's).
    pub(crate) fn discard(&mut self) {
        self.lines.clear();
        self.bytes = 0;
        self.dropped = 0;
    }

    pub(crate) fn push(&mut self, tenant: &str, level: LogLevel, message: String) {
        let size = message.len() as u64;
        if self.lines.len() as u64 >= self.max_lines
            || self.bytes.saturating_add(size) > self.max_bytes
        {
            // Over the call's caps: neither kept nor written to the agent's log.
            self.dropped += 1;
            return;
        }
        self.bytes += size;
        let time_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The agent's own log gets the line escaped (newlines, ANSI escapes and other
        // control characters), so a guest cannot forge lines of it; the call's record
        // keeps the line as the guest wrote it.
        let escaped = message.escape_debug();
        match level {
            LogLevel::Trace => {
                tracing::trace!(target: "deadlift::guest", %tenant, "{escaped}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "deadlift::guest", %tenant, "{escaped}")
            }
            LogLevel::Info => {
                tracing::info!(target: "deadlift::guest", %tenant, "{escaped}")
            }
            LogLevel::Warn => {
                tracing::warn!(target: "deadlift::guest", %tenant, "{escaped}")
            }
            LogLevel::Error => {
                tracing::error!(target: "deadlift::guest", %tenant, "{escaped}")
            }
        }
        self.lines.push(LogLine {
            level,
            time_unix_ms,
            message,
        });
    }

    /// The call's lines, closed by one saying how many were dropped (if any), and that
    /// count.
    pub(crate) fn finish(&mut self) -> (Vec<LogLine>, u64) {
        let mut lines = std::mem::take(&mut self.lines);
        if self.dropped > 0 {
            lines.push(LogLine {
                level: LogLevel::Warn,
                time_unix_ms: lines.last().map_or(0, |line| line.time_unix_ms),
                message: format!(
                    "({} log lines dropped: over this call's cap of {} lines or {} bytes)",
                    self.dropped, self.max_lines, self.max_bytes
                ),
            });
        }
        (lines, self.dropped)
    }
}
