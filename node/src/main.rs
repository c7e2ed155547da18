//! `pollen`: the Pollen node and the operator's command line.
//!
//! Exit status: 0 on success, 1 when the command fails (the reason is printed to standard
//! error as `error: …`), 2 for a usage error.

mod cli_demo;
mod cli_keys;
mod cli_node;
mod cli_rollout;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
    Run(cli_node::RunArgs),
    /// Hash and sign files into a release and publish it through a node.
    Publish(cli_node::PublishArgs),
    /// What a node knows of itself and the mesh, with the rollout picture per channel.
    Status(cli_node::StatusArgs),
    /// Halt, resume or roll back a rollout (signed instructions / a rollback release).
    Rollout(cli_rollout::RolloutArgs),
    /// Pin a node's channel to a version, whatever the rollouts say.
    Pin(cli_rollout::PinArgs),
    /// Let a pinned channel follow the rollouts again.
    Unpin(cli_rollout::UnpinArgs),
    /// Key files, trust roots (create, rotate, co-sign), node certificates, manifests.
    Keys(cli_keys::KeysArgs),
    /// A whole local mesh on loopback, one command: publish, spread, serve, swap.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let result = match cli.command {
        Command::Keys(args) => cli_keys::run(args, &mut stdout),
        Command::Run(args) => {
            drop(stdout);
            cli_node::run(args)
        }
        Command::Publish(args) => cli_node::publish(args, &mut stdout),
        Command::Status(args) => cli_node::status(args, &mut stdout),
        Command::Rollout(args) => cli_rollout::run(args, &mut stdout),
        Command::Pin(args) => cli_rollout::pin(args, &mut stdout),
        Command::Unpin(args) => cli_rollout::unpin(args, &mut stdout),
        Command::Demo => cli_demo::run(&mut stdout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
