//! Verified outputs, read back from the database or the blob store, as
//! `.npy` files: written to a directory, or laid out as [`OutputBody`]
//! segments the API streams without reading a large output whole.

use std::path::{Path, PathBuf};

use alliance_protocol::Hash;
use alliance_protocol::task::ElemType;

use crate::submit::npy;

use super::{Jobs, JobsError, db};

pub(super) fn write_npy(
    dir: &Path,
    name: &str,
    elem: ElemType,
    shape: &[u64],
    data: &[u8],
) -> Result<(), JobsError> {
    let path = dir.join(name);
    std::fs::write(&path, npy::write(elem, shape, data))
        .map_err(|e| JobsError::Refused(format!("cannot write {}: {e}", path.display())))
}

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
    pub fn len(&self) -> u64 {
        match self {
            Segment::Bytes(b) => b.len() as u64,
            Segment::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    pub fn len(&self) -> u64 {
        self.segments.iter().map(Segment::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Writes a job's verified outputs to `out` as `.npy` files: one per
    /// output and task (`out<B>-task<N>.npy`), or with `concat` one per
    /// output holding every task's part in task order (`out<B>.npy`).
    pub fn export(&self, id: &str, out: &Path, concat: bool) -> Result<Vec<String>, JobsError> {
        let (job, tasks) = {
            let live = self.lock()?;
            let l = live
                .get(id)
                .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
            (l.job.clone(), l.tasks.clone())
        };
        std::fs::create_dir_all(out)
            .map_err(|e| JobsError::Refused(format!("cannot create {}: {e}", out.display())))?;
        let mut written = Vec::new();
        for o in &job.outputs {
            let mut all = Vec::new();
            let mut complete = true;
            for t in &tasks {
                let Some(d) = t
                    .result
                    .as_ref()
                    .and_then(|r| r.iter().find(|d| d.binding == o.binding))
                else {
                    complete = false;
                    continue;
                };
                let bytes = self.read_output(&d.hash)?;
                if concat {
                    all.extend_from_slice(&bytes);
                } else {
                    let name = format!("out{}-task{}.npy", o.binding, t.index);
                    write_npy(out, &name, o.elem, &o.dims(), &bytes)?;
                    written.push(name);
                }
            }
            if concat {
                if !complete {
                    return Err(JobsError::Refused(format!(
                        "not every task of job {id} is verified yet; export them one per task, or wait"
                    )));
                }
                let name = format!("out{}.npy", o.binding);
                let mut shape = vec![u64::from(job.tasks)];
                shape.extend(o.dims());
                write_npy(out, &name, o.elem, &shape, &all)?;
                written.push(name);
            }
        }
        Ok(written)
    }
}
