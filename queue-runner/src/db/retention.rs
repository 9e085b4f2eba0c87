//! What garbage collection asks the database: the builds whose paths stay in the cache (live,
//! pinned, recent, newest of their key), pins, the record of each sweep, and step logs past
//! their time.

use deadpool_postgres::GenericClient;
use drover_scheduler::retention::RootKind;

use super::DbError;
use crate::cache::gc::{Plan, RootPaths, Swept};

/// Which finished builds stay.
#[derive(Debug, Clone)]
pub struct Keep<'a> {
    /// Builds finished within this many days.
    pub days: u32,
    /// The newest succeeded builds per value of `key`.
    pub per_key: u32,
    /// A metadata key (a jobset, a branch); `None`: no such rule.
    pub key: Option<&'a str>,
}

/// The outputs of finished builds still wanted (each build's top derivation's outputs; their
/// closure follows from the cache's references), one row per build, by the strongest reason:
/// pinned, then newest of its key (ranked among every succeeded build of the key, pinned ones
/// included), then recent.
const FINISHED_ROOTS: &str = "
    SELECT DISTINCT ON (b.id) b.id, r.kind, extract(epoch FROM b.finished_at)::bigint,
           v.output_paths
    FROM (
        SELECT id, 1 AS strength, 'pinned' AS kind FROM builds WHERE pinned_at IS NOT NULL
        UNION ALL
        SELECT id, 2, 'newest_of_key' FROM (
            SELECT id, row_number() OVER (PARTITION BY metadata ->> $3 ORDER BY finished_at DESC)
                AS newest
            FROM builds
            WHERE status = 'succeeded' AND $3::text IS NOT NULL AND metadata ? $3::text
        ) keyed WHERE newest <= $2
        UNION ALL
        SELECT id, 3, 'recent' FROM builds
         WHERE finished_at > now() - make_interval(days => $1)
    ) r
    JOIN builds b ON b.id = r.id AND b.finished_at IS NOT NULL
    JOIN verified_derivations v ON v.path = b.drv_path
    ORDER BY b.id, r.strength";

/// Everything queued or running builds need: the outputs and input sources of every
/// derivation of their closures.
const LIVE_PATHS: &str = "
    WITH RECURSIVE closure(path) AS (
        SELECT drv_path FROM builds WHERE status IN ('queued', 'running')
        UNION
        SELECT unnest(v.input_derivations)
        FROM closure c JOIN verified_derivations v ON v.path = c.path
    )
    SELECT DISTINCT unnest(v.output_paths || v.input_sources)
    FROM closure c JOIN verified_derivations v ON v.path = c.path";

/// The roots of a sweep.
pub async fn cache_roots(
    client: &impl GenericClient,
    keep: &Keep<'_>,
) -> Result<Vec<RootPaths>, DbError> {
    let per_key = i64::from(keep.per_key);
    let days = i32::try_from(keep.days).unwrap_or(i32::MAX);
    let rows = client
        .query(FINISHED_ROOTS, &[&days, &per_key, &keep.key])
        .await
        .map_err(DbError::query("reading the builds whose outputs stay"))?;
    let mut roots = Vec::with_capacity(rows.len() + 1);
    for row in rows {
        let kind = match row.get::<_, &str>(1) {
            "pinned" => RootKind::Pinned,
            "newest_of_key" => RootKind::NewestOfKey,
            _ => RootKind::Recent,
        };
        roots.push(RootPaths {
            build: Some(row.get(0)),
            kind,
            finished_at: row.get(2),
            paths: row.get(3),
        });
    }
    let live = client
        .query(LIVE_PATHS, &[])
        .await
        .map_err(DbError::query("reading what live builds need"))?;
    if !live.is_empty() {
        roots.push(RootPaths {
            build: None,
            kind: RootKind::Live,
            finished_at: None,
            paths: live.iter().map(|row| row.get(0)).collect(),
        });
    }
    Ok(roots)
}

/// Pins (or unpins) a build for `admin`; false when there is no such build.
pub async fn pin(
    client: &impl GenericClient,
    build: i64,
    pinned: bool,
    admin: &str,
) -> Result<bool, DbError> {
    let changed = client
        .execute(
            "UPDATE builds SET pinned_at = CASE WHEN $2 THEN coalesce(pinned_at, now()) END,
                               pinned_by = CASE WHEN $2 THEN coalesce(pinned_by, $3) END
             WHERE id = $1",
            &[&build, &pinned, &admin],
        )
        .await
        .map_err(DbError::query("pinning a build"))?;
    Ok(changed == 1)
}

/// Records a completed sweep.
pub async fn record_sweep(
    client: &impl GenericClient,
    started: std::time::SystemTime,
    plan: &Plan,
    swept: Swept,
) -> Result<(), DbError> {
    let kept = plan.kept();
    let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO cache_sweeps (started_at, roots, paths_kept, bytes_kept, paths_deleted,
                                       bytes_freed, dropped_builds, protected_bytes)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &started,
                &i32::try_from(plan.root_count).unwrap_or(i32::MAX),
                &i64::try_from(kept).unwrap_or(i64::MAX),
                &count(plan.marked.kept_bytes),
                &count(swept.paths),
                &count(swept.bytes),
                &plan.marked.dropped,
                &count(plan.marked.protected_bytes),
            ],
        )
        .await
        .map_err(DbError::query("recording a cache sweep"))?;
    Ok(())
}

/// Marks up to `batch` logs of attempts finished more than `days` days ago as expired, in one
/// short transaction; returns their files, to delete.
pub async fn expire_logs(
    client: &impl GenericClient,
    days: u32,
    batch: i64,
) -> Result<Vec<String>, DbError> {
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    let rows = client
        .query(
            "WITH expired AS (
                 SELECT id, log_file FROM step_attempts
                 WHERE log_file IS NOT NULL AND finished_at < now() - make_interval(days => $1)
                 LIMIT $2 FOR UPDATE SKIP LOCKED
             )
             UPDATE step_attempts a SET log_file = NULL, log_expired_at = now()
             FROM expired e WHERE a.id = e.id
             RETURNING e.log_file",
            &[&days, &batch],
        )
        .await
        .map_err(DbError::query("expiring old step logs"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// How long ago the last recorded sweep ended, if one did.
pub async fn since_last_sweep(
    client: &impl GenericClient,
) -> Result<Option<std::time::Duration>, DbError> {
    let row = client
        .query_one(
            "SELECT extract(epoch FROM now() - max(finished_at))::float8 FROM cache_sweeps",
            &[],
        )
        .await
        .map_err(DbError::query("reading when the cache was last swept"))?;
    Ok(row
        .get::<_, Option<f64>>(0)
        .and_then(|seconds| std::time::Duration::try_from_secs_f64(seconds.max(0.0)).ok()))
}
