//! Verified outputs, read back from the database or the blob store, as
//! `.npy` files.

use std::path::Path;

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

impl Jobs {
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
