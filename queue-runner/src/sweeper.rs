//! Collection on a schedule, without stopping service: the binary cache, one sweep at a time,
//! then step logs past their time, then the history of builds past theirs ([`crate::history`]),
//! each if it is on. A sweep reads its roots from the database, lists and deletes on a blocking
//! thread, and is recorded (`cache_sweeps`) and counted. Also the dry run of
//! `drover-queue-runner gc --dry-run`, which deletes nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use error_context::{Classify, Severity};
use tokio_util::sync::CancellationToken;

use crate::cache::gc::{self, Plan, Swept, Timing};
use crate::cache::{BinaryCache, CacheError};
use crate::config::GcPolicy;
use crate::db::retention::{self, Keep};
use crate::db::{self, DbError};
use crate::history::{Pruned, Pruner};
use crate::logs::LogStore;
use crate::metrics::{GcMetrics, SweepFigures};

/// Why a sweep did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The roots could not be read or the sweep recorded.
    #[error("garbage collection's database work failed")]
    Database(#[from] DbError),
    /// The cache directory could not be listed.
    #[error("garbage collection of the cache directory failed")]
    Cache(#[from] CacheError),
    /// The blocking thread doing the file-system work died.
    #[error("garbage collection's file-system thread failed: {0}")]
    Thread(String),
}

impl Classify for SweepError {
    fn severity(&self) -> Severity {
        match self {
            Self::Database(source) => source.severity(),
            Self::Cache(_) | Self::Thread(_) => Severity::Step,
        }
    }
}

/// Sweeps one cache by one policy, expires old logs and prunes old history.
#[derive(Debug, Clone)]
pub struct Sweeper {
    pool: db::Pool,
    cache: Arc<BinaryCache>,
    policy: GcPolicy,
    logs: Option<LogExpiry>,
    history: Option<Pruner>,
}

/// Which logs go.
#[derive(Debug, Clone)]
pub struct LogExpiry {
    /// Where they are.
    pub logs: LogStore,
    /// Days a log is kept after its attempt ended.
    pub keep_days: u32,
}

/// Logs expired per transaction: each holds its rows' locks for milliseconds.
const LOG_BATCH: i64 = 500;

/// A completed sweep.
#[derive(Debug)]
pub struct Sweep {
    /// What was decided.
    pub plan: Plan,
    /// What was deleted.
    pub swept: Swept,
}

impl Sweeper {
    /// A sweeper of `cache` by `policy` (which says whether to sweep it on a schedule),
    /// expiring `logs` and pruning `history` if given.
    #[must_use]
    pub const fn new(
        pool: db::Pool,
        cache: Arc<BinaryCache>,
        policy: GcPolicy,
        logs: Option<LogExpiry>,
        history: Option<Pruner>,
    ) -> Self {
        Self {
            pool,
            cache,
            policy,
            logs,
            history,
        }
    }

    /// Deletes the logs past their time, a batch at a time; returns how many.
    pub async fn expire_logs(&self) -> Result<u64, DbError> {
        let Some(LogExpiry { logs, keep_days }) = &self.logs else {
            return Ok(0);
        };
        let mut expired = 0;
        loop {
            let client = self.pool.get().await.map_err(DbError::Connection)?;
            let files = retention::expire_logs(&client, *keep_days, LOG_BATCH).await?;
            drop(client);
            logs.delete_all(&files, "expired");
            expired += u64::try_from(files.len()).unwrap_or(u64::MAX);
            if i64::try_from(files.len()).unwrap_or(i64::MAX) < LOG_BATCH {
                return Ok(expired);
            }
        }
    }

    /// Marks and deletes, stopping between batches at `shutdown`; records the sweep.
    pub async fn sweep(&self, shutdown: &CancellationToken) -> Result<Sweep, SweepError> {
        // What was used since the previous sweep began; from here on, what this one keeps too.
        let used = self.cache.marks().take();
        let started = SystemTime::now();
        let timing = Timing {
            started,
            grace: self.policy.grace,
            max_bytes: self.policy.max_bytes,
        };
        let (listed, roots) =
            listing(&self.pool, self.cache.directory().to_owned(), &self.policy).await?;
        let cache = self.cache.clone();
        let stop = shutdown.clone();
        let (plan, swept) = tokio::task::spawn_blocking(move || {
            let mut plan = gc::plan(listed, &roots, &used, &timing);
            let swept = gc::sweep(&cache, &mut plan, used.nars, &stop);
            (plan, swept)
        })
        .await
        .map_err(|error| SweepError::Thread(error.to_string()))?;
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        retention::record_sweep(&client, started, &plan, swept).await?;
        Ok(Sweep { plan, swept })
    }

    /// Collects every `gc.interval_secs` after the last recorded sweep ended (so a runner
    /// restarted again and again still sweeps, and not each time) until `shutdown`. A
    /// collection that fails is logged and tried again at the next interval; only losing the
    /// database ends the runner.
    pub async fn run(
        self,
        interval: Duration,
        metrics: GcMetrics,
        shutdown: CancellationToken,
    ) -> Result<(), DbError> {
        let mut wait = match self.since_last_sweep().await {
            Ok(Some(since)) => interval.saturating_sub(since),
            Ok(None) => interval,
            Err(error) if lost(&error) => return Err(error),
            Err(error) => {
                tracing::error!(error = %error_context::report(&error), "reading when the cache was last swept");
                interval
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            wait = interval;
            if self.policy.sweep {
                // A sweep stopped by shutdown ends at its next batch, on its own thread.
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    swept = self.sweep_and_count(&metrics, &shutdown) => swept?,
                }
            }
            match self.expire_logs().await {
                Ok(0) => {}
                Ok(expired) => tracing::info!(expired, "step logs past logs.keep_days deleted"),
                Err(error) if lost(&error) => return Err(error),
                Err(error) => {
                    tracing::error!(error = %error_context::report(&error), "expiring logs failed; trying again at the next interval");
                }
            }
            if let Some(history) = &self.history {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    pruned = history.prune() => match pruned {
                        Ok(pruned) => {
                            metrics.pruned(&pruned);
                            log_pruned(&pruned);
                        }
                        Err(error) if lost(&error) => return Err(error),
                        Err(error) => {
                            tracing::error!(error = %error_context::report(&error), "pruning history failed; trying again at the next interval");
                        }
                    },
                }
            }
        }
    }

    /// Sweeps the cache once, counting and logging the sweep; only a lost database is an
    /// error.
    async fn sweep_and_count(
        &self,
        metrics: &GcMetrics,
        shutdown: &CancellationToken,
    ) -> Result<(), DbError> {
        let began = Instant::now();
        match self.sweep(shutdown).await {
            Ok(sweep) => {
                let figures = self.figures(&sweep, began);
                metrics.swept(&figures);
                log(&sweep, &figures, self.policy.max_bytes);
            }
            Err(SweepError::Database(error)) if lost(&error) => return Err(error),
            Err(error) => {
                tracing::error!(error = %error_context::report(&error), "cache sweep failed; trying again at the next interval");
            }
        }
        Ok(())
    }

    /// How long ago the last recorded sweep ended, if one did: a runner restarted more often
    /// than the interval still sweeps.
    async fn since_last_sweep(&self) -> Result<Option<Duration>, DbError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        retention::since_last_sweep(&client).await
    }

    fn figures(&self, sweep: &Sweep, began: Instant) -> SweepFigures {
        SweepFigures {
            deleted_paths: sweep.swept.paths,
            freed_bytes: sweep.swept.bytes,
            seconds: began.elapsed().as_secs_f64(),
            roots: sweep.plan.root_count,
            kept_bytes: sweep.plan.marked.kept_bytes,
            protected_over_bound: sweep.plan.marked.protected_over(self.policy.max_bytes),
        }
    }
}

/// Reads the roots and lists the cache in `directory`: what a sweep marks from, and a dry run.
pub async fn listing(
    pool: &db::Pool,
    directory: PathBuf,
    policy: &GcPolicy,
) -> Result<(Vec<gc::Listed>, Vec<gc::RootPaths>), SweepError> {
    let client = pool.get().await.map_err(DbError::Connection)?;
    let keep = Keep {
        days: policy.keep_days,
        per_key: policy.keep_per_key,
        key: policy.key.as_deref(),
    };
    let roots = retention::cache_roots(&client, &keep).await?;
    drop(client);
    let listed = tokio::task::spawn_blocking(move || gc::list(&directory))
        .await
        .map_err(|error| SweepError::Thread(error.to_string()))??;
    Ok((listed, roots))
}

/// Writes what a sweep would delete, one path a line (`PATH<TAB>NAR BYTES<TAB>WHY`), then a
/// summary line starting with `#`. `unbounded` is the same sweep of the same listing without the
/// size bound: a path only it keeps goes because of the bound.
pub fn write_dry_run(
    bounded: &Plan,
    unbounded: &Plan,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let (mut paths, mut bytes) = (0_u64, 0_u64);
    let marked = bounded.listed.iter().zip(&bounded.marked.keep);
    for ((listed, _), kept_unbounded) in marked
        .zip(&unbounded.marked.keep)
        .filter(|((_, keep), _)| !**keep)
    {
        let why = if *kept_unbounded {
            "its build is among the oldest kept, dropped to stay under gc.max_bytes"
        } else {
            "no build kept needs it (not live, pinned, recent or newest of its key)"
        };
        writeln!(
            out,
            "{}\t{}\t{why}",
            listed.path.to_absolute(),
            listed.bytes
        )?;
        paths += 1;
        bytes += listed.bytes;
    }
    let kept = bounded.kept();
    writeln!(
        out,
        "# would delete {paths} paths ({bytes} NAR bytes); would keep {kept} paths ({} NAR bytes); roots: {}{}",
        bounded.marked.kept_bytes,
        bounded.root_count,
        if bounded.marked.dropped.is_empty() {
            String::new()
        } else {
            format!(
                "; builds dropped by gc.max_bytes: {:?}",
                bounded.marked.dropped
            )
        }
    )
}

/// Whether `error` means the database is gone (the runner cannot work without it), rather
/// than one statement failing (which the next interval tries again).
fn lost(error: &DbError) -> bool {
    match error {
        DbError::Connection(_) | DbError::ConnectionClosed(_) | DbError::TimedOut(_) => true,
        DbError::Query { source, .. } => source.code().is_none(),
        _ => false,
    }
}

/// Logs a pruning run that deleted something, or was stopped.
fn log_pruned(pruned: &Pruned) {
    if pruned.interrupted {
        tracing::info!(
            ?pruned,
            "history pruning yielded to new work; it goes on at the next interval"
        );
    } else if *pruned != Pruned::default() {
        tracing::info!(?pruned, "history past history.keep_days pruned");
    }
}

/// Logs a completed sweep, and says so when the bound dropped builds or cannot be met.
fn log(sweep: &Sweep, figures: &SweepFigures, max_bytes: Option<u64>) {
    tracing::info!(
        deleted_paths = figures.deleted_paths,
        freed_bytes = figures.freed_bytes,
        kept_bytes = figures.kept_bytes,
        roots = figures.roots,
        seconds = figures.seconds,
        undeletable_files = sweep.swept.failed,
        "cache swept"
    );
    if !sweep.plan.marked.dropped.is_empty() {
        tracing::warn!(builds = ?sweep.plan.marked.dropped, ?max_bytes, "cache sweep dropped the outputs of builds still wanted, oldest first, to stay under gc.max_bytes");
    }
    if figures.protected_over_bound {
        tracing::warn!(
            protected_bytes = sweep.plan.marked.protected_bytes,
            ?max_bytes,
            "live and pinned builds alone need more than gc.max_bytes: the bound cannot be met"
        );
    }
}
