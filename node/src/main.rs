//! `pollen`: the Pollen node and the operator's command line.
//!
//! Exit status: 0 on success, 1 when the command fails (the reason is printed to standard
//! error as `error: …`), 2 for a usage error.

mod cli_keys;

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
    /// Key files, trust roots (create, rotate, co-sign), node certificates, manifests.
    Keys(cli_keys::KeysArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let result = match cli.command {
        Command::Keys(args) => cli_keys::run(args, &mut stdout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
