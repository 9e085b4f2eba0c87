//! The Nix executor: drives a local `nix-store --serve --write` through Nix's serve protocol,
//! one process per step (see [`process`]).
//!
//! Per step: QueryValidPaths with substitution for the step's inputs, so Nix fetches them from
//! the farm's cache and the configured upstreams and checks their signatures; a step whose inputs
//! are still missing fails as the infrastructure's fault before anything is built, never
//! rebuilding an input here. Then BuildDerivation with the derivation the Build message carried
//! (no `.drv` file is needed in this store) and the step's limits, whose typed status decides the
//! outcome (see [`crate::serve::BuildStatus::outcome`]); then QueryPathInfos for the outputs'
//! references and sizes. The outputs' NARs are read with DumpStorePath while they upload, and the
//! process is closed when the report is dropped, which also ends the step's log.

mod process;
mod spares;

use prometheus_client::metrics::counter::Counter;
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix_primitives::derivation::Derivation;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::{BuiltOutput, GcPins, LogSink, NarSource, Outcome, Phases, Report};
use crate::config::{NixConfig, NixStore};
use crate::job::Job;
use crate::serve::{BuildLimits, BuildResult, PathInfo, ServeError};

pub use process::{Launch, ServeConnection, ServeProcess, StartError};
pub use spares::Spares;

/// Why Nix cannot be used on this machine.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A program could not be run (not installed?).
    #[error("running {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A program refused.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// What was run.
        command: &'static str,
        /// What it printed.
        stderr: String,
    },
    /// The scratch directory could not be emptied or made.
    #[error("preparing the scratch directory {path} (builder.state_directory)")]
    Scratch {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No serve process could be started.
    #[error("starting the first nix-store --serve")]
    Serve(#[source] StartError),
}

/// A store path that is never valid, whose validity check makes Nix open its store: for the
/// daemon, a connection.
const PROBE_PATH: &str = "/nix/store/00000000000000000000000000000000-drover-store-probe";

/// Builds with the local Nix.
#[derive(Clone)]
pub struct NixExecutor {
    spares: Arc<Spares>,
    store: NixStore,
    scratch: std::path::PathBuf,
}

impl std::fmt::Debug for NixExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixExecutor").finish_non_exhaustive()
    }
}

impl NixExecutor {
    /// An executor for `slots` concurrent steps in the store `config` names, substituting from
    /// its substituters (the farm's cache first) and trusting signatures by its keys; each
    /// `nix-store --serve` process it starts counts in `serve_processes_started`.
    #[must_use]
    pub fn new(config: &NixConfig, slots: u32, serve_processes_started: Counter) -> Self {
        let options = [
            ("substituters", config.substituters.join(" ")),
            ("trusted-public-keys", config.trusted_public_keys.join(" ")),
            // A narinfo miss must not be remembered: the farm's cache fills up as steps finish.
            ("narinfo-cache-negative-ttl", "0".to_owned()),
        ]
        .into_iter()
        .flat_map(|(name, value)| ["--option".to_owned(), name.to_owned(), value]);
        let arguments = ["--store".to_owned(), config.store.uri().to_owned()]
            .into_iter()
            .chain(options)
            .collect();
        let slots = usize::try_from(slots.max(1)).unwrap_or(1);
        let launch = Launch {
            arguments,
            scratch: config.scratch.clone(),
            started: serve_processes_started,
        };
        Self {
            spares: Arc::new(Spares::new(slots, launch)),
            store: config.store,
            scratch: config.scratch.clone(),
        }
    }

    /// Prepares the store, the scratch directory and the spare serve processes before any step
    /// runs, and returns Nix's version. A local store's database is created once, here: two
    /// `nix-store` processes creating it at the same moment fail with "database is busy". The
    /// daemon is asked once, so a builder whose daemon is down says so at start.
    pub async fn prepare(&self) -> Result<String, PrepareError> {
        self.empty_scratch()?;
        match self.store {
            NixStore::Local => {
                run_checked("nix-store", &["--init"], "nix-store --init").await?;
            }
            NixStore::Daemon => {
                run_checked(
                    "nix-store",
                    &[
                        "--store",
                        "daemon",
                        "--check-validity",
                        "--print-invalid",
                        PROBE_PATH,
                    ],
                    "reaching the nix-daemon (executor.store = \"daemon\"; is nix-daemon running, \
                     and is this builder's user in its trusted-users?)",
                )
                .await?;
            }
        }
        // Builds run in PID namespaces; say plainly if this machine does not allow them.
        run_checked(
            "unshare",
            &["--pid", "--fork", "--kill-child", "true"],
            "unshare --pid (builds run in a PID namespace of their own; this needs root or \
             CAP_SYS_ADMIN)",
        )
        .await?;
        let version = run_checked("nix-store", &["--version"], "nix-store --version").await?;
        let first = self.spares.take().await.map_err(PrepareError::Serve)?;
        drop(first);
        self.spares.refill();
        Ok(version)
    }

    /// Removes what processes of an earlier run left in the scratch directory (a builder killed
    /// with SIGKILL removes nothing) and makes it again, readable by this user only.
    fn empty_scratch(&self) -> Result<(), PrepareError> {
        let failed = |source| PrepareError::Scratch {
            path: self.scratch.clone(),
            source,
        };
        match std::fs::remove_dir_all(&self.scratch) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(failed(error));
            }
            _ => {}
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.scratch)
            .map_err(failed)
    }

    /// Runs one step on a serve process of its own.
    pub async fn run(&self, job: &Job, abort: &CancellationToken, log: LogSink) -> Report {
        let mut phases = Phases::default();
        let started = std::time::Instant::now();
        let mut report = self.conduct(job, abort, log, &mut phases).await;
        phases.end("executor", started);
        report.phases.extend(phases);
        report
    }

    /// Runs the step on a serve process, recording the phases of the conversation in `phases`.
    async fn conduct(
        &self,
        job: &Job,
        abort: &CancellationToken,
        log: LogSink,
        phases: &mut Phases,
    ) -> Report {
        let mut notes = log.clone();
        let pins = match GcPins::new(&job.attempt_id).and_then(|pins| {
            pins.pin("input", &job.input_paths)?;
            pins.pin("output", job.outputs.values())?;
            Ok(pins)
        }) {
            Ok(pins) => Arc::new(pins),
            Err(error) => {
                return Report::failure(
                    Outcome::InfrastructureFailure,
                    format!("pinning the step's paths against garbage collection: {error}"),
                );
            }
        };
        let derivation = match Derivation::parse(&job.drv_text) {
            Ok(derivation) => derivation,
            Err(error) => {
                return Report::failure(
                    Outcome::Failed,
                    format!("the derivation {} cannot be read: {error}", job.drv_path),
                );
            }
        };
        let taking = std::time::Instant::now();
        let taken = tokio::select! {
            taken = self.spares.take() => taken,
            () = abort.cancelled() => {
                return Report::failure(Outcome::InfrastructureFailure, "aborted");
            }
        };
        let mut process = match taken {
            Ok(process) => process,
            Err(error) => {
                return Report::failure(
                    Outcome::InfrastructureFailure,
                    error_context::report(&error).to_string(),
                );
            }
        };
        phases.end("process", taking);
        self.spares.refill();
        process.attach_log(log);
        let stopper = process.stopper();
        let request = Request::new(job, derivation);
        let mut task = tokio::task::spawn_blocking(move || {
            let mut phases = Phases::default();
            let conducted = request
                .conduct(&mut process.connection, &mut phases)
                .map_err(|error| {
                    let said = process.last_words();
                    (error, said)
                });
            (process, conducted, phases)
        });
        let joined = tokio::select! {
            joined = &mut task => joined,
            () = abort.cancelled() => {
                stopper.terminate(async { let _ = (&mut task).await; }).await;
                return Report::failure(Outcome::InfrastructureFailure, "aborted");
            }
        };
        let (process, conducted, conversation) = match joined {
            Ok(joined) => joined,
            Err(error) => {
                return Report::failure(
                    Outcome::InfrastructureFailure,
                    format!("the task talking to nix-store failed: {error}"),
                );
            }
        };
        phases.extend(conversation);
        outcome(job, conducted, process, pins, &mut notes).await
    }
}

/// The report of a step from how the conversation with Nix ended.
async fn outcome(
    job: &Job,
    conducted: Result<Conducted, (ServeError, String)>,
    process: ServeProcess,
    pins: Arc<GcPins>,
    notes: &mut LogSink,
) -> Report {
    match conducted {
        Err((error, said)) => Report::failure(
            Outcome::InfrastructureFailure,
            format!(
                "nix-store --serve failed ({}){}",
                error_context::report(&error)
                    .to_string()
                    .replace('\n', "; "),
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ),
        ),
        Ok(Conducted::MissingInputs(missing)) => {
            let message = format!(
                "inputs not in the farm's cache or any substituter: {}",
                missing.join(", ")
            );
            notes.write(format!("drover: {message}\n").as_bytes()).await;
            Report::failure(Outcome::InfrastructureFailure, message)
        }
        Ok(Conducted::Finished(result)) => {
            let (outcome, message) = result.outcome();
            Report::failure(outcome, message)
        }
        Ok(Conducted::Built(infos)) => {
            let report = built(job, &infos, process, pins);
            if report.outcome != Outcome::Succeeded {
                notes
                    .write(format!("drover: {}\n", report.message).as_bytes())
                    .await;
            }
            report
        }
    }
}

/// What the blocking part of a step needs: owned, since it runs on another thread.
struct Request {
    drv_path: String,
    derivation: Derivation,
    inputs: Vec<String>,
    outputs: Vec<String>,
    limits: BuildLimits,
}

/// How the conversation with Nix ended.
enum Conducted {
    /// Inputs that could not be made valid; nothing was built.
    MissingInputs(Vec<String>),
    /// The build did not succeed.
    Finished(BuildResult),
    /// The build succeeded; what Nix knows of the outputs.
    Built(Vec<PathInfo>),
}

impl Request {
    fn new(job: &Job, derivation: Derivation) -> Self {
        let whole_seconds = |limit: Option<Duration>| {
            // Zero means no limit to Nix, so a limit under a second is one second.
            limit.map_or(0, |limit| {
                limit.as_secs() + u64::from(limit.subsec_nanos() > 0)
            })
        };
        Self {
            drv_path: job.drv_path.clone(),
            derivation,
            inputs: job.input_paths.clone(),
            outputs: job.outputs.values().cloned().collect(),
            limits: BuildLimits {
                max_silent_seconds: whole_seconds(job.max_silent),
                timeout_seconds: whole_seconds(job.timeout),
                max_log_bytes: if job.max_log_bytes == u64::MAX {
                    0
                } else {
                    job.max_log_bytes
                },
            },
        }
    }

    /// Makes the inputs valid, builds, and reads the outputs' infos, recording each phase.
    /// Blocking.
    fn conduct(
        &self,
        connection: &mut ServeConnection,
        phases: &mut Phases,
    ) -> Result<Conducted, ServeError> {
        let mut phase = std::time::Instant::now();
        if !self.inputs.is_empty() {
            let valid = connection.query_valid_paths(&self.inputs, true)?;
            let missing: Vec<String> = self
                .inputs
                .iter()
                .filter(|path| !valid.contains(*path))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Ok(Conducted::MissingInputs(missing));
            }
        }
        phase = phases.end("inputs", phase);
        let result = connection.build_derivation(
            &self.drv_path,
            &self.derivation,
            &self.inputs,
            self.limits,
        )?;
        phase = phases.end("build", phase);
        if result.status.outcome() != Outcome::Succeeded {
            return Ok(Conducted::Finished(result));
        }
        let infos = connection.query_path_infos(&self.outputs)?;
        phases.end("outputs", phase);
        Ok(Conducted::Built(infos))
    }
}

/// The report of a successful build: every output present and within the size limit (Nix has
/// no such limit), each NAR to be read from `process` as it uploads.
fn built(job: &Job, infos: &[PathInfo], process: ServeProcess, pins: Arc<GcPins>) -> Report {
    let process = Arc::new(Mutex::new(process));
    let mut outputs = Vec::with_capacity(job.outputs.len());
    for (name, path) in &job.outputs {
        let Some(info) = infos.iter().find(|info| info.path == *path) else {
            return Report::failure(
                Outcome::InfrastructureFailure,
                format!("Nix reported the build done, but output {path} is not valid"),
            );
        };
        if info.nar_size > job.max_output_bytes {
            return Report::failure(
                Outcome::Failed,
                format!(
                    "output {path} is {} bytes, over the limit of {}",
                    info.nar_size, job.max_output_bytes
                ),
            );
        }
        outputs.push(BuiltOutput {
            name: name.clone(),
            path: path.clone(),
            references: info.references.clone(),
            nar_size: info.nar_size,
            nar: NarSource::Serve(Arc::clone(&process)),
        });
    }
    Report {
        outcome: Outcome::Succeeded,
        message: String::new(),
        outputs: order_by_references(outputs),
        pins: Some(pins),
        phases: Phases::default(),
    }
}

/// Runs a short command and returns its trimmed stdout, or what went wrong.
async fn run_checked(
    program: &'static str,
    arguments: &[&str],
    command: &'static str,
) -> Result<String, PrepareError> {
    let output = Command::new(program)
        .args(arguments)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| PrepareError::Spawn { program, source })?;
    if !output.status.success() {
        return Err(PrepareError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Orders outputs so that each comes after the outputs it refers to (Nix forbids cycles between
/// outputs).
fn order_by_references(mut pending: Vec<BuiltOutput>) -> Vec<BuiltOutput> {
    let mut ordered: Vec<BuiltOutput> = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = pending
            .iter()
            .position(|output| {
                output.references.iter().all(|reference| {
                    *reference == output.path
                        || ordered.iter().any(|done| done.path == *reference)
                        || !pending.iter().any(|other| other.path == *reference)
                })
            })
            .unwrap_or(0);
        ordered.push(pending.remove(ready));
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(path: &str, references: &[&str]) -> BuiltOutput {
        BuiltOutput {
            name: path.to_owned(),
            path: path.to_owned(),
            references: references.iter().map(|r| (*r).to_owned()).collect(),
            nar_size: 0,
            nar: NarSource::Bytes(Vec::new()),
        }
    }

    #[test]
    fn outputs_come_after_what_they_refer_to() {
        let ordered = order_by_references(vec![
            output("out", &["dev", "out", "/nix/store/x-glibc"]),
            output("dev", &["lib"]),
            output("lib", &[]),
        ]);
        let paths: Vec<&str> = ordered.iter().map(|o| o.path.as_str()).collect();
        assert_eq!(paths, ["lib", "dev", "out"]);
    }

    #[test]
    fn the_scratch_directory_is_emptied_at_start_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("nix");
        let left = scratch.join("serve-left-by-a-killed-builder");
        fs_err::create_dir_all(&left).unwrap();
        fs_err::write(left.join("narinfo-cache.sqlite"), "").unwrap();
        let executor = NixExecutor::new(
            &NixConfig {
                substituters: Vec::new(),
                trusted_public_keys: Vec::new(),
                store: NixStore::Daemon,
                scratch: scratch.clone(),
            },
            1,
            Counter::default(),
        );
        executor.empty_scratch().unwrap();
        assert!(!left.exists(), "what a killed builder left is removed");
        let mode = fs_err::metadata(&scratch).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
