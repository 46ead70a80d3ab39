//! The lab admin's commands: `alliance init`, `alliance member new|issue`,
//! `alliance cert verify`, `alliance node check|run`.

use std::path::{Path, PathBuf};

use alliance_kernels::gpu;
use alliance_protocol::armor::Label;
use alliance_protocol::cert::{Chain, NodeCert, RevocationSet, Roles};
use alliance_protocol::keys::Identity;
use alliance_protocol::{PeerId, PublicKey, Signed, Timestamp};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::{self, Config};
use crate::trust::{self, Bundle, Verified};

use super::{
    DataDirArg, RevokeArgs, check_days, create_dir, data_dir, load_key, parse_roles, print_json,
};

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Data directory for the key, config and database
    /// [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Create the institution key (institution.key) and print its public key
    /// for the alliance operator.
    New {
        /// Directory to write institution.key into.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Issue a node certificate and write the node's chain file.
    Issue(IssueArgs),
    /// Revoke one of this institution's nodes (institution-signed list).
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The node's PeerId, as `alliance init` printed it.
    #[arg(long)]
    pub node: String,
    /// Roles of the node, within the institution's: work, submit, bootstrap.
    #[arg(long, default_value = "work,submit")]
    pub roles: String,
    /// Days the certificate is valid (at most the charter's limit).
    #[arg(long, default_value_t = 30)]
    pub days: u64,
    /// The institution key.
    #[arg(long, default_value = "institution.key")]
    pub institution_key: PathBuf,
    /// The institution certificate the alliance operator sent.
    #[arg(long, default_value = "institution.cert")]
    pub institution_cert: PathBuf,
    /// The charter file.
    #[arg(long, default_value = "charter.alliance")]
    pub charter: PathBuf,
    /// Where to write the chain [default: node-<end of peer id>.chain].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Verify certificates against a charter: prints who, what roles and
    /// until when; exits non-zero with the reason when any fails.
    Verify(VerifyArgs),
    /// Hand a revocation list to the running node, which applies it and
    /// gossips it to the alliance.
    PublishRevocations {
        /// The revocation list file.
        file: PathBuf,
        #[command(flatten)]
        node: DataDirArg,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Certificate, chain and revocation files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The charter to verify against.
    #[arg(long)]
    pub charter: PathBuf,
    /// Require these roles, comma-separated (e.g. `work`).
    #[arg(long)]
    pub role: Option<String>,
    /// Verify as of this time instead of now (2027-01-31, …T12:00:00Z, or Unix seconds).
    #[arg(long)]
    pub at: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run the node: join the alliance, advertise this node's GPUs, serve the local API.
    Run(NodeRunArgs),
    /// Check that this node is ready to join: config, key, charter and chain.
    Check(NodeCheckArgs),
    /// Print every config key with its type, default and meaning (Markdown).
    ConfigReference,
}

#[derive(Debug, Args)]
pub struct NodeRunArgs {
    /// Data directory [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file [default: <data dir>/alliance.toml].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run as a bootstrap node (the certificate must grant the bootstrap role).
    #[arg(long)]
    pub bootstrap: bool,
    /// How to write log lines [default: `[log] format`, else text].
    #[arg(long, value_enum)]
    pub log_format: Option<config::LogFormat>,
}

#[derive(Debug, Args)]
pub struct NodeCheckArgs {
    /// Data directory [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file [default: <data dir>/alliance.toml].
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub(super) fn init(a: InitArgs, json: bool) -> Result<()> {
    let dir = config::data_dir(a.data_dir.as_deref())
        .ok_or_else(|| anyhow!("no data directory: pass --data-dir or set $ALLIANCE_DATA_DIR"))?;
    create_dir(&dir)?;
    let key_path = dir.join("node.key");
    let config_path = dir.join(config::FILE_NAME);
    if config_path.exists() {
        bail!(
            "{} already exists: this directory holds a node already (use another --data-dir for a second node)",
            config_path.display()
        );
    }
    let id = Identity::generate();
    id.save(&key_path)?;
    trust::write_new(&config_path, config::EXAMPLE)?;
    let peer = id.peer_id();
    if json {
        print_json(&json!({
            "peer_id": peer.to_string(),
            "public_key": id.public().to_string(),
            "data_dir": dir,
            "key_file": key_path,
            "config": config_path,
        }));
    } else {
        println!("PeerId: {peer}");
        println!("key:    {} (mode 0600)", key_path.display());
        println!("config: {}", config_path.display());
        println!();
        println!("Next: send the PeerId to your institution's admin, who runs");
        println!("  alliance member issue --node {peer} --roles work,submit");
        println!(
            "and sends back a chain file; put it at {}",
            dir.join("node.chain").display()
        );
        println!(
            "with the alliance's charter at {}.",
            dir.join("charter.alliance").display()
        );
    }
    Ok(())
}

pub(super) fn member_new(out_dir: &Path, json: bool) -> Result<()> {
    create_dir(out_dir)?;
    let path = out_dir.join("institution.key");
    let id = Identity::generate();
    id.save(&path)?;
    if json {
        print_json(&json!({ "public_key": id.public().to_string(), "key_file": path }));
    } else {
        println!("institution key: {}", id.public());
        println!(
            "secret in {} (mode 0600: keep it safe, it admits your nodes)",
            path.display()
        );
        println!();
        println!("Send the key above to the alliance operator, who runs");
        println!(
            "  alliance charter admit --institution \"Your University\" --key {}",
            id.public()
        );
    }
    Ok(())
}

pub(super) fn single<T>(file: &Path, items: Vec<(PathBuf, T)>, what: &str) -> Result<T> {
    let mut it = items.into_iter();
    let (_, item) = it
        .next()
        .ok_or_else(|| anyhow!("{}: holds no {what}", file.display()))?;
    if it.next().is_some() {
        bail!("{}: holds more than one {what}", file.display());
    }
    Ok(item)
}

pub(super) fn issue(a: IssueArgs, json: bool) -> Result<()> {
    let charter = trust::read_charter(&a.charter)?;
    let key = load_key(&a.institution_key, "institution")?;
    let inst_signed = single(
        &a.institution_cert,
        Bundle::read(std::slice::from_ref(&a.institution_cert))?.institutions,
        "institution certificate",
    )?;
    let now = Timestamp::now();
    let inst = inst_signed
        .verify_institution(&charter, &RevocationSet::new(&charter), now)
        .with_context(|| {
            format!(
                "{}: institution certificate refused",
                a.institution_cert.display()
            )
        })?;
    if inst.cert.key != key.public() {
        bail!(
            "{} is for key {}, but {} holds key {}; pass the matching --institution-key",
            a.institution_cert.display(),
            inst.cert.key,
            a.institution_key.display(),
            key.public()
        );
    }
    let peer: PeerId = a.node.parse().map_err(|e| {
        anyhow!(
            "--node {:?} is not a PeerId ({e}); copy it from `alliance init`",
            a.node
        )
    })?;
    let node_key = PublicKey::from_peer_id(&peer).map_err(|e| anyhow!("--node: {e}"))?;
    let roles = parse_roles(&a.roles)?;
    let beyond = inst.cert.roles.missing(roles);
    if !beyond.is_empty() {
        bail!(
            "--roles: {} was admitted for {} only, not {beyond}",
            inst.cert.name,
            inst.cert.roles
        );
    }
    check_days(
        a.days,
        u64::from(charter.charter.defaults.max_node_cert_days),
    )?;
    let mut cert = NodeCert::new(&charter, key.public(), node_key, roles, now, a.days);
    let clipped = cert.not_after > inst.cert.not_after;
    cert.not_after = cert.not_after.min(inst.cert.not_after);
    let node_signed = Signed::sign(&cert, &key)?;
    let member = Chain::new(inst_signed.clone(), node_signed.clone())
        .verify(&charter, &RevocationSet::new(&charter), now, Roles::NONE)
        .context("the new chain does not verify")?;
    let text = trust::armored(Label::InstitutionCertificate, &inst_signed)
        + &trust::armored(Label::NodeCertificate, &node_signed);
    let peer_text = peer.to_string();
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "node-{}.chain",
            &peer_text[peer_text.len().saturating_sub(8)..]
        ))
    });
    trust::write_new(&out, &text)?;
    if json {
        print_json(&json!({
            "file": out, "peer_id": peer_text, "institution": member.institution_name,
            "roles": roles.to_string(), "valid_until": member.valid_until.to_string(),
        }));
    } else {
        println!(
            "issued {peer_text} roles {roles} until {}",
            member.valid_until
        );
        if clipped {
            println!("(shortened to the institution certificate's expiry)");
        }
        println!(
            "chain: {} (copy it to the node's data directory as node.chain)",
            out.display()
        );
    }
    Ok(())
}

pub(super) fn verify(a: VerifyArgs, json: bool) -> Result<()> {
    let charter = trust::read_charter(&a.charter)?;
    let bundle = Bundle::read(&a.files)?;
    let now = match &a.at {
        Some(t) => trust::parse_time(t)?,
        None => Timestamp::now(),
    };
    let required = match &a.role {
        Some(r) => r.parse::<Roles>().map_err(|e| anyhow!("--role: {e}"))?,
        None => Roles::NONE,
    };
    let verified = trust::verify_bundle(&charter, &bundle, now, required)?;
    if json {
        print_json(&serde_json::to_value(&verified)?);
        return Ok(());
    }
    println!(
        "charter {:?} ({})",
        charter.charter.name,
        charter.id.short()
    );
    for v in &verified {
        match v {
            Verified::Institution {
                file,
                name,
                key,
                roles,
                valid_until,
            } => {
                println!(
                    "OK  institution {name:?} key {key}\n    roles {roles}, valid until {valid_until}  [{}]",
                    file.display()
                );
            }
            Verified::Node {
                file,
                peer_id,
                institution,
                roles,
                valid_until,
                ..
            } => {
                println!(
                    "OK  node {peer_id} of {institution:?}\n    roles {roles}, valid until {valid_until}  [{}]",
                    file.display()
                );
            }
        }
    }
    Ok(())
}

pub(super) fn node_run(a: NodeRunArgs) -> Result<()> {
    let dir = data_dir(a.data_dir.as_deref())?;
    let config_path = a.config.unwrap_or_else(|| dir.join(config::FILE_NAME));
    let cfg = Config::load(&config_path)
        .with_context(|| "run `alliance init` first if this node is new")?;
    let dir = cfg.data_dir.clone().unwrap_or(dir);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log.filter));
    // The filter sits in a reload layer: SIGHUP changes it in place.
    let (filter, handle) = reload::Layer::new(filter);
    let logs = tracing_subscriber::registry().with(filter);
    let _ = match a.log_format.unwrap_or(cfg.log.format) {
        // Colours only on a terminal: a log file or the journal gets text.
        config::LogFormat::Text => logs
            .with(
                fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        config::LogFormat::Json => logs
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    let reload = crate::daemon::service::Reload {
        config: config_path.clone(),
        set_filter: Box::new(move |f| {
            let parsed = EnvFilter::try_new(f).map_err(|e| format!("[log] filter {f:?}: {e}"))?;
            handle.reload(parsed).map_err(|e| e.to_string())
        }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(crate::daemon::run(cfg, &dir, a.bootstrap, reload))
}

pub(super) fn node_check(a: NodeCheckArgs, json: bool) -> Result<()> {
    let dir = config::data_dir(a.data_dir.as_deref())
        .ok_or_else(|| anyhow!("no data directory: pass --data-dir or set $ALLIANCE_DATA_DIR"))?;
    let config_path = a.config.unwrap_or_else(|| dir.join(config::FILE_NAME));
    let cfg = Config::load(&config_path)
        .with_context(|| "run `alliance init` first if this node is new")?;
    let dir = cfg.data_dir.clone().unwrap_or(dir);
    let key = load_key(&cfg.resolve(&dir, &cfg.key_file), "node")?;
    let charter = trust::read_charter(&cfg.resolve(&dir, &cfg.charter))?;
    let chain_path = cfg.resolve(&dir, &cfg.chain);
    let mut files = vec![chain_path.clone()];
    files.extend(cfg.revocations.iter().map(|p| cfg.resolve(&dir, p)));
    let bundle = Bundle::read(&files)?;
    let now = Timestamp::now();
    let verified = trust::verify_bundle(&charter, &bundle, now, Roles::NONE)?;
    let node = verified
        .iter()
        .find_map(|v| match v {
            Verified::Node {
                peer_id,
                institution,
                roles,
                valid_until,
                ..
            } => Some((peer_id, institution, roles, valid_until)),
            Verified::Institution { .. } => None,
        })
        .ok_or_else(|| anyhow!("{}: holds no node certificate", chain_path.display()))?;
    let own = key.peer_id().to_string();
    if *node.0 != own {
        bail!(
            "{} certifies node {}, but this node's key is {}; ask your admin for a certificate for {own}",
            chain_path.display(),
            node.0,
            own
        );
    }
    let lent: Vec<String> = if node.2.contains("work") {
        gpu::discover(&cfg.worker.gpus)
            .with_context(|| format!("{}: [worker] gpus", config_path.display()))?
            .iter()
            .map(|g| {
                format!(
                    "{} {} ({})",
                    g.report.index, g.report.name, g.report.backend
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    if json {
        print_json(&json!({
            "ready": true, "peer_id": own, "alliance": charter.charter.name,
            "institution": node.1, "roles": node.2, "valid_until": node.3, "gpus": lent,
        }));
    } else {
        println!("ready: node {own}");
        println!(
            "  alliance    {} ({})",
            charter.charter.name,
            charter.id.short()
        );
        println!("  institution {}", node.1);
        println!("  roles       {}, valid until {}", node.2, node.3);
        for g in &lent {
            println!("  lends GPU   {g}");
        }
    }
    Ok(())
}
