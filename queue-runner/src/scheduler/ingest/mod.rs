//! Ingest, a task of its own: expanding queued builds into plans for the scheduler core.
//! Durable, not payload-driven: builds waiting for the runner are the rows with
//! `ingested_at IS NULL`, drained on every wake-up from [`super::listen`], every 30 s, and at
//! start, so nothing queued while the runner was down or disconnected is lost.

mod closure;
mod expand;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_scheduler::Event;
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::driver::{Committed, CommittedBatch, CommittedChanges};
use super::handoff::Handoff;
use crate::cache::BinaryCache;
use crate::db::queries::{self, BuildSelection, QueuedBuild};
use crate::db::{DbError, Pool};

use closure::SharedClosure;
pub use closure::{complete_closure, load_closures};

/// Why ingest stopped. Fatal: queued builds would never be seen.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The database failed.
    #[error("the database failed")]
    Database(#[from] DbError),
    /// The scheduler stopped taking plans.
    #[error("the scheduler stopped taking plans")]
    SchedulerGone,
}

impl Classify for IngestError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

/// How often ingest looks for queued builds without a notification: a safety net for a
/// notification lost with its connection, and the moment the core may forget old completions.
const RESCAN: Duration = Duration::from_secs(30);

/// Builds expanded per query.
const BATCH: i64 = 200;

/// Builds of a newly queued job set planned first: a large job set is planned in slices, each
/// twice the one before, so its first steps are dispatched while the rest is planned. Each slice
/// walks its own closure, which in a nixpkgs-shaped graph is most of the graph, so the slices
/// grow: a few of them, not hundreds. Its closure is verified once for all slices. A starting
/// runner plans each job set whole: no builder may join before the whole queue is recovered.
const JOB_SET_FIRST_SLICE: usize = 500;

/// Builds expanded into plans: the ingest task. It owns no scheduling state; the core takes
/// each plan in one event.
pub struct Ingest {
    pool: Pool,
    cache: Arc<BinaryCache>,
    plans: mpsc::Sender<Event>,
    committed: Arc<AtomicU64>,
    handoff: Handoff,
    expanded: CommittedChanges,
}

impl Ingest {
    /// An ingest task feeding `plans`; `committed` is the driver's count of durable step
    /// completions; `handoff` holds the closures Submit verified already (and the gate held
    /// while a group is planned); every build it expands is announced on `expanded`, for Watch
    /// streams.
    #[must_use]
    pub fn new(
        pool: Pool,
        cache: Arc<BinaryCache>,
        plans: mpsc::Sender<Event>,
        committed: Arc<AtomicU64>,
        handoff: Handoff,
        expanded: CommittedChanges,
    ) -> Self {
        Self {
            pool,
            cache,
            plans,
            committed,
            handoff,
            expanded,
        }
    }

    /// Plans every unfinished build (what a starting runner must rebuild its graph from), then
    /// every newly queued one on each wake-up and every [`RESCAN`], until `shutdown`.
    pub async fn run(
        self,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), WithContext<IngestError>> {
        let recovered = self
            .drain(BuildSelection::Unfinished)
            .await
            .context("recovering the queue at start")?;
        tracing::info!(builds = recovered, "queue recovered");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = wake.notified() => {}
                () = tokio::time::sleep(RESCAN) => {}
            }
            self.drain(BuildSelection::NotIngested)
                .await
                .context("ingesting queued builds")?;
        }
    }

    /// Plans every build `selection` names; returns how many builds were handled. The builds of
    /// one job set are planned together (newly queued ones in growing slices, from
    /// [`JOB_SET_FIRST_SLICE`]); any other build is planned alone.
    async fn drain(&self, selection: BuildSelection) -> Result<usize, WithContext<IngestError>> {
        let snapshot = self.committed.load(Ordering::Acquire);
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|error| IngestError::Database(DbError::Connection(error)))?;
        let mut after = 0;
        let mut handled = 0;
        let mut shared = SharedClosure::default();
        let mut group: Vec<QueuedBuild> = Vec::new();
        let first_slice = match selection {
            BuildSelection::NotIngested => JOB_SET_FIRST_SLICE,
            BuildSelection::Unfinished => usize::MAX,
        };
        let mut slice = first_slice;
        loop {
            let builds = queries::queued_builds(&client, selection, after, BATCH)
                .await
                .map_err(IngestError::Database)?;
            let Some(last) = builds.last() else {
                break;
            };
            after = last.id;
            for build in builds {
                let same_job_set = build.job_set.is_some()
                    && group
                        .first()
                        .is_some_and(|first| first.job_set == build.job_set);
                if !group.is_empty() && (!same_job_set || group.len() >= slice) {
                    let done = std::mem::take(&mut group);
                    handled += self.plan(&mut client, &done, &mut shared, snapshot).await?;
                    slice = if same_job_set {
                        slice.saturating_mul(2)
                    } else {
                        first_slice
                    };
                }
                group.push(build);
            }
        }
        if !group.is_empty() {
            handled += self
                .plan(&mut client, &group, &mut shared, snapshot)
                .await?;
        }
        drop(shared);
        self.supersede(&client).await?;
        self.send(Event::IngestCaughtUp { snapshot }).await?;
        Ok(handled)
    }

    /// Expands a group of builds and hands the scheduler its plan; returns how many builds it
    /// handled.
    async fn plan(
        &self,
        client: &mut deadpool_postgres::Client,
        group: &[QueuedBuild],
        shared: &mut SharedClosure,
        snapshot: u64,
    ) -> Result<usize, WithContext<IngestError>> {
        // Planning continues the trace of the group's first traced Submit.
        let span = tracing::info_span!("plan", builds = group.len());
        if let Some(build) = group.iter().find(|build| !build.trace_parent.is_empty()) {
            drover_daemon::traces::set_parent(&span, &build.trace_parent);
        }
        // From its first read to its commit, a plan names rows (`expand` lets go at the commit).
        let planning = self.handoff.gate().plan().await;
        let plan = self
            .expand(client, group, shared, snapshot, planning)
            .instrument(span)
            .await
            .with_context(|| match group {
                [build] => format!("expanding build {}", build.id),
                _ => format!(
                    "expanding the {} builds of job set {}",
                    group.len(),
                    group[0].job_set.unwrap_or_default()
                ),
            })?;
        // Before the plan goes to the scheduler, so a watcher reads the builds' steps before any
        // change of them. Nobody watching is not an error.
        let _ = self.expanded.send(Arc::new(CommittedBatch {
            transaction: None,
            changes: group
                .iter()
                .map(|build| Committed::Expanded(build.id))
                .collect(),
        }));
        if let Some(plan) = plan {
            self.send(Event::BuildPlanned(plan)).await?;
        }
        Ok(group.len())
    }

    /// Cancels the unfinished builds of the older job sets of each superseding job set's series
    /// once every build of it is planned (so the core keeps the steps they share), then marks
    /// the job set as done superseding.
    async fn supersede(&self, client: &deadpool_postgres::Client) -> Result<(), IngestError> {
        for (job_set, builds) in queries::superseded_builds(client).await? {
            for &build in &builds {
                let by = format!("job set {job_set}, which supersedes it");
                self.send(Event::CancelBuild { build, by }).await?;
            }
            queries::mark_superseded(client, job_set).await?;
            tracing::info!(
                job_set,
                cancelled = builds.len(),
                "older job sets superseded"
            );
        }
        Ok(())
    }

    async fn send(&self, event: Event) -> Result<(), IngestError> {
        self.plans
            .send(event)
            .await
            .map_err(|_| IngestError::SchedulerGone)
    }
}
