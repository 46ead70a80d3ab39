//! `/v1/jobs…`: submitting a job, listing, one job's detail, waiting for
//! its end, cancelling, exporting its outputs.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use crate::submit::Jobs;

use super::{Answer, ApiError, ApiState, body_json};

pub(super) fn jobs_of(s: &ApiState) -> Result<Jobs, ApiError> {
    s.jobs.clone().ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "this node's certificate lacks the submit role: it cannot submit jobs".into(),
        )
    })
}

pub(super) async fn submit(State(s): State<ApiState>, body: String) -> Answer {
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
    let submitted = tokio::task::spawn_blocking(move || jobs.submit_file(&path, &limits))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(json!(submitted)))
}

pub(super) async fn job_list(State(s): State<ApiState>) -> Answer {
    Ok(Json(json!(jobs_of(&s)?.list()?)))
}

pub(super) async fn job_detail(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    Ok(Json(json!(jobs_of(&s)?.detail(&id)?)))
}

/// `?secs=N`: how long to wait for a job to end.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Patience {
    secs: Option<u64>,
}

pub(super) async fn job_end(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<Patience>,
) -> Answer {
    // Below the client's read timeout.
    let patience = Duration::from_secs(q.secs.unwrap_or(25).min(25));
    Ok(Json(json!(jobs_of(&s)?.wait_end(&id, patience).await?)))
}

pub(super) async fn job_cancel(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    Ok(Json(json!(jobs_of(&s)?.cancel(&id)?)))
}

pub(super) async fn job_export(
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
