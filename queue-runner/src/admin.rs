//! The admin API's use cases: listing builders, draining and enabling them, imposing and
//! lifting quarantines, setting a build's global priority and the admission cap, pinning a
//! build's outputs in the cache, listing the certificates seen and revoking one. Decisions go to the scheduler, which owns every builder's standing and the
//! queue's order; each call returns once the decision is committed, so it survives a restart of
//! the runner. Callers are authenticated by the front end (role admin).

use std::time::Instant;

use drover_scheduler::Event;
use drover_tls::Identity;
use tokio::sync::{mpsc, oneshot};

use crate::certificates::Revocations;
use crate::db::certificates::{self, CertificateRow};
use crate::db::machines::{self, MachineStatus};
use crate::db::{DbError, Pool, queries, retention};
use crate::scheduler::driver::SessionEvent;

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No builder of that name ever joined.
    #[error("no builder named {0:?} has ever joined")]
    NoSuchMachine(String),
    /// There is no such build.
    #[error("no build {0}")]
    NoSuchBuild(i64),
    /// The build has ended: its priority no longer matters.
    #[error("build {0} has ended: only a queued or running build has a place in line")]
    BuildEnded(i64),
    /// The cap is larger than the schema holds.
    #[error("an admission cap of {0} steps is more than the farm can count (at most {max})", max = i32::MAX)]
    Cap(u32),
    /// The serial is not one a certificate can have.
    #[error("{0:?} is not a certificate serial number (hex digits, as drover admin certs shows)")]
    Serial(String),
    /// The scheduler no longer takes decisions.
    #[error("the runner is shutting down")]
    ShuttingDown,
    /// The database failed.
    #[error("reading or changing the farm's state")]
    Database(#[from] DbError),
}

/// What an admin does to a builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// No new work until enabled.
    Drain,
    /// Work again.
    Enable,
    /// Quarantined as after failures.
    Quarantine,
    /// Its quarantine lifted.
    Lift,
}

/// The admin API over the runner's database and scheduler.
#[derive(Clone)]
pub struct Admin {
    pool: Pool,
    scheduler: mpsc::Sender<SessionEvent>,
    revocations: Revocations,
}

impl Admin {
    /// The admin API over these parts.
    #[must_use]
    pub fn new(
        pool: Pool,
        scheduler: mpsc::Sender<SessionEvent>,
        revocations: Revocations,
    ) -> Self {
        Self {
            pool,
            scheduler,
            revocations,
        }
    }

    /// Sets the admission cap for `caller`; returns the previous cap and the steps queued now.
    pub async fn set_admission_cap(
        &self,
        caller: &Identity,
        max_queued_steps: u32,
    ) -> Result<(u32, u64), AdminError> {
        let cap = i32::try_from(max_queued_steps).map_err(|_| AdminError::Cap(max_queued_steps))?;
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let (previous, queued) = queries::set_admission_cap(&client, cap).await?;
        tracing::info!(cap, previous, queued, by = %caller, "admission cap set");
        Ok((
            u32::try_from(previous).unwrap_or(0),
            u64::try_from(queued).unwrap_or(0),
        ))
    }

    /// Every certificate seen at a handshake, or revoked.
    pub async fn certificates(&self) -> Result<Vec<CertificateRow>, AdminError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        Ok(certificates::all(&client).await?)
    }

    /// Revokes the certificate `serial` for `caller`: every later call with it is refused, and
    /// a builder's tunnel opened with it ends now (its steps are requeued at once). Returns the
    /// identity it names, if it was ever seen. Revoking it again changes nothing.
    pub async fn revoke(
        &self,
        caller: &Identity,
        serial: &str,
    ) -> Result<Option<(String, String)>, AdminError> {
        // As `openssl x509 -noout -serial` prints it (`serial=0A1B…`), or with colons; stored in
        // lowercase without leading zeros, as handshakes record it.
        let given = serial;
        let serial = given.trim().to_lowercase().replace(':', "");
        let serial = serial.strip_prefix("serial=").unwrap_or(&serial);
        let serial = serial.strip_prefix("0x").unwrap_or(serial);
        let serial = serial.trim_start_matches('0');
        if serial.is_empty() || !serial.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(AdminError::Serial(given.to_owned()));
        }
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let named = certificates::revoke(&client, serial, &caller.to_string()).await?;
        self.revocations.revoke(serial);
        tracing::warn!(serial, ?named, by = %caller, "certificate revoked");
        Ok(named)
    }

    /// Every builder that ever joined.
    pub async fn machines(&self) -> Result<Vec<MachineStatus>, AdminError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        Ok(machines::all(&client).await?)
    }

    /// Steers the builder `name` for `caller`; returns it as it is after the change.
    pub async fn steer(
        &self,
        caller: &Identity,
        name: &str,
        steer: Steer,
    ) -> Result<MachineStatus, AdminError> {
        self.machine(name).await?;
        let name = name.to_owned();
        let event = match steer {
            Steer::Drain | Steer::Enable => Event::SetDrained {
                name: name.clone(),
                drained: steer == Steer::Drain,
            },
            Steer::Quarantine | Steer::Lift => Event::SetQuarantine {
                name: name.clone(),
                quarantined: steer == Steer::Quarantine,
                by: caller.to_string(),
                at: Instant::now(),
            },
        };
        self.decide(event).await?;
        tracing::info!(builder = %name, ?steer, by = %caller, "builder steered");
        self.machine(&name).await
    }

    /// Sets the global priority of a queued or running build.
    pub async fn set_global_priority(
        &self,
        caller: &Identity,
        build: i64,
        priority: i32,
    ) -> Result<(), AdminError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        let status = queries::set_global_priority(&client, build, priority)
            .await?
            .ok_or(AdminError::NoSuchBuild(build))?;
        if status.is_terminal() {
            return Err(AdminError::BuildEnded(build));
        }
        self.decide(Event::SetGlobalPriority { build, priority })
            .await?;
        tracing::info!(build, priority, by = %caller, "global priority set");
        Ok(())
    }

    /// Pins a build's outputs in the cache, or unpins them.
    pub async fn pin_build(
        &self,
        caller: &Identity,
        build: i64,
        pinned: bool,
    ) -> Result<(), AdminError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        if !retention::pin(&client, build, pinned, &caller.to_string()).await? {
            return Err(AdminError::NoSuchBuild(build));
        }
        tracing::info!(build, pinned, by = %caller, "build pinned or unpinned");
        Ok(())
    }

    async fn machine(&self, name: &str) -> Result<MachineStatus, AdminError> {
        let client = self.pool.get().await.map_err(DbError::Connection)?;
        machines::one(&client, name)
            .await?
            .ok_or_else(|| AdminError::NoSuchMachine(name.to_owned()))
    }

    /// Hands `event` to the scheduler and waits until what it changed is committed.
    async fn decide(&self, event: Event) -> Result<(), AdminError> {
        let (done, committed) = oneshot::channel();
        self.scheduler
            .send(SessionEvent::Steer { event, done })
            .await
            .map_err(|_| AdminError::ShuttingDown)?;
        committed.await.map_err(|_| AdminError::ShuttingDown)
    }
}
