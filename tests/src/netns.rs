//! Network namespaces a test builds for itself and removes when done: two
//! labs, each behind a NAT of its own (nftables masquerade), on a "wide
//! area" network where the alliance's bootstrap node sits. Every address
//! is 10.99.x.y inside those namespaces; the machine's own network is
//! never touched.
//!
//! ```text
//!   lab-a 10.99.1.2 ── 10.99.1.1 nat-a 10.99.0.2 ─┐
//!                                                 br0 10.99.0.1 (wan: the bootstrap node)
//!   lab-b 10.99.2.2 ── 10.99.2.1 nat-b 10.99.0.3 ─┘
//! ```
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` and `nft`; where
//! they are missing, [`Topology::two_labs_behind`] says so, and the
//! test skips with that message.

use std::process::Command;

use alliance_protocol::cert::Roles;

use crate::alliance::{NodeDir, Running, TestAlliance};

/// How the labs' NATs map ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Linux's masquerade: a lab's connections keep their source port
    /// where they can, so a peer that learned it through the relay can
    /// punch a hole to it.
    Cone,
    /// Masquerade with `fully-random`: every connection leaves from a new
    /// random port, so the address a peer learned is never the one a new
    /// connection uses, and hole punching fails (a symmetric NAT).
    Symmetric,
}

/// The namespaces of one test, deleted on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    names: Vec<String>,
}

/// The bootstrap node's address on the wide-area network.
pub const WAN_HOST: &str = "10.99.0.1";

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Topology {
    /// The name of namespace `name` (`wan`, `nat-a`, `lab-a`, …).
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn ip(&self, ns: &str, args: &str) -> Result<(), String> {
        let ns = self.ns(ns);
        let mut all = vec!["ip", "-n", ns.as_str()];
        all.extend(args.split_whitespace());
        run(&all)
    }

    /// Cuts lab `lab` (0: A, 1: B) off the wide area: its NAT's uplink
    /// goes down, as when a campus link fails.
    pub fn cut(&self, lab: usize) {
        self.ip(["nat-a", "nat-b"][lab], "link set up0 down")
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Puts lab `lab`'s uplink back.
    pub fn heal(&self, lab: usize) {
        self.ip(["nat-a", "nat-b"][lab], "link set up0 up")
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Cuts the wide area between the two labs, leaving each its way to
    /// the bootstrap node: the bridge drops what passes between their
    /// NATs' ports, as when the link between two campuses fails but both
    /// still reach the alliance's servers.
    pub fn split(&self) {
        self.exec(
            "wan",
            &[
                "nft",
                "add table bridge split; \
                 add chain bridge split between { type filter hook forward priority 0; }; \
                 add rule bridge split between iifname to-a oifname to-b drop; \
                 add rule bridge split between iifname to-b oifname to-a drop",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Undoes [`Self::split`].
    pub fn join(&self) {
        self.exec("wan", &["nft", "delete table bridge split"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Result<(), String> {
        let ns = self.ns(ns);
        let mut all = vec!["ip", "netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Two labs behind NATs of kind `nat`; or says why they cannot be
    /// built here.
    pub fn two_labs_behind(nat: Nat) -> Result<Self, String> {
        // SAFETY: geteuid(2) reads the caller's effective uid; no memory.
        #[allow(unsafe_code)]
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        for tool in ["ip", "nft"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Err(format!(
                    "`{tool}` is missing (Debian packages iproute2, nftables)"
                ));
            }
        }
        // Tests run side by side: each topology its own names.
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("al{}-{n}", std::process::id());
        let mut t = Self {
            prefix,
            names: Vec::new(),
        };
        // Whether the kernel lets this process make namespaces at all.
        let probe = t.ns("wan");
        run(&["ip", "netns", "add", &probe])?;
        t.names.push(probe);
        // From here on a failure is a bug in the set-up, not a machine
        // that cannot run the test.
        t.build(nat)
            .unwrap_or_else(|e| panic!("building the NAT namespaces: {e}"));
        Ok(t)
    }

    fn build(&mut self, nat: Nat) -> Result<(), String> {
        let t = self;
        let masquerade = match nat {
            Nat::Cone => "masquerade",
            Nat::Symmetric => "masquerade fully-random",
        };
        for name in ["nat-a", "nat-b", "lab-a", "lab-b"] {
            let ns = t.ns(name);
            run(&["ip", "netns", "add", &ns])?;
            t.names.push(ns);
        }
        for name in ["wan", "nat-a", "nat-b", "lab-a", "lab-b"] {
            t.ip(name, "link set lo up")?;
        }
        t.ip("wan", "link add br0 type bridge")?;
        t.ip("wan", &format!("addr add {WAN_HOST}/24 dev br0"))?;
        t.ip("wan", "link set br0 up")?;
        for (x, n) in [("a", 1), ("b", 2)] {
            let (nat, lab) = (format!("nat-{x}"), format!("lab-{x}"));
            let (wan_ns, nat_ns, lab_ns) = (t.ns("wan"), t.ns(&nat), t.ns(&lab));
            run(&[
                "ip",
                "link",
                "add",
                "up0",
                "netns",
                &nat_ns,
                "type",
                "veth",
                "peer",
                "name",
                &format!("to-{x}"),
                "netns",
                &wan_ns,
            ])?;
            t.ip("wan", &format!("link set to-{x} master br0 up"))?;
            run(&[
                "ip", "link", "add", "lan0", "netns", &nat_ns, "type", "veth", "peer", "name",
                "eth0", "netns", &lab_ns,
            ])?;
            t.ip(&nat, &format!("addr add 10.99.0.{}/24 dev up0", n + 1))?;
            t.ip(&nat, &format!("addr add 10.99.{n}.1/24 dev lan0"))?;
            t.ip(&nat, "link set up0 up")?;
            t.ip(&nat, "link set lan0 up")?;
            t.ip(&lab, &format!("addr add 10.99.{n}.2/24 dev eth0"))?;
            t.ip(&lab, "link set eth0 up")?;
            t.ip(&lab, &format!("route add default via 10.99.{n}.1"))?;
            t.exec(&nat, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
            // What leaves for the wide area takes the NAT's address; nothing
            // from outside reaches the lab unless the lab spoke first, and
            // what knocks unasked is dropped without an answer (as home and
            // campus routers do: a reset would spoil a hole punch).
            let rules = format!(
                "add table ip nat; \
                 add chain ip nat post {{ type nat hook postrouting priority 100; }}; \
                 add rule ip nat post oifname up0 {masquerade}; \
                 add table ip filter; \
                 add chain ip filter lab_in {{ type filter hook forward priority 0; policy drop; }}; \
                 add rule ip filter lab_in ct state established,related accept; \
                 add rule ip filter lab_in iifname lan0 accept; \
                 add chain ip filter to_nat {{ type filter hook input priority 0; policy accept; }}; \
                 add rule ip filter to_nat iifname up0 ct state new drop"
            );
            t.exec(&nat, &["nft", &rules])?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.names.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// An alliance of two institutions, one lab each, behind the NATs of a
/// [`Topology`], with its bootstrap and relay node up on the wide area.
#[derive(Debug)]
pub struct Labs {
    /// Stopped before the namespaces go.
    pub boot: Running,
    pub boot_addr: String,
    pub alliance: TestAlliance,
    pub net: Topology,
}

impl Labs {
    /// University North (every role) in lab A, University South (work) in
    /// lab B, behind NATs of kind `nat`; or why the namespaces cannot be
    /// built here.
    pub fn start(name: &str, nat: Nat) -> Result<Self, String> {
        let net = Topology::two_labs_behind(nat)?;
        let alliance = TestAlliance::new(
            name,
            &[
                ("University North", Roles::ALL),
                ("University South", Roles::WORK),
            ],
            20,
        );
        let dir = alliance.node("boot", 0, Roles::BOOTSTRAP);
        dir.listen_on(&[
            &format!("/ip4/{WAN_HOST}/tcp/0"),
            &format!("/ip4/{WAN_HOST}/udp/0/quic-v1"),
        ]);
        let boot = dir.start_in(&net.ns("wan"), true);
        let boot_addr = boot.address();
        Ok(Self {
            boot,
            boot_addr,
            alliance,
            net,
        })
    }

    /// A node of lab `lab` (0: A, North; 1: B, South) that listens on its
    /// lab's network and dials the bootstrap node.
    pub fn node(&self, lab: usize, roles: Roles) -> NodeDir {
        let dir = self.alliance.node(["lab-a", "lab-b"][lab], lab, roles);
        dir.listen_on(&["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]);
        dir.set_bootstrap(std::slice::from_ref(&self.boot_addr));
        dir
    }

    /// Runs `alliance ARGS --data-dir DIR` in lab `lab` (where the node
    /// on `dir` serves its API).
    pub fn cli(&self, lab: usize, dir: &NodeDir, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec"])
            .arg(self.net.ns(["lab-a", "lab-b"][lab]))
            .arg(crate::alliance_bin())
            .args(args)
            .arg("--data-dir")
            .arg(&dir.path)
            .output()
            .expect("run alliance in the lab")
    }

    /// Starts `dir`, made by [`Self::node`] for lab `lab`, in that lab.
    pub fn run(&self, lab: usize, dir: &NodeDir) -> Running {
        dir.start_in(&self.net.ns(["lab-a", "lab-b"][lab]), false)
    }
}

/// Whether `r` holds a direct (not relayed) connection to `peer`.
pub fn direct(r: &Running, peer: &str) -> bool {
    r.get("/v1/peers").is_some_and(|p| {
        p.as_array().is_some_and(|p| {
            p.iter()
                .any(|e| e["peer_id"] == peer && e["direct"] == true)
        })
    })
}

/// Runs `f` on a thread inside network namespace `ns`: sockets it opens
/// are that namespace's (a node's API on its own loopback).
pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) moves only this thread, which ends with `f`,
        // into the namespace behind a descriptor it holds open.
        #[allow(unsafe_code)]
        let moved = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            moved,
            0,
            "setns {path}: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("a thread in the namespace")
}
