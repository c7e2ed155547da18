//! The operator's command line: one module per command, plus what they share.
//!
//! * [`run`]: `pollen run`, a node.
//! * [`publish`]: `pollen publish`, a release through a node.
//! * [`status`]: `pollen status`.
//! * [`rollout`]: `pollen rollout halt|resume|rollback`, `pollen pin`, `pollen unpin`.
//! * [`keys`]: `pollen keys …`, key files, trust roots, certificates, manifests.
//! * [`demo`]: `pollen demo`, a whole local mesh of child processes.
//! * [`release`]: release arguments and building, shared by publish, keys and rollout.
//!
//! Every command talks to a node through [`pollen_node::client::NodeClient`].

mod check_cases;
mod demo;
mod keys;
mod publish;
mod release;
mod rollout;
mod run;
mod status;

use clap::{Parser, Subcommand};
use pollen_node::client::NodeClient;
use std::process::ExitCode;
use std::time::Duration;

/// A client of the node at `node` for a command (generous timeout: uploads take long),
/// with the API token `auth` finds.
fn client(node: &str, auth: &AuthArgs) -> NodeClient {
    NodeClient::new(node, Duration::from_secs(3600)).with_token(auth.token())
}

/// Where a command that changes a node finds the node's API token: `--token-file`, else
/// `POLLEN_API_TOKEN`, else `<--data-dir>/api-token` (default: the default data dir).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AuthArgs {
    /// The node's data directory (its API token is `<DIR>/api-token`).
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// A file holding the node's API token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
}

impl AuthArgs {
    /// The token, if one is found.
    fn token(&self) -> Option<String> {
        pollen_node::client::find_token(self.token_file.as_deref(), self.data_dir.as_deref())
    }
}

/// Pollen: a peer-to-peer mesh that distributes and serves signed ML models.
#[derive(Debug, Parser)]
#[command(name = "pollen", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a node: find peers, fetch, verify, store and seed models, serve the local API.
    Run(run::RunArgs),
    /// Hash and sign files into a release and publish it through a node.
    Publish(publish::PublishArgs),
    /// What a node knows of itself and the mesh, with the rollout picture per channel.
    Status(status::StatusArgs),
    /// Halt, resume or roll back a rollout (signed instructions / a rollback release).
    Rollout(rollout::RolloutArgs),
    /// Pin a node's channel to a version, whatever the rollouts say.
    Pin(rollout::PinArgs),
    /// Let a pinned channel follow the rollouts again.
    Unpin(rollout::UnpinArgs),
    /// Key files, trust roots (create, rotate, co-sign), node certificates, manifests.
    Keys(keys::KeysArgs),
    /// A whole local mesh on loopback, one command: publish, spread, serve, swap.
    Demo,
    /// Internal: a model's trial run under a memory limit (the node runs this as a child
    /// process before it activates a model).
    #[command(hide = true)]
    TrialModel {
        /// The ONNX file.
        #[arg(long)]
        model: std::path::PathBuf,
        /// The golden checks (postcard).
        #[arg(long)]
        golden: std::path::PathBuf,
        /// The memory budget in bytes.
        #[arg(long)]
        budget: u64,
    },
    /// Internal: every ONNX test case of a directory through the activation path and
    /// served again, with a summary (see `scripts/corpus/export_node_tests.py`).
    #[command(hide = true)]
    CheckCases {
        /// The directory of cases (`<case>/model.onnx`, `<case>/test_data_set_N/`).
        dir: std::path::PathBuf,
        /// Write one JSON line per case, then the summary, here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// Parse the command line, run the command, print an error and choose the exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let result = match cli.command {
        Command::Keys(args) => keys::run(args, &mut stdout),
        Command::Run(args) => {
            drop(stdout);
            run::run(args)
        }
        Command::Publish(args) => publish::publish(args, &mut stdout),
        Command::Status(args) => status::status(args, &mut stdout),
        Command::Rollout(args) => rollout::run(args, &mut stdout),
        Command::Pin(args) => rollout::pin(args, &mut stdout),
        Command::Unpin(args) => rollout::unpin(args, &mut stdout),
        Command::Demo => demo::run(&mut stdout),
        Command::TrialModel {
            model,
            golden,
            budget,
        } => pollen_node::serving::trial::child_main(&model, &golden, budget),
        Command::CheckCases { dir, out } => check_cases::run(&dir, out.as_deref(), &mut stdout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
