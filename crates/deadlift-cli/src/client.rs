//! The CLI's HTTP client for a running agent: the flags that say how to reach it
//! (`Remote`, shared by every client command), requests, the framing of the agent's
//! Server-Sent Events streams, and how answers are printed: readable tables by default,
//! the JSON itself with `--json`.

use anyhow::{Context, bail};
use clap::Args;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

/// How to reach an agent.
#[derive(Debug, Args)]
pub struct Remote {
    /// The agent's URL
    #[arg(long, env = "DEADLIFT_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// API token
    #[arg(long, env = "DEADLIFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Act for this tenant (with the admin token)
    #[arg(long, env = "DEADLIFT_TENANT")]
    tenant: Option<String>,
    /// Print JSON instead of tables
    #[arg(long)]
    pub json: bool,
}

impl Remote {
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.server, self.token.clone(), self.tenant.clone())
    }
}

/// A client for one agent.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
    tenant: Option<String>,
}

impl Client {
    pub fn new(
        server: &str,
        token: Option<String>,
        tenant: Option<String>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("deadlift-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            server: server.trim_end_matches('/').to_owned(),
            token,
            tenant,
        })
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.server));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(tenant) = &self.tenant {
            request = request.header("x-deadlift-tenant", tenant);
        }
        request
    }

    /// Sends the request; a non-2xx answer becomes an error with the server's message.
    pub async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the agent at {}", self.server))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if body["error"]["details"]["needs"] == "tenant" && self.tenant.is_none() {
            bail!(
                "an admin token acts on a tenant's data only for a named tenant: add --tenant <name> (or set DEADLIFT_TENANT)"
            );
        }
        match (
            body["error"]["message"].as_str(),
            body["error"]["code"].as_str(),
        ) {
            (Some(message), Some(code)) => bail!("{message} ({code})"),
            _ => bail!("the agent answered {status}"),
        }
    }

    pub async fn json(&self, request: RequestBuilder) -> anyhow::Result<Value> {
        let response = self.send(request).await?;
        if response.content_length() == Some(0) {
            return Ok(Value::Null);
        }
        Ok(response.json().await.unwrap_or(Value::Null))
    }
}

/// The bytes `path_segment` escapes: all but RFC 3986's unreserved characters and the `@`
/// and `:` that module references hold (`name@version`, `sha256:...`). The other
/// characters RFC 3986 allows in a segment (`+`, `&`, `=`, `;`, ...) are escaped anyway:
/// the agent decodes them just the same, and a proxy on the way cannot read them as
/// syntax (`;` parameters, `+` for a space).
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'@')
    .remove(b':');

/// `segment` escaped for use as one segment of a URL path.
pub fn path_segment(segment: &str) -> String {
    utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

pub fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What an action that answers no document did: `json` with `--json`, else `text`.
pub fn report(remote: &Remote, json: Value, text: impl std::fmt::Display) -> anyhow::Result<()> {
    if remote.json {
        return print_json(&json);
    }
    println!("{text}");
    Ok(())
}

/// One message of a Server-Sent Events stream.
#[derive(Debug, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` field (trimmed), if the message has one.
    pub event: Option<String>,
    /// The `data:` fields, concatenated.
    pub data: String,
}

impl SseMessage {
    fn parse(text: &str) -> Self {
        let mut message = Self {
            event: None,
            data: String::new(),
        };
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("event:") {
                message.event = Some(value.trim().to_owned());
            } else if let Some(value) = line.strip_prefix("data:") {
                message.data.push_str(value.trim_start());
            }
        }
        message
    }
}

/// Cuts a Server-Sent Events stream into messages as its chunks arrive.
///
/// The network cuts chunks anywhere, also inside a multi-byte character, so the bytes
/// are kept until a message is complete and only then decoded. The blank line that ends
/// a message is safe to look for in raw bytes: no byte of a multi-byte UTF-8 character
/// is a newline.
#[derive(Debug, Default)]
pub struct SseDecoder {
    pending: Vec<u8>,
}

impl SseDecoder {
    /// Adds a chunk; returns the messages it completes, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseMessage> {
        self.pending.extend_from_slice(chunk);
        let mut messages = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|pair| pair == b"\n\n") {
            let message: Vec<u8> = self.pending.drain(..end + 2).collect();
            messages.push(SseMessage::parse(&String::from_utf8_lossy(&message)));
        }
        messages
    }
}

/// Prints rows as an aligned table with a header line.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(headers.iter().map(|h| h.to_uppercase()).collect())
    );
    for row in rows {
        println!("{}", line(row.clone()));
    }
}

/// A table's rows from a JSON array (no rows when it is not one).
pub fn rows(list: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    list.as_array()
        .map(|items| items.iter().map(row).collect())
        .unwrap_or_default()
}

/// A JSON array of strings as `a,b,c`.
pub fn joined(list: &Value) -> String {
    list.as_array()
        .map(|items| items.iter().map(cell).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

/// Unix milliseconds as an RFC 3339 time (`-` when absent).
pub fn time(ms: &Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "-".into(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

/// A JSON field as display text (`-` when absent).
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{SseDecoder, SseMessage, path_segment};

    #[test]
    fn a_path_segment_escapes_what_would_end_or_split_it() {
        assert_eq!(path_segment("adder@1.0.0"), "adder@1.0.0");
        assert_eq!(path_segment("sha256:0a1b"), "sha256:0a1b");
        assert_eq!(path_segment("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(path_segment("a/b?c#d%e f"), "a%2Fb%3Fc%23d%25e%20f");
        assert_eq!(path_segment("a+b&c=d;e,f!"), "a%2Bb%26c%3Dd%3Be%2Cf%21");
        assert_eq!(path_segment("café"), "caf%C3%A9");
    }

    fn run_message(data: &str) -> SseMessage {
        SseMessage {
            event: Some("run".to_owned()),
            data: data.to_owned(),
        }
    }

    #[test]
    fn a_character_split_between_two_chunks_arrives_whole() {
        let stream = "event: run\ndata: {\"workflow\":\"café\"}\n\n".as_bytes();
        let inside_the_e_acute = stream.iter().position(|&b| b == 0xC3).unwrap() + 1;
        let mut decoder = SseDecoder::default();
        let mut messages = decoder.push(&stream[..inside_the_e_acute]);
        messages.extend(decoder.push(&stream[inside_the_e_acute..]));
        assert_eq!(messages, [run_message("{\"workflow\":\"café\"}")]);
    }

    #[test]
    fn messages_arrive_whole_however_the_stream_is_cut() {
        let stream = "event: run\ndata: \"🚀 ü\"\n\n: keep-alive\n\nevent: lagged\ndata: 3\n\n";
        let mut decoder = SseDecoder::default();
        let messages: Vec<SseMessage> = stream
            .as_bytes()
            .chunks(1)
            .flat_map(|byte| decoder.push(byte))
            .collect();
        assert_eq!(
            messages,
            [
                run_message("\"🚀 ü\""),
                SseMessage {
                    event: None,
                    data: String::new()
                },
                SseMessage {
                    event: Some("lagged".to_owned()),
                    data: "3".to_owned()
                },
            ]
        );
    }
}
