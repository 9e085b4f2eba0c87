//! `drover`, the command line of the farm: parse the arguments, run the subcommand, and on failure
//! print the whole error chain and exit with one code per meaning (`exit.rs`).

mod admin;
mod attributes;
mod build;
mod call;
mod certs;
mod connection;
mod exit;
mod external;
mod inspect;
mod manage;
mod meta;
mod progress;
mod submit;
mod times;
mod token;
mod watch;

use std::error::Error;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use error_context::WithContext;

use exit::{Exit, ExitStatus};

/// The drover command line.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about = "Operate a drover build farm.", after_help = exit::TABLE)]
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
    /// Build on the farm like nix-build: submit, watch, then substitute the outputs into the
    /// local store from the farm's cache and leave ./result.
    Build(build::BuildArgs),
    /// Follow builds queued earlier until they end, as `submit --watch` does.
    Watch(watch::WatchArgs),
    /// Cancel a build you submitted (admins: any build): its steps no other build needs stop.
    Cancel(manage::BuildArgs),
    /// Queue a failed or cancelled build again, clearing its steps' failures.
    Restart(manage::RestartArgs),
    /// Show a build: its status, outputs, and why each unfinished step waits.
    Status(inspect::StatusArgs),
    /// List builds, newest first.
    List(inspect::ListArgs),
    /// Print a step's log (`-f`: follow it live).
    Logs(inspect::LogsArgs),
    /// Steer the farm (a certificate with role admin): builders, priority, the admission cap,
    /// certificates.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// API tokens for the runner's HTTP API (a certificate with role admin): create, revoke,
    /// list.
    #[command(subcommand)]
    Token(token::TokenCommand),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // clap prints help and versions too; a usage error exits 64, not clap's 2.
            let _ = error.print();
            return if error.use_stderr() {
                Exit::Usage.into()
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Certs(command) => finish(certs::run(command)),
        Command::Submit(args) => finish(watch::submit(args).await),
        Command::Watch(args) => finish(watch::run(args).await),
        Command::Build(args) => finish(build::run(args).await),
        Command::Cancel(args) => finish(manage::cancel(args).await),
        Command::Restart(args) => finish(manage::restart(args).await),
        Command::Status(args) => finish(inspect::status(args).await),
        Command::List(args) => finish(inspect::list(args).await),
        Command::Logs(args) => finish(inspect::logs(args).await),
        Command::Admin(command) => finish(admin::run(command).await),
        Command::Token(command) => finish(token::run(command).await),
        Command::DevFarm { args } => finish(external::run("drover-dev-farm", &args)),
    }
}

/// Prints a failure's whole chain; the exit code is decided by the root error's type, never by
/// its text.
fn finish<E: ExitStatus + Error + 'static>(result: Result<(), WithContext<E>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.report());
            error.root().exit().into()
        }
    }
}
