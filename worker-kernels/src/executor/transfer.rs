//! Moving bytes between the host and the device: uploads that leave no
//! byte of a pooled buffer behind, and read-backs that hash (and, on
//! request, write to files) in the same pass.

use std::io::{Read, Write};
use std::path::Path;

use super::cache::Cache;
use super::{Data, ElemType, Output, TaskError};

/// Bytes read from an input file at a time.
const UPLOAD_CHUNK: usize = 1 << 20;
/// Uploads and outputs at least this large get a thread of their own.
const PARALLEL_BYTES: u64 = 4 << 20;

/// A buffer bound for one task.
pub(super) struct Bound {
    pub(super) binding: u32,
    pub(super) buffer: wgpu::Buffer,
    /// Bytes of meaningful data (the buffer may be padded to 4).
    pub(super) len: u64,
    pub(super) read_back: Option<ElemType>,
    pub(super) state: bool,
}

/// `len` rounded up to the copy alignment (and at least 4).
pub(super) fn padded(len: u64) -> u64 {
    len.max(4).div_ceil(4) * 4
}

/// Fills the whole of `buffer` from `data`, zeroing the padding so no byte
/// of a pooled buffer survives. Files are read through a small buffer
/// into the upload view.
fn upload(queue: &wgpu::Queue, buffer: &wgpu::Buffer, data: &Data) -> Result<(), TaskError> {
    let Some(size) = std::num::NonZeroU64::new(buffer.size()) else {
        return Ok(());
    };
    let Some(mut view) = queue.write_buffer_with(buffer, 0, size) else {
        return Err(TaskError::Gpu("cannot stage an upload".into()));
    };
    let len = usize::try_from(data.len())
        .unwrap_or(usize::MAX)
        .min(view.len());
    let (mut head, mut pad) = view.slice(..).split_at(len);
    match data {
        Data::Bytes(b) => head.copy_from_slice(&b[..len]),
        Data::File { path, len: want } => {
            let io = |e: std::io::Error| {
                TaskError::Io(format!("cannot read input {}: {e}", path.display()))
            };
            let mut file = std::fs::File::open(path).map_err(io)?;
            let actual = file.metadata().map_err(io)?.len();
            if actual != *want {
                return Err(TaskError::Io(format!(
                    "input {} holds {actual} bytes, but the task says {want}",
                    path.display()
                )));
            }
            // The upload view is write-only: read through a small buffer.
            let mut chunk = vec![0u8; len.min(UPLOAD_CHUNK)];
            let mut rest = head;
            while !rest.is_empty() {
                let n = rest.len().min(chunk.len());
                file.read_exact(&mut chunk[..n]).map_err(io)?;
                let (mut now, later) = rest.split_at(n);
                now.copy_from_slice(&chunk[..n]);
                rest = later;
            }
        }
    }
    pad.fill(0);
    Ok(())
}

/// Uploads every `(buffer, data)` pair, the large ones on threads of their
/// own so their copies overlap.
pub(super) fn upload_all(
    queue: &wgpu::Queue,
    uploads: &[(&wgpu::Buffer, &Data)],
) -> Result<(), TaskError> {
    std::thread::scope(|s| {
        let big: Vec<_> = uploads
            .iter()
            .filter(|(_, d)| d.len() >= PARALLEL_BYTES)
            .map(|(b, d)| s.spawn(move || upload(queue, b, d)))
            .collect();
        for (b, d) in uploads.iter().filter(|(_, d)| d.len() < PARALLEL_BYTES) {
            upload(queue, b, d)?;
        }
        big.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(TaskError::Io("an upload thread failed".into())))
        })
    })
}

/// Waits for all submitted work, maps `buffer` and hands its bytes to `f`.
fn map_and<T>(
    device: &wgpu::Device,
    buffer: &wgpu::Buffer,
    f: impl FnOnce(&[u8]) -> Result<T, TaskError>,
) -> Result<T, TaskError> {
    let (tx, rx) = std::sync::mpsc::channel();
    buffer.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    wait(device)?;
    rx.recv()
        .map_err(|_| TaskError::Gpu("the GPU never finished reading back".into()))?
        .map_err(|e| TaskError::Gpu(format!("reading results back: {e}")))?;
    let result = {
        let view = buffer
            .get_mapped_range(..)
            .map_err(|e| TaskError::Gpu(format!("reading results back: {e}")))?;
        f(&view)
    };
    buffer.unmap();
    result
}

/// Waits until the device has finished all submitted work.
pub(super) fn wait(device: &wgpu::Device) -> Result<(), TaskError> {
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map(|_| ())
        .map_err(|e| TaskError::Gpu(format!("waiting for the GPU: {e}")))
}

/// The bytes of one read-back buffer as an [`Output`]: hashed, and written
/// to `dir` when given (hash and write overlap for large outputs).
fn output(b: &Bound, bytes: &[u8], dir: Option<&Path>) -> Result<Output, TaskError> {
    let elem = b.read_back.unwrap_or(ElemType::Bytes);
    let Some(dir) = dir else {
        return Ok(Output {
            binding: b.binding,
            elem,
            len: b.len,
            hash: *blake3::hash(bytes).as_bytes(),
            data: bytes.to_vec(),
            file: None,
        });
    };
    let path = dir.join(format!("out-{}", b.binding));
    let write = || {
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| TaskError::Io(format!("cannot write output {}: {e}", path.display())))
    };
    let hash = if b.len >= PARALLEL_BYTES {
        std::thread::scope(|s| {
            let h = s.spawn(|| *blake3::hash(bytes).as_bytes());
            write()?;
            h.join()
                .map_err(|_| TaskError::Io("the hashing thread failed".into()))
        })?
    } else {
        write()?;
        *blake3::hash(bytes).as_bytes()
    };
    Ok(Output {
        binding: b.binding,
        elem,
        len: b.len,
        hash,
        data: Vec::new(),
        file: Some(path),
    })
}

/// Outputs read back, and the begin and end timestamps in ticks.
pub(super) type Finished = (Vec<Output>, Option<(u64, u64)>);

/// Buffers to read back after a submission, copied into one staging buffer
/// by commands recorded in the same encoder as the work.
pub(super) struct Readback {
    staging: Option<wgpu::Buffer>,
    /// Indices into the bound buffers, with their offsets in `staging`.
    parts: Vec<(usize, usize)>,
    /// Offset of the two resolved timestamps, when read.
    timestamps: Option<usize>,
}

impl Readback {
    /// Records copies of the chosen buffers (and the resolved timestamps).
    pub(super) fn record(
        device: &wgpu::Device,
        cache: &mut Cache,
        encoder: &mut wgpu::CommandEncoder,
        bound: &[Bound],
        which: impl Fn(&Bound) -> bool,
        timestamps: Option<&wgpu::Buffer>,
    ) -> Self {
        let chosen: Vec<usize> = (0..bound.len()).filter(|&i| which(&bound[i])).collect();
        let total: u64 = chosen.iter().map(|&i| bound[i].buffer.size()).sum::<u64>()
            + timestamps.map_or(0, wgpu::Buffer::size);
        if total == 0 {
            return Self {
                staging: None,
                parts: Vec::new(),
                timestamps: None,
            };
        }
        let staging = cache.buffer(
            device,
            total,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut offset = 0u64;
        let mut parts = Vec::new();
        for i in chosen {
            let b = &bound[i].buffer;
            encoder.copy_buffer_to_buffer(b, 0, &staging, offset, b.size());
            parts.push((i, usize::try_from(offset).unwrap_or(usize::MAX)));
            offset += b.size();
        }
        let timestamps = timestamps.map(|t| {
            encoder.copy_buffer_to_buffer(t, 0, &staging, offset, t.size());
            usize::try_from(offset).unwrap_or(usize::MAX)
        });
        Self {
            staging: Some(staging),
            parts,
            timestamps,
        }
    }

    /// Waits for the submission and returns the outputs and the two
    /// timestamps (in ticks).
    pub(super) fn finish(
        self,
        device: &wgpu::Device,
        cache: &mut Cache,
        bound: &[Bound],
        dir: Option<&Path>,
    ) -> Result<Finished, TaskError> {
        let Some(staging) = self.staging else {
            wait(device)?;
            return Ok((Vec::new(), None));
        };
        let result = map_and(device, &staging, |data| {
            let mut outputs = Vec::with_capacity(self.parts.len());
            for &(i, offset) in &self.parts {
                let b = &bound[i];
                let len = usize::try_from(b.len).unwrap_or(usize::MAX);
                let bytes = data
                    .get(offset..offset.saturating_add(len))
                    .unwrap_or_default();
                outputs.push(output(b, bytes, dir)?);
            }
            let tick = |at: usize| {
                data.get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes)
            };
            Ok((outputs, self.timestamps.map(|at| (tick(at), tick(at + 8)))))
        });
        cache.give_back(staging);
        result
    }
}
