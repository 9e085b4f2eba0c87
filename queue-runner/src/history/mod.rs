//! History pruning (`[history] keep_days`, off by default): the rows of builds finished long
//! ago, then the steps no remaining build reaches (with their attempts, logs, outputs and
//! edges), then the derivations nothing names, each in batches of short transactions while the
//! farm runs. Which builds go is the core's decision ([`drover_scheduler::history`]); the
//! learned durations (`step_durations`) are never pruned. What a plan or submission reads while
//! a run is under way is spared ([`PlanGate`]); derivations wait while a build queued by SQL
//! waits to be planned (its closure is not known yet).

pub mod gate;

use std::sync::Arc;

use drover_scheduler::history::{self as policy, HistoryPolicy};

pub use gate::PlanGate;

use crate::db::history;
use crate::db::{self, DbError};
use crate::logs::LogStore;

/// Rows deleted per transaction: each holds its locks for milliseconds.
const BATCH: usize = 1000;

/// Prunes one farm's history.
#[derive(Debug, Clone)]
pub struct Pruner {
    pool: db::Pool,
    gate: Arc<PlanGate>,
    logs: LogStore,
    policy: HistoryPolicy,
    /// The cache's key rule, whose newest builds stay: `gc.key`, `gc.keep_per_key`.
    key: Option<String>,
    per_key: u32,
}

/// What one run deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Builds.
    pub builds: u64,
    /// Steps (with their attempts, outputs and edges).
    pub steps: u64,
    /// Step logs of those attempts.
    pub logs: u64,
    /// Derivations.
    pub derivations: u64,
    /// Whether a build waiting to be planned stopped the run before its derivations were
    /// done (the next interval goes on).
    pub interrupted: bool,
}

impl Pruner {
    /// A pruner by `policy`, keeping the newest `per_key` succeeded builds of each value of
    /// metadata `key` as the cache does.
    #[must_use]
    pub const fn new(
        pool: db::Pool,
        gate: Arc<PlanGate>,
        logs: LogStore,
        policy: HistoryPolicy,
        key: Option<String>,
        per_key: u32,
    ) -> Self {
        Self {
            pool,
            gate,
            logs,
            policy,
            key,
            per_key,
        }
    }

    /// Deletes what is past its days, a batch at a time.
    pub async fn prune(&self) -> Result<Pruned, DbError> {
        // Before anything is read, so every plan the marks below miss names what it reads.
        let _marking = self.gate.mark().await;
        let mut client = self.pool.get().await.map_err(DbError::Connection)?;
        let now = history::now(&client).await?;
        let cutoff = self.policy.cutoff(now);
        let mut pruned = Pruned {
            builds: self.prune_builds(&mut client, now, cutoff).await?,
            ..Pruned::default()
        };
        history::delete_sweep_records(&client, cutoff).await?;
        let steps = history::unreachable_steps(&client, cutoff).await?;
        for batch in steps.chunks(BATCH) {
            let pruning = self.gate.prune().await;
            let batch = pruning.unnamed_steps(batch);
            let (deleted, logs) = history::delete_steps(&mut client, &batch, cutoff).await?;
            drop(pruning);
            pruned.steps += deleted;
            pruned.logs += self.delete_logs(logs).await;
        }
        let derivations = history::unreferenced_derivations(&client, cutoff).await?;
        for batch in derivations.chunks(BATCH) {
            let pruning = self.gate.prune().await;
            let batch = pruning.unnamed_derivations(batch);
            let Some(deleted) = history::delete_derivations(&client, &batch, cutoff).await? else {
                pruned.interrupted = true;
                return Ok(pruned);
            };
            pruned.derivations += deleted;
        }
        Ok(pruned)
    }

    /// Deletes the finished builds the core retires, a page at a time; returns how many.
    async fn prune_builds(
        &self,
        client: &mut deadpool_postgres::Client,
        now: i64,
        cutoff: i64,
    ) -> Result<u64, DbError> {
        let newest = history::newest_of_key(&*client, self.key.as_deref(), self.per_key).await?;
        let page = i64::try_from(BATCH).unwrap_or(i64::MAX);
        let (mut after, mut deleted) = (0, 0);
        loop {
            let builds = history::finished_before(&*client, cutoff, &newest, after, page).await?;
            let Some(last) = builds.last() else {
                return Ok(deleted);
            };
            after = last.id;
            let retired = policy::retired(&builds, &self.policy, now);
            if !retired.is_empty() {
                deleted += history::delete_builds(client, &retired, cutoff).await?;
            }
        }
    }

    /// Deletes the log files of deleted attempts, on a blocking thread; returns how many went.
    async fn delete_logs(&self, files: Vec<String>) -> u64 {
        let logs = self.logs.clone();
        let deleting = tokio::task::spawn_blocking(move || logs.delete_all(&files, "pruned"));
        deleting.await.unwrap_or_else(|error| {
            tracing::warn!(%error, "deleting pruned attempts' logs failed");
            0
        })
    }
}
