//! This node's resources: `/v1/status`, `/v1/peers`, `/v1/gpus`,
//! `/v1/credits`, `/v1/reputation`, `/v1/worker` (with pause and resume),
//! `/v1/revocations`, and `/metrics`.

use alliance_protocol::Signed;
use alliance_protocol::armor::{self, Label};
use alliance_protocol::cert::Revocations;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::net::actor::Client;

use super::jobs::jobs_of;
use super::{Answer, ApiError, ApiState, Caller, admin_only};
use crate::submit::JobState;
use axum::extract::Extension;

/// The worker: its GPUs, offers accepted and declined, tasks run.
#[utoipa::path(get, path = "/v1/worker", tag = "node", responses((status = 200, body = Object), (status = 404, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn worker_stats(State(s): State<ApiState>) -> Answer {
    let w = s.worker.as_ref().ok_or_else(|| {
        ApiError::of(
            StatusCode::NOT_FOUND,
            "this node lends no GPU (its certificate lacks the work role, or it found no GPU)",
        )
    })?;
    Ok(Json(json!(w.stats())))
}

/// What this node verified of each worker and institution.
#[utoipa::path(get, path = "/v1/reputation", tag = "node", responses((status = 200, body = Object), (status = 401, body = super::ErrorBody)))]
pub(super) async fn reputation(State(s): State<ApiState>) -> Answer {
    let (workers, institutions) = jobs_of(&s)?.reputation();
    Ok(Json(
        json!({ "workers": workers, "institutions": institutions }),
    ))
}

/// This node: PeerId, alliance, institution, addresses, NAT status, peers.
#[utoipa::path(get, path = "/v1/status", tag = "node", responses((status = 200, body = Object), (status = 401, body = super::ErrorBody)))]
pub(super) async fn status(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.status().await?)))
}

/// The verified members this node is connected to.
#[utoipa::path(get, path = "/v1/peers", tag = "node", responses((status = 200, body = Vec<Object>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn peers(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.peers().await?)))
}

/// The live advert table: every GPU the alliance lends.
#[utoipa::path(get, path = "/v1/gpus", tag = "node", responses((status = 200, body = Vec<Object>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn gpus(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.gpus().await?)))
}

/// Each institution's account of GPU time given and taken.
#[utoipa::path(get, path = "/v1/credits", tag = "node", responses((status = 200, body = Vec<Object>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn credits(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.credits().await?)))
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

/// `?gpu=N` names one GPU; without it, every GPU.
#[derive(Debug, serde::Deserialize)]
pub(super) struct GpuChoice {
    gpu: Option<usize>,
}

/// Admin: stop lending this node's GPUs (`?gpu=N`: one).
#[utoipa::path(post, path = "/v1/worker/pause", tag = "node", params(("gpu" = Option<usize>, Query)), responses((status = 200, body = Object), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn pause(
    s: State<ApiState>,
    Extension(c): Extension<Caller>,
    q: axum::extract::Query<GpuChoice>,
) -> Answer {
    admin_only(&c)?;
    set_paused(s, q, true).await
}

/// Admin: lend this node's GPUs again (`?gpu=N`: one).
#[utoipa::path(post, path = "/v1/worker/resume", tag = "node", params(("gpu" = Option<usize>, Query)), responses((status = 200, body = Object), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn resume(
    s: State<ApiState>,
    Extension(c): Extension<Caller>,
    q: axum::extract::Query<GpuChoice>,
) -> Answer {
    admin_only(&c)?;
    set_paused(s, q, false).await
}

pub(super) async fn set_paused(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<GpuChoice>,
    paused: bool,
) -> Answer {
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
    Ok(Json(json!({ "paused": paused, "gpu": q.gpu })))
}

/// Admin: apply and gossip a revocation list (the body is the armored file).
#[utoipa::path(post, path = "/v1/revocations", tag = "node", request_body(content = String, content_type = "text/plain"), responses((status = 200, body = Object), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody), (status = 401, body = super::ErrorBody)))]
pub(super) async fn revocations(
    State(c): State<Client>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Answer {
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
    Ok(Json(json!({ "applied": applied })))
}
