//! Verified outputs, read back from the database or the blob store, as
//! `.npy` files laid out as [`OutputBody`]
//! segments the API streams without reading a large output whole.

use std::path::PathBuf;

use alliance_protocol::Hash;

use crate::submit::npy;

use super::{Jobs, JobsError, db};

/// A piece of a result body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Bytes(Vec<u8>),
    /// `len` bytes of a blob file, from its start.
    File {
        path: PathBuf,
        len: u64,
    },
}

impl Segment {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Segment::Bytes(b) => b.len() as u64,
            Segment::File { len, .. } => *len,
        }
    }
}

/// One output as a `.npy` file: its header, then each task's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputBody {
    /// A file name for it: `out<B>.npy` or `out<B>-task<N>.npy`.
    pub name: String,
    pub segments: Vec<Segment>,
}

impl OutputBody {
    /// Bytes in all.
    pub(crate) fn len(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }
}

impl Jobs {
    /// Output `binding` of job `id` as a `.npy` file: task `task`'s part,
    /// or with `None` every task's part in task order (the shape gains a
    /// leading axis of the tasks), once all are verified.
    pub fn output_body(
        &self,
        id: &str,
        binding: u32,
        task: Option<u32>,
    ) -> Result<OutputBody, JobsError> {
        let (output, tasks, results) = {
            let live = self.lock()?;
            let l = live
                .get(id)
                .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
            let o = l
                .job
                .outputs
                .iter()
                .find(|o| o.binding == binding)
                .ok_or_else(|| {
                    JobsError::Missing(format!(
                        "job {id} has no output binding {binding} (it has {})",
                        l.job
                            .outputs
                            .iter()
                            .map(|o| o.binding.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            let pick: Vec<&super::TaskRecord> = match task {
                Some(n) => vec![l.tasks.get(n as usize).ok_or_else(|| {
                    JobsError::Missing(format!(
                        "job {id} has tasks 0 to {}, not {n}",
                        l.job.tasks.saturating_sub(1)
                    ))
                })?],
                None => l.tasks.iter().collect(),
            };
            let mut results = Vec::with_capacity(pick.len());
            for t in pick {
                let digest = t
                    .result
                    .as_ref()
                    .and_then(|r| r.iter().find(|d| d.binding == binding))
                    .ok_or_else(|| {
                        JobsError::NotReady(format!(
                            "task {} of job {id} is not verified yet",
                            t.index
                        ))
                    })?;
                results.push((digest.hash, digest.len));
            }
            (o.clone(), l.job.tasks, results)
        };
        let mut shape = output.dims();
        let name = match task {
            Some(n) => format!("out{binding}-task{n}.npy"),
            None => {
                shape.insert(0, u64::from(tasks));
                format!("out{binding}.npy")
            }
        };
        let mut segments = vec![Segment::Bytes(npy::header(output.elem, &shape))];
        for (hash, len) in results {
            segments.push(match self.inner.outputs.get(hash.as_bytes()).map_err(db)? {
                Some(v) => Segment::Bytes(v.to_vec()),
                None => Segment::File {
                    path: self.inner.blobs.path(&hash),
                    len,
                },
            });
        }
        Ok(OutputBody { name, segments })
    }

    /// An output's bytes, small (in the database) or large (a blob).
    pub(super) fn read_output(&self, hash: &Hash) -> Result<Vec<u8>, JobsError> {
        match self.inner.outputs.get(hash.as_bytes()).map_err(db)? {
            Some(v) => Ok(v.to_vec()),
            None => self.inner.blobs.read(hash).map_err(db),
        }
    }
}
