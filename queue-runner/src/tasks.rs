//! The only place the runner spawns tasks. Critical tasks (scheduler, ingest, LISTEN connection,
//! servers) are joined by [`Supervisor`]: when any of them ends, for any reason, the runner ends,
//! so a dead scheduler can never go unnoticed; a panic is reported with the task's name.
//! Builder sessions are tracked ([`spawn_tracked`]): shutdown waits for them, and whatever way
//! one ends, panic included, its exit handler runs, so no builder is left registered with
//! attempts nobody will report.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

/// How a critical task ended.
pub type TaskExit<E> = (&'static str, Result<(), E>);

/// Critical tasks; the first to end ends the process.
pub struct Supervisor<E> {
    tasks: JoinSet<TaskExit<E>>,
    /// The names of the tasks still running, to say which did not stop in time.
    running: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl<E: Send + 'static> Supervisor<E> {
    /// No tasks yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            running: std::collections::HashMap::new(),
        }
    }

    /// Starts a critical task.
    pub fn spawn_critical<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let handle = self.tasks.spawn(async move {
            match AssertUnwindSafe(task).catch_unwind().await {
                Ok(result) => (name, result),
                Err(panic) => std::panic::resume_unwind(Box::new(format!(
                    "the {name} task panicked: {}",
                    panic_message(panic.as_ref())
                ))),
            }
        });
        self.running.insert(handle.id(), name);
    }

    /// The names of the tasks that have not ended.
    #[must_use]
    pub fn still_running(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.running.values().copied().collect();
        names.sort_unstable();
        names
    }

    /// Waits for the next critical task to end. `Err(why)` if it panicked (naming the task) or
    /// was cancelled; `None` when none is left.
    pub async fn next_exit(&mut self) -> Option<Result<TaskExit<E>, String>> {
        let joined = self.tasks.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        self.running.remove(&id);
        Some(
            joined
                .map(|(_, exit)| exit)
                .map_err(|error| match error.try_into_panic() {
                    Ok(panic) => panic_message(panic.as_ref()),
                    Err(error) => error.to_string(),
                }),
        )
    }
}

impl<E: Send + 'static> Default for Supervisor<E> {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts a task on `tracker` (shutdown waits for it); `on_exit` runs when it ends, with the
/// panic message if it panicked.
pub fn spawn_tracked<F, X>(tracker: &TaskTracker, name: &'static str, task: F, on_exit: X)
where
    F: Future<Output = ()> + Send + 'static,
    X: FnOnce(Option<String>) -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
{
    tracker.spawn(async move {
        let panic = AssertUnwindSafe(task)
            .catch_unwind()
            .await
            .err()
            .map(|panic| panic_message(panic.as_ref()));
        if let Some(message) = &panic {
            tracing::error!(task = name, panic = %message, "task panicked");
        }
        on_exit(panic).await;
    });
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_tracked_task_still_runs_its_exit_handler() {
        let tracker = TaskTracker::new();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        spawn_tracked(
            &tracker,
            "doomed",
            async { panic!("injected") },
            move |panic| {
                Box::pin(async move {
                    let _ = sender.send(panic);
                })
            },
        );
        tracker.close();
        tracker.wait().await;
        assert_eq!(receiver.await.unwrap(), Some("injected".to_owned()));
    }

    #[tokio::test]
    async fn a_panicking_critical_task_is_reported_by_name() {
        let mut supervisor: Supervisor<()> = Supervisor::new();
        supervisor.spawn_critical("dispatcher", async { panic!("boom") });
        let exit = supervisor.next_exit().await.unwrap();
        assert_eq!(
            exit.unwrap_err(),
            "the dispatcher task panicked: boom".to_owned()
        );
    }
}
