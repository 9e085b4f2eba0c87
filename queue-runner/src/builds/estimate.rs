//! A build's predicted end, asked of the scheduler: only the core knows the step graph, the
//! learned durations and the builders' slots (`Core::estimate`). A front end fills it into the
//! state it answers; a scheduler that is busy or gone leaves it unknown rather than delay the
//! answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_proto::v1::GetResponse;
use drover_scheduler::BuildId;
use tokio::sync::{mpsc, oneshot};

use crate::scheduler::driver::SessionEvent;

/// How long a reader waits for the scheduler's estimate.
const PATIENCE: Duration = Duration::from_millis(200);

/// Asks the scheduler for builds' predicted ends.
#[derive(Debug, Clone)]
pub struct Estimator {
    scheduler: mpsc::Sender<SessionEvent>,
}

impl Estimator {
    /// Asks `scheduler`.
    #[must_use]
    pub fn new(scheduler: mpsc::Sender<SessionEvent>) -> Self {
        Self { scheduler }
    }

    /// When `build` is predicted to end, in Unix milliseconds; `None` if the scheduler cannot
    /// tell or does not answer in time.
    pub async fn end_ms(&self, build: BuildId) -> Option<i64> {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.scheduler
                .send(SessionEvent::Estimate { build, reply })
                .await
                .ok()?;
            answer.await.ok().flatten()
        };
        let remaining = tokio::time::timeout(PATIENCE, asked).await.ok().flatten()?;
        let end = SystemTime::now().checked_add(remaining)?;
        i64::try_from(end.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
    }

    /// Fills in `state`'s predicted end, unless it has ended.
    pub async fn fill(&self, state: &mut GetResponse) {
        if !state.phase().is_terminal() {
            state.estimated_end_ms = self.end_ms(state.build_id).await.unwrap_or_default();
        }
    }
}
