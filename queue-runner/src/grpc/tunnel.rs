//! `BuilderService`: the control tunnel of each builder (one [`BuilderSession`] per connection)
//! and the log upload. Handlers authenticate from the certificate, check the API version, and hand
//! everything that changes state to the scheduler.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_proto::API_VERSION;
use drover_proto::v1::builder_message::Message as Inbound;
use drover_proto::v1::builder_service_server::BuilderService;
use drover_proto::v1::runner_message::Message as Outbound;
use drover_proto::v1::{
    BuilderMessage, Join, Joined, LogChunk, NarChunk, RunnerMessage, StepOutcome, StepResult,
    UploadLogResponse, UploadNarResponse,
};
use drover_tls::Role;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::{auth, upload};
use crate::cache::BinaryCache;
use crate::db::Pool;
use crate::db::queries::{self, OutputRow};
use crate::logs::LogStore;
use crate::scheduler::attempts::{AttemptOwner, Attempts};
use crate::scheduler::machines::{Capabilities, OutboxItem};
use crate::scheduler::{Event, Outcome};
use crate::tasks;

/// Messages queued for one builder beyond its job slots: Joined, pings and aborts. The scheduler
/// never sends more Build messages than the builder has slots, so this bound is never reached by
/// a builder that reads its tunnel.
const OUTBOX_SLACK: usize = 16;

/// NAR uploads received at once, across all builders. Each holds a blocking thread while it
/// streams into the cache; past this many, uploads are refused with `RESOURCE_EXHAUSTED` and the
/// builder retries the step elsewhere rather than starving the runner of threads.
const MAX_CONCURRENT_UPLOADS: usize = 64;

/// Largest `max_jobs` a builder may claim; bounds its outbox.
const MAX_JOBS_LIMIT: u32 = 1024;

/// The builder service.
pub struct BuilderServiceImpl {
    events: mpsc::Sender<Event>,
    attempts: Attempts,
    cache: Arc<BinaryCache>,
    logs: LogStore,
    pool: Pool,
    ping_interval: Duration,
    liveness_timeout: Duration,
    shutdown: CancellationToken,
    next_session: Arc<AtomicU64>,
    uploads: Arc<tokio::sync::Semaphore>,
}

impl BuilderServiceImpl {
    /// A service feeding `events`.
    #[must_use]
    pub fn new(
        events: mpsc::Sender<Event>,
        attempts: Attempts,
        cache: Arc<BinaryCache>,
        logs: LogStore,
        pool: Pool,
        (ping_interval, liveness_timeout): (Duration, Duration),
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            events,
            attempts,
            cache,
            logs,
            pool,
            ping_interval,
            liveness_timeout,
            shutdown,
            next_session: Arc::new(AtomicU64::new(1)),
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS)),
        }
    }

    /// Checks a Join and turns it into capabilities.
    fn accept_join(join: &Join) -> Result<Capabilities, Status> {
        if join.api_version != API_VERSION {
            return Err(Status::failed_precondition(format!(
                "API version mismatch: the runner speaks {API_VERSION}, the builder {}",
                join.api_version
            )));
        }
        if join.systems.is_empty() {
            return Err(Status::invalid_argument("Join names no system"));
        }
        if join.max_jobs == 0 || join.max_jobs > MAX_JOBS_LIMIT {
            return Err(Status::invalid_argument(format!(
                "max_jobs must be between 1 and {MAX_JOBS_LIMIT}"
            )));
        }
        if !join.speed_factor.is_finite() || join.speed_factor <= 0.0 {
            return Err(Status::invalid_argument("speed_factor must be positive"));
        }
        let set = |items: &[String]| items.iter().cloned().collect::<BTreeSet<_>>();
        Ok(Capabilities {
            systems: set(&join.systems),
            supported_features: set(&join.supported_features),
            mandatory_features: set(&join.mandatory_features),
            max_jobs: join.max_jobs,
            speed_factor: join.speed_factor,
        })
    }
}

type TunnelStream = Pin<Box<dyn tokio_stream::Stream<Item = OutboxItem> + Send>>;

#[tonic::async_trait]
impl BuilderService for BuilderServiceImpl {
    type OpenTunnelStream = TunnelStream;

    async fn open_tunnel(
        &self,
        request: Request<Streaming<BuilderMessage>>,
    ) -> Result<Response<Self::OpenTunnelStream>, Status> {
        let identity = auth::require(&request, &[Role::Builder])?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.liveness_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Join within the liveness timeout"))??;
        let Some(BuilderMessage {
            message: Some(Inbound::Join(join)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be Join"));
        };
        let capabilities = Self::accept_join(&join)?;
        let capacity = capabilities.max_jobs as usize + OUTBOX_SLACK;
        let (outbox, receiver) = mpsc::channel(capacity);
        let joined = RunnerMessage {
            message: Some(Outbound::Joined(Joined {
                builder_name: identity.name.clone(),
                ping_interval_ms: u64::try_from(self.ping_interval.as_millis()).unwrap_or(u64::MAX),
            })),
        };
        outbox
            .try_send(Ok(joined))
            .map_err(|_| Status::internal("the new tunnel's outbox is full"))?;
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.events
            .send(Event::BuilderJoined {
                name: identity.name.clone(),
                session,
                capabilities,
                nix_version: join.nix_version,
                outbox: outbox.clone(),
            })
            .await
            .map_err(|_| Status::unavailable("the runner is shutting down"))?;
        let session = BuilderSession {
            name: identity.name,
            session,
            inbound,
            outbox,
            events: self.events.clone(),
            attempts: self.attempts.clone(),
            pool: self.pool.clone(),
            liveness_timeout: self.liveness_timeout,
            shutdown: self.shutdown.child_token(),
        };
        tasks::spawn_detached("builder session", session.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn upload_log(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<UploadLogResponse>, Status> {
        let identity = auth::require(&request, &[Role::Builder])?;
        let mut chunks = request.into_inner();
        let Some(first) = chunks.message().await? else {
            return Err(Status::invalid_argument("an empty log upload"));
        };
        let attempt = parse_attempt(&first.attempt_id)?;
        self.owned_attempt(&first.attempt_id, &identity)?;
        let storage_error = |error: std::io::Error| {
            tracing::error!(%attempt, %error, "storing a log failed");
            Status::internal("storing the log failed")
        };
        let mut writer = self.logs.create(attempt).map_err(storage_error)?;
        writer.write(&first.data).map_err(storage_error)?;
        while let Some(chunk) = chunks.message().await? {
            if chunk.attempt_id != first.attempt_id {
                return Err(Status::invalid_argument(
                    "a log upload must name one attempt",
                ));
            }
            writer.write(&chunk.data).map_err(storage_error)?;
        }
        let (stored_bytes, truncated_bytes) = writer.finish().map_err(storage_error)?;
        let client = self
            .pool
            .get()
            .await
            .map_err(|_| Status::unavailable("database unavailable"))?;
        queries::set_attempt_log(&client, attempt, &LogStore::file_name(attempt))
            .await
            .map_err(|_| Status::unavailable("database unavailable"))?;
        Ok(Response::new(UploadLogResponse {
            stored_bytes,
            truncated_bytes,
        }))
    }

    async fn upload_nar(
        &self,
        request: Request<Streaming<NarChunk>>,
    ) -> Result<Response<UploadNarResponse>, Status> {
        let identity = auth::require(&request, &[Role::Builder])?;
        let _permit =
            self.uploads.clone().try_acquire_owned().map_err(|_| {
                Status::resource_exhausted("too many NAR uploads at once; retry later")
            })?;
        let chunks = request.into_inner();
        let attempts = self.attempts.clone();
        let builder = identity.name.clone();
        let still_owned = move |attempt_id: &str| {
            Uuid::parse_str(attempt_id)
                .ok()
                .and_then(|attempt| attempts.owner(&attempt))
                .is_some_and(|owner| owner.builder == builder)
        };
        let owner = |attempt_id: &str| self.owned_attempt(attempt_id, &identity);
        Ok(Response::new(
            upload::receive(chunks, &self.cache, owner, still_owned).await?,
        ))
    }
}

impl BuilderServiceImpl {
    /// The owner of a running attempt, if it is `builder`.
    fn owned_attempt(
        &self,
        attempt_id: &str,
        builder: &drover_tls::Identity,
    ) -> Result<AttemptOwner, Status> {
        let attempt = parse_attempt(attempt_id)?;
        match self.attempts.owner(&attempt) {
            None => Err(Status::not_found(format!(
                "attempt {attempt} is not running"
            ))),
            Some(owner) if owner.builder != builder.name => Err(Status::permission_denied(
                format!("attempt {attempt} was not given to {builder}"),
            )),
            Some(owner) => Ok(owner),
        }
    }
}

fn parse_attempt(text: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(text)
        .map_err(|_| Status::invalid_argument(format!("{text:?} is not an attempt id")))
}

/// One builder's tunnel: reads its messages until it leaves, goes silent or misbehaves, then
/// tells the scheduler, which requeues whatever it was running.
struct BuilderSession {
    name: String,
    session: u64,
    inbound: Streaming<BuilderMessage>,
    outbox: mpsc::Sender<OutboxItem>,
    events: mpsc::Sender<Event>,
    attempts: Attempts,
    pool: Pool,
    liveness_timeout: Duration,
    shutdown: CancellationToken,
}

impl BuilderSession {
    async fn run(mut self) {
        let reason = self.read_until_done().await;
        let _ = self
            .events
            .send(Event::BuilderLeft {
                name: self.name,
                session: self.session,
                reason,
            })
            .await;
    }

    /// Reads messages until the session ends; returns why it ended.
    async fn read_until_done(&mut self) -> String {
        let mut deadline = Instant::now() + self.liveness_timeout;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return "the runner is shutting down".to_owned(),
                () = tokio::time::sleep_until(deadline) => {
                    let _ = self.outbox.try_send(Err(Status::deadline_exceeded(
                        "no message within the liveness timeout",
                    )));
                    return "silent past the liveness timeout".to_owned();
                }
                message = self.inbound.message() => match message {
                    Ok(Some(message)) => {
                        deadline = Instant::now() + self.liveness_timeout;
                        if let Err(status) = self.on_message(message).await {
                            let reason = status.message().to_owned();
                            let _ = self.outbox.try_send(Err(status));
                            return reason;
                        }
                    }
                    Ok(None) => return "the builder closed its tunnel".to_owned(),
                    Err(status) => return format!("the tunnel failed: {}", status.message()),
                },
            }
        }
    }

    async fn on_message(&mut self, message: BuilderMessage) -> Result<(), Status> {
        match message.message {
            Some(Inbound::StepResult(result)) => self.on_step_result(result).await,
            Some(Inbound::Join(_)) => Err(Status::invalid_argument("Join sent twice")),
            Some(Inbound::Ping(ping)) => {
                self.on_ping(&ping).await;
                Ok(())
            }
            Some(Inbound::StepUpdate(_) | Inbound::Draining(_)) | None => Ok(()),
        }
    }

    /// Records what a ping reports. Best-effort: a database hiccup must not end the session (the
    /// scheduler notices a lost database on its own).
    async fn on_ping(&self, ping: &drover_proto::v1::Ping) {
        let free = (ping.free_disk_bytes > 0)
            .then(|| i64::try_from(ping.free_disk_bytes).unwrap_or(i64::MAX));
        if let Ok(client) = self.pool.get().await
            && let Err(error) = queries::machine_pinged(&client, &self.name, free).await
        {
            tracing::warn!(builder = %self.name, error = %error_context::report(&error), "recording a ping failed");
        }
    }

    async fn on_step_result(&mut self, result: StepResult) -> Result<(), Status> {
        let attempt = parse_attempt(&result.attempt_id)?;
        match self.attempts.owner(&attempt) {
            None => {
                tracing::debug!(%attempt, builder = %self.name, "result for an attempt no longer running");
                return Ok(());
            }
            Some(owner) if owner.builder != self.name => {
                tracing::warn!(%attempt, builder = %self.name, owner = %owner.builder, "builder reported on another builder's attempt");
                return Err(Status::permission_denied(format!(
                    "attempt {attempt} was not given to builder/{}",
                    self.name
                )));
            }
            Some(_) => {}
        }
        let outcome = match StepOutcome::try_from(result.outcome) {
            Ok(StepOutcome::Succeeded) => Outcome::Succeeded,
            Ok(StepOutcome::Failed) => Outcome::Failed,
            Ok(StepOutcome::TimedOut) => Outcome::TimedOut,
            Ok(StepOutcome::InfrastructureFailure) => Outcome::InfrastructureFailure,
            Ok(StepOutcome::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(
                    "a StepResult without a known outcome",
                ));
            }
        };
        let outputs = result
            .outputs
            .into_iter()
            .map(|output| OutputRow {
                name: output.name,
                path: output.path,
                nar_hash: output.nar_hash,
                nar_size: i64::try_from(output.nar_size).unwrap_or(i64::MAX),
            })
            .collect();
        self.events
            .send(Event::StepFinished {
                builder: self.name.clone(),
                attempt,
                outcome,
                message: result.message,
                outputs,
            })
            .await
            .map_err(|_| Status::unavailable("the runner is shutting down"))
    }
}
