//! The CLI's client of the API: the running node's address and token from
//! its data directory, and one request at a time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use super::{ADDR_FILE, TOKEN_FILE};

/// The address of the node running on `data_dir`, from its address file.
pub fn address(data_dir: &Path) -> anyhow::Result<SocketAddr> {
    let path = data_dir.join(ADDR_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow!(
            "no node is running on {}: start one with `alliance node run --data-dir {}`",
            data_dir.display(),
            data_dir.display()
        )
    })?;
    text.trim()
        .parse()
        .with_context(|| format!("{} is damaged", path.display()))
}

/// One request to the API; returns the JSON answer or the API's error.
pub fn request(
    data_dir: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<serde_json::Value> {
    let addr = address(data_dir)?;
    let token_path = data_dir.join(TOKEN_FILE);
    let token = std::fs::read_to_string(&token_path).with_context(|| {
        format!(
            "cannot read the node's API token {} (run this as the user the node runs as)",
            token_path.display()
        )
    })?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|_| {
        anyhow!(
            "no node answers at {addr} (from {}): start one with `alliance node run --data-dir {}`",
            data_dir.join(ADDR_FILE).display(),
            data_dir.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        token.trim(),
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.take(64 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("the node sent a malformed answer"))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let value: serde_json::Value = serde_json::from_str(body)
        .with_context(|| format!("the node answered {code} with non-JSON"))?;
    if !(200..300).contains(&code) {
        bail!(
            "the node refused: {}",
            value["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(value)
}
