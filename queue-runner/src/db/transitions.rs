//! Writing a batch of the scheduler core's changes: [`Transitions`] folds a batch into one final
//! row per step, attempt and build (a step that became runnable and started in the same batch
//! is written once, as running), and [`Transitions::write`] stores it with one statement per
//! table over arrays, pipelined, in one transaction with the rare machine changes. A dispatch
//! costs one row in each of `step_attempts` and `steps`; a completion the same plus its outputs,
//! whatever the batch size.
//!
//! A new kind of [`Change`] touches the core (which states it), [`Transitions::add`] (which folds
//! it into the rows it changes), the statement for its table here, and, if watchers see it, the
//! driver's filter and Watch.

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::{GenericClient, Transaction};
use drover_scheduler::durations::DurationKey;
use drover_scheduler::{AttemptId, BuildId, Capabilities, Change, Imposed, OutputRecord, StepId};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::DbError;
use super::status::{AttemptStatus, BuildStatus, StepStatus};
use crate::logs::LogStore;

/// The final state of one step row in a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct StepWrite {
    status: Option<StepStatus>,
    reason: Option<String>,
    started: bool,
    counters: Option<(u32, u32)>,
    /// Held back for this long from the write: `visible_after`.
    held_for: Option<std::time::Duration>,
    /// The oldest build that failed because of it: `failed_build_id`.
    failure_origin: Option<BuildId>,
}

/// An attempt dispatched in this batch, possibly already ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NewAttempt {
    step: StepId,
    machine: String,
    status: AttemptStatus,
    message: Option<String>,
}

/// A builder joining, leaving, drained or quarantined: rare, written one by one, in order.
#[derive(Debug, Clone, PartialEq)]
enum MachineWrite {
    Joined {
        name: String,
        capabilities: Capabilities,
        nix_version: String,
    },
    Left {
        name: String,
    },
    Drained {
        name: String,
        drained: bool,
    },
    Quarantined {
        name: String,
        quarantine: Option<Imposed>,
    },
}

/// What a builder's latest ping said, and what the core made of it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ping {
    free_disk_bytes: Option<u64>,
    below_disk_floor: bool,
    memory_pressure_percent: Option<f64>,
    under_memory_pressure: bool,
}

impl MachineWrite {
    /// The write a builder's change needs; `None` for other changes.
    fn of(change: Change) -> Option<Self> {
        Some(match change {
            Change::MachineJoined {
                name,
                capabilities,
                nix_version,
            } => Self::Joined {
                name,
                capabilities,
                nix_version,
            },
            Change::MachineLeft { name } => Self::Left { name },
            Change::MachineDrained { name, drained } => Self::Drained { name, drained },
            Change::MachineQuarantined { name, quarantine } => {
                Self::Quarantined { name, quarantine }
            }
            _ => return None,
        })
    }
}

/// One batch of changes, folded.
#[derive(Debug, Default)]
pub struct Transitions {
    steps: BTreeMap<StepId, StepWrite>,
    new_attempts: BTreeMap<AttemptId, NewAttempt>,
    ended_attempts: BTreeMap<AttemptId, (AttemptStatus, Option<String>)>,
    outputs: Vec<(StepId, OutputRecord)>,
    started_builds: BTreeSet<BuildId>,
    finished_builds: BTreeMap<BuildId, (BuildStatus, Option<String>)>,
    machines: Vec<MachineWrite>,
    /// Each builder's latest ping.
    pings: BTreeMap<String, Ping>,
    /// The latest estimate of each package whose duration moved.
    durations: BTreeMap<DurationKey, (u32, u64)>,
}

impl Transitions {
    /// Whether there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
            && self.new_attempts.is_empty()
            && self.ended_attempts.is_empty()
            && self.outputs.is_empty()
            && self.started_builds.is_empty()
            && self.finished_builds.is_empty()
            && self.machines.is_empty()
            && self.pings.is_empty()
            && self.durations.is_empty()
    }

    /// Folds one change into the batch.
    pub fn add(&mut self, change: Change) {
        match change {
            Change::StepStatus {
                step,
                status,
                reason,
            } => {
                let row = self.steps.entry(step).or_default();
                row.status = Some(status);
                row.reason = reason;
            }
            Change::FailureOrigin { step, build } => {
                self.steps.entry(step).or_default().failure_origin = Some(build);
            }
            Change::StepHeld { step, delay } => {
                self.steps.entry(step).or_default().held_for = Some(delay);
            }
            Change::StepCounters {
                step,
                builder_losses,
                infrastructure_failures,
            } => {
                self.steps.entry(step).or_default().counters =
                    Some((builder_losses, infrastructure_failures));
            }
            Change::AttemptStarted {
                attempt,
                step,
                builder,
            } => {
                let row = self.steps.entry(step).or_default();
                row.status = Some(StepStatus::Running);
                row.reason = None;
                row.started = true;
                self.new_attempts.insert(
                    attempt,
                    NewAttempt {
                        step,
                        machine: builder,
                        status: AttemptStatus::Running,
                        message: None,
                    },
                );
            }
            Change::AttemptEnded {
                attempt,
                status,
                message,
            } => {
                if let Some(new) = self.new_attempts.get_mut(&attempt) {
                    new.status = status;
                    new.message = message;
                } else {
                    self.ended_attempts.insert(attempt, (status, message));
                }
            }
            Change::Outputs { step, outputs } => {
                self.outputs
                    .extend(outputs.into_iter().map(|output| (step, output)));
            }
            Change::BuildStarted { build } => {
                self.started_builds.insert(build);
            }
            Change::BuildFinished {
                build,
                status,
                reason,
            } => {
                // A build that ends in the batch it started in is written as ended only, as
                // it always was.
                self.started_builds.remove(&build);
                self.finished_builds
                    .entry(build)
                    .or_insert((status, reason));
            }
            change @ (Change::MachineJoined { .. }
            | Change::MachineLeft { .. }
            | Change::MachineDrained { .. }
            | Change::MachineQuarantined { .. }) => self.machines.extend(MachineWrite::of(change)),
            Change::MachinePinged {
                name,
                free_disk_bytes,
                below_disk_floor,
                memory_pressure_percent,
                under_memory_pressure,
            } => {
                let ping = Ping {
                    free_disk_bytes,
                    below_disk_floor,
                    memory_pressure_percent,
                    under_memory_pressure,
                };
                self.pings.insert(name, ping);
            }
            Change::DurationLearned(learned) => {
                self.durations
                    .insert(learned.key, (learned.samples, learned.mean_ms));
            }
        }
    }

    /// Writes the batch in one transaction; its id, which tells Watch streams whether a state
    /// they read shows the batch ([`super::snapshot::Snapshot`]).
    pub async fn write(&self, client: &mut deadpool_postgres::Client) -> Result<u64, DbError> {
        let transaction = client
            .transaction()
            .await
            .map_err(DbError::query("starting a batch of scheduler changes"))?;
        for machine in &self.machines {
            write_machine(&transaction, machine).await?;
        }
        let id = self.write_rows(&transaction).await?;
        transaction
            .commit()
            .await
            .map_err(DbError::query("committing a batch of scheduler changes"))?;
        Ok(id)
    }

    /// One statement per table the batch touches, sent together: the connection pipelines
    /// them, so the whole batch costs one round trip. Every statement is prepared before any
    /// runs (once per connection, [`Transaction::prepare_cached`]), so they run in the order
    /// written and the first to fail reports the cause (a serialization failure is retried),
    /// not the "transaction aborted" of a later one.
    async fn write_rows(&self, client: &Transaction<'_>) -> Result<u64, DbError> {
        let prepared = Prepared::on(client).await?;
        let prepared = &prepared;
        let (id, ..) = tokio::try_join!(
            transaction_id(client, prepared),
            self.insert_attempts(client, prepared),
            self.end_attempts(client, prepared),
            self.update_steps(client, prepared),
            self.insert_outputs(client, prepared),
            self.start_builds(client, prepared),
            self.finish_builds(client, prepared),
            self.record_pings(client, prepared),
            self.record_durations(client, prepared),
        )?;
        Ok(id)
    }

    async fn insert_attempts(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        let attempts = &self.new_attempts;
        if attempts.is_empty() {
            return Ok(());
        }
        let ids: Vec<AttemptId> = attempts.keys().copied().collect();
        let steps: Vec<StepId> = attempts.values().map(|a| a.step).collect();
        let machines: Vec<&str> = attempts.values().map(|a| a.machine.as_str()).collect();
        let statuses: Vec<&str> = attempts.values().map(|a| a.status.as_str()).collect();
        let messages: Vec<Option<&str>> = attempts.values().map(|a| a.message.as_deref()).collect();
        let logs: Vec<String> = ids.iter().map(|id| LogStore::file_name(*id)).collect();
        execute(
            client,
            &prepared.insert_attempts,
            "recording dispatched attempts",
            &[&ids, &steps, &machines, &statuses, &messages, &logs],
        )
        .await
    }

    async fn end_attempts(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        let ended = &self.ended_attempts;
        if ended.is_empty() {
            return Ok(());
        }
        let (ids, statuses, messages) = status_columns(ended, AttemptStatus::as_str);
        execute(
            client,
            &prepared.end_attempts,
            "recording ended attempts",
            &[&ids, &statuses, &messages],
        )
        .await
    }

    async fn update_steps(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        let steps = &self.steps;
        if steps.is_empty() {
            return Ok(());
        }
        let ids: Vec<StepId> = steps.keys().copied().collect();
        let statuses: Vec<Option<&str>> = steps
            .values()
            .map(|s| s.status.map(StepStatus::as_str))
            .collect();
        let finished: Vec<bool> = steps
            .values()
            .map(|s| s.status.is_some_and(StepStatus::is_terminal))
            .collect();
        let started: Vec<bool> = steps.values().map(|s| s.started).collect();
        let reasons: Vec<Option<&str>> = steps.values().map(|s| s.reason.as_deref()).collect();
        let losses: Vec<Option<i32>> = steps
            .values()
            .map(|s| s.counters.map(|(losses, _)| saturating_i32(losses)))
            .collect();
        let failures: Vec<Option<i32>> = steps
            .values()
            .map(|s| s.counters.map(|(_, failures)| saturating_i32(failures)))
            .collect();
        let held_ms: Vec<Option<i64>> = steps
            .values()
            .map(|s| {
                s.held_for
                    .map(|delay| i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
            })
            .collect();
        let origins: Vec<Option<BuildId>> = steps.values().map(|s| s.failure_origin).collect();
        execute(
            client,
            &prepared.update_steps,
            "recording step changes",
            &[
                &ids, &statuses, &finished, &started, &reasons, &losses, &failures, &held_ms,
                &origins,
            ],
        )
        .await
    }

    async fn insert_outputs(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        let outputs = &self.outputs;
        if outputs.is_empty() {
            return Ok(());
        }
        let steps: Vec<StepId> = outputs.iter().map(|(step, _)| *step).collect();
        let names: Vec<&str> = outputs.iter().map(|(_, o)| o.name.as_str()).collect();
        let paths: Vec<&str> = outputs.iter().map(|(_, o)| o.path.as_str()).collect();
        let hashes: Vec<&str> = outputs.iter().map(|(_, o)| o.nar_hash.as_str()).collect();
        let sizes: Vec<i64> = outputs
            .iter()
            .map(|(_, o)| i64::try_from(o.nar_size).unwrap_or(i64::MAX))
            .collect();
        execute(
            client,
            &prepared.insert_outputs,
            "recording step outputs",
            &[&steps, &names, &paths, &hashes, &sizes],
        )
        .await
    }

    async fn start_builds(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        if self.started_builds.is_empty() {
            return Ok(());
        }
        let ids: Vec<BuildId> = self.started_builds.iter().copied().collect();
        execute(
            client,
            &prepared.start_builds,
            "recording started builds",
            &[&ids],
        )
        .await
    }

    async fn finish_builds(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        let builds = &self.finished_builds;
        if builds.is_empty() {
            return Ok(());
        }
        let (ids, statuses, reasons) = status_columns(builds, BuildStatus::as_str);
        execute(
            client,
            &prepared.finish_builds,
            "recording finished builds",
            &[&ids, &statuses, &reasons],
        )
        .await
    }

    async fn record_pings(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        if self.pings.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.pings.keys().map(String::as_str).collect();
        let pings: Vec<&Ping> = self.pings.values().collect();
        let free: Vec<Option<i64>> = pings
            .iter()
            .map(|ping| {
                ping.free_disk_bytes
                    .map(|bytes| i64::try_from(bytes).unwrap_or(i64::MAX))
            })
            .collect();
        let low: Vec<bool> = pings.iter().map(|ping| ping.below_disk_floor).collect();
        let pressure: Vec<Option<f64>> = pings
            .iter()
            .map(|ping| ping.memory_pressure_percent)
            .collect();
        let pressed: Vec<bool> = pings
            .iter()
            .map(|ping| ping.under_memory_pressure)
            .collect();
        execute(
            client,
            &prepared.record_pings,
            "recording builder pings",
            &[&names, &free, &low, &pressure, &pressed],
        )
        .await
    }

    async fn record_durations(
        &self,
        client: &Transaction<'_>,
        prepared: &Prepared,
    ) -> Result<(), DbError> {
        if self.durations.is_empty() {
            return Ok(());
        }
        let packages: Vec<&str> = self
            .durations
            .keys()
            .map(|key| key.package.as_str())
            .collect();
        let systems: Vec<&str> = self
            .durations
            .keys()
            .map(|key| key.system.as_str())
            .collect();
        let samples: Vec<i32> = self
            .durations
            .values()
            .map(|(samples, _)| saturating_i32(*samples))
            .collect();
        let means: Vec<i64> = self
            .durations
            .values()
            .map(|(_, mean)| i64::try_from(*mean).unwrap_or(i64::MAX))
            .collect();
        execute(
            client,
            &prepared.record_durations,
            "recording learned step durations",
            &[&packages, &systems, &samples, &means],
        )
        .await
    }
}

/// The columns of rows that each end with a status and a reason: ids, status labels, reasons.
fn status_columns<Id: Copy, Status: Copy>(
    rows: &BTreeMap<Id, (Status, Option<String>)>,
    label: fn(Status) -> &'static str,
) -> (Vec<Id>, Vec<&'static str>, Vec<Option<&str>>) {
    let ids = rows.keys().copied().collect();
    let labels = rows.values().map(|(status, _)| label(*status)).collect();
    let reasons = rows.values().map(|(_, reason)| reason.as_deref()).collect();
    (ids, labels, reasons)
}

/// Runs one of the batch's statements.
async fn execute(
    client: &Transaction<'_>,
    statement: &Statement,
    what: &'static str,
    parameters: &[&(dyn ToSql + Sync)],
) -> Result<(), DbError> {
    client
        .execute(statement, parameters)
        .await
        .map_err(DbError::query(what))?;
    Ok(())
}

/// The id of the batch's transaction (assigning one if no write has yet).
const TRANSACTION_ID: &str = "SELECT pg_current_xact_id()::text::bigint";

/// The id of `client`'s transaction.
async fn transaction_id(client: &Transaction<'_>, prepared: &Prepared) -> Result<u64, DbError> {
    let row = client
        .query_one(&prepared.transaction_id, &[])
        .await
        .map_err(DbError::query("reading the batch's transaction id"))?;
    // Epoch and counter, far below 2^63.
    Ok(row.get::<_, i64>(0).cast_unsigned())
}

/// The batch's statements, prepared on one connection.
struct Prepared {
    transaction_id: Statement,
    insert_attempts: Statement,
    end_attempts: Statement,
    update_steps: Statement,
    insert_outputs: Statement,
    start_builds: Statement,
    finish_builds: Statement,
    record_pings: Statement,
    record_durations: Statement,
}

impl Prepared {
    /// Prepares every statement on `client`'s connection, once per connection.
    async fn on(client: &Transaction<'_>) -> Result<Self, DbError> {
        let prepare = |sql: &'static str| async move {
            client
                .prepare_cached(sql)
                .await
                .map_err(DbError::query("preparing the scheduler's statements"))
        };
        let (
            transaction_id,
            insert_attempts,
            end_attempts,
            update_steps,
            insert_outputs,
            start_builds,
            finish_builds,
            record_pings,
            record_durations,
        ) = tokio::try_join!(
            prepare(TRANSACTION_ID),
            prepare(INSERT_ATTEMPTS),
            prepare(END_ATTEMPTS),
            prepare(UPDATE_STEPS),
            prepare(INSERT_OUTPUTS),
            prepare(START_BUILDS),
            prepare(FINISH_BUILDS),
            prepare(RECORD_PINGS),
            prepare(RECORD_DURATIONS),
        )?;
        Ok(Self {
            transaction_id,
            insert_attempts,
            end_attempts,
            update_steps,
            insert_outputs,
            start_builds,
            finish_builds,
            record_pings,
            record_durations,
        })
    }
}

const INSERT_ATTEMPTS: &str =
    "INSERT INTO step_attempts (id, step_id, machine, status, finished_at, message, log_file)
     SELECT a.id, a.step, a.machine, a.status::attempt_status,
            CASE WHEN a.status <> 'running' THEN now() END, a.message, a.log
     FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
         AS a(id, step, machine, status, message, log)";

const END_ATTEMPTS: &str =
    "UPDATE step_attempts t SET status = e.status::attempt_status, finished_at = now(),
         message = e.message
     FROM unnest($1::uuid[], $2::text[], $3::text[]) AS e(id, status, message)
     WHERE t.id = e.id";

const UPDATE_STEPS: &str = "UPDATE steps s SET
         status = coalesce(c.status::step_status, s.status),
         started_at = CASE WHEN c.started THEN now() ELSE s.started_at END,
         finished_at = CASE WHEN c.status IS NULL THEN s.finished_at
                            WHEN c.finished THEN now() END,
         failure_reason = CASE WHEN c.status IS NULL THEN s.failure_reason
                               ELSE c.reason END,
         builder_losses = coalesce(c.losses, s.builder_losses),
         infrastructure_failures = coalesce(c.failures, s.infrastructure_failures),
         visible_after = coalesce(now() + c.held * interval '1 millisecond',
                                  s.visible_after),
         failed_build_id = CASE WHEN c.status IS NULL THEN coalesce(s.failed_build_id, c.origin)
                                ELSE c.origin END
     FROM unnest($1::bigint[], $2::text[], $3::bool[], $4::bool[], $5::text[], $6::int[],
                 $7::int[], $8::bigint[], $9::bigint[])
         AS c(id, status, finished, started, reason, losses, failures, held, origin)
     WHERE s.id = c.id";

const INSERT_OUTPUTS: &str =
    "INSERT INTO step_outputs (step_id, output_name, path, nar_hash, nar_size)
     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[])
     ON CONFLICT DO NOTHING";

const START_BUILDS: &str = "UPDATE builds SET status = 'running', started_at = now()
     WHERE id = ANY($1::bigint[]) AND status = 'queued'";

const FINISH_BUILDS: &str =
    "UPDATE builds b SET status = f.status::build_status, finished_at = now(),
         ingested_at = coalesce(b.ingested_at, now()), failure_reason = f.reason
     FROM unnest($1::bigint[], $2::text[], $3::text[]) AS f(id, status, reason)
     WHERE b.id = f.id AND b.finished_at IS NULL";

const RECORD_DURATIONS: &str = "INSERT INTO step_durations AS d (package, system, samples, mean_ms)
     SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[])
     ON CONFLICT (package, system) DO UPDATE
     SET samples = excluded.samples, mean_ms = excluded.mean_ms, updated_at = now()";

const RECORD_PINGS: &str = "UPDATE machines m SET last_ping_at = now(),
         free_disk_bytes = coalesce(p.free, m.free_disk_bytes), below_disk_floor = p.low,
         memory_pressure_percent = coalesce(p.pressure, m.memory_pressure_percent),
         under_memory_pressure = p.pressed
     FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::float8[], $5::boolean[])
          AS p(name, free, low, pressure, pressed)
     WHERE m.name = p.name";

fn saturating_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

async fn write_machine(client: &impl GenericClient, machine: &MachineWrite) -> Result<(), DbError> {
    match machine {
        MachineWrite::Joined {
            name,
            capabilities,
            nix_version,
        } => {
            let list = |set: &std::collections::BTreeSet<String>| set.iter().cloned().collect();
            let systems: Vec<String> = list(&capabilities.systems);
            let supported: Vec<String> = list(&capabilities.supported_features);
            let mandatory: Vec<String> = list(&capabilities.mandatory_features);
            let max_jobs = saturating_i32(capabilities.max_jobs);
            client
                .execute(
                    "INSERT INTO machines (name, systems, supported_features, mandatory_features,
                 max_jobs, speed_factor, nix_version, connected)
             VALUES ($1, $2, $3, $4, $5, $6, $7, true)
             ON CONFLICT (name) DO UPDATE SET systems = $2, supported_features = $3,
                 mandatory_features = $4, max_jobs = $5, speed_factor = $6,
                 nix_version = $7, connected = true, last_seen_at = now(),
                 below_disk_floor = false, under_memory_pressure = false",
                    &[
                        name,
                        &systems,
                        &supported,
                        &mandatory,
                        &max_jobs,
                        &capabilities.speed_factor,
                        nix_version,
                    ],
                )
                .await
                .map_err(DbError::query("recording a builder joining"))?;
        }
        MachineWrite::Left { name } => {
            client
                .execute(
                    "UPDATE machines SET connected = false, last_seen_at = now() WHERE name = $1",
                    &[name],
                )
                .await
                .map_err(DbError::query("recording a builder leaving"))?;
        }
        MachineWrite::Drained { name, drained } => {
            client
                .execute(
                    "UPDATE machines SET drained_at = CASE WHEN $2 THEN coalesce(drained_at, now()) END
                     WHERE name = $1",
                    &[name, drained],
                )
                .await
                .map_err(DbError::query("recording a builder drained or enabled"))?;
        }
        MachineWrite::Quarantined { name, quarantine } => {
            let (reason, cool_down_ms) = match quarantine {
                Some(imposed) => (
                    Some(imposed.reason.as_str()),
                    Some(i64::try_from(imposed.cool_down.as_millis()).unwrap_or(i64::MAX)),
                ),
                None => (None, None),
            };
            client
                .execute(
                    "UPDATE machines SET quarantined_at = CASE WHEN $2::text IS NOT NULL THEN now() END,
                         quarantine_reason = $2,
                         probation_from = now() + $3::bigint * interval '1 millisecond'
                     WHERE name = $1",
                    &[name, &reason, &cool_down_ms],
                )
                .await
                .map_err(DbError::query("recording a builder's quarantine"))?;
        }
    }
    Ok(())
}
