//! The process skeleton `drover-queue-runner` and `drover-builder` share: logging to stderr,
//! waiting for SIGINT or SIGTERM, reading a TOML configuration file into raw serde structs with
//! one typed error (so both daemons fail the same way on the same mistakes), and telling systemd
//! how they are ([`notify`]).

pub mod notify;
pub mod tied;
pub mod traces;

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
    /// Keys the program does not know, all of them (misspelt, or from another version).
    #[error("unknown keys:\n  {}", .0.join("\n  "))]
    UnknownKeys(Vec<String>),
    /// Values that parse but cannot work, all of them, each naming its key and value.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
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

/// Parses TOML text into `T`; `path` only names the file in errors. Every key `T` does not know
/// is reported at once ([`ConfigError::UnknownKeys`]), so a file with several misspellings is
/// fixed in one round.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let parse_error = |source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    };
    let document = toml::de::Deserializer::parse(text).map_err(parse_error)?;
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(document, |key| unknown.push(key.to_string()));
    if !unknown.is_empty() {
        return Err(ConfigError::UnknownKeys(unknown));
    }
    parsed.map_err(parse_error)
}

/// Checks that every file named by a key of `files` (key, path) can be opened for reading by
/// this process, as the service's user: [`ConfigError::Invalid`] names each that cannot, with
/// its key and path.
pub fn check_readable(files: &[(&str, &Path)]) -> Result<(), ConfigError> {
    let problems: Vec<String> = files
        .iter()
        .filter_map(|(key, path)| {
            let opened = std::fs::OpenOptions::new().read(true).open(path);
            opened
                .err()
                .map(|error| format!("{key} = {}: {error}", path.display()))
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
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

/// The log filter of a daemon: `RUST_LOG` if set, otherwise `info` until the daemon's
/// configuration names one, and again on every reload.
#[derive(Clone)]
pub struct LogFilter {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    from_environment: bool,
}

/// Why a log filter was not applied (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    /// The directives do not parse.
    #[error("log filter {directives:?}: {reason}")]
    Invalid {
        /// The directives given.
        directives: String,
        /// What is wrong with them.
        reason: tracing_subscriber::filter::ParseError,
    },
    /// The logging layer is gone (the subscriber was dropped).
    #[error(transparent)]
    Reload(#[from] tracing_subscriber::reload::Error),
}

impl LogFilter {
    /// Applies `directives` (`RUST_LOG` syntax), unless `RUST_LOG` set the filter, which wins.
    /// Returns whether the filter changed.
    pub fn set(&self, directives: &str) -> Result<bool, LogFilterError> {
        if self.from_environment {
            return Ok(false);
        }
        let filter = tracing_subscriber::EnvFilter::try_new(directives).map_err(|reason| {
            LogFilterError::Invalid {
                directives: directives.to_owned(),
                reason,
            }
        })?;
        let old = self.handle.with_current(ToString::to_string)?;
        if old == filter.to_string() {
            return Ok(false);
        }
        self.handle.reload(filter)?;
        Ok(true)
    }
}

/// The `listen` address of the configuration's `section`, a problem noted in `problems` if it
/// is not one (a placeholder address is returned then, never used: the configuration is
/// refused).
pub fn listen_address(
    section: &str,
    value: &str,
    example: &str,
    problems: &mut Vec<String>,
) -> std::net::SocketAddr {
    value.parse().unwrap_or_else(|_| {
        problems.push(format!(
            "{section}.listen = {value:?} is not an address like {example}"
        ));
        std::net::SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// Checks that `directives` are a valid log filter (`RUST_LOG` syntax).
pub fn check_log_filter(directives: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::try_new(directives).map(drop)
}

/// Logs to stderr (with colours on a terminal) through a filter the daemon can change later,
/// and exports the spans of `service` over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
/// ([`traces`]); shut the exporter down before exiting.
#[must_use]
pub fn init_tracing(service: &'static str) -> (LogFilter, Option<traces::Traces>) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let from_environment = std::env::var_os("RUST_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let (export, traces) = traces::layer(service).unzip();
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(export)
        .init();
    let filter = LogFilter {
        handle,
        from_environment,
    };
    (filter, traces)
}

/// Resolves on the next SIGHUP (never, if the handler cannot be installed).
pub async fn hangup(signal: &mut Option<tokio::signal::unix::Signal>) {
    let received = match signal.as_mut() {
        Some(signal) => signal.recv().await.is_some(),
        None => false,
    };
    if !received {
        std::future::pending::<()>().await;
    }
}

/// The SIGHUP stream [`hangup`] waits on; install it once, at start.
#[must_use]
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
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
