//! `pollen`: the Pollen node and the operator's command line.
//!
//! Exit status: 0 on success, 1 when the command fails (the reason is printed to standard
//! error as `error: …`), 2 for a usage error.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
