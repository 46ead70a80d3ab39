//! `alliance demo`: the whole alliance on one machine.
//!
//! Founds an alliance of three institutions, starts a bootstrap node, three
//! workers and a submitting node as separate `alliance node run` processes
//! on 127.0.0.1, submits two jobs (Monte Carlo π as an array job, and an
//! SGEMM run on two workers and compared with a tolerance), shows their
//! progress, checks every output against a CPU reference, prints who
//! computed what, and stops every process with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alliance_kernels::library::{self, monte_carlo_pi, sgemm};
use alliance_protocol::armor::Label;
use alliance_protocol::cert::{
    Chain, Charter, CharterDefaults, InstitutionCert, NodeCert, Roles, TrustedCharter,
};
use alliance_protocol::task::ElemType;
use alliance_protocol::{Identity, Signed, Timestamp};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::submit::npy;
use crate::{api, config, trust};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's directory (keys, logs, databases, results) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Keep the demo's alliance running afterwards, to submit your own
    /// jobs to it, until Ctrl-C (or SIGTERM) stops it.
    #[arg(long)]
    pub stay: bool,
    /// Skip the demo's two jobs (with --stay: just start the alliance).
    #[arg(long)]
    pub no_jobs: bool,
    /// Where the demo's files go [default: a new folder in the temporary
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Tasks in the Monte Carlo π job.
    #[arg(long, default_value_t = 12)]
    pub tasks: u32,
}

struct Node {
    name: &'static str,
    dir: PathBuf,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// SIGTERM, then SIGKILL after 10 s.
fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child this process started and
        // has not reaped; it touches no memory of ours.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn step(text: &str) {
    println!("\n== {text}");
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let root_dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("alliance-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&root_dir)
        .with_context(|| format!("cannot create {}", root_dir.display()))?;
    let result = demo(&root_dir, a);
    if a.keep || a.stay || a.dir.is_some() || result.is_err() {
        println!("\nthe demo's files are in {}", root_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&root_dir);
    }
    result
}

fn demo(dir: &Path, a: &DemoArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    step("founding an alliance of three institutions");
    let founding = Founding::new()?;
    for (name, roles, _) in &founding.institutions {
        println!("  {name} (roles {roles})");
    }

    step("starting a bootstrap node, three workers and a submitting node (separate processes)");
    let boot = start(
        &exe,
        "bootstrap",
        founding.node_dir(dir, "boot", 0, Roles::BOOTSTRAP)?,
        None,
    )?;
    let s = api::request(&boot.dir, "GET", "/v1/status", "")?;
    let boot_addr = format!(
        "{}/p2p/{}",
        s["listen_addrs"][0].as_str().unwrap_or_default(),
        s["peer_id"].as_str().unwrap_or_default()
    );
    println!("  bootstrap  {boot_addr}");
    let mut nodes = vec![boot];
    for (name, inst) in [("worker-north", 0), ("worker-south", 1), ("worker-east", 2)] {
        let n = start(
            &exe,
            name,
            founding.node_dir(dir, name, inst, Roles::WORK)?,
            Some(&boot_addr),
        )?;
        nodes.push(n);
    }
    let sub = start(
        &exe,
        "submitter",
        founding.node_dir(dir, "submitter", 1, Roles::SUBMIT)?,
        Some(&boot_addr),
    )?;
    wait(
        Duration::from_secs(60),
        "the submitter to see three workers",
        || {
            api::request(&sub.dir, "GET", "/v1/gpus", "")
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                == Some(3)
        },
    )?;
    let names = peer_names(&nodes)?;
    show_gpus(&sub.dir, &names)?;

    let jobs = dir.join("jobs");
    std::fs::create_dir_all(&jobs)?;
    if !a.no_jobs {
        pi_job(&jobs, &sub.dir, a.tasks, &names)?;
        sgemm_job(&jobs, &sub.dir, &names)?;
    }
    if a.stay {
        return stay(dir, &sub, &nodes);
    }

    step("stopping every node (SIGTERM)");
    for mut n in std::iter::once(sub).chain(nodes.into_iter().rev()) {
        stop(&mut n.child);
        println!("  {} stopped", n.name);
    }
    println!("\ndemo complete");
    Ok(())
}

/// Keeps the alliance running: says how to use it (and writes the same
/// to `demo.env`), then waits until a node stops or the demo is stopped
/// (Ctrl-C reaches every node of the terminal's process group; SIGTERM to
/// the group stops them all).
fn stay(dir: &Path, sub: &Node, nodes: &[Node]) -> Result<()> {
    let addr = api::address(&sub.dir)?;
    let url = format!("http://{addr}");
    let token_file = sub.dir.join(api::TOKEN_FILE);
    let env = format!(
        "ALLIANCE_URL={url}\nALLIANCE_TOKEN_FILE={}\nALLIANCE_DATA_DIR={}\n",
        token_file.display(),
        sub.dir.display()
    );
    std::fs::write(dir.join("demo.env"), &env)?;
    step("the alliance stays up");
    println!(
        "  the submitting node's API: {url} (its admin token is in {})\n",
        token_file.display()
    );
    println!("  submit your own job as the node's admin:");
    println!(
        "    alliance submit examples/pi/job.toml --wait --data-dir {}",
        sub.dir.display()
    );
    println!("  or give a researcher a token of their own and use it from anywhere:");
    println!(
        "    alliance user add alice --data-dir {}",
        sub.dir.display()
    );
    println!("    export ALLIANCE_URL={url} ALLIANCE_TOKEN=<the token printed>");
    println!("    python -c 'import alliance; print(alliance.Client().me())'");
    println!("  the API's description: {url}/v1/openapi.json");
    println!(
        "  stop it: Ctrl-C here (or kill -TERM -{})",
        std::process::id()
    );
    println!(
        "  (the same, for scripts, is in {})",
        dir.join("demo.env").display()
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if api::request(&sub.dir, "GET", "/v1/status", "").is_err()
            || nodes.iter().any(|n| !n.dir.join(api::ADDR_FILE).exists())
        {
            println!("a node stopped: stopping the demo");
            return Ok(());
        }
    }
}

/// The demo's alliance: its root key and charter, and three institutions
/// with their keys.
struct Founding {
    root: Identity,
    charter: TrustedCharter,
    institutions: [(&'static str, Roles, Identity); 3],
    now: Timestamp,
}

impl Founding {
    fn new() -> Result<Self> {
        let root = Identity::generate();
        let now = Timestamp::now();
        let charter = Signed::sign(
            &Charter::new(
                "Demo Alliance",
                root.public(),
                vec![],
                CharterDefaults {
                    advert_ttl_secs: 30,
                    ..CharterDefaults::default()
                },
                now,
            ),
            &root,
        )?
        .verify_charter()?;
        let institutions = [
            ("University North", Roles::ALL),
            ("University South", Roles::WORK | Roles::SUBMIT),
            ("Institute East", Roles::WORK),
        ]
        .map(|(n, r)| (n, r, Identity::generate()));
        Ok(Self {
            root,
            charter,
            institutions,
            now,
        })
    }

    /// A node's data directory under `dir`: its key, its chain from
    /// institution `inst` with `roles`, the charter and a config that
    /// listens on loopback only.
    fn node_dir(&self, dir: &Path, name: &str, inst: usize, roles: Roles) -> Result<PathBuf> {
        let (iname, iroles, ikey) = &self.institutions[inst];
        let node_dir = dir.join(name);
        std::fs::create_dir_all(&node_dir)?;
        let id = Identity::generate();
        id.save(&node_dir.join("node.key"))?;
        let icert = InstitutionCert::new(
            &self.charter,
            (*iname).to_owned(),
            ikey.public(),
            *iroles,
            self.now,
            30,
        );
        let ncert = NodeCert::new(
            &self.charter,
            ikey.public(),
            id.public(),
            roles,
            self.now,
            7,
        );
        let chain = Chain::new(
            Signed::sign(&icert, &self.root)?,
            Signed::sign(&ncert, ikey)?,
        );
        std::fs::write(
            node_dir.join("node.chain"),
            trust::armored(Label::InstitutionCertificate, &chain.institution)
                + &trust::armored(Label::NodeCertificate, &chain.node),
        )?;
        std::fs::write(
            node_dir.join("charter.alliance"),
            trust::armored(Label::Charter, &self.charter.signed),
        )?;
        let cfg = config::EXAMPLE
            .replace(
                "listen = [\"/ip4/0.0.0.0/tcp/4001\", \"/ip4/0.0.0.0/udp/4001/quic-v1\"]",
                "listen = [\"/ip4/127.0.0.1/tcp/0\"]",
            )
            .replace("mdns = true", "mdns = false")
            .replace("listen = \"127.0.0.1:7878\"", "listen = \"127.0.0.1:0\"");
        std::fs::write(node_dir.join(config::FILE_NAME), cfg)?;
        Ok(node_dir)
    }
}

/// Starts `alliance node run` on `node_dir` (a bootstrap node when
/// `bootstrap` is `None`, else a member that dials it) and waits for its
/// API.
fn start(
    exe: &Path,
    name: &'static str,
    node_dir: PathBuf,
    bootstrap: Option<&str>,
) -> Result<Node> {
    if let Some(b) = bootstrap {
        let path = node_dir.join(config::FILE_NAME);
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(
            &path,
            text.replace("bootstrap = []", &format!("bootstrap = [{b:?}]")),
        )?;
    }
    let log = std::fs::File::create(node_dir.join("node.log"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["node", "run", "--data-dir"]).arg(&node_dir);
    if bootstrap.is_none() {
        cmd.arg("--bootstrap");
    }
    let child = cmd
        .env("RUST_LOG", "info,wgpu_hal=off,wgpu_core=off,naga=off")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let node = Node {
        name,
        dir: node_dir,
        child,
    };
    wait(Duration::from_secs(60), &format!("{name} to start"), || {
        api::request(&node.dir, "GET", "/v1/status", "").is_ok()
    })?;
    Ok(node)
}

/// Prints the GPUs the submitter sees, with who lends them.
fn show_gpus(sub: &Path, names: &[(String, String)]) -> Result<()> {
    let gpus = api::request(sub, "GET", "/v1/gpus", "")?;
    for g in gpus.as_array().into_iter().flatten() {
        let who = names
            .iter()
            .find(|(p, _)| g["peer_id"] == p.as_str())
            .map_or("?", |(_, n)| n.as_str());
        let gpu = &g["gpus"][0];
        let bench = gpu["bench"]["fma_mflops"]
            .as_f64()
            .map(|m| format!(", {:.0} GFLOP/s FMA by its self-benchmark", m / 1000.0))
            .unwrap_or_default();
        println!(
            "  {who:<13} {:<17} lends {}{bench}",
            g["institution"].as_str().unwrap_or("?"),
            gpu["name"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// Job 1: Monte Carlo π as an array job of `tasks` tasks, every count
/// checked against the CPU reference.
fn pi_job(jobs: &Path, sub: &Path, tasks: u32, names: &[(String, String)]) -> Result<()> {
    let (seed, wg, samples) = (2026u32, 16u32, 64u32);
    std::fs::write(
        jobs.join("pi.toml"),
        format!(
            "name = \"monte-carlo-pi\"\nkernel = \"library:monte_carlo_pi\"\ndispatch = [{wg}, 1, 1]\ntasks = {tasks}\ninfo_binding = 0\n\n[[inputs]]\nbinding = 1\nkind = \"uniform\"\ntype = \"u32\"\nvalues = [{seed}, {samples}]\n\n[[outputs]]\nbinding = 2\ntype = \"u32\"\nlen = {wg}\n",
        ),
    )?;
    let (pi_id, out) = run_job(
        sub,
        jobs,
        "pi.toml",
        &format!("job 1: Monte Carlo π, an array job of {tasks} tasks, exact comparison"),
        true,
    )?;
    let counts = npy::parse(&std::fs::read(out.join("out2.npy"))?)?;
    let got = library::to_u32(&counts.data);
    let want: Vec<u32> = (0..tasks)
        .flat_map(|t| monte_carlo_pi::cpu(seed, wg, samples, t))
        .collect();
    if got != want {
        bail!("the π counts differ from the CPU reference");
    }
    let total = u64::from(tasks)
        * u64::from(wg)
        * u64::from(monte_carlo_pi::WORKGROUP)
        * u64::from(samples);
    println!(
        "  every count equals the CPU reference; π ≈ {:.5} from {total} samples",
        monte_carlo_pi::estimate(&got, total)
    );
    who_computed(sub, &pi_id, names)
}

/// The demo's SGEMM: the side of its matrices.
pub const SGEMM_M: usize = 128;

/// The demo's SGEMM matrices A and B, `m`×`m`, row-major.
pub fn sgemm_matrices(m: usize) -> (Vec<f32>, Vec<f32>) {
    let a = (0..m * m)
        .map(|i| ((i * 7) % 17) as f32 / 17.0 - 0.5)
        .collect();
    let b = (0..m * m).map(|i| ((i * 3) % 19) as f32 / 19.0).collect();
    (a, b)
}

/// Writes the demo's SGEMM job into `jobs`: `a.npy`, `b.npy` and
/// `sgemm.toml` (`library:sgemm`, two replicas compared within a
/// tolerance); the matrices.
pub fn write_sgemm_job(jobs: &Path, m: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (am, bm) = sgemm_matrices(m);
    let shape = [m as u64, m as u64];
    std::fs::write(
        jobs.join("a.npy"),
        npy::write(ElemType::F32, &shape, &library::f32_bytes(&am)),
    )?;
    std::fs::write(
        jobs.join("b.npy"),
        npy::write(ElemType::F32, &shape, &library::f32_bytes(&bm)),
    )?;
    std::fs::write(
        jobs.join("sgemm.toml"),
        format!(
            "name = \"sgemm-{m}\"\nkernel = \"library:sgemm\"\ndispatch = [{g}, {g}, 1]\nredundancy = 2\ncompare = {{ rel = 1e-5, abs = 1e-6 }}\n\n[[inputs]]\nbinding = 0\nkind = \"uniform\"\ntype = \"u32\"\nvalues = [{m}, {m}, {m}]\n\n[[inputs]]\nbinding = 1\nfile = \"a.npy\"\n\n[[inputs]]\nbinding = 2\nfile = \"b.npy\"\n\n[[outputs]]\nbinding = 3\ntype = \"f32\"\nlen = {}\n",
            m * m,
            g = m.div_ceil(64)
        ),
    )?;
    Ok((am, bm))
}

/// Job 2: a 128×128 SGEMM replicated on two workers and compared within a
/// tolerance, checked against the CPU reference.
fn sgemm_job(jobs: &Path, sub: &Path, names: &[(String, String)]) -> Result<()> {
    let m = SGEMM_M;
    let (am, bm) = write_sgemm_job(jobs, m)?;
    let (sg_id, out) = run_job(
        sub,
        jobs,
        "sgemm.toml",
        &format!("job 2: a {m}×{m} SGEMM on two workers, replicas compared within a tolerance"),
        false,
    )?;
    let c = library::to_f32(&npy::parse(&std::fs::read(out.join("out3-task0.npy"))?)?.data);
    let want = sgemm::cpu(m, m, m, &am, &bm);
    let worst = c
        .iter()
        .zip(&want)
        .map(|(g, w)| f64::from((g - w).abs()) / f64::from(w.abs()).max(1.0))
        .fold(0.0f64, f64::max);
    if worst > 1e-4 {
        bail!("the SGEMM result is {worst:e} away from the CPU reference");
    }
    println!("  C matches the CPU reference (largest relative difference {worst:.1e})");
    who_computed(sub, &sg_id, names)
}

/// Announces a job, submits the job file `file` from `jobs`, waits for
/// its end and exports its outputs (every task in one file per output
/// with `concat`) to
/// `jobs/<name>-results`; the job's id and that folder.
fn run_job(
    sub: &Path,
    jobs: &Path,
    file: &str,
    title: &str,
    concat: bool,
) -> Result<(String, PathBuf)> {
    step(title);
    let id = submit_and_wait(sub, &jobs.join(file))?;
    let out = jobs.join(format!("{}-results", file.trim_end_matches(".toml")));
    export(sub, &id, &out, concat)?;
    Ok((id, out))
}

fn wait(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn peer_names(nodes: &[Node]) -> Result<Vec<(String, String)>> {
    nodes
        .iter()
        .map(|n| {
            let s = api::request(&n.dir, "GET", "/v1/status", "")?;
            Ok((
                s["peer_id"].as_str().unwrap_or_default().to_owned(),
                n.name.to_owned(),
            ))
        })
        .collect()
}

fn submit_and_wait(sub: &Path, job: &Path) -> Result<String> {
    let api = api::Api::local(sub)?;
    let job = crate::cli::researcher::submit_file(&api, job)?;
    let id = job.id;
    println!(
        "  job {id}: {} task{}, redundancy {}",
        job.tasks,
        if job.tasks == 1 { "" } else { "s" },
        job.redundancy
    );
    crate::cli::researcher::wait_for_job(&api, &id, false)?;
    Ok(id)
}

fn export(sub: &Path, id: &str, out: &Path, concat: bool) -> Result<()> {
    crate::cli::researcher::download_results(&api::Api::local(sub)?, id, out, concat)?;
    Ok(())
}

fn who_computed(sub: &Path, id: &str, names: &[(String, String)]) -> Result<()> {
    let d: Value = api::request(sub, "GET", &format!("/v1/jobs/{id}"), "")?;
    println!("  who computed what:");
    for t in d["tasks"].as_array().into_iter().flatten() {
        let by: Vec<String> = t["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["state"] == "verified")
            .map(|r| {
                let who = names
                    .iter()
                    .find(|(p, _)| r["worker"] == p.as_str())
                    .map_or("?", |(_, n)| n.as_str());
                format!(
                    "{who} ({}, {:.1} ms GPU, {:.1} ms compiling)",
                    r["institution"].as_str().unwrap_or("?"),
                    r["gpu_time_us"].as_f64().unwrap_or(0.0) / 1000.0,
                    r["compile_time_us"].as_f64().unwrap_or(0.0) / 1000.0
                )
            })
            .collect();
        println!("    task {:>2}: {}", t["index"], by.join(" and "));
    }
    Ok(())
}
