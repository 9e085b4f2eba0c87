//! What history pruning asks the database: the finished builds old enough to go, the steps and
//! derivations no remaining build reaches, and the deletions, one short transaction per batch.
//! Times are seconds since the epoch, as the database's clock gives them.

use std::collections::HashSet;
use std::hash::BuildHasher;

use deadpool_postgres::GenericClient;
use drover_scheduler::history::FinishedBuild;

use super::DbError;

/// The database's clock, in seconds since the epoch.
pub async fn now(client: &impl GenericClient) -> Result<i64, DbError> {
    let row = client
        .query_one("SELECT extract(epoch FROM now())::bigint", &[])
        .await
        .map_err(DbError::query("reading the database's clock"))?;
    Ok(row.get(0))
}

/// The newest `per_key` succeeded builds of each value of metadata `key`: the cache keeps their
/// outputs, so their rows stay too.
pub async fn newest_of_key(
    client: &impl GenericClient,
    key: Option<&str>,
    per_key: u32,
) -> Result<HashSet<i64>, DbError> {
    let Some(key) = key else {
        return Ok(HashSet::new());
    };
    let rows = client
        .query(
            "SELECT id FROM (
                 SELECT id, row_number() OVER (PARTITION BY metadata ->> $1
                                               ORDER BY finished_at DESC) AS newest
                 FROM builds WHERE status = 'succeeded' AND metadata ? $1
             ) keyed WHERE newest <= $2",
            &[&key, &i64::from(per_key)],
        )
        .await
        .map_err(DbError::query("reading the newest builds of each key"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Up to `limit` builds finished before `cutoff`, after build `after`, in id order; those in
/// `newest_of_key` are marked so.
pub async fn finished_before<S: BuildHasher>(
    client: &impl GenericClient,
    cutoff: i64,
    newest_of_key: &HashSet<i64, S>,
    after: i64,
    limit: i64,
) -> Result<Vec<FinishedBuild>, DbError> {
    let rows = client
        .query(
            "SELECT id, extract(epoch FROM finished_at)::bigint, pinned_at IS NOT NULL
             FROM builds
             WHERE finished_at < to_timestamp($1::bigint) AND id > $2
             ORDER BY id LIMIT $3",
            &[&cutoff, &after, &limit],
        )
        .await
        .map_err(DbError::query("reading old finished builds"))?;
    Ok(rows
        .iter()
        .map(|row| FinishedBuild {
            id: row.get(0),
            finished_at: row.get(1),
            pinned: row.get(2),
            newest_of_key: newest_of_key.contains(&row.get(0)),
        })
        .collect())
}

/// Deletes the builds of `builds` still finished before `cutoff` and unpinned (a restart or a
/// pin since they were read keeps them), and the job sets left without a build; returns how
/// many builds went.
pub async fn delete_builds(
    client: &mut deadpool_postgres::Client,
    builds: &[i64],
    cutoff: i64,
) -> Result<u64, DbError> {
    let transaction = client
        .transaction()
        .await
        .map_err(DbError::query("starting to delete old builds"))?;
    let rows = transaction
        .query(
            "DELETE FROM builds
             WHERE id = ANY($1) AND finished_at < to_timestamp($2::bigint) AND pinned_at IS NULL
             RETURNING job_set_id",
            &[&builds, &cutoff],
        )
        .await
        .map_err(DbError::query("deleting old builds"))?;
    let job_sets: Vec<i64> = rows.iter().filter_map(|row| row.get(0)).collect();
    transaction
        .execute(
            "DELETE FROM job_sets j WHERE id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.job_set_id = j.id)",
            &[&job_sets],
        )
        .await
        .map_err(DbError::query("deleting emptied job sets"))?;
    transaction
        .commit()
        .await
        .map_err(DbError::query("committing deleted builds"))?;
    Ok(u64::try_from(rows.len()).unwrap_or(u64::MAX))
}

/// The steps that ended before `cutoff` which neither a remaining build (from its top-level
/// derivation's step, or the legacy `build_steps`) nor a step that stays (unfinished, or ended
/// since) reaches through `step_inputs`, newest first: a step's dependents have larger ids, so
/// deleting in this order leaves no edge naming a deleted step.
pub async fn unreachable_steps(
    client: &impl GenericClient,
    cutoff: i64,
) -> Result<Vec<i64>, DbError> {
    let rows = client
        .query(
            "WITH RECURSIVE reached(id) AS (
                 SELECT s.id FROM builds b JOIN steps s ON s.drv_path = b.drv_path
               UNION
                 SELECT step_id FROM build_steps
               UNION
                 SELECT id FROM steps
                 WHERE finished_at IS NULL OR finished_at >= to_timestamp($1::bigint)
               UNION
                 SELECT i.input_id FROM reached r JOIN step_inputs i ON i.step_id = r.id
             )
             SELECT s.id FROM steps s
             WHERE s.finished_at < to_timestamp($1::bigint)
               AND s.status NOT IN ('waiting', 'runnable', 'running')
               AND NOT EXISTS (SELECT 1 FROM reached r WHERE r.id = s.id)
             ORDER BY s.id DESC",
            &[&cutoff],
        )
        .await
        .map_err(DbError::query("finding steps no build reaches"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Deletes the steps of `steps` that are still ended before `cutoff` (a plan or restart since
/// they were found starts them again), with their attempts, outputs and edges; returns how many
/// steps went and their attempts' log files, to delete once this commits.
pub async fn delete_steps(
    client: &mut deadpool_postgres::Client,
    steps: &[i64],
    cutoff: i64,
) -> Result<(u64, Vec<String>), DbError> {
    let transaction = client
        .transaction()
        .await
        .map_err(DbError::query("starting to delete old steps"))?;
    let doomed: Vec<i64> = transaction
        .query(
            "SELECT id FROM steps
             WHERE id = ANY($1) AND finished_at < to_timestamp($2::bigint)
               AND status NOT IN ('waiting', 'runnable', 'running')
             FOR UPDATE",
            &[&steps, &cutoff],
        )
        .await
        .map_err(DbError::query("locking old steps"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let logs = transaction
        .query(
            "DELETE FROM step_attempts WHERE step_id = ANY($1) RETURNING log_file",
            &[&doomed],
        )
        .await
        .map_err(DbError::query("deleting old attempts"))?
        .iter()
        .filter_map(|row| row.get(0))
        .collect();
    for (statement, what) in [
        (
            "DELETE FROM step_outputs WHERE step_id = ANY($1)",
            "deleting old step outputs",
        ),
        (
            "DELETE FROM step_inputs WHERE step_id = ANY($1)",
            "deleting old step edges",
        ),
        ("DELETE FROM steps WHERE id = ANY($1)", "deleting old steps"),
    ] {
        transaction
            .execute(statement, &[&doomed])
            .await
            .map_err(DbError::query(what))?;
    }
    transaction
        .commit()
        .await
        .map_err(DbError::query("committing deleted steps"))?;
    Ok((u64::try_from(doomed.len()).unwrap_or(u64::MAX), logs))
}

/// Derivations last stored before `cutoff` that no step and no build names, and that no
/// remaining build's verified closure holds (a restarted build, or a runner restarted under an
/// unfinished one, loads its closure again).
pub async fn unreferenced_derivations(
    client: &impl GenericClient,
    cutoff: i64,
) -> Result<Vec<String>, DbError> {
    let rows = client
        .query(
            "WITH RECURSIVE kept(path) AS (
                 SELECT drv_path FROM builds
               UNION
                 SELECT unnest(v.input_derivations)
                 FROM kept k JOIN verified_derivations v ON v.path = k.path
             )
             SELECT d.path FROM derivations d
             WHERE d.created_at < to_timestamp($1::bigint)
               AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.drv_path = d.path)
               AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.drv_path = d.path)
               AND NOT EXISTS (SELECT 1 FROM kept k WHERE k.path = d.path)",
            &[&cutoff],
        )
        .await
        .map_err(DbError::query("finding derivations nothing names"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Deletes the derivations of `paths` still last stored before `cutoff` and named by no step
/// or build, unless a build queued with SQL waits to be planned (its closure is not verified
/// yet: the batch waits for the next interval; `Submit` and `SubmitJobSet` verify theirs before
/// they commit); returns how many went, or `None` if such a build waits.
pub async fn delete_derivations(
    client: &impl GenericClient,
    paths: &[String],
    cutoff: i64,
) -> Result<Option<u64>, DbError> {
    let waiting = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM builds
                            WHERE ingested_at IS NULL AND submitted_by IS NULL)",
            &[],
        )
        .await
        .map_err(DbError::query("looking for builds waiting to be planned"))?;
    if waiting.get(0) {
        return Ok(None);
    }
    let deleted = client
        .execute(
            "DELETE FROM derivations d
             WHERE path = ANY($1) AND created_at < to_timestamp($2::bigint)
               AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.drv_path = d.path)
               AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.drv_path = d.path)",
            &[&paths, &cutoff],
        )
        .await
        .map_err(DbError::query("deleting old derivations"))?;
    Ok(Some(deleted))
}

/// Deletes the records of cache sweeps that ended before `cutoff`; returns how many.
pub async fn delete_sweep_records(
    client: &impl GenericClient,
    cutoff: i64,
) -> Result<u64, DbError> {
    client
        .execute(
            "DELETE FROM cache_sweeps WHERE finished_at < to_timestamp($1::bigint)",
            &[&cutoff],
        )
        .await
        .map_err(DbError::query("deleting old cache sweep records"))
}
