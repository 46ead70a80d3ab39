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

use super::{Answer, ApiError, ApiState, jobs_of};

pub(super) async fn worker_stats(State(s): State<ApiState>) -> Answer {
    let w = s.worker.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this node lends no GPU (its certificate lacks the work role, or it found no GPU)"
                .into(),
        )
    })?;
    Ok(Json(json!(w.stats())))
}

pub(super) async fn reputation(State(s): State<ApiState>) -> Answer {
    let (workers, institutions) = jobs_of(&s)?.reputation();
    Ok(Json(
        json!({ "workers": workers, "institutions": institutions }),
    ))
}

pub(super) async fn status(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.status().await?)))
}

pub(super) async fn peers(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.peers().await?)))
}

pub(super) async fn gpus(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.gpus().await?)))
}

pub(super) async fn credits(State(c): State<Client>) -> Answer {
    Ok(Json(json!(c.credits().await?)))
}

pub(super) async fn metrics(State(c): State<Client>) -> Result<Response, ApiError> {
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
pub(super) struct GpuChoice {
    gpu: Option<usize>,
}

pub(super) async fn pause(s: State<ApiState>, q: axum::extract::Query<GpuChoice>) -> Answer {
    set_paused(s, q, true).await
}

pub(super) async fn resume(s: State<ApiState>, q: axum::extract::Query<GpuChoice>) -> Answer {
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

pub(super) async fn revocations(State(c): State<Client>, body: String) -> Answer {
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
