//! Outbound HTTP for `http_request`: the allow-list check and the request itself.
//!
//! A host is allowed when a glob of the grant's `allowed_hosts` matches the URL's host
//! *as parsed*, so `https://allowed.example@evil.test/` is `evil.test`. An IP address is
//! allowed only when it is listed exactly: no glob (not even `*`) reaches an address.
//! Redirects are followed by hand, at most [`MAX_REDIRECTS`], and every hop is checked
//! against the same list. A lax redirect policy is how such allow-lists usually fail.
//! The request runs on the engine's own small Tokio runtime, within the call's
//! remaining time. Engine workers wait for it; async threads never block on it.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LOCATION};
use serde::Deserialize;

use crate::error::CallError;

/// Most redirects one request follows.
pub(crate) const MAX_REDIRECTS: usize = 10;

/// The request a guest sends: the JSON document of `http_request`.
#[derive(Debug, Deserialize)]
pub(crate) struct GuestRequest {
    pub url: String,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// What the guest gets back.
#[derive(Debug, Default)]
pub(crate) struct GuestResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// Checks `url`'s host against the allow-list; the error names the host.
pub(crate) fn check_host(url: &Url, allowed: &[String]) -> Result<(), String> {
    let host = match url.host() {
        Some(host) => host,
        None => return Err(format!("`{url}` has no host")),
    };
    let allowed_here = match host {
        url::Host::Domain(name) => allowed.iter().any(|pattern| {
            glob::Pattern::new(pattern)
                .map(|p| p.matches(name))
                .unwrap_or_else(|_| pattern == name)
        }),
        // Addresses are matched exactly, never by glob: `*` must not reach 127.0.0.1
        // or a cloud metadata address.
        url::Host::Ipv4(address) => allowed.iter().any(|p| *p == address.to_string()),
        url::Host::Ipv6(address) => allowed
            .iter()
            .any(|p| p.trim_start_matches('[').trim_end_matches(']') == address.to_string()),
    };
    if allowed_here {
        Ok(())
    } else {
        Err(format!(
            "HTTP request to {url} is not allowed: host `{host}` is not in the grant's allowed hosts"
        ))
    }
}

/// The engine's HTTP client, made on first use.
#[derive(Debug, Default)]
pub(crate) struct Outbound {
    client: OnceLock<Result<Client, String>>,
}

#[derive(Debug)]
struct Client {
    runtime: Option<tokio::runtime::Runtime>,
    http: reqwest::Client,
}

impl Drop for Client {
    fn drop(&mut self) {
        // Never blocks, so the engine may be dropped anywhere, async code included.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn transport(message: impl std::fmt::Display) -> CallError {
    CallError::HostFunction {
        name: "http_request".into(),
        message: message.to_string(),
    }
}

impl Outbound {
    fn client(&self) -> Result<&Client, CallError> {
        self.client
            .get_or_init(|| {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("deadlift-http")
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let http = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("deadlift/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok(Client {
                    runtime: Some(runtime),
                    http,
                })
            })
            .as_ref()
            .map_err(|e| transport(format!("cannot start the HTTP client: {e}")))
    }

    /// Performs `request` if every hop is allowed, within `remaining`. Called on an
    /// engine worker thread (never on an async one).
    pub(crate) fn send(
        &self,
        request: GuestRequest,
        body: Option<Vec<u8>>,
        allowed: &[String],
        max_body_bytes: u64,
        remaining: Duration,
        timeout: Duration,
    ) -> Result<GuestResponse, CallError> {
        let mut url = Url::parse(&request.url).map_err(|e| CallError::HttpDenied {
            url: request.url.clone(),
            reason: format!("not a valid URL: {e}"),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CallError::HttpDenied {
                url: request.url,
                reason: "only http and https URLs are allowed".into(),
            });
        }
        check_host(&url, allowed).map_err(|reason| CallError::HttpDenied {
            url: request.url.clone(),
            reason,
        })?;
        let mut method = reqwest::Method::from_bytes(
            request
                .method
                .as_deref()
                .unwrap_or("GET")
                .to_uppercase()
                .as_bytes(),
        )
        .map_err(|_| {
            transport(format!(
                "`{}` is not an HTTP method",
                request.method.unwrap_or_default()
            ))
        })?;
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| transport(format!("`{name}` is not a header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| transport(format!("the value of header `{name}` is not valid")))?;
            headers.append(name, value);
        }
        let client = self.client()?;
        let runtime = client
            .runtime
            .as_ref()
            .ok_or_else(|| transport("the HTTP client is shut down"))?;
        let mut body = body;
        let work = async {
            for _ in 0..=MAX_REDIRECTS {
                let mut builder = client
                    .http
                    .request(method.clone(), url.clone())
                    .headers(headers.clone());
                if let Some(bytes) = &body {
                    builder = builder.body(bytes.clone());
                }
                let mut response = builder
                    .send()
                    .await
                    .map_err(|e| transport(error_chain(&e)))?;
                let status = response.status();
                if status.is_redirection()
                    && let Some(location) = response.headers().get(LOCATION)
                {
                    let next = location
                        .to_str()
                        .ok()
                        .and_then(|l| url.join(l).ok())
                        .ok_or_else(|| transport("a redirect's Location is not a URL"))?;
                    check_host(&next, allowed).map_err(|reason| CallError::HttpDenied {
                        url: next.to_string(),
                        reason: format!("redirected from {url}: {reason}"),
                    })?;
                    if next.host_str() != url.host_str() {
                        for secret in ["authorization", "cookie", "proxy-authorization"] {
                            headers.remove(secret);
                        }
                    }
                    // 303 always, and 301/302 after a POST, continue as a GET.
                    if status == reqwest::StatusCode::SEE_OTHER
                        || (method == reqwest::Method::POST && matches!(status.as_u16(), 301 | 302))
                    {
                        method = reqwest::Method::GET;
                        body = None;
                    }
                    url = next;
                    continue;
                }
                let mut kept = BTreeMap::new();
                for (name, value) in response.headers() {
                    if let Ok(value) = value.to_str() {
                        kept.insert(name.as_str().to_owned(), value.to_owned());
                    }
                }
                let mut bytes = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| transport(error_chain(&e)))?
                {
                    if bytes.len() as u64 + chunk.len() as u64 > max_body_bytes {
                        return Err(transport(format!(
                            "the HTTP response is larger than {max_body_bytes} bytes"
                        )));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                return Ok(GuestResponse {
                    status: status.as_u16(),
                    headers: kept,
                    body: bytes,
                });
            }
            Err(transport(format!("more than {MAX_REDIRECTS} redirects")))
        };
        runtime.block_on(async {
            match tokio::time::timeout(remaining, work).await {
                Ok(result) => result,
                Err(_) => Err(CallError::Timeout { limit: timeout }),
            }
        })
    }
}

/// An error with its causes, for the guest's and the run's message.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(url: &str, list: &[&str]) -> bool {
        let list: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        check_host(&Url::parse(url).unwrap(), &list).is_ok()
    }

    #[test]
    fn hosts_match_globs_on_the_parsed_host() {
        assert!(allowed("https://api.example.com/x", &["*.example.com"]));
        assert!(allowed("https://api.example.com/x", &["api.example.com"]));
        assert!(!allowed("https://example.com.evil.test/", &["example.com"]));
        assert!(!allowed("https://api.example.com/", &[]));
        // Userinfo is not the host.
        assert!(!allowed(
            "https://api.example.com@evil.test/",
            &["api.example.com"]
        ));
        assert!(!allowed(
            "https://evil.test\\@api.example.com/",
            &["api.example.com"]
        ));
    }

    #[test]
    fn addresses_need_an_exact_entry() {
        assert!(!allowed("http://127.0.0.1:8080/", &["*"]));
        assert!(!allowed("http://169.254.169.254/latest", &["*"]));
        assert!(allowed("http://127.0.0.1:8080/", &["127.0.0.1"]));
        assert!(!allowed("http://[::1]/", &["*"]));
        assert!(allowed("http://[::1]/", &["::1"]));
        // Other spellings of an address parse to the address.
        assert!(!allowed("http://2130706433/", &["*"]));
        assert!(!allowed("http://0x7f.1/", &["*"]));
        assert!(allowed("http://2130706433/", &["127.0.0.1"]));
    }
}
