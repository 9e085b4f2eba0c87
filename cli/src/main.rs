//! `drover`, the command line of the farm: parse the arguments, run the subcommand, and on failure
//! print the whole error chain and exit with a code that says whether the command line was refused
//! (64, `EX_USAGE`) or the work failed (1).

mod certs;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use error_context::{Severity, WithContext};

/// `EX_USAGE` from sysexits.h: the command line was refused (an invalid role, name or DNS name).
const EX_USAGE: u8 = 64;

/// The drover command line.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about = "Operate a drover build farm.")]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create the farm's certificate authority and issue certificates from it.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(command) => certs::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.report());
            exit_code(&error)
        }
    }
}

/// The exit code for a failed command: decided by the root error's severity, never by its text.
fn exit_code(error: &WithContext<certs::CertsError>) -> ExitCode {
    match error.severity() {
        Severity::Reject => ExitCode::from(EX_USAGE),
        Severity::Fatal | Severity::Session | Severity::Step => ExitCode::FAILURE,
    }
}
