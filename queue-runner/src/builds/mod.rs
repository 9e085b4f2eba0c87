//! The build API's use cases: what submitting, reading, listing, cancelling and restarting a
//! build, and reading a step's log, do, each returning a typed error. Front ends (the gRPC
//! `BuildService` today) authenticate the caller, decode the request, call one of these, and map
//! the error through one conversion per error type; they hold no logic of their own.
//!
//! - [`submit`]: verification, the admission cap, authorisation of sources, the transaction.
//! - [`job_set`]: derivations staged in chunks, then one build per job queued, all or none.
//! - [`control`]: cancel and restart, which only a build's submitter or an admin may do.
//! - [`estimate`]: a build's predicted end, asked of the scheduler.
//! - [`read`]: a build's whole state, a page of builds, a step's stored log.
//! - [`view`]: how builds look to clients: statuses and rows as the API's messages.

pub mod control;
pub mod estimate;
pub mod job_set;
pub mod read;
pub mod submit;
pub mod view;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::cache::BinaryCache;
use crate::db::Pool;
use crate::logs::LogStore;
use crate::scheduler::driver::SessionEvent;
use crate::scheduler::handoff::Handoff;

/// What a submission may carry.
#[derive(Debug, Clone, Copy)]
pub struct SubmitLimits {
    /// The largest derivation accepted (`submissions.max_derivation_bytes`).
    pub max_derivation_bytes: usize,
    /// Whether a derivation needing a system or feature no builder ever offered is refused
    /// (`submissions.refuse_unknown_systems`).
    pub refuse_unknown_systems: bool,
}

/// The build API over the runner's database, cache, log store and scheduler.
#[derive(Clone)]
pub struct Builds {
    pool: Pool,
    logs: LogStore,
    cache: Arc<BinaryCache>,
    /// Where verified closures go, so ingest does not verify them again.
    handoff: Handoff,
    limits: SubmitLimits,
    /// Where cancels go: the scheduler, which owns every running build.
    scheduler: mpsc::Sender<SessionEvent>,
}

impl Builds {
    /// The build API over these parts.
    #[must_use]
    pub fn new(
        pool: Pool,
        logs: LogStore,
        cache: Arc<BinaryCache>,
        handoff: Handoff,
        limits: SubmitLimits,
        scheduler: mpsc::Sender<SessionEvent>,
    ) -> Self {
        Self {
            pool,
            logs,
            cache,
            handoff,
            limits,
            scheduler,
        }
    }

    /// Asks the scheduler for builds' predicted ends.
    #[must_use]
    pub fn estimator(&self) -> estimate::Estimator {
        estimate::Estimator::new(self.scheduler.clone())
    }

    /// The database pool (for the streams a front end keeps open: Watch, `FollowLog`).
    #[must_use]
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The step log store.
    #[must_use]
    pub fn logs(&self) -> &LogStore {
        &self.logs
    }
}
