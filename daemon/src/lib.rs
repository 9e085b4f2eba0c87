//! The process skeleton `drover-queue-runner` and `drover-builder` share: logging to stderr,
//! waiting for SIGINT or SIGTERM, reading a TOML configuration file into raw serde structs with
//! one typed error (so both daemons fail the same way on the same mistakes), and telling systemd
//! how they are ([`notify`]).

pub mod notify;
pub mod tied;

use std::path::{Path, PathBuf};

use error_context::{Classify, Severity};
use serde::de::DeserializeOwned;

/// Exit code for an unusable configuration (`EX_CONFIG`); systemd units list it in
/// `RestartPreventExitStatus` so a typo does not restart-loop.
pub const EX_CONFIG: u8 = 78;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("reading the configuration file")]
    Read(#[source] std::io::Error),
    /// The file is not valid TOML for the schema (the parser names the key and line).
    #[error("parsing {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: toml::de::Error,
    },
    /// Values that parse but cannot work, all of them, each naming its key and value.
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl Classify for ConfigError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

/// Reads a TOML file into `T`.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = fs_err::read_to_string(path).map_err(ConfigError::Read)?;
    parse_toml(&text, path)
}

/// Parses TOML text into `T`; `path` only names the file in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Loads a daemon's configuration with `load`, or prints why it cannot (naming `program` and the
/// file) and returns the `EX_CONFIG` exit code the daemon must end with.
pub fn load_config<C>(
    program: &str,
    path: &Path,
    load: impl FnOnce(&Path) -> Result<C, ConfigError>,
) -> Result<C, std::process::ExitCode> {
    load(path).map_err(|error| {
        eprintln!(
            "{program}: {}: {}",
            path.display(),
            error_context::report(&error)
        );
        std::process::ExitCode::from(EX_CONFIG)
    })
}

/// Logs to stderr at the level `RUST_LOG` names (default `info`), coloured only on a terminal:
/// a journal or a log file gets plain text.
pub fn init_tracing() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Every SIGHUP, as a message (none, if the handler cannot be installed).
#[must_use]
pub fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    if let Ok(mut hangup) = signal(SignalKind::hangup()) {
        #[expect(clippy::disallowed_methods, reason = "lives as long as the process")]
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                // A reload already pending covers this one too.
                let _ = sender.try_send(());
            }
        });
    }
    receiver
}

/// Resolves on SIGINT or SIGTERM with the signal's name (never, if the handlers cannot be
/// installed), so the daemon can log why it stops.
pub async fn termination() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}
