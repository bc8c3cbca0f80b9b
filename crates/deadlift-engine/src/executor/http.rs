//! Outbound HTTP for `http_request`: the allow-list check and the request itself.
//!
//! A host is allowed when a glob of the grant's `allowed_hosts` matches the URL's host
//! *as parsed*, so `https://allowed.example@evil.test/` is `evil.test`. An IP address is
//! allowed only when it is listed exactly: no glob (not even `*`) reaches an address.
//! Redirects are followed by hand, at most [`MAX_REDIRECTS`], and every hop is checked
//! against the same list. A lax redirect policy is how such allow-lists usually fail.
//!
//! A name is resolved by [`CheckedResolver`], and the connection goes only to the
//! addresses it let through: public addresses, and non-public ones (loopback, private,
//! link-local such as cloud metadata, ...) only when the grant also lists that address
//! exactly. So `*` does not reach `localhost`, and a name that resolves to a public
//! address at the check and a private one at the connection cannot exist: there is one
//! resolution. Guests cannot set `Host` or the hop-by-hop headers.
//! The request runs on the engine's own small Tokio runtime, within the call's
//! remaining time. A suspendable call (one whose grant reaches hosts) awaits it and
//! gives its worker to other calls meanwhile (`send_async`); a blocking call's worker
//! waits for it (`send`). No thread ever runs a runtime inside another.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, LOCATION};
use serde::Deserialize;

use crate::error::CallError;

/// Most redirects one request follows.
pub(crate) const MAX_REDIRECTS: usize = 10;

/// Headers the agent sets (or that only concern one hop), never a guest.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Most HTTP clients kept, one per set of non-public addresses grants name.
const MAX_CLIENTS: usize = 64;

/// What the resolver says when a name leads only to addresses the grant does not reach.
const NOT_REACHABLE: &str = "resolves only to addresses this grant does not reach";

/// Whether `address` is on the public internet: not loopback, private, link-local
/// (cloud metadata lives there), shared, reserved, documentation, multicast or
/// unspecified.
pub(crate) fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8
                || first == 0x0064 && v6.segments()[1] == 0xff9b)
        }
    }
}

/// Resolves names for outbound requests and lets through only public addresses and
/// the non-public ones a grant lists exactly (`extra`).
#[derive(Debug)]
struct CheckedResolver {
    extra: Arc<[IpAddr]>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let extra = self.extra.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let reachable: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| is_public(a.ip()) || extra.contains(&a.ip()))
                .collect();
            if reachable.is_empty() {
                let message = format!("`{host}` {NOT_REACHABLE}");
                return Err(message.into());
            }
            Ok(Box::new(reachable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The request a guest sends: the JSON document of `http_request`.
#[derive(Debug, Deserialize, serde::Serialize)]
pub(crate) struct GuestRequest {
    pub url: String,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// What the guest gets back.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
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
    /// A client per set of non-public addresses grants name (each with its own
    /// resolver and connection pool, so a connection made for one set never serves
    /// another).
    http: Mutex<HashMap<Arc<[IpAddr]>, reqwest::Client>>,
}

impl Client {
    fn for_grant(&self, allowed: &[String]) -> Result<reqwest::Client, CallError> {
        let mut extra: Vec<IpAddr> = allowed
            .iter()
            .filter_map(|entry| {
                entry
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            })
            .filter(|address| !is_public(*address))
            .collect();
        extra.sort();
        extra.dedup();
        let extra: Arc<[IpAddr]> = extra.into();
        let mut clients = self.http.lock();
        if let Some(client) = clients.get(&extra) {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("deadlift/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(CheckedResolver {
                extra: extra.clone(),
            }))
            .build()
            .map_err(|e| transport(format!("cannot start the HTTP client: {e}")))?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(extra, client.clone());
        Ok(client)
    }
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
                Ok(Client {
                    runtime: Some(runtime),
                    http: Mutex::new(HashMap::new()),
                })
            })
            .as_ref()
            .map_err(|e| transport(format!("cannot start the HTTP client: {e}")))
    }

    /// Checks `request` against the grant and makes it ready to send.
    fn prepare(
        &self,
        request: GuestRequest,
        body: Option<Vec<u8>>,
        allowed: &[String],
        max_body_bytes: u64,
    ) -> Result<(tokio::runtime::Handle, Fetch), CallError> {
        let url = Url::parse(&request.url).map_err(|e| CallError::HttpDenied {
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
        let method = reqwest::Method::from_bytes(
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
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(CallError::HttpDenied {
                    url: request.url.clone(),
                    reason: format!("the header `{name}` is set by the agent, not by plug-ins"),
                });
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| transport(format!("the value of header `{name}` is not valid")))?;
            headers.append(name, value);
        }
        let client = self.client()?;
        let runtime = client
            .runtime
            .as_ref()
            .ok_or_else(|| transport("the HTTP client is shut down"))?
            .handle()
            .clone();
        let http = client.for_grant(allowed)?;
        Ok((
            runtime,
            Fetch {
                http,
                method,
                url,
                headers,
                body,
                allowed: allowed.to_vec(),
                max_body_bytes,
            },
        ))
    }

    /// Performs `request` if every hop is allowed, within `remaining`, while this thread
    /// waits (a blocking call's worker).
    pub(crate) fn send(
        &self,
        request: GuestRequest,
        body: Option<Vec<u8>>,
        allowed: &[String],
        max_body_bytes: u64,
        remaining: Duration,
        timeout: Duration,
    ) -> Result<GuestResponse, CallError> {
        let (runtime, fetch) = self.prepare(request, body, allowed, max_body_bytes)?;
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        let task = runtime.spawn(async move {
            let _ = answer.send(fetch.run().await);
        });
        let outcome = match answered.recv_timeout(remaining) {
            Ok(outcome) => outcome,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(CallError::Timeout { limit: timeout })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(transport("the request task failed"))
            }
        };
        task.abort();
        outcome
    }

    /// As [`send`](Self::send), awaited: a suspendable call's wait. Dropping the future
    /// abandons the request.
    pub(crate) async fn send_async(
        &self,
        request: GuestRequest,
        body: Option<Vec<u8>>,
        allowed: &[String],
        max_body_bytes: u64,
        remaining: Duration,
        timeout: Duration,
    ) -> Result<GuestResponse, CallError> {
        let (runtime, fetch) = self.prepare(request, body, allowed, max_body_bytes)?;
        // The deadline is kept on the HTTP runtime: the waiting worker runs none.
        let mut task =
            runtime.spawn(async move { tokio::time::timeout(remaining, fetch.run()).await });
        let outcome = match (&mut task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(CallError::Timeout { limit: timeout }),
            Err(e) => Err(transport(format!("the request task failed: {e}"))),
        };
        task.abort();
        outcome
    }
}

/// A checked request, owned, ready to run on the HTTP runtime.
struct Fetch {
    http: reqwest::Client,
    method: reqwest::Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
    allowed: Vec<String>,
    max_body_bytes: u64,
}

impl Fetch {
    /// Sends the request, following allowed redirects by hand, and reads the body
    /// within its cap.
    async fn run(self) -> Result<GuestResponse, CallError> {
        let Self {
            http,
            mut method,
            mut url,
            mut headers,
            mut body,
            allowed,
            max_body_bytes,
        } = self;
        for _ in 0..=MAX_REDIRECTS {
            let mut builder = http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(bytes) = &body {
                builder = builder.body(bytes.clone());
            }
            let mut response = builder.send().await.map_err(|e| {
                let chain = error_chain(&e);
                if chain.contains(NOT_REACHABLE) {
                    CallError::HttpDenied {
                        url: url.to_string(),
                        reason: format!("HTTP request to {url} is not allowed: {chain}"),
                    }
                } else {
                    transport(chain)
                }
            })?;
            let status = response.status();
            if status.is_redirection()
                && let Some(location) = response.headers().get(LOCATION)
            {
                let next = location
                    .to_str()
                    .ok()
                    .and_then(|l| url.join(l).ok())
                    .ok_or_else(|| transport("a redirect's Location is not a URL"))?;
                check_host(&next, &allowed).map_err(|reason| CallError::HttpDenied {
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
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
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
