//! The researcher's commands: `alliance submit` and `alliance job …`,
//! clients of a node's HTTP API that work as any user with a token, on
//! the node's machine or from anywhere that reaches its API.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::api::{Api, Target};
use crate::config;
use crate::submit::JobSummary;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (TOML; see JOBS.md and examples/); the files it names
    /// are uploaded with it.
    pub file: PathBuf,
    /// Show progress until the job ends; exit non-zero if it fails.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub conn: Dir,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Your jobs (an admin's: all) and their progress.
    List(Dir),
    /// One job: every task's state, worker, institution, attempts, timings
    /// and, for every failure, the reason.
    Status {
        id: String,
        #[command(flatten)]
        dir: Dir,
    },
    /// Download a job's verified outputs as .npy files.
    Results {
        id: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// One file per output with every task's part in task order,
        /// instead of one file per output and task.
        #[arg(long)]
        concat: bool,
        #[command(flatten)]
        dir: Dir,
    },
    /// Show a job's progress until it ends.
    Wait {
        id: String,
        #[command(flatten)]
        dir: Dir,
    },
    /// Stop offering a job's tasks.
    Cancel {
        id: String,
        #[command(flatten)]
        dir: Dir,
    },
}

/// Which node's API to use, and as whom.
#[derive(Debug, Args)]
pub struct Dir {
    /// Data directory of a node on this machine, whose address (and, for
    /// its own user, token) the command reads
    /// [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The node's API, e.g. https://gpu.lab.example.edu:7878.
    #[arg(long, env = "ALLIANCE_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Your API token (`alliance user add` printed it).
    #[arg(
        long,
        env = "ALLIANCE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// PEM certificate to trust for a node that serves HTTPS with its own.
    #[arg(long, env = "ALLIANCE_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl Dir {
    /// The API these flags name.
    pub fn api(&self) -> Result<Api> {
        let data_dir = config::data_dir(self.data_dir.as_deref()).unwrap_or_default();
        if self.url.is_none() && data_dir.as_os_str().is_empty() {
            bail!(
                "no node: pass --url (or set ALLIANCE_URL), or --data-dir of a node on this machine"
            );
        }
        Api::new(&Target {
            url: self.url.clone(),
            token: self.token.clone(),
            ca_cert: self.ca_cert.clone(),
            data_dir,
        })
    }
}

/// A bar for counts on a terminal; `None` when output is not one.
fn bar(len: u64, template: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        b.set_style(style.progress_chars("#>."));
    }
    Some(b)
}

/// The files a job file names: its kernel (unless from the library) and
/// every input's file, relative to the job file.
fn named_files(text: &str, file: &Path) -> Result<Vec<String>> {
    let v: toml::Value = toml::from_str(text)
        .map_err(|e| anyhow!("{}: not a valid job file: {e}", file.display()))?;
    let mut names = Vec::new();
    if let Some(k) = v.get("kernel").and_then(toml::Value::as_str)
        && !k.starts_with("library:")
    {
        names.push(k.to_owned());
    }
    for i in v
        .get("inputs")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(f) = i.get("file").and_then(toml::Value::as_str) {
            names.push(f.to_owned());
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Uploads the job file at `file` and every file it names to the node,
/// which checks the job as every worker will and refuses a bad one with
/// the reason; returns the summary of the job it stored.
pub fn submit_file(api: &Api, file: &Path) -> Result<JobSummary> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the job file {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut files = serde_json::Map::new();
    for name in named_files(&text, file)? {
        let path = base.join(&name);
        if !path.is_file() {
            bail!(
                "{}: it names {name}, but {} is not a file",
                file.display(),
                path.display()
            );
        }
        let len = std::fs::metadata(&path)?.len();
        let b = (len > 8 << 20)
            .then(|| {
                bar(
                    len,
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
            })
            .flatten();
        if let Some(b) = &b {
            b.set_message(format!("uploading {name}"));
        }
        let hash = api.upload(&path, &|sent, _| {
            if let Some(b) = &b {
                b.set_position(sent);
            }
        })?;
        if let Some(b) = b {
            b.finish_and_clear();
        }
        files.insert(name, json!(hash.to_string()));
    }
    let name = file
        .file_name()
        .map_or("job.toml".into(), |n| n.to_string_lossy().into_owned());
    let body = json!({ "job": text, "name": name, "files": files }).to_string();
    let answer = api
        .send("POST", "/v1/jobs", &body)
        .with_context(|| format!("{} was not submitted", file.display()))?;
    serde_json::from_value(answer).map_err(|e| anyhow!("the node's answer lacks the job: {e}"))
}

pub fn submit(a: &SubmitArgs, json: bool) -> Result<()> {
    let api = a.conn.api()?;
    let job = submit_file(&api, &a.file)?;
    let id = job.id;
    if json && !a.wait {
        println!("{}", json!({ "id": id }));
        return Ok(());
    }
    if !json {
        println!(
            "job {id} submitted: {} ({} task{}, redundancy {})",
            job.name,
            job.tasks,
            if job.tasks == 1 { "" } else { "s" },
            job.redundancy
        );
    }
    if a.wait {
        return wait_for_job(&api, &id, json);
    }
    Ok(())
}

/// Shows a job's progress until it ends (a bar with counts and ETA on a
/// terminal, a plain line every few seconds otherwise); an error unless
/// it is done.
pub fn wait_for_job(api: &Api, id: &str, json: bool) -> Result<()> {
    let start = Instant::now();
    let mut last_reason = String::new();
    let mut last_line = String::new();
    let mut last_print = Instant::now() - Duration::from_secs(60);
    let mut progress: Option<ProgressBar> = None;
    loop {
        // Waits on the node until the job ends or a few seconds pass.
        let _ = api.get(&format!("/v1/jobs/{id}/end?secs=1"))?;
        let d = api.get(&format!("/v1/jobs/{id}"))?;
        let s = &d["summary"];
        let p = &s["progress"];
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        let (queued, running, verified, failed) =
            (n("queued"), n("running"), n("verified"), n("failed"));
        let total = s["tasks"].as_u64().unwrap_or(1).max(1);
        let state = s["state"].as_str().unwrap_or("?");
        if !json {
            let counts = format!(
                "{verified}/{total} verified, {running} running, {queued} queued, {failed} failed"
            );
            if progress.is_none() {
                progress = bar(total, "[{bar:30}] {pos}/{len} {msg} ETA {eta}");
            }
            match &progress {
                Some(b) => {
                    b.set_position(verified + failed);
                    b.set_message(format!(
                        "{running} running, {queued} queued, {failed} failed"
                    ));
                }
                None if counts != last_line && last_print.elapsed() >= Duration::from_secs(5) => {
                    eprintln!("job {id}: {counts}");
                    last_line = counts;
                    last_print = Instant::now();
                }
                None => {}
            }
            if running == 0
                && queued > 0
                && let Some((reason, count)) = s["waiting"]
                    .as_array()
                    .and_then(|w| w.first())
                    .and_then(|w| Some((w[0].as_str()?.to_owned(), w[1].as_u64()?)))
                && reason != last_reason
            {
                let line = format!(
                    "{count} task{} waiting: {reason}",
                    if count == 1 { "" } else { "s" }
                );
                match &progress {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
                last_reason = reason;
            }
        }
        if state != "active" {
            if let Some(b) = progress.take() {
                b.finish_and_clear();
            }
            if json {
                println!("{d}");
            } else {
                println!("job {id} {state} in {:.1} s", start.elapsed().as_secs_f64());
                print_failures(&d);
            }
            if state == "done" {
                return Ok(());
            }
            bail!("job {id} {state}");
        }
    }
}

fn print_failures(d: &Value) {
    for t in d["tasks"].as_array().into_iter().flatten() {
        if let Some(f) = t["failure"].as_str() {
            println!("  task {} failed: {f}", t["index"]);
        }
    }
}

/// Downloads job `id`'s verified outputs into `out` as `.npy` files: one
/// per output and verified task, or with `concat` one per output with
/// every task's part. Returns the files written.
pub fn download_results(api: &Api, id: &str, out: &Path, concat: bool) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let d = api.get(&format!("/v1/jobs/{id}"))?;
    let mut written = Vec::new();
    for o in d["outputs"].as_array().into_iter().flatten() {
        let b = o["binding"].as_u64().unwrap_or(0);
        if concat {
            let to = out.join(format!("out{b}.npy"));
            api.download(&format!("/v1/jobs/{id}/outputs/{b}"), &to)?;
            written.push(to);
            continue;
        }
        for t in d["tasks"].as_array().into_iter().flatten() {
            if t["state"] != "verified" {
                continue;
            }
            let n = t["index"].as_u64().unwrap_or(0);
            let to = out.join(format!("out{b}-task{n}.npy"));
            api.download(&format!("/v1/jobs/{id}/outputs/{b}?task={n}"), &to)?;
            written.push(to);
        }
    }
    Ok(written)
}

/// Runs `alliance job …`.
pub fn job(cmd: JobCommand, json: bool) -> Result<()> {
    match cmd {
        JobCommand::List(d) => list(&d.api()?, json),
        JobCommand::Status { id, dir } => status(&id, &dir.api()?, json),
        JobCommand::Wait { id, dir } => wait_for_job(&dir.api()?, &id, json),
        JobCommand::Results {
            id,
            out,
            concat,
            dir,
        } => {
            let files = download_results(&dir.api()?, &id, &out, concat)?;
            if json {
                println!("{}", json!({ "files": files }));
            } else {
                println!(
                    "{} file{} written to {}",
                    files.len(),
                    if files.len() == 1 { "" } else { "s" },
                    out.display()
                );
            }
            Ok(())
        }
        JobCommand::Cancel { id, dir } => {
            let v = dir
                .api()?
                .send("POST", &format!("/v1/jobs/{id}/cancel"), "")?;
            if json {
                println!("{v}");
            } else {
                println!("job {id}: {}", v["state"].as_str().unwrap_or("?"));
            }
            Ok(())
        }
    }
}

/// `alliance job list`: every job of this node with its progress and the
/// commonest reason its tasks wait.
fn list(api: &Api, json: bool) -> Result<()> {
    let mut jobs = Vec::new();
    let mut after = String::new();
    loop {
        let page = api.get(&format!("/v1/jobs?limit=1000{after}"))?;
        jobs.extend(page["jobs"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    let list = Value::Array(jobs);
    if json {
        println!("{list}");
        return Ok(());
    }
    println!(
        "{:<32} {:<12} {:<20} {:<9} {:>6} {:>8} {:>7} {:>6} {:>6}",
        "id", "owner", "name", "state", "tasks", "verified", "running", "queued", "failed"
    );
    for j in list.as_array().into_iter().flatten() {
        let p = &j["progress"];
        println!(
            "{:<32} {:<12} {:<20} {:<9} {:>6} {:>8} {:>7} {:>6} {:>6}",
            j["id"].as_str().unwrap_or("?"),
            j["owner"].as_str().unwrap_or("?"),
            j["name"]
                .as_str()
                .unwrap_or("?")
                .chars()
                .take(20)
                .collect::<String>(),
            j["state"].as_str().unwrap_or("?"),
            j["tasks"],
            p["verified"],
            p["running"],
            p["queued"],
            p["failed"]
        );
        if let Some((reason, count)) = j["waiting"]
            .as_array()
            .and_then(|w| w.first())
            .and_then(|w| Some((w[0].as_str()?, w[1].as_u64()?)))
        {
            println!("  {count} waiting: {reason}");
        }
    }
    Ok(())
}

/// `alliance job status ID`: every task with its replicas, workers,
/// states, steps and GPU time.
fn status(id: &str, api: &Api, json: bool) -> Result<()> {
    let d = api.get(&format!("/v1/jobs/{id}"))?;
    if json {
        println!("{d}");
        return Ok(());
    }
    let s = &d["summary"];
    println!(
        "job {} ({}): {}, {} tasks, redundancy {}, {:.1} ms GPU, {:.1} ms compiling",
        s["id"].as_str().unwrap_or("?"),
        s["name"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        s["tasks"],
        s["redundancy"],
        s["gpu_time_us"].as_f64().unwrap_or(0.0) / 1000.0,
        s["compile_time_us"].as_f64().unwrap_or(0.0) / 1000.0
    );
    for (reason, count) in s["waiting"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| Some((w[0].as_str()?, w[1].as_u64()?)))
    {
        println!("  {count} waiting: {reason}");
    }
    println!(
        "{:>5} {:<9} {:>8}  replicas (worker, institution, state, GPU time, compile time)",
        "task", "state", "attempts"
    );
    for t in d["tasks"].as_array().into_iter().flatten() {
        let replicas: Vec<String> = t["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let w = r["worker"].as_str().unwrap_or("?");
                let short = &w[w.len().saturating_sub(8)..];
                let why = r["reason"]
                    .as_str()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default();
                // Steps of a checkpointed task: where this
                // attempt started and its last checkpoint.
                let steps = match (r["start_step"].as_u64(), r["checkpoint"].as_u64()) {
                    (Some(0) | None, None) => String::new(),
                    (from, last) => format!(
                        " steps {}..{}",
                        from.unwrap_or(0),
                        last.map_or("?".into(), |l| l.to_string())
                    ),
                };
                let compile = match r["compile_time_us"].as_u64() {
                    Some(us) if us > 0 => format!(" +{:.1} ms compiling", us as f64 / 1000.0),
                    _ => String::new(),
                };
                format!(
                    "{short} {} {}{why}{steps} {:.1} ms{compile}",
                    r["institution"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?"),
                    r["gpu_time_us"].as_f64().unwrap_or(0.0) / 1000.0
                )
            })
            .collect();
        println!(
            "{:>5} {:<9} {:>8}  {}",
            t["index"],
            t["state"].as_str().unwrap_or("?"),
            t["next_attempt"],
            replicas.join(" | ")
        );
        if let Some(w) = t["waiting"].as_str() {
            println!("{:>5} waiting: {w}", "");
        }
    }
    print_failures(&d);
    Ok(())
}
