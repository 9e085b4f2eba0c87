//! Executors run one step each and describe its outputs; the tunnel uploads them.
//!
//! - [`noop`]: builds nothing: waits, then reports each output as a one-file NAR made in memory,
//!   so the whole control plane (including uploads and the cache) runs without Nix.
//! - [`nix`]: drives a local `nix-store --serve --write` through Nix's serve protocol: makes the
//!   step's inputs valid from the farm's cache, builds the derivation, and reads back its outputs.

pub mod nix;
pub mod noop;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::job::Job;

pub use drover_proto::Outcome;

/// Where an output's NAR comes from.
#[derive(Clone)]
pub enum NarSource {
    /// Bytes made in memory.
    Bytes(Vec<u8>),
    /// DumpStorePath on the serve process that built it, which lives as long as this.
    Serve(std::sync::Arc<std::sync::Mutex<nix::ServeProcess>>),
}

impl std::fmt::Debug for NarSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bytes(bytes) => write!(f, "Bytes({} bytes)", bytes.len()),
            Self::Serve(_) => f.write_str("Serve"),
        }
    }
}

/// One output of a successful attempt.
#[derive(Debug, Clone)]
pub struct BuiltOutput {
    /// Output name.
    pub name: String,
    /// Output path.
    pub path: String,
    /// Store paths it refers to.
    pub references: Vec<String>,
    /// Its NAR's size in bytes.
    pub nar_size: u64,
    /// Its NAR.
    pub nar: NarSource,
}

/// What an attempt produced.
#[derive(Debug)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Why, for anything but success.
    pub message: String,
    /// Outputs of a success, each after the outputs it refers to.
    pub outputs: Vec<BuiltOutput>,
    /// Garbage-collector roots that keep the step's inputs and outputs in the local store until
    /// the report (and with it the upload) is done.
    pub pins: Option<std::sync::Arc<GcPins>>,
    /// How long each phase of the step took, for the debug log and the benchmarks.
    pub phases: Phases,
}

/// Named durations of a step's phases, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Phases(Vec<(&'static str, std::time::Duration)>);

impl Phases {
    /// Records that phase `name` ran from `since` until now; returns now, where the next phase
    /// starts.
    pub fn end(&mut self, name: &'static str, since: std::time::Instant) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.0.push((name, now - since));
        now
    }

    /// Appends the phases of `other`.
    pub fn extend(&mut self, other: Self) {
        self.0.extend(other.0);
    }
}

impl std::fmt::Display for Phases {
    /// `name=1.234ms` pairs, space-separated.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, (name, duration)) in self.0.iter().enumerate() {
            let separator = if index == 0 { "" } else { " " };
            write!(
                f,
                "{separator}{name}={:.3}ms",
                duration.as_secs_f64() * 1000.0
            )?;
        }
        Ok(())
    }
}

/// A directory of garbage-collector roots for one attempt, removed when dropped: nothing the
/// step reads or uploads can be collected while it runs, and nothing stays pinned after it.
#[derive(Debug, PartialEq, Eq)]
pub struct GcPins {
    directory: std::path::PathBuf,
}

impl GcPins {
    /// A fresh pin directory for `attempt` under Nix's `gcroots`.
    pub fn new(attempt: &str) -> std::io::Result<Self> {
        let directory = std::path::Path::new("/nix/var/nix/gcroots/drover").join(attempt);
        fs_err::create_dir_all(&directory)?;
        Ok(Self { directory })
    }

    /// Pins store paths (symlinks Nix's collector follows).
    pub fn pin<'a>(
        &self,
        prefix: &str,
        paths: impl IntoIterator<Item = &'a String>,
    ) -> std::io::Result<()> {
        for (index, path) in paths.into_iter().enumerate() {
            let link = self.directory.join(format!("{prefix}-{index}"));
            if !link.exists() {
                std::os::unix::fs::symlink(path, link)?;
            }
        }
        Ok(())
    }
}

impl Drop for GcPins {
    fn drop(&mut self) {
        let _ = fs_err::remove_dir_all(&self.directory);
    }
}

impl Report {
    /// A report of a failure.
    #[must_use]
    pub fn failure(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            message: message.into(),
            outputs: Vec::new(),
            pins: None,
            phases: Phases::default(),
        }
    }
}

/// Where an attempt's log goes as it is written: the job streams it to the runner while the build
/// runs, so a long log is never held in memory and what was written arrives even if the build
/// never ends. The log ends when the last clone of its sink is dropped.
#[derive(Clone)]
pub struct LogSink {
    sender: mpsc::Sender<Vec<u8>>,
}

impl LogSink {
    /// A sink feeding `sender`.
    #[must_use]
    pub fn new(sender: mpsc::Sender<Vec<u8>>) -> Self {
        Self { sender }
    }

    /// Appends to the log. If the upload has stopped, the bytes are dropped: the build goes on.
    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = self.sender.send(bytes.to_vec()).await;
    }

    /// [`LogSink::write`] from a thread outside the async runtime.
    pub fn blocking_write(&mut self, bytes: &[u8]) {
        let _ = self.sender.blocking_send(bytes.to_vec());
    }
}

/// Runs steps.
#[derive(Debug, Clone)]
pub enum Executor {
    /// Builds nothing.
    Noop(noop::NoopExecutor),
    /// Builds with Nix.
    Nix(nix::NixExecutor),
}

impl Executor {
    /// Runs one step until it ends or `abort` is cancelled, writing its log to `log`.
    pub async fn run(&self, job: &Job, abort: &CancellationToken, log: LogSink) -> Report {
        match self {
            Self::Noop(executor) => executor.run(job, abort, log).await,
            Self::Nix(executor) => executor.run(job, abort, log).await,
        }
    }
}
