//! The CLI's client of the API (ureq): where the node is and whose token
//! to send, JSON requests, uploads that resume, downloads that stream.
//!
//! The node is found, in order, from `--url` or `ALLIANCE_URL`, else the
//! `api.addr` file of the data directory; the token from `--token` or
//! `ALLIANCE_TOKEN`, else the node's own `api.token` when this user may
//! read it. `ALLIANCE_CA_CERT` (or `--ca-cert`) names the PEM certificate
//! to trust for a node that serves HTTPS with its own certificate.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alliance_protocol::Hash;
use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use super::{ADDR_FILE, CERT_FILE, TOKEN_FILE, URL_FILE};

/// Bytes hashed per read, and per part of an upload progress bar.
const READ: usize = 4 << 20;

/// Where to reach a node, and as whom.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--url`; else `ALLIANCE_URL`; else the data directory's node.
    pub url: Option<String>,
    /// `--token`; else `ALLIANCE_TOKEN`; else the node's own.
    pub token: Option<String>,
    /// `--ca-cert`; else `ALLIANCE_CA_CERT`.
    pub ca_cert: Option<PathBuf>,
    /// The data directory of a node on this machine.
    pub data_dir: PathBuf,
}

/// The address of the node running on `data_dir`, from its address file.
pub fn address(data_dir: &Path) -> anyhow::Result<SocketAddr> {
    let path = data_dir.join(ADDR_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        anyhow!(
            "no node is running on {}: start one with `alliance node run --data-dir {}`, or give --url (ALLIANCE_URL)",
            data_dir.display(),
            data_dir.display()
        )
    })?;
    text.trim()
        .parse()
        .with_context(|| format!("{} is damaged", path.display()))
}

/// A connection to one node's API.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Api {
    /// The node `t` names, as the user it names.
    pub fn new(t: &Target) -> anyhow::Result<Self> {
        let explicit = t.url.clone().or_else(|| env("ALLIANCE_URL"));
        let base = match &explicit {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let addr = address(&t.data_dir)?;
                std::fs::read_to_string(t.data_dir.join(URL_FILE))
                    .map_or_else(|_| format!("http://{addr}"), |u| u.trim().to_owned())
            }
        };
        let token = match t.token.clone().or_else(|| env("ALLIANCE_TOKEN")) {
            Some(tok) => tok,
            None => {
                let path = t.data_dir.join(TOKEN_FILE);
                std::fs::read_to_string(&path).map_err(|_| {
                    anyhow!(
                        "no token: give --token or ALLIANCE_TOKEN (an admin makes one with `alliance user add NAME`), or run this as the node's user, who may read {}",
                        path.display()
                    )
                })?
            }
        };
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Uploads go out in large writes: with ureq's 128 KiB default a
            // GiB takes 8,192 of them, each a wake-up of the node's side.
            .output_buffer_size(2 << 20)
            .timeout_connect(Some(Duration::from_secs(5)));
        if let Some(ca) = t
            .ca_cert
            .clone()
            .or_else(|| env("ALLIANCE_CA_CERT").map(PathBuf::from))
            // The node's own certificate, for a node on this machine.
            .or_else(|| {
                (explicit.is_none() && t.data_dir.join(CERT_FILE).exists())
                    .then(|| t.data_dir.join(CERT_FILE))
            })
        {
            let pem = std::fs::read(&ca)
                .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
            let cert = ureq::tls::Certificate::from_pem(&pem)
                .map_err(|e| anyhow!("{} is not a PEM certificate: {e}", ca.display()))?;
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                        cert,
                    ])))
                    .build(),
            );
        }
        Ok(Self {
            base,
            token: token.trim().to_owned(),
            agent: config.build().new_agent(),
        })
    }

    /// The node running on `data_dir`, as its own admin user.
    pub fn local(data_dir: &Path) -> anyhow::Result<Self> {
        Self::new(&Target {
            data_dir: data_dir.to_owned(),
            ..Target::default()
        })
    }

    /// The base address, for messages.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: &ureq::Error) -> anyhow::Error {
        anyhow!(
            "no node answers at {}: {e} (start one with `alliance node run`, or check --url / ALLIANCE_URL)",
            self.base
        )
    }

    /// The answer's status and body text.
    fn body(
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> anyhow::Result<(ureq::http::StatusCode, String)> {
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|e| anyhow!("the node's answer was cut short: {e}"))?;
        Ok((resp.status(), text))
    }

    /// The API's answer as JSON, or its error as a message with the hint.
    fn answer(&self, resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<Value> {
        let (status, text) = Self::body(resp)?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("the node answered {status} with non-JSON"))?;
        if !status.is_success() {
            bail!("{}", refusal(&value));
        }
        Ok(value)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// `GET path`, as it came.
    fn get_raw(&self, path: &str) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        self.agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", self.auth())
            .call()
            .map_err(|e| self.unreachable(&e))
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self.get_raw(path)?;
        self.answer(resp)
    }

    /// `GET path` of a text answer (`/metrics`).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let (status, text) = Self::body(self.get_raw(path)?)?;
        if !status.is_success() {
            bail!("the node answered {status}: {text}");
        }
        Ok(text)
    }

    /// `method path` with a body (JSON, or text for the revocation route).
    pub fn send(&self, method: &str, path: &str, body: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "POST" => self.agent.post(url),
            "PUT" => self.agent.put(url),
            "DELETE" => {
                let resp = self
                    .agent
                    .delete(url)
                    .header("Authorization", self.auth())
                    .call()
                    .map_err(|e| self.unreachable(&e))?;
                return self.answer(resp);
            }
            "GET" => return self.get(path),
            other => bail!("no {other} requests"),
        };
        let resp = req
            .header("Authorization", self.auth())
            .header("Content-Type", "application/json")
            .send(body)
            .map_err(|e| self.unreachable(&e))?;
        self.answer(resp)
    }

    /// Uploads the file at `path` as a blob, resuming an upload of it that
    /// was cut short; `progress` hears the bytes sent. Returns its hash.
    pub fn upload(&self, path: &Path, progress: &dyn Fn(u64, u64)) -> anyhow::Result<Hash> {
        let hash = hash_file(path)?;
        self.upload_hashed(path, hash, progress)?;
        Ok(hash)
    }

    /// [`Api::upload`] of a file whose hash is known already.
    pub fn upload_hashed(
        &self,
        path: &Path,
        hash: Hash,
        progress: &dyn Fn(u64, u64),
    ) -> anyhow::Result<()> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let status = self.get(&format!("/v1/blobs/{hash}"))?;
        if status["complete"].as_bool() == Some(true) {
            progress(len, len);
            return Ok(());
        }
        let from = status["received"].as_u64().unwrap_or(0).min(len);
        let mut f = File::open(path)?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from))?;
        let mut reader = Counting {
            inner: f,
            sent: from,
            len,
            progress,
        };
        let mut req = self
            .agent
            .put(format!("{}/v1/blobs/{hash}", self.base))
            .header("Authorization", self.auth())
            .header("Content-Type", "application/octet-stream");
        if len > 0 {
            req = req
                .header("Content-Range", format!("bytes {from}-{}/{len}", len - 1))
                .header("Content-Length", (len - from).to_string());
        }
        let resp = req
            .send(ureq::SendBody::from_reader(&mut reader))
            .map_err(|e| self.unreachable(&e))?;
        self.answer(resp)
            .with_context(|| format!("uploading {}", path.display()))?;
        Ok(())
    }

    /// Streams `GET path` into the file `to`; returns the bytes written.
    pub fn download(&self, path: &str, to: &Path) -> anyhow::Result<u64> {
        let resp = self.get_raw(path)?;
        if !resp.status().is_success() {
            return self.answer(resp).map(|_| 0);
        }
        let mut out = File::create(to).with_context(|| format!("cannot write {}", to.display()))?;
        let n = std::io::copy(&mut resp.into_body().into_reader(), &mut out)
            .with_context(|| format!("the download of {} was cut short", to.display()))?;
        out.flush()?;
        Ok(n)
    }
}

/// The API's error as a person reads it.
fn refusal(v: &Value) -> String {
    let e = &v["error"];
    let mut s = format!(
        "the node refused ({}): {}",
        e["code"].as_str().unwrap_or("?"),
        e["message"].as_str().unwrap_or("no reason given")
    );
    if let Some(h) = e["hint"].as_str().filter(|h| !h.is_empty()) {
        s.push_str("\n  fix: ");
        s.push_str(h);
    }
    s
}

/// The BLAKE3 of a file, read a few MiB at a time.
pub fn hash_file(path: &Path) -> anyhow::Result<Hash> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; READ];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(Hash::from(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// A reader that reports how far it got.
struct Counting<'a> {
    inner: File,
    sent: u64,
    len: u64,
    progress: &'a dyn Fn(u64, u64),
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        (self.progress)(self.sent, self.len);
        Ok(n)
    }
}

/// One request to the node running on `data_dir`, as its own admin.
pub fn request(data_dir: &Path, method: &str, path: &str, body: &str) -> anyhow::Result<Value> {
    Api::local(data_dir)?.send(method, path, body)
}
