//! One joined session with the runner, as a type with one run loop: it reads the runner's
//! messages, starts the steps it sends, pings, sends each finished step's result, and drains on
//! shutdown. Jobs upload their own logs and outputs over the [`Link`], so a long upload never
//! delays a ping; what the builder holds across sessions ([`Work`]) is borrowed, never owned,
//! so a lost session loses nothing.
//!
//! The inbound stream is any stream of runner messages, so the loop is tested here on channels
//! with paused time; in production it is the tunnel's gRPC stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use drover_daemon::notify::Notifier;
use drover_proto::v1::builder_message::Message as Outbound;
use drover_proto::v1::runner_message::Message as Inbound;
use drover_proto::v1::{Build, BuilderMessage, Draining, Ping, RunnerMessage, StepResult};
use futures_util::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::TunnelError;
use crate::executor::Executor;
use crate::health;
use crate::job::Job;
use crate::jobs::Jobs;
use crate::link::Link;
use crate::metrics::BuilderMetrics;

/// What the builder holds across sessions.
pub struct Work {
    /// The running steps.
    pub jobs: Jobs,
    /// Results sent (or to send) and not yet acknowledged, by attempt: sent again over every
    /// session until the runner has recorded them.
    pub results: BTreeMap<String, StepResult>,
    /// systemd: ready once joined, a status line, and the watchdog fed from the session loop.
    pub systemd: Notifier,
    /// Counts steps and sessions.
    pub metrics: Arc<BuilderMetrics>,
}

impl Work {
    /// Nothing running, nothing held.
    #[must_use]
    pub fn new(systemd: Notifier, metrics: Arc<BuilderMetrics>) -> Self {
        Self {
            jobs: Jobs::default(),
            results: BTreeMap::new(),
            systemd,
            metrics,
        }
    }

    /// The attempts this builder runs or holds a result of, for Join.
    pub fn held_attempts(&self) -> impl Iterator<Item = &String> {
        self.jobs.attempts().chain(self.results.keys())
    }

    /// Whether nothing runs and every result was recorded.
    fn is_idle(&self) -> bool {
        self.jobs.is_empty() && self.results.is_empty()
    }
}

/// The session's clocks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often to ping (the runner says, in Joined).
    pub ping_interval: Duration,
    /// How long a drain lets running steps finish.
    pub drain_deadline: Duration,
}

/// Whether the session goes on after a message or a tick.
enum Flow {
    Continue,
    End,
}

/// One joined session.
pub struct Session<'a, S> {
    inbound: S,
    outbox: mpsc::Sender<BuilderMessage>,
    link: &'a Link,
    executor: &'a Executor,
    work: &'a mut Work,
    timing: Timing,
    /// Set once draining: when the builder stops waiting for its running steps.
    drain_until: Option<Instant>,
}

impl<'a, S> Session<'a, S>
where
    S: Stream<Item = Result<RunnerMessage, tonic::Status>> + Unpin,
{
    /// A session over `inbound` and `outbox`, starting steps on `executor`.
    pub fn new(
        inbound: S,
        outbox: mpsc::Sender<BuilderMessage>,
        link: &'a Link,
        executor: &'a Executor,
        work: &'a mut Work,
        timing: Timing,
    ) -> Self {
        Self {
            inbound,
            outbox,
            link,
            executor,
            work,
            timing,
            drain_until: None,
        }
    }

    /// Runs the session: first sends again every result the runner has not recorded, then
    /// serves until the tunnel fails, or until `shutdown` and the drain that follows end it.
    ///
    /// A drain tells the runner (which sends no more work), starts nothing new, and returns once
    /// the running steps have finished and the runner recorded every result (closing the tunnel
    /// earlier may drop what is in flight), or at the drain deadline; the caller then stops what
    /// is left, which the runner hands back to its queue.
    pub async fn run(mut self, shutdown: &CancellationToken) -> Result<(), TunnelError> {
        let unrecorded: Vec<StepResult> = self.work.results.values().cloned().collect();
        for result in unrecorded {
            self.send(Outbound::StepResult(result)).await?;
        }
        let mut ping = tokio::time::interval(self.timing.ping_interval);
        loop {
            let flow = tokio::select! {
                () = shutdown.cancelled(), if self.drain_until.is_none() => self.on_shutdown().await?,
                () = sleep_until(self.drain_until), if self.drain_until.is_some() => {
                    tracing::warn!(running = self.work.jobs.len(), "the drain deadline passed: stopping the steps still running and handing them back");
                    Flow::End
                }
                _ = ping.tick() => self.on_ping_tick().await?,
                message = self.inbound.next() => match message.transpose().map_err(TunnelError::Status)? {
                    Some(message) => self.on_message(message),
                    None => return Err(TunnelError::Closed),
                },
                Some(result) = self.work.jobs.next() => self.on_step_finished(result).await?,
            };
            if let Flow::End = flow {
                return Ok(());
            }
        }
    }

    async fn on_shutdown(&mut self) -> Result<Flow, TunnelError> {
        if self.work.is_idle() {
            return Ok(Flow::End);
        }
        let running = self.work.jobs.len();
        tracing::info!(running, deadline = ?self.timing.drain_deadline, "draining: taking no new steps, letting the running ones finish");
        self.send(Outbound::Draining(Draining {})).await?;
        self.work
            .systemd
            .status(&format!("draining: {running} steps still running"));
        self.drain_until = Some(Instant::now() + self.timing.drain_deadline);
        Ok(Flow::Continue)
    }

    async fn on_ping_tick(&mut self) -> Result<Flow, TunnelError> {
        self.work.systemd.watchdog();
        let running = u32::try_from(self.work.jobs.len()).unwrap_or(u32::MAX);
        self.send(Outbound::Ping(Ping {
            running,
            free_disk_bytes: health::free_store_bytes().unwrap_or(0),
            memory_pressure_percent: health::memory_pressure_percent(),
            ..Ping::default()
        }))
        .await?;
        Ok(Flow::Continue)
    }

    fn on_message(&mut self, message: RunnerMessage) -> Flow {
        match message.message {
            Some(Inbound::Build(build)) => self.on_build(build),
            Some(Inbound::Abort(abort)) => self.work.jobs.abort(&abort.attempt_id),
            Some(Inbound::ResultRecorded(recorded)) => {
                self.work.results.remove(&recorded.attempt_id);
                if self.drain_until.is_some() && self.work.is_idle() {
                    tracing::info!("drained: every running step finished and was recorded");
                    return Flow::End;
                }
            }
            Some(Inbound::Ping(_) | Inbound::Joined(_)) | None => {}
        }
        Flow::Continue
    }

    fn on_build(&mut self, build: Build) {
        if self.drain_until.is_some() {
            // Sent before the runner heard of the drain: handed back when the builder leaves.
            tracing::info!(attempt = %build.attempt_id, "not starting a step while draining");
            return;
        }
        tracing::debug!(attempt = %build.attempt_id, "step received");
        self.work.metrics.step_started();
        self.work
            .jobs
            .start(Job::from(build), self.executor.clone(), self.link.clone());
    }

    async fn on_step_finished(&mut self, result: StepResult) -> Result<Flow, TunnelError> {
        let attempt = result.attempt_id.clone();
        self.work.metrics.step_finished(result.outcome());
        self.work.results.insert(attempt.clone(), result.clone());
        self.send(Outbound::StepResult(result)).await?;
        tracing::debug!(%attempt, "result sent");
        Ok(Flow::Continue)
    }

    async fn send(&self, message: Outbound) -> Result<(), TunnelError> {
        send(&self.outbox, message).await
    }
}

/// Queues `message` towards the runner; fails once the tunnel no longer reads.
pub async fn send(
    outbox: &mpsc::Sender<BuilderMessage>,
    message: Outbound,
) -> Result<(), TunnelError> {
    outbox
        .send(BuilderMessage {
            message: Some(message),
        })
        .await
        .map_err(|_| TunnelError::Closed)
}

/// Resolves at `until`; never, without one.
async fn sleep_until(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use drover_proto::v1::{ResultRecorded, StepOutcome};
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use crate::executor::noop::NoopExecutor;

    const PING: Duration = Duration::from_secs(10);
    const DRAIN: Duration = Duration::from_mins(5);

    /// A session's far end: what the runner would send, and what the builder sent it.
    struct Runner {
        to_builder: mpsc::Sender<Result<RunnerMessage, tonic::Status>>,
        from_builder: mpsc::Receiver<BuilderMessage>,
    }

    impl Runner {
        async fn say(&self, message: Inbound) {
            self.to_builder
                .send(Ok(RunnerMessage {
                    message: Some(message),
                }))
                .await
                .unwrap();
        }

        /// Reads (and drops) whatever the builder sends, keeping the tunnel open, until the
        /// session ends.
        async fn listen(mut self) {
            while self.from_builder.recv().await.is_some() {}
            std::future::pending::<()>().await;
        }

        /// The next message the builder sent, ignoring pings.
        async fn heard(&mut self) -> Outbound {
            loop {
                let message = self.from_builder.recv().await.unwrap().message.unwrap();
                if !matches!(message, Outbound::Ping(_)) {
                    return message;
                }
            }
        }
    }

    fn result(attempt: &str) -> StepResult {
        StepResult {
            attempt_id: attempt.to_owned(),
            outcome: StepOutcome::Succeeded.into(),
            ..StepResult::default()
        }
    }

    fn held(attempts: &[&str]) -> Work {
        let mut work = Work::new(Notifier::disabled(), BuilderMetrics::new(1));
        for attempt in attempts {
            work.results.insert((*attempt).to_owned(), result(attempt));
        }
        work
    }

    /// Runs a session over channels on `work` until it ends, driving the runner's side with
    /// `script` meanwhile; returns how the session ended and when.
    async fn session<F>(
        work: &mut Work,
        shutdown: &CancellationToken,
        script: impl FnOnce(Runner) -> F,
    ) -> (Result<(), TunnelError>, Duration)
    where
        F: Future<Output = ()>,
    {
        let (to_builder, inbound) = mpsc::channel(16);
        let (outbox, from_builder) = mpsc::channel(16);
        let (_publisher, link) = crate::link::new();
        let executor = Executor::Noop(NoopExecutor {
            build_time: Duration::ZERO,
        });
        let timing = Timing {
            ping_interval: PING,
            drain_deadline: DRAIN,
        };
        let started = Instant::now();
        let running = Session::new(
            ReceiverStream::new(inbound),
            outbox,
            &link,
            &executor,
            work,
            timing,
        )
        .run(shutdown);
        let runner = Runner {
            to_builder,
            from_builder,
        };
        tokio::pin!(running);
        let ended = tokio::select! {
            ended = &mut running => ended,
            () = script(runner) => running.await,
        };
        (ended, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn unrecorded_results_are_sent_again_first() {
        let mut work = held(&["a", "b"]);
        let shutdown = CancellationToken::new();
        let (ended, _) = session(&mut work, &shutdown, |mut runner| async move {
            let mut sent = Vec::new();
            for _ in 0..2 {
                match runner.heard().await {
                    Outbound::StepResult(result) => sent.push(result.attempt_id),
                    other => panic!("expected a result, the builder sent {other:?}"),
                }
            }
            assert_eq!(sent, ["a", "b"]);
            drop(runner);
        })
        .await;
        assert!(matches!(ended, Err(TunnelError::Closed)), "{ended:?}");
        assert_eq!(work.results.len(), 2, "results stay held until recorded");
    }

    #[tokio::test(start_paused = true)]
    async fn pings_go_out_at_the_interval_the_runner_set() {
        let mut work = held(&[]);
        let shutdown = CancellationToken::new();
        let (_, elapsed) = session(&mut work, &shutdown, |mut runner| async move {
            let mut at = Vec::new();
            while at.len() < 3 {
                let message = runner.from_builder.recv().await.unwrap().message.unwrap();
                assert!(matches!(message, Outbound::Ping(_)), "{message:?}");
                at.push(Instant::now());
            }
            assert_eq!(at[1] - at[0], PING);
            assert_eq!(at[2] - at[1], PING);
            drop(runner);
        })
        .await;
        assert_eq!(elapsed, 2 * PING);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_builder_stops_at_once() {
        let mut work = held(&[]);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        // The runner keeps the tunnel open: the session ends on its own.
        let (ended, elapsed) = session(&mut work, &shutdown, Runner::listen).await;
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(elapsed, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_once_the_runner_recorded_every_result() {
        let mut work = held(&["a"]);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let (ended, elapsed) = session(&mut work, &shutdown, |mut runner| async move {
            assert!(matches!(runner.heard().await, Outbound::StepResult(_)));
            stop.cancel();
            assert!(matches!(runner.heard().await, Outbound::Draining(_)));
            tokio::time::sleep(Duration::from_secs(30)).await;
            // A step sent before the runner heard of the drain is not started.
            runner
                .say(Inbound::Build(Build {
                    attempt_id: "late".to_owned(),
                    ..Build::default()
                }))
                .await;
            runner
                .say(Inbound::ResultRecorded(ResultRecorded {
                    attempt_id: "a".to_owned(),
                }))
                .await;
            runner.listen().await;
        })
        .await;
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(elapsed, Duration::from_secs(30));
        assert!(
            work.is_idle(),
            "the late step was started or the result kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_gives_up_at_its_deadline() {
        let mut work = held(&["a"]);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        // The runner never records the result.
        let (ended, elapsed) = session(&mut work, &shutdown, Runner::listen).await;
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(elapsed, DRAIN);
        assert_eq!(
            work.results.len(),
            1,
            "the unrecorded result is kept for the next session"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_runner_error_ends_the_session_with_its_status() {
        let mut work = held(&[]);
        let shutdown = CancellationToken::new();
        let (ended, _) = session(&mut work, &shutdown, |runner| async move {
            runner
                .to_builder
                .send(Err(tonic::Status::permission_denied("revoked")))
                .await
                .unwrap();
            runner.listen().await;
        })
        .await;
        match ended {
            Err(TunnelError::Status(status)) => {
                assert_eq!(status.code(), tonic::Code::PermissionDenied);
            }
            other => panic!("expected the runner's status, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_sent_is_started_and_a_drain_waits_for_its_result_to_be_recorded() {
        let mut work = held(&[]);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let (ended, elapsed) = session(&mut work, &shutdown, |mut runner| async move {
            runner
                .say(Inbound::Build(Build {
                    attempt_id: "a".to_owned(),
                    ..Build::default()
                }))
                .await;
            // Paused time moves on only once every task is idle: the Build has been read, and
            // the step has ended (its derivation is malformed). Its log goes inline, so its
            // result needs no upload and is sent over the tunnel at once.
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(matches!(runner.heard().await, Outbound::StepResult(_)));
            // The runner never records it: the drain waits for that until the deadline.
            stop.cancel();
            assert!(matches!(runner.heard().await, Outbound::Draining(_)));
            runner.listen().await;
        })
        .await;
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(elapsed, DRAIN + Duration::from_millis(1));
        assert_eq!(work.results.keys().collect::<Vec<_>>(), ["a"]);
    }
}
