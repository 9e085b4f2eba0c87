//! Builders as admins see and steer them: the `machine_status` view, and the standing (drained,
//! quarantined) a starting runner reads back.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use drover_scheduler::fleet::StoredStanding;
use tokio_postgres::Row;

use super::DbError;

/// One row of `machine_status`.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineStatus {
    /// Its name.
    pub name: String,
    /// `disconnected`, `drained`, `quarantined`, `probation`, `low_disk`, `memory_pressure`,
    /// `full`, `busy` or `idle`.
    pub state: String,
    /// Systems it builds for.
    pub systems: Vec<String>,
    /// Steps it runs at once.
    pub max_jobs: u32,
    /// The derivations it builds now, oldest first.
    pub running_steps: Vec<String>,
    /// When its latest ping came, in Unix milliseconds (as every time here).
    pub last_ping_at_ms: Option<i64>,
    /// Free bytes in its store, from its latest ping.
    pub free_disk_bytes: Option<u64>,
    /// Its memory pressure (PSI "some avg10", percent), from its latest ping that said.
    pub memory_pressure_percent: Option<f64>,
    /// When an admin drained it.
    pub drained_at_ms: Option<i64>,
    /// Why it is quarantined.
    pub quarantine_reason: Option<String>,
    /// When its quarantine began.
    pub quarantined_at_ms: Option<i64>,
    /// When its probation begins.
    pub probation_from_ms: Option<i64>,
}

const COLUMNS: &str = "name, state, systems, max_jobs, running_steps, \
    (extract(epoch FROM last_ping_at) * 1000)::bigint, free_disk_bytes, \
    (extract(epoch FROM drained_at) * 1000)::bigint, quarantine_reason, \
    memory_pressure_percent, \
    (extract(epoch FROM quarantined_at) * 1000)::bigint, \
    (extract(epoch FROM probation_from) * 1000)::bigint";

impl MachineStatus {
    fn from_row(row: &Row) -> Self {
        Self {
            name: row.get(0),
            state: row.get(1),
            systems: row.get(2),
            max_jobs: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
            running_steps: row.get(4),
            last_ping_at_ms: row.get(5),
            free_disk_bytes: row
                .get::<_, Option<i64>>(6)
                .map(|bytes| u64::try_from(bytes).unwrap_or(0)),
            drained_at_ms: row.get(7),
            quarantine_reason: row.get(8),
            memory_pressure_percent: row.get(9),
            quarantined_at_ms: row.get(10),
            probation_from_ms: row.get(11),
        }
    }
}

/// Every builder that ever joined, by name.
pub async fn all(client: &impl GenericClient) -> Result<Vec<MachineStatus>, DbError> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM machine_status ORDER BY name"),
            &[],
        )
        .await
        .map_err(DbError::query("reading the builders"))?;
    Ok(rows.iter().map(MachineStatus::from_row).collect())
}

/// The builder `name`, if it ever joined.
pub async fn one(
    client: &impl GenericClient,
    name: &str,
) -> Result<Option<MachineStatus>, DbError> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM machine_status WHERE name = $1"),
            &[&name],
        )
        .await
        .map_err(DbError::query("reading a builder"))?;
    Ok(row.as_ref().map(MachineStatus::from_row))
}

/// The builders drained or quarantined, for a starting runner: cool-downs as what is left of
/// them now.
pub async fn stored_standings(client: &impl GenericClient) -> Result<Vec<StoredStanding>, DbError> {
    let rows = client
        .query(
            "SELECT name, drained_at IS NOT NULL,
                    CASE WHEN quarantined_at IS NOT NULL
                         THEN greatest(0, (extract(epoch FROM probation_from - now()) * 1000))::bigint
                    END
             FROM machines
             WHERE drained_at IS NOT NULL OR quarantined_at IS NOT NULL",
            &[],
        )
        .await
        .map_err(DbError::query("reading drained and quarantined builders"))?;
    Ok(rows
        .iter()
        .map(|row| StoredStanding {
            name: row.get(0),
            drained: row.get(1),
            cool_down_left: row
                .get::<_, Option<i64>>(2)
                .map(|millis| Duration::from_millis(u64::try_from(millis).unwrap_or(0))),
        })
        .collect())
}
