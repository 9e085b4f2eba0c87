//! The exit codes of every drover command, one meaning each (sysexits.h where one fits), and
//! which error ends with which. The table is printed by `--help` and the README repeats it.

use std::process::ExitCode;

/// What `--help` says of the exit codes.
pub const TABLE: &str = "Exit codes: 0 success; 1 a build or step did not succeed; 64 bad \
usage (a flag, an unknown build or step, not allowed); 65 bad data (a Nix file that does not \
evaluate, a derivation the runner refuses); 69 the runner could not be reached, is failing or \
is full (the builds are safe: try again later); 78 local configuration (certificates, keys, \
settings, the farm's cache); 130 interrupted while watching (the builds go on).";

/// Why a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A build or step did not succeed, or something else failed.
    Failed = 1,
    /// `EX_USAGE`: the command was used wrongly.
    Usage = 64,
    /// `EX_DATAERR`: the input data is wrong.
    Data = 65,
    /// `EX_UNAVAILABLE`: the runner is out of reach or failing.
    Unavailable = 69,
    /// `EX_CONFIG`: this machine's configuration is wrong.
    Config = 78,
    /// Interrupted (SIGINT) while watching, as a shell reports it (128 + 2).
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        Self::from(exit as u8)
    }
}

/// An error's exit code.
pub trait ExitStatus {
    /// How the command exits when this error ends it.
    fn exit(&self) -> Exit;
}
