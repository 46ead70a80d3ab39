//! The node's local HTTP API (127.0.0.1 only), and the small client the
//! CLI uses to read it.
//!
//! Paths are versioned (`/v1/…`), bodies are JSON, and every error is a
//! JSON object `{"error": "…"}` that says what went wrong.
//!
//! Loopback is shared by every user of the machine, so each `/v1` request
//! must carry the token the node writes at start to `api.token` in its data
//! directory (mode 0600, readable only by the node's user) as
//! `Authorization: Bearer <token>`. Without it, another user of a lab
//! machine could pause the node, or submit a job whose input is a file only
//! the node's user may read. `GET /metrics` needs no token.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/status` | PeerId, alliance, institution, listen and external addresses, NAT status, peers, rejections |
//! | `GET /v1/peers` | verified, connected members |
//! | `GET /v1/gpus` | the live advert table |
//! | `GET /v1/worker` | the worker's GPUs and counts: offers accepted and declined, tasks run, input blobs fetched and reused |
//! | `POST /v1/worker/pause`, `POST /v1/worker/resume` | stop or start lending this node's GPUs (`?gpu=N`: one GPU); a pause hands back the tasks they hold |
//! | `POST /v1/revocations` | apply and gossip a revocation list (body: the armored file) |
//! | `POST /v1/jobs` | submit a job: `{"file": "/abs/path/job.toml"}` → `{"id": …}` |
//! | `GET /v1/jobs` | this node's jobs with their progress and why tasks wait |
//! | `GET /v1/jobs/ID` | one job: every task's state, replicas, workers, timings, failures |
//! | `GET /v1/jobs/ID/end?secs=N` | the job's summary once it has ended, or after N seconds (at most 25) if it has not |
//! | `POST /v1/jobs/ID/cancel` | stop offering the job's tasks |
//! | `POST /v1/jobs/ID/export` | write verified outputs as `.npy`: `{"out": "/abs/dir", "concat": false}` |
//! | `GET /metrics` | traffic counters in the Prometheus text format |

//!
//! The server's routes live by resource: [`jobs`] (a researcher's jobs),
//! [`node`] (this node, its peers, GPUs, credits, reputation, the worker);
//! [`client`] is what the CLI uses to call them.

mod client;
mod jobs;
mod node;

pub use client::{address, request};
use jobs::{job_cancel, job_detail, job_end, job_export, job_list, jobs_of, submit};
use node::{
    credits, gpus, metrics, pause, peers, reputation, resume, revocations, status, worker_stats,
};

use std::io::Write;
use std::path::Path;

use anyhow::{Context, anyhow};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::net::actor::{Client, Stopped};
use crate::submit::{Jobs, JobsError};

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
    /// The secret every `/v1` request must carry.
    pub token: String,
}

impl axum::extract::FromRef<ApiState> for Client {
    fn from_ref(s: &ApiState) -> Client {
        s.client.clone()
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        let code = match e {
            JobsError::Refused(_) => StatusCode::BAD_REQUEST,
            JobsError::NotFound(_) => StatusCode::NOT_FOUND,
            JobsError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

fn body_json(body: &str) -> Result<serde_json::Value, ApiError> {
    serde_json::from_str(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })
}

/// The file in the data directory that holds the API's address.
pub const ADDR_FILE: &str = "api.addr";

/// The file in the data directory that holds the API's token.
pub const TOKEN_FILE: &str = "api.token";

/// Writes a fresh token to `data_dir/api.token`, mode 0600; returns it.
pub fn new_token(data_dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow!("no randomness from the system: {e}"))?;
    let token = hex::encode(raw);
    let path = data_dir.join(TOKEN_FILE);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    Ok(token)
}

async fn authorize(
    State(s): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        // Compared in constant time: the token is a secret.
        g.len() == s.token.len()
            && g.bytes()
                .zip(s.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        next.run(request).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "this request needs the node's API token (the {TOKEN_FILE} file in its data directory, readable by the node's user); the alliance command sends it when run as that user"
            ),
        )
        .into_response()
    }
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<Stopped> for ApiError {
    fn from(e: Stopped) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

type Answer = Result<Json<serde_json::Value>, ApiError>;

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint: try GET /v1/status, /v1/peers, /v1/gpus or /v1/jobs".into(),
    )
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/worker", get(worker_stats))
        .route("/v1/jobs", post(submit).get(job_list))
        .route("/v1/jobs/{id}", get(job_detail))
        .route("/v1/jobs/{id}/end", get(job_end))
        .route("/v1/jobs/{id}/cancel", post(job_cancel))
        .route("/v1/jobs/{id}/export", post(job_export))
        .route("/v1/reputation", get(reputation))
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/gpus", get(gpus))
        .route("/v1/credits", get(credits))
        .route("/v1/worker/pause", post(pause))
        .route("/v1/worker/resume", post(resume))
        .route("/v1/revocations", post(revocations))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ));
    v1.route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}
