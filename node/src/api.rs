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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use alliance_protocol::Signed;
use alliance_protocol::armor::{self, Label};
use alliance_protocol::cert::Revocations;
use anyhow::{Context, anyhow, bail};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::jobs::{Jobs, JobsError};
use crate::net::actor::{Client, Stopped};

/// What the API handlers reach.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub client: Client,
    /// The job scheduler, on nodes with the submit role.
    pub jobs: Option<Jobs>,
    /// The worker, on nodes that lend GPUs.
    pub worker: Option<crate::worker::Worker>,
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

fn jobs_of(s: &ApiState) -> Result<Jobs, ApiError> {
    s.jobs.clone().ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "this node's certificate lacks the submit role: it cannot submit jobs".into(),
        )
    })
}

fn body_json(body: &str) -> Result<serde_json::Value, ApiError> {
    serde_json::from_str(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })
}

async fn worker_stats(State(s): State<ApiState>) -> Answer {
    let w = s.worker.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this node lends no GPU (its certificate lacks the work role, or it found no GPU)"
                .into(),
        )
    })?;
    Ok(Json(json!(w.stats())))
}

async fn submit(State(s): State<ApiState>, body: String) -> Answer {
    let jobs = jobs_of(&s)?;
    let v = body_json(&body)?;
    let file = v["file"].as_str().ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "give the job file as {\"file\": \"/absolute/path/job.toml\"}".into(),
        )
    })?;
    let path = std::path::PathBuf::from(file);
    if !path.is_absolute() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{file} is not an absolute path"),
        ));
    }
    let limits = s.limits.clone();
    let submitted = tokio::task::spawn_blocking(move || jobs.submit(&path, &limits))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!(submitted)))
}

async fn job_list(State(s): State<ApiState>) -> Answer {
    Ok(Json(json!(jobs_of(&s)?.list()?)))
}

async fn reputation(State(s): State<ApiState>) -> Answer {
    let (workers, institutions) = jobs_of(&s)?.reputation();
    Ok(Json(
        json!({ "workers": workers, "institutions": institutions }),
    ))
}

async fn job_detail(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    Ok(Json(json!(jobs_of(&s)?.detail(&id)?)))
}

/// `?secs=N`: how long to wait for a job to end.
#[derive(Debug, serde::Deserialize)]
struct Patience {
    secs: Option<u64>,
}

async fn job_end(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<Patience>,
) -> Answer {
    // Below the client's read timeout.
    let patience = Duration::from_secs(q.secs.unwrap_or(25).min(25));
    Ok(Json(json!(jobs_of(&s)?.wait_end(&id, patience).await?)))
}

async fn job_cancel(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    Ok(Json(json!(jobs_of(&s)?.cancel(&id)?)))
}

async fn job_export(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: String,
) -> Answer {
    let jobs = jobs_of(&s)?;
    let v = body_json(&body)?;
    let out = v["out"]
        .as_str()
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "give the output directory as {\"out\": \"/absolute/dir\"}".into(),
            )
        })?;
    let concat = v["concat"].as_bool().unwrap_or(false);
    let files = tokio::task::spawn_blocking(move || jobs.export(&id, &out, concat))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!({ "files": files })))
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

async fn status(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.status().await?)))
}

async fn peers(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.peers().await?)))
}

async fn gpus(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.gpus().await?)))
}

async fn credits(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.credits().await?)))
}

async fn metrics(State(c): State<Client>) -> Result<Response, ApiError> {
    let text = c.metrics().await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// `?gpu=N` names one GPU; without it, every GPU.
#[derive(Debug, serde::Deserialize)]
struct GpuChoice {
    gpu: Option<usize>,
}

async fn pause(s: State<ApiState>, q: axum::extract::Query<GpuChoice>) -> Answer {
    set_paused(s, q, true).await
}

async fn resume(s: State<ApiState>, q: axum::extract::Query<GpuChoice>) -> Answer {
    set_paused(s, q, false).await
}

async fn set_paused(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<GpuChoice>,
    paused: bool,
) -> Answer {
    match &s.worker {
        Some(w) => w
            .set_paused(q.gpu, paused)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?,
        // A node that runs no worker still shows its pause in its advert.
        None if q.gpu.is_none() => s.client.set_paused(paused).await?,
        None => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "this node lends no GPU".into(),
            ));
        }
    }
    Ok(Json(json!({ "paused": paused, "gpu": q.gpu })))
}

async fn revocations(State(c): State<Client>, body: String) -> Answer {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let blocks =
        armor::decode(&body).map_err(|e| bad(format!("not a revocation list file: {e}")))?;
    let mut applied = 0;
    for (label, bytes) in blocks {
        if label != Label::Revocations {
            return Err(bad(format!(
                "the body holds a {}, not a revocation list",
                label.as_str()
            )));
        }
        let list = Signed::<Revocations>::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        c.revoke(list).await?.map_err(bad)?;
        applied += 1;
    }
    Ok(Json(json!({ "applied": applied })))
}

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

/// The address of the node running on `data_dir`, from its address file.
pub fn address(data_dir: &Path) -> anyhow::Result<SocketAddr> {
    let path = data_dir.join(ADDR_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow!(
            "no node is running on {}: start one with `alliance node run --data-dir {}`",
            data_dir.display(),
            data_dir.display()
        )
    })?;
    text.trim()
        .parse()
        .with_context(|| format!("{} is damaged", path.display()))
}

/// One request to the API; returns the JSON answer or the API's error.
pub fn request(
    data_dir: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<serde_json::Value> {
    let addr = address(data_dir)?;
    let token_path = data_dir.join(TOKEN_FILE);
    let token = std::fs::read_to_string(&token_path).with_context(|| {
        format!(
            "cannot read the node's API token {} (run this as the user the node runs as)",
            token_path.display()
        )
    })?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|_| {
        anyhow!(
            "no node answers at {addr} (from {}): start one with `alliance node run --data-dir {}`",
            data_dir.join(ADDR_FILE).display(),
            data_dir.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        token.trim(),
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.take(64 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("the node sent a malformed answer"))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let value: serde_json::Value = serde_json::from_str(body)
        .with_context(|| format!("the node answered {code} with non-JSON"))?;
    if !(200..300).contains(&code) {
        bail!(
            "the node refused: {}",
            value["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(value)
}
