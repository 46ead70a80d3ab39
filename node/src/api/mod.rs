//! The node's HTTP API: what researchers, the CLI and the dashboard call.
//!
//! Paths are versioned (`/v1/…`), bodies are JSON unless they carry bytes
//! (blobs up, `.npy` results down), and every error has one shape:
//! `{"error": {"code": "…", "message": "…", "hint": "…"}}`.
//!
//! Every `/v1` request carries a user's token as `Authorization: Bearer
//! <token>` ([`users`]): the node's own token (written at start to
//! `api.token` in its data directory, mode 0600) is the admin `node`;
//! `alliance user add` makes more. A user sees and acts on only their own
//! jobs; an admin on all, and alone may pause the worker, apply
//! revocations and manage users. `GET /metrics` needs no token.
//!
//! | method and path | answer |
//! |---|---|
//! | `PUT /v1/blobs/HASH` | upload a file a job names, by its BLAKE3; `Content-Range` resumes one cut short |
//! | `GET /v1/blobs/HASH` | how much of an upload arrived |
//! | `DELETE /v1/blobs/HASH` | stop holding an upload, freeing the caller's stored bytes |
//! | `POST /v1/jobs` | submit `{"job": "<TOML>", "files": {"name": "HASH"}}` → the job's summary |
//! | `GET /v1/jobs?limit=N&after=ID` | the caller's jobs (an admin's: all), newest first, a page at a time |
//! | `GET /v1/jobs/ID` | one job: every task's state, replicas, workers, timings, failures |
//! | `GET /v1/jobs/ID/end?secs=N` | the job's summary once it has ended, or after N seconds (at most 25) |
//! | `GET /v1/jobs/ID/events` | the job's changes as server-sent events, until it ends |
//! | `GET /v1/jobs/ID/outputs/B` | output binding B of every task as one `.npy` (`?task=N`: one task's) |
//! | `POST /v1/jobs/ID/cancel` | stop offering the job's tasks |
//! | `GET /v1/status`, `/v1/peers`, `/v1/gpus`, `/v1/credits`, `/v1/reputation`, `/v1/worker` | this node and the alliance it sees |
//! | `POST /v1/worker/pause`, `POST /v1/worker/resume` | admin: stop or start lending this node's GPUs (`?gpu=N`: one) |
//! | `POST /v1/revocations` | admin: apply and gossip a revocation list (body: the armored file) |
//! | `GET /v1/users`, `POST /v1/users`, `DELETE /v1/users/NAME` | admin: the API's users |
//! | `GET /v1/me` | who the token belongs to, with their usage and limits |
//! | `GET /v1/capacity` | the alliance's lent GPUs by state, every 15 s over the last day |
//! | `GET /metrics` | the node's counters in the Prometheus text format |
//! | `GET /` | the dashboard (a login form that takes a token) |
//!
//! The routes live by resource: [`jobs`] (a researcher's jobs and their
//! results), [`blobs`] (uploads), [`node`] (this node, its peers, GPUs,
//! credits, reputation, the worker), [`users`] (tokens and limits),
//! [`capacity`] (the GPU counts the dashboard charts); [`dashboard`] serves
//! the pages that call them, and [`client`] is what the CLI uses.

mod blobs;
pub mod capacity;
mod client;
mod dashboard;
mod jobs;
mod node;
pub mod tls;
pub mod users;

pub use blobs::Progress as UploadProgress;
pub use client::{Api, Target, address, hash_file, request};
pub use jobs::{JobEvent, NewJob};
pub use users::{Caller, UserLimits, Users};

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use alliance_protocol::Hash;
use anyhow::{Context, anyhow};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;

use crate::net::actor::{Client, Stopped};
use crate::store::blobs::Blobs;
use crate::submit::{FIX, Jobs, JobsError};

/// What the API handlers reach.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub client: Client,
    /// The job scheduler, on nodes with the submit role.
    pub jobs: Option<Jobs>,
    /// The worker, on nodes that lend GPUs.
    pub worker: Option<crate::work::Worker>,
    /// The intake limits jobs are checked against at submission.
    pub limits: alliance_kernels::intake::Limits,
    /// The API's users and their tokens.
    pub users: Users,
    /// Where uploads land: the blob store jobs' inputs are served from.
    pub blobs: Blobs,
    /// Uploads in progress, one at a time per blob.
    pub uploading: Arc<Mutex<HashSet<Hash>>>,
    /// The node's counters (API requests, blob bytes, jobs by state).
    pub metrics: crate::metrics::Metrics,
    /// The alliance's lent GPUs over the last day.
    pub capacity: capacity::Capacity,
}

impl axum::extract::FromRef<ApiState> for Client {
    fn from_ref(s: &ApiState) -> Client {
        s.client.clone()
    }
}

/// The file in the data directory that holds the API's address.
pub const ADDR_FILE: &str = "api.addr";

/// The file in the data directory that holds the API's URL.
pub const URL_FILE: &str = "api.url";

/// The copy of the API's TLS certificate in the data directory, which the
/// commands on the node's machine trust.
pub const CERT_FILE: &str = "api.crt.pem";

/// The file in the data directory that holds the API's token.
pub const TOKEN_FILE: &str = "api.token";

/// Writes a fresh token to `data_dir/api.token`, mode 0600; returns it.
pub fn new_token(data_dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let token = users::fresh_token()?;
    let path = data_dir.join(TOKEN_FILE);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(token.as_bytes())
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(token)
}

/// An error as every route answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, as a code programs can match, a message people read,
/// and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub hint: String,
}

/// A refused request: its status and [`ErrorDetail`].
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    hint: String,
}

impl ApiError {
    /// An error with its own code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            hint: String::new(),
        }
    }

    /// An error whose code follows from its status.
    pub fn of(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status.as_u16() {
            400 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            409 => "conflict",
            413 => "too_large",
            503 => "unavailable",
            507 => "disk_full",
            _ => "internal",
        };
        Self::new(status, code, message)
    }

    /// What to do about it.
    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let hint = if self.hint.is_empty() {
            default_hint(self.status).to_owned()
        } else {
            self.hint
        };
        (
            self.status,
            Json(ErrorBody {
                error: ErrorDetail {
                    code: self.code.into(),
                    message: self.message,
                    hint,
                },
            }),
        )
            .into_response()
    }
}

fn default_hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "fix the request as the message says; JOBS.md documents every field of a job",
        401 => {
            "send Authorization: Bearer <token>: your own (an admin makes one with `alliance user add NAME`), or the node's, in the api.token file of its data directory"
        }
        403 => "this needs another user's token, or an admin's",
        404 => "check the id or path; GET /v1/jobs lists your jobs",
        409 => "the request conflicts with the state it found; read it again and retry",
        503 => "the node is stopping or restarting; retry in a few seconds",
        507 => "free space in the node's data directory, then retry",
        _ => "the node's log says more",
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        let (status, code) = match &e {
            JobsError::Refused(_) => (StatusCode::BAD_REQUEST, "bad_job"),
            JobsError::NotFound(_) | JobsError::Missing(_) => (StatusCode::NOT_FOUND, "not_found"),
            JobsError::NotReady(_) => (StatusCode::CONFLICT, "not_ready"),
            JobsError::Db(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let text = e.to_string();
        let hint = match &e {
            JobsError::NotReady(_) => {
                "wait for the job (GET /v1/jobs/ID/end or its events), or fetch the tasks that are verified one by one with ?task=N"
            }
            _ => "",
        };
        match text.split_once(FIX) {
            Some((message, fix)) => ApiError::new(status, code, message).hint(fix),
            None => ApiError::new(status, code, text).hint(hint),
        }
    }
}

impl From<Stopped> for ApiError {
    fn from(e: Stopped) -> Self {
        ApiError::of(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

/// A handler's answer whose body has a schema in the OpenAPI document.
type Typed<T> = Result<Json<T>, ApiError>;

fn body_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::of(
            StatusCode::BAD_REQUEST,
            format!("the body is not the JSON this route takes: {e}"),
        )
    })
}

/// A blocking job on its own thread, its panic an internal error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::of(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn not_found() -> ApiError {
    ApiError::of(
        StatusCode::NOT_FOUND,
        "no such endpoint: GET /v1/openapi.json lists them all",
    )
}

/// The API as an OpenAPI 3.1 document, from the handlers' own types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Alliance node API", description = "Submit WGSL jobs with their files, follow them, fetch their results; watch and steer the node."),
    paths(
        users::me, users::list, users::add, users::revoke,
        blobs::upload, blobs::progress, blobs::release,
        jobs::submit, jobs::list, jobs::detail, jobs::end, jobs::events, jobs::cancel, jobs::output,
        node::worker_stats, node::reputation, node::status, node::peers, node::gpus, node::credits, node::capacity,
        node::pause, node::resume, node::revocations, node::metrics,
    ),
    components(schemas(ErrorBody, ErrorDetail, UserLimits, users::UserView, users::NewUser, users::NewToken, users::Revoked, users::Me, UploadProgress, NewJob, JobEvent, jobs::JobPage)),
    modifiers(&BearerAuth),
    security(("token" = [])),
)]
#[derive(Debug)]
pub struct ApiDoc;

/// Every route but `/metrics` and the document itself takes a bearer token.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        // What the token check answers, on every route it guards.
        let unauthorized = ResponseBuilder::new()
            .description("no token, or one this node does not know")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for (path, item) in &mut doc.paths.paths {
            if path == "/metrics" {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .entry("401".into())
                    .or_insert_with(|| unauthorized.clone().into());
            }
        }
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// One route: its path, method and handler, and whether it takes no token.
struct Route {
    path: &'static str,
    /// The method `handler` answers; the handler carries it too, so only
    /// the test that holds the routes against the document reads it.
    #[cfg_attr(not(test), allow(dead_code))]
    method: axum::http::Method,
    handler: axum::routing::MethodRouter<ApiState>,
    open: bool,
}

/// Every route but the OpenAPI document's own, one method each: what
/// [`router`] serves, and what [`ApiDoc`] must describe (a test holds the
/// two together).
fn routes() -> Vec<Route> {
    use axum::http::Method as M;
    use axum::routing::delete;
    let r = |path, method, handler| Route {
        path,
        method,
        handler,
        open: false,
    };
    vec![
        r("/v1/me", M::GET, get(users::me)),
        r("/v1/users", M::GET, get(users::list)),
        r("/v1/users", M::POST, post(users::add)),
        r("/v1/users/{name}", M::DELETE, delete(users::revoke)),
        r("/v1/blobs/{hash}", M::PUT, put(blobs::upload)),
        r("/v1/blobs/{hash}", M::GET, get(blobs::progress)),
        r("/v1/blobs/{hash}", M::DELETE, delete(blobs::release)),
        r("/v1/jobs", M::POST, post(jobs::submit)),
        r("/v1/jobs", M::GET, get(jobs::list)),
        r("/v1/jobs/{id}", M::GET, get(jobs::detail)),
        r("/v1/jobs/{id}/end", M::GET, get(jobs::end)),
        r("/v1/jobs/{id}/events", M::GET, get(jobs::events)),
        r("/v1/jobs/{id}/cancel", M::POST, post(jobs::cancel)),
        r("/v1/jobs/{id}/outputs/{binding}", M::GET, get(jobs::output)),
        r("/v1/worker", M::GET, get(node::worker_stats)),
        r("/v1/reputation", M::GET, get(node::reputation)),
        r("/v1/status", M::GET, get(node::status)),
        r("/v1/peers", M::GET, get(node::peers)),
        r("/v1/gpus", M::GET, get(node::gpus)),
        r("/v1/credits", M::GET, get(node::credits)),
        r("/v1/capacity", M::GET, get(node::capacity)),
        r("/v1/worker/pause", M::POST, post(node::pause)),
        r("/v1/worker/resume", M::POST, post(node::resume)),
        r("/v1/revocations", M::POST, post(node::revocations)),
        Route {
            open: true,
            ..r("/metrics", M::GET, get(node::metrics))
        },
    ]
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let (mut guarded, mut open) = (Router::new(), Router::new());
    for route in routes() {
        if route.open {
            open = open.route(route.path, route.handler);
        } else {
            guarded = guarded.route(route.path, route.handler);
        }
    }
    let guarded = guarded.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        users::authorize,
    ));
    guarded
        .merge(open)
        .route("/v1/openapi.json", get(openapi))
        .merge(dashboard::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        // Uploads stream to disk; JSON bodies are capped by their routes.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Counts every answer by method, route template and status
/// (`alliance_api_requests_total`).
async fn count_requests(
    axum::extract::State(s): axum::extract::State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // A fixed set: a made-up method must not mint a series.
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::POST => "POST",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::HEAD => "HEAD",
        _ => "other",
    }
    .to_owned();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    s.metrics
        .api_requests
        .get_or_create(&crate::metrics::Request {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Refuses a caller who is not an admin.
fn admin_only(c: &Caller) -> Result<(), ApiError> {
    if c.admin {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            format!("user {} is not an admin of this node", c.name),
        )
        .hint("ask the node's admin, or use an admin token (`alliance user add NAME --admin`)"))
    }
}

/// Refuses a caller who may not see job `id`.
fn may_see(jobs: &Jobs, c: &Caller, id: &str) -> Result<(), ApiError> {
    let owner = jobs.owner(id)?;
    if c.admin || owner == c.name {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_your_job",
            format!("job {id} belongs to another user, not to {}", c.name),
        )
        .hint("use the token of the user who submitted it, or an admin's"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_openapi_document_describes_every_route_and_no_other() {
        let doc = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
        let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
        let described: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                methods
                    .iter()
                    .filter(|m| item.get(**m).is_some())
                    .map(move |m| (path.clone(), m.to_uppercase()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = routes()
            .iter()
            .map(|r| (r.path.to_owned(), r.method.to_string()))
            .collect();
        let undocumented: Vec<_> = served.difference(&described).collect();
        let unserved: Vec<_> = described.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "served but not in the document: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "in the document but not served: {unserved:?}"
        );
        // Every response that has a body names a schema.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, response) in op["responses"].as_object().unwrap() {
                    assert!(
                        response.get("content").is_some(),
                        "{method} {path} {status} has no body schema"
                    );
                }
            }
        }
    }
}
