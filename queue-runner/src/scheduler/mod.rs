//! The scheduler: one task that owns the step graph and the connected builders, applies every
//! event (builds queued, builders joining and leaving, results) to both, mirrors each change into
//! PostgreSQL, and dispatches runnable steps to the best free builder.
//!
//! Being the only writer of the graph, it needs no locks; builder sessions talk to it through a
//! channel, and it talks to them through bounded outboxes written with `try_send`, so one slow
//! builder never stalls it. A database error ends it, which ends the runner: the queue cannot be
//! kept without its source of truth.

pub mod attempts;
pub mod graph;
pub mod ingest;
pub mod machines;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use drover_proto::v1::{Build, BuildLimits, RunnerMessage, runner_message};
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use nix_primitives::StorePath;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use attempts::{AttemptOwner, Attempts, UploadPolicy};
use graph::{Effects, StepGraph, StepId};
use machines::{Capabilities, Machine, Machines, OutboxItem};

use crate::cache::{BinaryCache, CacheError};
use crate::db::queries::{
    self, BuildSelection, FailureRecord, MachineRow, OutputRow, RequeueCause,
};
use crate::db::{DbError, Pool};

/// Why the scheduler stopped. Both are fatal: the queue cannot be kept without its database or
/// its cache.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The database failed.
    #[error("the database failed")]
    Database(#[from] DbError),
    /// The binary cache failed.
    #[error("the binary cache failed")]
    Cache(#[from] CacheError),
}

impl Classify for SchedulerError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

/// How a builder said an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Built.
    Succeeded,
    /// The build failed: permanent.
    Failed,
    /// The build hit its time or silence limit: permanent.
    TimedOut,
    /// Something else failed: retried.
    InfrastructureFailure,
}

/// Something the scheduler must react to.
#[derive(Debug)]
pub enum Event {
    /// A builder passed Join.
    BuilderJoined {
        /// Its name, from its certificate.
        name: String,
        /// Its connection.
        session: u64,
        /// What it offers.
        capabilities: Capabilities,
        /// Its Nix version.
        nix_version: String,
        /// Messages to it.
        outbox: mpsc::Sender<OutboxItem>,
    },
    /// A builder's tunnel ended.
    BuilderLeft {
        /// Its name.
        name: String,
        /// The connection that ended.
        session: u64,
        /// Why, for the log.
        reason: String,
    },
    /// A builder reported the end of an attempt it owns.
    StepFinished {
        /// The builder.
        builder: String,
        /// The attempt.
        attempt: Uuid,
        /// How it ended.
        outcome: Outcome,
        /// Its reason for anything but success.
        message: String,
        /// Outputs of a success.
        outputs: Vec<OutputRow>,
    },
}

/// Limits the scheduler applies.
#[derive(Debug, Clone)]
pub struct SchedulerLimits {
    /// Builder losses (and, separately, infrastructure failures) a step survives.
    pub max_builder_losses: u32,
    /// Limits sent with every step.
    pub build_limits: BuildLimits,
}

/// The scheduler task's state.
pub struct Scheduler {
    pool: Pool,
    cache: Arc<BinaryCache>,
    graph: StepGraph,
    machines: Machines,
    attempts: Attempts,
    /// Running attempts: their step and builder.
    running: HashMap<Uuid, AttemptOwner>,
    limits: SchedulerLimits,
}

impl Scheduler {
    /// A scheduler with an empty graph; [`Scheduler::run`] rebuilds it from the database.
    #[must_use]
    pub fn new(
        pool: Pool,
        attempts: Attempts,
        cache: Arc<BinaryCache>,
        limits: SchedulerLimits,
    ) -> Self {
        Self {
            pool,
            cache,
            graph: StepGraph::new(),
            machines: Machines::default(),
            attempts,
            running: HashMap::new(),
            limits,
        }
    }

    /// Runs until `shutdown` or a database error.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        builds_queued: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), WithContext<SchedulerError>> {
        self.recover()
            .await
            .context("recovering the queue at start")?;
        loop {
            tokio::select! {
                // Shutdown first: sessions end at the same moment, and their departures must not
                // count as builder losses. Attempts still running are aborted by the next start.
                biased;
                () = shutdown.cancelled() => return Ok(()),
                () = builds_queued.notified() => {
                    ingest::drain(&self.pool, &mut self.graph, &self.cache, BuildSelection::NotIngested)
                        .await
                        .context("ingesting queued builds")?;
                }
                event = events.recv() => match event {
                    Some(event) => self.handle(event).await?,
                    None => return Ok(()),
                },
            }
            self.dispatch().await.context("dispatching steps")?;
        }
    }

    /// Aborts attempts a previous process left running and rebuilds the graph from every
    /// unfinished build.
    async fn recover(&mut self) -> Result<(), WithContext<SchedulerError>> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|error| SchedulerError::from(DbError::Connection(error)))?;
        let aborted = queries::abort_orphaned_attempts(&client)
            .await
            .map_err(SchedulerError::from)?;
        drop(client);
        let builds = ingest::drain(
            &self.pool,
            &mut self.graph,
            &self.cache,
            BuildSelection::Unfinished,
        )
        .await?;
        tracing::info!(aborted, builds, steps = self.graph.len(), "queue recovered");
        Ok(())
    }

    async fn handle(&mut self, event: Event) -> Result<(), WithContext<SchedulerError>> {
        match event {
            Event::BuilderJoined {
                name,
                session,
                capabilities,
                nix_version,
                outbox,
            } => self
                .on_builder_joined(name, session, capabilities, &nix_version, outbox)
                .await
                .context("registering a builder"),
            Event::BuilderLeft {
                name,
                session,
                reason,
            } => self
                .on_builder_left(&name, session, &reason)
                .await
                .with_context(|| format!("removing builder {name}")),
            Event::StepFinished {
                builder,
                attempt,
                outcome,
                message,
                outputs,
            } => self
                .on_step_finished(&builder, attempt, outcome, &message, outputs)
                .await
                .with_context(|| format!("recording attempt {attempt} of builder {builder}")),
        }
    }

    async fn on_builder_joined(
        &mut self,
        name: String,
        session: u64,
        capabilities: Capabilities,
        nix_version: &str,
        outbox: mpsc::Sender<OutboxItem>,
    ) -> Result<(), SchedulerError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let row = MachineRow {
            name: &name,
            systems: capabilities.systems.iter().cloned().collect(),
            supported_features: capabilities.supported_features.iter().cloned().collect(),
            mandatory_features: capabilities.mandatory_features.iter().cloned().collect(),
            max_jobs: i32::try_from(capabilities.max_jobs).unwrap_or(i32::MAX),
            speed_factor: capabilities.speed_factor,
            nix_version,
        };
        queries::machine_joined(&client, &row).await?;
        drop(client);
        tracing::info!(builder = %name, session, "builder joined");
        let machine = Machine {
            session,
            capabilities,
            running: std::collections::HashSet::new(),
            outbox,
        };
        if let Some(previous) = self.machines.join(name, machine) {
            let _ = previous.outbox.try_send(Err(tonic::Status::aborted(
                "replaced by a newer session of the same builder",
            )));
            for attempt in previous.running {
                self.lose_attempt(attempt, "the builder reconnected")
                    .await?;
            }
        }
        Ok(())
    }

    async fn on_builder_left(
        &mut self,
        name: &str,
        session: u64,
        reason: &str,
    ) -> Result<(), SchedulerError> {
        let Some(machine) = self.machines.leave(name, session) else {
            return Ok(());
        };
        tracing::info!(builder = %name, session, reason, running = machine.running.len(), "builder left");
        for attempt in machine.running {
            self.lose_attempt(attempt, reason).await?;
        }
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        Ok(queries::machine_left(&client, name).await?)
    }

    async fn on_step_finished(
        &mut self,
        builder: &str,
        attempt: Uuid,
        outcome: Outcome,
        message: &str,
        outputs: Vec<OutputRow>,
    ) -> Result<(), SchedulerError> {
        let Some(owner) = self.running.get(&attempt).cloned() else {
            tracing::debug!(%attempt, "result for an attempt that is no longer running");
            return Ok(());
        };
        if owner.builder != builder {
            tracing::warn!(%attempt, builder, owner = %owner.builder, "result from a builder that does not own the attempt");
            return Ok(());
        }
        self.forget_attempt(attempt, &owner);
        let step = owner.step;
        match outcome {
            Outcome::Succeeded => match self.check_outputs(step, &outputs) {
                Ok(()) => self.succeed(attempt, step, &outputs).await,
                Err(problem) => {
                    self.requeue(attempt, step, RequeueCause::InfrastructureFailure, &problem)
                        .await
                }
            },
            Outcome::Failed | Outcome::TimedOut => {
                let status = if outcome == Outcome::Failed {
                    "failed"
                } else {
                    "timed_out"
                };
                self.fail(Some(attempt), (status, "failed"), step, message)
                    .await
            }
            Outcome::InfrastructureFailure => {
                self.requeue(attempt, step, RequeueCause::InfrastructureFailure, message)
                    .await
            }
        }
    }

    /// A success must report exactly the step's outputs at their paths.
    fn check_outputs(&self, step: StepId, outputs: &[OutputRow]) -> Result<(), String> {
        let Some(node) = self.graph.step(step) else {
            return Ok(());
        };
        let reported: BTreeMap<&str, &str> = outputs
            .iter()
            .map(|output| (output.name.as_str(), output.path.as_str()))
            .collect();
        let expected: BTreeMap<&str, String> = node
            .step
            .outputs
            .iter()
            .map(|(name, path)| (name.as_str(), path.to_absolute()))
            .collect();
        let matches = reported.len() == expected.len()
            && expected
                .iter()
                .all(|(name, path)| reported.get(name) == Some(&path.as_str()));
        if !matches {
            return Err(format!(
                "the builder reported outputs {reported:?}, expected {expected:?}"
            ));
        }
        // A step succeeds only once its outputs are verified in the farm's own cache.
        if let Some(missing) = node
            .step
            .outputs
            .values()
            .find(|path| !self.cache.is_published(path))
        {
            return Err(format!("output {missing} was not uploaded"));
        }
        for output in outputs {
            let published = StorePath::from_absolute(&output.path)
                .ok()
                .and_then(|path| self.cache.narinfo(&path).ok().flatten());
            if published.is_none_or(|info| info.nar_hash.to_typed_base32() != output.nar_hash) {
                return Err(format!(
                    "the builder reported NAR hash {} for {}, which is not what it uploaded",
                    output.nar_hash, output.path
                ));
            }
        }
        Ok(())
    }

    fn forget_attempt(&mut self, attempt: Uuid, owner: &AttemptOwner) {
        self.running.remove(&attempt);
        self.attempts.remove(&attempt);
        if let Some(machine) = self.machines.get_mut(&owner.builder) {
            machine.running.remove(&attempt);
        }
    }

    async fn succeed(
        &mut self,
        attempt: Uuid,
        step: StepId,
        outputs: &[OutputRow],
    ) -> Result<(), SchedulerError> {
        let effects = self.graph.succeed(step);
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        queries::record_success(
            &client,
            attempt,
            step,
            outputs,
            &effects.runnable,
            &effects.succeeded_builds,
        )
        .await?;
        if !effects.succeeded_builds.is_empty() {
            tracing::info!(builds = ?effects.succeeded_builds, "builds succeeded");
        }
        Ok(())
    }

    /// Fails a step and everything that needs it; `statuses` are the attempt's and the step's.
    async fn fail(
        &mut self,
        attempt: Option<Uuid>,
        (attempt_status, step_status): (&str, &str),
        step: StepId,
        reason: &str,
    ) -> Result<(), SchedulerError> {
        let Effects {
            dep_failed_steps,
            failed_builds,
            dep_failed_builds,
            ..
        } = self.graph.fail(step);
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        queries::record_failure(
            &client,
            &FailureRecord {
                attempt,
                attempt_status,
                step,
                step_status,
                reason,
                dep_failed_steps: &dep_failed_steps,
                failed_builds: &failed_builds,
                dep_failed_builds: &dep_failed_builds,
            },
        )
        .await?;
        tracing::info!(
            step,
            reason,
            ?failed_builds,
            ?dep_failed_builds,
            "step failed"
        );
        Ok(())
    }

    /// Ends an attempt that was not the build's fault and makes its step runnable again, unless
    /// that has happened too often: then the step fails.
    async fn requeue(
        &mut self,
        attempt: Uuid,
        step: StepId,
        cause: RequeueCause,
        message: &str,
    ) -> Result<(), SchedulerError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let count = queries::record_requeue(&client, attempt, step, cause, message).await?;
        drop(client);
        if u32::try_from(count).unwrap_or(u32::MAX) > self.limits.max_builder_losses {
            let (status, what) = match cause {
                RequeueCause::BuilderLost => ("builder_lost", "builder losses"),
                RequeueCause::InfrastructureFailure => {
                    ("infrastructure_failure", "infrastructure failures")
                }
            };
            let reason = format!("{count} {what}; the last: {message}");
            return self.fail(None, (status, "cancelled"), step, &reason).await;
        }
        self.graph.requeue(step);
        Ok(())
    }

    async fn lose_attempt(&mut self, attempt: Uuid, reason: &str) -> Result<(), SchedulerError> {
        let Some(owner) = self.running.get(&attempt).cloned() else {
            return Ok(());
        };
        self.forget_attempt(attempt, &owner);
        self.requeue(attempt, owner.step, RequeueCause::BuilderLost, reason)
            .await
    }

    /// Gives runnable steps, best first, to the best free builder for each.
    async fn dispatch(&mut self) -> Result<(), SchedulerError> {
        while self.machines.any_free() {
            let choice = self.graph.runnable().find_map(|node| {
                self.machines
                    .best_for(&node.step.requirements)
                    .map(|name| (node.step.id, name.to_owned()))
            });
            let Some((step, builder)) = choice else {
                return Ok(());
            };
            self.start(step, builder).await?;
        }
        Ok(())
    }

    async fn start(&mut self, step: StepId, builder: String) -> Result<(), SchedulerError> {
        let Some(node) = self.graph.step(step) else {
            return Ok(());
        };
        let attempt = Uuid::new_v4();
        let policy = Arc::new(UploadPolicy {
            deriver: node.step.drv_path.clone(),
            outputs: node.step.outputs.clone(),
            input_paths: node.step.input_paths.clone(),
            fixed: node.step.fixed,
        });
        let message = RunnerMessage {
            message: Some(runner_message::Message::Build(Build {
                attempt_id: attempt.to_string(),
                step_id: step,
                drv_path: node.step.drv_path.to_absolute(),
                drv_text: node.step.drv_text.clone(),
                outputs: node
                    .step
                    .outputs
                    .iter()
                    .map(|(name, path)| (name.clone(), path.to_absolute()))
                    .collect(),
                limits: Some(self.limits.build_limits),
                input_paths: node
                    .step
                    .input_paths
                    .iter()
                    .map(StorePath::to_absolute)
                    .collect(),
            })),
        };
        self.graph.start(step);
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        queries::record_dispatch(&client, attempt, step, &builder).await?;
        drop(client);
        let owner = AttemptOwner {
            builder: builder.clone(),
            step,
            policy: policy.clone(),
        };
        self.attempts.insert(attempt, owner.clone());
        self.running.insert(attempt, owner);
        let Some(machine) = self.machines.get_mut(&builder) else {
            return self.lose_attempt(attempt, "the builder left").await;
        };
        machine.running.insert(attempt);
        if machine.outbox.try_send(Ok(message)).is_err() {
            // A closed outbox means the session is ending; a full one means the builder stopped
            // reading. Either way it cannot take work: drop it and requeue what it had.
            let session = machine.session;
            return self
                .on_builder_left(&builder, session, "its outbox is full or closed")
                .await;
        }
        tracing::debug!(step, %attempt, %builder, "dispatched");
        Ok(())
    }
}
