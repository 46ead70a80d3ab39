//! `alliance node run`: the house assembled. Loads the membership files,
//! opens the database, finds the GPUs it lends and their owners' policy,
//! starts the swarm and the network actor, the worker, the submitter and
//! the HTTP API, and stops cleanly on Ctrl-C or SIGTERM.

pub mod service;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alliance_kernels::executor::Executor;
use alliance_kernels::intake::Limits;
use alliance_kernels::{gpu, selfbench};
use alliance_protocol::advert::{GpuInfo, GpuState};
use alliance_protocol::cert::{
    Chain, ChainError, RevocationSet, Revocations, Roles, TrustedCharter,
};
use alliance_protocol::{Identity, Signed, Timestamp};
use anyhow::{Context, Result, anyhow, bail};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tracing::{info, warn};

use crate::api;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::net;
use crate::net::actor::{self, Client, Inbound, Setup};
use crate::store::Store;
use crate::store::blobs::Blobs;
use crate::submit::Jobs;
use crate::trust::{self, Bundle};
use crate::work::gpus;
use crate::work::policy::{Gate, IdleConfig};
use crate::work::{Worker, WorkerSetup};

/// Runs the node until Ctrl-C or SIGTERM.
pub async fn run(
    cfg: Config,
    data_dir: &Path,
    bootstrap: bool,
    reload: service::Reload,
) -> Result<()> {
    // Before anything is touched: a second node on the same directory
    // fails here, naming the first.
    let _lock = crate::store::DirLock::take(data_dir)?;
    let identity = Arc::new(
        Identity::load(&cfg.resolve(data_dir, &cfg.key_file))
            .context("cannot use the node key (run `alliance init` first?)")?,
    );
    let charter = trust::read_charter(&cfg.resolve(data_dir, &cfg.charter))?;
    let chain_path = cfg.resolve(data_dir, &cfg.chain);
    let chain = own_chain(&chain_path, &identity)?;

    // Opening may wait a few seconds for a stopping node's lock: off the
    // async threads.
    let db = data_dir.join("db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .context("the database opener stopped")??;
    let revocations = revocations(&cfg, data_dir, &store, &charter, &chain)?;
    let member = chain
        .verify(
            &charter,
            &revocations,
            Timestamp::now(),
            if bootstrap {
                Roles::BOOTSTRAP
            } else {
                Roles::NONE
            },
        )
        .with_context(|| {
            format!(
                "{}: this node's own chain does not verify",
                chain_path.display()
            )
        })?;

    let lent = lent_gpus(&cfg, data_dir, member.roles.contains(Roles::WORK)).await?;
    let blobs = Blobs::open(&data_dir.join("blobs"))
        .with_context(|| format!("cannot open the blob store in {}", data_dir.display()))?;
    let job_tables = crate::submit::Tables::open(&store)?;
    let users = api::Users::open(&store, api::new_token(data_dir)?, cfg.api.per_user.clone())?;
    let submits = member.roles.contains(Roles::SUBMIT);

    // One registry: the node's counters, then the swarm's beside them.
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let network = swarm(&cfg, data_dir, &identity, &charter, bootstrap, registry)?;
    let own_peer = identity.peer_id();
    let bootstrap_addrs: Vec<Multiaddr> = charter
        .charter
        .bootstrap
        .iter()
        .chain(&cfg.network.bootstrap)
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .filter(|a| !a.to_string().contains(&own_peer.to_string()))
        .collect();

    info!(peer = %own_peer, alliance = %charter.charter.name, institution = %member.institution_name, roles = %member.roles, bootstrap, "node starting");
    let institution = (member.institution_key, member.institution_name.clone());
    let (inbound, requests) = tokio::sync::mpsc::channel(256);
    let (client, event_loop) = actor::new(
        network,
        Setup {
            identity: Arc::clone(&identity),
            charter,
            chain,
            member,
            revocations,
            bootstrap: bootstrap_addrs,
            store,
            gpus: lent.entries.clone(),
            paused: false,
            inbound: Some(inbound),
        },
    );
    let (stop_net, stopped) = tokio::sync::oneshot::channel();
    let network = tokio::spawn(event_loop.run(stopped));

    let worker = worker(&cfg, data_dir, &identity, &client, &blobs, lent, &metrics);
    if let Some(w) = &worker {
        tokio::spawn(w.clone().watch());
        tokio::spawn(w.clone().warm());
    }
    let jobs = if submits {
        let j = Jobs::open(
            Arc::clone(&identity),
            client.clone(),
            blobs.clone(),
            Blobs::open(&data_dir.join("checkpoints")).with_context(|| {
                format!("cannot open the checkpoint store in {}", data_dir.display())
            })?,
            job_tables,
            institution,
            metrics.clone(),
        )
        .context("cannot load this node's jobs")?;
        tokio::spawn(j.clone().run());
        Some(j)
    } else {
        None
    };
    tokio::spawn(serve_requests(requests, worker.clone(), jobs.clone()));
    tokio::spawn(service::keep_alive(client.clone(), worker.clone()));
    tokio::spawn(service::reload_on_hangup(reload, worker.clone()));
    tokio::spawn(crate::net::blobs::serve(
        client.clone(),
        blobs.clone(),
        metrics.clone(),
    ));

    let capacity = api::capacity::Capacity::default();
    tokio::spawn(capacity.clone().sample(client.clone()));
    let state = api::ApiState {
        client,
        jobs,
        worker,
        limits: cfg.worker.limits.clone(),
        users,
        blobs: blobs.clone(),
        uploading: Default::default(),
        metrics,
        capacity,
    };
    serve_api(&cfg, data_dir, state).await?;
    info!("stopping");
    let _ = stop_net.send(());
    let _ = network.await;
    Ok(())
}

/// This node's chain from the file at `path`: its own node certificate and
/// the certificate of the institution that signed it.
fn own_chain(path: &Path, identity: &Identity) -> Result<Chain> {
    let bundle = Bundle::read(std::slice::from_ref(&path.to_path_buf()))?;
    let own = identity.public();
    let node_cert = bundle
        .nodes
        .iter()
        .find(|(_, n)| n.verify().is_ok_and(|c| c.node == own))
        .map(|(_, n)| n.clone())
        .ok_or_else(|| {
            anyhow!(
                "{} holds no certificate for this node ({})",
                path.display(),
                identity.peer_id()
            )
        })?;
    let inst_cert = bundle
        .institutions
        .iter()
        .find(|(_, i)| i.verify().is_ok_and(|c| c.key == node_cert.signer()))
        .map(|(_, i)| i.clone())
        .ok_or_else(|| anyhow!("{} lacks the institution certificate", path.display()))?;
    Ok(Chain::new(inst_cert, node_cert))
}

/// The revocation lists in force: those in the database and those the
/// config names, each kept in the database to hand to members that lack
/// it.
fn revocations(
    cfg: &Config,
    data_dir: &Path,
    store: &Store,
    charter: &TrustedCharter,
    chain: &Chain,
) -> Result<RevocationSet> {
    let mut revocations = RevocationSet::new(charter);
    let mut lists: Vec<Signed<Revocations>> = store
        .revocations()
        .iter()
        .filter_map(|b| Signed::<Revocations>::from_bytes(b).ok())
        .collect();
    for path in &cfg.revocations {
        lists.extend(
            Bundle::read(&[cfg.resolve(data_dir, path)])?
                .revocations
                .into_iter()
                .map(|(_, l)| l),
        );
    }
    let own_inst = chain
        .institution
        .verify_institution(charter, &RevocationSet::new(charter), Timestamp::now())
        .ok();
    for list in &lists {
        match revocations.insert(list, own_inst.as_ref()) {
            // Kept in the database too, to hand to members that lack it.
            Ok(()) => store.save_revocations(&list.signer(), &list.to_bytes()),
            // Signed by an institution this node has not met yet: kept,
            // and applied once a member of it presents its certificate.
            Err(ChainError::UnknownRevoker { .. }) => {
                store.save_revocations(&list.signer(), &list.to_bytes());
            }
            Err(e) => warn!("revocation list ignored: {e}"),
        }
    }
    Ok(revocations)
}

/// The GPUs this node lends, each with its owner's policy and its first
/// advert entry.
struct Lent {
    reports: Vec<gpu::AdapterReport>,
    entries: Vec<GpuInfo>,
    gates: Vec<Gate>,
    /// Where the owner's pauses are kept across restarts.
    pause_file: PathBuf,
}

/// Finds the GPUs a node with the work role lends, each with its
/// self-benchmark (measured once per adapter and driver, then cached),
/// which submitters use to estimate where a task finishes first; applies
/// the owner's policy and the pauses kept from before a restart, so the
/// first advert already tells them.
async fn lent_gpus(cfg: &Config, data_dir: &Path, works: bool) -> Result<Lent> {
    let (selection, cache, slots) = (
        cfg.worker.gpus.clone(),
        data_dir.join("cache"),
        cfg.worker.tasks_per_gpu,
    );
    let (reports, entries): (Vec<gpu::AdapterReport>, Vec<_>) =
        tokio::task::spawn_blocking(move || -> Result<_> {
            if !works {
                return Ok((Vec::new(), Vec::new()));
            }
            let found = gpu::discover(&selection).context("[worker] gpus")?;
            let entries = found
                .iter()
                .map(|g| {
                    let figures = Executor::open(&g.adapter, Limits::default())
                        .map_err(|e| e.to_string())
                        .and_then(|mut ex| {
                            selfbench::measure_cached(&mut ex, &g.report, &cache)
                                .map_err(|e| e.to_string())
                        })
                        .inspect_err(|e| warn!(gpu = %g.report.name, "no self-benchmark: {e}"))
                        .ok();
                    gpus::advert_entry(&g.report, figures.as_ref(), GpuState::Idle, slots)
                })
                .collect();
            Ok((found.into_iter().map(|g| g.report).collect(), entries))
        })
        .await
        .context("GPU discovery stopped")??;
    let pause_file = data_dir.join("paused.json");
    let paused_gpus: Vec<usize> = std::fs::read_to_string(&pause_file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for index in cfg.worker.gpu.keys() {
        if !reports.iter().any(|g| g.index.to_string() == *index) {
            warn!(gpu = %index, "[worker.gpu.{index}] names a GPU this node does not lend");
        }
    }
    let mut gates = Vec::new();
    for g in &reports {
        let policy = crate::work::policy::for_gpu(
            &cfg.worker.policy,
            &cfg.worker.gpu,
            g.index,
            cfg.worker.tasks_per_gpu,
        )
        .map_err(|e| anyhow!("{}: {e}", data_dir.join(crate::config::FILE_NAME).display()))?;
        let mut gate = Gate::new(policy, Duration::from_secs(cfg.worker.idle.idle_for_secs));
        gate.paused = paused_gpus.contains(&g.index);
        gates.push(gate);
    }
    let wall = i64::try_from(Timestamp::now().as_secs()).unwrap_or(i64::MAX);
    let entries: Vec<GpuInfo> = entries
        .into_iter()
        .zip(gates.iter_mut())
        .map(|(entry, gate)| {
            let (state, reason) = gate.evaluate(None, std::time::Instant::now(), wall);
            GpuInfo {
                state,
                free_slots: if state == GpuState::Idle {
                    gate.policy.max_tasks
                } else {
                    0
                },
                reason,
                terms: gate.policy.terms.clone(),
                ..entry
            }
        })
        .collect();
    Ok(Lent {
        reports,
        entries,
        gates,
        pause_file,
    })
}

/// The swarm as `[network]` configures it (behind the pre-shared key when
/// there is one), listening on its addresses.
fn swarm(
    cfg: &Config,
    data_dir: &Path,
    identity: &Identity,
    charter: &TrustedCharter,
    bootstrap: bool,
    registry: prometheus_client::registry::Registry,
) -> Result<net::Network> {
    let psk = match &cfg.network.psk_file {
        Some(path) => {
            let path = cfg.resolve(data_dir, path);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("network.psk_file: cannot read {}", path.display()))?;
            let psk = net::read_psk(&text)
                .map_err(|e| anyhow!("network.psk_file {}: {e}", path.display()))?;
            info!(fingerprint = %psk.fingerprint(), "private network: only nodes with this pre-shared key can connect");
            Some(psk)
        }
        None => None,
    };
    let l = cfg.network.limits;
    let options = net::Options {
        mdns: cfg.network.mdns,
        bootstrap,
        psk,
        limits: net::Limits {
            max_established: l.max_connections,
            max_established_incoming: l.max_incoming,
            max_pending: l.max_pending,
            max_per_peer: l.max_per_peer,
            max_memory_fraction: f64::from(l.max_memory_percent) / 100.0,
        },
        relay: cfg.network.relay,
    };
    let mut network = net::build_swarm_with(identity, &charter.id, &options, registry)
        .map_err(|e| anyhow!("cannot start the network: {e}"))?;
    for addr in &cfg.network.listen {
        let a: Multiaddr = addr
            .parse()
            .with_context(|| format!("network.listen {addr:?}"))?;
        if psk.is_some() && a.iter().any(|p| matches!(p, Protocol::QuicV1)) {
            warn!(address = %a, "not listening: QUIC cannot carry the pre-shared key");
            continue;
        }
        network
            .swarm
            .listen_on(a.clone())
            .with_context(|| format!("cannot listen on {a}"))?;
    }
    Ok(network)
}

/// The worker, for a node that lends GPUs.
fn worker(
    cfg: &Config,
    data_dir: &Path,
    identity: &Arc<Identity>,
    client: &Client,
    blobs: &Blobs,
    lent: Lent,
    metrics: &Metrics,
) -> Option<Worker> {
    if lent.reports.is_empty() {
        return None;
    }
    let corrupt_after = std::env::var("ALLIANCE_TEST_CORRUPT_RESULTS")
        .ok()
        .map(|v| {
            v.strip_prefix("after:")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        });
    if let Some(n) = corrupt_after {
        warn!(
            honest_first = n,
            "ALLIANCE_TEST_CORRUPT_RESULTS is set: this worker returns WRONG outputs, to test verification"
        );
    }
    Some(Worker::new(WorkerSetup {
        identity: Arc::clone(identity),
        client: client.clone(),
        blobs: blobs.clone(),
        gpus: lent.reports,
        limits: cfg.worker.limits.clone(),
        shares: cfg.worker.shares.clone(),
        rlimits: cfg.worker.sandbox,
        scratch: data_dir.join("scratch"),
        program: std::env::current_exe().unwrap_or_else(|_| "alliance".into()),
        args: vec!["sandbox".into()],
        corrupt_after,
        gates: lent.gates,
        adverts: lent.entries,
        idle: IdleConfig {
            busy_file: cfg
                .worker
                .idle
                .busy_file
                .as_ref()
                .map(|f| cfg.resolve(data_dir, f)),
            ..cfg.worker.idle.clone()
        },
        pause_file: lent.pause_file,
        warm: cfg.worker.warm.clone(),
        metrics: metrics.clone(),
        compile_timeout: std::time::Duration::from_secs(cfg.worker.compile_timeout_secs),
    }))
}

/// Serves the HTTP API on `[api] listen` (loopback only) until Ctrl-C or
/// SIGTERM, with the address and a fresh token in the data directory
/// while it runs.
async fn serve_api(cfg: &Config, data_dir: &Path, state: api::ApiState) -> Result<()> {
    let tls = match (&cfg.api.tls_cert, &cfg.api.tls_key) {
        (Some(c), Some(k)) => Some(api::tls::server_config(
            &cfg.resolve(data_dir, c),
            &cfg.resolve(data_dir, k),
        )?),
        (None, None) => None,
        _ => bail!("[api] needs both tls_cert and tls_key, or neither"),
    };
    if tls.is_none() && !cfg.api.listen.ip().is_loopback() {
        bail!(
            "api.listen = {} is not a loopback address: off loopback the API serves only over TLS; set [api] tls_cert and tls_key (PEM), or listen on 127.0.0.1 and reach it through an SSH tunnel",
            cfg.api.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .with_context(|| format!("cannot serve the API on {} (api.listen)", cfg.api.listen))?;
    let api_addr = listener.local_addr()?;
    let addr_file = data_dir.join(api::ADDR_FILE);
    let scheme = if tls.is_some() { "https" } else { "http" };
    // The URL, and the certificate a local client is to trust, for the
    // commands run on this machine.
    let url_file = data_dir.join(api::URL_FILE);
    let host = if api_addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], api_addr.port()))
    } else {
        api_addr
    };
    std::fs::write(&url_file, format!("{scheme}://{host}"))
        .with_context(|| format!("cannot write {}", url_file.display()))?;
    let cert_file = data_dir.join(api::CERT_FILE);
    let _ = std::fs::remove_file(&cert_file);
    if let Some(c) = &cfg.api.tls_cert {
        std::fs::copy(cfg.resolve(data_dir, c), &cert_file)
            .with_context(|| format!("cannot write {}", cert_file.display()))?;
    }
    std::fs::write(&addr_file, api_addr.to_string())
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
    info!(%api_addr, scheme, "API listening");
    // The swarm listens already: the node is up.
    service::ready(&format!("{scheme}://{host}"));
    let app = api::router(state);
    let served = match tls {
        Some(config) => {
            axum::serve(api::tls::TlsListener::new(listener, config)?, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        }
    };
    served.context("the API server failed")?;
    let _ = std::fs::remove_file(&addr_file);
    Ok(())
}

/// Hands members' requests to the worker and the job scheduler, each
/// answered on its own task.
async fn serve_requests(
    mut requests: tokio::sync::mpsc::Receiver<Inbound>,
    worker: Option<Worker>,
    jobs: Option<Jobs>,
) {
    use alliance_protocol::wire::{Ack, DeclineReason};
    while let Some(request) = requests.recv().await {
        match request {
            Inbound::Offer {
                peer,
                member,
                request,
                reply,
            } => match &worker {
                Some(w) => {
                    let w = w.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(w.offers(peer, &member, *request).await);
                    });
                }
                None => {
                    let _ = reply.send(alliance_protocol::wire::OfferRequest::decline_all(
                        &DeclineReason::BadOffer("this node lends no GPU".into()),
                    ));
                }
            },
            Inbound::Report {
                peer,
                member,
                reports,
                reply,
            } => match &jobs {
                Some(j) => {
                    let j = j.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(j.reports(peer, &member, *reports).await);
                    });
                }
                None => {
                    let _ = reply.send(reports.refuse_all("this node submits no jobs"));
                }
            },
            Inbound::Progress {
                peer,
                member,
                progress,
                reply,
            } => match &jobs {
                Some(j) => {
                    let j = j.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(j.progress(peer, &member, *progress).await);
                    });
                }
                None => {
                    let _ = reply.send(Ack::Refused("this node submits no jobs".into()));
                }
            },
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
