//! `BuildService`: submitting builds, reading and listing them, cancelling and restarting them.
//! Submit verifies the whole derivation closure and checks the admission cap before it writes
//! anything, and writes the derivations and the build in one transaction, so a refused
//! submission leaves no trace; an idempotency key makes a retried Submit return the first one's
//! build. Cancel goes to the scheduler, which owns every running build; restart queues an ended
//! build again for ingest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::build_service_server::BuildService;
use drover_proto::v1::{
    CancelRequest, CancelResponse, FollowLogRequest, GetLogRequest, GetLogResponse, GetRequest,
    GetResponse, ListRequest, ListResponse, RestartRequest, RestartResponse, SourceNar,
    SubmitRequest, SubmitResponse, WatchRequest,
};
use drover_scheduler::{Event, Requirements};
use drover_tls::{Identity, Role};
use error_context::{Classify, Severity};
use nix_primitives::StorePath;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::{auth, build_view, follow_log, watch};
use crate::cache::{BinaryCache, CacheError};
use crate::db::queries;
use crate::db::status::BuildStatus as QueueBuildStatus;
use crate::db::{DbError, Pool};
use crate::logs::LogStore;
use crate::scheduler::driver::{CommittedChanges, SessionEvent};
use crate::scheduler::handoff::Handoff;
use crate::scheduler::ingest::complete_closure;
use crate::verify::{self, VerifyError};

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
         (farm_limits.max_queued_steps) and the build may add {adding}; retry in {} s",
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
const ADMISSION_RETRY_AFTER: Duration = Duration::from_secs(30);

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

impl From<SubmitError> for Status {
    fn from(error: SubmitError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            SubmitError::Verify(VerifyError::Unsupported { .. })
            | SubmitError::UnknownSystem { .. } => Status::failed_precondition(message),
            SubmitError::Source(CacheError::Io(_) | CacheError::NarInfo(_)) => {
                Status::internal(message)
            }
            SubmitError::DerivationTooLarge { .. }
            | SubmitError::Verify(_)
            | SubmitError::Metadata(_)
            | SubmitError::Source(_)
            | SubmitError::SourcePath(_) => Status::invalid_argument(message),
            SubmitError::FarmFull { .. } => Status::with_error_details(
                tonic::Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(ADMISSION_RETRY_AFTER)),
            ),
            SubmitError::Database(_) => Status::unavailable(message),
        }
    }
}

/// The build service.
pub struct BuildServiceImpl {
    pool: Pool,
    logs: LogStore,
    cache: Arc<BinaryCache>,
    handoff: Handoff,
    /// The largest derivation accepted (`submissions.max_derivation_bytes`).
    max_derivation_bytes: usize,
    /// Where cancels go: the scheduler, which owns every running build.
    scheduler: mpsc::Sender<SessionEvent>,
    /// What the scheduler and ingest commit, for Watch streams.
    changes: CommittedChanges,
    /// How often an idle Watch stream sends a heartbeat.
    heartbeat: Duration,
    /// Whether submissions needing a system or feature no builder ever offered are refused.
    refuse_unknown_systems: bool,
}

/// Roles that may use the build service.
const CALLERS: &[Role] = &[Role::Client, Role::Admin];

impl BuildServiceImpl {
    /// A service over `pool`; verified closures go to ingest through `handoff`; derivations
    /// over `max_derivation_bytes` are refused; Watch streams follow `changes` and send a
    /// heartbeat every `heartbeat` when idle.
    #[must_use]
    pub fn new(
        pool: Pool,
        logs: LogStore,
        cache: Arc<BinaryCache>,
        handoff: Handoff,
        (max_derivation_bytes, refuse_unknown_systems): (usize, bool),
        scheduler: mpsc::Sender<SessionEvent>,
        (changes, heartbeat): (CommittedChanges, Duration),
    ) -> Self {
        Self {
            pool,
            logs,
            cache,
            handoff,
            max_derivation_bytes,
            scheduler,
            changes,
            heartbeat,
            refuse_unknown_systems,
        }
    }

    /// A database connection, or `UNAVAILABLE`.
    async fn client(&self) -> Result<deadpool_postgres::Client, Status> {
        self.pool
            .get()
            .await
            .map_err(|error| unavailable(&DbError::Connection(error)))
    }

    /// Checks that `identity` may cancel or restart `build` (its submitter, or an admin); its
    /// status if so.
    async fn owned(&self, identity: &Identity, build: i64) -> Result<QueueBuildStatus, Status> {
        let client = self.client().await?;
        let (submitted_by, status) = queries::build_owner(&client, build)
            .await
            .map_err(|error| unavailable(&error))?
            .ok_or_else(|| Status::not_found(format!("no build {build}")))?;
        if identity.role == Role::Admin || submitted_by.as_deref() == Some(&identity.to_string()) {
            Ok(status)
        } else {
            Err(Status::permission_denied(format!(
                "build {build} was submitted by {}; only it and admins may change it",
                submitted_by.as_deref().unwrap_or("SQL")
            )))
        }
    }

    /// Publishes the sources of a submission, each after recomputing its path from its contents.
    async fn publish_sources(&self, sources: Vec<SourceNar>) -> Result<(), SubmitError> {
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

    /// Queues a build; returns its id and whether the idempotency key named an earlier one.
    async fn submit(
        &self,
        request: SubmitRequest,
        caller: &Identity,
    ) -> Result<(i64, bool), SubmitError> {
        // Before anything else, so a refused submission leaves nothing behind.
        if let Some(large) = request
            .derivations
            .iter()
            .find(|given| given.text.len() > self.max_derivation_bytes)
        {
            return Err(SubmitError::DerivationTooLarge {
                path: large.path.clone(),
                size: large.text.len(),
                limit: self.max_derivation_bytes,
            });
        }
        let submitted_by = caller.to_string();
        let key = (!request.idempotency_key.is_empty()).then_some(request.idempotency_key.as_str());
        let mut client = self.pool.get().await.map_err(DbError::Connection)?;
        if let Some(key) = key
            && let Some(existing) = queries::build_with_key(&client, &submitted_by, key).await?
        {
            return Ok((existing, true));
        }
        let top = verify::parse_path(&request.top_drv_path)?;
        let mut parsed = BTreeMap::new();
        for given in request.derivations {
            let path = verify::parse_path(&given.path)?;
            let derivation = verify::parse_derivation(&path, &given.text)?;
            parsed.insert(path, (given.text, derivation));
        }
        let submitted: Vec<_> = parsed.keys().cloned().collect();
        complete_closure(&client, &top, &mut parsed).await??;
        let closure = verify::verify_closure(&top, parsed)?;
        if self.refuse_unknown_systems {
            refuse_unknown_systems(&client, &closure).await?;
        }
        let (queued, cap) = queries::queued_steps_and_cap(&client).await?;
        let adding = i64::try_from(closure.derivations.len()).unwrap_or(i64::MAX);
        // An empty queue takes any build, so no build is too large to ever be admitted.
        if queued > 0 && queued.saturating_add(adding) > cap {
            return Err(SubmitError::FarmFull {
                queued,
                cap,
                adding,
            });
        }
        self.publish_sources(request.sources).await?;
        let new: Vec<(String, Vec<u8>)> = submitted
            .iter()
            .filter_map(|path| {
                closure
                    .derivations
                    .get(path)
                    .map(|verified| (path.to_absolute(), verified.text.clone()))
            })
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
            },
        )
        .await?;
        // Offered before the commit, so ingest (woken by the commit) finds it.
        let offered = !existing && self.handoff.offer(id, closure);
        if let Err(error) = transaction.commit().await {
            if offered {
                self.handoff.withdraw(id);
            }
            return Err(DbError::query("committing a submission")(error).into());
        }
        if !existing {
            tracing::info!(build = id, top = %top, derivations = new.len(), "build submitted");
        }
        Ok((id, existing))
    }
}

/// Refuses a closure with a derivation whose system and features no builder that ever joined
/// offered; a farm no builder has joined yet refuses nothing.
async fn refuse_unknown_systems(
    client: &impl deadpool_postgres::GenericClient,
    closure: &verify::VerifiedClosure,
) -> Result<(), SubmitError> {
    let machines = queries::known_machines(client).await?;
    if machines.is_empty() {
        return Ok(());
    }
    for (path, verified) in &closure.derivations {
        let requirements = Requirements {
            system: String::from_utf8_lossy(&verified.derivation.system).into_owned(),
            features: verified.features.clone(),
        };
        if !machines
            .iter()
            .any(|machine| machine.can_run(&requirements))
        {
            return Err(SubmitError::UnknownSystem {
                drv: path.to_absolute(),
                system: requirements.system,
                features: requirements.features.into_iter().collect(),
            });
        }
    }
    Ok(())
}

/// A build's whole state, as Get answers: `NOT_FOUND` if there is no such build.
async fn build_state(pool: &Pool, id: i64) -> Result<GetResponse, Status> {
    let client = pool
        .get()
        .await
        .map_err(|error| unavailable(&DbError::Connection(error)))?;
    let build = queries::build(&client, id)
        .await
        .map_err(|error| unavailable(&error))?
        .ok_or_else(|| Status::not_found(format!("no build {id}")))?;
    let steps = queries::build_steps(&client, id)
        .await
        .map_err(|error| unavailable(&error))?;
    let status = build_view::wire_status(&build.status);
    Ok(GetResponse {
        build_id: id,
        status: status.into(),
        top_drv_path: build.drv_path,
        metadata: serde_json::from_value(build.metadata).unwrap_or_default(),
        failure_reason: build.failure_reason.unwrap_or_default(),
        outputs: build.outputs.into_iter().collect(),
        phase: status.phase().into(),
        steps: steps.into_iter().map(build_view::step_state).collect(),
    })
}

/// `UNAVAILABLE` with a database failure's whole chain.
pub(super) fn unavailable(error: &DbError) -> Status {
    Status::unavailable(error_context::report(error).to_string())
}

#[tonic::async_trait]
impl BuildService for BuildServiceImpl {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let submitter = auth::require(&request, CALLERS)?;
        let (build_id, existing) = self.submit(request.into_inner(), &submitter).await?;
        Ok(Response::new(SubmitResponse { build_id, existing }))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let build = request.into_inner().build_id;
        let status = self.owned(&caller, build).await?;
        if status.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "build {build} already ended {status}"
            )));
        }
        let cancel = Event::CancelBuild {
            build,
            by: caller.to_string(),
        };
        self.scheduler
            .send(SessionEvent::Core(cancel))
            .await
            .map_err(|_| Status::unavailable("the runner is shutting down"))?;
        tracing::info!(build, by = %caller, "build cancelled");
        Ok(Response::new(CancelResponse {}))
    }

    async fn restart(
        &self,
        request: Request<RestartRequest>,
    ) -> Result<Response<RestartResponse>, Status> {
        let caller = auth::require(&request, CALLERS)?;
        let build = request.into_inner().build_id;
        self.owned(&caller, build).await?;
        // Told first, so a plan for it after the restart is not taken for a stale one.
        self.scheduler
            .send(SessionEvent::Core(Event::RestartBuild { build }))
            .await
            .map_err(|_| Status::unavailable("the runner is shutting down"))?;
        let mut client = self.client().await?;
        let restarted = queries::restart_build(&mut client, build)
            .await
            .map_err(|error| unavailable(&error))?;
        if !restarted {
            return Err(Status::failed_precondition(format!(
                "build {build} has not failed or been cancelled: only those can be restarted"
            )));
        }
        tracing::info!(build, by = %caller, "build restarted");
        Ok(Response::new(RestartResponse {}))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let id = request.into_inner().build_id;
        Ok(Response::new(build_state(&self.pool, id).await?))
    }

    type WatchStream = watch::WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        auth::require(&request, CALLERS)?;
        let build = request.into_inner().build_id;
        let pool = self.pool.clone();
        let read_state: watch::StateReader = Arc::new(move |build| {
            let pool = pool.clone();
            Box::pin(async move { build_state(&pool, build).await })
        });
        let stream = watch::open(build, &self.changes, read_state, self.heartbeat).await?;
        Ok(Response::new(stream))
    }

    type FollowLogStream = follow_log::LogStream;

    async fn follow_log(
        &self,
        request: Request<FollowLogRequest>,
    ) -> Result<Response<Self::FollowLogStream>, Status> {
        auth::require(&request, CALLERS)?;
        let drv_path = request.into_inner().drv_path;
        let stream = follow_log::open(
            self.pool.clone(),
            self.logs.clone(),
            drv_path,
            self.heartbeat,
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let filter = build_view::filter(request.get_ref())?;
        let client = self.client().await?;
        let rows = queries::list_builds(&client, &filter)
            .await
            .map_err(|error| unavailable(&error))?;
        let next_page_token = build_view::next_page_token(&rows, &filter);
        Ok(Response::new(ListResponse {
            builds: rows.into_iter().map(build_view::summary).collect(),
            next_page_token,
        }))
    }

    async fn get_log(
        &self,
        request: Request<GetLogRequest>,
    ) -> Result<Response<GetLogResponse>, Status> {
        auth::require(&request, CALLERS)?;
        let drv_path = request.into_inner().drv_path;
        let client = self.client().await?;
        let file = queries::latest_log_file(&client, &drv_path)
            .await
            .map_err(|error| unavailable(&error))?
            .ok_or_else(|| Status::not_found(format!("no log for {drv_path}")))?;
        let log = self.logs.read(&file).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                return Status::not_found(format!("no log for {drv_path} yet"));
            }
            tracing::error!(%file, %error, "reading a stored log failed");
            Status::internal("reading the stored log failed")
        })?;
        Ok(Response::new(GetLogResponse { log }))
    }
}
