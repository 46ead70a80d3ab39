//! Content-addressed blobs on disk: job inputs and large outputs.
//!
//! A blob lives at `<dir>/<blake3 hex>`; it is written to a temporary file,
//! checked against its hash, synced and renamed into place, so a blob that
//! exists is whole and correct. [`fetch`] pulls a blob from a peer in
//! chunks over `/alliance/blob/1`, a few requests in flight, and keeps it
//! only if its hash matches.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use alliance_protocol::Hash;
use alliance_protocol::wire::{BlobRequest, BlobResponse, MAX_CHUNK};
use libp2p::PeerId;

use crate::net::actor::Client;

/// The blob directory.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

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

impl Blobs {
    /// Opens (creating) the blob directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Where the blob `hash` lives (whether or not it is there).
    pub fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_string())
    }

    /// Whether the blob is here with `len` bytes.
    pub fn has(&self, hash: &Hash, len: u64) -> bool {
        fs::metadata(self.path(hash)).is_ok_and(|m| m.len() == len)
    }

    /// Stores `bytes`; returns their hash.
    pub fn put(&self, bytes: &[u8]) -> io::Result<Hash> {
        let hash = Hash::of(bytes);
        if self.has(&hash, bytes.len() as u64) {
            return Ok(hash);
        }
        let tmp = self.temp_path();
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(&hash))?;
        Ok(hash)
    }

    /// The whole blob.
    pub fn read(&self, hash: &Hash) -> io::Result<Vec<u8>> {
        fs::read(self.path(hash))
    }

    /// Up to `len` bytes of the blob from `offset`, and the blob's length.
    pub fn read_chunk(&self, hash: &Hash, offset: u64, len: u32) -> io::Result<(Vec<u8>, u64)> {
        let mut f = File::open(self.path(hash))?;
        let total = f.metadata()?.len();
        let want = u64::from(len)
            .min(MAX_CHUNK as u64)
            .min(total.saturating_sub(offset));
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; usize::try_from(want).unwrap_or(0)];
        f.read_exact(&mut buf)?;
        Ok((buf, total))
    }

    fn temp_path(&self) -> PathBuf {
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        self.dir.join(format!(".part-{}", hex::encode(nonce)))
    }

    /// Answers a chunk request from the blob store.
    pub fn answer(&self, req: &BlobRequest) -> BlobResponse {
        match self.read_chunk(&req.hash, req.offset, req.len) {
            Ok((data, total_len)) => BlobResponse::Chunk {
                hash: req.hash,
                offset: req.offset,
                total_len,
                data,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => BlobResponse::NotFound,
            Err(e) => BlobResponse::Refused(e.to_string()),
        }
    }
}

/// Chunk requests kept in flight by [`fetch`].
const IN_FLIGHT: u64 = 8;

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
    // Hashing and writing happen off the async threads, one chunk at a
    // time in order, while the next requests are in flight.
    let mut sink = Some((File::create(&tmp)?, blake3::Hasher::new()));
    let chunk = MAX_CHUNK as u64;
    let mut next = 0u64;
    let mut pending = futures::stream::FuturesOrdered::new();
    let mut received = 0u64;
    let result: Result<(), BlobError> = async {
        use futures::StreamExt;
        loop {
            while next < len && (pending.len() as u64) < IN_FLIGHT {
                let req = BlobRequest {
                    hash,
                    offset: next,
                    len: u32::try_from(chunk.min(len - next)).unwrap_or(u32::MAX),
                };
                let c = client.clone();
                pending.push_back(async move { c.blob(peer, req).await });
                next += chunk;
            }
            let Some(answer) = pending.next().await else {
                break;
            };
            match answer.map_err(|e| fail(e.to_string()))?.map_err(fail)? {
                BlobResponse::Chunk {
                    offset,
                    total_len,
                    data,
                    ..
                } => {
                    if offset != received || total_len != len || data.is_empty() {
                        return Err(fail(format!(
                            "sent bytes {offset}..{} of {total_len} when {received} of {len} was due",
                            offset + data.len() as u64
                        )));
                    }
                    received += data.len() as u64;
                    let (mut file, mut hasher) = sink.take().ok_or_else(|| fail("no sink".into()))?;
                    sink = Some(
                        tokio::task::spawn_blocking(move || {
                            hasher.update(&data);
                            file.write_all(&data).map(|()| (file, hasher))
                        })
                        .await
                        .map_err(|e| fail(e.to_string()))??,
                    );
                }
                BlobResponse::NotFound => return Err(BlobError::NotFound { peer, hash }),
                BlobResponse::Refused(why) => return Err(fail(why)),
            }
        }
        let (file, hasher) = sink.take().ok_or_else(|| fail("no sink".into()))?;
        let got = Hash::from(hasher.finalize());
        if got != hash || received != len {
            return Err(BlobError::HashMismatch { peer, hash, got });
        }
        let (tmp2, dest) = (tmp.clone(), blobs.path(&hash));
        tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            fs::rename(&tmp2, dest)
        })
        .await
        .map_err(|e| fail(e.to_string()))??;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_read_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let h = blobs.put(&data).unwrap();
        assert_eq!(h, Hash::of(&data));
        assert!(blobs.has(&h, 3000));
        assert!(!blobs.has(&h, 2999));
        assert_eq!(blobs.read(&h).unwrap(), data);
        let (part, total) = blobs.read_chunk(&h, 1000, 500).unwrap();
        assert_eq!((part.as_slice(), total), (&data[1000..1500], 3000));
        let (tail, _) = blobs.read_chunk(&h, 2900, 500).unwrap();
        assert_eq!(tail, &data[2900..]);
        assert_eq!(
            blobs.answer(&BlobRequest {
                hash: Hash::of(b"absent"),
                offset: 0,
                len: 10
            }),
            BlobResponse::NotFound
        );
    }
}
