//! The noop executor: builds nothing in a fixed time, and reports each output as a one-file NAR
//! made in memory. A derivation whose environment sets [`NOOP_FAIL_VARIABLE`] fails, with its
//! value in the log; one that sets [`NOOP_PANIC_VARIABLE`] panics the job running it, so tests
//! can show that a job's panic stays that step's failure; one that sets [`NOOP_SLEEP_VARIABLE`]
//! takes that many milliseconds instead of the fixed time, so benchmarks can give each
//! derivation a duration of its own.

use std::time::Duration;

use nix_primitives::Derivation;
use tokio_util::sync::CancellationToken;

use super::{BuiltOutput, LogSink, NarSource, Outcome, Report};
use crate::job::Job;

/// The environment variable that makes the noop executor fail a step.
pub const NOOP_FAIL_VARIABLE: &str = "DROVER_NOOP_FAIL";

/// The environment variable that makes the noop executor panic.
pub const NOOP_PANIC_VARIABLE: &str = "DROVER_NOOP_PANIC";

/// The environment variable that sets how long the noop executor takes, in milliseconds.
pub const NOOP_SLEEP_VARIABLE: &str = "DROVER_NOOP_SLEEP_MS";

/// Builds nothing, in a fixed time.
#[derive(Debug, Clone)]
pub struct NoopExecutor {
    /// How long each step takes.
    pub build_time: Duration,
}

impl NoopExecutor {
    /// Runs one step.
    ///
    /// # Panics
    /// When the derivation sets [`NOOP_PANIC_VARIABLE`]: the fault this executor injects.
    pub async fn run(&self, job: &Job, abort: &CancellationToken, mut log: LogSink) -> Report {
        log.write(format!("noop build of {}\n", job.drv_path).as_bytes())
            .await;
        let derivation = match Derivation::parse(&job.drv_text) {
            Ok(derivation) => derivation,
            Err(error) => {
                let message = format!("the runner sent a malformed derivation: {error}");
                return Report::failure(Outcome::InfrastructureFailure, message);
            }
        };
        let build_time = derivation
            .env
            .get(NOOP_SLEEP_VARIABLE.as_bytes())
            .and_then(|millis| std::str::from_utf8(millis).ok()?.parse().ok())
            .map_or(self.build_time, Duration::from_millis);
        tokio::select! {
            () = abort.cancelled() => {
                return Report::failure(Outcome::InfrastructureFailure, "aborted");
            }
            () = tokio::time::sleep(build_time) => {}
        }
        assert!(
            !derivation.env.contains_key(NOOP_PANIC_VARIABLE.as_bytes()),
            "{NOOP_PANIC_VARIABLE} is set"
        );
        if let Some(reason) = derivation.env.get(NOOP_FAIL_VARIABLE.as_bytes()) {
            log.write(reason).await;
            log.write(
                b"
",
            )
            .await;
            return Report::failure(Outcome::Failed, format!("{NOOP_FAIL_VARIABLE} is set"));
        }
        let mut outputs = Vec::new();
        for (name, path) in &job.outputs {
            let mut nar = Vec::new();
            let contents = format!("noop output {name} of {}\n", job.drv_path);
            if let Err(error) =
                nix_primitives::nar::write_file_nar(contents.as_bytes(), false, &mut nar)
            {
                return Report::failure(Outcome::InfrastructureFailure, error.to_string());
            }
            outputs.push(BuiltOutput {
                name: name.clone(),
                path: path.clone(),
                references: Vec::new(),
                nar_size: nar.len() as u64,
                nar: NarSource::Bytes(nar),
            });
        }
        log.write(b"done\n").await;
        Report {
            outcome: Outcome::Succeeded,
            message: String::new(),
            outputs,
            pins: None,
            phases: super::Phases::default(),
        }
    }
}
