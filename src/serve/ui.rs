//! The web dashboard's static assets, compiled into the binary.
//!
//! In: a request path of `ferry serve`'s HTTP server. Out: the content type
//! and bytes of `ui/index.html`, `ui/app.js` or `ui/style.css`, or `None`
//! for any other path. The dashboard is hand-written HTML, CSS and vanilla
//! JavaScript over the API of docs/API.md, so building ferry needs no
//! JavaScript toolchain, and it loads nothing from outside the daemon.
//! [`routes`] serves them without the API's bearer token: they hold no data
//! (the page asks for the token when the API refuses it).

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The asset served at `path` (a request path without query): its content
/// type and bytes.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/" | "/index.html" => Some((HTML, INDEX_HTML.as_bytes())),
        "/app.js" => Some((JAVASCRIPT, APP_JS.as_bytes())),
        "/style.css" => Some((CSS, STYLE_CSS.as_bytes())),
        _ => None,
    }
}

/// `GET /`, `/index.html`, `/app.js` and `/style.css`.
pub fn routes() -> Router {
    Router::new()
        .route("/", get(serve_asset))
        .route("/index.html", get(serve_asset))
        .route("/app.js", get(serve_asset))
        .route("/style.css", get(serve_asset))
}

async fn serve_asset(uri: Uri) -> Response {
    match asset(uri.path()) {
        Some((content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, content_type),
                // A new ferry binary serves new assets under the same names.
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(path: &str) -> &'static str {
        let (_, bytes) = asset(path).unwrap_or_else(|| panic!("no asset at {path}"));
        std::str::from_utf8(bytes).expect("utf-8 asset")
    }

    #[test]
    fn serves_the_three_assets_by_path() {
        assert_eq!(asset("/").map(|a| a.0), Some(HTML));
        assert_eq!(asset("/index.html"), asset("/"));
        assert_eq!(asset("/app.js").map(|a| a.0), Some(JAVASCRIPT));
        assert_eq!(asset("/style.css").map(|a| a.0), Some(CSS));
        for path in [
            "",
            "/api/v1/tasks",
            "/app.js/",
            "/../Cargo.toml",
            "/ui/app.js",
            "/APP.JS",
        ] {
            assert_eq!(asset(path), None, "{path:?}");
        }
    }

    #[test]
    fn the_page_loads_its_script_and_stylesheet_from_the_daemon_only() {
        let index = text("/");
        assert!(
            index.contains(r#"src="/app.js""#),
            "index.html loads app.js"
        );
        assert!(
            index.contains(r#"href="/style.css""#),
            "index.html loads style.css"
        );
        for asset_path in ["/", "/app.js", "/style.css"] {
            let body = text(asset_path);
            for external in [
                "src=\"http",
                "href=\"http",
                "src=\"//",
                "href=\"//",
                "@import",
                "url(http",
            ] {
                assert!(!body.contains(external), "{asset_path} loads {external}...");
            }
        }
    }

    /// Server text reaches the page through `textContent` only: no HTML is
    /// parsed from strings anywhere in the script.
    #[test]
    fn the_script_never_parses_html_from_strings() {
        let script = text("/app.js");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!script.contains(sink), "app.js uses {sink}");
        }
    }
}
