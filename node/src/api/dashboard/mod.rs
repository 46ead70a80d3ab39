//! The dashboard: a few static files built into the binary (no CDN, no
//! separate server) that log in with an API token and draw this node, the
//! alliance, jobs, reputation and credits from the same `/v1` routes
//! everyone else calls, polling them every two seconds.
//!
//! The pages build every element with the DOM's own calls (never from
//! HTML strings: institution, job and user names come from others), and
//! the files are served under a policy that lets them load nothing but
//! themselves.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// One built-in file: its path under `/ui/`, type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: "text/html; charset=utf-8",
        body: include_str!("assets/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/style.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("assets/icon.svg"),
    },
];

/// Scripts, styles, images and requests from the node itself only; no
/// framing (the pages hold a token).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn serve(asset: &'static Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, asset.content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The files change with the binary: always ask again.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        asset.body,
    )
        .into_response()
}

/// `/` sends the browser to `/ui/`, where the files are.
pub(super) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new().route("/", get(|| async { Redirect::to("/ui/") }));
    for asset in ASSETS {
        r = r.route(
            &format!("/ui/{}", asset.name),
            get(move || async move { serve(asset) }),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_names_is_served() {
        let index = ASSETS[0].body;
        for asset in &ASSETS[1..] {
            assert!(
                index.contains(&format!("/ui/{}", asset.name)),
                "index.html does not load /ui/{}",
                asset.name
            );
        }
    }

    #[test]
    fn the_pages_never_parse_html_from_strings() {
        // Names in the pages come from other users and other institutions:
        // text goes in through textContent, never as markup.
        let app = ASSETS[1].body;
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!app.contains(sink), "app.js uses {sink}");
        }
    }
}
