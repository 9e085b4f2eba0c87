//! Watch: one build's whole state, then each change of it as the scheduler commits it, with a
//! heartbeat whenever nothing happened for a while.
//!
//! There is no durable event log. A stream subscribes to the committed changes *before* it
//! reads the build's state, so nothing committed after that read is missed; the state is read in
//! one snapshot, and a batch committed in a transaction that snapshot shows is skipped, so no
//! change is sent twice and no step is seen going back. A stream that falls too far behind the
//! broadcast reads the whole state again and sends it, as a reconnecting client gets it; so does
//! one whose build is planned (the state now has the steps). After a step of the build ends, the
//! stream asks for the build's predicted end again (at most every [`ESTIMATE_EVERY`]) and sends
//! it when it moved by a second or more.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::watch_event::Event as Kind;
use drover_proto::v1::{
    BuildStatus, BuildUpdate, Estimate, GetResponse, Heartbeat, StepState, WatchEvent,
};
use drover_scheduler::{BuildId, Change};
use tokio::sync::broadcast::{self, error::RecvError};
use tonic::Status;

use crate::builds::read::build_state;
use crate::builds::{Builds, view};
use crate::db::snapshot::Snapshot;
use crate::db::status::StepStatus;
use crate::scheduler::driver::{Committed, CommittedBatch};

/// The stream Watch answers with.
pub type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchEvent, Status>> + Send>>;

/// Reads a build's whole state, as Get answers, and the snapshot it was read in.
pub type StateReader = Arc<
    dyn Fn(BuildId) -> Pin<Box<dyn Future<Output = Result<(GetResponse, Snapshot), Status>> + Send>>
        + Send
        + Sync,
>;

/// Asks when a build is predicted to end, in Unix milliseconds.
pub type EndEstimator =
    Arc<dyn Fn(BuildId) -> Pin<Box<dyn Future<Output = Option<i64>> + Send>> + Send + Sync>;

/// How often a stream asks for its build's predicted end, at most.
const ESTIMATE_EVERY: Duration = Duration::from_secs(2);

/// A change of the predicted end worth sending, in milliseconds.
const ESTIMATE_MOVED_MS: i64 = 1_000;

/// How a stream reads what it sends.
#[derive(Clone)]
pub struct Sources {
    /// The build's whole state.
    pub read_state: StateReader,
    /// Its predicted end.
    pub estimate: EndEstimator,
}

impl Sources {
    /// The sources of `builds`: its database and the scheduler's estimates.
    #[must_use]
    pub fn of(builds: &Builds) -> Self {
        let pool = builds.pool().clone();
        let estimator = builds.estimator();
        let filler = estimator.clone();
        let read_state: StateReader = Arc::new(move |build| {
            let (pool, estimator) = (pool.clone(), filler.clone());
            Box::pin(async move { Ok(build_state(&pool, &estimator, build).await?) })
        });
        let estimate: EndEstimator = Arc::new(move |build| {
            let estimator = estimator.clone();
            Box::pin(async move { estimator.end_ms(build).await })
        });
        Self {
            read_state,
            estimate,
        }
    }
}

/// Opens a Watch of `build`: fails at once if the build does not exist.
pub async fn open(
    build: BuildId,
    changes: &broadcast::Sender<Arc<CommittedBatch>>,
    Sources {
        read_state,
        estimate,
    }: Sources,
    heartbeat: Duration,
) -> Result<WatchStream, Status> {
    let receiver = changes.subscribe();
    let read = read_state(build).await?;
    let mut follow = Follow {
        build,
        receiver,
        read_state,
        estimate,
        estimated_end_ms: 0,
        estimate_due: false,
        estimated_at: None,
        heartbeat,
        pending: VecDeque::new(),
        snapshot: Snapshot::default(),
        steps: HashMap::new(),
        status: BuildStatus::Unknown,
        ended: false,
    };
    follow.reset(read);
    Ok(Box::pin(futures_util::stream::unfold(follow, Follow::next)))
}

/// One Watch stream's state.
struct Follow {
    build: BuildId,
    receiver: broadcast::Receiver<Arc<CommittedBatch>>,
    read_state: StateReader,
    estimate: EndEstimator,
    /// The predicted end the client knows.
    estimated_end_ms: i64,
    /// A step of the build ended since the predicted end was last asked for.
    estimate_due: bool,
    /// When it was last answered.
    estimated_at: Option<tokio::time::Instant>,
    heartbeat: Duration,
    /// Events to send before reading more changes.
    pending: VecDeque<WatchEvent>,
    /// The snapshot the state sent last was read in.
    snapshot: Snapshot,
    /// The last status sent of each step of the build.
    steps: HashMap<i64, StepState>,
    /// The last status sent of the build.
    status: BuildStatus,
    /// The build has ended: the stream ends once `pending` is sent.
    ended: bool,
}

fn event(kind: Kind) -> WatchEvent {
    WatchEvent { event: Some(kind) }
}

impl Follow {
    /// The next event, waiting for changes (or the heartbeat) as needed; `None` ends the stream.
    async fn next(mut self) -> Option<(Result<WatchEvent, Status>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.ended {
                return None;
            }
            let wait = match (self.estimate_due, self.estimated_at) {
                (true, Some(asked)) => (asked + ESTIMATE_EVERY)
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(self.heartbeat),
                (true, None) => Duration::ZERO,
                (false, _) => self.heartbeat,
            };
            if self.estimate_due && wait.is_zero() {
                self.estimate_again().await;
                continue;
            }
            match tokio::time::timeout(wait, self.receiver.recv()).await {
                Err(_) if self.estimate_due => {}
                Err(_) => return Some((Ok(event(Kind::Heartbeat(Heartbeat {}))), self)),
                Ok(Ok(batch)) => {
                    if let Err(status) = self.apply(&batch).await {
                        self.ended = true;
                        return Some((Err(status), self));
                    }
                }
                Ok(Err(RecvError::Lagged(_))) => match (self.read_state)(self.build).await {
                    Ok(read) => self.reset(read),
                    Err(status) => {
                        self.ended = true;
                        return Some((Err(status), self));
                    }
                },
                Ok(Err(RecvError::Closed)) => {
                    self.ended = true;
                    return Some((
                        Err(Status::unavailable("the runner is shutting down")),
                        self,
                    ));
                }
            }
        }
    }

    /// Asks for the build's predicted end, and sends it if it moved.
    async fn estimate_again(&mut self) {
        self.estimate_due = false;
        let Some(end) = (self.estimate)(self.build).await else {
            // Nothing to tell yet (not planned, no builder): the next ask is not held back.
            return;
        };
        self.estimated_at = Some(tokio::time::Instant::now());
        if (end - self.estimated_end_ms).abs() >= ESTIMATE_MOVED_MS {
            self.estimated_end_ms = end;
            self.pending.push_back(event(Kind::Estimate(Estimate {
                estimated_end_ms: end,
            })));
        }
    }

    /// Sends the whole state and remembers it as what the client knows.
    fn reset(&mut self, (state, snapshot): (GetResponse, Snapshot)) {
        self.snapshot = snapshot;
        self.estimated_end_ms = state.estimated_end_ms;
        self.status = state.status();
        self.ended = state.phase().is_terminal();
        // A build just planned may not have reached the scheduler when its state was read:
        // ask again once, rather than wait for its first step to end.
        self.estimate_due |= state.estimated_end_ms == 0 && !self.ended;
        self.steps = state
            .steps
            .iter()
            .map(|step| (step.step_id, step.clone()))
            .collect();
        self.pending.push_back(event(Kind::State(state)));
    }

    /// Turns a committed batch into the events this build's client has not seen.
    async fn apply(&mut self, batch: &CommittedBatch) -> Result<(), Status> {
        if batch
            .transaction
            .is_some_and(|transaction| self.snapshot.shows(transaction))
        {
            return Ok(());
        }
        for committed in &batch.changes {
            match committed {
                Committed::Expanded(build) if *build == self.build => {
                    let read = (self.read_state)(self.build).await?;
                    self.reset(read);
                    return Ok(());
                }
                Committed::Expanded(_) => {}
                Committed::Change(change) => self.apply_change(change),
            }
        }
        Ok(())
    }

    fn apply_change(&mut self, change: &Change) {
        match change {
            Change::StepStatus {
                step,
                status,
                reason,
            } => {
                let failure_reason = match status {
                    StepStatus::Failed
                    | StepStatus::DepFailed
                    | StepStatus::Cancelled
                    | StepStatus::Unsupported => reason.clone().unwrap_or_default(),
                    _ => String::new(),
                };
                if status.is_terminal() && self.steps.contains_key(step) {
                    self.estimate_due = true;
                }
                self.update_step(*step, *status, String::new(), failure_reason);
            }
            Change::AttemptStarted { step, builder, .. } => {
                self.update_step(*step, StepStatus::Running, builder.clone(), String::new());
            }
            Change::BuildStarted { build } if *build == self.build => {
                self.update_build(BuildStatus::Running, String::new());
            }
            Change::BuildFinished {
                build,
                status,
                reason,
            } if *build == self.build => {
                let status = view::wire_status(Some(*status));
                self.update_build(status, reason.clone().unwrap_or_default());
                self.ended = status.phase().is_terminal();
            }
            _ => {}
        }
    }

    fn update_step(
        &mut self,
        step: i64,
        status: StepStatus,
        builder: String,
        failure_reason: String,
    ) {
        let Some(known) = self.steps.get_mut(&step) else {
            return;
        };
        if known.step_status() == view::wire_step_status(Some(status)) && known.builder == builder {
            return;
        }
        view::set_step_status(known, Some(status));
        known.builder = builder;
        known.failure_reason = failure_reason;
        known.waiting_reason = String::new();
        self.pending.push_back(event(Kind::Step(known.clone())));
    }

    fn update_build(&mut self, status: BuildStatus, failure_reason: String) {
        // A build only moves forward: queued, running, ended.
        if status == self.status || self.status.phase().is_terminal() {
            return;
        }
        if status == BuildStatus::Running && self.status != BuildStatus::Queued {
            return;
        }
        self.status = status;
        self.pending.push_back(event(Kind::Build(BuildUpdate {
            status: status.into(),
            phase: status.phase().into(),
            failure_reason,
        })));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use drover_scheduler::status::BuildStatus as QueueBuildStatus;
    use futures_util::StreamExt as _;

    use super::*;

    /// Build 1's state with its one step, 7, at `status`.
    fn state(status: StepStatus, builder: &str) -> GetResponse {
        let mut step = StepState {
            step_id: 7,
            builder: builder.to_owned(),
            ..StepState::default()
        };
        view::set_step_status(&mut step, Some(status));
        let mut state = GetResponse {
            build_id: 1,
            steps: vec![step],
            ..GetResponse::default()
        };
        state.set_status(BuildStatus::Queued);
        state
    }

    /// A reader that answers `reads` (a state and the snapshot it was read in) in turn.
    fn reader(reads: Vec<(GetResponse, &str)>) -> StateReader {
        let reads: VecDeque<_> = reads
            .into_iter()
            .map(|(state, snapshot)| (state, Snapshot::parse(snapshot).unwrap()))
            .collect();
        let reads = Arc::new(Mutex::new(reads));
        Arc::new(move |_| {
            let read = reads.lock().unwrap().pop_front().unwrap();
            Box::pin(async move { Ok(read) })
        })
    }

    /// Sources reading `reads` in turn, and predicting the end at `estimates` in turn.
    fn sources(reads: Vec<(GetResponse, &str)>, estimates: Vec<i64>) -> Sources {
        let estimates = Arc::new(Mutex::new(VecDeque::from(estimates)));
        Sources {
            read_state: reader(reads),
            estimate: Arc::new(move |_| {
                let end = estimates.lock().unwrap().pop_front();
                Box::pin(async move { end })
            }),
        }
    }

    /// What a client of `stream` sees, one line per event, until it ends.
    async fn seen(stream: &mut WatchStream, events: usize) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.len() < events {
            match stream.next().await.unwrap().unwrap().event {
                Some(Kind::State(state)) => seen.push(format!("state {}", state.steps[0].status)),
                Some(Kind::Step(step)) => seen.push(format!("step {}", step.status)),
                Some(Kind::Build(update)) => seen.push(format!("build {:?}", update.status())),
                Some(Kind::Estimate(estimate)) => {
                    seen.push(format!("ends at {}", estimate.estimated_end_ms));
                }
                _ => {}
            }
        }
        seen
    }

    fn batch(transaction: Option<u64>, changes: Vec<Committed>) -> Arc<CommittedBatch> {
        Arc::new(CommittedBatch {
            transaction,
            changes,
        })
    }

    fn step(status: StepStatus) -> Committed {
        Committed::Change(Change::StepStatus {
            step: 7,
            status,
            reason: None,
        })
    }

    fn started() -> Committed {
        Committed::Change(Change::AttemptStarted {
            attempt: uuid::Uuid::nil(),
            step: 7,
            builder: "b1".to_owned(),
        })
    }

    fn finished() -> Committed {
        Committed::Change(Change::BuildFinished {
            build: 1,
            status: QueueBuildStatus::Succeeded,
            reason: None,
        })
    }

    #[tokio::test]
    async fn changes_a_planned_builds_state_shows_are_not_sent_after_it() {
        let (changes, _) = broadcast::channel(16);
        let mut stream = open(
            1,
            &changes,
            sources(
                vec![
                    (state(StepStatus::Waiting, ""), "5:5:"),
                    (state(StepStatus::Running, "b1"), "6:6:"),
                ],
                Vec::new(),
            ),
            Duration::from_mins(1),
        )
        .await
        .unwrap();
        // Planned, then dispatched in transaction 5, before the stream read the planned build's
        // state again: that state already shows the step running.
        changes
            .send(batch(None, vec![Committed::Expanded(1)]))
            .unwrap();
        changes
            .send(batch(Some(5), vec![step(StepStatus::Runnable), started()]))
            .unwrap();
        changes.send(batch(Some(6), vec![finished()])).unwrap();
        assert_eq!(
            seen(&mut stream, 3).await,
            ["state waiting", "state running", "build Succeeded"],
            "no step went back"
        );
    }

    #[tokio::test]
    async fn a_watch_opened_while_changes_commit_sends_each_once_in_order() {
        let (changes, _) = broadcast::channel(16);
        // Subscribed before transactions 9 and 10 were broadcast, read after both committed.
        let mut stream = open(
            1,
            &changes,
            sources(vec![(state(StepStatus::Running, "b1"), "11:11:")], vec![0]),
            Duration::from_mins(1),
        )
        .await
        .unwrap();
        changes
            .send(batch(Some(9), vec![step(StepStatus::Runnable)]))
            .unwrap();
        changes.send(batch(Some(10), vec![started()])).unwrap();
        changes
            .send(batch(Some(11), vec![step(StepStatus::Succeeded)]))
            .unwrap();
        changes.send(batch(Some(12), vec![finished()])).unwrap();
        assert_eq!(
            seen(&mut stream, 3).await,
            ["state running", "step succeeded", "build Succeeded"],
            "the step is never seen going back to runnable"
        );
    }

    #[tokio::test]
    async fn a_predicted_end_that_moved_is_sent_after_a_step_ends_and_one_that_did_not_is_not() {
        for (asked, expected) in [
            (
                15_000,
                vec!["state running", "step succeeded", "ends at 15000"],
            ),
            (
                10_500,
                vec!["state running", "step succeeded", "build Succeeded"],
            ),
        ] {
            let (changes, _) = broadcast::channel(16);
            let mut running = state(StepStatus::Running, "b1");
            running.estimated_end_ms = 10_000;
            let mut stream = open(
                1,
                &changes,
                sources(vec![(running, "1:1:")], vec![asked]),
                Duration::from_mins(1),
            )
            .await
            .unwrap();
            changes
                .send(batch(Some(2), vec![step(StepStatus::Succeeded)]))
                .unwrap();
            changes.send(batch(Some(3), vec![finished()])).unwrap();
            assert_eq!(seen(&mut stream, 3).await, expected, "asked: {asked}");
        }
    }
}
