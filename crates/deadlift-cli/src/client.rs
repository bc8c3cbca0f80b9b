//! The CLI's HTTP client for a running agent, the flags that say how to reach it
//! (`Remote`, shared by every client command), and how its answers are printed: readable
//! tables by default, the JSON itself with `--json`.

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
    use super::path_segment;

    #[test]
    fn a_path_segment_escapes_what_would_end_or_split_it() {
        assert_eq!(path_segment("adder@1.0.0"), "adder@1.0.0");
        assert_eq!(path_segment("sha256:0a1b"), "sha256:0a1b");
        assert_eq!(path_segment("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(path_segment("a/b?c#d%e f"), "a%2Fb%3Fc%23d%25e%20f");
        assert_eq!(path_segment("a+b&c=d;e,f!"), "a%2Bb%26c%3Dd%3Be%2Cf%21");
        assert_eq!(path_segment("café"), "caf%C3%A9");
    }
}
