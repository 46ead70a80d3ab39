//! The researcher's commands: `alliance submit` and `alliance job …`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::config;
use crate::submit::JobSummary;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (TOML; see JOBS.md and examples/).
    pub file: PathBuf,
    /// Show progress until the job ends; exit non-zero if it fails.
    #[arg(long)]
    pub wait: bool,
    /// Data directory of the running node
    /// [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// This node's jobs and their progress.
    List(Dir),
    /// One job: every task's state, worker, institution, attempts, timings
    /// and, for every failure, the reason.
    Status {
        id: String,
        #[command(flatten)]
        dir: Dir,
    },
    /// Write a job's verified outputs as .npy files.
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
    /// Stop offering a job's tasks.
    Cancel {
        id: String,
        #[command(flatten)]
        dir: Dir,
    },
}

#[derive(Debug, Args)]
pub struct Dir {
    /// Data directory of the running node
    /// [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

fn node_dir(d: Option<&Path>) -> Result<PathBuf> {
    config::data_dir(d).ok_or_else(|| anyhow!("no data directory: pass --data-dir"))
}

/// Hands the job file to the node at `dir`, which checks it as every
/// worker will (before anything leaves this machine) and refuses a bad
/// one with the reason; returns the summary of the job it stored.
pub fn submit_file(dir: &Path, file: &Path) -> Result<JobSummary> {
    let file = file
        .canonicalize()
        .with_context(|| format!("cannot find the job file {}", file.display()))?;
    let body = json!({ "file": file }).to_string();
    let answer = crate::api::request(dir, "POST", "/v1/jobs", &body)?;
    serde_json::from_value(answer).map_err(|e| anyhow!("the node's answer lacks the job: {e}"))
}

pub fn submit(a: &SubmitArgs, json: bool) -> Result<()> {
    let dir = node_dir(a.data_dir.as_deref())?;
    let job = submit_file(&dir, &a.file)?;
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
        return wait_for_job(&dir, &id, json);
    }
    Ok(())
}

/// Shows a job's progress until it ends; an error unless it is done.
pub fn wait_for_job(dir: &Path, id: &str, json: bool) -> Result<()> {
    let start = Instant::now();
    let mut last_reason = String::new();
    loop {
        let d = crate::api::request(dir, "GET", &format!("/v1/jobs/{id}"), "")?;
        let s = &d["summary"];
        let p = &s["progress"];
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        let (queued, running, verified, failed) =
            (n("queued"), n("running"), n("verified"), n("failed"));
        let total = s["tasks"].as_u64().unwrap_or(1).max(1);
        let done = verified + failed;
        let state = s["state"].as_str().unwrap_or("?");
        if !json {
            let width = 30usize;
            let filled = usize::try_from(done * 30 / total)
                .unwrap_or(width)
                .min(width);
            let eta = if done > 0 && done < total {
                let per = start.elapsed().as_secs_f64() / done as f64;
                format!(", ETA {:.0} s", per * (total - done) as f64)
            } else {
                String::new()
            };
            eprint!(
                "\r[{}{}] {verified}/{total} verified, {running} running, {queued} queued, {failed} failed{eta}   ",
                "#".repeat(filled),
                ".".repeat(width - filled)
            );
            if running == 0
                && queued > 0
                && let Some((reason, count)) = s["waiting"]
                    .as_array()
                    .and_then(|w| w.first())
                    .and_then(|w| Some((w[0].as_str()?.to_owned(), w[1].as_u64()?)))
                && reason != last_reason
            {
                eprintln!(
                    "\n{count} task{} waiting: {reason}",
                    if count == 1 { "" } else { "s" }
                );
                last_reason = reason;
            }
            let _ = std::io::stderr().flush();
        }
        if state != "active" {
            if json {
                println!("{d}");
            } else {
                eprintln!();
                println!("job {id} {state} in {:.1} s", start.elapsed().as_secs_f64());
                print_failures(&d);
            }
            if state == "done" {
                return Ok(());
            }
            bail!("job {id} {state}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn print_failures(d: &Value) {
    for t in d["tasks"].as_array().into_iter().flatten() {
        if let Some(f) = t["failure"].as_str() {
            println!("  task {} failed: {f}", t["index"]);
        }
    }
}

/// Runs `alliance job …`.
pub fn job(cmd: JobCommand, json: bool) -> Result<()> {
    match cmd {
        JobCommand::List(d) => list(&d, json),
        JobCommand::Status { id, dir } => status(&id, &dir, json),
        JobCommand::Results {
            id,
            out,
            concat,
            dir,
        } => {
            let dir = node_dir(dir.data_dir.as_deref())?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let out = out.canonicalize()?;
            let body = json!({ "out": out, "concat": concat }).to_string();
            let v = crate::api::request(&dir, "POST", &format!("/v1/jobs/{id}/export"), &body)?;
            if json {
                println!("{v}");
            } else {
                let files = v["files"].as_array().map_or(0, Vec::len);
                println!(
                    "{files} file{} written to {}",
                    if files == 1 { "" } else { "s" },
                    out.display()
                );
            }
            Ok(())
        }
        JobCommand::Cancel { id, dir } => {
            let dir = node_dir(dir.data_dir.as_deref())?;
            let v = crate::api::request(&dir, "POST", &format!("/v1/jobs/{id}/cancel"), "")?;
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
fn list(d: &Dir, json: bool) -> Result<()> {
    let dir = node_dir(d.data_dir.as_deref())?;
    let list = crate::api::request(&dir, "GET", "/v1/jobs", "")?;
    if json {
        println!("{list}");
        return Ok(());
    }
    println!(
        "{:<32} {:<20} {:<9} {:>6} {:>8} {:>7} {:>6} {:>6}",
        "id", "name", "state", "tasks", "verified", "running", "queued", "failed"
    );
    for j in list.as_array().into_iter().flatten() {
        let p = &j["progress"];
        println!(
            "{:<32} {:<20} {:<9} {:>6} {:>8} {:>7} {:>6} {:>6}",
            j["id"].as_str().unwrap_or("?"),
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
fn status(id: &str, dir: &Dir, json: bool) -> Result<()> {
    let dir = node_dir(dir.data_dir.as_deref())?;
    let d = crate::api::request(&dir, "GET", &format!("/v1/jobs/{id}"), "")?;
    if json {
        println!("{d}");
        return Ok(());
    }
    let s = &d["summary"];
    println!(
        "job {} ({}): {}, {} tasks, redundancy {}",
        s["id"].as_str().unwrap_or("?"),
        s["name"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        s["tasks"],
        s["redundancy"]
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
        "{:>5} {:<9} {:>8}  replicas (worker, institution, state, GPU time)",
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
                format!(
                    "{short} {} {}{why}{steps} {:.1} ms",
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
