//! `/v1/jobs…`: submitting a job with its files, listing a page of jobs,
//! one job's detail, waiting for its end, its changes as server-sent
//! events, cancelling, and its outputs as `.npy` bodies.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use alliance_protocol::Hash;
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::submit::spec::Uploaded;
use crate::submit::{
    Job, JobDetail, JobState, JobSummary, Jobs, OutputBody, ReplicaState, Segment, TaskState,
};

use super::{ApiError, ApiState, Caller, Typed, blocking, body_json, may_see};

/// The largest job request: the job file and the names of its files (the
/// files themselves are blobs).
const MAX_JOB_REQUEST: usize = 4 << 20;

pub(super) fn jobs_of(s: &ApiState) -> Result<Jobs, ApiError> {
    s.jobs.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "no_submit_role",
            "this node's certificate lacks the submit role: it cannot take jobs",
        )
        .hint("submit through a node of your institution that has the submit role")
    })
}

/// `POST /v1/jobs` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// The job file's text (TOML, as JOBS.md describes).
    pub job: String,
    /// What messages call the job file, and its default name.
    #[serde(default = "default_job_name")]
    pub name: String,
    /// The files the job names (its kernel, its inputs), each by the
    /// BLAKE3 of a blob uploaded before.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

fn default_job_name() -> String {
    "job.toml".into()
}

/// Submit a job whose files were uploaded.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = NewJob,
    responses(
        (status = 200, description = "the job's summary, with its id", body = JobSummary),
        (status = 400, description = "a bad job, with the reason; nothing was kept", body = super::ErrorBody),
        (status = 403, body = super::ErrorBody),
        (status = 409, description = "the user's limit on jobs or tasks is reached", body = super::ErrorBody),
        (status = 413, body = super::ErrorBody)))]
pub(super) async fn submit(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    body: Body,
) -> Typed<JobSummary> {
    let jobs = jobs_of(&s)?;
    let body = axum::body::to_bytes(body, MAX_JOB_REQUEST)
        .await
        .map_err(|_| {
            ApiError::of(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a job request holds at most {MAX_JOB_REQUEST} bytes"),
            )
            .hint("upload large files as blobs (PUT /v1/blobs/HASH) and name them in \"files\"")
        })?;
    let req: NewJob = body_json(&body)?;
    let mut names: BTreeMap<String, Hash> = BTreeMap::new();
    for (name, hash) in &req.files {
        let h = hash.parse().map_err(|_| {
            ApiError::of(
                StatusCode::BAD_REQUEST,
                format!("files: {name} = {hash:?} is not a BLAKE3 hash"),
            )
            .hint("name each file by the 64 hex digits of the BLAKE3 of its bytes, as uploaded to PUT /v1/blobs/HASH")
        })?;
        names.insert(name.clone(), h);
    }
    let limits = s.limits.clone();
    let blobs = s.blobs.clone();
    let quota = s.users.limits().clone();
    let summary = blocking(move || {
        let files = Uploaded {
            names: &names,
            blobs: &blobs,
        };
        let job = Job::parse(&req.job, &PathBuf::from(&req.name), &files, &limits)
            .map_err(|e| ApiError::from(crate::submit::JobsError::Refused(e.to_string())))?;
        let (running, queued) = jobs.usage(&c.name)?;
        if running >= quota.running_jobs {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "limit_running_jobs",
                format!(
                    "user {} has {running} jobs running, the most this node allows",
                    c.name
                ),
            )
            .hint("wait for one to end or cancel one; the admin sets api.per_user.running_jobs"));
        }
        if queued + u64::from(job.tasks) > quota.queued_tasks {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "limit_queued_tasks",
                format!(
                    "user {} has {queued} tasks waiting; {} more would pass the limit of {}",
                    c.name, job.tasks, quota.queued_tasks
                ),
            )
            .hint("wait for tasks to end; the admin sets api.per_user.queued_tasks"));
        }
        Ok(jobs.submit(job, &c.name)?)
    })
    .await?;
    Ok(Json(summary))
}

/// `?limit=N&after=ID`: a page of a list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct Page {
    /// Jobs on the page (default 100, at most 1000).
    limit: Option<usize>,
    /// The last job of the page before.
    after: Option<String>,
}

/// A page of jobs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct JobPage {
    /// Newest first.
    pub(super) jobs: Vec<JobSummary>,
    /// Pass as `after` for the next page; null on the last.
    pub(super) next: Option<String>,
}

/// A page of the caller's jobs (an admin's: everyone's), newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(Page),
    responses((status = 200, body = JobPage)))]
pub(super) async fn list(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Query(p): Query<Page>,
) -> Typed<JobPage> {
    let all = jobs_of(&s)?.list()?;
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let mine = all.into_iter().filter(|j| c.admin || j.owner == c.name);
    let mut rest: Vec<_> = match &p.after {
        Some(after) => mine.skip_while(|j| &j.id != after).skip(1).collect(),
        None => mine.collect(),
    };
    let next = (rest.len() > limit).then(|| rest[limit - 1].id.clone());
    rest.truncate(limit);
    Ok(Json(JobPage { jobs: rest, next }))
}

/// One job with every task.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = JobDetail), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn detail(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> Typed<JobDetail> {
    let jobs = jobs_of(&s)?;
    may_see(&jobs, &c, &id)?;
    Ok(Json(jobs.detail(&id)?))
}

/// `?secs=N`: how long to wait for a job to end.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct Patience {
    /// Seconds, at most 25.
    secs: Option<u64>,
}

/// The job's summary once it has ended, or after `secs`.
#[utoipa::path(get, path = "/v1/jobs/{id}/end", tag = "jobs", params(("id" = String, Path), Patience),
    responses((status = 200, body = JobSummary), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn end(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<Patience>,
) -> Typed<JobSummary> {
    let jobs = jobs_of(&s)?;
    may_see(&jobs, &c, &id)?;
    // Below the client's read timeout.
    let patience = Duration::from_secs(q.secs.unwrap_or(25).min(25));
    Ok(Json(jobs.wait_end(&id, patience).await?))
}

/// Stop offering the job's tasks.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = JobSummary), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn cancel(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> Typed<JobSummary> {
    let jobs = jobs_of(&s)?;
    may_see(&jobs, &c, &id)?;
    Ok(Json(jobs.cancel(&id)?))
}

/// One change of a job, as an event says it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct JobEvent {
    /// `task_offered`, `task_accepted`, `task_returned`, `task_declined`,
    /// `task_failed`, `task_lost`, `task_handed_back`, `task_checkpointed`,
    /// `task_verified`, `task_given_up`, or `job_done`, `job_failed`,
    /// `job_cancelled`.
    pub kind: String,
    pub task: Option<u32>,
    pub attempt: Option<u32>,
    pub worker: Option<String>,
    pub institution: Option<String>,
    /// Why, for a refusal or a failure.
    pub reason: Option<String>,
    /// The step of a checkpoint.
    pub step: Option<u32>,
}

/// What the event stream last saw of a task, to tell what changed.
#[derive(Debug, Clone, Default, PartialEq)]
struct Seen {
    replicas: Vec<(u32, &'static str, Option<u32>)>,
    state: Option<TaskState>,
}

fn replica_kind(s: &ReplicaState) -> (&'static str, Option<String>) {
    match s {
        ReplicaState::Offered => ("task_offered", None),
        ReplicaState::Running { .. } => ("task_accepted", None),
        ReplicaState::Returned | ReplicaState::Verified | ReplicaState::Unmatched => {
            ("task_returned", None)
        }
        ReplicaState::Outvoted => ("task_outvoted", None),
        ReplicaState::Declined { reason } => ("task_declined", Some(reason.clone())),
        ReplicaState::Failed { reason } => ("task_failed", Some(reason.clone())),
        ReplicaState::Lost { reason } => ("task_lost", Some(reason.clone())),
        ReplicaState::HandedBack { reason } => ("task_handed_back", Some(reason.clone())),
    }
}

/// The events between what was `seen` of a job and its `detail` now.
fn changes(seen: &mut Vec<Seen>, detail: &crate::submit::JobDetail) -> Vec<JobEvent> {
    let mut out = Vec::new();
    seen.resize(detail.tasks.len(), Seen::default());
    for (t, was) in detail.tasks.iter().zip(seen.iter_mut()) {
        let mut now = Seen {
            replicas: Vec::with_capacity(t.replicas.len()),
            state: Some(t.state.clone()),
        };
        for r in &t.replicas {
            let (kind, reason) = replica_kind(&r.state);
            now.replicas.push((r.attempt, kind, r.checkpoint));
            let before = was.replicas.iter().find(|p| p.0 == r.attempt);
            let event = |kind: &str, reason: Option<String>, step: Option<u32>| JobEvent {
                kind: kind.into(),
                task: Some(t.index),
                attempt: Some(r.attempt),
                worker: Some(r.worker.clone()),
                institution: Some(r.institution.clone()),
                reason,
                step,
            };
            // An attempt first seen running was offered in between.
            if before.is_none() && kind != "task_offered" {
                out.push(event("task_offered", None, None));
            }
            if before.is_none_or(|p| p.1 != kind) {
                out.push(event(kind, reason, None));
            }
            if r.checkpoint.is_some() && before.is_none_or(|p| p.2 != r.checkpoint) {
                out.push(event("task_checkpointed", None, r.checkpoint));
            }
        }
        if was.state != now.state && t.state != TaskState::Waiting {
            out.push(JobEvent {
                kind: if t.state == TaskState::Verified {
                    "task_verified"
                } else {
                    "task_given_up"
                }
                .into(),
                task: Some(t.index),
                attempt: None,
                worker: None,
                institution: None,
                reason: t.failure.clone(),
                step: None,
            });
        }
        *was = now;
    }
    out
}

/// The job's changes as server-sent events, until it ends.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, description = "server-sent events named by their kind, each a JobEvent, then the job's summary as the last, `job_done`, `job_failed` or `job_cancelled`", content_type = "text/event-stream", body = JobEvent),
        (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn events(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let jobs = jobs_of(&s)?;
    may_see(&jobs, &c, &id)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let Ok(detail) = jobs.detail(&id) else { return };
            for e in changes(&mut seen, &detail) {
                let ev = Event::default().event(e.kind.clone()).json_data(&e);
                if tx.send(ev.unwrap_or_default()).await.is_err() {
                    return;
                }
            }
            if detail.summary.state != JobState::Active {
                let kind = match detail.summary.state {
                    JobState::Done => "job_done",
                    JobState::Cancelled => "job_cancelled",
                    _ => "job_failed",
                };
                let ev = Event::default().event(kind).json_data(&detail.summary);
                let _ = tx.send(ev.unwrap_or_default()).await;
                return;
            }
            // A pass of the scheduler or a report changes it; both are
            // seen within this.
            let _ = jobs.wait_end(&id, Duration::from_millis(250)).await;
        }
    });
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `?task=N`: one task's output instead of all.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct Which {
    task: Option<u32>,
}

/// `Range: bytes=A-B` (or `A-`, or `-N`) within `len` bytes: the range
/// asked for, `None` without one, an error when it cannot be served.
fn byte_range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "bad_range",
            format!("Range {v:?} is not one range within the {len} bytes of the output"),
        )
        .hint("ask for one range, as Range: bytes=START-END")
    };
    let spec = v
        .to_str()
        .ok()
        .and_then(|t| t.strip_prefix("bytes="))
        .filter(|t| !t.contains(','))
        .ok_or_else(bad)?;
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| bad())?;
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (a, "") => (a.parse().map_err(|_| bad())?, len.saturating_sub(1)),
        (a, b) => (
            a.parse().map_err(|_| bad())?,
            b.parse::<u64>()
                .map_err(|_| bad())?
                .min(len.saturating_sub(1)),
        ),
    };
    if start > end || start >= len {
        return Err(bad());
    }
    Ok(Some((start, end)))
}

/// Sends bytes `from..to` of `body` down `tx`, a chunk at a time.
fn send_range(
    body: &OutputBody,
    from: u64,
    to: u64,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut at = 0u64;
    for seg in &body.segments {
        let (s_start, s_end) = (at, at + seg.len());
        at = s_end;
        if s_end <= from || s_start >= to {
            continue;
        }
        let (lo, hi) = (from.max(s_start) - s_start, to.min(s_end) - s_start);
        match seg {
            Segment::Bytes(b) => {
                let at = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
                let part = bytes::Bytes::copy_from_slice(&b[at(lo)..at(hi).min(b.len())]);
                if tx.blocking_send(Ok(part)).is_err() {
                    return Ok(());
                }
            }
            Segment::File { path, .. } => {
                let mut f = std::fs::File::open(path)?;
                f.seek(SeekFrom::Start(lo))?;
                let mut left = hi - lo;
                while left > 0 {
                    let n = usize::try_from(left).map_or(crate::store::blobs::CHUNK, |l| {
                        l.min(crate::store::blobs::CHUNK)
                    });
                    let mut buf = vec![0u8; n];
                    f.read_exact(&mut buf)?;
                    left -= n as u64;
                    if tx.blocking_send(Ok(buf.into())).is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// An output as a `.npy` file: every task's part (once all are verified),
/// or one task's.
#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{binding}", tag = "jobs",
    params(("id" = String, Path), ("binding" = u32, Path), Which),
    responses(
        (status = 200, description = "the .npy file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "the range asked for", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
        (status = 409, description = "not verified yet", body = super::ErrorBody),
        (status = 416, body = super::ErrorBody)))]
pub(super) async fn output(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path((id, binding)): Path<(String, u32)>,
    Query(w): Query<Which>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let jobs = jobs_of(&s)?;
    may_see(&jobs, &c, &id)?;
    let body = blocking(move || Ok(jobs.output_body(&id, binding, w.task)?)).await?;
    let len = body.len();
    let range = byte_range(&headers, len)?;
    let (from, to) = range.map_or((0, len), |(a, b)| (a, b + 1));
    let name = body.name.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = send_range(&body, from, to, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(to - from));
    s.metrics.blob("out", "api", to - from);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if range.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {from}-{}/{len}", to - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}
