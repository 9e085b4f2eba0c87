//! Subcommands that are binaries of their own (`drover dev-farm` runs `drover-dev-farm`), found
//! beside `drover` itself, then on `PATH`: the command line stays small, and what they link
//! (the runner, an ephemeral PostgreSQL) stays out of it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use error_context::{Classify, Severity, WithContext};

use crate::exit::{Exit, ExitStatus};

/// Why an external subcommand could not be started.
#[derive(Debug, thiserror::Error)]
#[error("running {program}")]
pub struct ExternalError {
    /// The program.
    program: PathBuf,
    /// Why.
    #[source]
    source: std::io::Error,
}

impl ExitStatus for ExternalError {
    /// The program is not installed beside `drover` or on `PATH`.
    fn exit(&self) -> Exit {
        Exit::Config
    }
}

impl Classify for ExternalError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

/// Replaces this process with `name` and `args`; returns only if that failed.
pub fn run(name: &str, args: &[OsString]) -> Result<(), WithContext<ExternalError>> {
    let beside = std::env::current_exe()
        .ok()
        .map(|drover| drover.with_file_name(name))
        .filter(|path| path.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(name));
    let source = Command::new(&program).args(args).exec();
    Err(ExternalError { program, source }.into())
}
