//! What the status page shows, as one JSON document read from the views operators query
//! (`queue_summary`, `machine_status`, `running_steps`) and the newest builds.

use deadpool_postgres::GenericClient;

use super::DbError;

/// Builds the overview shows.
const RECENT_BUILDS: i64 = 20;

/// Queues per system and status, builders with their load, state and quarantine, running steps
/// with when they started, the newest builds, and the database's clock, in Unix milliseconds.
pub async fn overview(client: &impl GenericClient) -> Result<serde_json::Value, DbError> {
    let row = client
        .query_one(
            "SELECT json_build_object(
                 'queues', (SELECT coalesce(json_agg(q ORDER BY q.system, q.status), '[]')
                            FROM (SELECT status::text AS status, system, steps
                                  FROM queue_summary) q),
                 'builders', (SELECT coalesce(json_agg(m ORDER BY m.name), '[]')
                              FROM (SELECT name, state, systems, max_jobs, running,
                                           running_steps, quarantine_reason
                                    FROM machine_status) m),
                 'running', (SELECT coalesce(json_agg(r ORDER BY r.started_at_ms), '[]')
                             FROM (SELECT step_id, drv_path, machine,
                                          (extract(epoch FROM started_at) * 1000)::bigint
                                              AS started_at_ms
                                   FROM running_steps) r),
                 'recent', (SELECT coalesce(json_agg(b ORDER BY b.id DESC), '[]')
                            FROM (SELECT id, status::text AS status, drv_path,
                                         (extract(epoch FROM submitted_at) * 1000)::bigint
                                             AS submitted_at_ms
                                  FROM builds ORDER BY id DESC LIMIT $1) b),
                 'now_ms', (extract(epoch FROM now()) * 1000)::bigint)",
            &[&RECENT_BUILDS],
        )
        .await
        .map_err(DbError::query("reading the status page's overview"))?;
    Ok(row.get(0))
}
