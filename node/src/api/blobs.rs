//! `/v1/blobs/HASH`: the files a job names, uploaded by their BLAKE3 hash
//! before the job that names them.
//!
//! An upload streams to `.upload-HASH` in the blob store a few MiB at a
//! time (hashed on the way), never held whole, and is moved into place
//! only when its bytes hash to the name it was sent under. One cut short
//! keeps what arrived: `GET` says how much, and a `PUT` with
//! `Content-Range: bytes START-END/TOTAL` goes on from there. Uploading a
//! blob the node has already is answered at once, without the bytes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};

use alliance_protocol::Hash;
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures::StreamExt;
use serde::Serialize;

use super::{ApiError, ApiState, Caller, blocking};
use crate::store::blobs::CHUNK;

/// What an upload got to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = UploadProgress)]
pub struct Progress {
    pub hash: String,
    /// Bytes the node holds of it.
    pub received: u64,
    /// Whether the blob is whole and checked.
    pub complete: bool,
}

fn parse_hash(text: &str) -> Result<Hash, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_hash",
            format!("{text:?} is not a BLAKE3 hash"),
        )
        .hint("name a blob by the 64 hex digits of its BLAKE3 hash (b3sum FILE, or blake3.blake3(data).hexdigest())")
    })
}

/// `Content-Range: bytes START-END/TOTAL` (END and TOTAL may be `*`):
/// where this part starts and, when given, the blob's whole length.
fn content_range(headers: &HeaderMap) -> Result<(u64, Option<u64>), ApiError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok((0, None));
    };
    let bad = || {
        ApiError::of(
            StatusCode::BAD_REQUEST,
            format!("Content-Range {v:?} is not bytes START-END/TOTAL"),
        )
        .hint("resume an upload with Content-Range: bytes START-END/TOTAL, START being what GET /v1/blobs/HASH says was received")
    };
    let text = v.to_str().map_err(|_| bad())?;
    let (range, total) = text
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .ok_or_else(bad)?;
    let start = range
        .split('-')
        .next()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(bad)?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().map_err(|_| bad())?),
    };
    Ok((start, total))
}

/// How far an upload got.
#[utoipa::path(get, path = "/v1/blobs/{hash}", tag = "blobs",
    params(("hash" = String, Path, description = "BLAKE3, 64 hex digits")),
    responses((status = 200, body = Progress), (status = 400, body = super::ErrorBody)))]
pub(super) async fn progress(
    State(s): State<ApiState>,
    Path(hash): Path<String>,
) -> Result<Json<Progress>, ApiError> {
    let h = parse_hash(&hash)?;
    let whole = std::fs::metadata(s.blobs.path(&h)).ok().map(|m| m.len());
    let part = std::fs::metadata(s.blobs.upload_path(&h)).map_or(0, |m| m.len());
    Ok(Json(Progress {
        hash,
        received: whole.unwrap_or(part),
        complete: whole.is_some(),
    }))
}

/// Frees the blob for another upload when the handler ends, however.
struct Uploading(
    std::sync::Arc<std::sync::Mutex<std::collections::HashSet<Hash>>>,
    Hash,
);

impl Drop for Uploading {
    fn drop(&mut self) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(&self.1);
        }
    }
}

/// `DELETE /v1/blobs/HASH` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub(super) struct Released {
    hash: String,
    /// Bytes no longer counted against the caller.
    freed: u64,
}

/// Stop holding an upload, so it no longer counts against the caller's
/// stored bytes. The bytes stay in the node's blob store: other users
/// may hold them and jobs may name them (the admin's disk, not the user's
/// allowance).
#[utoipa::path(delete, path = "/v1/blobs/{hash}", tag = "blobs",
    params(("hash" = String, Path, description = "BLAKE3 of the blob, 64 hex digits")),
    responses(
        (status = 200, body = Released),
        (status = 400, body = super::ErrorBody),
        (status = 404, description = "the caller holds no such upload", body = super::ErrorBody)))]
pub(super) async fn release(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(hash): Path<String>,
) -> Result<Json<Released>, ApiError> {
    let h = parse_hash(&hash)?;
    let users = s.users.clone();
    let freed = blocking(move || users.release(&c.name, &h)).await?;
    Ok(Json(Released { hash, freed }))
}

/// Upload a blob, or a part of one.
#[utoipa::path(put, path = "/v1/blobs/{hash}", tag = "blobs",
    params(("hash" = String, Path, description = "BLAKE3 of the whole blob, 64 hex digits")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "the blob is whole and checked", body = Progress),
        (status = 200, description = "the node had it already", body = Progress),
        (status = 202, description = "a part arrived; more is to come", body = Progress),
        (status = 400, description = "the bytes do not hash to the name", body = super::ErrorBody),
        (status = 409, description = "not where the upload got to, or another upload of it runs", body = super::ErrorBody),
        (status = 413, description = "past the user's stored bytes", body = super::ErrorBody),
        (status = 507, description = "the node's disk is full", body = super::ErrorBody)))]
pub(super) async fn upload(
    State(s): State<ApiState>,
    Extension(c): Extension<Caller>,
    Path(hash): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Progress>), ApiError> {
    let h = parse_hash(&hash)?;
    if let Ok(m) = std::fs::metadata(s.blobs.path(&h)) {
        if !s.users.holds(&c.name, &h) {
            s.users.check_room(&c.name, m.len())?;
            s.users.record_upload(&c.name, &h, m.len())?;
        }
        return Ok((
            StatusCode::OK,
            Json(Progress {
                hash,
                received: m.len(),
                complete: true,
            }),
        ));
    }
    let (start, total) = content_range(&headers)?;
    let length: Option<u64> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let expected = total.or(length.map(|l| start + l));
    if let Some(n) = expected {
        s.users.check_room(&c.name, n)?;
        let have = std::fs::metadata(s.blobs.upload_path(&h)).map_or(0, |m| m.len());
        let need = n.saturating_sub(have.min(start));
        if let Ok(free) = fs2::available_space(s.blobs.dir())
            && free < need.saturating_add(64 << 20)
        {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "disk_full",
                format!(
                    "the node has {free} bytes free in its blob store; this upload needs {need}"
                ),
            ));
        }
    }
    let _held = {
        let mut set = s.uploading.lock().map_err(|_| {
            ApiError::of(StatusCode::INTERNAL_SERVER_ERROR, "upload table poisoned")
        })?;
        if !set.insert(h) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "upload_running",
                format!("another upload of {hash} is under way"),
            )
            .hint("wait for it, then GET /v1/blobs/HASH says how far it got"));
        }
        Uploading(s.uploading.clone(), h)
    };

    // The writer: a blocking thread that hashes and writes what the
    // network hands it, a chunk at a time; two chunks in flight at most.
    let part = s.blobs.upload_path(&h);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
    let writer = tokio::task::spawn_blocking(move || -> Result<(u64, Hash), ApiError> {
        let io = |e: std::io::Error| {
            ApiError::of(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the upload: {e}"),
            )
        };
        let have = std::fs::metadata(&part).map_or(0, |m| m.len());
        let mut hasher = blake3::Hasher::new();
        let mut f = if start == 0 {
            File::create(&part).map_err(io)?
        } else if start == have {
            // Resuming: the bytes that arrived before count into the hash.
            let mut old = File::open(&part).map_err(io)?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = old.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            OpenOptions::new().append(true).open(&part).map_err(io)?
        } else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "wrong_offset",
                format!("this part starts at byte {start}, but the node holds {have} bytes of the upload"),
            )
            .hint(format!("send from byte {have} on (Content-Range: bytes {have}-END/TOTAL), or from 0 to start again")));
        };
        let mut written = have.min(start);
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            f.write_all(&chunk).map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    ApiError::new(
                        StatusCode::INSUFFICIENT_STORAGE,
                        "disk_full",
                        "the node's blob store filled up during the upload",
                    )
                } else {
                    io(e)
                }
            })?;
            written += chunk.len() as u64;
        }
        f.flush().map_err(io)?;
        Ok((written, Hash::from(hasher.finalize())))
    });

    let mut stream = body.into_data_stream();
    let mut pending = bytes::BytesMut::new();
    let mut cut_short = None;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(b) => {
                s.metrics.blob("in", "api", b.len() as u64);
                pending.extend_from_slice(&b);
                if pending.len() >= CHUNK && tx.send(pending.split().freeze()).await.is_err() {
                    break; // the writer stopped: its answer says why
                }
            }
            Err(e) => {
                cut_short = Some(e.to_string());
                break;
            }
        }
    }
    if !pending.is_empty() {
        let _ = tx.send(pending.freeze()).await;
    }
    drop(tx);
    let (received, got) = writer
        .await
        .map_err(|e| ApiError::of(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    if let Some(why) = cut_short {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "upload_cut_short",
            format!("the upload stopped after {received} bytes: {why}"),
        )
        .hint(format!(
            "resume with Content-Range: bytes {received}-END/TOTAL"
        )));
    }
    if total.is_some_and(|t| received < t) {
        return Ok((
            StatusCode::ACCEPTED,
            Json(Progress {
                hash,
                received,
                complete: false,
            }),
        ));
    }
    let blobs = s.blobs.clone();
    blocking(move || {
        blobs.finish_upload(&h, &got).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "hash_mismatch",
                format!("the upload was refused: {e}"),
            )
            .hint("send the file again under the BLAKE3 of its bytes; what arrived was dropped")
        })
    })
    .await?;
    s.users.record_upload(&c.name, &h, received)?;
    Ok((
        StatusCode::CREATED,
        Json(Progress {
            hash,
            received,
            complete: true,
        }),
    ))
}
