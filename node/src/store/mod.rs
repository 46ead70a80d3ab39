//! Storage: the node's sled database (known peers and their addresses, the
//! revocation lists it holds, and the trees other rooms open by name), and
//! [`blobs`], the content-addressed files. Writes are flushed before they
//! count.

pub mod blobs;

use std::path::Path;

use alliance_protocol::PublicKey;
use libp2p::{Multiaddr, PeerId};
use tracing::warn;

/// The file in a data directory that the node running on it holds locked,
/// with its process id inside.
pub const LOCK_FILE: &str = "node.lock";

/// A data directory this process runs a node on: an exclusive `flock` on
/// [`LOCK_FILE`], let go when this is dropped or the process ends (however
/// it ends, so a crashed node leaves nothing to clean up).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Another node runs on the data directory, or it cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the data directory {dir} is in use by another alliance node ({holder}): stop that node first, or give this one its own --data-dir"
    )]
    Held { dir: String, holder: String },
    #[error("cannot lock the data directory {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

impl DirLock {
    /// Locks `dir` for this process at once, or says who holds it.
    pub fn take(dir: &Path) -> Result<Self, LockError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let io = |source| LockError::Io {
            dir: dir.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        // SAFETY: flock(2) on a descriptor this function owns for the call;
        // it touches no memory. (std's File::try_lock needs a newer Rust
        // than this workspace's rust-version.)
        #[allow(unsafe_code)]
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(LockError::Held {
                dir: dir.display().to_string(),
                holder: holder(pid.trim()),
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// Who process `pid` is, as `ps` would say: its pid and command line.
fn holder(pid: &str) -> String {
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return "its process id is not in the lock file".into();
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) if !cmd.is_empty() => {
            let cmd: Vec<String> = cmd
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            format!("pid {pid}: {}", cmd.join(" "))
        }
        _ => format!("pid {pid}"),
    }
}

/// The node's sled database.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    peers: sled::Tree,
    revocations: sled::Tree,
    credits: sled::Tree,
    credit_issuers: sled::Tree,
}

/// The database could not be opened.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot open the node database in {path}: {source} (is another node using this data directory?)"
)]
pub struct OpenError {
    path: String,
    source: sled::Error,
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        let err = |source| OpenError {
            path: dir.display().to_string(),
            source,
        };
        // The node holds the data directory's lock (`DirLock`), so another
        // holder of the database can only be this process's previous node,
        // just stopping, which may keep the lock for a moment after it
        // lets go.
        let mut attempts = 0;
        let db = loop {
            match sled::open(dir) {
                Ok(db) => break db,
                Err(e) if attempts < 50 && e.to_string().contains("could not acquire lock") => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(err(e)),
            }
        };
        Ok(Self {
            peers: db.open_tree("peers").map_err(err)?,
            revocations: db.open_tree("revocations").map_err(err)?,
            credits: db.open_tree("credits").map_err(err)?,
            credit_issuers: db.open_tree("credit_issuers").map_err(err)?,
            db,
        })
    }

    /// The credits table and the chains of their issuers (see
    /// [`crate::trust::credits`]).
    pub fn credits(&self) -> (sled::Tree, sled::Tree) {
        (self.credits.clone(), self.credit_issuers.clone())
    }

    /// Another table of the same database (jobs, tasks).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, sled::Error> {
        self.db.open_tree(name)
    }

    /// Remembers a member's addresses, so a restart can rejoin through it.
    pub fn save_peer(&self, peer: &PeerId, addrs: &[Multiaddr]) {
        let text: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let value = serde_json::to_vec(&text).unwrap_or_default();
        if let Err(e) = self
            .peers
            .insert(peer.to_bytes(), value)
            .and_then(|_| self.peers.flush().map(|_| ()))
        {
            warn!("cannot save peer {peer}: {e}");
        }
    }

    /// Every remembered peer with its addresses.
    pub fn peers(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.peers
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                let peer = PeerId::from_bytes(&k).ok()?;
                let text: Vec<String> = serde_json::from_slice(&v).ok()?;
                Some((peer, text.iter().filter_map(|a| a.parse().ok()).collect()))
            })
            .collect()
    }

    /// Keeps the newest revocation list of `signer` (its envelope bytes).
    pub fn save_revocations(&self, signer: &PublicKey, envelope: &[u8]) {
        if let Err(e) = self
            .revocations
            .insert(signer.as_bytes(), envelope)
            .and_then(|_| self.revocations.flush().map(|_| ()))
        {
            warn!("cannot save a revocation list: {e}");
        }
    }

    /// Every held revocation list, as envelope bytes.
    pub fn revocations(&self) -> Vec<Vec<u8>> {
        self.revocations
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_data_directory_names_its_holder_and_frees_when_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::take(dir.path()).unwrap();
        let err = DirLock::take(dir.path()).unwrap_err().to_string();
        let pid = std::process::id().to_string();
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains(&format!("pid {pid}: ")),
            "{err}"
        );
        drop(first);
        let _again = DirLock::take(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(),
            pid
        );
    }

    #[test]
    fn peers_and_revocations_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let peer = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.save_peer(&peer, std::slice::from_ref(&addr));
            store.save_revocations(&PublicKey::from_bytes([1; 32]), b"list");
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.peers(), vec![(peer, vec![addr])]);
        assert_eq!(store.revocations(), vec![b"list".to_vec()]);
    }
}
