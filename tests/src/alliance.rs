//! A test alliance on this machine: charter, institutions and node data
//! directories made with the real record types, and `alliance node run`
//! processes on 127.0.0.1 that are killed when the test ends.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alliance_node::trust;
use alliance_protocol::armor::Label;
use alliance_protocol::cert::{
    Chain, Charter, CharterDefaults, InstitutionCert, NodeCert, Revocations, Revoked, Roles,
    TrustedCharter,
};
use alliance_protocol::{Identity, Signed, Timestamp};
use serde_json::Value;

/// The example config's `warm` line: every library kernel.
fn warm_all() -> String {
    let names: Vec<String> = alliance_kernels::library::KERNELS
        .iter()
        .map(|k| format!("{:?}", k.name))
        .collect();
    format!("warm = [{}]", names.join(", "))
}

/// An alliance whose files live in a temporary directory.
#[derive(Debug)]
pub struct TestAlliance {
    pub dir: tempfile::TempDir,
    pub root: Identity,
    pub charter: TrustedCharter,
    pub institutions: Vec<(String, Identity, Roles)>,
}

/// One node's data directory.
#[derive(Debug)]
pub struct NodeDir {
    pub path: PathBuf,
    pub identity: Identity,
    pub institution: usize,
}

impl TestAlliance {
    /// An alliance with the given institutions; adverts live `advert_ttl` seconds.
    pub fn new(name: &str, institutions: &[(&str, Roles)], advert_ttl: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Identity::generate();
        let defaults = CharterDefaults {
            advert_ttl_secs: advert_ttl,
            ..CharterDefaults::default()
        };
        let charter = Charter::new(name, root.public(), vec![], defaults, Timestamp::now());
        let charter = Signed::sign(&charter, &root)
            .expect("sign")
            .verify_charter()
            .expect("charter");
        let institutions = institutions
            .iter()
            .map(|(n, r)| ((*n).to_owned(), Identity::generate(), *r))
            .collect();
        Self {
            dir,
            root,
            charter,
            institutions,
        }
    }

    /// The certificate chain of `id` under institution `inst`: the
    /// institution certificate from `from` for a year, the node's from
    /// `from` for `days`.
    pub fn chain(
        &self,
        id: &Identity,
        inst: usize,
        roles: Roles,
        from: Timestamp,
        days: u64,
    ) -> Chain {
        let (iname, ikey, iroles) = &self.institutions[inst];
        let icert = InstitutionCert::new(
            &self.charter,
            iname.clone(),
            ikey.public(),
            *iroles,
            from,
            365,
        );
        let ncert = NodeCert::new(&self.charter, ikey.public(), id.public(), roles, from, days);
        Chain::new(
            Signed::sign(&icert, &self.root).expect("sign"),
            Signed::sign(&ncert, ikey).expect("sign"),
        )
    }

    /// A node of institution `inst` with `roles`, valid from `from` for `days`.
    pub fn node_with(
        &self,
        name: &str,
        inst: usize,
        roles: Roles,
        from: Timestamp,
        days: u64,
    ) -> NodeDir {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("node dir");
        let identity = Identity::generate();
        identity.save(&path.join("node.key")).expect("key");
        let c = self.chain(&identity, inst, roles, from, days);
        let chain = trust::armored(Label::InstitutionCertificate, &c.institution)
            + &trust::armored(Label::NodeCertificate, &c.node);
        std::fs::write(path.join("node.chain"), chain).expect("chain");
        std::fs::write(
            path.join("charter.alliance"),
            trust::armored(Label::Charter, &self.charter.signed),
        )
        .expect("charter");
        let config = alliance_node::config::EXAMPLE
            .replace(
                "listen = [\"/ip4/0.0.0.0/tcp/4001\", \"/ip4/0.0.0.0/udp/4001/quic-v1\"]",
                "listen = [\"/ip4/127.0.0.1/tcp/0\"]",
            )
            .replace("mdns = true", "mdns = false")
            .replace("listen = \"127.0.0.1:7878\"", "listen = \"127.0.0.1:0\"")
            // Each test's workers compile the kernels its tasks use, not
            // the whole library (`warm_library` turns it on).
            .replace(&warm_all(), "warm = []");
        std::fs::write(path.join("alliance.toml"), config).expect("config");
        NodeDir {
            path,
            identity,
            institution: inst,
        }
    }

    /// A node valid from now for 30 days.
    pub fn node(&self, name: &str, inst: usize, roles: Roles) -> NodeDir {
        self.node_with(name, inst, roles, Timestamp::now(), 30)
    }

    /// A revocation list of institution `inst` revoking `node`, as a file.
    pub fn revoke(&self, inst: usize, node: &NodeDir, reason: &str) -> PathBuf {
        let list = Revocations {
            alliance: self.charter.id,
            sequence: 1,
            issued_at: Timestamp::now(),
            revoked: vec![Revoked {
                key: node.identity.public(),
                reason: reason.into(),
                at: Timestamp::now(),
            }],
        };
        let signed = Signed::sign(&list, &self.institutions[inst].1).expect("sign");
        let path = self.dir.path().join(format!("revocations-{inst}.alliance"));
        std::fs::write(&path, trust::armored(Label::Revocations, &signed)).expect("write");
        path
    }
}

impl NodeDir {
    /// The PeerId as text.
    pub fn peer(&self) -> String {
        self.identity.peer_id().to_string()
    }

    /// Adds bootstrap addresses to the config.
    pub fn set_bootstrap(&self, addrs: &[String]) {
        let path = self.path.join("alliance.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        let list = addrs
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &path,
            text.replace("bootstrap = []", &format!("bootstrap = [{list}]")),
        )
        .expect("config");
    }

    /// Has the node's GPUs compile every library kernel when it starts, as
    /// a node does by default.
    pub fn warm_library(&self) {
        self.edit_config("warm = []", &warm_all());
    }

    /// Replaces `from` by `to` in the node's config file.
    pub fn edit_config(&self, from: &str, to: &str) {
        let path = self.path.join("alliance.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        assert!(text.contains(from), "the config has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("config");
    }

    /// Listens on `addrs` (multiaddresses) instead of loopback TCP.
    pub fn listen_on(&self, addrs: &[&str]) {
        let list: Vec<String> = addrs.iter().map(|a| format!("{a:?}")).collect();
        self.edit_config(
            "listen = [\"/ip4/127.0.0.1/tcp/0\"]",
            &format!("listen = [{}]", list.join(", ")),
        );
    }

    /// Starts `alliance node run` on this directory.
    pub fn start(&self, bootstrap: bool) -> Running {
        self.start_with_env(bootstrap, &[])
    }

    /// Starts `alliance node run` on this directory with extra environment
    /// variables.
    pub fn start_with_env(&self, bootstrap: bool, env: &[(&str, &str)]) -> Running {
        self.start_as(None, bootstrap, env)
    }

    /// Starts `alliance node run` on this directory inside network
    /// namespace `ns` (see [`crate::netns`]).
    pub fn start_in(&self, ns: &str, bootstrap: bool) -> Running {
        self.start_as(Some(ns), bootstrap, &[])
    }

    fn start_as(&self, ns: Option<&str>, bootstrap: bool, env: &[(&str, &str)]) -> Running {
        let _ = std::fs::remove_file(self.path.join(alliance_node::api::ADDR_FILE));
        let log = std::fs::File::create(self.path.join("node.log")).expect("log");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(crate::alliance_bin());
                c
            }
            None => Command::new(crate::alliance_bin()),
        };
        cmd.args(["node", "run", "--data-dir"]).arg(&self.path);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        let child = cmd
            .env("RUST_LOG", "info,alliance_node=debug,wgpu_hal=off")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start alliance node run");
        let running = Running {
            child,
            dir: self.path.clone(),
            netns: ns.map(str::to_owned),
        };
        wait_for(
            Duration::from_secs(60),
            &format!("{} to serve its API", self.path.display()),
            || running.get("/v1/status").is_some(),
        );
        running
    }
}

/// A running node process, killed on drop.
#[derive(Debug)]
pub struct Running {
    child: Child,
    pub dir: PathBuf,
    /// The network namespace it runs in, whose loopback its API is on.
    netns: Option<String>,
}

impl Running {
    /// The node process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `f` with the node's data directory, from where its API is reached
    /// (inside its network namespace, if it runs in one).
    fn reach<T: Send + 'static>(&self, f: impl FnOnce(PathBuf) -> T + Send + 'static) -> T {
        let dir = self.dir.clone();
        match &self.netns {
            Some(ns) => crate::netns::within(ns, move || f(dir)),
            None => f(dir),
        }
    }

    /// GET `path` from the node's API; `None` while it does not answer.
    pub fn get(&self, path: &str) -> Option<Value> {
        let path = path.to_owned();
        self.reach(move |dir| alliance_node::api::request(&dir, "GET", &path, "").ok())
    }

    /// The node's `GET /metrics`, as Prometheus text.
    pub fn metrics(&self) -> String {
        self.reach(|dir| {
            alliance_node::api::Api::local(&dir)
                .and_then(|api| api.get_text("/metrics"))
                .map_err(|e| e.to_string())
        })
        .expect("metrics")
    }

    /// POST to the node's API.
    pub fn post(&self, path: &str, body: &str) -> Result<Value, String> {
        let (path, body) = (path.to_owned(), body.to_owned());
        self.reach(move |dir| {
            alliance_node::api::request(&dir, "POST", &path, &body).map_err(|e| format!("{e:#}"))
        })
    }

    /// The bootstrap multiaddress of this node.
    pub fn address(&self) -> String {
        let s = self.get("/v1/status").expect("status");
        format!(
            "{}/p2p/{}",
            s["listen_addrs"][0].as_str().expect("listen"),
            s["peer_id"].as_str().expect("id")
        )
    }

    /// The peer ids in this node's live advert table.
    pub fn advertisers(&self) -> Vec<String> {
        self.get("/v1/gpus")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a["peer_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// The peer ids of this node's verified, connected members.
    pub fn members(&self) -> Vec<String> {
        self.get("/v1/peers")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a["peer_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// The state of `peer`'s first GPU in this node's advert table.
    pub fn gpu_state(&self, peer: &str) -> Option<String> {
        self.get("/v1/gpus")?
            .as_array()?
            .iter()
            .find(|a| a["peer_id"] == peer)
            .and_then(|a| a["gpus"][0]["state"].as_str().map(str::to_owned))
    }

    /// The reasons this node logged for rejecting `peer`.
    pub fn rejections(&self, peer: &str) -> Vec<String> {
        self.get("/v1/status")
            .and_then(|s| s["rejected"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|r| r["peer_id"] == peer)
            .filter_map(|r| r["reason"].as_str().map(str::to_owned))
            .collect()
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// Stops the process (SIGKILL).
    pub fn kill(mut self) {
        self.kill_in_place();
    }

    /// Stops the process (SIGKILL) and waits for it; the value stays.
    pub fn kill_in_place(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` every 250 ms until it holds, or panics after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A node running inside the test process (its own swarm and actor on a
/// loopback TCP port), for tests with many nodes.
#[derive(Debug)]
pub struct InProcess {
    pub client: alliance_node::net::actor::Client,
    /// The node's key, to sign records as it (or as it should not).
    pub identity: std::sync::Arc<Identity>,
    pub peer: libp2p::PeerId,
    pub address: libp2p::Multiaddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _store: tempfile::TempDir,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A GPU entry for nodes that run without touching a GPU.
pub fn test_gpu() -> alliance_protocol::advert::GpuInfo {
    use alliance_protocol::advert::{Backend, DeviceType, GpuInfo, GpuLimits, GpuState};
    GpuInfo {
        index: 0,
        name: "test adapter".into(),
        vendor: 0,
        device: 0,
        backend: Backend::Vulkan,
        device_type: DeviceType::Cpu,
        driver: "none".into(),
        // A software adapter's limits, so schedulers find it capable.
        limits: GpuLimits {
            max_buffer_size: 256 << 20,
            max_storage_buffer_binding_size: 128 << 20,
            max_storage_buffers_per_shader_stage: 8,
            max_uniform_buffer_binding_size: 64 << 10,
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_size: [256, 256, 64],
            max_compute_workgroups_per_dimension: 65535,
            max_compute_workgroup_storage_size: 16384,
        },
        bench: None,
        state: GpuState::Idle,
        reason: String::new(),
        free_slots: 1,
        terms: Default::default(),
    }
}

impl TestAlliance {
    /// Starts a node of institution `inst` inside this process.
    pub async fn spawn(&self, inst: usize, bootstrap: Vec<libp2p::Multiaddr>) -> InProcess {
        self.spawn_with(inst, bootstrap, None).await
    }

    /// Like [`Self::spawn`], with members' job and blob requests sent to
    /// `inbound`.
    pub async fn spawn_with(
        &self,
        inst: usize,
        bootstrap: Vec<libp2p::Multiaddr>,
        inbound: Option<tokio::sync::mpsc::Sender<alliance_node::net::actor::Inbound>>,
    ) -> InProcess {
        use alliance_node::net::{self, actor};
        use alliance_protocol::cert::RevocationSet;
        use std::sync::Arc;

        let identity = Identity::generate();
        let now = Timestamp::now();
        let chain = self.chain(&identity, inst, Roles::WORK, now, 30);
        let revocations = RevocationSet::new(&self.charter);
        let member = chain
            .verify(&self.charter, &revocations, now, Roles::WORK)
            .expect("chain");
        let store_dir = tempfile::tempdir().expect("tempdir");
        let store = alliance_node::store::Store::open(store_dir.path()).expect("store");
        let mut network =
            net::build_swarm(&identity, &self.charter.id, &net::Options::default()).expect("swarm");
        network
            .swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
            .expect("listen");
        let peer = identity.peer_id();
        let identity = Arc::new(identity);
        let (client, event_loop) = actor::new(
            network,
            actor::Setup {
                identity: Arc::clone(&identity),
                charter: self.charter.clone(),
                chain,
                member,
                revocations,
                bootstrap,
                store,
                gpus: vec![test_gpu()],
                paused: false,
                inbound,
            },
        );
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(event_loop.run(stopped));
        let address = loop {
            let status = client.status().await.expect("status");
            if let Some(a) = status.listen_addrs.first() {
                break format!("{a}/p2p/{peer}").parse().expect("multiaddr");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        InProcess {
            client,
            identity,
            peer,
            address,
            stop: Some(stop),
            _store: store_dir,
        }
    }
}
