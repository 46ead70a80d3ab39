//! Watching and steering a running node through its API: `alliance
//! status`, `peers`, `gpus`, `pause`, `resume`, `reputation`, `credits`,
//! `cert publish-revocations`; `gpus --local` reads this machine's adapters.

use std::path::{Path, PathBuf};

use alliance_kernels::executor::Executor;
use alliance_kernels::gpu;
use alliance_kernels::intake::Limits;
use alliance_kernels::selfbench;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::json;

use crate::config::{self};

use super::{DataDirArg, ask, print_json};

#[derive(Debug, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub dir: DataDirArg,
    /// Only this GPU (its index in `alliance gpus --local`); default: all.
    #[arg(long, value_name = "N")]
    pub gpu: Option<usize>,
}

#[derive(Debug, Args)]
pub struct GpusArgs {
    /// List this machine's adapters instead of the alliance's adverts.
    #[arg(long)]
    pub local: bool,
    /// With --local: show each GPU once per backend (Vulkan and GL).
    #[arg(long)]
    pub all_backends: bool,
    /// With --local: also run (or load from the cache) each GPU's self-benchmark.
    #[arg(long)]
    pub bench: bool,
    /// Data directory of the running node (and of the self-benchmark cache)
    /// [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

pub(super) fn status(a: &DataDirArg, json: bool) -> Result<()> {
    let s = ask(a, "GET", "/v1/status", "")?;
    if json {
        print_json(&s);
        return Ok(());
    }
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!("peer id      {}", s["peer_id"].as_str().unwrap_or("?"));
    println!("alliance     {}", s["alliance"].as_str().unwrap_or("?"));
    println!(
        "institution  {} (roles {})",
        s["institution"].as_str().unwrap_or("?"),
        s["roles"].as_str().unwrap_or("?")
    );
    println!("listening    {}", list(&s["listen_addrs"]));
    println!("external     {}", list(&s["external_addrs"]));
    println!("NAT          {}", s["nat"].as_str().unwrap_or("?"));
    println!(
        "members      {} verified of {} connected",
        s["members"], s["connected_peers"]
    );
    println!(
        "lending      {}",
        if s["paused"] == true { "paused" } else { "yes" }
    );
    if let Some(r) = s["rejected"].as_array().filter(|r| !r.is_empty()) {
        println!("rejected     {} peers; the latest:", r.len());
        for x in r.iter().rev().take(5) {
            println!(
                "  {}  {}",
                x["peer_id"].as_str().unwrap_or("?"),
                x["reason"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

pub(super) fn peers(a: &DataDirArg, json: bool) -> Result<()> {
    let p = ask(a, "GET", "/v1/peers", "")?;
    if json {
        print_json(&p);
        return Ok(());
    }
    println!(
        "{:<54} {:<30} {:<16} valid until",
        "peer id", "institution", "roles"
    );
    for x in p.as_array().into_iter().flatten() {
        println!(
            "{:<54} {:<30} {:<16} {}",
            x["peer_id"].as_str().unwrap_or("?"),
            x["institution"].as_str().unwrap_or("?"),
            x["roles"].as_str().unwrap_or("?"),
            x["valid_until"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

pub(super) fn credits(a: &DataDirArg, json: bool) -> Result<()> {
    let r = ask(a, "GET", "/v1/credits", "")?;
    if json {
        print_json(&r);
        return Ok(());
    }
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>8}",
        "institution", "given GPU s", "taken GPU s", "balance", "credits"
    );
    for b in r.as_array().into_iter().flatten() {
        println!(
            "{:<30} {:>12.3} {:>12.3} {:>12.3} {:>8}",
            b["institution"].as_str().unwrap_or("?"),
            num(&b["given_s"]),
            num(&b["taken_s"]),
            num(&b["balance_s"]),
            b["credits"],
        );
    }
    Ok(())
}

pub(super) fn reputation(a: &DataDirArg, json: bool) -> Result<()> {
    let r = ask(a, "GET", "/v1/reputation", "")?;
    if json {
        print_json(&r);
        return Ok(());
    }
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    println!(
        "{:<54} {:<24} {:>7} {:>6} {:>6} {:>6} {:>6}  replication",
        "worker", "institution", "agreed", "wrong", "lapses", "streak", "score"
    );
    for w in r["workers"].as_array().into_iter().flatten() {
        println!(
            "{:<54} {:<24} {:>7.1} {:>6.1} {:>6.1} {:>6} {:>6.2}  {}",
            w["peer_id"].as_str().unwrap_or("?"),
            w["institution"].as_str().unwrap_or("?"),
            num(&w["agreed"]),
            num(&w["wrong"]),
            num(&w["lapses"]),
            w["streak"],
            num(&w["score"]),
            w["replication"].as_str().unwrap_or("?"),
        );
    }
    println!();
    println!(
        "{:<30} {:>7} {:>7} {:>6} {:>6} {:>6}",
        "institution", "workers", "agreed", "wrong", "lapses", "score"
    );
    for i in r["institutions"].as_array().into_iter().flatten() {
        println!(
            "{:<30} {:>7} {:>7.1} {:>6.1} {:>6.1} {:>6.2}",
            i["institution"].as_str().unwrap_or("?"),
            i["workers"],
            num(&i["agreed"]),
            num(&i["wrong"]),
            num(&i["lapses"]),
            num(&i["score"]),
        );
    }
    Ok(())
}

pub(super) fn network_gpus(a: &GpusArgs, json: bool) -> Result<()> {
    let dir = DataDirArg {
        data_dir: a.data_dir.clone(),
    };
    let g = ask(&dir, "GET", "/v1/gpus", "")
        .context("(`alliance gpus --local` lists this machine's adapters without a node)")?;
    if json {
        print_json(&g);
        return Ok(());
    }
    println!(
        "{:<54} {:<24} {:<36} {:<8} {:>5}  why",
        "peer id", "institution", "GPU", "state", "slots"
    );
    for advert in g.as_array().into_iter().flatten() {
        for gpu in advert["gpus"].as_array().into_iter().flatten() {
            let mut why = gpu["reason"].as_str().unwrap_or("").to_owned();
            let terms = &gpu["terms"];
            for (key, label) in [("allow", "only for"), ("deny", "not for")] {
                let names: Vec<&str> = terms[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                    .collect();
                if !names.is_empty() {
                    if !why.is_empty() {
                        why.push_str("; ");
                    }
                    why.push_str(&format!("{label} {}", names.join(", ")));
                }
            }
            println!(
                "{:<54} {:<24} {:<36} {:<8} {:>5}  {why}",
                advert["peer_id"].as_str().unwrap_or("?"),
                advert["institution"]
                    .as_str()
                    .unwrap_or("?")
                    .chars()
                    .take(24)
                    .collect::<String>(),
                gpu["name"]
                    .as_str()
                    .unwrap_or("?")
                    .chars()
                    .take(36)
                    .collect::<String>(),
                gpu["state"].as_str().unwrap_or("?"),
                gpu["free_slots"]
            );
        }
    }
    Ok(())
}

pub(super) fn set_paused(a: &PauseArgs, paused: bool, json: bool) -> Result<()> {
    let verb = if paused { "pause" } else { "resume" };
    let path = match a.gpu {
        Some(n) => format!("/v1/worker/{verb}?gpu={n}"),
        None => format!("/v1/worker/{verb}"),
    };
    let v = ask(&a.dir, "POST", &path, "")?;
    if json {
        print_json(&v);
    } else {
        let what = match a.gpu {
            Some(n) => format!("GPU {n} of this node is"),
            None => "this node's GPUs are".to_owned(),
        };
        if paused {
            println!("paused: {what} no longer offered; tasks on it are handed back");
        } else {
            println!("resumed: {what} offered again");
        }
    }
    Ok(())
}

pub(super) fn publish_revocations(file: &Path, a: &DataDirArg, json: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let v = ask(a, "POST", "/v1/revocations", &text)?;
    if json {
        print_json(&v);
    } else {
        println!(
            "applied {} revocation list(s); the node gossips them to the alliance",
            v["applied"]
        );
    }
    Ok(())
}

pub(super) fn gpus(a: GpusArgs, json: bool) -> Result<()> {
    let found = gpu::select(
        gpu::list(&gpu::instance(), a.all_backends),
        &gpu::Selection::All,
    )?;
    // One adapter that cannot be opened (a GL context on a headless
    // server, say) is reported, and the others are still measured.
    let mut figures = vec![None; found.len()];
    let mut failures: Vec<Option<String>> = vec![None; found.len()];
    if a.bench {
        let dir = config::data_dir(a.data_dir.as_deref())
            .ok_or_else(|| anyhow!("no data directory for the benchmark cache: pass --data-dir"))?
            .join("cache");
        for (i, g) in found.iter().enumerate() {
            let measured = Executor::open(&g.adapter, Limits::default())
                .map_err(|e| format!("cannot open it: {e}"))
                .and_then(|mut ex| {
                    selfbench::measure_cached(&mut ex, &g.report, &dir)
                        .map_err(|e| format!("self-benchmark failed: {e}"))
                });
            match measured {
                Ok(f) => figures[i] = Some(f),
                Err(e) => failures[i] = Some(e),
            }
        }
        if failures.iter().all(Option::is_some) && !found.is_empty() {
            bail!(
                "no GPU could be measured: {}",
                failures
                    .iter()
                    .flatten()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
    if json {
        let rows: Vec<_> = found
            .iter()
            .zip(&figures)
            .zip(&failures)
            .map(|((g, f), e)| json!({ "adapter": g.report, "bench": f, "bench_error": e }))
            .collect();
        print_json(&serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<3} {:<40} {:<8} {:<16} {:>10} {:>8} {:>10} {:>10}",
        "#", "name", "backend", "type", "max buffer", "wg size", "copy GB/s", "FMA GFLOP/s"
    );
    for (g, f) in found.iter().zip(&figures) {
        let r = &g.report;
        let (copy, fma) = f.map_or(("-".into(), "-".into()), |f| {
            (
                format!("{:.1}", f.copy_gb_per_s),
                format!("{:.1}", f.fma_gflop_per_s),
            )
        });
        println!(
            "{:<3} {:<40} {:<8} {:<16} {:>7} MiB {:>8} {:>10} {:>10}",
            r.index,
            r.name.chars().take(40).collect::<String>(),
            r.backend.to_string(),
            r.device_type.to_string(),
            r.limits.max_buffer_size >> 20,
            r.limits.max_compute_invocations_per_workgroup,
            copy,
            fma
        );
    }
    for (g, e) in found.iter().zip(&failures) {
        if let Some(e) = e {
            println!("GPU {} ({}): {e}", g.report.index, g.report.backend);
        }
    }
    if found.iter().all(|g| g.report.software) {
        println!("(software adapters only: they work, slowly; no hardware GPU driver was found)");
    }
    Ok(())
}
