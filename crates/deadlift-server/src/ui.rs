//! The web console at `/ui`: three committed files (HTML, one script, one stylesheet),
//! compiled into the binary and served as they are. The console is a client of the `/v1`
//! API with the signed-in person's token, so it can see exactly what that token can and
//! nothing more; this module only serves the files, under a Content-Security-Policy that
//! allows nothing from elsewhere and no inline script (what the console shows is other
//! organisations' data).

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::AgentState;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/console.js");
const STYLE: &str = include_str!("ui/console.css");

const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
    script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub(super) fn routes() -> Router<AgentState> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/console.js", get(script))
        .route("/ui/console.css", get(style))
        // The console navigates by `#` fragments; any other path under it is the page.
        .route("/ui/{*page}", get(index))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small files; the browser asks again (and the binary's files change with it).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// The console's page (it signs in with a token and calls the `/v1` API).
#[utoipa::path(get, path = "/ui", tag = "console",
    responses((status = 200, description = "The console's HTML page", content_type = "text/html", body = String)))]
pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

#[utoipa::path(get, path = "/ui/console.js", tag = "console",
    responses((status = 200, description = "The console's script", content_type = "text/javascript", body = String)))]
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

#[utoipa::path(get, path = "/ui/console.css", tag = "console",
    responses((status = 200, description = "The console's stylesheet", content_type = "text/css", body = String)))]
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
