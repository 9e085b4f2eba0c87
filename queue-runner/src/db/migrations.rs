//! Versioned migrations embedded in the binary, applied in order at start (and by
//! `drover-queue-runner migrate`) under an advisory lock, each in its own transaction.

use super::{DbError, Pool};

/// Every migration, in order. Never edit one that has shipped; add a new one.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial schema",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "machine health from pings",
        include_str!("../../migrations/0002_machine_health.sql"),
    ),
    (
        3,
        "global build priority",
        include_str!("../../migrations/0003_global_priority.sql"),
    ),
    (
        4,
        "log limit attempt status",
        include_str!("../../migrations/0004_log_limit.sql"),
    ),
    (
        5,
        "step visible_after for retry backoff",
        include_str!("../../migrations/0005_visible_after.sql"),
    ),
    (
        6,
        "unsupported steps",
        include_str!("../../migrations/0006_unsupported.sql"),
    ),
    (
        7,
        "who submitted a build",
        include_str!("../../migrations/0007_submitted_by.sql"),
    ),
    (
        8,
        "cached failures and keep-going builds",
        include_str!("../../migrations/0008_cached_failures_keep_going.sql"),
    ),
    (
        9,
        "idempotent submissions, step waiting reasons, the admission cap",
        include_str!("../../migrations/0009_client_api.sql"),
    ),
    (
        10,
        "job sets",
        include_str!("../../migrations/0010_job_sets.sql"),
    ),
    (
        11,
        "step graph edges instead of rows per build and step",
        include_str!("../../migrations/0011_step_inputs.sql"),
    ),
    (
        12,
        "derivations verified once, their hash modulo stored",
        include_str!("../../migrations/0012_verified_derivations.sql"),
    ),
    (
        13,
        "learned step durations",
        include_str!("../../migrations/0013_step_durations.sql"),
    ),
    (
        14,
        "derivation texts compressed with lz4 where the server has it",
        include_str!("../../migrations/0014_derivation_text_lz4.sql"),
    ),
    (
        15,
        "drained and quarantined builders",
        include_str!("../../migrations/0015_machine_standing.sql"),
    ),
    (
        16,
        "certificates seen and revoked",
        include_str!("../../migrations/0016_certificates.sql"),
    ),
    (
        17,
        "step edges without per-row key checks",
        include_str!("../../migrations/0017_step_inputs_unchecked.sql"),
    ),
    (
        18,
        "trace context of builds and steps",
        include_str!("../../migrations/0018_trace_context.sql"),
    ),
    (
        19,
        "cache garbage collection: pins and sweeps",
        include_str!("../../migrations/0019_cache_gc.sql"),
    ),
    (
        20,
        "history pruning: derivations kept from when they were last stored",
        include_str!("../../migrations/0020_history.sql"),
    ),
    (
        21,
        "API tokens",
        include_str!("../../migrations/0021_api_tokens.sql"),
    ),
];

/// Key of the advisory lock that serialises concurrent migrators (two runners starting at once).
const MIGRATION_LOCK: i64 = 0x6472_6f76_6572; // "drover"

/// Applies every migration the database lacks; returns the versions applied.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, DbError> {
    let mut client = pool.get().await.map_err(DbError::Connection)?;
    client
        .batch_execute(
            // Its notice ("already exists, skipping") would be logged at every start.
            "SET client_min_messages = warning;
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     integer PRIMARY KEY,
                description text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            );
            COMMENT ON TABLE schema_migrations IS 'Migrations applied to this database.';
            RESET client_min_messages;",
        )
        .await
        .map_err(DbError::query("creating schema_migrations"))?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(DbError::query("taking the migration lock"))?;
    let mut applied = Vec::new();
    for (version, description, sql) in MIGRATIONS {
        let transaction = client
            .transaction()
            .await
            .map_err(DbError::query("starting a migration"))?;
        let done = transaction
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(DbError::query("reading schema_migrations"))?;
        if done.is_none() {
            transaction
                .batch_execute(sql)
                .await
                .map_err(DbError::query("applying a migration"))?;
            transaction
                .execute(
                    "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                    &[version, description],
                )
                .await
                .map_err(DbError::query("recording a migration"))?;
            applied.push(*version);
        }
        transaction
            .commit()
            .await
            .map_err(DbError::query("committing a migration"))?;
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(DbError::query("releasing the migration lock"))?;
    Ok(applied)
}
