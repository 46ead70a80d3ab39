//! A job's inputs: where each one's bytes are (values in the job file, or
//! a range of a file found through [`Files`]), how they split across
//! tasks, and each task's part, read only when it is wanted.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alliance_protocol::Hash;
use alliance_protocol::task::ElemType;

use super::{Elem, FIX, InputFile, InputKind, numpy_name};
use crate::store::blobs::Blobs;
use crate::submit::npy;

/// Where the files a job names are found.
pub trait Files {
    /// The file the job calls `name`, or why it cannot be had.
    fn locate(&self, name: &str) -> Result<Located, String>;
}

/// A file a job names, found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub path: PathBuf,
    pub len: u64,
    /// Its hash, when it is a blob of the store.
    pub hash: Option<Hash>,
    /// How messages name it.
    pub shown: String,
}

/// Files beside the job file, in a directory.
#[derive(Debug, Clone, Copy)]
pub struct Dir<'a>(pub &'a Path);

impl Files for Dir<'_> {
    fn locate(&self, name: &str) -> Result<Located, String> {
        let path = self.0.join(name);
        let meta =
            std::fs::metadata(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(Located {
            shown: path.display().to_string(),
            path,
            len: meta.len(),
            hash: None,
        })
    }
}

/// Files uploaded to the blob store, by the names the job gives them.
#[derive(Debug, Clone, Copy)]
pub struct Uploaded<'a> {
    pub names: &'a BTreeMap<String, Hash>,
    pub blobs: &'a Blobs,
}

impl Files for Uploaded<'_> {
    fn locate(&self, name: &str) -> Result<Located, String> {
        let hash = self.names.get(name).ok_or_else(|| {
            format!(
                "{name} is not among the job's files: upload it (PUT /v1/blobs/<its blake3>) and name it in \"files\""
            )
        })?;
        let path = self.blobs.path(hash);
        let meta = std::fs::metadata(&path).map_err(|_| {
            format!("{name} (blob {hash}) is not on this node: upload it before the job")
        })?;
        Ok(Located {
            path,
            len: meta.len(),
            hash: Some(*hash),
            shown: name.to_owned(),
        })
    }
}

/// Where an input's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Values written in the job file.
    Values(Arc<[u8]>),
    /// A file's bytes from `offset` on (after a `.npy` file's header);
    /// `hash` is theirs when the file is a blob holding only them.
    File {
        path: PathBuf,
        offset: u64,
        hash: Option<Hash>,
    },
}

/// A loaded input: located, its parts worked out, not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub binding: u32,
    pub kind: InputKind,
    pub elem: ElemType,
    pub source: Source,
    /// Bytes in all.
    pub len: u64,
    /// Split across the tasks along its first axis.
    pub split: bool,
    /// Parts: the tasks when split, else one that every task gets.
    pub parts: u32,
    /// The whole input's shape.
    pub shape: Vec<u64>,
    /// The file it came from, for messages; empty for values.
    pub from: String,
}

impl Input {
    /// Bytes in each task's part.
    pub fn part_len(&self) -> u64 {
        self.len / u64::from(self.parts.max(1))
    }

    /// Each task's part's shape.
    pub fn part_shape(&self) -> Vec<u64> {
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first /= u64::from(self.parts.max(1));
        }
        shape
    }

    /// Where task `index`'s part starts, within the input's bytes.
    pub fn part_start(&self, index: u32) -> u64 {
        if self.split {
            u64::from(index) * self.part_len()
        } else {
            0
        }
    }

    /// Task `index`'s bytes, read.
    pub fn bytes(&self, index: u32) -> io::Result<Vec<u8>> {
        let (start, len) = (self.part_start(index), self.part_len());
        match &self.source {
            Source::Values(v) => {
                let at = |n: u64| usize::try_from(n).map_err(io::Error::other);
                Ok(v.get(at(start)?..at(start + len)?)
                    .unwrap_or_default()
                    .to_vec())
            }
            Source::File { path, offset, .. } => {
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(offset + start))?;
                let mut out = vec![0; usize::try_from(len).map_err(io::Error::other)?];
                f.read_exact(&mut out)?;
                Ok(out)
            }
        }
    }

    /// Locates and checks the input `i` of a job of `tasks` tasks.
    pub(super) fn load(i: &InputFile, files: &dyn Files, tasks: u32) -> Result<Self, String> {
        let b = i.binding;
        let declared: Option<ElemType> = i.elem.map(Into::into);
        let (elem, shape, source, from) = match (&i.file, &i.values) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "input binding {b}: give either file or values, not both"
                ));
            }
            (None, None) => return Err(format!("input binding {b}: give a file or values")),
            (None, Some(values)) => {
                let elem = i.elem.ok_or_else(|| {
                    format!("input binding {b}: values need a type (type = \"f32\", \"u32\", \"i32\" or \"u8\")")
                })?;
                let bytes = value_bytes(values, elem, b)?;
                let shape = declared_shape(i, values.len() as u64)?;
                (
                    elem.into(),
                    shape,
                    Source::Values(bytes.into()),
                    String::new(),
                )
            }
            (Some(f), None) => {
                let name = f.to_string_lossy();
                let at = files
                    .locate(&name)
                    .map_err(|e| format!("input binding {b}: {e}"))?;
                let (elem, shape, source) = if f
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
                {
                    npy_input(i, &at, declared)?
                } else {
                    let elem = declared.unwrap_or(ElemType::Bytes);
                    if !at.len.is_multiple_of(elem.size()) {
                        return Err(format!(
                            "input binding {b}: {} has {} bytes, not a whole number of {}-byte elements",
                            at.shown,
                            at.len,
                            elem.size()
                        ));
                    }
                    let shape = declared_shape(i, at.len / elem.size())?;
                    let source = Source::File {
                        path: at.path.clone(),
                        offset: 0,
                        hash: at.hash,
                    };
                    (elem, shape, source)
                };
                (elem, shape, source, at.shown)
            }
        };
        if i.kind == InputKind::State
            && i.elem.is_none()
            && i.values.is_none()
            && elem == ElemType::Bytes
        {
            return Err(format!("input binding {b}: a state buffer needs a type"));
        }
        let count: u64 = shape.iter().product();
        let rows = shape.first().copied().unwrap_or(1);
        if i.split && !rows.is_multiple_of(u64::from(tasks)) {
            return Err(format!(
                "input binding {b}: {rows} rows do not split evenly into {tasks} tasks"
            ));
        }
        Ok(Self {
            binding: b,
            kind: i.kind,
            elem,
            source,
            len: count * elem.size(),
            split: i.split,
            parts: if i.split { tasks } else { 1 },
            shape,
            from,
        })
    }
}

/// The input's shape as declared, checked against its `count` elements;
/// `[count]` when none is.
fn declared_shape(i: &InputFile, count: u64) -> Result<Vec<u64>, String> {
    let Some(shape) = &i.shape else {
        return Ok(vec![count]);
    };
    let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    if shape.is_empty() || n != Some(count) {
        return Err(format!(
            "input binding {}: shape {shape:?} does not hold its {count} elements",
            i.binding
        ));
    }
    Ok(shape.clone())
}

/// A `.npy` input: its header read, its dtype and shape checked against
/// what the job declares; the data is the file after the header.
fn npy_input(
    i: &InputFile,
    at: &Located,
    declared: Option<ElemType>,
) -> Result<(ElemType, Vec<u64>, Source), String> {
    let b = i.binding;
    let mut f = File::open(&at.path)
        .map_err(|e| format!("input binding {b}: cannot read {}: {e}", at.shown))?;
    let h = npy::read_header(&mut f, at.len).map_err(|e| match e {
        npy::NpyError::Dtype(d) => format!(
            "input binding {b}: {} holds dtype {d:?}, which kernels cannot read{FIX}convert it with a.astype(np.float32), np.uint32, np.int32 or np.uint8 (as the kernel declares it)",
            at.shown
        ),
        e => format!("input binding {b}: {}: {e}", at.shown),
    })?;
    if let Some(d) = declared
        && d != h.elem
    {
        return Err(format!(
            "input binding {b}: {} holds a {} array, but the job says type = {:?}{FIX}convert it with a.astype(np.{}) or change the type",
            at.shown,
            numpy_name(h.elem),
            i.elem
                .map_or("?".to_owned(), |e: Elem| format!("{e:?}").to_lowercase()),
            numpy_name(d)
        ));
    }
    if let Some(s) = &i.shape
        && *s != h.shape
    {
        return Err(format!(
            "input binding {b}: {} has shape {:?}, but the job says shape = {s:?}; drop shape (a .npy file carries its own) or make them agree",
            at.shown, h.shape
        ));
    }
    let shape = if h.shape.is_empty() { vec![1] } else { h.shape };
    let source = Source::File {
        path: at.path.clone(),
        offset: h.data_offset,
        hash: None,
    };
    Ok((h.elem, shape, source))
}

fn value_bytes(values: &[toml::Value], elem: Elem, binding: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for (i, v) in values.iter().enumerate() {
        let bad = || {
            format!(
                "input binding {binding}: values[{i}] = {v} is not a {elem:?} value",
                elem = elem
            )
        };
        match elem {
            Elem::F32 => {
                #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
                let x = match v {
                    toml::Value::Float(f) => *f as f32,
                    toml::Value::Integer(n) => *n as f32,
                    _ => return Err(bad()),
                };
                out.extend_from_slice(&x.to_le_bytes());
            }
            Elem::U32 => {
                let n = v
                    .as_integer()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            Elem::I32 => {
                let n = v
                    .as_integer()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(bad)?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            Elem::U8 => {
                let n = v
                    .as_integer()
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(bad)?;
                out.push(n);
            }
        }
    }
    Ok(out)
}
