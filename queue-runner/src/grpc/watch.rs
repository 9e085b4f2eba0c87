//! Watch: one build's whole state, then each change of it as the scheduler commits it, with a
//! heartbeat whenever nothing happened for a while.
//!
//! There is no durable event log. A stream subscribes to the committed changes *before* it
//! reads the build's state, so nothing committed after that read is missed; a change that the
//! state already shows is not sent again (each step's and the build's last sent status is kept).
//! A stream that falls too far behind the broadcast reads the whole state again and sends it, as
//! a reconnecting client gets it.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::watch_event::Event as Kind;
use drover_proto::v1::{BuildStatus, BuildUpdate, GetResponse, Heartbeat, StepState, WatchEvent};
use drover_scheduler::{BuildId, Change};
use tokio::sync::broadcast::{self, error::RecvError};
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
                    let state = (self.read_state)(self.build).await?;
                    self.reset(state);
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
