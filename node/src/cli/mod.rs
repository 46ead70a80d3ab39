//! The `alliance` command line, one file per user:
//!
//! - [`operator`]: the alliance operator founds the alliance (`charter
//!   new`), admits institutions (`charter admit`), makes the pre-shared
//!   key, and revokes.
//! - [`admin`]: the lab admin sets up a node (`init`), creates the
//!   institution key and certifies nodes (`member …`), checks certificates
//!   and the node (`cert verify`, `node check`), and runs it (`node run`).
//! - [`researcher`]: `submit` and `job …`, clients of the node's HTTP API;
//!   [`users`]: `user …`, the admin's handing out of API tokens.
//! - [`status`]: watching and steering a running node: `status`, `peers`,
//!   `gpus`, `pause`, `resume`, `reputation`, `credits`, publishing
//!   revocations.
//! - [`demo`]: the whole alliance on one machine.
//!
//! Every command that prints a table prints JSON with `--json`.

mod admin;
pub mod demo;
mod operator;
pub mod researcher;
mod status;
pub mod users;

pub use admin::{
    CertCommand, InitArgs, IssueArgs, MemberCommand, NodeCheckArgs, NodeCommand, NodeRunArgs,
    VerifyArgs,
};
use admin::{init, issue, member_new, node_check, node_run, single, verify};
pub use operator::{AdmitArgs, CharterCommand, CharterNewArgs, RevokeArgs, RootFiles};
use operator::{admit, charter_new, charter_show, psk_new, revoke};
pub use status::{GpusArgs, PauseArgs};
use status::{
    credits, gpus, network_gpus, peers, publish_revocations, reputation, set_paused, status,
};

use std::path::{Path, PathBuf};

use alliance_protocol::PublicKey;
use alliance_protocol::cert::Roles;
use alliance_protocol::keys::Identity;
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::{self};

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
    Demo(demo::DemoArgs),
    /// Submit a job file to this node; `--wait` shows progress until it ends.
    Submit(researcher::SubmitArgs),
    /// Jobs: list, status, wait, results, cancel.
    #[command(subcommand)]
    Job(researcher::JobCommand),
    /// Lab admin: the users of this node's API and their tokens.
    #[command(subcommand)]
    User(users::UserCommand),
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
pub struct DataDirArg {
    /// Data directory of the running node
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
        Command::Node(NodeCommand::ConfigReference) => {
            print!("{}", config::reference().map_err(|e| anyhow!(e))?);
            Ok(())
        }
        Command::Status(a) => status(&a, json),
        Command::Peers(a) => peers(&a, json),
        Command::Gpus(a) if a.local => gpus(a, json),
        Command::Gpus(a) => network_gpus(&a, json),
        Command::Pause(a) => set_paused(&a, true, json),
        Command::Resume(a) => set_paused(&a, false, json),
        Command::Cert(CertCommand::PublishRevocations { file, node }) => {
            publish_revocations(&file, &node, json)
        }
        Command::Demo(a) => demo::run(&a),
        Command::Submit(a) => researcher::submit(&a, json),
        Command::Job(c) => researcher::job(c, json),
        Command::User(c) => users::user(c, json),
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

fn data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    config::data_dir(explicit)
        .ok_or_else(|| anyhow!("no data directory: pass --data-dir or set $ALLIANCE_DATA_DIR"))
}

/// What a node logs when `RUST_LOG` does not say: what an operator reads,
/// not a line per task.
pub const DEFAULT_LOG: &str = "info,libp2p_gossipsub=warn";

fn ask(a: &DataDirArg, method: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    crate::api::request(&data_dir(a.data_dir.as_deref())?, method, path, body)
}
