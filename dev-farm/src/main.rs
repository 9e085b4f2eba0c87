//! `drover-dev-farm`, run as `drover dev-farm`: a whole farm on this machine. It is a binary of
//! its own so that the `drover` command line links neither the runner nor the test harness
//! (the ephemeral PostgreSQL) this needs; `drover dev-farm` executes it.

mod farm;

use std::process::ExitCode;

use clap::Parser;

/// Run a whole drover farm on this machine.
#[derive(Debug, Parser)]
#[command(name = "drover dev-farm", version)]
struct Cli {
    #[command(flatten)]
    args: farm::DevFarmArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    match farm::run(Cli::parse().args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.report());
            ExitCode::FAILURE
        }
    }
}
