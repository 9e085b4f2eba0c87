//! Watch: one build's whole state, then each change of it as the scheduler commits it, with a
//! heartbeat whenever nothing happened for a while.
//!
//! There is no durable event log. A stream subscribes to the committed changes *before* it
//! reads the build's state, so nothing committed after that read is missed; a change that the
//! state already shows is not sent again (each step's and the build's last sent status is kept).
//! A stream that falls too far behind the broadcast reads the whole state again and sends it, as
//! a reconnecting client gets it. When its build is planned it reads the state again too (now
//! with the steps), first dropping the changes already queued: committed before that read, the
//! state shows them, and sent after it they would show a step going back.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::watch_event::Event as Kind;
use drover_proto::v1::{BuildStatus, BuildUpdate, GetResponse, Heartbeat, StepState, WatchEvent};
use drover_scheduler::{BuildId, Change};
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use tonic::Status;

use crate::builds::view;
use crate::db::status::StepStatus;
use crate::scheduler::driver::Committed;

/// The stream Watch answers with.
pub type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchEvent, Status>> + Send>>;

/// Reads a build's whole state, as Get answers.
pub type StateReader = Arc<
    dyn Fn(BuildId) -> Pin<Box<dyn Future<Output = Result<GetResponse, Status>> + Send>>
        + Send
        + Sync,
>;

/// Opens a Watch of `build`: fails at once if the build does not exist.
pub async fn open(
    build: BuildId,
    changes: &broadcast::Sender<Arc<[Committed]>>,
    read_state: StateReader,
    heartbeat: Duration,
) -> Result<WatchStream, Status> {
    let receiver = changes.subscribe();
    let state = read_state(build).await?;
    let mut follow = Follow {
        build,
        receiver,
        read_state,
        heartbeat,
        pending: VecDeque::new(),
        steps: HashMap::new(),
        status: BuildStatus::Unknown,
        ended: false,
    };
    follow.reset(state);
    Ok(Box::pin(futures_util::stream::unfold(follow, Follow::next)))
}

/// One Watch stream's state.
struct Follow {
    build: BuildId,
    receiver: broadcast::Receiver<Arc<[Committed]>>,
    read_state: StateReader,
    heartbeat: Duration,
    /// Events to send before reading more changes.
    pending: VecDeque<WatchEvent>,
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
            match tokio::time::timeout(self.heartbeat, self.receiver.recv()).await {
                Err(_) => return Some((Ok(event(Kind::Heartbeat(Heartbeat {}))), self)),
                Ok(Ok(batch)) => {
                    if let Err(status) = self.apply(&batch).await {
                        self.ended = true;
                        return Some((Err(status), self));
                    }
                }
                Ok(Err(RecvError::Lagged(_))) => match (self.read_state)(self.build).await {
                    Ok(state) => self.reset(state),
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

    /// Sends the whole state and remembers it as what the client knows.
    fn reset(&mut self, state: GetResponse) {
        self.status = state.status();
        self.ended = state.phase().is_terminal();
        self.steps = state
            .steps
            .iter()
            .map(|step| (step.step_id, step.clone()))
            .collect();
        self.pending.push_back(event(Kind::State(state)));
    }

    /// Turns a committed batch into the events this build's client has not seen.
    async fn apply(&mut self, batch: &[Committed]) -> Result<(), Status> {
        for committed in batch {
            match committed {
                Committed::Expanded(build) if *build == self.build => {
                    // The state read now shows the rest of this batch and every batch already
                    // queued: sent after it, they would take a step back to where it was.
                    while !matches!(
                        self.receiver.try_recv(),
                        Err(TryRecvError::Empty | TryRecvError::Closed)
                    ) {}
                    let state = (self.read_state)(self.build).await?;
                    self.reset(state);
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

    /// A reader that answers `states` in turn.
    fn reader(states: Vec<GetResponse>) -> StateReader {
        let states = Arc::new(Mutex::new(VecDeque::from(states)));
        Arc::new(move |_| {
            let state = states.lock().unwrap().pop_front().unwrap();
            Box::pin(async move { Ok(state) })
        })
    }

    #[tokio::test]
    async fn changes_queued_before_a_planned_builds_state_is_read_again_are_not_sent_after_it() {
        let (changes, _) = broadcast::channel(16);
        let mut stream = open(
            1,
            &changes,
            reader(vec![
                state(StepStatus::Waiting, ""),
                state(StepStatus::Running, "b1"),
            ]),
            Duration::from_mins(1),
        )
        .await
        .unwrap();
        let mut seen = Vec::new();
        let mut note = |event: WatchEvent| match event.event {
            Some(Kind::State(state)) => seen.push(format!("state {}", state.steps[0].status)),
            Some(Kind::Step(step)) => seen.push(format!("step {}", step.status)),
            Some(Kind::Build(update)) => seen.push(format!("build {:?}", update.status())),
            _ => {}
        };
        note(stream.next().await.unwrap().unwrap());
        // Planned, then dispatched, before the stream read the planned build's state again: that
        // state already shows the step running.
        let send = |batch: Vec<Committed>| changes.send(Arc::from(batch)).unwrap();
        send(vec![Committed::Expanded(1)]);
        send(vec![
            Committed::Change(Change::StepStatus {
                step: 7,
                status: StepStatus::Runnable,
                reason: None,
            }),
            Committed::Change(Change::AttemptStarted {
                attempt: uuid::Uuid::nil(),
                step: 7,
                builder: "b1".to_owned(),
            }),
        ]);
        note(stream.next().await.unwrap().unwrap());
        send(vec![Committed::Change(Change::BuildFinished {
            build: 1,
            status: QueueBuildStatus::Succeeded,
            reason: None,
        })]);
        while let Some(event) = stream.next().await {
            note(event.unwrap());
        }
        assert_eq!(
            seen,
            ["state waiting", "state running", "build Succeeded"],
            "no step went back"
        );
    }
}
