//! CloudEvents 1.0 in JSON (structured mode, single and batch), as the agent accepts and
//! stores them; W3C trace context carried in the `traceparent` extension; and the ids
//! the agent mints for events and runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{now_ms, now_rfc3339};
use deadlift_engine::Code;
use deadlift_engine::subject::validate_subject;

/// The content type of a batch of events.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// Most events one request may carry.
pub const MAX_BATCH: usize = 1000;
/// The extension attribute counting how many runs led to an event, so that a workflow
/// that triggers itself stops instead of looping forever.
pub const DEPTH_EXTENSION: &str = "deadliftdepth";
/// The extension attribute addressing an event to one peer (an `emit` step's `to`): such
/// an event goes to that peer's outbox only, without the attribute.
pub const TO_EXTENSION: &str = "deadliftto";
/// How deep a chain of events emitted by runs may go.
pub const MAX_DEPTH: u64 = 32;

/// A CloudEvent as carried in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloudEvent {
    #[schema(pattern = "^1\\.0$")]
    pub specversion: String,
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub id: String,
    #[schema(min_length = 1, max_length = 1024)]
    pub source: String,
    /// The routing subject: tokens separated by dots, without whitespace, control
    /// characters or the wildcards `*` and `>`.
    #[serde(rename = "type")]
    #[schema(
        max_length = 256,
        pattern = "^[^.\\s*>\\u0000-\\u001f\\u007f-\\u009f]+(\\.[^.\\s*>\\u0000-\\u001f\\u007f-\\u009f]+)*$"
    )]
    pub event_type: String,
    /// RFC 3339; the agent sets it when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Extension attributes, `traceparent` among them.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: BTreeMap<String, Value>,
}

/// Why events were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the body is not a CloudEvent in JSON: {0}")]
    Syntax(String),
    #[error("event {index}: {message}")]
    Invalid { index: usize, message: String },
    #[error("a batch holds at most {MAX_BATCH} events")]
    BatchSize,
    #[error("binary mode: {0}")]
    Binary(String),
    #[error(
        "content type `{0}` is not accepted; send application/cloudevents+json, application/json or application/cloudevents-batch+json"
    )]
    ContentType(String),
}

impl EventError {
    pub fn code(&self) -> Code {
        match self {
            Self::ContentType(_) => Code::UnsupportedMediaType,
            _ => Code::EventInvalid,
        }
    }
}

impl CloudEvent {
    /// A new event minted by this agent.
    pub fn new(event_type: impl Into<String>, source: impl Into<String>, data: Value) -> Self {
        Self {
            specversion: "1.0".into(),
            id: new_id("evt_"),
            source: source.into(),
            event_type: event_type.into(),
            time: Some(now_rfc3339()),
            subject: None,
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            data: Some(data),
            data_base64: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Checks the event against CloudEvents 1.0 and Deadlift's rules.
    pub fn validate(&self) -> Result<(), String> {
        if self.specversion != "1.0" {
            return Err(format!(
                "specversion is `{}`; only 1.0 is supported",
                self.specversion
            ));
        }
        if self.id.is_empty() || self.id.len() > 256 {
            return Err("id must be 1 to 256 bytes long".into());
        }
        if self.id.chars().any(char::is_control) {
            return Err("id must not contain control characters".into());
        }
        if self.source.is_empty() || self.source.len() > 1024 {
            return Err("source must be 1 to 1024 bytes long".into());
        }
        validate_subject(&self.event_type).map_err(|e| format!("type: {e}"))?;
        if let Some(time) = &self.time {
            chrono::DateTime::parse_from_rfc3339(time)
                .map_err(|e| format!("time `{time}` is not an RFC 3339 timestamp: {e}"))?;
        }
        if self.data.is_some() && self.data_base64.is_some() {
            return Err("give at most one of data and data_base64".into());
        }
        if self.extensions.contains_key(TO_EXTENSION) {
            return Err(format!(
                "the extension `{TO_EXTENSION}` is reserved: it routes an event to a peer and only an emit step's `to` sets it"
            ));
        }
        for (name, value) in &self.extensions {
            let valid_name = !name.is_empty()
                && name.len() <= 20
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !valid_name {
                return Err(format!(
                    "`{name}` is not a known attribute nor a valid extension name (1 to 20 lowercase letters or digits)"
                ));
            }
            if !(value.is_string() || value.is_number() || value.is_boolean()) {
                return Err(format!(
                    "extension `{name}` must be a string, number or boolean"
                ));
            }
        }
        // A `traceparent` that is not W3C trace context is no reason to refuse the
        // event: as W3C says, the trace restarts (`complete`).
        Ok(())
    }

    /// Fills what the agent adds on receipt: a time and a trace context when absent.
    pub fn complete(&mut self) {
        if self.time.is_none() {
            self.time = Some(now_rfc3339());
        }
        // Absent or invalid: a new trace. A later version's is kept as the version we
        // speak, as W3C asks of a receiver that understands its first fields.
        let trace = self
            .extensions
            .get("traceparent")
            .and_then(Value::as_str)
            .and_then(TraceParent::parse)
            .unwrap_or_else(TraceParent::new_root);
        self.extensions
            .insert("traceparent".into(), Value::String(trace.to_string()));
    }

    /// The trace this event belongs to.
    pub fn trace(&self) -> TraceParent {
        self.extensions
            .get("traceparent")
            .and_then(Value::as_str)
            .and_then(TraceParent::parse)
            .unwrap_or_else(TraceParent::new_root)
    }

    /// How many runs led to this event.
    pub fn depth(&self) -> u64 {
        self.extensions
            .get(DEPTH_EXTENSION)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// The input a run of this event gets: its data (`data_base64` as a string).
    pub fn input(&self) -> Value {
        match (&self.data, &self.data_base64) {
            (Some(data), _) => data.clone(),
            (None, Some(base64)) => Value::String(base64.clone()),
            (None, None) => Value::Null,
        }
    }
}

/// A content type without its parameters, lower case: `application/json; charset=utf-8`
/// is `application/json`.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Parses a request body as one event or a batch, by content type, and validates it.
pub fn parse_events(content_type: &str, body: &[u8]) -> Result<Vec<CloudEvent>, EventError> {
    let essence = media_type(content_type);
    let events: Vec<CloudEvent> = match essence.as_str() {
        BATCH_CONTENT_TYPE => {
            serde_json::from_slice(body).map_err(|e| EventError::Syntax(e.to_string()))?
        }
        "application/cloudevents+json" | "application/json" | "" => {
            vec![serde_json::from_slice(body).map_err(|e| EventError::Syntax(e.to_string()))?]
        }
        _ => return Err(EventError::ContentType(essence)),
    };
    // An empty batch is allowed (the HTTP binding allows it): nothing happens.
    if events.len() > MAX_BATCH {
        return Err(EventError::BatchSize);
    }
    for (index, event) in events.iter().enumerate() {
        event
            .validate()
            .map_err(|message| EventError::Invalid { index, message })?;
    }
    Ok(events)
}

/// One event in the HTTP binding's binary mode: its attributes in `ce-*` headers (values
/// percent-encoded), its data the body, typed by `content_type`. `headers` are the
/// request's, names lower-case.
pub fn parse_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    content_type: &str,
    body: &[u8],
) -> Result<CloudEvent, EventError> {
    let mut attributes = serde_json::Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.strip_prefix("ce-") else {
            continue;
        };
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| EventError::Binary(format!("header `{name}` is not UTF-8")))?;
        attributes.insert(attribute.to_owned(), Value::String(value.into_owned()));
    }
    if !content_type.is_empty() {
        attributes.insert(
            "datacontenttype".into(),
            Value::String(content_type.to_owned()),
        );
    }
    let essence = media_type(content_type);
    if !body.is_empty() {
        let json = essence == "application/json" || essence.ends_with("+json");
        let (key, data) = if json {
            let data = serde_json::from_slice(body)
                .map_err(|e| EventError::Binary(format!("the body is not JSON: {e}")))?;
            ("data", data)
        } else if essence.starts_with("text/")
            && let Ok(text) = std::str::from_utf8(body)
        {
            ("data", Value::String(text.to_owned()))
        } else {
            use base64::Engine as _;
            (
                "data_base64",
                Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
            )
        };
        attributes.insert(key.into(), data);
    }
    let event: CloudEvent = serde_json::from_value(Value::Object(attributes))
        .map_err(|e| EventError::Binary(e.to_string()))?;
    event
        .validate()
        .map_err(|message| EventError::Invalid { index: 0, message })?;
    Ok(event)
}

/// W3C trace context: `00-<trace id>-<parent span id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` as W3C Trace Context says: version 00 exactly; a later
    /// version by its first four fields (what follows them is ignored); `ff`, upper-case
    /// hex, wrong lengths and all-zero ids are invalid.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2) || version == "ff" {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flag = [0u8; 1];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        hex::decode_to_slice(flags, &mut flag).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: flag[0],
        })
    }

    /// A new trace, sampled.
    pub fn new_root() -> Self {
        let mut trace_id = random::<16>();
        trace_id[0] |= 1;
        Self {
            trace_id,
            span_id: Self::new_span_id(),
            flags: 1,
        }
    }

    /// The same trace with a new span, for something this agent does within it.
    pub fn child(&self) -> Self {
        Self {
            span_id: Self::new_span_id(),
            ..*self
        }
    }

    fn new_span_id() -> [u8; 8] {
        let mut span = random::<8>();
        span[0] |= 1;
        span
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS random source failing is not recoverable; fall back to time-derived bytes
    // rather than refuse service, since these values need uniqueness, not secrecy.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (nanos >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    bytes
}

/// A new id: `prefix`, 12 hex digits of milliseconds since the epoch (so ids sort by
/// creation time), then 20 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}{:012x}{}",
        now_ms() as u64 & 0xffff_ffff_ffff,
        hex::encode(random::<10>())
    )
}

/// A random fraction in [0, 1), for jitter.
pub fn random_fraction() -> f64 {
    (u64::from_le_bytes(random::<8>()) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn structured_and_batch_events_parse_and_validate() {
        let one = json!({"specversion":"1.0","id":"e1","source":"/t","type":"a.b","data":{"x":1},"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"});
        let events =
            parse_events("application/cloudevents+json", one.to_string().as_bytes()).unwrap();
        assert_eq!(events[0].input(), json!({"x": 1}));
        assert_eq!(
            events[0].trace().trace_id_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let batch = json!([one, {"specversion":"1.0","id":"e2","source":"/t","type":"a.c"}]);
        let events = parse_events(BATCH_CONTENT_TYPE, batch.to_string().as_bytes()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].input(), Value::Null);
    }

    #[test]
    fn invalid_events_name_the_problem() {
        let cases = [
            (
                json!({"specversion":"0.3","id":"e","source":"s","type":"a"}),
                "specversion",
            ),
            (
                json!({"specversion":"1.0","id":"","source":"s","type":"a"}),
                "id",
            ),
            (
                json!({"specversion":"1.0","id":"e","source":"s","type":"a.*"}),
                "type",
            ),
            (
                json!({"specversion":"1.0","id":"e","source":"s","type":"a","time":"yesterday"}),
                "time",
            ),
            (
                json!({"specversion":"1.0","id":"e","source":"s","type":"a","Bad_Ext":"1"}),
                "Bad_Ext",
            ),
        ];
        for (event, word) in cases {
            let error = parse_events("application/json", event.to_string().as_bytes()).unwrap_err();
            assert!(
                error.to_string().contains(word),
                "{error} should mention {word}"
            );
        }
        let too_many = serde_json::to_string(&vec![
            json!({"specversion": "1.0", "id": "e", "source": "s", "type": "a"});
            MAX_BATCH + 1
        ])
        .unwrap();
        assert_eq!(
            parse_events(BATCH_CONTENT_TYPE, too_many.as_bytes()).unwrap_err(),
            EventError::BatchSize
        );
        assert!(matches!(
            parse_events("text/plain", b"{}").unwrap_err(),
            EventError::ContentType(_)
        ));
        assert!(matches!(
            parse_events("application/json", b"{not json").unwrap_err(),
            EventError::Syntax(_)
        ));
    }

    #[test]
    fn trace_context_round_trips_and_children_keep_the_trace() {
        let root = TraceParent::new_root();
        let parsed = TraceParent::parse(&root.to_string()).unwrap();
        assert_eq!(parsed, root);
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let a = new_id("run_");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id("run_");
        assert!(a < b && a.len() == 36);
    }

    /// Issue 14: a `traceparent` of a later version, or with upper-case hex, failed the
    /// whole event with 400. W3C says to parse later versions by their first fields and
    /// to restart the trace on invalid input.
    #[test]
    fn trace_context_is_parsed_forward_compatibly_and_invalid_input_restarts_the_trace() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let later = format!("cc-{trace}-00f067aa0ba902b7-01-what-comes-next");
        let parsed = TraceParent::parse(&later).unwrap();
        assert_eq!(
            parsed.to_string(),
            format!("00-{trace}-00f067aa0ba902b7-01")
        );
        for invalid in [
            format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()),
            format!("ff-{trace}-00f067aa0ba902b7-01"),
            format!("00-{trace}-00f067aa0ba902b7-01-extra"),
            format!("00-{trace}-0000000000000000-01"),
            "00-00-00-00".to_owned(),
        ] {
            assert_eq!(TraceParent::parse(&invalid), None, "{invalid}");
            let body = json!({"specversion": "1.0", "id": "e", "source": "s", "type": "a", "traceparent": invalid});
            let mut events = parse_events("application/json", body.to_string().as_bytes()).unwrap();
            events[0].complete();
            let restarted = events[0].extensions["traceparent"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(TraceParent::parse(&restarted).is_some(), "{restarted}");
            assert_ne!(restarted, invalid);
        }
    }

    /// Issue 14: binary mode (`ce-*` headers) was refused, and so was an empty batch;
    /// the CloudEvents HTTP binding has receivers take both.
    #[test]
    fn binary_mode_and_empty_batches_are_accepted() {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "b-1"),
            ("ce-source", "/orders"),
            ("ce-type", "orders.created"),
            ("ce-subject", "caf%C3%A9"),
            ("ce-shard", "7"),
            ("content-length", "9"),
        ];
        let event = parse_binary(headers, "application/json", br#"{"n": 15}"#).unwrap();
        assert_eq!(event.id, "b-1");
        assert_eq!(event.data, Some(json!({"n": 15})));
        assert_eq!(event.subject.as_deref(), Some("café"));
        assert_eq!(event.extensions["shard"], "7");
        let text = parse_binary(headers, "text/plain", b"hello").unwrap();
        assert_eq!(text.data, Some(json!("hello")));
        let bytes = parse_binary(headers, "application/octet-stream", &[0xff, 0xfe]).unwrap();
        assert_eq!(bytes.data_base64.as_deref(), Some("//4="));
        assert!(parse_binary(headers[1..].iter().copied(), "application/json", b"1").is_err());
        assert!(parse_binary(headers, "application/json", b"{").is_err());
        assert_eq!(
            parse_events(BATCH_CONTENT_TYPE, b"[]").unwrap(),
            Vec::<CloudEvent>::new()
        );
    }
}
