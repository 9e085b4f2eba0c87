//! The only place the runner spawns tasks. Critical tasks (scheduler, LISTEN connection, gRPC
//! server) are joined by [`Supervisor`]: when any of them ends, for any reason, the runner ends,
//! so a dead scheduler can never go unnoticed. Detached tasks (one per builder session) log how
//! they end and take down nothing else.

use std::future::Future;

use tokio::task::JoinSet;

/// How a critical task ended.
pub type TaskExit<E> = (&'static str, Result<(), E>);

/// Critical tasks; the first to end ends the process.
pub struct Supervisor<E> {
    tasks: JoinSet<TaskExit<E>>,
}

impl<E: Send + 'static> Supervisor<E> {
    /// No tasks yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
        }
    }

    /// Starts a critical task.
    pub fn spawn_critical<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Waits for the next critical task to end. `Err(name)` if it panicked or was cancelled;
    /// `None` when none is left.
    pub async fn next_exit(&mut self) -> Option<Result<TaskExit<E>, String>> {
        let joined = self.tasks.join_next().await?;
        Some(joined.map_err(|error| error.to_string()))
    }
}

impl<E: Send + 'static> Default for Supervisor<E> {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts a task nothing waits for; it must handle its own errors.
pub fn spawn_detached<F>(name: &'static str, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place detached tasks are spawned"
    )]
    tokio::spawn(async move {
        task.await;
        tracing::trace!(task = name, "task ended");
    });
}
