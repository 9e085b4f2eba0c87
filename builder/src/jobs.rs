//! The steps running on this builder. They outlive tunnel sessions: a step goes on building
//! while the runner is away, and uploads its log and outputs over whichever session is joined
//! ([`Link`]). Each job ends in a result of its own: an error or a panic inside one job is that
//! step's infrastructure failure, never the builder's.

use std::collections::HashMap;
use std::time::Duration;

use drover_daemon::traces;
use drover_proto::v1::StepResult;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::executor::{Executor, LogSink, Phases};
use crate::job::Job;
use crate::link::Link;
use crate::upload_error::UploadError;
use crate::{log_upload, upload};

/// Log chunks buffered between a running build and its upload; a slow upload slows the build's
/// log reading, never the builder's memory.
const LOG_QUEUE: usize = 64;

/// The running steps.
#[derive(Default)]
pub struct Jobs {
    set: JoinSet<StepResult>,
    /// Attempt id and abort token of each running job, by task.
    running: HashMap<tokio::task::Id, (String, CancellationToken)>,
}

impl Jobs {
    /// Starts a step.
    pub fn start(&mut self, job: Job, executor: Executor, mut link: Link) {
        let abort = CancellationToken::new();
        let attempt_id = job.attempt_id.clone();
        let token = abort.clone();
        let handle = self.set.spawn(async move {
            match run_step(&mut link, &executor, &job, &token).await {
                Ok(result) => result,
                Err(error) => {
                    tracing::warn!(attempt = %job.attempt_id, error = %error_context::report(&error), "a step failed on this builder");
                    infrastructure_failure(&job.attempt_id, &error_context::report(&error).to_string())
                }
            }
        });
        self.running.insert(handle.id(), (attempt_id, abort));
    }

    /// Stops an attempt (through its executor: SIGTERM to the build first).
    pub fn abort(&self, attempt_id: &str) {
        for (attempt, token) in self.running.values() {
            if attempt == attempt_id {
                token.cancel();
            }
        }
    }

    /// The result of the next job to end; a panicked job's is an infrastructure failure.
    pub async fn next(&mut self) -> Option<StepResult> {
        let (id, result) = match self.set.join_next_with_id().await? {
            Ok((id, result)) => (id, Some(result)),
            Err(error) => (error.id(), None),
        };
        let (attempt_id, _) = self.running.remove(&id)?;
        Some(result.unwrap_or_else(|| {
            tracing::error!(attempt = %attempt_id, "a step's job panicked");
            infrastructure_failure(&attempt_id, "the builder's job for this step panicked")
        }))
    }

    /// The attempts running.
    pub fn attempts(&self) -> impl Iterator<Item = &String> {
        self.running.values().map(|(attempt, _)| attempt)
    }

    /// How many run.
    #[must_use]
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether none runs.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Stops every job through its abort (never by dropping it: a killed `nix-store` would leave
    /// the derivation's own builder running) and waits up to `grace` for them to end.
    pub async fn stop(mut self, grace: Duration) {
        for (_, abort) in self.running.values() {
            abort.cancel();
        }
        let _ = tokio::time::timeout(grace, async {
            while self.set.join_next().await.is_some() {}
        })
        .await;
    }
}

fn infrastructure_failure(attempt_id: &str, message: &str) -> StepResult {
    StepResult {
        attempt_id: attempt_id.to_owned(),
        outcome: drover_proto::v1::StepOutcome::from(
            crate::executor::Outcome::InfrastructureFailure,
        )
        .into(),
        message: message.to_owned(),
        ..StepResult::default()
    }
}

/// Runs a step while streaming its log to the runner, then uploads its outputs and makes its
/// result.
async fn run_step(
    link: &mut Link,
    executor: &Executor,
    job: &Job,
    abort: &CancellationToken,
) -> Result<StepResult, UploadError> {
    let (sender, receiver) = mpsc::channel(LOG_QUEUE);
    // The log ends when the executor's last sink is dropped: for Nix, when its serve process
    // ends, which is after the outputs were read from it and uploaded.
    let started = std::time::Instant::now();
    let mut phases = Phases::default();
    let log_link = link.clone();
    // The step's trace continues the dispatch's, with a span per phase.
    let step = tracing::info_span!("step", attempt = %job.attempt_id, drv = %job.drv_path);
    traces::set_parent(&step, &job.traceparent);
    let building = async {
        let mut report = executor
            .run(job, abort, LogSink::new(sender))
            .instrument(tracing::info_span!(parent: &step, "build"))
            .await;
        phases.extend(std::mem::take(&mut report.phases));
        let uploading = std::time::Instant::now();
        let result = upload::outputs(link, job, report)
            .instrument(tracing::info_span!(parent: &step, "upload"))
            .await;
        phases.end("upload", uploading);
        result
    };
    let both = async {
        tokio::join!(
            building,
            log_upload::upload(log_link, &job.attempt_id, receiver)
        )
    };
    let (result, uploaded) = both.instrument(step.clone()).await;
    phases.end("step", started);
    tracing::debug!(attempt = %job.attempt_id, %phases, "step timings");
    let mut result = result?;
    result.traceparent = traces::traceparent(&step);
    if let Some(log) = uploaded? {
        result.log = log;
        result.log_inline = true;
    }
    Ok(result)
}
