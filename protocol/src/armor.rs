//! The text form of records kept in files and passed between people.
//!
//! Charters and certificates travel by e-mail and chat between alliance
//! operators and lab admins, so their files are text:
//!
//! ```text
//! -----BEGIN ALLIANCE INSTITUTION CERTIFICATE-----
//! <base64 of the signed envelope, 64 characters a line>
//! -----END ALLIANCE INSTITUTION CERTIFICATE-----
//! ```
//!
//! A file may hold several blocks (a node's chain file holds its
//! institution's certificate and its own). Parsing is strict: any byte out
//! of place is an error that says where.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Label of a block; names the record type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Charter,
    InstitutionCertificate,
    NodeCertificate,
    Revocations,
}

impl Label {
    const ALL: [Label; 4] = [
        Label::Charter,
        Label::InstitutionCertificate,
        Label::NodeCertificate,
        Label::Revocations,
    ];

    /// The text between `BEGIN ` and the dashes.
    pub const fn as_str(self) -> &'static str {
        match self {
            Label::Charter => "ALLIANCE CHARTER",
            Label::InstitutionCertificate => "ALLIANCE INSTITUTION CERTIFICATE",
            Label::NodeCertificate => "ALLIANCE NODE CERTIFICATE",
            Label::Revocations => "ALLIANCE REVOCATIONS",
        }
    }
}

/// Why armored text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArmorError {
    #[error("line {line}: expected a `-----BEGIN ALLIANCE …-----` line, found {found:?}")]
    NoBegin { line: usize, found: String },
    #[error("line {line}: unknown block type {label:?}")]
    UnknownLabel { line: usize, label: String },
    #[error("the {label} block that starts on line {line} has no matching END line")]
    NoEnd { line: usize, label: &'static str },
    #[error("line {line}: not base64 ({detail}); the file was damaged or edited")]
    BadBase64 { line: usize, detail: String },
    #[error("the file holds no block")]
    Empty,
    #[error("the file is {size} bytes, more than the {max} bytes a record file may have")]
    TooLarge { size: usize, max: usize },
}

/// Largest armored file accepted.
pub const MAX_ARMOR_BYTES: usize = 512 * 1024;

/// One block as text, ending in a newline.
pub fn encode(label: Label, bytes: &[u8]) -> String {
    let body = STANDARD.encode(bytes);
    let mut out = format!("-----BEGIN {}-----\n", label.as_str());
    for chunk in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so each chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {}-----\n", label.as_str()));
    out
}

/// Every block in `text`, in order.
pub fn decode(text: &str) -> Result<Vec<(Label, Vec<u8>)>, ArmorError> {
    if text.len() > MAX_ARMOR_BYTES {
        return Err(ArmorError::TooLarge {
            size: text.len(),
            max: MAX_ARMOR_BYTES,
        });
    }
    let mut blocks = Vec::new();
    let mut lines = text
        .split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .peekable();
    while let Some((line, l)) = lines.next() {
        if l.is_empty() {
            continue;
        }
        let label_text = l
            .strip_prefix("-----BEGIN ")
            .and_then(|r| r.strip_suffix("-----"))
            .ok_or_else(|| ArmorError::NoBegin {
                line,
                found: l.chars().take(60).collect(),
            })?;
        let label = Label::ALL
            .into_iter()
            .find(|l| l.as_str() == label_text)
            .ok_or_else(|| ArmorError::UnknownLabel {
                line,
                label: label_text.chars().take(60).collect(),
            })?;
        let end = format!("-----END {}-----", label.as_str());
        let mut body = String::new();
        let mut closed = false;
        for (_, l) in lines.by_ref() {
            if l == end {
                closed = true;
                break;
            }
            body.push_str(l);
        }
        if !closed {
            return Err(ArmorError::NoEnd {
                line,
                label: label.as_str(),
            });
        }
        let bytes = STANDARD
            .decode(body.as_bytes())
            .map_err(|e| ArmorError::BadBase64 {
                line: line + 1,
                detail: e.to_string(),
            })?;
        blocks.push((label, bytes));
    }
    if blocks.is_empty() {
        return Err(ArmorError::Empty);
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_several_blocks() {
        let a: Vec<u8> = (0..200u8).collect();
        let b = vec![7u8; 3];
        let text = encode(Label::InstitutionCertificate, &a) + &encode(Label::NodeCertificate, &b);
        let blocks = decode(&text).unwrap();
        assert_eq!(
            blocks,
            vec![
                (Label::InstitutionCertificate, a),
                (Label::NodeCertificate, b)
            ]
        );
    }

    #[test]
    fn every_flipped_byte_is_noticed_or_changes_the_bytes() {
        let data: Vec<u8> = (0..100u8).collect();
        let text = encode(Label::Charter, &data);
        for i in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[i] ^= 0x01;
            let Ok(t) = String::from_utf8(bytes) else {
                continue;
            };
            match decode(&t) {
                Err(_) => {}
                Ok(blocks) => assert_ne!(blocks, vec![(Label::Charter, data.clone())], "byte {i}"),
            }
        }
    }

    #[test]
    fn errors_say_where() {
        assert!(matches!(
            decode("hello"),
            Err(ArmorError::NoBegin { line: 1, .. })
        ));
        assert!(matches!(
            decode("-----BEGIN ALLIANCE CHARTER-----\nAAAA\n"),
            Err(ArmorError::NoEnd { line: 1, .. })
        ));
        assert!(matches!(
            decode("-----BEGIN ALLIANCE CHARTER-----\n!!!!\n-----END ALLIANCE CHARTER-----\n"),
            Err(ArmorError::BadBase64 { .. })
        ));
        assert_eq!(decode("\n\n"), Err(ArmorError::Empty));
    }
}
