//! The runner's statements outside the scheduler's batches (see [`super::transitions`]), one
//! function each: ingest, recovery, logs, submissions and reads.

use deadpool_postgres::GenericClient;

use drover_scheduler::durations::{DurationKey, Learned};

use super::DbError;
use super::snapshot::Snapshot;
use super::status::{BuildStatus, SqlEnum as _, StepStatus};

/// A build the runner has to expand into steps.
#[derive(Debug, Clone)]
pub struct QueuedBuild {
    /// Build id.
    pub id: i64,
    /// Its top-level derivation.
    pub drv_path: String,
    /// Its priority.
    pub priority: i32,
    /// Its global priority, set by administrators.
    pub global_priority: i32,
    /// Whether it builds what it can after a step failed.
    pub keep_going: bool,
    /// The job set that queued it, if one did.
    pub job_set: Option<i64>,
    /// The trace context of its Submit; empty if none.
    pub trace_parent: String,
}

/// Which builds to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildSelection {
    /// Builds nobody has expanded yet (`ingested_at IS NULL`).
    NotIngested,
    /// Every unfinished build: what a starting runner must rebuild its graph from.
    Unfinished,
}

/// Loads up to `limit` builds with ids above `after`, oldest first.
pub async fn queued_builds(
    client: &impl GenericClient,
    selection: BuildSelection,
    after: i64,
    limit: i64,
) -> Result<Vec<QueuedBuild>, DbError> {
    let sql = match selection {
        BuildSelection::NotIngested => {
            "SELECT id, drv_path, priority, global_priority, keep_going, job_set_id, trace_parent
             FROM builds WHERE ingested_at IS NULL AND id > $1 ORDER BY id LIMIT $2"
        }
        BuildSelection::Unfinished => {
            "SELECT id, drv_path, priority, global_priority, keep_going, job_set_id, trace_parent
             FROM builds WHERE finished_at IS NULL AND id > $1 ORDER BY id LIMIT $2"
        }
    };
    let rows = client
        .query(sql, &[&after, &limit])
        .await
        .map_err(DbError::query("loading queued builds"))?;
    Ok(rows
        .iter()
        .map(|row| QueuedBuild {
            id: row.get(0),
            drv_path: row.get(1),
            priority: row.get(2),
            global_priority: row.get(3),
            keep_going: row.get(4),
            job_set: row.get(5),
            trace_parent: row.get(6),
        })
        .collect())
}

/// Each superseding job set whose builds are all planned and which has not superseded yet, with
/// the unfinished builds of the older job sets of its series and submitter, oldest first.
pub async fn superseded_builds(
    client: &impl GenericClient,
) -> Result<Vec<(i64, Vec<i64>)>, DbError> {
    let rows = client
        .query(
            "SELECT j.id, coalesce(array_agg(b.id ORDER BY b.id) FILTER (WHERE b.id IS NOT NULL),
                                   '{}')
             FROM job_sets j
             LEFT JOIN job_sets older ON older.series = j.series
                 AND older.submitted_by = j.submitted_by AND older.id < j.id
             LEFT JOIN builds b ON b.job_set_id = older.id AND b.finished_at IS NULL
             WHERE j.supersede AND j.superseded_older_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM builds n
                               WHERE n.job_set_id = j.id AND n.ingested_at IS NULL)
             GROUP BY j.id ORDER BY j.id",
            &[],
        )
        .await
        .map_err(DbError::query("finding superseded job sets"))?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Records that a job set has superseded the older ones of its series.
pub async fn mark_superseded(client: &impl GenericClient, job_set: i64) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE job_sets SET superseded_older_at = now() WHERE id = $1",
            &[&job_set],
        )
        .await
        .map_err(DbError::query("recording a superseding job set"))?;
    Ok(())
}

/// The texts of the given derivations that are stored.
pub async fn derivation_texts(
    client: &impl GenericClient,
    paths: &[String],
) -> Result<Vec<(String, Vec<u8>)>, DbError> {
    let rows = client
        .query(
            "SELECT path, text FROM derivations WHERE path = ANY($1)",
            &[&paths],
        )
        .await
        .map_err(DbError::query("loading derivations"))?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The texts of the derivations of steps being dispatched, with the trace each step continues.
pub async fn dispatch_texts(
    client: &impl GenericClient,
    paths: &[String],
) -> Result<Vec<(String, DispatchText)>, DbError> {
    let rows = client
        .query(
            "SELECT d.path, d.text, coalesce(s.trace_parent, '')
             FROM derivations d LEFT JOIN steps s ON s.drv_path = d.path
             WHERE d.path = ANY($1)",
            &[&paths],
        )
        .await
        .map_err(DbError::query("loading the derivations to dispatch"))?;
    Ok(rows
        .iter()
        .map(|row| {
            let text = DispatchText {
                text: row.get(1),
                trace_parent: row.get(2),
            };
            (row.get(0), text)
        })
        .collect())
}

/// What a Build message needs of a step's row: its derivation's text, and the trace it
/// continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchText {
    /// The derivation's exact bytes.
    pub text: Vec<u8>,
    /// The trace context of the plan that created the step; empty if none.
    pub trace_parent: String,
}

/// A step row as created or found.
#[derive(Debug, Clone)]
pub struct StepRow {
    /// Step id.
    pub id: i64,
    /// Its derivation.
    pub drv_path: String,
    /// Its status.
    pub status: StepStatus,
    /// Builder losses it survived.
    pub builder_losses: u32,
    /// Infrastructure failures it survived.
    pub infrastructure_failures: u32,
    /// How long it is still held back (`visible_after` in the future), if at all.
    pub visible_in: Option<std::time::Duration>,
    /// Whether this call created it.
    pub created: bool,
}

/// A step to create if it does not exist.
#[derive(Debug, Clone)]
pub struct StepSpec {
    /// The derivation.
    pub drv_path: String,
    /// Its system.
    pub system: String,
    /// Its required features, space-separated.
    pub features: String,
    /// The trace context of the plan that creates it; empty if none.
    pub trace_parent: String,
}

/// The columns a [`StepRow`] is read from, after `id, drv_path`.
const STEP_ROW: &str = "status::text, builder_losses, infrastructure_failures,
     (extract(epoch FROM visible_after - now()) * 1000)::bigint";

/// A [`StepRow`] from a row of `SELECT id, drv_path, STEP_ROW, created`.
fn step_row(row: &tokio_postgres::Row) -> Result<StepRow, DbError> {
    let count = |value: i32| u32::try_from(value).unwrap_or(0);
    let label: String = row.get(2);
    Ok(StepRow {
        id: row.get(0),
        drv_path: row.get(1),
        status: StepStatus::from_label(&label).ok_or(DbError::UnknownStatus {
            sql_type: StepStatus::SQL_TYPE,
            label,
        })?,
        builder_losses: count(row.get(3)),
        infrastructure_failures: count(row.get(4)),
        visible_in: row
            .get::<_, Option<i64>>(5)
            .and_then(|milliseconds| u64::try_from(milliseconds).ok())
            .filter(|milliseconds| *milliseconds > 0)
            .map(std::time::Duration::from_millis),
        created: row.get(6),
    })
}

/// The steps that exist for the given derivations.
pub async fn existing_steps(
    client: &impl GenericClient,
    paths: &[String],
) -> Result<Vec<StepRow>, DbError> {
    let rows = client
        .query(
            &format!("SELECT id, drv_path, {STEP_ROW}, false FROM steps WHERE drv_path = ANY($1)"),
            &[&paths],
        )
        .await
        .map_err(DbError::query("reading steps"))?;
    rows.iter().map(step_row).collect()
}

/// Creates the steps that do not exist yet and returns every one, new or old, with its status.
pub async fn ensure_steps(
    client: &impl GenericClient,
    specs: &[StepSpec],
) -> Result<Vec<StepRow>, DbError> {
    let paths: Vec<&str> = specs.iter().map(|s| s.drv_path.as_str()).collect();
    let systems: Vec<&str> = specs.iter().map(|s| s.system.as_str()).collect();
    let features: Vec<&str> = specs.iter().map(|s| s.features.as_str()).collect();
    let traces: Vec<&str> = specs.iter().map(|s| s.trace_parent.as_str()).collect();
    // `xmax = 0` tells a row this statement inserted from one it only touched.
    let rows = client
        .query(
            &format!(
                "INSERT INTO steps (drv_path, status, system, required_features, trace_parent)
                 SELECT path, 'waiting', system, string_to_array(features, ' '), trace
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                      AS s(path, system, features, trace)
                 ON CONFLICT (drv_path) DO UPDATE SET drv_path = EXCLUDED.drv_path
                 RETURNING id, drv_path, {STEP_ROW}, xmax = 0"
            ),
            &[&paths, &systems, &features, &traces],
        )
        .await
        .map_err(DbError::query("creating steps"))?;
    rows.iter().map(step_row).collect()
}

/// Records the edges of new steps: (step, the step building one of its inputs).
pub async fn record_step_inputs(
    client: &impl GenericClient,
    edges: &[(i64, i64)],
) -> Result<(), DbError> {
    let steps: Vec<i64> = edges.iter().map(|(step, _)| *step).collect();
    let inputs: Vec<i64> = edges.iter().map(|(_, input)| *input).collect();
    client
        .execute(
            "INSERT INTO step_inputs (step_id, input_id)
             SELECT * FROM unnest($1::bigint[], $2::bigint[]) ON CONFLICT DO NOTHING",
            &[&steps, &inputs],
        )
        .await
        .map_err(DbError::query("recording step inputs"))?;
    Ok(())
}

/// Marks builds planned (keeping the time of a first planning, so a runner restart does not
/// change which steps they needed); steps done without building (their outputs were already in
/// a cache) succeed, steps that start again after ending for good in an earlier life get fresh
/// counters, and steps that can never run because an input failed earlier end `dep_failed`. The
/// scheduler core sets the other statuses.
pub async fn record_ingested_builds(
    client: &impl GenericClient,
    builds: &[i64],
    substituted_steps: &[i64],
    fresh_steps: &[i64],
    dep_failed_steps: &[i64],
) -> Result<(), DbError> {
    client
        .execute(
            "WITH substituted AS (
                 UPDATE steps SET status = 'succeeded', finished_at = now(), failure_reason = NULL
                 WHERE id = ANY($2)),
             fresh AS (
                 UPDATE steps SET builder_losses = 0, infrastructure_failures = 0
                 WHERE id = ANY($3)),
             dep_failed AS (
                 UPDATE steps SET status = 'dep_failed', finished_at = now(),
                     failure_reason = 'a dependency failed in an earlier build'
                 WHERE id = ANY($4))
             UPDATE builds SET ingested_at = coalesce(ingested_at, now()) WHERE id = ANY($1)",
            &[&builds, &substituted_steps, &fresh_steps, &dep_failed_steps],
        )
        .await
        .map_err(DbError::query("recording ingested builds"))?;
    Ok(())
}

/// Records the outputs of steps that were done without building (their outputs were already in
/// a cache), so builds report them like built ones.
pub async fn record_substituted_outputs(
    client: &impl GenericClient,
    outputs: &[(i64, String, String)],
) -> Result<(), DbError> {
    let steps: Vec<i64> = outputs.iter().map(|(step, _, _)| *step).collect();
    let names: Vec<&str> = outputs.iter().map(|(_, name, _)| name.as_str()).collect();
    let paths: Vec<&str> = outputs.iter().map(|(_, _, path)| path.as_str()).collect();
    client
        .execute(
            "INSERT INTO step_outputs (step_id, output_name, path)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            &[&steps, &names, &paths],
        )
        .await
        .map_err(DbError::query("recording substituted outputs"))?;
    Ok(())
}

/// Where the failure of a step that failed on its own comes from: the oldest build it failed
/// (if recorded) and the failure's reason.
pub async fn failure_origin(
    client: &impl GenericClient,
    step: i64,
) -> Result<(Option<i64>, Option<String>), DbError> {
    let row = client
        .query_one(
            "SELECT failed_build_id, failure_reason FROM steps WHERE id = $1",
            &[&step],
        )
        .await
        .map_err(DbError::query("finding where a failure comes from"))?;
    Ok((row.get(0), row.get(1)))
}

/// Ends a build with a terminal status and a reason.
pub async fn finish_build(
    client: &impl GenericClient,
    build: i64,
    status: BuildStatus,
    reason: Option<&str>,
) -> Result<(), DbError> {
    finish_builds(client, &[(build, status, reason.map(str::to_owned))]).await
}

/// Ends builds, each with a terminal status and a reason.
pub async fn finish_builds(
    client: &impl GenericClient,
    builds: &[(i64, BuildStatus, Option<String>)],
) -> Result<(), DbError> {
    let ids: Vec<i64> = builds.iter().map(|(id, _, _)| *id).collect();
    let statuses: Vec<&str> = builds
        .iter()
        .map(|(_, status, _)| status.as_str())
        .collect();
    let reasons: Vec<Option<&str>> = builds
        .iter()
        .map(|(_, _, reason)| reason.as_deref())
        .collect();
    client
        .execute(
            "UPDATE builds b SET status = f.status::build_status, finished_at = now(),
                 ingested_at = coalesce(b.ingested_at, now()), failure_reason = f.reason
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(id, status, reason)
             WHERE b.id = f.id",
            &[&ids, &statuses, &reasons],
        )
        .await
        .map_err(DbError::query("finishing builds"))?;
    Ok(())
}

/// Attempts a previous runner process left running, as (attempt, step, builder): the core waits
/// for their builders to claim them. Every builder is marked disconnected until it joins again.
pub async fn orphaned_attempts(
    client: &impl GenericClient,
) -> Result<Vec<(uuid::Uuid, i64, String)>, DbError> {
    client
        .execute("UPDATE machines SET connected = false WHERE connected", &[])
        .await
        .map_err(DbError::query("marking builders disconnected"))?;
    let rows = client
        .query(
            "SELECT id, step_id, machine FROM step_attempts WHERE status = 'running'",
            &[],
        )
        .await
        .map_err(DbError::query("reading the attempts left running"))?;
    Ok(rows
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect())
}

/// What every builder that ever joined offered at its latest join.
pub async fn known_machines(
    client: &impl GenericClient,
) -> Result<Vec<drover_scheduler::Capabilities>, DbError> {
    let rows = client
        .query(
            "SELECT systems, supported_features, mandatory_features, max_jobs, speed_factor
             FROM machines",
            &[],
        )
        .await
        .map_err(DbError::query("reading the builders that joined before"))?;
    let set = |values: Vec<String>| values.into_iter().collect();
    Ok(rows
        .into_iter()
        .map(|row| drover_scheduler::Capabilities {
            systems: set(row.get(0)),
            supported_features: set(row.get(1)),
            mandatory_features: set(row.get(2)),
            max_jobs: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
            speed_factor: row.get(4),
        })
        .collect())
}

/// The step building `drv_path`, if there is one: whether it is still to end, and its latest
/// attempt.
pub async fn latest_attempt(
    client: &impl GenericClient,
    drv_path: &str,
) -> Result<Option<StepAttempts>, DbError> {
    let row = client
        .query_opt(
            "SELECT s.finished_at IS NULL, a.id, a.status = 'running', a.log_file
             FROM steps s
             LEFT JOIN LATERAL (
                 SELECT id, status, log_file FROM step_attempts
                 WHERE step_id = s.id ORDER BY started_at DESC LIMIT 1
             ) a ON true
             WHERE s.drv_path = $1",
            &[&drv_path],
        )
        .await
        .map_err(DbError::query("finding the latest attempt"))?;
    Ok(row.map(|row| StepAttempts {
        unfinished: row.get(0),
        latest: row
            .get::<_, Option<uuid::Uuid>>(1)
            .map(|attempt| (attempt, row.get(2), row.get(3))),
    }))
}

/// Whether a step is still to end, and its latest attempt, if it had one: (id, whether it runs,
/// its log file).
#[derive(Debug, Clone)]
pub struct StepAttempts {
    /// The step has not ended.
    pub unfinished: bool,
    /// Its latest attempt.
    pub latest: Option<(uuid::Uuid, bool, Option<String>)>,
}

/// The log file of an attempt.
pub async fn attempt_log_file(
    client: &impl GenericClient,
    attempt: uuid::Uuid,
) -> Result<Option<String>, DbError> {
    let row = client
        .query_opt(
            "SELECT log_file FROM step_attempts WHERE id = $1",
            &[&attempt],
        )
        .await
        .map_err(DbError::query("finding an attempt's log"))?;
    Ok(row.and_then(|row| row.get(0)))
}

/// The log of the latest attempt with one of the step building `drv_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatestLog {
    /// The attempt and its log file.
    Kept(uuid::Uuid, String),
    /// Its log was deleted for its age (`[logs] keep_days`), on this day (UTC, YYYY-MM-DD).
    Expired(String),
}

/// The log of the latest attempt of the step building `drv_path` that has or had one.
pub async fn latest_log_file(
    client: &impl GenericClient,
    drv_path: &str,
) -> Result<Option<LatestLog>, DbError> {
    let row = client
        .query_opt(
            "SELECT a.id, a.log_file,
                    to_char(a.log_expired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
             FROM step_attempts a JOIN steps s ON s.id = a.step_id
             WHERE s.drv_path = $1 AND (a.log_file IS NOT NULL OR a.log_expired_at IS NOT NULL)
             ORDER BY a.started_at DESC LIMIT 1",
            &[&drv_path],
        )
        .await
        .map_err(DbError::query("finding a log"))?;
    Ok(
        row.map(|row| match (row.get(1), row.get::<_, Option<String>>(2)) {
            (Some(file), _) => LatestLog::Kept(row.get(0), file),
            (None, expired) => LatestLog::Expired(expired.unwrap_or_default()),
        }),
    )
}

/// A build as submitted.
#[derive(Debug, Clone)]
pub struct NewBuild<'a> {
    /// Its top-level derivation.
    pub top: &'a str,
    /// Its priority.
    pub priority: i32,
    /// Its metadata.
    pub metadata: &'a serde_json::Value,
    /// Who submitted it.
    pub submitted_by: &'a str,
    /// Whether it builds what it can after a step failed.
    pub keep_going: bool,
    /// The submitter's key that makes a retried Submit return this build.
    pub idempotency_key: Option<&'a str>,
    /// The trace context of the Submit; empty if none.
    pub trace_parent: &'a str,
}

/// The build a submitter queued earlier with an idempotency key, if any.
pub async fn build_with_key(
    client: &impl GenericClient,
    submitted_by: &str,
    key: &str,
) -> Result<Option<i64>, DbError> {
    let row = client
        .query_opt(
            "SELECT id FROM builds WHERE submitted_by = $1 AND idempotency_key = $2",
            &[&submitted_by, &key],
        )
        .await
        .map_err(DbError::query("looking up an idempotency key"))?;
    Ok(row.map(|row| row.get(0)))
}

/// Stores new derivations and queues a build, in the caller's transaction; returns its id and
/// whether its idempotency key named an earlier build instead (then nothing was queued).
pub async fn insert_build(
    client: &impl GenericClient,
    derivations: &[(String, Vec<u8>)],
    build: &NewBuild<'_>,
) -> Result<(i64, bool), DbError> {
    store_derivations(client, derivations).await?;
    let row = client
        .query_opt(
            "INSERT INTO builds (drv_path, priority, metadata, submitted_by, keep_going,
                 idempotency_key, trace_parent)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (submitted_by, idempotency_key) WHERE idempotency_key IS NOT NULL
             DO NOTHING RETURNING id",
            &[
                &build.top,
                &build.priority,
                build.metadata,
                &build.submitted_by,
                &build.keep_going,
                &build.idempotency_key,
                &build.trace_parent,
            ],
        )
        .await
        .map_err(DbError::query("queueing a build"))?;
    if let Some(row) = row {
        return Ok((row.get(0), false));
    }
    // Another Submit with the same key committed first.
    let key = build.idempotency_key.unwrap_or_default();
    let existing = build_with_key(client, build.submitted_by, key)
        .await?
        .ok_or(DbError::Missing(
            "the build an idempotency key conflicted with",
        ))?;
    Ok((existing, true))
}

/// Stores derivations the farm does not have yet, and marks those it has as stored again (at
/// most once a day, so a job set staged again and again does not rewrite them): history
/// pruning keeps what was stored within its days. Returns how many were new.
pub async fn store_derivations(
    client: &impl GenericClient,
    derivations: &[(String, Vec<u8>)],
) -> Result<u64, DbError> {
    // A row may be updated once per statement: each path goes in once. In path order, so two
    // submissions lock the rows they share in the same order and never deadlock.
    let mut sorted: Vec<(&str, &[u8])> = derivations
        .iter()
        .map(|(path, text)| (path.as_str(), text.as_slice()))
        .collect();
    sorted.sort_unstable_by_key(|(path, _)| *path);
    sorted.dedup_by_key(|(path, _)| *path);
    let (paths, texts): (Vec<&str>, Vec<&[u8]>) = sorted.into_iter().unzip();
    let row = client
        .query_one(
            "WITH stored AS (
                 INSERT INTO derivations (path, text)
                 SELECT * FROM unnest($1::text[], $2::bytea[])
                 ON CONFLICT (path) DO UPDATE SET created_at = now()
                 WHERE derivations.created_at < now() - interval '1 day'
                 RETURNING xmax = 0 AS new
             )
             SELECT count(*) FILTER (WHERE new) FROM stored",
            &[&paths, &texts],
        )
        .await
        .map_err(DbError::query("storing derivations"))?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// A job set as submitted.
#[derive(Debug, Clone)]
pub struct NewJobSet<'a> {
    /// Its jobs, as (name, top-level derivation).
    pub jobs: &'a [(String, String)],
    /// The priority of every build.
    pub priority: i32,
    /// The metadata of every build.
    pub metadata: &'a serde_json::Value,
    /// Who submitted it.
    pub submitted_by: &'a str,
    /// Whether its builds build what they can after a step failed.
    pub keep_going: bool,
    /// The submitter's key that makes a retried submission return this job set.
    pub idempotency_key: Option<&'a str>,
    /// What it is an evaluation of.
    pub series: Option<&'a str>,
    /// Whether it supersedes the older job sets of its series.
    pub supersede: bool,
    /// The trace context of the submission; empty if none.
    pub trace_parent: &'a str,
}

/// The job set a submitter queued earlier with an idempotency key, with its builds as
/// (job name, build id) in the order they were queued.
pub async fn job_set_with_key(
    client: &impl GenericClient,
    submitted_by: &str,
    key: &str,
) -> Result<Option<(i64, Vec<(String, i64)>)>, DbError> {
    let Some(row) = client
        .query_opt(
            "SELECT id FROM job_sets WHERE submitted_by = $1 AND idempotency_key = $2",
            &[&submitted_by, &key],
        )
        .await
        .map_err(DbError::query("looking up a job set's idempotency key"))?
    else {
        return Ok(None);
    };
    let id: i64 = row.get(0);
    let builds = client
        .query(
            "SELECT job_name, id FROM builds WHERE job_set_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .map_err(DbError::query("reading a job set's builds"))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    Ok(Some((id, builds)))
}

/// Queues a job set and one build per job, in the caller's transaction; returns its id and
/// builds as (job name, build id), and whether its idempotency key named an earlier job set
/// instead (then nothing was queued). Its derivations must be stored already.
pub async fn insert_job_set(
    client: &impl GenericClient,
    job_set: &NewJobSet<'_>,
) -> Result<(i64, Vec<(String, i64)>, bool), DbError> {
    let row = client
        .query_opt(
            "INSERT INTO job_sets (series, supersede, submitted_by, idempotency_key)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (submitted_by, idempotency_key) WHERE idempotency_key IS NOT NULL
             DO NOTHING RETURNING id",
            &[
                &job_set.series,
                &job_set.supersede,
                &job_set.submitted_by,
                &job_set.idempotency_key,
            ],
        )
        .await
        .map_err(DbError::query("queueing a job set"))?;
    let Some(row) = row else {
        // Another submission with the same key committed first.
        let key = job_set.idempotency_key.unwrap_or_default();
        let (id, builds) = job_set_with_key(client, job_set.submitted_by, key)
            .await?
            .ok_or(DbError::Missing(
                "the job set an idempotency key conflicted with",
            ))?;
        return Ok((id, builds, true));
    };
    let id: i64 = row.get(0);
    let names: Vec<&str> = job_set.jobs.iter().map(|(name, _)| name.as_str()).collect();
    let tops: Vec<&str> = job_set.jobs.iter().map(|(_, top)| top.as_str()).collect();
    let builds = client
        .query(
            "INSERT INTO builds (drv_path, priority, metadata, submitted_by, keep_going,
                 job_set_id, job_name, trace_parent)
             SELECT top, $3, $4, $5, $6, $7, name, $8
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS j(name, top, position)
             ORDER BY position
             RETURNING job_name, id",
            &[
                &names,
                &tops,
                &job_set.priority,
                job_set.metadata,
                &job_set.submitted_by,
                &job_set.keep_going,
                &id,
                &job_set.trace_parent,
            ],
        )
        .await
        .map_err(DbError::query("queueing a job set's builds"))?;
    let mut builds: Vec<(String, i64)> =
        builds.iter().map(|row| (row.get(0), row.get(1))).collect();
    builds.sort_by_key(|(_, build)| *build);
    Ok((id, builds, false))
}

/// Sets the admission cap (`farm_limits.max_queued_steps`); returns the one it replaces and how
/// many steps wait or are runnable now.
pub async fn set_admission_cap(
    client: &impl GenericClient,
    max_queued_steps: i32,
) -> Result<(i32, i64), DbError> {
    let row = client
        .query_one(
            "UPDATE farm_limits f SET max_queued_steps = $1
             FROM (SELECT max_queued_steps FROM farm_limits) AS previous
             RETURNING previous.max_queued_steps,
                       (SELECT count(*) FROM steps WHERE status IN ('waiting', 'runnable'))",
            &[&max_queued_steps],
        )
        .await
        .map_err(DbError::query("setting the admission cap"))?;
    Ok((row.get(0), row.get(1)))
}

/// How many steps wait or are runnable, and the admission cap on them (`farm_limits`).
pub async fn queued_steps_and_cap(client: &impl GenericClient) -> Result<(i64, i64), DbError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM steps WHERE status IN ('waiting', 'runnable')),
                    (SELECT max_queued_steps::bigint FROM farm_limits)",
            &[],
        )
        .await
        .map_err(DbError::query("reading the admission cap"))?;
    Ok((row.get(0), row.get::<_, Option<i64>>(1).unwrap_or(i64::MAX)))
}

/// One step of a build as clients see it.
#[derive(Debug, Clone)]
pub struct StepStateRow {
    /// Step id.
    pub id: i64,
    /// Its derivation.
    pub drv_path: String,
    /// Its status; `None` for a label this runner does not know (a newer one's migration).
    pub status: Option<StepStatus>,
    /// Why it waits, if it does.
    pub waiting_reason: String,
    /// The builder of its latest attempt, if it had one.
    pub builder: String,
    /// Why it ended without success, if it did.
    pub failure_reason: String,
    /// When its latest attempt started and ended, in Unix milliseconds.
    pub attempt_ms: (Option<i64>, Option<i64>),
}

/// The steps a build needed when it was planned, by id, with why each unfinished one waits.
pub async fn build_steps(
    client: &impl GenericClient,
    build: i64,
) -> Result<Vec<StepStateRow>, DbError> {
    let rows = client
        .query(
            "SELECT s.id, s.drv_path, s.status::text, coalesce(w.reason, ''),
                    coalesce(a.machine, ''), coalesce(s.failure_reason, ''),
                    (extract(epoch FROM a.started_at) * 1000)::bigint,
                    (extract(epoch FROM a.finished_at) * 1000)::bigint
             FROM steps_of_build($1) b
             JOIN steps s ON s.id = b.step_id
             LEFT JOIN step_waiting_reasons w ON w.step_id = s.id
             LEFT JOIN LATERAL (
                 SELECT machine, started_at, finished_at FROM step_attempts
                 WHERE step_id = s.id ORDER BY started_at DESC LIMIT 1
             ) a ON true
             ORDER BY s.id",
            &[&build],
        )
        .await
        .map_err(DbError::query("reading a build's steps"))?;
    Ok(rows
        .iter()
        .map(|row| StepStateRow {
            id: row.get(0),
            drv_path: row.get(1),
            status: StepStatus::from_label(row.get(2)),
            waiting_reason: row.get(3),
            builder: row.get(4),
            failure_reason: row.get(5),
            attempt_ms: (row.get(6), row.get(7)),
        })
        .collect())
}

/// Which builds [`list_builds`] returns.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    /// Statuses to keep (empty: any).
    pub statuses: Vec<BuildStatus>,
    /// Metadata every build must contain (a JSON object).
    pub metadata: serde_json::Value,
    /// Submitted at or after, in Unix milliseconds.
    pub submitted_after_ms: Option<i64>,
    /// Submitted before, in Unix milliseconds.
    pub submitted_before_ms: Option<i64>,
    /// Only builds with a smaller id (the page cursor).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// A build in a list.
#[derive(Debug, Clone)]
pub struct BuildSummaryRow {
    /// Build id.
    pub id: i64,
    /// Its status; `None` for a label this runner does not know (a newer one's migration).
    pub status: Option<BuildStatus>,
    /// Its top-level derivation.
    pub drv_path: String,
    /// Its metadata.
    pub metadata: serde_json::Value,
    /// When it was queued, in Unix milliseconds.
    pub submitted_at_ms: i64,
    /// When it ended, in Unix milliseconds.
    pub finished_at_ms: Option<i64>,
    /// Why it failed.
    pub failure_reason: Option<String>,
}

/// Builds matching `filter`, newest first.
pub async fn list_builds(
    client: &impl GenericClient,
    filter: &BuildFilter,
) -> Result<Vec<BuildSummaryRow>, DbError> {
    let rows = client
        .query(
            "SELECT id, status::text, drv_path, metadata,
                    (extract(epoch FROM submitted_at) * 1000)::bigint,
                    (extract(epoch FROM finished_at) * 1000)::bigint,
                    failure_reason
             FROM builds
             WHERE (cardinality($1::text[]) = 0 OR status::text = ANY ($1))
               AND metadata @> $2
               AND ($3::bigint IS NULL OR submitted_at >= to_timestamp($3 / 1000.0))
               AND ($4::bigint IS NULL OR submitted_at < to_timestamp($4 / 1000.0))
               AND ($5::bigint IS NULL OR id < $5)
             ORDER BY id DESC
             LIMIT $6",
            &[
                &filter
                    .statuses
                    .iter()
                    .map(|status| status.as_str())
                    .collect::<Vec<_>>(),
                &filter.metadata,
                &filter.submitted_after_ms,
                &filter.submitted_before_ms,
                &filter.before_id,
                &filter.limit,
            ],
        )
        .await
        .map_err(DbError::query("listing builds"))?;
    Ok(rows
        .iter()
        .map(|row| BuildSummaryRow {
            id: row.get(0),
            status: BuildStatus::from_label(row.get(1)),
            drv_path: row.get(2),
            metadata: row.get(3),
            submitted_at_ms: row.get(4),
            finished_at_ms: row.get(5),
            failure_reason: row.get(6),
        })
        .collect())
}

/// Who submitted a build, and whether it has ended; `None` if there is no such build.
pub async fn build_owner(
    client: &impl GenericClient,
    build: i64,
) -> Result<Option<(Option<String>, BuildStatus)>, DbError> {
    let row = client
        .query_opt(
            "SELECT submitted_by, status::text FROM builds WHERE id = $1",
            &[&build],
        )
        .await
        .map_err(DbError::query("reading a build's owner"))?;
    row.map(|row| Ok((row.get(0), known_build_status(row.get(1))?)))
        .transpose()
}

/// A build status read as text, refused if this version does not know it.
fn known_build_status(label: String) -> Result<BuildStatus, DbError> {
    BuildStatus::from_label(&label).ok_or(DbError::UnknownStatus {
        sql_type: BuildStatus::SQL_TYPE,
        label,
    })
}

/// Sets the global priority of `build` unless it has ended; returns its status, `None` if
/// there is no such build.
pub async fn set_global_priority(
    client: &impl GenericClient,
    build: i64,
    priority: i32,
) -> Result<Option<BuildStatus>, DbError> {
    let row = client
        .query_opt(
            "UPDATE builds
             SET global_priority = CASE WHEN finished_at IS NULL THEN $2 ELSE global_priority END
             WHERE id = $1
             RETURNING status::text",
            &[&build, &priority],
        )
        .await
        .map_err(DbError::query("setting a build's global priority"))?;
    row.map(|row| known_build_status(row.get(0))).transpose()
}

/// The builds that ended `dep_failed` or `cached_failure` because a step failed in `build`.
pub async fn builds_failed_by(
    client: &impl GenericClient,
    build: i64,
) -> Result<Vec<i64>, DbError> {
    let rows = client
        .query(
            "SELECT b.id FROM builds b
             WHERE b.status IN ('dep_failed', 'cached_failure') AND b.id <> $1
               AND EXISTS (SELECT 1 FROM steps_of_build(b.id) needed
                           JOIN steps s ON s.id = needed.step_id
                           WHERE s.failed_build_id = $1)
             ORDER BY b.id",
            &[&build],
        )
        .await
        .map_err(DbError::query("finding the builds a failure ended"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Queues ended builds again, in one transaction: the steps of their closures that did not
/// succeed start over (cleared failures, counters and holds), and ingest is woken. Returns the
/// builds queued again, in order; none if the first had not ended in failure or cancellation.
pub async fn restart_builds(
    client: &mut deadpool_postgres::Client,
    builds: &[i64],
) -> Result<Vec<i64>, DbError> {
    let transaction = client
        .transaction()
        .await
        .map_err(DbError::query("starting a restart"))?;
    let mut restarted = Vec::new();
    for &build in builds {
        let queued = transaction
            .execute(
                "UPDATE builds SET status = 'queued', ingested_at = NULL, started_at = NULL,
                     finished_at = NULL, failure_reason = NULL
                 WHERE id = $1
                   AND status IN ('failed', 'dep_failed', 'cancelled', 'cached_failure')",
                &[&build],
            )
            .await
            .map_err(DbError::query("queueing a build again"))?;
        if queued == 0 {
            if restarted.is_empty() {
                return Ok(restarted);
            }
            continue;
        }
        transaction
            .execute(
                "WITH RECURSIVE closure(id) AS (
                     SELECT s.id FROM builds b JOIN steps s ON s.drv_path = b.drv_path
                     WHERE b.id = $1
                   UNION
                     SELECT i.input_id FROM closure c
                     JOIN steps s ON s.id = c.id AND s.status <> 'succeeded'
                     JOIN step_inputs i ON i.step_id = c.id
                 )
                 UPDATE steps SET status = 'waiting', failure_reason = NULL, finished_at = NULL,
                     builder_losses = 0, infrastructure_failures = 0, visible_after = NULL,
                     failed_build_id = NULL
                 WHERE (id IN (SELECT id FROM closure)
                        OR id IN (SELECT step_id FROM build_steps WHERE build_id = $1))
                   AND status IN ('failed', 'dep_failed', 'cancelled', 'unsupported')",
                &[&build],
            )
            .await
            .map_err(DbError::query("clearing the failures of a build's steps"))?;
        restarted.push(build);
    }
    transaction
        .execute("SELECT pg_notify('drover_builds_queued', '')", &[])
        .await
        .map_err(DbError::query("waking ingest"))?;
    transaction
        .commit()
        .await
        .map_err(DbError::query("committing a restart"))?;
    Ok(restarted)
}

/// The snapshot `client`'s transaction reads in (its first statement fixes it, in a
/// repeatable-read transaction).
pub async fn snapshot(client: &impl GenericClient) -> Result<Snapshot, DbError> {
    let row = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(DbError::query("reading the transaction's snapshot"))?;
    let text: String = row.get(0);
    Snapshot::parse(&text).ok_or(DbError::Missing("a readable transaction snapshot"))
}

/// Every learned step duration, for the scheduler at start.
pub async fn learned_durations(client: &impl GenericClient) -> Result<Vec<Learned>, DbError> {
    let rows = client
        .query(
            "SELECT package, system, samples, mean_ms FROM step_durations",
            &[],
        )
        .await
        .map_err(DbError::query("reading learned step durations"))?;
    Ok(rows
        .iter()
        .map(|row| Learned {
            key: DurationKey {
                package: row.get(0),
                system: row.get(1),
            },
            samples: u32::try_from(row.get::<_, i32>(2)).unwrap_or(1),
            mean_ms: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
        })
        .collect())
}

/// A build as clients see it.
#[derive(Debug, Clone)]
pub struct BuildRow {
    /// Its status; `None` for a label this runner does not know (a newer one's migration).
    pub status: Option<BuildStatus>,
    /// Its top-level derivation.
    pub drv_path: String,
    /// Its metadata.
    pub metadata: serde_json::Value,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// Outputs of its top-level step, if built.
    pub outputs: Vec<(String, String)>,
    /// The job set that queued it, if one did.
    pub job_set: Option<i64>,
    /// Its job in that job set.
    pub job_name: Option<String>,
    /// When it was queued and ended, in Unix milliseconds.
    pub times_ms: (i64, Option<i64>),
    /// Whether it builds what it can after a step failed.
    pub keep_going: bool,
}

/// Reads one build.
pub async fn build(client: &impl GenericClient, id: i64) -> Result<Option<BuildRow>, DbError> {
    let Some(row) = client
        .query_opt(
            "SELECT status::text, drv_path, metadata, failure_reason, job_set_id, job_name,
                    (extract(epoch FROM submitted_at) * 1000)::bigint,
                    (extract(epoch FROM finished_at) * 1000)::bigint, keep_going
             FROM builds WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(DbError::query("reading a build"))?
    else {
        return Ok(None);
    };
    let drv_path: String = row.get(1);
    let outputs = client
        .query(
            "SELECT o.output_name, o.path FROM step_outputs o JOIN steps s ON s.id = o.step_id
             WHERE s.drv_path = $1 ORDER BY o.output_name",
            &[&drv_path],
        )
        .await
        .map_err(DbError::query("reading build outputs"))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    Ok(Some(BuildRow {
        status: BuildStatus::from_label(row.get(0)),
        drv_path,
        metadata: row.get(2),
        failure_reason: row.get(3),
        outputs,
        job_set: row.get(4),
        job_name: row.get(5),
        times_ms: (row.get(6), row.get(7)),
        keep_going: row.get(8),
    }))
}
