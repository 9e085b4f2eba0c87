//! Which client certificates are revoked, checked on every call ([`Revocations`]), and which
//! the runner has seen, recorded at each TLS handshake ([`Sightings`]).
//!
//! Revocation is by serial number, not identity: a builder renewing its certificate keeps its
//! name. The revoked serials are read at start and kept in memory, so a check costs a hash
//! lookup; a revocation is written to PostgreSQL first, then applied here, and wakes every
//! open builder tunnel, which ends itself if it was opened with that certificate.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use drover_tls::PeerCertificate;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::db::{DbError, Pool, certificates};

/// Handshakes waiting to be recorded; past this many, more are not recorded.
const SIGHTINGS_QUEUED: usize = 1024;

/// A certificate seen again within this long is not recorded again.
const SIGHTING_INTERVAL: Duration = Duration::from_mins(1);

/// The revoked serials, shared by every listener and session.
#[derive(Debug, Clone)]
pub struct Revocations {
    revoked: Arc<RwLock<HashSet<String>>>,
    /// Bumped at each revocation, so sessions look again.
    changed: watch::Sender<u64>,
}

impl Revocations {
    /// The serials revoked in the database.
    pub async fn load(pool: &Pool) -> Result<Self, DbError> {
        let client = pool.get().await.map_err(DbError::Connection)?;
        let revoked = certificates::revoked(&client).await?;
        Ok(Self::new(revoked))
    }

    /// A registry with `revoked` in it.
    #[must_use]
    pub fn new(revoked: impl IntoIterator<Item = String>) -> Self {
        Self {
            revoked: Arc::new(RwLock::new(revoked.into_iter().collect())),
            changed: watch::Sender::new(0),
        }
    }

    /// Whether `serial` is revoked.
    #[must_use]
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(serial)
    }

    /// Applies a revocation already written to the database.
    pub fn revoke(&self, serial: &str) {
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(serial.to_owned());
        self.changed.send_modify(|generation| *generation += 1);
    }

    /// Resolves once `serial` is revoked.
    pub async fn revoked(&self, serial: &str) {
        let mut changes = self.changed.subscribe();
        while !self.is_revoked(serial) {
            if changes.changed().await.is_err() {
                // The registry is gone with the runner: nothing is revoked any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Where handshakes are reported; recorded by [`record_sightings`].
#[derive(Debug, Clone)]
pub struct Sightings {
    sender: mpsc::Sender<PeerCertificate>,
}

impl Sightings {
    /// The reporting side and the receiving side for [`record_sightings`].
    #[must_use]
    pub fn channel() -> (Self, mpsc::Receiver<PeerCertificate>) {
        let (sender, receiver) = mpsc::channel(SIGHTINGS_QUEUED);
        (Self { sender }, receiver)
    }

    /// Reports a handshake with the certificate chain `chain` (the leaf first).
    pub fn handshake(&self, chain: Option<&[rustls::pki_types::CertificateDer<'_>]>) {
        let Some(peer) = chain
            .and_then(<[_]>::first)
            .and_then(|leaf| PeerCertificate::from_der(leaf.as_ref()).ok())
        else {
            return;
        };
        // A flood of handshakes records what fits; the rest is seen again later.
        let _ = self.sender.try_send(peer);
    }
}

/// Records reported handshakes until `shutdown`, each certificate at most once a
/// [`SIGHTING_INTERVAL`]; a failed write is logged and the sightings dropped (they are seen
/// again at the next handshake).
pub async fn record_sightings(
    pool: Pool,
    mut receiver: mpsc::Receiver<PeerCertificate>,
    shutdown: CancellationToken,
) {
    let mut recorded: HashMap<String, Instant> = HashMap::new();
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            count = receiver.recv_many(&mut batch, SIGHTINGS_QUEUED) => {
                if count == 0 {
                    return;
                }
            }
        }
        let now = Instant::now();
        recorded.retain(|_, at| now.duration_since(*at) < SIGHTING_INTERVAL);
        batch.retain(|peer| recorded.insert(peer.serial.clone(), now).is_none());
        if batch.is_empty() {
            continue;
        }
        let written = match pool.get().await {
            Ok(client) => certificates::record_seen(&client, &batch).await,
            Err(error) => Err(DbError::Connection(error)),
        };
        if let Err(error) = written {
            tracing::warn!(error = %error_context::report(&error), "recording certificates seen");
        }
        batch.clear();
    }
}
