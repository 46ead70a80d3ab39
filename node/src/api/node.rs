//! This node's resources: `/v1/status`, `/v1/peers`, `/v1/gpus`,
//! `/v1/credits`, `/v1/reputation`, `/v1/worker` (with pause and resume),
//! `/v1/revocations`, `/v1/capacity` and `/metrics`.

use crate::net::actor::{AdvertView, Client, PeerView, Status};
use crate::trust::credits::Balance;
use crate::trust::reputation::{InstitutionView, WorkerView};
use alliance_protocol::Signed;
use alliance_protocol::armor::{self, Label};
use alliance_protocol::cert::Revocations;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::jobs::jobs_of;
use super::{ApiError, ApiState, Caller, Typed, admin_only};
use crate::submit::JobState;
use axum::extract::Extension;

/// The worker: its GPUs, offers accepted and declined, tasks run.
#[utoipa::path(get, path = "/v1/worker", tag = "node", responses((status = 200, body = crate::work::Stats), (status = 404, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn worker_stats(State(s): State<ApiState>) -> Typed<crate::work::Stats> {
    let w = s.worker.as_ref().ok_or_else(|| {
        ApiError::of(
            StatusCode::NOT_FOUND,
            "this node lends no GPU (its certificate lacks the work role, or it found no GPU)",
        )
    })?;
    Ok(Json(w.stats()))
}

/// Every worker's and institution's standing.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Standing {
    workers: Vec<WorkerView>,
    institutions: Vec<InstitutionView>,
}

/// What this node verified of each worker and institution.
#[utoipa::path(get, path = "/v1/reputation", tag = "node", responses((status = 200, body = Standing), (status = 403, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn reputation(State(s): State<ApiState>) -> Typed<Standing> {
    let (workers, institutions) = jobs_of(&s)?.reputation();
    Ok(Json(Standing {
        workers,
        institutions,
    }))
}

/// This node: PeerId, alliance, institution, addresses, NAT status, peers.
#[utoipa::path(get, path = "/v1/status", tag = "node", responses((status = 200, body = Status), (status = 401, body = super::ErrorBody)))]
pub(super) async fn status(State(c): State<Client>) -> Typed<Status> {
    Ok(Json(c.status().await?))
}

/// The verified members this node is connected to.
#[utoipa::path(get, path = "/v1/peers", tag = "node", responses((status = 200, body = Vec<PeerView>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn peers(State(c): State<Client>) -> Typed<Vec<PeerView>> {
    Ok(Json(c.peers().await?))
}

/// The live advert table: every GPU the alliance lends.
#[utoipa::path(get, path = "/v1/gpus", tag = "node", responses((status = 200, body = Vec<AdvertView>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn gpus(State(c): State<Client>) -> Typed<Vec<AdvertView>> {
    Ok(Json(c.gpus().await?))
}

/// Each institution's account of GPU time given and taken.
#[utoipa::path(get, path = "/v1/credits", tag = "node", responses((status = 200, body = Vec<Balance>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn credits(State(c): State<Client>) -> Typed<Vec<Balance>> {
    Ok(Json(c.credits().await?))
}

/// Counters in the Prometheus text format (no token needed).
#[utoipa::path(get, path = "/metrics", tag = "node", responses((status = 200, content_type = "text/plain", body = String)))]
pub(super) async fn metrics(State(s): State<ApiState>) -> Result<Response, ApiError> {
    if let Some(jobs) = &s.jobs {
        for (state, n) in jobs.count_by_state()? {
            let label = match state {
                JobState::Active => "active",
                JobState::Done => "done",
                JobState::Failed => "failed",
                JobState::Cancelled => "cancelled",
            };
            s.metrics
                .jobs
                .get_or_create(&crate::metrics::State { state: label })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    let text = s.client.metrics().await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The alliance's lent GPUs by state over the last day, ending now.
#[utoipa::path(get, path = "/v1/capacity", tag = "node", responses((status = 200, body = super::capacity::History), (status = 401, body = super::ErrorBody)))]
pub(super) async fn capacity(State(s): State<ApiState>) -> Typed<super::capacity::History> {
    let now = super::capacity::Sample::of(&s.client.gpus().await?, crate::net::actor::now_us());
    Ok(Json(s.capacity.history(now)))
}

/// `?gpu=N` names one GPU; without it, every GPU.
#[derive(Debug, serde::Deserialize)]
pub(super) struct GpuChoice {
    gpu: Option<usize>,
}

/// Admin: stop lending this node's GPUs (`?gpu=N`: one).
#[utoipa::path(post, path = "/v1/worker/pause", tag = "node", params(("gpu" = Option<usize>, Query)), responses((status = 200, body = Paused), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn pause(
    s: State<ApiState>,
    Extension(c): Extension<Caller>,
    q: axum::extract::Query<GpuChoice>,
) -> Typed<Paused> {
    admin_only(&c)?;
    set_paused(s, q, true).await
}

/// Admin: lend this node's GPUs again (`?gpu=N`: one).
#[utoipa::path(post, path = "/v1/worker/resume", tag = "node", params(("gpu" = Option<usize>, Query)), responses((status = 200, body = Paused), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn resume(
    s: State<ApiState>,
    Extension(c): Extension<Caller>,
    q: axum::extract::Query<GpuChoice>,
) -> Typed<Paused> {
    admin_only(&c)?;
    set_paused(s, q, false).await
}

pub(super) async fn set_paused(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<GpuChoice>,
    paused: bool,
) -> Typed<Paused> {
    match &s.worker {
        Some(w) => w
            .set_paused(q.gpu, paused)
            .map_err(|e| ApiError::of(StatusCode::BAD_REQUEST, e))?,
        // A node that runs no worker still shows its pause in its advert.
        None if q.gpu.is_none() => s.client.set_paused(paused).await?,
        None => {
            return Err(ApiError::of(
                StatusCode::BAD_REQUEST,
                "this node lends no GPU",
            ));
        }
    }
    Ok(Json(Paused { paused, gpu: q.gpu }))
}

/// What a pause or resume set.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Paused {
    paused: bool,
    /// The GPU it set; none: every GPU.
    gpu: Option<usize>,
}

/// How many revocation lists were applied.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Applied {
    applied: usize,
}

/// Admin: apply and gossip a revocation list (the body is the armored file).
#[utoipa::path(post, path = "/v1/revocations", tag = "node", request_body(content = String, content_type = "text/plain"), responses((status = 200, body = Applied), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn revocations(
    State(c): State<Client>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Typed<Applied> {
    admin_only(&caller)?;
    let bad = |m: String| ApiError::of(StatusCode::BAD_REQUEST, m);
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
    Ok(Json(Applied { applied }))
}
