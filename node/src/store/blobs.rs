//! Content-addressed blobs on disk: job inputs, large outputs and
//! checkpoint buffers.
//!
//! A blob lives at `<dir>/<blake3 hex>`; it is written to a temporary file,
//! checked against its hash, synced and renamed into place, so a blob that
//! exists is whole and correct. The holder side of a transfer reads a
//! range a chunk at a time into page-aligned buffers, straight from the
//! disk where the file system allows it; the fetcher's [`Sink`] hashes and
//! writes chunks on a blocking thread, straight to the disk where it can
//! (else through the page cache, starting writeback as it goes). The
//! protocol that moves them is [`crate::net::blobs`].

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use alliance_protocol::Hash;
use alliance_protocol::wire::{BlobRequest, BlobResponse};
use tokio::sync::mpsc;

/// Bytes moved per read and write on either side. Every chunk is handed
/// between a disk thread and the network task, and each hand-over wakes a
/// thread; 2 MiB keeps those to 512 per GiB, with the buffers of a stream
/// (the chunks ahead and those being moved) near 12 MiB on either side.
pub(crate) const CHUNK: usize = 2 * 1024 * 1024;

/// Chunks read ahead of the network (holder) or waiting for the disk
/// (fetcher).
pub(crate) const AHEAD: usize = 4;

/// A fetcher starts the disk's writeback after this many new bytes, so
/// that the final sync has little left to do.
const WRITEBACK_EVERY: u64 = 32 * 1024 * 1024;

/// The blob directory.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    /// Opens (creating) the blob directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The blob directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// Stores `len` bytes of the file at `path` from `offset` on, copied
    /// a chunk at a time (never held whole); returns their hash.
    pub fn put_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<Hash> {
        use std::io::{Read, Seek, SeekFrom};
        let mut src = File::open(path)?;
        src.seek(SeekFrom::Start(offset))?;
        let mut src = src.take(len);
        let tmp = self.temp_path();
        let mut out = File::create(&tmp)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut copied = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            copied += n as u64;
        }
        if copied != len {
            let _ = fs::remove_file(&tmp);
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended {copied} bytes into a {len}-byte range",
                    path.display()
                ),
            ));
        }
        let hash = Hash::from(hasher.finalize());
        if self.has(&hash, len) {
            let _ = fs::remove_file(&tmp);
            return Ok(hash);
        }
        out.sync_all()?;
        fs::rename(&tmp, self.path(&hash))?;
        Ok(hash)
    }

    /// Where an upload of the blob `hash` collects its bytes until it is
    /// whole: kept across interrupted uploads, so one can resume.
    pub fn upload_path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(format!(".upload-{hash}"))
    }

    /// Moves a finished upload into place once its bytes hash to `hash`;
    /// removes it and says so when they do not.
    pub fn finish_upload(&self, hash: &Hash, got: &Hash) -> io::Result<()> {
        let part = self.upload_path(hash);
        if got != hash {
            let _ = fs::remove_file(&part);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the bytes hash to {got}, not {hash}"),
            ));
        }
        File::open(&part)?.sync_all()?;
        fs::rename(&part, self.path(hash))
    }

    /// The whole blob.
    pub fn read(&self, hash: &Hash) -> io::Result<Vec<u8>> {
        fs::read(self.path(hash))
    }

    pub(crate) fn temp_path(&self) -> PathBuf {
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        self.dir.join(format!(".part-{}", hex::encode(nonce)))
    }

    /// The blob, its length and how many bytes of the `len` asked for it
    /// has from `offset` on.
    pub(crate) fn open_range(&self, req: &BlobRequest) -> Result<(File, u64, u64), BlobResponse> {
        let file = File::open(self.path(&req.hash)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobResponse::NotFound,
            _ => BlobResponse::Refused(e.to_string()),
        })?;
        let total = file
            .metadata()
            .map_err(|e| BlobResponse::Refused(e.to_string()))?
            .len();
        if req.offset > total {
            return Err(BlobResponse::Refused(format!(
                "offset {} is past the end of the blob ({total} bytes)",
                req.offset
            )));
        }
        Ok((file, total, req.len.min(total - req.offset)))
    }
}

/// Sends `len` bytes of `file` from `offset` on down `tx`, a chunk at a
/// time, in page-aligned buffers read straight from the disk through
/// `direct` where the file system allows it (the network copies them once,
/// as it encrypts, instead of the page cache copying them first), else
/// through the page cache. Stops early when the receiver is gone or the
/// file is shorter than expected.
pub(crate) fn read_chunks(
    file: &File,
    mut direct: Option<File>,
    offset: u64,
    len: u64,
    tx: &mpsc::Sender<io::Result<Chunk>>,
    spare: &std::sync::mpsc::Receiver<Chunk>,
) {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    while pos < end {
        let mut chunk = spare.try_recv().unwrap_or_else(|_| Chunk::new());
        let want = usize::try_from(end - pos).unwrap_or(usize::MAX).min(CHUNK);
        let read = match &direct {
            // A direct read takes whole pages from a page boundary: those
            // the range wants, the last one maybe only in part.
            Some(d) if pos.is_multiple_of(ALIGN as u64) => {
                chunk.len = want.next_multiple_of(ALIGN);
                match read_full_at(d, chunk.data_mut(), pos, true) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        direct = None;
                        continue;
                    }
                    r => r.map(|n| n.min(want)),
                }
            }
            _ => {
                chunk.len = want;
                read_full_at(file, chunk.data_mut(), pos, false)
            }
        };
        match read {
            Ok(0) => return,
            Ok(n) => {
                chunk.len = n;
                pos += n as u64;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// Reads at `pos` until `buf` is full or the file ends; the bytes read.
/// A file opened to bypass the page cache (`direct`) also stops at a read
/// that leaves the position off a page boundary, which only the end of the
/// file does (and where the next read would be refused).
fn read_full_at(f: &File, buf: &mut [u8], pos: u64, direct: bool) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buf.len() {
        match f.read_at(&mut buf[filled..], pos + filled as u64) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if direct && !filled.is_multiple_of(ALIGN) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Alignment of buffers, file offsets and lengths for writes that bypass
/// the page cache.
const ALIGN: usize = 4096;

/// A buffer of up to [`CHUNK`] bytes that start at a page boundary, so the
/// disk can take them without a copy into the page cache.
pub(crate) struct Chunk {
    bytes: Vec<u8>,
    start: usize,
    pub(crate) len: usize,
}

impl Chunk {
    pub(crate) fn new() -> Self {
        let bytes = vec![0u8; CHUNK + ALIGN];
        // Always possible for bytes; were it not, writes fall back to the
        // page cache.
        let start = bytes.as_ptr().align_offset(ALIGN).min(ALIGN);
        Self {
            bytes,
            start,
            len: CHUNK,
        }
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    pub(crate) fn data_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// Where a fetch's bytes go: a blocking thread that hashes them and writes
/// them in order, page-aligned chunks straight to the disk where the file
/// system allows it, the rest through the page cache with writeback started
/// as it goes.
pub(crate) struct Sink {
    tx: mpsc::Sender<Chunk>,
    spare: std::sync::mpsc::Receiver<Chunk>,
    done: tokio::task::JoinHandle<io::Result<Hash>>,
}

impl Sink {
    pub(crate) fn new(path: &Path) -> io::Result<Self> {
        let file = File::create(path)?;
        let direct = open_direct(path, true);
        let (tx, rx) = mpsc::channel::<Chunk>(AHEAD);
        let (spare_tx, spare) = std::sync::mpsc::channel();
        let done = tokio::task::spawn_blocking(move || write_chunks(file, direct, rx, &spare_tx));
        Ok(Self { tx, spare, done })
    }

    /// An empty buffer to fill, reused when the writer is done with one.
    pub(crate) fn buffer(&mut self) -> Chunk {
        let mut chunk = self.spare.try_recv().unwrap_or_else(|_| Chunk::new());
        chunk.len = CHUNK;
        chunk
    }

    pub(crate) async fn push(&mut self, chunk: Chunk) -> io::Result<()> {
        self.tx
            .send(chunk)
            .await
            .map_err(|_| io::Error::other("the blob writer stopped"))
    }

    /// Waits for every byte to be written and synced; the hash of them all.
    pub(crate) async fn finish(self) -> io::Result<Hash> {
        drop(self.tx);
        self.done.await.map_err(io::Error::other)?
    }
}

/// A second handle on `path` that bypasses the page cache, for writing or
/// for reading, where the platform and file system offer one.
pub(crate) fn open_direct(path: &Path, write: bool) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (path, write);
        None
    }
}

/// The writer thread of a [`Sink`].
fn write_chunks(
    file: File,
    mut direct: Option<File>,
    mut rx: mpsc::Receiver<Chunk>,
    spare: &std::sync::mpsc::Sender<Chunk>,
) -> io::Result<Hash> {
    use std::os::unix::fs::FileExt;
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    let mut unsynced = 0u64;
    // Syncing from a second thread lets the disk write what went through
    // the page cache while the network delivers, instead of all at the end.
    let mut flusher: Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)> = None;
    let written = (|| {
        while let Some(chunk) = rx.blocking_recv() {
            let data = chunk.data();
            hasher.update(data);
            let aligned = offset.is_multiple_of(ALIGN as u64) && data.len().is_multiple_of(ALIGN);
            let wrote = match &direct {
                Some(d) if aligned => d.write_all_at(data, offset).map(|()| true),
                _ => Ok(false),
            };
            let wrote = match wrote {
                Ok(w) => w,
                // This file system takes no direct writes (or not these):
                // the page cache it is, from here on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    direct = None;
                    false
                }
                Err(e) => return Err(e),
            };
            if !wrote {
                file.write_all_at(data, offset)?;
                unsynced += data.len() as u64;
                if unsynced >= WRITEBACK_EVERY {
                    unsynced = 0;
                    if flusher.is_none() {
                        let f = file.try_clone()?;
                        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
                        let thread = std::thread::spawn(move || {
                            while rx.recv().is_ok() {
                                let _ = f.sync_data();
                            }
                        });
                        flusher = Some((tx, thread));
                    }
                    if let Some((tx, _)) = &flusher {
                        let _ = tx.try_send(());
                    }
                }
            }
            offset += data.len() as u64;
            let _ = spare.send(chunk);
        }
        Ok(())
    })();
    if let Some((tx, thread)) = flusher {
        drop(tx);
        let _ = thread.join();
    }
    written?;
    file.sync_all()?;
    Ok(Hash::from(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the holder's reader sends for a range of the blob `h`.
    fn sent(blobs: &Blobs, h: Hash, offset: u64, len: u64) -> Vec<u8> {
        let (file, _, n) = blobs
            .open_range(&BlobRequest {
                hash: h,
                offset,
                len,
            })
            .unwrap();
        let direct = open_direct(&blobs.path(&h), false);
        let (tx, mut rx) = mpsc::channel(AHEAD);
        let (_spare_tx, spare) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || read_chunks(&file, direct, offset, n, &tx, &spare));
        let mut got = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            got.extend_from_slice(chunk.unwrap().data());
        }
        reader.join().unwrap();
        got
    }

    #[test]
    fn put_read_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        // Two chunks and a bit, so ranges cross chunks and end off a page.
        let len = 2 * CHUNK + 5000;
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let h = blobs.put(&data).unwrap();
        assert_eq!(h, Hash::of(&data));
        assert!(blobs.has(&h, len as u64));
        assert!(!blobs.has(&h, len as u64 - 1));
        assert_eq!(blobs.read(&h).unwrap(), data);
        // Compared by hand: a failed assert_eq! would print megabytes.
        let range = |offset: usize, n: usize, want: &[u8]| {
            let got = sent(&blobs, h, offset as u64, n as u64);
            assert!(
                got == want,
                "{n} bytes from {offset}: got {} bytes, {} of them as expected",
                got.len(),
                got.iter().zip(want).take_while(|(a, b)| a == b).count()
            );
        };
        range(0, len, &data);
        // From a page boundary (read past the disk's cache where it can
        // be), and from anywhere else (through it); within a chunk, across
        // chunks, and past the end (cut to the blob).
        range(4096, 10_000, &data[4096..14_096]);
        range(1000, CHUNK, &data[1000..1000 + CHUNK]);
        range(
            CHUNK - 4096,
            CHUNK + 8192,
            &data[CHUNK - 4096..2 * CHUNK + 4096],
        );
        range(CHUNK - 4096, 2 * CHUNK, &data[CHUNK - 4096..]);
        range(2 * CHUNK + 1, 10_000, &data[2 * CHUNK + 1..]);
        range(len, 10, b"");
        let total = |offset| {
            blobs
                .open_range(&BlobRequest {
                    hash: h,
                    offset,
                    len: 10,
                })
                .map(|(_, total, n)| (total, n))
        };
        assert_eq!(total(100).unwrap(), (len as u64, 10));
        assert_eq!(total(len as u64 - 4).unwrap(), (len as u64, 4));
        assert!(matches!(
            total(len as u64 + 1),
            Err(BlobResponse::Refused(_))
        ));
        assert_eq!(
            blobs
                .open_range(&BlobRequest {
                    hash: Hash::of(b"absent"),
                    offset: 0,
                    len: 10
                })
                .err(),
            Some(BlobResponse::NotFound)
        );
    }
}
