//! NumPy `.npy` files (format versions 1.0–3.0), the arrays researchers
//! already have: little-endian `f4`, `u4`, `i4` and `u1` in C order.

use std::fmt;

use alliance_protocol::task::ElemType;

const MAGIC: &[u8] = b"\x93NUMPY";

/// An array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Array {
    pub elem: ElemType,
    pub shape: Vec<u64>,
    /// The elements, little-endian, C order.
    pub data: Vec<u8>,
}

/// Why bytes are not a usable `.npy` array.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NpyError {
    #[error("not a .npy file (it does not start with \\x93NUMPY)")]
    NotNpy,
    #[error(".npy format version {0}.{1} is not supported (1.0, 2.0 and 3.0 are)")]
    Version(u8, u8),
    #[error("the .npy header is cut short or not text")]
    Header,
    #[error("the .npy header has no {0}")]
    Missing(&'static str),
    #[error(
        "dtype {0:?} is not supported: save the array as float32 ('<f4'), uint32 ('<u4'), int32 ('<i4') or uint8 ('|u1')"
    )]
    Dtype(String),
    #[error(
        "the array is in Fortran order: save it with np.ascontiguousarray(a) or np.save(f, a, allow_pickle=False) after a.copy(order='C')"
    )]
    FortranOrder,
    #[error("shape {shape:?} needs {expected} bytes of data but the file holds {found}")]
    Length {
        shape: Vec<u64>,
        expected: u64,
        found: u64,
    },
}

fn dtype(elem: ElemType) -> &'static str {
    match elem {
        ElemType::F32 => "<f4",
        ElemType::U32 => "<u4",
        ElemType::I32 => "<i4",
        ElemType::Bytes => "|u1",
    }
}

fn parse_dtype(text: &str) -> Result<ElemType, NpyError> {
    match text {
        "<f4" => Ok(ElemType::F32),
        "<u4" => Ok(ElemType::U32),
        "<i4" => Ok(ElemType::I32),
        "|u1" | "<u1" | "u1" => Ok(ElemType::Bytes),
        other => Err(NpyError::Dtype(other.to_owned())),
    }
}

/// The text after `'key':` in a header dictionary, trimmed.
fn field<'a>(header: &'a str, key: &'static str) -> Result<&'a str, NpyError> {
    let at = header
        .find(&format!("'{key}'"))
        .ok_or(NpyError::Missing(key))?;
    let rest = &header[at + key.len() + 2..];
    let colon = rest.find(':').ok_or(NpyError::Header)?;
    Ok(rest[colon + 1..].trim_start())
}

/// A `.npy` file's header: what its data is and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub elem: ElemType,
    pub shape: Vec<u64>,
    /// Bytes before the data.
    pub data_offset: u64,
}

impl Header {
    /// Bytes of data the shape needs.
    pub fn data_len(&self) -> Result<u64, NpyError> {
        self.shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|c| c.checked_mul(self.elem.size()))
            .ok_or(NpyError::Header)
    }

    /// Refuses a file of `total` bytes whose data does not fill the shape.
    fn check_len(&self, total: u64) -> Result<(), NpyError> {
        let expected = self.data_len()?;
        let found = total.saturating_sub(self.data_offset);
        if found != expected {
            return Err(NpyError::Length {
                shape: self.shape.clone(),
                expected,
                found,
            });
        }
        Ok(())
    }
}

/// Where the header dictionary of a file starting with `prefix` (at
/// least 12 bytes, or the whole file) lies: its start and length.
fn header_span(prefix: &[u8]) -> Result<(usize, usize), NpyError> {
    if prefix.len() < 10 || &prefix[..6] != MAGIC {
        return Err(NpyError::NotNpy);
    }
    let (major, minor) = (prefix[6], prefix[7]);
    match major {
        1 => Ok((10, usize::from(u16::from_le_bytes([prefix[8], prefix[9]])))),
        2 | 3 => {
            let raw: [u8; 4] = prefix
                .get(8..12)
                .and_then(|b| b.try_into().ok())
                .ok_or(NpyError::Header)?;
            let len = usize::try_from(u32::from_le_bytes(raw)).map_err(|_| NpyError::Header)?;
            Ok((12, len))
        }
        _ => Err(NpyError::Version(major, minor)),
    }
}

/// Reads the header dictionary's text.
fn parse_dict(header: &str, data_offset: u64) -> Result<Header, NpyError> {
    let descr = field(header, "descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or(NpyError::Header)?;
    let elem = parse_dtype(descr)?;
    if field(header, "fortran_order")?.starts_with("True") {
        return Err(NpyError::FortranOrder);
    }
    let shape_text = field(header, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or(NpyError::Header)?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<u64>())
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| NpyError::Header)?;
    Ok(Header {
        elem,
        shape,
        data_offset,
    })
}

/// The header of a `.npy` file of `total` bytes, read from its start
/// without reading its data; checks that the data fills the shape.
pub fn read_header(file: &mut impl std::io::Read, total: u64) -> Result<Header, NpyError> {
    /// Headers are short; a longer one is not a file numpy wrote.
    const MAX_HEADER: usize = 1 << 20;
    let mut prefix = [0u8; 12];
    let n = usize::try_from(total.min(12)).unwrap_or(12);
    file.read_exact(&mut prefix[..n])
        .map_err(|_| NpyError::Header)?;
    let (start, len) = header_span(&prefix[..n])?;
    if len > MAX_HEADER {
        return Err(NpyError::Header);
    }
    let mut text = prefix[start.min(n)..n].to_vec();
    let rest = (start + len).saturating_sub(n);
    let mut more = vec![0u8; rest];
    file.read_exact(&mut more).map_err(|_| NpyError::Header)?;
    text.extend_from_slice(&more);
    text.truncate(len);
    let header = std::str::from_utf8(&text).map_err(|_| NpyError::Header)?;
    let h = parse_dict(header, (start + len) as u64)?;
    h.check_len(total)?;
    Ok(h)
}

/// Parses a `.npy` file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Array, NpyError> {
    let (start, len) = header_span(bytes)?;
    let end = start.checked_add(len).ok_or(NpyError::Header)?;
    let header = bytes
        .get(start..end)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or(NpyError::Header)?;
    let h = parse_dict(header, end as u64)?;
    h.check_len(bytes.len() as u64)?;
    Ok(Array {
        elem: h.elem,
        shape: h.shape,
        data: bytes[end..].to_vec(),
    })
}

/// The header of a version 1.0 `.npy` file holding an array of `shape`;
/// the data follows it.
pub fn header(elem: ElemType, shape: &[u64]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("{one},"),
        more => more
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({dims}), }}",
        dtype(elem)
    );
    // Magic, version and length take 10 bytes; the header ends in a newline
    // and the data starts on a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.extend(std::iter::repeat_n(' ', pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(
        &u16::try_from(header.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(header.as_bytes());
    out
}

/// A `.npy` file (version 1.0) holding `data` as an array of `shape`.
pub fn write(elem: ElemType, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let mut out = header(elem, shape);
    out.extend_from_slice(data);
    out
}

impl fmt::Display for Array {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} array of shape {:?}", dtype(self.elem), self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data: Vec<u8> = (0..24u8).collect();
        let bytes = write(ElemType::F32, &[2, 3], &data);
        assert_eq!((bytes.len() - data.len()) % 64, 0);
        let a = parse(&bytes).unwrap();
        assert_eq!(a.elem, ElemType::F32);
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, data);
        let one = parse(&write(ElemType::U32, &[6], &data)).unwrap();
        assert_eq!(one.shape, vec![6]);
        let h = read_header(&mut &bytes[..], bytes.len() as u64).unwrap();
        assert_eq!((h.elem, h.shape), (ElemType::F32, vec![2, 3]));
        assert_eq!(h.data_offset, (bytes.len() - data.len()) as u64);
        assert!(read_header(&mut &bytes[..40], 40).is_err());
    }

    /// Bytes exactly as `np.save` writes `np.arange(3, dtype=np.float64)`.
    #[test]
    fn numpy_float64_is_refused_with_the_fix() {
        let mut bytes = b"\x93NUMPY\x01\x00v\x00".to_vec();
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }";
        let mut h = header.to_owned();
        h.extend(std::iter::repeat_n(' ', 118 - header.len() - 1));
        h.push('\n');
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[0; 24]);
        let err = parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("float32"), "{err}");
    }

    #[test]
    fn bad_files_are_named() {
        assert_eq!(parse(b"hello world"), Err(NpyError::NotNpy));
        let mut short = write(ElemType::U32, &[4], &[0; 16]);
        short.truncate(short.len() - 4);
        assert!(matches!(parse(&short), Err(NpyError::Length { .. })));
        let mut fortran = write(ElemType::U32, &[2, 2], &[0; 16]);
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(matches!(parse(&fortran), Err(NpyError::FortranOrder)));
    }
}
