//! Life under systemd (`dist/alliance.service`, `Type=notify`), through
//! sd-notify: `READY=1` once the swarm listens and the API serves; every
//! third of the watchdog period a `WATCHDOG=1` ping, sent only after the network
//! actor answered a status request, so a node whose main loop hangs stops
//! pinging and is restarted; a `STATUS=` line with the peers and the busy
//! GPUs. Outside systemd (no `NOTIFY_SOCKET`) these do nothing.
//!
//! `SIGHUP` (`systemctl reload alliance`) reads the config file again and
//! applies what can change under a running node without dropping a
//! connection or a task: the log filter and every GPU's owner policy.

use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{info, warn};

use crate::config::Config;
use crate::net::actor::Client;
use crate::work::Worker;

/// Sets the log filter (`RUST_LOG`'s syntax); an error says why not.
pub type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a reload changes besides the worker: the log filter.
pub struct Reload {
    /// The config file the node started from.
    pub config: PathBuf,
    pub set_filter: SetFilter,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("cannot tell systemd: {e}");
    }
}

/// Tells systemd the node is up: the swarm listens and the API serves.
pub fn ready(api: &str) {
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving the API on {api}")),
    ]);
}

/// Pings the watchdog and updates the status line while the node runs.
pub async fn keep_alive(client: Client, worker: Option<Worker>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let (watchdog, usec) = watchdog_usec();
    // A third of the period between pings, a third to wait for the
    // actor's answer: a slow answer still leaves a ping in time.
    let every = if watchdog {
        Duration::from_micros(usec / 3).max(Duration::from_millis(100))
    } else {
        Duration::from_secs(15)
    };
    loop {
        tokio::time::sleep(every).await;
        // The actor's answer is the sign of life: no answer, no ping.
        let Ok(Ok(status)) = tokio::time::timeout(every, client.status()).await else {
            warn!("the network actor did not answer in {every:?}; no watchdog ping");
            continue;
        };
        let (gpus, busy) = worker.as_ref().map_or((0, 0), Worker::load);
        let line = format!(
            "{} peers; {busy} of {gpus} lent GPUs busy",
            status.connected_peers
        );
        if watchdog {
            notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
        } else {
            notify(&[NotifyState::Status(&line)]);
        }
    }
}

/// Whether systemd wants watchdog pings, and their period in µs. As
/// libsystemd's `sd_watchdog_enabled` reads it: `WATCHDOG_USEC`, for this
/// process when `WATCHDOG_PID` names it or is unset (sd-notify's own
/// check insists on `WATCHDOG_PID`).
fn watchdog_usec() -> (bool, u64) {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&u| u > 0);
    let ours = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
    match usec {
        Some(u) if ours => (true, u),
        _ => (false, 0),
    }
}

/// Applies the config file again at every `SIGHUP`.
#[cfg(unix)]
pub async fn reload_on_hangup(reload: Reload, worker: Option<Worker>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        warn!("cannot watch for SIGHUP: the config is not reloaded while the node runs");
        return;
    };
    while hangups.recv().await.is_some() {
        // systemd wants the monotonic time beside RELOADING=1.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[NotifyState::Reloading, now]),
            Err(_) => notify(&[NotifyState::Reloading]),
        }
        match apply(&reload, worker.as_ref()) {
            Ok(()) => {
                info!(config = %reload.config.display(), "config reloaded: log filter and owner policy")
            }
            Err(e) => {
                warn!(config = %reload.config.display(), "config not reloaded, the node goes on as it was: {e}")
            }
        }
        notify(&[NotifyState::Ready]);
    }
}

#[cfg(not(unix))]
pub async fn reload_on_hangup(_: Reload, _: Option<Worker>) {}

fn apply(reload: &Reload, worker: Option<&Worker>) -> Result<(), String> {
    let cfg = Config::load(&reload.config).map_err(|e| e.to_string())?;
    // Everything is checked before anything changes.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.log.filter.clone());
    tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("[log] filter {filter:?}: {e}"))?;
    if let Some(w) = worker {
        w.set_policies(|index| {
            crate::work::policy::for_gpu(
                &cfg.worker.policy,
                &cfg.worker.gpu,
                index,
                cfg.worker.tasks_per_gpu,
            )
        })?;
    }
    (reload.set_filter)(&filter)
}
