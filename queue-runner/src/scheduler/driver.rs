//! The driver: the scheduler's only task. It takes a batch of events (whatever has queued up
//! while the previous batch was written: group commit), lets the [`Core`] decide, writes the
//! batch's changes in one transaction, and only then talks to builders, so a restarted runner
//! knows every attempt a builder may report and a builder's result is acknowledged only once it
//! is durable.
//!
//! Outboxes are bounded and written with `try_send`: a builder that stops reading its tunnel
//! has its session ended (it reconnects) and its steps requeued, and never delays the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover_daemon::notify::Notifier;
use drover_proto::v1::{
    Abort, Build, BuildLimits, Joined, ResultRecorded, RunnerMessage, runner_message::Message,
};
use drover_scheduler::{
    Assignment, AttemptId, BuildId, Capabilities, Change, Command, Core, CoreLimits, Departure,
    Event, Outcome, Report, SessionId, ToBuilder,
};
use error_context::{Classify, Severity, WithContext};
use nix_primitives::StorePath;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::attempts::{AttemptOwner, Attempts};
use super::estimates::Estimates;
use super::queue_clock::QueueClock;
use crate::db::queries::DispatchText;
use crate::db::transitions::Transitions;
use crate::db::{DbError, Pool, machines, queries};
use crate::metrics::{SchedulerMetrics, Scrape};
use drover_daemon::traces;

/// What the driver sends a builder session: a message, or the status that ends the session.
pub type OutboxItem = Result<RunnerMessage, tonic::Status>;

/// How often the scheduler refreshes its systemd status line (and feeds the watchdog, at least
/// this often).
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Events handled in one batch at most; more wait for the next batch.
const MAX_BATCH: usize = 1024;

/// Times a batch is written again after a transient database error (a serialization failure, a
/// deadlock) before the failure counts as fatal.
const WRITE_RETRIES: u32 = 3;

/// How the driver reaches one builder session.
#[derive(Debug, Clone)]
pub struct SessionLink {
    /// Messages to the builder.
    pub outbox: mpsc::Sender<OutboxItem>,
    /// Cancelled to end the session.
    pub end: CancellationToken,
    /// The answer to its Join, sent once the core has taken the attempts it holds.
    pub joined: Joined,
}

/// Something committed that Watch streams follow.
#[derive(Debug, Clone, PartialEq)]
pub enum Committed {
    /// A step's status, a dispatch, or a build's start or end, from the scheduler.
    Change(Change),
    /// Ingest expanded a build (linked its steps) or ended it at once: its state is worth
    /// reading again.
    Expanded(BuildId),
}

impl Committed {
    /// `change` as Watch streams see it, if they follow its kind.
    fn watched(change: &Change) -> Option<Self> {
        matches!(
            change,
            Change::StepStatus { .. }
                | Change::AttemptStarted { .. }
                | Change::BuildStarted { .. }
                | Change::BuildFinished { .. }
        )
        .then(|| Self::Change(change.clone()))
    }
}

/// One commit's changes that Watch streams follow.
#[derive(Debug, Default)]
pub struct CommittedBatch {
    /// The transaction the scheduler committed them in (none for ingest's, which Watch streams
    /// answer by reading the state again anyway).
    pub transaction: Option<u64>,
    /// The changes, in the order made.
    pub changes: Vec<Committed>,
}

/// What was committed, in commit order, one batch per commit, for Watch streams.
pub type CommittedChanges = broadcast::Sender<Arc<CommittedBatch>>;

/// What the driver publishes for the other tasks.
#[derive(Debug, Clone)]
pub struct Published {
    /// How many step completions are durable (ingest reads it, see
    /// [`drover_scheduler::BuildPlan::snapshot`]).
    pub completions: Arc<AtomicU64>,
    /// Set once the queue is recovered.
    pub recovered: QueueRecovered,
    /// Every batch's changes that clients watch, once committed.
    pub changes: CommittedChanges,
    /// systemd, told when the queue is recovered, and pinged from the scheduler's own loop.
    pub systemd: Arc<Notifier>,
    /// The scheduler's metrics.
    pub metrics: SchedulerMetrics,
}

impl Published {
    /// Nothing committed or recovered yet; the last `watch_queue` batches of changes are kept
    /// for slow Watch streams.
    #[must_use]
    pub fn new(watch_queue: usize, systemd: Arc<Notifier>, metrics: SchedulerMetrics) -> Self {
        Self {
            completions: Arc::new(AtomicU64::new(0)),
            recovered: QueueRecovered::default(),
            changes: broadcast::channel(watch_queue).0,
            systemd,
            metrics,
        }
    }
}

/// Whether the scheduler has recovered the queue: attempts a previous runner left running are
/// known and every unfinished build is planned. Until then builders cannot join, since what they
/// hold could not be matched to a step.
#[derive(Debug, Clone, Default)]
pub struct QueueRecovered(Arc<AtomicBool>);

impl QueueRecovered {
    /// Whether it has.
    #[must_use]
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What builder sessions tell the driver.
#[derive(Debug)]
pub enum SessionEvent {
    /// A builder passed Join: its session and how to reach it.
    Joined {
        /// Its name, from its certificate.
        name: String,
        /// The connection.
        session: SessionId,
        /// What it offers.
        capabilities: Capabilities,
        /// Its Nix version.
        nix_version: String,
        /// Its outbox and the token that ends it.
        link: SessionLink,
        /// The attempts it says it runs or holds a result of.
        held: Vec<AttemptId>,
    },
    /// The configuration was reloaded: limits for the core and for the steps it sends.
    Reconfigure {
        /// The core's new limits.
        limits: CoreLimits,
        /// The new limits of each step.
        build_limits: BuildLimits,
    },
    /// A reader asks when a build is predicted to end, from now.
    Estimate {
        /// The build.
        build: BuildId,
        /// Where the answer goes; `None` if the core cannot tell.
        reply: oneshot::Sender<Option<Duration>>,
    },
    /// A metrics scrape: the core's counts, between two events (the batch they belong to may
    /// not be written yet).
    Scrape {
        /// Where the answer goes.
        reply: oneshot::Sender<Scrape>,
    },
    /// An admin's decision (drain, quarantine, priority): `done` is answered once what it
    /// changed is committed, so the admin's answer means it survives a restart.
    Steer {
        /// The decision.
        event: Event,
        /// Answered after the commit.
        done: oneshot::Sender<()>,
    },
    /// Anything else, for the core as it is.
    Core(Event),
}

/// Why the scheduler stopped. Fatal: the queue cannot be kept without its database.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// What a previous runner process left (running attempts, known builders) could not be
    /// read.
    #[error("recovering the scheduler's state from the database")]
    Recover(#[source] DbError),
    /// A batch of changes could not be written.
    #[error("writing a batch of {changes} scheduler changes (tried {tries} times)")]
    Write {
        /// Changes in the batch.
        changes: usize,
        /// Times it was tried.
        tries: u32,
        /// The last failure.
        #[source]
        source: DbError,
    },
    /// The texts of the derivations to dispatch could not be read.
    #[error("reading the derivations of {steps} steps to dispatch (tried {tries} times)")]
    ReadTexts {
        /// Steps being dispatched.
        steps: usize,
        /// Times it was tried.
        tries: u32,
        /// The last failure.
        #[source]
        source: DbError,
    },
}

impl Classify for SchedulerError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

/// The scheduler task's state.
pub struct Driver {
    core: Core,
    pool: Pool,
    sessions: HashMap<SessionId, SessionLink>,
    attempts: Attempts,
    build_limits: BuildLimits,
    published: Published,
    estimates: Estimates,
    queue_clock: QueueClock,
    /// Admins waiting for the batch that carries their decision to commit.
    steered: Vec<oneshot::Sender<()>>,
}

impl Driver {
    /// A driver around `core`, mirroring running attempts into `attempts` and publishing its
    /// progress through `published`.
    #[must_use]
    pub fn new(
        core: Core,
        pool: Pool,
        attempts: Attempts,
        build_limits: BuildLimits,
        published: Published,
    ) -> Self {
        Self {
            core,
            pool,
            sessions: HashMap::new(),
            attempts,
            build_limits,
            published,
            estimates: Estimates::default(),
            queue_clock: QueueClock::default(),
            steered: Vec::new(),
        }
    }

    /// Runs until `shutdown` or a fatal database error. Builder sessions feed `sessions`;
    /// ingest feeds `plans`.
    pub async fn run(
        mut self,
        mut sessions: mpsc::Receiver<SessionEvent>,
        mut plans: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), WithContext<SchedulerError>> {
        let orphans = self.recover().await?;
        tracing::info!(orphans, "scheduler started");
        let mut batch = Vec::new();
        // The watchdog is fed from this loop, so a scheduler stuck anywhere (a write that never
        // returns, a busy loop) stops feeding it and systemd restarts the runner.
        let mut alive = tokio::time::interval(
            self.published
                .systemd
                .watchdog_interval()
                .unwrap_or(STATUS_INTERVAL)
                .min(STATUS_INTERVAL),
        );
        loop {
            let wakeup = self.core.next_wakeup();
            tokio::select! {
                // Shutdown first: sessions end at the same moment, and their departures must not
                // count as builder losses. Attempts still running wait for the next start, where
                // their builders claim them.
                biased;
                () = shutdown.cancelled() => return Ok(()),
                Some(event) = sessions.recv() => batch.push(event),
                Some(event) = plans.recv() => batch.push(SessionEvent::Core(event)),
                // A step held back by a retry's backoff is due: dispatch with no event.
                () = sleep_until_due(wakeup), if wakeup.is_some() => {}
                _ = alive.tick() => {
                    self.published.systemd.watchdog();
                    self.published.systemd.status(&self.status_line());
                    continue;
                }
                else => return Ok(()),
            }
            while batch.len() < MAX_BATCH {
                match sessions.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => match plans.try_recv() {
                        Ok(event) => batch.push(SessionEvent::Core(event)),
                        Err(_) => break,
                    },
                }
            }
            let mut commands = Vec::new();
            for event in batch.drain(..) {
                commands.extend(self.accept(event));
            }
            self.carry_out(commands).await?;
            for done in self.steered.drain(..) {
                // The admin may have given up waiting; the change stands either way.
                let _ = done.send(());
            }
        }
    }

    /// Takes over from the previous runner process: the core learns the attempts it left
    /// running (their count is returned), which wait for their builders, the durations learned
    /// so far, and what builders ever offered.
    async fn recover(&mut self) -> Result<usize, SchedulerError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|error| SchedulerError::Recover(DbError::Connection(error)))?;
        let orphans = queries::orphaned_attempts(&client)
            .await
            .map_err(SchedulerError::Recover)?;
        let count = orphans.len();
        self.core.recover_attempts(orphans, Instant::now());
        self.core.recover_machines(
            machines::stored_standings(&client)
                .await
                .map_err(SchedulerError::Recover)?,
            Instant::now(),
        );
        self.core.load_durations(
            queries::learned_durations(&client)
                .await
                .map_err(SchedulerError::Recover)?,
        );
        for capabilities in queries::known_machines(&client)
            .await
            .map_err(SchedulerError::Recover)?
        {
            self.core.remember_builder(capabilities);
        }
        Ok(count)
    }

    fn accept(&mut self, event: SessionEvent) -> Vec<Command> {
        match event {
            SessionEvent::Joined {
                name,
                session,
                capabilities,
                nix_version,
                link,
                held,
            } => {
                tracing::info!(builder = %name, session, held = held.len(), "builder joined");
                self.sessions.insert(session, link);
                self.core.handle(Event::BuilderJoined {
                    name,
                    session,
                    capabilities,
                    nix_version,
                    held,
                })
            }
            SessionEvent::Core(event @ Event::IngestCaughtUp { .. })
                if !self.published.recovered.get() =>
            {
                let mut commands = self.core.handle(event);
                commands.extend(self.core.recovered(Instant::now()));
                self.published.recovered.set();
                tracing::info!("queue recovered: builders may join");
                self.published.systemd.ready();
                self.published.systemd.status(&self.status_line());
                commands
            }
            SessionEvent::Estimate { build, reply } => {
                let now = Instant::now();
                let core = &self.core;
                let remaining = self
                    .estimates
                    .remaining(build, now, || core.estimate(build, now));
                // The reader may have given up waiting.
                let _ = reply.send(remaining);
                Vec::new()
            }
            SessionEvent::Scrape { reply } => {
                if reply.is_closed() {
                    // The scrape gave up waiting: nothing to count for.
                    return Vec::new();
                }
                let scrape = Scrape {
                    gauges: self.core.gauges(),
                    oldest_runnable: self.queue_clock.oldest(&self.core, Instant::now()),
                    pool: self.pool.status(),
                };
                // The scrape may have given up waiting.
                let _ = reply.send(scrape);
                Vec::new()
            }
            SessionEvent::Reconfigure {
                limits,
                build_limits,
            } => {
                tracing::info!(?limits, ?build_limits, "limits reloaded");
                self.core.set_limits(limits);
                self.build_limits = build_limits;
                Vec::new()
            }
            SessionEvent::Steer { event, done } => {
                tracing::info!(?event, "admin decision");
                self.steered.push(done);
                self.core.handle(event)
            }
            SessionEvent::Core(event) => {
                match &event {
                    Event::BuildPlanned(plan) => {
                        let substituted = u64::try_from(plan.available.len()).unwrap_or(u64::MAX);
                        self.published.metrics.steps_substituted.inc_by(substituted);
                    }
                    Event::BuilderLeft {
                        session, reason, ..
                    } => {
                        tracing::info!(session, reason, "builder left");
                        self.sessions.remove(session);
                    }
                    Event::BuilderDraining { session } => {
                        tracing::info!(session, "builder draining: it takes no new work");
                    }
                    Event::StepFinished {
                        attempt, report, ..
                    } => {
                        if let Some(running) = self.core.attempt(attempt) {
                            let took = running.started.elapsed();
                            tracing::debug!(%attempt, step = running.step, outcome = ?report.outcome, ?took, "step finished");
                            // An attempt adopted after a restart started before this process.
                            if running.measured {
                                self.published
                                    .metrics
                                    .step_duration
                                    .observe(took.as_secs_f64());
                            }
                        }
                    }
                    _ => {}
                }
                self.core.handle(event)
            }
        }
    }

    /// Writes the changes, then sends; sessions that cannot take a message are ended, and what
    /// the core decides about that is carried out the same way, with dispatch after every round.
    async fn carry_out(
        &mut self,
        mut commands: Vec<Command>,
    ) -> Result<(), WithContext<SchedulerError>> {
        loop {
            commands.extend(self.core.dispatch(Instant::now()));
            if commands.is_empty() {
                return Ok(());
            }
            let mut transitions = Transitions::default();
            let mut changes = 0;
            let mut watched = Vec::new();
            let mut messages = Vec::new();
            let now = Instant::now();
            for command in commands.drain(..) {
                match command {
                    Command::Persist(change) => {
                        self.published.metrics.observe(&change);
                        self.queue_clock
                            .observe(&change, now, &self.published.metrics.queue_wait);
                        if let Change::AttemptEnded { attempt, .. } = &change {
                            self.attempts.remove(attempt);
                        }
                        watched.extend(Committed::watched(&change));
                        transitions.add(change);
                        changes += 1;
                    }
                    Command::Adopt {
                        session,
                        assignment,
                    } => self.adopt(session, assignment),
                    other => messages.push(other),
                }
            }
            let transaction = if transitions.is_empty() {
                None
            } else {
                let started = Instant::now();
                let transaction = self.write(&transitions, changes).await?;
                let metrics = &self.published.metrics;
                metrics
                    .commit_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics
                    .batch_changes
                    .observe(f64::from(u32::try_from(changes).unwrap_or(u32::MAX)));
                Some(transaction)
            };
            self.published
                .completions
                .store(self.core.completions(), Ordering::Release);
            if !watched.is_empty() {
                // Nobody watching is not an error.
                let _ = self.published.changes.send(Arc::new(CommittedBatch {
                    transaction,
                    changes: watched,
                }));
            }
            let mut texts = self.derivation_texts(&messages).await?;
            for message in messages {
                if let Some(ended) = self.deliver(message, &mut texts) {
                    commands.extend(self.core.handle(ended));
                }
            }
        }
    }

    /// Writes one batch, again after transient failures, up to [`WRITE_RETRIES`] times.
    async fn write(
        &self,
        transitions: &Transitions,
        changes: usize,
    ) -> Result<u64, SchedulerError> {
        retrying(
            &self.pool,
            "a batch of scheduler changes",
            |mut client| async move { transitions.write(&mut client).await },
        )
        .await
        .map_err(|(tries, source)| SchedulerError::Write {
            changes,
            tries,
            source,
        })
    }

    /// The texts of the derivations `messages` dispatch, read in one query: the core does not
    /// hold them, so a queue of large derivations costs the database, not the runner's memory.
    async fn derivation_texts(
        &self,
        messages: &[Command],
    ) -> Result<HashMap<String, DispatchText>, SchedulerError> {
        let paths: Vec<String> = messages
            .iter()
            .filter_map(|command| match command {
                Command::Send {
                    message: ToBuilder::Build(assignment),
                    ..
                } => Some(assignment.spec.drv_path.to_absolute()),
                _ => None,
            })
            .collect();
        if paths.is_empty() {
            return Ok(HashMap::new());
        }
        let paths = &paths;
        retrying(
            &self.pool,
            "the texts of dispatched derivations",
            |client| async move { queries::dispatch_texts(&client, paths).await },
        )
        .await
        .map(|texts| texts.into_iter().collect())
        .map_err(|(tries, source)| SchedulerError::ReadTexts {
            steps: paths.len(),
            tries,
            source,
        })
    }

    /// Delivers a message or ends a session; returns the departure to tell the core about when
    /// a session could not take its message.
    fn deliver(
        &mut self,
        command: Command,
        texts: &mut HashMap<String, DispatchText>,
    ) -> Option<Event> {
        match command {
            Command::Persist(_) | Command::Adopt { .. } => None,
            Command::EndSession { session, reason } => {
                if let Some(link) = self.sessions.remove(&session) {
                    let _ = link.outbox.try_send(Err(tonic::Status::aborted(reason)));
                    link.end.cancel();
                }
                None
            }
            Command::Send { session, message } => {
                let link = self.sessions.get(&session)?;
                let message = match self.runner_message(session, message, texts)? {
                    Ok(message) => message,
                    Err(unsendable) => return Some(unsendable),
                };
                if link.outbox.try_send(Ok(message)).is_ok() {
                    return None;
                }
                // A full outbox means the builder stopped reading; a closed one that its session
                // is ending. Either way it gets no more work: end it, requeue what it had.
                let reason = "its tunnel stopped taking messages".to_owned();
                tracing::warn!(session, reason, "ending a builder session");
                link.end.cancel();
                self.sessions.remove(&session);
                Some(Event::BuilderLeft {
                    session,
                    reason,
                    departure: Departure::Ended,
                })
            }
        }
    }

    /// The one-line summary systemd shows: builds, running steps, connected builders.
    fn status_line(&self) -> String {
        format!(
            "{} builds queued or running, {} steps running, {} builders connected",
            self.core.graph().build_count(),
            self.core.attempts().count(),
            self.core.placement().builders().count()
        )
    }

    /// Lets a session upload and report for an attempt it took over; registered before the
    /// builder hears it has joined, so nothing it sends is refused.
    fn adopt(&self, session: SessionId, assignment: Assignment) {
        let Some(builder) = self.core.placement().builder(session) else {
            return;
        };
        tracing::info!(attempt = %assignment.attempt, step = assignment.step, builder = %builder.name, "attempt re-adopted");
        self.attempts.insert(
            assignment.attempt,
            AttemptOwner {
                builder: builder.name.clone(),
                step: assignment.step,
                spec: assignment.spec,
            },
        );
    }

    /// The message to send, or, for a Build message larger than the builder can read, the
    /// step's failure instead: sending it would break the tunnel and every step on it.
    fn runner_message(
        &self,
        session: SessionId,
        message: ToBuilder,
        texts: &mut HashMap<String, DispatchText>,
    ) -> Option<Result<RunnerMessage, Event>> {
        let message = match message {
            ToBuilder::Joined => Message::Joined(self.sessions.get(&session)?.joined.clone()),
            ToBuilder::Build(assignment) => {
                let builder = self.core.placement().builder(session)?.name.clone();
                let attempt = assignment.attempt;
                let drv_path = assignment.spec.drv_path.to_absolute();
                let Some(drv_text) = texts.remove(&drv_path) else {
                    return Some(Err(Event::StepFinished {
                        session,
                        attempt,
                        report: Report {
                            outcome: Outcome::Failed,
                            message: format!(
                                "the text of {drv_path} is no longer in the derivations table"
                            ),
                            outputs: Vec::new(),
                        },
                        at: Instant::now(),
                    }));
                };
                let build = RunnerMessage {
                    message: Some(Message::Build(
                        self.build_message(builder, assignment, drv_text),
                    )),
                };
                let size = prost::Message::encoded_len(&build);
                if size <= drover_proto::MAX_TUNNEL_MESSAGE_BYTES {
                    return Some(Ok(build));
                }
                self.attempts.remove(&attempt);
                let message = format!(
                    "the step's Build message is {size} bytes, over the builder tunnel's limit of {}",
                    drover_proto::MAX_TUNNEL_MESSAGE_BYTES
                );
                return Some(Err(Event::StepFinished {
                    session,
                    attempt,
                    report: Report {
                        outcome: Outcome::Failed,
                        message,
                        outputs: Vec::new(),
                    },
                    at: Instant::now(),
                }));
            }
            ToBuilder::Abort { attempt, reason } => Message::Abort(Abort {
                attempt_id: attempt.to_string(),
                reason,
            }),
            ToBuilder::ResultRecorded { attempt } => Message::ResultRecorded(ResultRecorded {
                attempt_id: attempt.to_string(),
            }),
        };
        Some(Ok(RunnerMessage {
            message: Some(message),
        }))
    }

    /// The Build message for an assignment; registers the attempt for the builder's uploads
    /// first.
    fn build_message(&self, builder: String, assignment: Assignment, drv: DispatchText) -> Build {
        let Assignment {
            attempt,
            step,
            spec,
        } = assignment;
        // The dispatch continues the trace of the plan that created the step; the builder's
        // spans continue the dispatch's.
        let dispatch = tracing::info_span!("dispatch", step, %attempt, %builder);
        traces::set_parent(&dispatch, &drv.trace_parent);
        let _dispatching = dispatch.enter();
        tracing::debug!(step, %attempt, %builder, "dispatching");
        let build = Build {
            traceparent: traces::traceparent(&dispatch),
            attempt_id: attempt.to_string(),
            step_id: step,
            drv_path: spec.drv_path.to_absolute(),
            drv_text: drv.text,
            outputs: spec
                .outputs
                .iter()
                .map(|(name, path)| (name.clone(), path.to_absolute()))
                .collect(),
            limits: Some(self.build_limits),
            input_paths: spec
                .input_paths
                .iter()
                .map(StorePath::to_absolute)
                .collect(),
        };
        self.attempts.insert(
            attempt,
            AttemptOwner {
                builder,
                step,
                spec,
            },
        );
        build
    }
}

/// Runs `operation` on a pooled connection, again after transient failures, up to
/// [`WRITE_RETRIES`] times; the tries and the last failure if it never succeeded.
async fn retrying<T, Operation>(
    pool: &Pool,
    what: &str,
    mut operation: impl FnMut(deadpool_postgres::Client) -> Operation,
) -> Result<T, (u32, DbError)>
where
    Operation: Future<Output = Result<T, DbError>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        let result = match pool.get().await {
            Ok(client) => operation(client).await,
            Err(error) => Err(DbError::Connection(error)),
        };
        match result {
            Ok(value) => return Ok(value),
            Err(error) if error.severity() == Severity::Step && tries <= WRITE_RETRIES => {
                tracing::warn!(error = %error_context::report(&error), tries, "retrying {what}");
                tokio::time::sleep(Duration::from_millis(10 << tries)).await;
            }
            Err(source) => return Err((tries, source)),
        }
    }
}

/// Resolves at `due`; never, without one.
async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}
