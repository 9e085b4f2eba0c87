//! Writing a batch of the scheduler core's changes: [`Transitions`] folds a batch into one final
//! row per step, attempt and build (a step that became runnable and started in the same batch
//! is written once, as running), and [`Transitions::write`] stores it with one statement of
//! data-modifying CTEs over arrays, in one transaction with the rare machine changes. A dispatch
//! costs one row in each of `step_attempts` and `steps`; a completion the same plus its outputs,
//! whatever the batch size.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use drover_scheduler::{AttemptId, BuildId, Capabilities, Change, OutputRecord, StepId};

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
}

/// An attempt dispatched in this batch, possibly already ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NewAttempt {
    step: StepId,
    machine: String,
    status: AttemptStatus,
    message: Option<String>,
}

/// A builder joining or leaving: rare, written one by one, in order.
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
}

/// One batch of changes, folded.
#[derive(Debug, Default)]
pub struct Transitions {
    steps: BTreeMap<StepId, StepWrite>,
    new_attempts: BTreeMap<AttemptId, NewAttempt>,
    ended_attempts: BTreeMap<AttemptId, (AttemptStatus, Option<String>)>,
    outputs: Vec<(StepId, OutputRecord)>,
    builds: BTreeMap<BuildId, (BuildStatus, Option<String>)>,
    machines: Vec<MachineWrite>,
    pings: BTreeMap<String, Option<u64>>,
}

impl Transitions {
    /// Whether there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
            && self.new_attempts.is_empty()
            && self.ended_attempts.is_empty()
            && self.outputs.is_empty()
            && self.builds.is_empty()
            && self.machines.is_empty()
            && self.pings.is_empty()
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
            Change::BuildFinished {
                build,
                status,
                reason,
            } => {
                self.builds.entry(build).or_insert((status, reason));
            }
            Change::MachineJoined {
                name,
                capabilities,
                nix_version,
            } => self.machines.push(MachineWrite::Joined {
                name,
                capabilities,
                nix_version,
            }),
            Change::MachineLeft { name } => self.machines.push(MachineWrite::Left { name }),
            Change::MachinePinged {
                name,
                free_disk_bytes,
            } => {
                self.pings.insert(name, free_disk_bytes);
            }
        }
    }

    /// Writes the batch in one transaction.
    pub async fn write(&self, client: &mut deadpool_postgres::Client) -> Result<(), DbError> {
        let transaction = client
            .transaction()
            .await
            .map_err(DbError::query("starting a batch of scheduler changes"))?;
        for machine in &self.machines {
            write_machine(&transaction, machine).await?;
        }
        self.write_rows(&transaction).await?;
        transaction
            .commit()
            .await
            .map_err(DbError::query("committing a batch of scheduler changes"))
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one statement's 28 array parameters, each built in a line or two"
    )]
    async fn write_rows(&self, client: &impl GenericClient) -> Result<(), DbError> {
        let attempts = &self.new_attempts;
        let new_ids: Vec<AttemptId> = attempts.keys().copied().collect();
        let new_steps: Vec<StepId> = attempts.values().map(|a| a.step).collect();
        let new_machines: Vec<&str> = attempts.values().map(|a| a.machine.as_str()).collect();
        let new_statuses: Vec<&str> = attempts.values().map(|a| a.status.as_str()).collect();
        let new_messages: Vec<Option<&str>> =
            attempts.values().map(|a| a.message.as_deref()).collect();
        let new_logs: Vec<String> = new_ids.iter().map(|id| LogStore::file_name(*id)).collect();

        let ended_ids: Vec<AttemptId> = self.ended_attempts.keys().copied().collect();
        let ended_statuses: Vec<&str> = self
            .ended_attempts
            .values()
            .map(|(status, _)| status.as_str())
            .collect();
        let ended_messages: Vec<Option<&str>> = self
            .ended_attempts
            .values()
            .map(|(_, message)| message.as_deref())
            .collect();

        let step_ids: Vec<StepId> = self.steps.keys().copied().collect();
        let step_statuses: Vec<Option<&str>> = self
            .steps
            .values()
            .map(|s| s.status.map(StepStatus::as_str))
            .collect();
        let step_finished: Vec<bool> = self
            .steps
            .values()
            .map(|s| s.status.is_some_and(StepStatus::is_terminal))
            .collect();
        let step_started: Vec<bool> = self.steps.values().map(|s| s.started).collect();
        let step_reasons: Vec<Option<&str>> =
            self.steps.values().map(|s| s.reason.as_deref()).collect();
        let losses: Vec<Option<i32>> = self
            .steps
            .values()
            .map(|s| s.counters.map(|(losses, _)| saturating_i32(losses)))
            .collect();
        let failures: Vec<Option<i32>> = self
            .steps
            .values()
            .map(|s| s.counters.map(|(_, failures)| saturating_i32(failures)))
            .collect();
        let held_ms: Vec<Option<i64>> = self
            .steps
            .values()
            .map(|s| {
                s.held_for
                    .map(|delay| i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
            })
            .collect();
        let started_steps: Vec<StepId> = self
            .steps
            .iter()
            .filter(|(_, s)| s.started)
            .map(|(id, _)| *id)
            .collect();

        let output_steps: Vec<StepId> = self.outputs.iter().map(|(step, _)| *step).collect();
        let output_names: Vec<&str> = self.outputs.iter().map(|(_, o)| o.name.as_str()).collect();
        let output_paths: Vec<&str> = self.outputs.iter().map(|(_, o)| o.path.as_str()).collect();
        let output_hashes: Vec<&str> = self
            .outputs
            .iter()
            .map(|(_, o)| o.nar_hash.as_str())
            .collect();
        let output_sizes: Vec<i64> = self
            .outputs
            .iter()
            .map(|(_, o)| i64::try_from(o.nar_size).unwrap_or(i64::MAX))
            .collect();

        let build_ids: Vec<BuildId> = self.builds.keys().copied().collect();
        let build_statuses: Vec<&str> = self.builds.values().map(|(s, _)| s.as_str()).collect();
        let build_reasons: Vec<Option<&str>> =
            self.builds.values().map(|(_, r)| r.as_deref()).collect();

        let ping_names: Vec<&str> = self.pings.keys().map(String::as_str).collect();
        let ping_free: Vec<Option<i64>> = self
            .pings
            .values()
            .map(|free| free.map(|bytes| i64::try_from(bytes).unwrap_or(i64::MAX)))
            .collect();

        client
            .execute(
                "WITH new_attempts AS (
                     INSERT INTO step_attempts (id, step_id, machine, status, finished_at, message,
                         log_file)
                     SELECT a.id, a.step, a.machine, a.status::attempt_status,
                            CASE WHEN a.status <> 'running' THEN now() END, a.message, a.log
                     FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                                 $27::text[])
                         AS a(id, step, machine, status, message, log)),
                 ended_attempts AS (
                     UPDATE step_attempts t SET status = e.status::attempt_status,
                         finished_at = now(), message = e.message
                     FROM unnest($6::uuid[], $7::text[], $8::text[]) AS e(id, status, message)
                     WHERE t.id = e.id),
                 step_changes AS (
                     UPDATE steps s SET
                         status = coalesce(c.status::step_status, s.status),
                         started_at = CASE WHEN c.started THEN now() ELSE s.started_at END,
                         finished_at = CASE WHEN c.status IS NULL THEN s.finished_at
                                            WHEN c.finished THEN now() END,
                         failure_reason = CASE WHEN c.status IS NULL THEN s.failure_reason
                                               ELSE c.reason END,
                         builder_losses = coalesce(c.losses, s.builder_losses),
                         infrastructure_failures = coalesce(c.failures, s.infrastructure_failures),
                         visible_after = coalesce(now() + c.held * interval '1 millisecond',
                                                  s.visible_after)
                     FROM unnest($9::bigint[], $10::text[], $11::bool[], $12::bool[], $13::text[],
                                 $14::int[], $15::int[], $28::bigint[])
                         AS c(id, status, finished, started, reason, losses, failures, held)
                     WHERE s.id = c.id),
                 outputs AS (
                     INSERT INTO step_outputs (step_id, output_name, path, nar_hash, nar_size)
                     SELECT * FROM unnest($16::bigint[], $17::text[], $18::text[], $19::text[],
                                          $20::bigint[])
                     ON CONFLICT DO NOTHING),
                 finished_builds AS (
                     UPDATE builds b SET status = f.status::build_status, finished_at = now(),
                         ingested_at = coalesce(b.ingested_at, now()), failure_reason = f.reason
                     FROM unnest($21::bigint[], $22::text[], $23::text[]) AS f(id, status, reason)
                     WHERE b.id = f.id AND b.finished_at IS NULL),
                 pings AS (
                     UPDATE machines m SET last_ping_at = now(),
                         free_disk_bytes = coalesce(p.free, m.free_disk_bytes)
                     FROM unnest($24::text[], $25::bigint[]) AS p(name, free)
                     WHERE m.name = p.name)
                 UPDATE builds SET status = 'running', started_at = now()
                 WHERE status = 'queued' AND id <> ALL($21::bigint[])
                     AND id IN (SELECT build_id FROM build_steps WHERE step_id = ANY($26::bigint[]))",
                &[
                    &new_ids,
                    &new_steps,
                    &new_machines,
                    &new_statuses,
                    &new_messages,
                    &ended_ids,
                    &ended_statuses,
                    &ended_messages,
                    &step_ids,
                    &step_statuses,
                    &step_finished,
                    &step_started,
                    &step_reasons,
                    &losses,
                    &failures,
                    &output_steps,
                    &output_names,
                    &output_paths,
                    &output_hashes,
                    &output_sizes,
                    &build_ids,
                    &build_statuses,
                    &build_reasons,
                    &ping_names,
                    &ping_free,
                    &started_steps,
                    &new_logs,
                    &held_ms,
                ],
            )
            .await
            .map_err(DbError::query("writing a batch of scheduler changes"))?;
        Ok(())
    }
}

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
                         nix_version = $7, connected = true, last_seen_at = now()",
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
    }
    Ok(())
}
