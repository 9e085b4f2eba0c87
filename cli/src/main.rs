//! `drover`, the command line of the farm: parse the arguments, run the subcommand, and on failure
//! print the whole error chain and exit with a code that says whether the input was refused
//! (64, `EX_USAGE`) or the work failed (1).

mod call;
mod certs;
mod connection;
mod external;
mod manage;
mod submit;

use std::error::Error;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use error_context::{Classify, Severity, WithContext};

/// `EX_USAGE` from sysexits.h: the input was refused (an invalid identity, a derivation the
/// runner will not build).
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
    /// Submit a build: a Nix file (instantiated here) or a .drv path.
    Submit(submit::SubmitArgs),
    /// Cancel a build you submitted (admins: any build): its steps no other build needs stop.
    Cancel(manage::BuildArgs),
    /// Queue a failed or cancelled build again, clearing its steps' failures.
    Restart(manage::BuildArgs),
    /// Run a whole farm on this machine (PostgreSQL, runner, builders with private stores);
    /// `drover dev-farm --help` lists its options.
    #[command(disable_help_flag = true)]
    DevFarm {
        /// Passed on to `drover-dev-farm`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Certs(command) => finish(certs::run(command)),
        Command::Submit(args) => finish(submit::run(args).await),
        Command::Cancel(args) => finish(manage::cancel(args).await),
        Command::Restart(args) => finish(manage::restart(args).await),
        Command::DevFarm { args } => finish(external::run("drover-dev-farm", &args)),
    }
}

/// Prints a failure's whole chain; the exit code is decided by the root's severity, never by
/// its text.
fn finish<E: Classify + Error + 'static>(result: Result<(), WithContext<E>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.report());
            match error.severity() {
                Severity::Reject => ExitCode::from(EX_USAGE),
                Severity::Fatal | Severity::Session | Severity::Step => ExitCode::FAILURE,
            }
        }
    }
}
