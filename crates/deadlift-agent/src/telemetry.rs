//! OpenTelemetry export: every finished run, its steps and their plug-in calls, and every
//! direct call, as spans sent over OTLP/HTTP (protobuf) to a collector.
//!
//! Spans are built from what the journal recorded (its times, ids and outcomes), not
//! measured a second time on the call path: a task follows the runs' updates, reads each
//! finished run once and sends spans in batches (at most a second old, or
//! [`MAX_BATCH`] at once). A collector that is down or slow costs spans, never calls: a
//! batch that cannot be sent is dropped and counted, and so are updates missed while
//! the task was behind.
//!
//! Ids follow W3C trace context: the run's span is its `traceparent`'s span; its parent is
//! the span in the `traceparent` of the event that started it, so runs caused by another
//! agent's events join that agent's trace.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};

use crate::workflow::event::TraceParent;
use crate::workflow::{Journal, Run, RunStatus, RunUpdate, StepRecord, StepStatus};

/// Most spans sent in one request.
pub const MAX_BATCH: usize = 512;
/// Longest a finished span waits before it is sent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Longest one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Direct calls' spans waiting for the task; beyond, they are dropped and counted.
const CALL_QUEUE: usize = 4096;

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP endpoint `{endpoint}` is not an http(s) URL")]
    Endpoint { endpoint: String },
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Counts of what was sent and lost.
#[derive(Debug, Default)]
pub struct TelemetryStats {
    pub spans_exported: AtomicU64,
    pub spans_dropped: AtomicU64,
}

/// A direct call (not part of a run) to export as a span.
#[derive(Debug, Clone)]
pub struct CallSpan {
    pub tenant: String,
    pub module: String,
    pub function: String,
    /// The caller's trace context, when it sent one.
    pub parent: Option<TraceParent>,
    pub started: SystemTime,
    pub duration: Duration,
    pub fuel_used: Option<u64>,
    /// The error code when the call failed.
    pub error: Option<String>,
}

/// The running exporter: one task, fed by run updates and by direct calls.
#[derive(Debug)]
pub struct Telemetry {
    calls: mpsc::Sender<CallSpan>,
    stats: Arc<TelemetryStats>,
    stop: Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::task::JoinHandle<()>,
        )>,
    >,
}

/// Sends OTLP requests with the agent's own HTTP client (reqwest, rustls).
#[derive(Debug)]
struct OtlpHttp(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let response = self.0.execute(request).await?;
        let mut answer = http::Response::builder().status(response.status());
        for (name, value) in response.headers() {
            answer = answer.header(name, value);
        }
        // A collector's answer is small; a huge one is not read.
        let body = if response.content_length().unwrap_or(0) > 1 << 20 {
            Bytes::new()
        } else {
            response.bytes().await?
        };
        Ok(answer.body(body)?)
    }
}

impl Telemetry {
    /// Starts exporting to `endpoint` (a collector's base URL, as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `/v1/traces` is added unless the path already ends
    /// with it). Needs a Tokio runtime.
    pub(crate) fn start(
        endpoint: &str,
        agent: &str,
        journal: Journal,
        updates: broadcast::Receiver<RunUpdate>,
    ) -> Result<Self, TelemetryError> {
        let url = traces_url(endpoint)?;
        let http = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpHttp(http))
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name("deadlift")
                .with_attribute(KeyValue::new("service.instance.id", agent.to_owned()))
                .build(),
        );
        let stats = Arc::new(TelemetryStats::default());
        let (calls, call_receiver) = mpsc::channel(CALL_QUEUE);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(export_loop(
            exporter,
            journal,
            updates,
            call_receiver,
            stopped,
            stats.clone(),
        ));
        Ok(Self {
            calls,
            stats,
            stop: Mutex::new(Some((stop, task))),
        })
    }

    /// Exports a direct call; never waits (a full queue drops the span, counted).
    pub fn record_call(&self, call: CallSpan) {
        if self.calls.try_send(call).is_err() {
            self.stats.spans_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> &TelemetryStats {
        &self.stats
    }

    /// Sends what is waiting and stops.
    pub(crate) async fn shutdown(&self) {
        let running = self.stop.lock().take();
        if let Some((stop, task)) = running {
            let _ = stop.send(());
            let _ = tokio::time::timeout(EXPORT_TIMEOUT * 2, task).await;
        }
    }
}

fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let invalid = || TelemetryError::Endpoint {
        endpoint: endpoint.to_owned(),
    };
    let url = url::Url::parse(endpoint).map_err(|_| invalid())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid());
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    })
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    journal: Journal,
    mut updates: broadcast::Receiver<RunUpdate>,
    mut calls: mpsc::Receiver<CallSpan>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    stats: Arc<TelemetryStats>,
) {
    let mut batch = Vec::new();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while open {
        tokio::select! {
            update = updates.recv() => match update {
                // Another agent exported its own runs.
                Ok(update) if update.run.status.is_finished() && !update.imported => {
                    match journal.run(&update.tenant, &update.run.id).await {
                        Ok(Some(run)) => batch.extend(run_spans(&update.tenant, &run)),
                        // Gone already (retention), or unreadable: nothing to send.
                        Ok(None) | Err(_) => {
                            stats.spans_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    stats.spans_dropped.fetch_add(missed, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => open = false,
            },
            Some(call) = calls.recv() => batch.push(call_span(&call)),
            _ = tick.tick() => {
                flush(&exporter, &mut batch, &stats).await;
            }
            _ = &mut stopped => open = false,
        }
        if batch.len() >= MAX_BATCH {
            flush(&exporter, &mut batch, &stats).await;
        }
    }
    while let Ok(call) = calls.try_recv() {
        batch.push(call_span(&call));
    }
    flush(&exporter, &mut batch, &stats).await;
}

async fn flush(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    stats: &TelemetryStats,
) {
    while !batch.is_empty() {
        let rest = batch.split_off(batch.len().min(MAX_BATCH));
        let sending = std::mem::replace(batch, rest);
        let count = sending.len() as u64;
        match exporter.export(sending).await {
            Ok(()) => stats.spans_exported.fetch_add(count, Ordering::Relaxed),
            Err(error) => {
                tracing::warn!(%error, spans = count, "could not export spans; dropped");
                stats.spans_dropped.fetch_add(count, Ordering::Relaxed)
            }
        };
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("deadlift")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

fn time(unix_ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(unix_ms).unwrap_or(0))
}

fn context(trace_id: TraceId, span_id: SpanId) -> SpanContext {
    SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

fn new_span_id() -> SpanId {
    SpanId::from_bytes(TraceParent::new_root().span_id)
}

#[allow(clippy::too_many_arguments)]
fn span(
    trace_id: TraceId,
    span_id: SpanId,
    parent: SpanId,
    parent_is_remote: bool,
    name: String,
    kind: SpanKind,
    (start, end): (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
    status: Status,
) -> SpanData {
    SpanData {
        span_context: context(trace_id, span_id),
        parent_span_id: parent,
        parent_span_is_remote: parent_is_remote,
        span_kind: kind,
        name: Cow::Owned(name),
        start_time: start,
        end_time: end.max(start),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope(),
    }
}

fn i64_attr(key: &'static str, value: u64) -> KeyValue {
    KeyValue::new(key, i64::try_from(value).unwrap_or(i64::MAX))
}

/// A finished run as spans: the run, each step under it, and each step's plug-in call
/// under its step.
pub fn run_spans(tenant: &str, run: &Run) -> Vec<SpanData> {
    let summary = &run.summary;
    let Some(own) = TraceParent::parse(&run.traceparent) else {
        return Vec::new();
    };
    let trace_id = TraceId::from_bytes(own.trace_id);
    let run_span = SpanId::from_bytes(own.span_id);
    let cause = run
        .event
        .as_ref()
        .and_then(|event| event.extensions.get("traceparent"))
        .and_then(|value| value.as_str())
        .and_then(TraceParent::parse)
        .filter(|cause| cause.trace_id == own.trace_id);
    let (parent, parent_is_remote) = match cause {
        Some(cause) => (SpanId::from_bytes(cause.span_id), true),
        None => (SpanId::INVALID, false),
    };
    let start = summary.started_unix_ms.unwrap_or(summary.created_unix_ms);
    let end = summary.finished_unix_ms.unwrap_or(start);
    let mut attributes = vec![
        KeyValue::new("deadlift.tenant", tenant.to_owned()),
        KeyValue::new("deadlift.workflow", summary.workflow.clone()),
        KeyValue::new("deadlift.workflow.version", summary.workflow_version),
        KeyValue::new("deadlift.run.id", summary.id.clone()),
        KeyValue::new("deadlift.run.status", summary.status.as_str()),
        KeyValue::new(
            "deadlift.run.queued_ms",
            start.saturating_sub(summary.created_unix_ms),
        ),
    ];
    if let Some(event) = &summary.event_id {
        attributes.push(KeyValue::new("deadlift.event.id", event.clone()));
    }
    let status = match (&summary.status, &summary.error) {
        (RunStatus::Succeeded, _) => Status::Ok,
        (RunStatus::Failed, Some(error)) => {
            attributes.push(KeyValue::new("deadlift.error.code", error.code.as_str()));
            Status::error(error.message.clone())
        }
        (RunStatus::Failed, None) => Status::error("failed"),
        _ => Status::Unset,
    };
    let kind = if cause.is_some() {
        SpanKind::Consumer
    } else {
        SpanKind::Internal
    };
    let mut spans = vec![span(
        trace_id,
        run_span,
        parent,
        parent_is_remote,
        format!("run {}", summary.workflow),
        kind,
        (time(start), time(end)),
        attributes,
        status,
    )];
    for step in &run.steps {
        spans.extend(step_spans(tenant, trace_id, run_span, step));
    }
    spans
}

fn step_spans(
    tenant: &str,
    trace_id: TraceId,
    run_span: SpanId,
    step: &StepRecord,
) -> Vec<SpanData> {
    let times = (time(step.started_unix_ms), time(step.finished_unix_ms));
    let status = match (&step.status, &step.error) {
        (StepStatus::Failed, Some(error)) => Status::error(error.message.clone()),
        (StepStatus::Failed, None) => Status::error("failed"),
        (StepStatus::Succeeded, _) => Status::Ok,
        _ => Status::Unset,
    };
    let mut attributes = vec![
        KeyValue::new("deadlift.tenant", tenant.to_owned()),
        KeyValue::new("deadlift.step.id", step.id.clone()),
        KeyValue::new("deadlift.step.status", step.status.as_str()),
        i64_attr("deadlift.step.attempts", u64::from(step.attempts)),
    ];
    if let Some(error) = &step.error {
        attributes.push(KeyValue::new("deadlift.error.code", error.code.as_str()));
    }
    let step_span = new_span_id();
    let mut spans = vec![span(
        trace_id,
        step_span,
        run_span,
        false,
        format!("step {}", step.id),
        SpanKind::Internal,
        times,
        attributes,
        status.clone(),
    )];
    if let (Some(module), Some(function)) = (&step.module, &step.function) {
        let mut attributes = vec![
            KeyValue::new("deadlift.tenant", tenant.to_owned()),
            KeyValue::new("deadlift.module.id", module.clone()),
            KeyValue::new("deadlift.function", function.clone()),
        ];
        if let Some(fuel) = step.fuel_used {
            attributes.push(i64_attr("deadlift.fuel_used", fuel));
        }
        if let Some(version) = &step.version {
            attributes.push(KeyValue::new("deadlift.module.version", version.clone()));
        }
        if step.canary {
            attributes.push(KeyValue::new("deadlift.canary", true));
        }
        spans.push(span(
            trace_id,
            new_span_id(),
            step_span,
            false,
            format!("call {function}"),
            SpanKind::Internal,
            times,
            attributes,
            status,
        ));
    }
    spans
}

/// A direct call as a span: in the caller's trace when it sent one, else a trace of its own.
pub fn call_span(call: &CallSpan) -> SpanData {
    let (trace_id, parent, remote) = match &call.parent {
        Some(parent) => (
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id),
            true,
        ),
        None => (
            TraceId::from_bytes(TraceParent::new_root().trace_id),
            SpanId::INVALID,
            false,
        ),
    };
    let mut attributes = vec![
        KeyValue::new("deadlift.tenant", call.tenant.clone()),
        KeyValue::new("deadlift.module.id", call.module.clone()),
        KeyValue::new("deadlift.function", call.function.clone()),
    ];
    if let Some(fuel) = call.fuel_used {
        attributes.push(i64_attr("deadlift.fuel_used", fuel));
    }
    let status = match &call.error {
        Some(code) => {
            attributes.push(KeyValue::new("deadlift.error.code", code.clone()));
            Status::error(code.clone())
        }
        None => Status::Ok,
    };
    span(
        trace_id,
        new_span_id(),
        parent,
        remote,
        format!("call {}", call.function),
        SpanKind::Server,
        (call.started, call.started + call.duration),
        attributes,
        status,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert!(traces_url("c:4318").is_err());
        assert!(traces_url("ftp://c").is_err());
    }
}
