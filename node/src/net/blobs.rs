//! The `/alliance/blob/2` protocol, which moves blobs between members.
//!
//! To fetch, a node opens a stream to a holder and asks for a range
//! ([`BlobRequest`]); the holder answers with a [`BlobResponse`] frame and
//! streams exactly the announced bytes, read from disk a few chunks ahead of
//! the network (the encryption is then the only pass the holder's CPU makes
//! over them). One stream carries the whole range, so the transport's flow
//! control window grows once instead of starting small for every chunk.
//! The fetcher resumes from the last byte it holds when a stream breaks,
//! and keeps the blob only if the whole matches its hash. Holders serve
//! only verified members, and a member that sends a malformed request is
//! dropped. The files themselves are [`crate::store::blobs`].

use std::fs;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use alliance_protocol::Hash;
use alliance_protocol::wire::{BlobRequest, BlobResponse};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::{Semaphore, mpsc};

use crate::metrics::Metrics;
use crate::net::BLOB_PROTOCOL;
use crate::net::actor::Client;
use crate::net::codec::{FRAME_GRACE, read_frame, write_frame};
use crate::store::blobs::{AHEAD, Blobs, CHUNK, Chunk, Sink, open_direct, read_chunks};

/// Streams a node serves at once; more wait.
const MAX_SERVING: usize = 16;

/// How long either side waits for the other to move a chunk before giving
/// up on the stream (a request must come within the codec's grace).
const STALL: Duration = Duration::from_secs(30);

/// Streams a fetch opens before it gives up (it resumes where the last
/// one broke).
const ATTEMPTS: u32 = 3;

/// Why a blob could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    #[error("blob store: {0}")]
    Io(#[from] io::Error),
    #[error("the blob {hash} from {peer} does not match its hash (got {got}); it was discarded")]
    HashMismatch { peer: PeerId, hash: Hash, got: Hash },
    #[error("{peer} does not have the blob {hash}")]
    NotFound { peer: PeerId, hash: Hash },
    #[error("fetching the blob {hash} from {peer} failed: {reason}")]
    Fetch {
        peer: PeerId,
        hash: Hash,
        reason: String,
    },
}

/// Serves `/alliance/blob/2` from `blobs` to verified members until the
/// node stops.
pub async fn serve(client: Client, blobs: Blobs, metrics: Metrics) {
    let Some(mut incoming) = client.accept_streams(BLOB_PROTOCOL) else {
        tracing::warn!("blob streams are already being served");
        return;
    };
    let permits = Arc::new(Semaphore::new(MAX_SERVING));
    while let Some((peer, stream)) = incoming.next().await {
        let (client, blobs, permits) = (client.clone(), blobs.clone(), Arc::clone(&permits));
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(&client, &blobs, &permits, &metrics, peer, stream).await {
                tracing::debug!(%peer, "blob stream ended early: {e}");
            }
        });
    }
}

async fn serve_one(
    client: &Client,
    blobs: &Blobs,
    permits: &Semaphore,
    metrics: &Metrics,
    peer: PeerId,
    mut stream: libp2p::Stream,
) -> io::Result<()> {
    let request = tokio::time::timeout(FRAME_GRACE, read_frame::<BlobRequest, _>(&mut stream));
    let req = match request.await {
        Ok(Ok(req)) => req,
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            let _ = client
                .punish(peer, format!("sent a malformed blob request: {e}"))
                .await;
            return Err(e);
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            let _ = client.unfinished(peer, "blob request", e.to_string()).await;
            return Err(e);
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let why = format!("no whole request came within {FRAME_GRACE:?}");
            let _ = client.unfinished(peer, "blob request", why).await;
            return Err(io::ErrorKind::TimedOut.into());
        }
    };
    if !matches!(client.member(peer).await, Ok(Some(_))) {
        let why = "blobs are served to verified members of this alliance only";
        write_frame(&mut stream, &BlobResponse::Refused(why.into())).await?;
        return stream.close().await;
    }
    let _permit = permits.acquire().await.map_err(io::Error::other)?;
    let b = blobs.clone();
    let opened = tokio::task::spawn_blocking(move || {
        b.open_range(&req)
            .map(|(file, total, len)| (file, open_direct(&b.path(&req.hash), false), total, len))
    })
    .await
    .map_err(io::Error::other)?;
    let (file, direct, total_len, len) = match opened {
        Ok(o) => o,
        Err(answer) => {
            write_frame(&mut stream, &answer).await?;
            return stream.close().await;
        }
    };
    write_frame(&mut stream, &BlobResponse::Sending { total_len, len }).await?;
    // The disk is read a few chunks ahead of the network.
    let (tx, mut rx) = mpsc::channel::<io::Result<Chunk>>(AHEAD);
    let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Chunk>();
    let reader = tokio::task::spawn_blocking(move || {
        read_chunks(&file, direct, req.offset, len, &tx, &spare_rx);
    });
    let mut sent = 0u64;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        tokio::time::timeout(STALL, stream.write_all(chunk.data()))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        sent += chunk.len as u64;
        metrics.blob("out", "network", chunk.len as u64);
        let _ = spare_tx.send(chunk);
    }
    drop(rx);
    let _ = reader.await;
    if sent != len {
        // The file shrank under us: the fetcher sees a short stream.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("sent {sent} of {len} bytes"),
        ));
    }
    stream.close().await
}

/// Why one stream of a fetch ended early.
enum Broke {
    /// Worth another stream, from where this one stopped.
    Retry(String),
    /// Not worth another try.
    Fatal(BlobError),
}

/// Fetches the blob `hash` of `len` bytes from `peer` into `blobs`, unless it
/// is already there. Returns the bytes that crossed the network.
pub async fn fetch(
    client: &Client,
    blobs: &Blobs,
    peer: PeerId,
    hash: Hash,
    len: u64,
) -> Result<u64, BlobError> {
    if blobs.has(&hash, len) {
        return Ok(0);
    }
    let fail = |reason: String| BlobError::Fetch { peer, hash, reason };
    let tmp = blobs.temp_path();
    let result: Result<(), BlobError> = async {
        let mut sink = Sink::new(&tmp)?;
        let mut received = 0u64;
        let mut attempt = 0;
        while received < len {
            attempt += 1;
            match fetch_range(client, &mut sink, peer, hash, len, &mut received).await {
                Ok(()) => {}
                Err(Broke::Retry(why)) if attempt < ATTEMPTS => {
                    tracing::debug!(%peer, %hash, received, "blob stream broke ({why}); resuming");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(Broke::Retry(why)) => return Err(fail(why)),
                Err(Broke::Fatal(e)) => return Err(e),
            }
        }
        let got = sink.finish().await?;
        if got != hash {
            return Err(BlobError::HashMismatch { peer, hash, got });
        }
        fs::rename(&tmp, blobs.path(&hash))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| len)
}

/// Asks `peer` for the blob from `*received` on, over one stream, and
/// hands what arrives to `sink`, counting it in `received`.
async fn fetch_range(
    client: &Client,
    sink: &mut Sink,
    peer: PeerId,
    hash: Hash,
    len: u64,
    received: &mut u64,
) -> Result<(), Broke> {
    let retry = |e: &dyn std::fmt::Display| Broke::Retry(e.to_string());
    let stalled = || Broke::Retry(format!("no data for {} s", STALL.as_secs()));
    let mut stream = tokio::time::timeout(STALL, client.open_stream(peer, BLOB_PROTOCOL))
        .await
        .map_err(|_| stalled())?
        .map_err(|e| retry(&e))?;
    let want = len - *received;
    let req = BlobRequest {
        hash,
        offset: *received,
        len: want,
    };
    write_frame(&mut stream, &req)
        .await
        .map_err(|e| retry(&e))?;
    let answer = tokio::time::timeout(STALL, read_frame::<BlobResponse, _>(&mut stream))
        .await
        .map_err(|_| stalled())?;
    let fatal = |reason: String| Broke::Fatal(BlobError::Fetch { peer, hash, reason });
    match answer {
        Ok(BlobResponse::Sending { total_len, len: n }) if total_len == len && n == want => {}
        Ok(BlobResponse::Sending { total_len, len: n }) => {
            return Err(fatal(format!(
                "offered {n} bytes of a {total_len}-byte blob when {want} of {len} were asked"
            )));
        }
        Ok(BlobResponse::NotFound) => return Err(Broke::Fatal(BlobError::NotFound { peer, hash })),
        Ok(BlobResponse::Refused(why)) => return Err(fatal(format!("refused: {why}"))),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(fatal(e.to_string())),
        Err(e) => return Err(retry(&e)),
    }
    let end = len;
    while *received < end {
        let mut chunk = sink.buffer();
        let room = usize::try_from(end - *received).unwrap_or(usize::MAX);
        chunk.len = room.min(CHUNK);
        // One deadline per chunk rather than per read: a timer per read
        // costs more than the read at these rates.
        let filled = tokio::time::timeout(STALL, fill(&mut stream, chunk.data_mut()))
            .await
            .map_err(|_| stalled())?
            .map_err(|e| retry(&e))?;
        if filled == 0 {
            return Err(Broke::Retry(format!(
                "the stream ended after {} of {len} bytes",
                *received
            )));
        }
        chunk.len = filled;
        sink.push(chunk).await.map_err(|e| Broke::Fatal(e.into()))?;
        *received += filled as u64;
    }
    Ok(())
}

/// Reads from `stream` until `buf` is full or the stream ends; the bytes
/// read.
async fn fill(stream: &mut libp2p::Stream, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
