//! The `alliance` command line.

use std::path::{Path, PathBuf};

use alliance_kernels::executor::Executor;
use alliance_kernels::gpu;
use alliance_kernels::intake::Limits;
use alliance_kernels::selfbench;
use alliance_protocol::armor::Label;
use alliance_protocol::cert::{
    Chain, Charter, CharterDefaults, InstitutionCert, NodeCert, RevocationSet, Revocations,
    Revoked, Roles, TrustedCharter,
};
use alliance_protocol::keys::Identity;
use alliance_protocol::{PeerId, PublicKey, Signed, Timestamp};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::config::{self, Config};
use crate::trust::{self, Bundle, Verified};

/// Alliance: pool idle GPUs across universities.
///
/// An alliance operator creates a charter and admits institutions; a lab
/// admin creates an institution key, issues certificates to the lab's nodes
/// and runs them; researchers submit jobs to their node.
#[derive(Debug, Parser)]
#[command(name = "alliance", version, propagate_version = true)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set up a node: create its key and a documented config file.
    Init(InitArgs),
    /// Alliance operator: create the charter, admit institutions, revoke.
    #[command(subcommand)]
    Charter(CharterCommand),
    /// Lab admin: create the institution key, issue and revoke node certificates.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Check certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Check that this node is ready to join its alliance.
    #[command(subcommand)]
    Node(NodeCommand),
    /// This node's status: identity, addresses, connected members, rejections.
    Status(DataDirArg),
    /// The verified members this node is connected to.
    Peers(DataDirArg),
    /// The alliance's GPUs as this node sees them (`--local`: this machine's adapters).
    Gpus(GpusArgs),
    /// Stop lending this node's GPUs (other members see it paused within seconds).
    Pause(PauseArgs),
    /// Lend this node's GPUs again.
    Resume(PauseArgs),
    /// Run the whole alliance on this machine: a charter, a bootstrap node,
    /// three workers and a submitter as processes, two jobs, checked results.
    Demo(crate::demo::DemoArgs),
    /// Submit a job file to this node; `--wait` shows progress until it ends.
    Submit(crate::jobcli::SubmitArgs),
    /// This node's jobs: list, status, results, cancel.
    #[command(subcommand)]
    Job(crate::jobcli::JobCommand),
    /// What this node verified of each worker and institution: agreeing and
    /// wrong results, lapses, score, and how `redundancy = "auto"` treats it.
    Reputation(DataDirArg),
    /// Each institution's account: GPU time its workers gave, its
    /// submitters took (verified work, signed credits, fading with a
    /// one-week half-life), and the balance that orders busy workers' queues.
    Credits(DataDirArg),
    /// Run tasks for the node in a sandboxed child process (started by the node).
    #[command(hide = true)]
    Sandbox,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Data directory for the key, config and database
    /// [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CharterCommand {
    /// Create a new alliance: its root key (root.key) and signed charter (charter.alliance).
    New(CharterNewArgs),
    /// Show a charter and check its signature.
    Show {
        /// The charter file.
        #[arg(long, default_value = "charter.alliance")]
        charter: PathBuf,
    },
    /// Admit an institution: sign its certificate with the root key.
    Admit(AdmitArgs),
    /// Revoke an institution or a node network-wide (root-signed list).
    Revoke(RevokeArgs),
    /// Make a pre-shared key for a private alliance network. Give the file
    /// to every node (`[network] psk_file`); nodes without it cannot connect.
    Psk {
        /// Where to write the key (mode 0600; it must not exist yet).
        #[arg(long, default_value = "swarm.key")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct CharterNewArgs {
    /// The alliance's name, e.g. "Alliance of Northern Universities".
    #[arg(long)]
    pub name: String,
    /// Multiaddress of a bootstrap node (repeat for several), e.g.
    /// /dns4/boot.example.edu/tcp/4001/p2p/12D3Koo…
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Directory to write root.key and charter.alliance into.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Seconds a GPU advert stays valid.
    #[arg(long, default_value_t = CharterDefaults::default().advert_ttl_secs)]
    pub advert_ttl: u32,
    /// Replicas per task when a job does not say.
    #[arg(long, default_value_t = CharterDefaults::default().default_redundancy)]
    pub redundancy: u8,
    /// Longest validity, in days, of a node certificate.
    #[arg(long, default_value_t = CharterDefaults::default().max_node_cert_days)]
    pub max_node_cert_days: u32,
}

#[derive(Debug, Args)]
pub struct AdmitArgs {
    /// The institution's name, e.g. "University of Example".
    #[arg(long)]
    pub institution: String,
    /// The institution's public key (64 hex digits), as `alliance member new` printed it.
    #[arg(long)]
    pub key: String,
    /// Roles its nodes may hold: work, submit, bootstrap (comma-separated).
    #[arg(long, default_value = "work,submit")]
    pub roles: String,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
    #[command(flatten)]
    pub root: RootFiles,
    /// Where to write the certificate [default: <institution>.institution.cert].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RootFiles {
    /// The alliance root key.
    #[arg(long, default_value = "root.key")]
    pub root_key: PathBuf,
    /// The charter file.
    #[arg(long, default_value = "charter.alliance")]
    pub charter: PathBuf,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The institution key or node PeerId to revoke.
    #[arg(long)]
    pub key: String,
    /// Why, recorded in the list and shown to peers.
    #[arg(long)]
    pub reason: String,
    /// The signer's key file [default: root.key for `charter revoke`,
    /// institution.key for `member revoke`].
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// The charter file.
    #[arg(long, default_value = "charter.alliance")]
    pub charter: PathBuf,
    /// The revocation list to extend; created when missing.
    #[arg(long, default_value = "revocations.alliance")]
    pub list: PathBuf,
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

#[derive(Debug, Args)]
pub struct DataDirArg {
    /// Data directory of the running node
    /// [default: $ALLIANCE_DATA_DIR, else ~/.local/share/alliance].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

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

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Init(a) => init(a, json),
        Command::Charter(CharterCommand::New(a)) => charter_new(a, json),
        Command::Charter(CharterCommand::Show { charter }) => charter_show(&charter, json),
        Command::Charter(CharterCommand::Admit(a)) => admit(a, json),
        Command::Charter(CharterCommand::Revoke(a)) => revoke(a, "root.key", json),
        Command::Charter(CharterCommand::Psk { out }) => psk_new(&out, json),
        Command::Member(MemberCommand::New { out_dir }) => member_new(&out_dir, json),
        Command::Member(MemberCommand::Issue(a)) => issue(a, json),
        Command::Member(MemberCommand::Revoke(a)) => revoke(a, "institution.key", json),
        Command::Cert(CertCommand::Verify(a)) => verify(a, json),
        Command::Node(NodeCommand::Check(a)) => node_check(a, json),
        Command::Node(NodeCommand::Run(a)) => node_run(a),
        Command::Status(a) => status(&a, json),
        Command::Peers(a) => peers(&a, json),
        Command::Gpus(a) if a.local => gpus(a, json),
        Command::Gpus(a) => network_gpus(&a, json),
        Command::Pause(a) => set_paused(&a, true, json),
        Command::Resume(a) => set_paused(&a, false, json),
        Command::Cert(CertCommand::PublishRevocations { file, node }) => {
            publish_revocations(&file, &node, json)
        }
        Command::Demo(a) => crate::demo::run(&a),
        Command::Submit(a) => crate::jobcli::submit(&a, json),
        Command::Job(c) => crate::jobcli::job(c, json),
        Command::Reputation(a) => reputation(&a, json),
        Command::Credits(a) => credits(&a, json),
        Command::Sandbox => std::process::exit(i32::from(alliance_kernels::sandbox::child_main())),
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn parse_roles(text: &str) -> Result<Roles> {
    text.parse::<Roles>().map_err(|e| anyhow!("--roles: {e}"))
}

fn parse_key(flag: &str, text: &str) -> Result<PublicKey> {
    let key: PublicKey = text.parse().map_err(|e| anyhow!("{flag}: {e}"))?;
    key.verifying_key().map_err(|e| anyhow!("{flag}: {e}"))?;
    Ok(key)
}

fn check_days(days: u64, max: u64) -> Result<()> {
    if days == 0 || days > max {
        bail!("--days {days}: give a number of days from 1 to {max}");
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
}

fn load_key(path: &Path, what: &str) -> Result<Identity> {
    Identity::load(path).with_context(|| format!("cannot use the {what} key"))
}

fn init(a: InitArgs, json: bool) -> Result<()> {
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

fn charter_new(a: CharterNewArgs, json: bool) -> Result<()> {
    for addr in &a.bootstrap {
        config::check_multiaddr(addr)
            .map_err(|why| anyhow!("--bootstrap {addr:?} is not a multiaddress: {why}"))?;
    }
    if a.redundancy == 0 {
        bail!("--redundancy 0: a task needs at least one replica");
    }
    create_dir(&a.out_dir)?;
    let key_path = a.out_dir.join("root.key");
    let charter_path = a.out_dir.join("charter.alliance");
    if charter_path.exists() {
        bail!(
            "{} already exists; choose another --out-dir",
            charter_path.display()
        );
    }
    let root = Identity::generate();
    let defaults = CharterDefaults {
        advert_ttl_secs: a.advert_ttl,
        default_redundancy: a.redundancy,
        max_node_cert_days: a.max_node_cert_days,
    };
    let charter = Charter::new(
        a.name,
        root.public(),
        a.bootstrap,
        defaults,
        Timestamp::now(),
    );
    let signed = Signed::sign(&charter, &root)?;
    let trusted = signed.verify_charter()?;
    root.save(&key_path)?;
    trust::write_new(&charter_path, &trust::armored(Label::Charter, &signed))?;
    if json {
        charter_show(&charter_path, true)?;
    } else {
        println!("alliance {:?} created", trusted.charter.name);
        println!("charter id: {}", trusted.id);
        println!(
            "root key:   {} (secret in {}, mode 0600: keep it offline)",
            root.public(),
            key_path.display()
        );
        println!(
            "charter:    {} (publish this to every member)",
            charter_path.display()
        );
    }
    Ok(())
}

fn psk_new(out: &Path, json: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow!("no randomness from the system: {e}"))?;
    let psk = libp2p::pnet::PreSharedKey::new(key);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (does it exist already?)", out.display()))?;
    file.write_all(psk.to_key_file().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    if json {
        print_json(&json!({ "file": out, "fingerprint": psk.fingerprint().to_string() }));
    } else {
        println!(
            "pre-shared key written to {} (fingerprint {})",
            out.display(),
            psk.fingerprint()
        );
        println!("give it to every node and set [network] psk_file; keep it secret");
    }
    Ok(())
}

fn charter_json(t: &TrustedCharter) -> serde_json::Value {
    json!({
        "id": t.id.to_string(),
        "name": t.charter.name,
        "root": t.charter.root.to_string(),
        "bootstrap": t.charter.bootstrap,
        "created_at": t.charter.created_at.to_string(),
        "defaults": {
            "advert_ttl_secs": t.charter.defaults.advert_ttl_secs,
            "default_redundancy": t.charter.defaults.default_redundancy,
            "max_node_cert_days": t.charter.defaults.max_node_cert_days,
        },
    })
}

fn charter_show(path: &Path, json: bool) -> Result<()> {
    let t = trust::read_charter(path)?;
    if json {
        print_json(&charter_json(&t));
    } else {
        let c = &t.charter;
        println!("alliance   {}", c.name);
        println!("id         {}", t.id);
        println!("root key   {}", c.root);
        println!("created    {}", c.created_at);
        println!(
            "bootstrap  {}",
            if c.bootstrap.is_empty() {
                "(none)".into()
            } else {
                c.bootstrap.join(", ")
            }
        );
        println!(
            "defaults   advert ttl {}s, redundancy {}, node certificates up to {} days",
            c.defaults.advert_ttl_secs,
            c.defaults.default_redundancy,
            c.defaults.max_node_cert_days
        );
        println!("signature  valid (self-signed by the root key)");
    }
    Ok(())
}

fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    if s.is_empty() {
        "institution".into()
    } else {
        s
    }
}

fn admit(a: AdmitArgs, json: bool) -> Result<()> {
    let charter = trust::read_charter(&a.root.charter)?;
    let root = load_key(&a.root.root_key, "root")?;
    if root.public() != charter.charter.root {
        bail!(
            "{} is not the root key of the charter {} (root {}); pass the matching --root-key",
            a.root.root_key.display(),
            a.root.charter.display(),
            charter.charter.root
        );
    }
    let key = parse_key("--key", &a.key)?;
    let roles = parse_roles(&a.roles)?;
    if roles.is_empty() {
        bail!("--roles: give at least one of work, submit, bootstrap");
    }
    check_days(a.days, 3650)?;
    let now = Timestamp::now();
    let cert = InstitutionCert::new(&charter, a.institution.clone(), key, roles, now, a.days);
    let signed = Signed::sign(&cert, &root)?;
    let inst = signed
        .verify_institution(&charter, &RevocationSet::new(&charter), now)
        .context("the new certificate does not verify")?;
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}.institution.cert", slug(&a.institution))));
    trust::write_new(
        &out,
        &trust::armored(Label::InstitutionCertificate, &signed),
    )?;
    if json {
        print_json(&json!({
            "file": out, "institution": inst.cert.name, "key": key.to_string(),
            "roles": roles.to_string(), "valid_until": inst.cert.not_after.to_string(),
        }));
    } else {
        println!(
            "admitted {:?} with roles {roles} until {}",
            inst.cert.name, inst.cert.not_after
        );
        println!(
            "certificate: {} (send it to the institution's admin)",
            out.display()
        );
    }
    Ok(())
}

fn member_new(out_dir: &Path, json: bool) -> Result<()> {
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

fn single<T>(file: &Path, items: Vec<(PathBuf, T)>, what: &str) -> Result<T> {
    let mut it = items.into_iter();
    let (_, item) = it
        .next()
        .ok_or_else(|| anyhow!("{}: holds no {what}", file.display()))?;
    if it.next().is_some() {
        bail!("{}: holds more than one {what}", file.display());
    }
    Ok(item)
}

fn issue(a: IssueArgs, json: bool) -> Result<()> {
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

fn revoke(a: RevokeArgs, default_key: &str, json: bool) -> Result<()> {
    let charter = trust::read_charter(&a.charter)?;
    let key_path = a
        .signing_key
        .clone()
        .unwrap_or_else(|| PathBuf::from(default_key));
    let signer = load_key(&key_path, "signing")?;
    let target = parse_key("--key", &a.key)?;
    let mut list = Revocations {
        alliance: charter.id,
        sequence: 1,
        issued_at: Timestamp::now(),
        revoked: Vec::new(),
    };
    if a.list.exists() {
        let old = single(
            &a.list,
            Bundle::read(std::slice::from_ref(&a.list))?.revocations,
            "revocation list",
        )?;
        if old.signer() != signer.public() {
            bail!(
                "{} was signed by {}, not by {}; pass another --list",
                a.list.display(),
                old.signer(),
                key_path.display()
            );
        }
        let old = old
            .verify()
            .with_context(|| format!("{}: revocation list refused", a.list.display()))?;
        list.sequence = old.sequence.saturating_add(1);
        list.revoked = old.revoked;
    }
    if !list.revoked.iter().any(|r| r.key == target) {
        list.revoked.push(Revoked {
            key: target,
            reason: a.reason.clone(),
            at: list.issued_at,
        });
    }
    let signed = Signed::sign(&list, &signer)?;
    let text = trust::armored(Label::Revocations, &signed);
    let tmp = a.list.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    trust::write_new(&tmp, &text)?;
    std::fs::rename(&tmp, &a.list)
        .with_context(|| format!("cannot replace {}", a.list.display()))?;
    let seq = signed.verify()?.sequence;
    if json {
        print_json(&json!({ "file": a.list, "revoked": target.to_string(), "sequence": seq }));
    } else {
        println!(
            "revoked {target} in {} (list {seq}); publish it to the alliance",
            a.list.display()
        );
    }
    Ok(())
}

fn verify(a: VerifyArgs, json: bool) -> Result<()> {
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

fn data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    config::data_dir(explicit)
        .ok_or_else(|| anyhow!("no data directory: pass --data-dir or set $ALLIANCE_DATA_DIR"))
}

/// What a node logs when `RUST_LOG` does not say: what an operator reads,
/// not a line per task.
pub const DEFAULT_LOG: &str = "info,libp2p_gossipsub=warn";

fn node_run(a: NodeRunArgs) -> Result<()> {
    let dir = data_dir(a.data_dir.as_deref())?;
    let config_path = a.config.unwrap_or_else(|| dir.join(config::FILE_NAME));
    let cfg = Config::load(&config_path)
        .with_context(|| "run `alliance init` first if this node is new")?;
    let dir = cfg.data_dir.clone().unwrap_or(dir);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(crate::run::run(cfg, &dir, a.bootstrap))
}

fn ask(a: &DataDirArg, method: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    crate::api::request(&data_dir(a.data_dir.as_deref())?, method, path, body)
}

fn status(a: &DataDirArg, json: bool) -> Result<()> {
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

fn peers(a: &DataDirArg, json: bool) -> Result<()> {
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

fn credits(a: &DataDirArg, json: bool) -> Result<()> {
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

fn reputation(a: &DataDirArg, json: bool) -> Result<()> {
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

fn network_gpus(a: &GpusArgs, json: bool) -> Result<()> {
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

fn set_paused(a: &PauseArgs, paused: bool, json: bool) -> Result<()> {
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

fn publish_revocations(file: &Path, a: &DataDirArg, json: bool) -> Result<()> {
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

fn node_check(a: NodeCheckArgs, json: bool) -> Result<()> {
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

fn gpus(a: GpusArgs, json: bool) -> Result<()> {
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
