//! Cancelling and restarting a build: only its submitter or an admin may. A cancel goes to the
//! scheduler, which owns every running build and stops the steps only that build needs; a
//! restart tells the scheduler first (so a plan for the build after it is not taken for a stale
//! one), then queues the ended build again for ingest.

use drover_scheduler::Event;
use drover_tls::{Identity, Role};

use super::Builds;
use crate::db::status::BuildStatus;
use crate::db::{DbError, queries};
use crate::scheduler::driver::SessionEvent;

/// Why a build could not be cancelled or restarted.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// There is no such build.
    #[error("no build {0}")]
    NoSuchBuild(i64),
    /// Someone else submitted it.
    #[error("build {build} was submitted by {submitted_by}; only it and admins may change it")]
    NotOwner {
        /// The build.
        build: i64,
        /// Its submitter (`SQL` for a build inserted directly).
        submitted_by: String,
    },
    /// It has not failed or been cancelled: there is nothing to restart.
    #[error("build {0} has not failed or been cancelled: only those can be restarted")]
    NotRestartable(i64),
    /// The scheduler no longer takes events.
    #[error("the runner is shutting down")]
    ShuttingDown,
    /// The database failed.
    #[error("reading or changing the build")]
    Database(#[from] DbError),
}

impl Builds {
    /// Cancels `build` for `caller`. Cancelling an ended build changes nothing and is not an
    /// error (a retried cancel must not fail): how it ended is returned.
    pub async fn cancel(
        &self,
        caller: &Identity,
        build: i64,
    ) -> Result<Option<BuildStatus>, ControlError> {
        let status = self.owned(caller, build).await?;
        if status.is_terminal() {
            return Ok(Some(status));
        }
        let by = caller.to_string();
        self.tell_scheduler(Event::CancelBuild { build, by })
            .await?;
        tracing::info!(build, by = %caller, "build cancelled");
        Ok(None)
    }

    /// Queues `build` again for `caller`, once it has failed or been cancelled; with
    /// `dependents`, also the builds a step that failed in it ended (those `caller` may change).
    /// Returns the dependents queued again.
    pub async fn restart(
        &self,
        caller: &Identity,
        build: i64,
        dependents: bool,
    ) -> Result<Vec<i64>, ControlError> {
        self.owned(caller, build).await?;
        // Found before the restart clears the failure that links them to it.
        let ended = if dependents {
            let client = self.pool.get().await.map_err(DbError::Connection)?;
            queries::builds_failed_by(&client, build).await?
        } else {
            Vec::new()
        };
        let mut builds = vec![build];
        for dependent in ended {
            match self.owned(caller, dependent).await {
                Ok(_) => builds.push(dependent),
                Err(ControlError::NotOwner { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        for &build in &builds {
            self.tell_scheduler(Event::RestartBuild { build }).await?;
        }
        // One transaction, so ingest plans them together and they share the step built again.
        let mut client = self.pool.get().await.map_err(DbError::Connection)?;
        let restarted = queries::restart_builds(&mut client, &builds).await?;
        if restarted.first() != Some(&build) {
            return Err(ControlError::NotRestartable(build));
        }
        tracing::info!(builds = ?restarted, by = %caller, "builds restarted");
        Ok(restarted[1..].to_vec())
    }

    /// Checks that `caller` may change `build` (its submitter, or an admin); its status if so.
    async fn owned(&self, caller: &Identity, build: i64) -> Result<BuildStatus, ControlError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let (submitted_by, status) = queries::build_owner(&client, build)
            .await?
            .ok_or(ControlError::NoSuchBuild(build))?;
        if caller.role == Role::Admin || submitted_by.as_deref() == Some(&caller.to_string()) {
            Ok(status)
        } else {
            Err(ControlError::NotOwner {
                build,
                submitted_by: submitted_by.unwrap_or_else(|| "SQL".to_owned()),
            })
        }
    }

    async fn tell_scheduler(&self, event: Event) -> Result<(), ControlError> {
        self.scheduler
            .send(SessionEvent::Core(event))
            .await
            .map_err(|_| ControlError::ShuttingDown)
    }
}
