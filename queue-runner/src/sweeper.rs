//! Garbage collection on a schedule: the binary cache, one sweep at a time, without stopping
//! service, then step logs past their time. A sweep reads its roots from the database, lists
//! and deletes on a blocking thread, and is recorded (`cache_sweeps`) and counted. Also the dry
//! run of `drover-queue-runner gc --dry-run`, which deletes nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use error_context::{Classify, Severity};
use tokio_util::sync::CancellationToken;

use crate::cache::gc::{self, Plan, Swept};
use crate::cache::{BinaryCache, CacheError};
use crate::config::GcPolicy;
use crate::db::retention::{self, Keep};
use crate::db::{self, DbError};
use crate::logs::LogStore;
use crate::metrics::{GcMetrics, SweepFigures};

/// Why a sweep did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The roots could not be read or the sweep recorded.
    #[error("garbage collection's database work failed")]
    Database(#[from] DbError),
    /// The cache directory could not be listed or a file deleted.
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

/// Sweeps one cache by one policy, and expires old logs.
#[derive(Debug, Clone)]
pub struct Sweeper {
    pool: db::Pool,
    cache: Arc<BinaryCache>,
    policy: GcPolicy,
    logs: Option<(LogStore, u32)>,
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
    /// A sweeper of `cache` by `policy`, deleting the logs in `logs` older than `log_keep_days`
    /// (0: none).
    #[must_use]
    pub fn new(
        pool: db::Pool,
        cache: Arc<BinaryCache>,
        policy: GcPolicy,
        (logs, log_keep_days): (LogStore, u32),
    ) -> Self {
        Self {
            pool,
            cache,
            policy,
            logs: (log_keep_days > 0).then_some((logs, log_keep_days)),
        }
    }

    /// Deletes the logs past their time, a batch at a time; returns how many.
    pub async fn expire_logs(&self) -> Result<u64, DbError> {
        let Some((logs, days)) = &self.logs else {
            return Ok(0);
        };
        let mut expired = 0;
        loop {
            let client = self.pool.get().await.map_err(DbError::Connection)?;
            let files = retention::expire_logs(&client, *days, LOG_BATCH).await?;
            drop(client);
            for file in &files {
                if let Err(error) = logs.delete(file) {
                    tracing::warn!(%file, %error, "an expired log could not be deleted");
                }
            }
            expired += u64::try_from(files.len()).unwrap_or(u64::MAX);
            if i64::try_from(files.len()).unwrap_or(i64::MAX) < LOG_BATCH {
                return Ok(expired);
            }
        }
    }

    /// Marks and deletes; records the sweep.
    pub async fn sweep(&self) -> Result<Sweep, SweepError> {
        let marks = Noting::begin(self.cache.clone());
        let started = SystemTime::now();
        let plan = self.mark(started).await?;
        let cache = self.cache.clone();
        let (plan, swept) = tokio::task::spawn_blocking(move || {
            let mut plan = plan;
            let swept = gc::sweep(&cache, &mut plan);
            (plan, swept)
        })
        .await
        .map_err(|error| SweepError::Thread(error.to_string()))?;
        drop(marks);
        let swept = swept?;
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        retention::record_sweep(&client, started, &plan, swept).await?;
        Ok(Sweep { plan, swept })
    }

    /// Reads the roots, lists the cache and marks what stays.
    async fn mark(&self, started: SystemTime) -> Result<Plan, SweepError> {
        mark(
            &self.pool,
            self.cache.directory().to_owned(),
            &self.policy,
            started,
        )
        .await
    }

    /// Sweeps every `interval` (the first one `interval` after start, so a runner restarted
    /// again and again does not sweep each time) until `shutdown`. A sweep that fails is logged and tried again
    /// at the next interval; only losing the database ends the runner.
    pub async fn run(
        self,
        interval: Duration,
        metrics: GcMetrics,
        shutdown: CancellationToken,
    ) -> Result<(), DbError> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
            let began = Instant::now();
            match self.sweep().await {
                Ok(sweep) => {
                    let figures = self.figures(&sweep, began);
                    metrics.swept(&figures);
                    log(&sweep, &figures, self.policy.max_bytes);
                }
                Err(SweepError::Database(error)) if error.severity() == Severity::Fatal => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::error!(error = %error_context::report(&error), "cache sweep failed; trying again at the next interval");
                }
            }
            match self.expire_logs().await {
                Ok(0) => {}
                Ok(expired) => tracing::info!(expired, "step logs past logs.keep_days deleted"),
                Err(error) if error.severity() == Severity::Fatal => return Err(error),
                Err(error) => {
                    tracing::error!(error = %error_context::report(&error), "expiring logs failed; trying again at the next interval");
                }
            }
        }
    }

    fn figures(&self, sweep: &Sweep, began: Instant) -> SweepFigures {
        SweepFigures {
            deleted_paths: sweep.swept.paths,
            freed_bytes: sweep.swept.bytes,
            seconds: began.elapsed().as_secs_f64(),
            roots: sweep.plan.roots,
            kept_bytes: sweep.plan.marked.kept_bytes,
            protected_over_bound: sweep.plan.marked.protected_over(self.policy.max_bytes),
        }
    }
}

/// Reads the roots, lists the cache in `directory` and marks what a sweep starting at
/// `started` keeps: what [`Sweeper::sweep`] does before it deletes, and all a dry run does.
pub async fn mark(
    pool: &db::Pool,
    directory: PathBuf,
    policy: &GcPolicy,
    started: SystemTime,
) -> Result<Plan, SweepError> {
    let client = pool.get().await.map_err(DbError::Connection)?;
    let keep = Keep {
        days: policy.keep_days,
        per_key: policy.keep_per_key,
        key: policy.key.as_deref(),
    };
    let roots = retention::cache_roots(&client, &keep).await?;
    drop(client);
    let (grace, max_bytes) = (policy.grace, policy.max_bytes);
    tokio::task::spawn_blocking(move || {
        gc::list(&directory).map(|listed| gc::plan(listed, &roots, started, grace, max_bytes))
    })
    .await
    .map_err(|error| SweepError::Thread(error.to_string()))?
    .map_err(SweepError::Cache)
}

/// Writes what a sweep would delete, one path a line (`PATH<TAB>NAR BYTES<TAB>WHY`), then a
/// summary line starting with `#`. `unbounded` is the same sweep without the size bound: a path
/// only it keeps goes because of the bound.
pub fn write_dry_run(
    bounded: &Plan,
    unbounded: &Plan,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let kept_unbounded: std::collections::HashSet<&nix_primitives::StorePath> = unbounded
        .listed
        .iter()
        .zip(&unbounded.marked.keep)
        .filter(|(_, keep)| **keep)
        .map(|(listed, _)| &listed.path)
        .collect();
    let (mut paths, mut bytes) = (0_u64, 0_u64);
    for listed in bounded.doomed() {
        let why = if kept_unbounded.contains(&listed.path) {
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
    let kept = bounded.marked.keep.iter().filter(|keep| **keep).count();
    writeln!(
        out,
        "# would delete {paths} paths ({bytes} NAR bytes); would keep {kept} paths ({} NAR bytes) for {} roots{}",
        bounded.marked.kept_bytes,
        bounded.roots,
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

/// Logs a completed sweep, and says so when the bound dropped builds or cannot be met.
fn log(sweep: &Sweep, figures: &SweepFigures, max_bytes: Option<u64>) {
    tracing::info!(
        deleted_paths = figures.deleted_paths,
        freed_bytes = figures.freed_bytes,
        kept_bytes = figures.kept_bytes,
        roots = figures.roots,
        seconds = figures.seconds,
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

/// Noting lookups for the length of a sweep, ended however the sweep ends.
struct Noting(Arc<BinaryCache>);

impl Noting {
    fn begin(cache: Arc<BinaryCache>) -> Self {
        cache.marks().begin();
        Self(cache)
    }
}

impl Drop for Noting {
    fn drop(&mut self) {
        self.0.marks().end();
    }
}
