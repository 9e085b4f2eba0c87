//! The Nix executor. For each step it first realises the step's input paths with no derivation
//! given and `--max-jobs 0`, so Nix can only substitute them (from the farm's cache and the
//! configured upstreams): a missing input fails loudly instead of being rebuilt here. Then it
//! realises the `.drv` (substituted from the cache too) with one local job, keeping the build log
//! from stderr up to the step's limit, and maps Nix's exit status to an outcome: 100 and 102
//! (build failed, fixed-output hash mismatch) are the build's fault, 101 is a timeout, anything
//! else is the infrastructure's.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BuiltOutput, GcPins, LogSink, NarSource, Outcome, Report};
use crate::tunnel::Job;

/// Stands in for a time limit the runner did not set: a century.
const NO_LIMIT: Duration = Duration::from_hours(24 * 365 * 100);

/// Why Nix cannot be used on this machine.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// `nix-store` could not be run (not installed?).
    #[error("running nix-store")]
    Spawn(#[source] std::io::Error),
    /// `nix-store` refused.
    #[error("nix-store {argument} failed: {stderr}")]
    Failed {
        /// The argument it was run with.
        argument: &'static str,
        /// What it printed.
        stderr: String,
    },
}

/// Builds with the local Nix.
#[derive(Debug, Clone)]
pub struct NixExecutor {
    /// Substituters, the farm's cache first, space-separated as Nix wants them.
    pub substituters: String,
    /// Keys whose signatures Nix accepts, space-separated.
    pub trusted_public_keys: String,
}

impl NixExecutor {
    fn nix_store(&self) -> Command {
        let mut command = Command::new("nix-store");
        command
            .args(["--option", "substituters", &self.substituters])
            .args(["--option", "trusted-public-keys", &self.trusted_public_keys])
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Prepares the local store before any step runs, and returns Nix's version. Creating the
    /// store's database once, here, matters: two `nix-store` processes creating it at the same
    /// moment fail with "database is busy", which would fail the first parallel steps.
    pub async fn prepare(&self) -> Result<String, PrepareError> {
        for arguments in [["--init"], ["--version"]] {
            let output = Command::new("nix-store")
                .args(arguments)
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(PrepareError::Spawn)?;
            if !output.status.success() {
                return Err(PrepareError::Failed {
                    argument: arguments[0],
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                });
            }
            if arguments[0] == "--version" {
                return Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned());
            }
        }
        Ok(String::new())
    }

    /// Runs one step.
    pub async fn run(&self, job: &Job, abort: &CancellationToken, log: &mut LogSink) -> Report {
        let pins = match GcPins::new(&job.attempt_id).and_then(|pins| {
            pins.pin("input", &job.input_paths)?;
            pins.pin("output", job.outputs.values())?;
            Ok(pins)
        }) {
            Ok(pins) => std::sync::Arc::new(pins),
            Err(error) => {
                return Report::failure(
                    Outcome::InfrastructureFailure,
                    format!("pinning the step's paths against garbage collection: {error}"),
                );
            }
        };
        if !job.input_paths.is_empty() {
            let mut command = self.nix_store();
            command
                .arg("--realise")
                .args(&job.input_paths)
                .args(["--max-jobs", "0"]);
            match command.output().await {
                Ok(output) if output.status.success() => {}
                Ok(output) => {
                    log.write(&output.stderr).await;
                    return Report::failure(
                        Outcome::InfrastructureFailure,
                        "the step's inputs could not be substituted",
                    );
                }
                Err(error) => {
                    return Report::failure(
                        Outcome::InfrastructureFailure,
                        format!("running nix-store: {error}"),
                    );
                }
            }
        }
        let (outcome, message) = self.build(job, abort, log).await;
        if outcome != Outcome::Succeeded {
            return Report::failure(outcome, message);
        }
        match self.outputs(job).await {
            Ok(outputs) => match oversized(job).await {
                Ok(None) => Report {
                    outcome,
                    message,
                    outputs,
                    pins: Some(pins),
                },
                Ok(Some(message)) => {
                    log.write(format!("drover: {message}\n").as_bytes()).await;
                    Report::failure(Outcome::Failed, message)
                }
                Err(message) => Report::failure(Outcome::InfrastructureFailure, message),
            },
            Err(message) => Report::failure(Outcome::InfrastructureFailure, message),
        }
    }

    /// Realises the derivation, streaming its log (capped) to `log`.
    async fn build(
        &self,
        job: &Job,
        abort: &CancellationToken,
        log: &mut LogSink,
    ) -> (Outcome, String) {
        let mut command = self.nix_store();
        command
            .args(["--realise", &job.drv_path, "--max-jobs", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                return (
                    Outcome::InfrastructureFailure,
                    format!("running nix-store: {error}"),
                );
            }
        };
        let Some(mut stderr) = child.stderr.take() else {
            return (
                Outcome::InfrastructureFailure,
                "nix-store has no stderr".to_owned(),
            );
        };
        let limit = usize::try_from(job.max_log_bytes).unwrap_or(usize::MAX);
        let mut buffer = vec![0u8; 64 * 1024];
        let mut exceeded = false;
        let far = Instant::now() + NO_LIMIT;
        let deadline = job.timeout.map_or(far, |timeout| Instant::now() + timeout);
        let mut silent_until = job
            .max_silent
            .map_or(far, |silence| Instant::now() + silence);
        loop {
            tokio::select! {
                () = abort.cancelled() => {
                    terminate_group(&child).await;
                    let _ = child.wait().await;
                    return (Outcome::InfrastructureFailure, "aborted".to_owned());
                }
                () = tokio::time::sleep_until(deadline.min(silent_until)) => {
                    terminate_group(&child).await;
                    let _ = child.wait().await;
                    let message = if deadline <= silent_until {
                        format!("the build ran longer than {:?}", job.timeout.unwrap_or_default())
                    } else {
                        format!("the build printed nothing for {:?}", job.max_silent.unwrap_or_default())
                    };
                    log.write(format!("drover: {message}\n").as_bytes()).await;
                    return (Outcome::TimedOut, message);
                }
                read = stderr.read(&mut buffer) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(read) => {
                        if let Some(silence) = job.max_silent {
                            silent_until = Instant::now() + silence;
                        }
                        let room = limit.saturating_sub(log.written());
                        log.write(&buffer[..read.min(room)]).await;
                        if read > room && !exceeded {
                            exceeded = true;
                            terminate_group(&child).await;
                        }
                    }
                },
            }
        }
        let status = match child.wait().await {
            Ok(status) => status,
            Err(error) => {
                return (
                    Outcome::InfrastructureFailure,
                    format!("waiting for nix-store: {error}"),
                );
            }
        };
        if exceeded {
            return (Outcome::Failed, format!("the log exceeded {limit} bytes"));
        }
        match status.code() {
            Some(0) => (Outcome::Succeeded, String::new()),
            Some(100) => (Outcome::Failed, "the build failed".to_owned()),
            Some(101) => (Outcome::TimedOut, "the build timed out".to_owned()),
            Some(102) => (
                Outcome::Failed,
                "the fixed output's hash did not match".to_owned(),
            ),
            _ => (
                Outcome::InfrastructureFailure,
                format!("nix-store ended with {status}"),
            ),
        }
    }

    /// The outputs with their references, each after the outputs it refers to.
    async fn outputs(&self, job: &Job) -> Result<Vec<BuiltOutput>, String> {
        let mut outputs = Vec::new();
        for (name, path) in &job.outputs {
            let output = Command::new("nix-store")
                .args(["--query", "--references", path])
                .output()
                .await
                .map_err(|error| format!("running nix-store --query: {error}"))?;
            if !output.status.success() {
                return Err(format!("output {path} is not in the local store"));
            }
            let references = String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            outputs.push(BuiltOutput {
                name: name.clone(),
                path: path.clone(),
                references,
                nar: NarSource::LocalStore,
            });
        }
        Ok(order_by_references(outputs))
    }
}

/// The first output whose NAR exceeds the step's limit, described; Nix itself has no such limit.
async fn oversized(job: &Job) -> Result<Option<String>, String> {
    for path in job.outputs.values() {
        let output = Command::new("nix-store")
            .args(["--query", "--size", path])
            .output()
            .await
            .map_err(|error| format!("running nix-store --query --size: {error}"))?;
        let size: u64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| format!("nix-store --query --size {path} printed no size"))?;
        if size > job.max_output_bytes {
            return Ok(Some(format!(
                "output {path} is {size} bytes, over the limit of {}",
                job.max_output_bytes
            )));
        }
    }
    Ok(None)
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

/// Asks Nix (and everything it started) to stop: SIGTERM lets it clean up, unlike SIGKILL, which
/// would leave the derivation's own builder running.
async fn terminate_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{pid}")])
            .status()
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(path: &str, references: &[&str]) -> BuiltOutput {
        BuiltOutput {
            name: path.to_owned(),
            path: path.to_owned(),
            references: references.iter().map(|r| (*r).to_owned()).collect(),
            nar: NarSource::LocalStore,
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
}
