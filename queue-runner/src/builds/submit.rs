//! Submit: verify the whole derivation closure and check the admission cap before writing
//! anything, then write the derivations and the build in one transaction, so a refused
//! submission leaves no trace; an idempotency key makes a retried Submit return the first one's
//! build.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use drover_daemon::traces;
use drover_proto::v1::{SourceNar, SubmitRequest};
use drover_scheduler::Requirements;
use drover_tls::Identity;
use error_context::{Classify, Severity};
use nix_primitives::StorePath;

use super::Builds;
use crate::cache::CacheError;
use crate::db::{self, DbError, queries};
use crate::scheduler::ingest::complete_closure;
use crate::verify::{self, Loaded, VerifiedClosure, VerifyError};

/// Why a Submit was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A derivation is larger than the runner accepts.
    #[error(
        "derivation {path} is {size} bytes, over this farm's limit of {limit} (submissions.max_derivation_bytes)"
    )]
    DerivationTooLarge {
        /// The derivation.
        path: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The closure does not verify.
    #[error("the submitted derivations do not verify")]
    Verify(#[from] VerifyError),
    /// The metadata cannot be stored.
    #[error("the metadata cannot be stored")]
    Metadata(#[source] serde_json::Error),
    /// An input source was refused or could not be stored.
    #[error("publishing an input source")]
    Source(#[from] CacheError),
    /// A source's path or references are not store paths.
    #[error("an input source names an invalid store path")]
    SourcePath(#[from] nix_primitives::store_path::StorePathError),
    /// A derivation needs a system or features no builder has ever offered.
    #[error(
        "{drv} needs system {system}{}, which no builder of this farm has ever offered \
         (submissions.refuse_unknown_systems)",
        if features.is_empty() { String::new() } else { format!(" with features {}", features.join(", ")) }
    )]
    UnknownSystem {
        /// The derivation.
        drv: String,
        /// Its system.
        system: String,
        /// Its required features.
        features: Vec<String>,
    },
    /// The farm has more steps queued than its admission cap allows.
    #[error(
        "the farm cannot take this build now: {queued} steps are queued, the cap is {cap} \
         (farm_limits.max_queued_steps, set by drover admin cap) and the build may add \
         {adding}; retry in {} s",
        ADMISSION_RETRY_AFTER.as_secs()
    )]
    FarmFull {
        /// Steps waiting or runnable.
        queued: i64,
        /// The cap.
        cap: i64,
        /// Steps the build may add (its closure's derivations).
        adding: i64,
    },
    /// The database failed.
    #[error("storing the build")]
    Database(#[from] DbError),
}

/// How long a client refused for lack of room is told to wait before it tries again.
pub const ADMISSION_RETRY_AFTER: Duration = Duration::from_secs(30);

impl Classify for SubmitError {
    fn severity(&self) -> Severity {
        match self {
            Self::DerivationTooLarge { .. }
            | Self::Verify(_)
            | Self::Metadata(_)
            | Self::SourcePath(_)
            | Self::UnknownSystem { .. }
            | Self::FarmFull { .. } => Severity::Reject,
            Self::Source(error) => error.severity(),
            Self::Database(error) => error.severity(),
        }
    }
}

impl Builds {
    /// Refuses a derivation larger than the farm accepts.
    pub(super) fn check_size(&self, path: &str, text: &[u8]) -> Result<(), SubmitError> {
        if text.len() > self.limits.max_derivation_bytes {
            return Err(SubmitError::DerivationTooLarge {
                path: path.to_owned(),
                size: text.len(),
                limit: self.limits.max_derivation_bytes,
            });
        }
        Ok(())
    }

    /// Refuses a submission that may add `adding` steps when the farm's queue would pass its
    /// admission cap. An empty queue takes any submission, so none is too large to ever be
    /// admitted.
    pub(super) async fn admit(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        adding: usize,
    ) -> Result<(), SubmitError> {
        let (queued, cap) = queries::queued_steps_and_cap(client).await?;
        let adding = i64::try_from(adding).unwrap_or(i64::MAX);
        if queued > 0 && queued.saturating_add(adding) > cap {
            return Err(SubmitError::FarmFull {
                queued,
                cap,
                adding,
            });
        }
        Ok(())
    }

    /// Publishes the sources of a submission, each after recomputing its path from its contents.
    pub(super) async fn publish_sources(&self, sources: Vec<SourceNar>) -> Result<(), SubmitError> {
        let mut parsed = Vec::with_capacity(sources.len());
        for source in sources {
            let path = StorePath::from_absolute(&source.path)?;
            let references = source
                .references
                .iter()
                .map(|reference| StorePath::from_absolute(reference))
                .collect::<Result<BTreeSet<_>, _>>()?;
            parsed.push((path, references, source.nar));
        }
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || {
            // Sources referring to other sources (toFile results) go after them: publish in
            // rounds until nothing is left, or nothing more can go (the cache then says which
            // reference is missing).
            while !parsed.is_empty() {
                let (ready, waiting): (Vec<_>, Vec<_>) =
                    parsed.into_iter().partition(|(path, references, _)| {
                        references
                            .iter()
                            .all(|reference| reference == path || cache.is_published(reference))
                    });
                let stuck = ready.is_empty();
                for (path, references, nar) in ready {
                    cache.publish_source(&path, references, &nar)?;
                }
                if stuck {
                    let (path, references, nar) = &waiting[0];
                    return cache.publish_source(path, references.clone(), nar);
                }
                parsed = waiting;
            }
            Ok(())
        })
        .await
        .map_err(|error| CacheError::Io(std::io::Error::other(error)))??;
        Ok(())
    }

    /// Queues a build for `caller`; returns its id and whether the idempotency key named an
    /// earlier one.
    pub async fn submit(
        &self,
        request: SubmitRequest,
        caller: &Identity,
    ) -> Result<(i64, bool), SubmitError> {
        // Before anything else, so a refused submission leaves nothing behind.
        for given in &request.derivations {
            self.check_size(&given.path, &given.text)?;
        }
        let submitted_by = caller.to_string();
        let key = (!request.idempotency_key.is_empty()).then_some(request.idempotency_key.as_str());
        let mut client = self.pool.get().await.map_err(DbError::Connection)?;
        if let Some(key) = key
            && let Some(existing) = queries::build_with_key(&client, &submitted_by, key).await?
        {
            return Ok((existing, true));
        }
        // The closure read below must still be there when the build commits.
        let planning = self.handoff.gate().plan().await;
        let top = verify::parse_path(&request.top_drv_path)?;
        let mut parsed = BTreeMap::new();
        let mut texts = Vec::with_capacity(request.derivations.len());
        for given in request.derivations {
            let path = verify::parse_path(&given.path)?;
            let derivation = verify::parse_derivation(&path, &given.text)?;
            parsed.insert(path.clone(), Loaded::Parsed(derivation));
            texts.push((path, given.text));
        }
        let mut closure = VerifiedClosure::default();
        complete_closure(&client, std::slice::from_ref(&top), &closure, &mut parsed).await??;
        let verified = closure.add(&top, &mut parsed)?;
        planning.name_derivations(closure.derivations.keys().map(StorePath::to_absolute));
        if self.limits.refuse_unknown_systems {
            refuse_unknown_systems(&client, &closure).await?;
        }
        self.admit(&client, closure.derivations.len()).await?;
        self.publish_sources(request.sources).await?;
        // What was given beyond the closure is not stored.
        let new: Vec<(String, Vec<u8>)> = texts
            .into_iter()
            .filter(|(path, _)| closure.derivations.contains_key(path))
            .map(|(path, text)| (path.to_absolute(), text))
            .collect();
        let metadata = serde_json::to_value(request.metadata).map_err(SubmitError::Metadata)?;
        let transaction = client
            .transaction()
            .await
            .map_err(DbError::query("starting a submission"))?;
        let (id, existing) = queries::insert_build(
            &transaction,
            &new,
            &queries::NewBuild {
                top: &top.to_absolute(),
                priority: request.priority,
                metadata: &metadata,
                submitted_by: &submitted_by,
                keep_going: request.keep_going,
                idempotency_key: key,
                trace_parent: &traces::traceparent(&tracing::Span::current()),
            },
        )
        .await?;
        if !existing {
            db::verified::store(&transaction, &verified).await?;
        }
        // Offered before the commit, so ingest (woken by the commit) finds it.
        let offered = !existing && self.handoff.offer(id, closure);
        if let Err(error) = transaction.commit().await {
            if offered {
                self.handoff.withdraw(id);
            }
            return Err(DbError::query("committing a submission")(error).into());
        }
        drop(planning);
        if !existing {
            tracing::info!(build = id, top = %top, derivations = new.len(), "build submitted");
        }
        Ok((id, existing))
    }
}

/// Refuses a closure with a derivation whose system and features no builder that ever joined
/// offered; a farm no builder has joined yet refuses nothing.
pub(super) async fn refuse_unknown_systems(
    client: &impl deadpool_postgres::GenericClient,
    closure: &verify::VerifiedClosure,
) -> Result<(), SubmitError> {
    let machines = queries::known_machines(client).await?;
    if machines.is_empty() {
        return Ok(());
    }
    // The first refused path in store order, so the same closure is always refused the same way.
    let refused = closure
        .derivations
        .iter()
        .filter(|(_, verified)| {
            let requirements = Requirements {
                system: verified.system.clone(),
                features: verified.features.clone(),
            };
            !machines
                .iter()
                .any(|machine| machine.can_run(&requirements))
        })
        .min_by(|(a, _), (b, _)| a.cmp(b));
    if let Some((path, verified)) = refused {
        return Err(SubmitError::UnknownSystem {
            drv: path.to_absolute(),
            system: verified.system.clone(),
            features: verified.features.iter().cloned().collect(),
        });
    }
    Ok(())
}
