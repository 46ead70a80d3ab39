//! The node's configuration file.
//!
//! One [`Config`] with a doc comment and a default for every field; the
//! committed `alliance.example.toml` is the documented form and is what
//! `alliance init` writes. Relative paths resolve against the data
//! directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use alliance_kernels::gpu::Selection;
use alliance_kernels::intake::Limits;
use alliance_kernels::sandbox::ResourceLimits;
use serde::{Deserialize, Serialize};

use crate::work::policy::{IdleConfig, Policy, PolicyPatch};

/// The documented example configuration, written by `alliance init`.
pub const EXAMPLE: &str = include_str!("../alliance.example.toml");

/// Name of the configuration file in the data directory.
pub const FILE_NAME: &str = "alliance.toml";

/// Environment variable naming the data directory.
pub const DATA_DIR_ENV: &str = "ALLIANCE_DATA_DIR";

/// A node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the node keeps its key, certificates, database and caches.
    pub data_dir: Option<PathBuf>,
    /// The node's key file.
    pub key_file: PathBuf,
    /// The alliance charter file.
    pub charter: PathBuf,
    /// This node's certificate chain file.
    pub chain: PathBuf,
    /// Revocation list files loaded at start.
    pub revocations: Vec<PathBuf>,
    /// What this node lends and on what terms.
    pub worker: WorkerConfig,
    /// Peer-to-peer settings.
    pub network: NetworkConfig,
    /// Local HTTP API settings.
    pub api: ApiConfig,
    /// What the node logs, and how.
    pub log: LogConfig,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object a line, with the ids of the job, task and peer as
    /// fields (of the event and of its spans).
    Json,
}

/// What the node logs, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`; `alliance node run --log-format` overrides it.
    pub format: LogFormat,
    /// Which lines, as `RUST_LOG` says them (`RUST_LOG` overrides it).
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: crate::cli::DEFAULT_LOG.into(),
        }
    }
}

/// What this node lends and on what terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Which GPUs are lent.
    pub gpus: Selection,
    /// Tasks each GPU holds at once: one runs, the rest wait their turn
    /// at the worker, so the GPU does not wait for the network between
    /// small tasks.
    pub tasks_per_gpu: u16,
    /// The owner's shares by institution name: a waiting task of an
    /// institution with a larger share runs first; equal shares go by
    /// balance. Unlisted institutions have share 1.
    pub shares: std::collections::BTreeMap<String, u32>,
    /// Limits on kernels and tasks run for others.
    pub limits: Limits,
    /// OS limits on the sandbox process.
    pub sandbox: ResourceLimits,
    /// The owner's terms for every lent GPU.
    pub policy: Policy,
    /// What differs for single GPUs, by index: `[worker.gpu.1]`.
    pub gpu: std::collections::BTreeMap<String, PolicyPatch>,
    /// How the node tells that the owner uses a GPU.
    pub idle: IdleConfig,
    /// Standard library kernels each GPU compiles when the worker starts,
    /// so tasks of them pay no compile time (default: all of them; `[]`
    /// for none).
    pub warm: Vec<String>,
    /// How long a task's kernel may take to compile before the task is
    /// failed; the task's own `timeout_secs` starts after it.
    pub compile_timeout_secs: u64,
}

/// Peer-to-peer settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Multiaddresses to listen on.
    pub listen: Vec<String>,
    /// Bootstrap nodes to dial besides the charter's.
    pub bootstrap: Vec<String>,
    /// Discover alliance nodes on the local network.
    pub mdns: bool,
    /// The alliance's pre-shared key file, if it has one (libp2p private
    /// network: nodes without the same key cannot connect at all).
    pub psk_file: Option<PathBuf>,
    /// Connection limits.
    pub limits: ConnectionLimits,
    /// What a bootstrap node relays for members that cannot be reached
    /// directly.
    pub relay: RelayLimits,
}

/// The relay a bootstrap node runs: how many members it relays for and how
/// much one relayed connection may carry. A lab behind a NAT that defeats
/// hole punching moves its blobs through here, so a circuit must hold a
/// large blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayLimits {
    /// Members holding a relayed address on this node at once.
    pub max_reservations: u32,
    /// Relayed connections at once, in all.
    pub max_circuits: u32,
    /// Bytes one relayed connection may carry, both ways together, before
    /// the relay closes it (the peers then reconnect).
    pub max_circuit_bytes: u64,
    /// How long one relayed connection may last, in seconds.
    pub max_circuit_secs: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_circuits: 64,
            max_circuit_bytes: 4 << 30,
            max_circuit_secs: 3600,
        }
    }
}

/// Connection limits of the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Open connections in all.
    pub max_connections: u32,
    /// Open connections that others started.
    pub max_incoming: u32,
    /// Connections being set up, each way.
    pub max_pending: u32,
    /// Connections to one peer.
    pub max_per_peer: u32,
    /// Refuse new connections while the machine uses more than this
    /// percentage of its memory.
    pub max_memory_percent: u8,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_incoming: 192,
            max_pending: 64,
            max_per_peer: 2,
            max_memory_percent: 90,
        }
    }
}

/// Local HTTP API settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the API and dashboard.
    pub listen: SocketAddr,
    /// What one API user may hold at once.
    pub per_user: crate::api::UserLimits,
    /// PEM certificate chain the API serves HTTPS with; needed (with
    /// `tls_key`) to listen anywhere but loopback.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: None,
            key_file: "node.key".into(),
            charter: "charter.alliance".into(),
            chain: "node.chain".into(),
            revocations: Vec::new(),
            worker: WorkerConfig::default(),
            network: NetworkConfig::default(),
            api: ApiConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            gpus: Selection::default(),
            tasks_per_gpu: 32,
            shares: std::collections::BTreeMap::new(),
            limits: Limits::default(),
            sandbox: ResourceLimits::default(),
            policy: Policy::default(),
            gpu: std::collections::BTreeMap::new(),
            idle: IdleConfig::default(),
            warm: alliance_kernels::library::KERNELS
                .iter()
                .map(|k| k.name.to_owned())
                .collect(),
            compile_timeout_secs: 300,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            psk_file: None,
            limits: ConnectionLimits::default(),
            relay: RelayLimits::default(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            per_user: crate::api::UserLimits::default(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "config file {path}: {field} = {value:?} is not a multiaddress ({why}); write it like \"/ip4/0.0.0.0/tcp/4001\""
    )]
    BadAddress {
        path: PathBuf,
        field: &'static str,
        value: String,
        why: String,
    },
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        for (field, list) in [
            ("network.listen", &config.network.listen),
            ("network.bootstrap", &config.network.bootstrap),
        ] {
            for value in list {
                check_multiaddr(value).map_err(|why| ConfigError::BadAddress {
                    path: path.to_owned(),
                    field,
                    value: value.clone(),
                    why,
                })?;
            }
        }
        if config.worker.tasks_per_gpu == 0 {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "worker.tasks_per_gpu = 0: a GPU must take at least one task".into(),
            });
        }
        let w = &config.worker;
        if let Some(name) = w
            .warm
            .iter()
            .find(|n| alliance_kernels::library::get(n).is_none())
        {
            let names: Vec<&str> = alliance_kernels::library::KERNELS
                .iter()
                .map(|k| k.name)
                .collect();
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "worker.warm names {name:?}, which is not a library kernel; the library has {}",
                    names.join(", ")
                ),
            });
        }
        if w.compile_timeout_secs == 0 {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "worker.compile_timeout_secs = 0: a kernel needs time to compile; the default is 300".into(),
            });
        }
        for key in w.gpu.keys() {
            if key.parse::<usize>().is_err() {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!(
                        "[worker.gpu.{key}]: name a GPU by its index in `alliance gpus --local`, e.g. [worker.gpu.0]"
                    ),
                });
            }
        }
        let indices = w.gpu.keys().filter_map(|k| k.parse::<usize>().ok());
        for index in std::iter::once(usize::MAX).chain(indices) {
            crate::work::policy::for_gpu(&w.policy, &w.gpu, index, w.tasks_per_gpu).map_err(
                |message| ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                },
            )?;
        }
        if w.idle.poll_ms < 50 {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "worker.idle.poll_ms = {} is too often; read the signals at most every 50 ms",
                    w.idle.poll_ms
                ),
            });
        }
        let r = &config.network.relay;
        if r.max_circuit_secs == 0 || r.max_circuit_secs > u64::from(u32::MAX) {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "network.relay.max_circuit_secs = {} must be between 1 and {}",
                    r.max_circuit_secs,
                    u32::MAX
                ),
            });
        }
        let l = &config.network.limits;
        if l.max_memory_percent == 0 || l.max_memory_percent > 100 {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "network.limits.max_memory_percent = {} must be between 1 and 100",
                    l.max_memory_percent
                ),
            });
        }
        Ok(config)
    }

    /// `path` resolved against the data directory.
    pub fn resolve(&self, data_dir: &Path, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            data_dir.join(path)
        }
    }
}

/// Checks that `text` is a multiaddress.
pub fn check_multiaddr(text: &str) -> Result<(), String> {
    text.parse::<multiaddr::Multiaddr>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The data directory: the explicit choice, else `$ALLIANCE_DATA_DIR`, else
/// `$XDG_DATA_HOME/alliance`, else `~/.local/share/alliance`.
pub fn data_dir(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return Some(dir.to_owned());
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env(DATA_DIR_ENV)
        .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("alliance")))
        .or_else(|| env("HOME").map(|h| h.join(".local/share/alliance")))
}

/// Every configuration key as a Markdown reference: its section, type,
/// default and meaning (`docs/config-reference.md`, `alliance node
/// config-reference`).
///
/// Keys, types and defaults come from the type itself, `Config::default()`
/// serialised; the meaning of each is the comment above it in
/// [`EXAMPLE`], which a test holds equal to the default. A key with a
/// default that the example does not explain is an error, so the
/// reference cannot fall behind the type. Keys unset by default are not in
/// the serialised default: the reference lists those the example shows
/// commented out (`# key = value`), and misses one the example leaves out.
pub fn reference() -> Result<String, String> {
    let value = toml::Value::try_from(Config::default()).map_err(|e| e.to_string())?;
    let docs = example_docs();
    let mut rows: Vec<Row> = Vec::new();
    walk(&value, "", &docs, &mut rows);
    // Keys unset by default: documented commented out in the example.
    for ((section, key), (meaning, shown)) in &docs {
        if shown.is_some() && !rows.iter().any(|r| &r.0 == section && &r.1 == key) {
            let example = shown.clone().unwrap_or_default();
            rows.push((
                section.clone(),
                key.clone(),
                type_of_text(&example).into(),
                format!("unset (e.g. `{example}`)"),
                meaning.clone(),
            ));
        }
    }
    let mut out = String::from(
        "# Configuration reference\n\nEvery key of `alliance.toml` (`alliance init` writes it with these defaults; any key may be left out). Made by `alliance node config-reference` from the config type and the comments in `node/alliance.example.toml`; a test fails when this file is stale.\n",
    );
    // Rows of a section are together but for the unset keys added last.
    let sections: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let mut seen = std::collections::BTreeSet::new();
    for section in sections {
        if !seen.insert(section.clone()) {
            continue;
        }
        let title = if section.is_empty() {
            "top level".to_owned()
        } else {
            format!("`[{section}]`")
        };
        out.push_str(&format!(
            "\n## {title}\n\n| key | type | default | meaning |\n|---|---|---|---|\n"
        ));
        for (_, key, ty, default, meaning) in rows.iter().filter(|r| r.0 == section) {
            let meaning = meaning.replace('|', "\\|");
            if meaning.is_empty() {
                return Err(format!(
                    "{section}.{key} has no comment in node/alliance.example.toml: say what it does there"
                ));
            }
            out.push_str(&format!("| `{key}` | {ty} | {default} | {meaning} |\n"));
        }
    }
    Ok(out)
}

type Row = (String, String, String, String, String);

type Docs = std::collections::BTreeMap<(String, String), (String, Option<String>)>;

fn walk(value: &toml::Value, section: &str, docs: &Docs, rows: &mut Vec<Row>) {
    let Some(table) = value.as_table() else {
        return;
    };
    // Plain keys first, then sub-sections, as the file reads.
    for (key, v) in table {
        let sub_section = v.as_table().is_some_and(|t| {
            !t.is_empty() && !docs.contains_key(&(section.to_owned(), key.clone()))
        });
        if sub_section {
            continue;
        }
        let meaning = docs
            .get(&(section.to_owned(), key.clone()))
            .map(|d| d.0.clone())
            .unwrap_or_default();
        rows.push((
            section.to_owned(),
            key.clone(),
            type_of(v).into(),
            format!("`{v}`"),
            meaning,
        ));
    }
    for (key, v) in table {
        if let Some(t) = v.as_table()
            && !t.is_empty()
            && !docs.contains_key(&(section.to_owned(), key.clone()))
        {
            let name = if section.is_empty() {
                key.clone()
            } else {
                format!("{section}.{key}")
            };
            walk(v, &name, docs, rows);
        }
    }
}

fn type_of(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "string",
        toml::Value::Integer(_) => "integer",
        toml::Value::Float(_) => "float",
        toml::Value::Boolean(_) => "boolean",
        toml::Value::Datetime(_) => "datetime",
        toml::Value::Array(_) => "array",
        toml::Value::Table(_) => "table",
    }
}

fn type_of_text(example: &str) -> &'static str {
    let value = example.split_once('=').map_or("", |(_, v)| v.trim());
    toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|t| t.get("v").map(type_of))
        .unwrap_or("string")
}

/// `(section, key)` → (the comment above the key, and the line itself
/// when it is commented out), from [`EXAMPLE`].
fn example_docs() -> Docs {
    let mut docs = std::collections::BTreeMap::new();
    let mut section = String::new();
    let mut comment: Vec<String> = Vec::new();
    // A comment after a key explains the keys below it, not that one.
    let mut after_key = false;
    let key_of = |line: &str| -> Option<String> {
        let (k, _) = line.split_once(" = ")?;
        let k = k.trim();
        (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .then(|| k.to_owned())
    };
    for line in EXAMPLE.lines() {
        let line = line.trim();
        if line.is_empty() {
            comment.clear();
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            comment.clear();
        } else if let Some(text) = line.strip_prefix('#') {
            let text = text.trim();
            if std::mem::take(&mut after_key) {
                comment.clear();
            }
            if let Some(name) = text.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                // `# [worker.gpu.1]`: an example of a map's sections.
                let parts: Vec<&str> = name.split('.').collect();
                if let [parent @ .., key, _] = &parts[..] {
                    docs.entry((parent.join("."), (*key).to_owned()))
                        .or_insert_with(|| (comment.join(" "), None));
                }
            } else if let Some(key) = key_of(text) {
                // A key shown commented out: unset by default.
                docs.entry((section.clone(), key))
                    .or_insert_with(|| (comment.join(" "), Some(text.to_owned())));
            } else {
                comment.push(text.to_owned());
            }
        } else if let Some(key) = key_of(line) {
            let meaning = if comment.is_empty() {
                line.split_once(" # ")
                    .map(|(_, c)| c.trim().to_owned())
                    .unwrap_or_default()
            } else {
                comment.join(" ")
            };
            docs.insert((section.clone(), key), (meaning, None));
            after_key = true;
        }
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_reference_is_current() {
        let made = reference().unwrap();
        let kept = include_str!("../../docs/config-reference.md");
        assert!(
            made == kept,
            "docs/config-reference.md is stale: run `alliance node config-reference > docs/config-reference.md`"
        );
    }

    #[test]
    fn example_is_the_default() {
        let parsed = Config::parse(EXAMPLE, Path::new("alliance.example.toml")).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(
            Config::parse("", Path::new("x")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::parse("[network]\nmdsn = false\n", Path::new("a.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mdsn") && msg.contains("a.toml"), "{msg}");
    }

    #[test]
    fn bad_address_is_named() {
        let err = Config::parse(
            "[network]\nlisten = [\"0.0.0.0:4001\"]\n",
            Path::new("a.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("network.listen") && msg.contains("/ip4/"),
            "{msg}"
        );
    }

    #[test]
    fn gpu_selection_forms() {
        let c = Config::parse(
            "[worker]\ngpus = { indices = [0, 2] }\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.worker.gpus, Selection::Indices(vec![0, 2]));
        let c = Config::parse(
            "[worker]\ngpus = { name-contains = \"A100\" }\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.worker.gpus, Selection::NameContains("A100".into()));
        let err =
            Config::parse("[worker.limits]\nmax_steps = -1\n", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("max_steps"), "{err}");
    }

    #[test]
    fn owner_policy_is_checked_at_load() {
        let c = Config::parse(
            "[worker.policy]\nwindows = [\"Mon-Fri 19:00-07:00\"]\ntimezone = \"Europe/Berlin\"\ndeny = [\"U\"]\n[worker.gpu.1]\nshared = false\n[worker.idle]\nbusy_processes = [\"blender\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.worker.policy.deny, ["U"]);
        assert_eq!(c.worker.gpu["1"].shared, Some(false));
        for (text, want) in [
            ("[worker.policy]\nwindows = [\"Mon-Fry\"]\n", "Fry"),
            ("[worker.gpu.1]\ntimezone = \"Nowhere\"\n", "worker.gpu.1"),
            ("[worker.gpu.first]\nshared = false\n", "index"),
            ("[worker.gpu.0]\nmax_tasks = 0\n", "shared = false"),
        ] {
            let err = Config::parse(text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn relative_paths_resolve_under_data_dir() {
        let c = Config::default();
        assert_eq!(
            c.resolve(Path::new("/d"), &c.key_file),
            PathBuf::from("/d/node.key")
        );
        assert_eq!(
            c.resolve(Path::new("/d"), Path::new("/etc/k")),
            PathBuf::from("/etc/k")
        );
    }
}
