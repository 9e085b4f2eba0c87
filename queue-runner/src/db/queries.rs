//! The runner's statements, one function each. Hot paths use one statement per state change
//! (data-modifying CTEs), so a dispatch or a completion is one round trip.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::DbError;

/// A build the runner has to expand into steps.
#[derive(Debug, Clone)]
pub struct QueuedBuild {
    /// Build id.
    pub id: i64,
    /// Its top-level derivation.
    pub drv_path: String,
    /// Its priority.
    pub priority: i32,
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
            "SELECT id, drv_path, priority FROM builds
             WHERE ingested_at IS NULL AND id > $1 ORDER BY id LIMIT $2"
        }
        BuildSelection::Unfinished => {
            "SELECT id, drv_path, priority FROM builds
             WHERE finished_at IS NULL AND id > $1 ORDER BY id LIMIT $2"
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
        })
        .collect())
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

/// A step row as created or found.
#[derive(Debug, Clone)]
pub struct StepRow {
    /// Step id.
    pub id: i64,
    /// Its derivation.
    pub drv_path: String,
    /// Its status, as text.
    pub status: String,
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
}

/// Creates the steps that do not exist yet and returns every one, new or old, with its status.
pub async fn ensure_steps(
    client: &impl GenericClient,
    specs: &[StepSpec],
) -> Result<Vec<StepRow>, DbError> {
    let paths: Vec<&str> = specs.iter().map(|s| s.drv_path.as_str()).collect();
    let systems: Vec<&str> = specs.iter().map(|s| s.system.as_str()).collect();
    let features: Vec<&str> = specs.iter().map(|s| s.features.as_str()).collect();
    let rows = client
        .query(
            "INSERT INTO steps (drv_path, status, system, required_features)
             SELECT path, 'waiting', system, string_to_array(features, ' ')
             FROM unnest($1::text[], $2::text[], $3::text[]) AS s(path, system, features)
             ON CONFLICT (drv_path) DO UPDATE SET drv_path = EXCLUDED.drv_path
             RETURNING id, drv_path, status::text",
            &[&paths, &systems, &features],
        )
        .await
        .map_err(DbError::query("creating steps"))?;
    Ok(rows
        .iter()
        .map(|row| StepRow {
            id: row.get(0),
            drv_path: row.get(1),
            status: row.get(2),
        })
        .collect())
}

/// Sets the status of steps entering the graph (runnable or waiting) and links a build to the
/// steps it needs, then marks the build ingested.
pub async fn record_ingested_build(
    client: &impl GenericClient,
    build: i64,
    needed_steps: &[i64],
    step_statuses: &BTreeMap<i64, &'static str>,
) -> Result<(), DbError> {
    let ids: Vec<i64> = step_statuses.keys().copied().collect();
    let statuses: Vec<&str> = step_statuses.values().copied().collect();
    client
        .execute(
            "WITH statuses AS (
                 UPDATE steps SET status = u.status::step_status,
                     finished_at = CASE WHEN u.status = 'succeeded' THEN now() END,
                     builder_losses = 0, infrastructure_failures = 0, failure_reason = NULL
                 FROM unnest($2::bigint[], $3::text[]) AS u(id, status)
                 WHERE steps.id = u.id),
             links AS (
                 INSERT INTO build_steps (build_id, step_id)
                 SELECT $1, unnest($4::bigint[]) ON CONFLICT DO NOTHING)
             UPDATE builds SET ingested_at = now() WHERE id = $1",
            &[&build, &ids, &statuses, &needed_steps],
        )
        .await
        .map_err(DbError::query("recording an ingested build"))?;
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

/// Ends a build with a terminal status and a reason.
pub async fn finish_build(
    client: &impl GenericClient,
    build: i64,
    status: &str,
    reason: Option<&str>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE builds SET status = $2::text::build_status, finished_at = now(),
                 ingested_at = coalesce(ingested_at, now()), failure_reason = $3
             WHERE id = $1",
            &[&build, &status, &reason],
        )
        .await
        .map_err(DbError::query("finishing a build"))?;
    Ok(())
}

/// Attempts a previous runner process left running: they are aborted, and their steps rejoin the
/// graph when unfinished builds are reloaded.
pub async fn abort_orphaned_attempts(client: &impl GenericClient) -> Result<u64, DbError> {
    client
        .execute(
            "WITH marked AS (UPDATE machines SET connected = false WHERE connected)
             UPDATE step_attempts SET status = 'aborted', finished_at = now(),
                 message = 'the runner restarted'
             WHERE status = 'running'",
            &[],
        )
        .await
        .map_err(DbError::query("aborting orphaned attempts"))
}

/// Records a dispatch: the attempt, the step running, its builds running.
pub async fn record_dispatch(
    client: &impl GenericClient,
    attempt: Uuid,
    step: i64,
    machine: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "WITH attempt AS (
                 INSERT INTO step_attempts (id, step_id, machine) VALUES ($1, $2, $3)),
             step AS (
                 UPDATE steps SET status = 'running', started_at = now() WHERE id = $2)
             UPDATE builds SET status = 'running', started_at = now()
             WHERE status = 'queued' AND id IN (SELECT build_id FROM build_steps WHERE step_id = $2)",
            &[&attempt, &step, &machine],
        )
        .await
        .map_err(DbError::query("recording a dispatch"))?;
    Ok(())
}

/// An output reported by a builder.
#[derive(Debug, Clone)]
pub struct OutputRow {
    /// Output name.
    pub name: String,
    /// Output path.
    pub path: String,
    /// Reported NAR hash.
    pub nar_hash: String,
    /// Reported NAR size.
    pub nar_size: i64,
}

/// Records a success: attempt, step, outputs, newly runnable steps and finished builds.
pub async fn record_success(
    client: &impl GenericClient,
    attempt: Uuid,
    step: i64,
    outputs: &[OutputRow],
    runnable: &[i64],
    succeeded_builds: &[i64],
) -> Result<(), DbError> {
    let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
    let paths: Vec<&str> = outputs.iter().map(|o| o.path.as_str()).collect();
    let hashes: Vec<&str> = outputs.iter().map(|o| o.nar_hash.as_str()).collect();
    let sizes: Vec<i64> = outputs.iter().map(|o| o.nar_size).collect();
    client
        .execute(
            "WITH attempt AS (
                 UPDATE step_attempts SET status = 'succeeded', finished_at = now() WHERE id = $1),
             step AS (
                 UPDATE steps SET status = 'succeeded', finished_at = now() WHERE id = $2),
             outputs AS (
                 INSERT INTO step_outputs (step_id, output_name, path, nar_hash, nar_size)
                 SELECT $2, * FROM unnest($3::text[], $4::text[], $5::text[], $6::bigint[])
                 ON CONFLICT DO NOTHING),
             runnable AS (
                 UPDATE steps SET status = 'runnable' WHERE id = ANY($7))
             UPDATE builds SET status = 'succeeded', finished_at = now() WHERE id = ANY($8)",
            &[
                &attempt,
                &step,
                &names,
                &paths,
                &hashes,
                &sizes,
                &runnable,
                &succeeded_builds,
            ],
        )
        .await
        .map_err(DbError::query("recording a success"))?;
    Ok(())
}

/// What a permanent failure changed.
#[derive(Debug, Clone)]
pub struct FailureRecord<'a> {
    /// The attempt, if the failure came from one.
    pub attempt: Option<Uuid>,
    /// Its attempt status (`failed`, `timed_out`, `builder_lost`, ...).
    pub attempt_status: &'a str,
    /// The step.
    pub step: i64,
    /// `failed` when the build itself failed (remembered: later builds of it fail at once), or
    /// `cancelled` when it ran out of retries for faults that were not its own (built again by
    /// the next build that needs it).
    pub step_status: &'a str,
    /// Why, for humans.
    pub reason: &'a str,
    /// Steps that can no longer run.
    pub dep_failed_steps: &'a [i64],
    /// Builds whose top-level step failed.
    pub failed_builds: &'a [i64],
    /// Builds that needed a failed step.
    pub dep_failed_builds: &'a [i64],
}

/// Records a permanent failure and its propagation in one statement.
pub async fn record_failure(
    client: &impl GenericClient,
    failure: &FailureRecord<'_>,
) -> Result<(), DbError> {
    let dependency_reason = format!("a dependency failed: {}", failure.reason);
    client
        .execute(
            "WITH attempt AS (
                 UPDATE step_attempts SET status = $2::text::attempt_status, finished_at = now(),
                     message = $4 WHERE id = $1),
             step AS (
                 UPDATE steps SET status = $9::text::step_status, finished_at = now(),
                     failure_reason = $4
                 WHERE id = $3),
             dependents AS (
                 UPDATE steps SET status = 'dep_failed', finished_at = now(), failure_reason = $5
                 WHERE id = ANY($6)),
             failed AS (
                 UPDATE builds SET status = 'failed', finished_at = now(), failure_reason = $4
                 WHERE id = ANY($7))
             UPDATE builds SET status = 'dep_failed', finished_at = now(), failure_reason = $5
             WHERE id = ANY($8)",
            &[
                &failure.attempt,
                &failure.attempt_status,
                &failure.step,
                &failure.reason,
                &dependency_reason,
                &failure.dep_failed_steps,
                &failure.failed_builds,
                &failure.dep_failed_builds,
                &failure.step_status,
            ],
        )
        .await
        .map_err(DbError::query("recording a failure"))?;
    Ok(())
}

/// Which counter a requeue increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueCause {
    /// The builder disconnected or went silent.
    BuilderLost,
    /// The builder reported a failure that was not the build's.
    InfrastructureFailure,
}

/// Ends an attempt that did not fail the build and makes its step runnable again; returns how
/// many times that cause has now hit the step.
pub async fn record_requeue(
    client: &impl GenericClient,
    attempt: Uuid,
    step: i64,
    cause: RequeueCause,
    message: &str,
) -> Result<i32, DbError> {
    let sql = match cause {
        RequeueCause::BuilderLost => {
            "WITH attempt AS (
                 UPDATE step_attempts SET status = 'builder_lost', finished_at = now(), message = $3
                 WHERE id = $1)
             UPDATE steps SET status = 'runnable', builder_losses = builder_losses + 1
             WHERE id = $2 RETURNING builder_losses"
        }
        RequeueCause::InfrastructureFailure => {
            "WITH attempt AS (
                 UPDATE step_attempts SET status = 'infrastructure_failure', finished_at = now(),
                     message = $3
                 WHERE id = $1)
             UPDATE steps SET status = 'runnable',
                 infrastructure_failures = infrastructure_failures + 1
             WHERE id = $2 RETURNING infrastructure_failures"
        }
    };
    let row = client
        .query_one(sql, &[&attempt, &step, &message])
        .await
        .map_err(DbError::query("requeueing a step"))?;
    Ok(row.get(0))
}

/// What a builder offered at Join.
#[derive(Debug, Clone)]
pub struct MachineRow<'a> {
    /// Its name.
    pub name: &'a str,
    /// Systems.
    pub systems: Vec<String>,
    /// Supported features.
    pub supported_features: Vec<String>,
    /// Mandatory features.
    pub mandatory_features: Vec<String>,
    /// Max jobs.
    pub max_jobs: i32,
    /// Speed factor.
    pub speed_factor: f64,
    /// Nix version.
    pub nix_version: &'a str,
}

/// Records a builder joining.
pub async fn machine_joined(
    client: &impl GenericClient,
    machine: &MachineRow<'_>,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO machines (name, systems, supported_features, mandatory_features, max_jobs,
                 speed_factor, nix_version, connected)
             VALUES ($1, $2, $3, $4, $5, $6, $7, true)
             ON CONFLICT (name) DO UPDATE SET systems = $2, supported_features = $3,
                 mandatory_features = $4, max_jobs = $5, speed_factor = $6, nix_version = $7,
                 connected = true, last_seen_at = now()",
            &[
                &machine.name,
                &machine.systems,
                &machine.supported_features,
                &machine.mandatory_features,
                &machine.max_jobs,
                &machine.speed_factor,
                &machine.nix_version,
            ],
        )
        .await
        .map_err(DbError::query("recording a builder joining"))?;
    Ok(())
}

/// Records a builder's ping.
pub async fn machine_pinged(
    client: &impl GenericClient,
    name: &str,
    free_disk_bytes: Option<i64>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE machines SET last_ping_at = now(),
                 free_disk_bytes = coalesce($2, free_disk_bytes)
             WHERE name = $1",
            &[&name, &free_disk_bytes],
        )
        .await
        .map_err(DbError::query("recording a ping"))?;
    Ok(())
}

/// Records a builder leaving.
pub async fn machine_left(client: &impl GenericClient, name: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE machines SET connected = false, last_seen_at = now() WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(DbError::query("recording a builder leaving"))?;
    Ok(())
}

/// Records where an attempt's log is.
pub async fn set_attempt_log(
    client: &impl GenericClient,
    attempt: Uuid,
    log_file: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE step_attempts SET log_file = $2 WHERE id = $1",
            &[&attempt, &log_file],
        )
        .await
        .map_err(DbError::query("recording a log file"))?;
    Ok(())
}

/// The log file of the latest attempt of the step building `drv_path`.
pub async fn latest_log_file(
    client: &impl GenericClient,
    drv_path: &str,
) -> Result<Option<String>, DbError> {
    let row = client
        .query_opt(
            "SELECT a.log_file FROM step_attempts a JOIN steps s ON s.id = a.step_id
             WHERE s.drv_path = $1 AND a.log_file IS NOT NULL
             ORDER BY a.started_at DESC LIMIT 1",
            &[&drv_path],
        )
        .await
        .map_err(DbError::query("finding a log"))?;
    Ok(row.map(|row| row.get(0)))
}

/// Stores new derivations and queues a build, in the caller's transaction.
pub async fn insert_build(
    client: &impl GenericClient,
    derivations: &[(String, Vec<u8>)],
    top: &str,
    priority: i32,
    metadata: &serde_json::Value,
) -> Result<i64, DbError> {
    let paths: Vec<&str> = derivations.iter().map(|(path, _)| path.as_str()).collect();
    let texts: Vec<&[u8]> = derivations
        .iter()
        .map(|(_, text)| text.as_slice())
        .collect();
    client
        .execute(
            "INSERT INTO derivations (path, text)
             SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT DO NOTHING",
            &[&paths, &texts],
        )
        .await
        .map_err(DbError::query("storing derivations"))?;
    let row = client
        .query_one(
            "INSERT INTO builds (drv_path, priority, metadata) VALUES ($1, $2, $3) RETURNING id",
            &[&top, &priority, metadata],
        )
        .await
        .map_err(DbError::query("queueing a build"))?;
    Ok(row.get(0))
}

/// A build as clients see it.
#[derive(Debug, Clone)]
pub struct BuildRow {
    /// Its status, as text.
    pub status: String,
    /// Its top-level derivation.
    pub drv_path: String,
    /// Its metadata.
    pub metadata: serde_json::Value,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// Outputs of its top-level step, if built.
    pub outputs: Vec<(String, String)>,
}

/// Reads one build.
pub async fn build(client: &impl GenericClient, id: i64) -> Result<Option<BuildRow>, DbError> {
    let Some(row) = client
        .query_opt(
            "SELECT status::text, drv_path, metadata, failure_reason FROM builds WHERE id = $1",
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
        status: row.get(0),
        drv_path,
        metadata: row.get(2),
        failure_reason: row.get(3),
        outputs,
    }))
}
