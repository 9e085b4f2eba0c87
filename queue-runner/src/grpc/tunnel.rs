//! `BuilderService`: the control tunnel of each builder (one [`BuilderSession`] per connection)
//! and the log upload. Handlers authenticate from the certificate, check the API version, and hand
//! everything that changes state to the scheduler.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_daemon::traces;
use drover_proto::API_VERSION;
use drover_proto::v1::builder_message::Message as Inbound;
use drover_proto::v1::builder_service_server::BuilderService;
use drover_proto::v1::{
    BuilderMessage, Join, Joined, LogChunk, NarChunk, StepResult, UploadLogResponse,
    UploadNarResponse,
};
use drover_scheduler::{Capabilities, Departure, Event, Outcome, OutputRecord, Report, SessionId};
use drover_tls::Role;
use error_context::{Classify, Severity};
use nix_primitives::StorePath;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use uuid::Uuid;

use super::auth;
use super::refusals::{AttemptError, JoinError, LogUploadError, SessionError, parse_attempt};
use super::shutdown::Incoming;
use super::upload::{self, UploadError};
use crate::cache::BinaryCache;
use crate::logs::LogStore;
use crate::metrics::UploadMetrics;
use crate::scheduler::attempts::{AttemptOwner, Attempts};
use crate::scheduler::driver::{OutboxItem, QueueRecovered, SessionEvent, SessionLink};
use crate::tasks;

/// Messages queued for one builder beyond two per job slot: Joined, pings and aborts. Between two
/// reads of its tunnel a slot can have at most one unread Build (the builder must read it before
/// it can finish it) and one unread `ResultRecorded`, so the scheduler never fills an outbox whose
/// builder reads its tunnel, even when every slot finishes in one batch.
const OUTBOX_SLACK: usize = 16;

/// NAR uploads received at once, across all builders. Each holds a blocking thread while it
/// streams into the cache; past this many, uploads are refused with `RESOURCE_EXHAUSTED` and the
/// builder retries the step elsewhere rather than starving the runner of threads.
const MAX_CONCURRENT_UPLOADS: usize = 64;

/// Largest `max_jobs` a builder may claim; bounds its outbox.
const MAX_JOBS_LIMIT: u32 = 1024;

/// The scheduler as the builder service sees it.
#[derive(Debug, Clone)]
pub struct SchedulerSide {
    /// Where sessions send what their builders say.
    pub events: mpsc::Sender<SessionEvent>,
    /// Set once the scheduler has recovered the queue: builders may join from then on.
    pub recovered: QueueRecovered,
}

/// Where what builders upload goes, and what counts it.
#[derive(Debug, Clone)]
pub struct UploadTargets {
    /// Outputs.
    pub cache: Arc<BinaryCache>,
    /// Step logs.
    pub logs: LogStore,
    /// Bytes received.
    pub metrics: UploadMetrics,
}

/// The clocks of every builder session.
#[derive(Debug, Clone, Copy)]
pub struct SessionTiming {
    /// How often builders ping (told to them in Joined).
    pub ping_interval: Duration,
    /// How long a builder may be silent before its session ends.
    pub liveness_timeout: Duration,
}

/// The builder service.
pub struct BuilderServiceImpl {
    events: mpsc::Sender<SessionEvent>,
    attempts: Attempts,
    cache: Arc<BinaryCache>,
    logs: LogStore,
    ping_interval: Duration,
    liveness_timeout: Duration,
    shutdown: CancellationToken,
    next_session: Arc<AtomicU64>,
    uploads: Arc<tokio::sync::Semaphore>,
    sessions: TaskTracker,
    recovered: QueueRecovered,
    metrics: UploadMetrics,
}

impl BuilderServiceImpl {
    /// A service feeding the `scheduler`'s events; its builder sessions run on `sessions`, which
    /// shutdown waits for. Builders may join once the scheduler has recovered the queue.
    #[must_use]
    pub fn new(
        scheduler: SchedulerSide,
        attempts: Attempts,
        targets: UploadTargets,
        timing: SessionTiming,
        shutdown: CancellationToken,
        sessions: TaskTracker,
    ) -> Self {
        let SchedulerSide { events, recovered } = scheduler;
        let UploadTargets {
            cache,
            logs,
            metrics,
        } = targets;
        Self {
            events,
            attempts,
            cache,
            logs,
            ping_interval: timing.ping_interval,
            liveness_timeout: timing.liveness_timeout,
            shutdown,
            next_session: Arc::new(AtomicU64::new(1)),
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS)),
            sessions,
            recovered,
            metrics,
        }
    }

    /// Checks a Join and turns it into capabilities and the attempts the builder holds.
    fn accept_join(join: &Join) -> Result<(Capabilities, Vec<Uuid>), JoinError> {
        if join.api_version != API_VERSION {
            return Err(JoinError::ApiVersion {
                runner: API_VERSION,
                builder: join.api_version.clone(),
            });
        }
        if join.systems.is_empty() {
            return Err(JoinError::NoSystem);
        }
        if join.max_jobs == 0 || join.max_jobs > MAX_JOBS_LIMIT {
            return Err(JoinError::MaxJobs {
                limit: MAX_JOBS_LIMIT,
            });
        }
        if !join.speed_factor.is_finite() || join.speed_factor <= 0.0 {
            return Err(JoinError::SpeedFactor);
        }
        let held = join
            .held_attempts
            .iter()
            .map(|attempt| parse_attempt(attempt))
            .collect::<Result<Vec<_>, _>>()
            .map_err(JoinError::HeldAttempt)?;
        let set = |items: &[String]| items.iter().cloned().collect::<BTreeSet<_>>();
        let capabilities = Capabilities {
            systems: set(&join.systems),
            supported_features: set(&join.supported_features),
            mandatory_features: set(&join.mandatory_features),
            max_jobs: join.max_jobs,
            speed_factor: join.speed_factor,
        };
        Ok((capabilities, held))
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
        let certificate = auth::require_certificate(&request, &[Role::Builder])?;
        let revoked = Box::pin(auth::revoked(&request, &certificate)?);
        let identity = certificate.identity;
        if !self.recovered.get() {
            return Err(JoinError::Recovering.into());
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.liveness_timeout, inbound.message())
            .await
            .map_err(|_| JoinError::NoJoin)?
            .map_err(JoinError::Stream)?;
        let Some(BuilderMessage {
            message: Some(Inbound::Join(join)),
        }) = first
        else {
            return Err(JoinError::NotJoin.into());
        };
        let (capabilities, held) = Self::accept_join(&join)?;
        // Room for an Abort of every attempt it holds, past its slots and the usual slack.
        let capacity = 2 * capabilities.max_jobs as usize + held.len() + OUTBOX_SLACK;
        let (outbox, receiver) = mpsc::channel(capacity);
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let end = self.shutdown.child_token();
        self.events
            .send(SessionEvent::Joined {
                name: identity.name.clone(),
                session,
                capabilities,
                nix_version: join.nix_version,
                link: SessionLink {
                    outbox: outbox.clone(),
                    end: end.clone(),
                    joined: Joined {
                        builder_name: identity.name.clone(),
                        ping_interval_ms: u64::try_from(self.ping_interval.as_millis())
                            .unwrap_or(u64::MAX),
                    },
                },
                held,
            })
            .await
            .map_err(|_| JoinError::ShuttingDown)?;
        let (reason_sender, reason) = tokio::sync::oneshot::channel();
        let builder = BuilderSession {
            name: identity.name,
            session,
            inbound,
            outbox,
            events: self.events.clone(),
            attempts: self.attempts.clone(),
            cache: self.cache.clone(),
            logs: self.logs.clone(),
            liveness_timeout: self.liveness_timeout,
            end,
            metrics: self.metrics.clone(),
            revoked,
        };
        let events = self.events.clone();
        tasks::spawn_tracked(
            &self.sessions,
            "builder session",
            async move {
                let _ = reason_sender.send(builder.run().await);
            },
            move |panic| {
                Box::pin(async move {
                    // One exit path, whatever ended the session: the scheduler hears of it and
                    // requeues what the builder ran.
                    let (reason, departure) = match panic {
                        Some(message) => {
                            (format!("its session panicked: {message}"), Departure::Ended)
                        }
                        None => reason
                            .await
                            .unwrap_or_else(|_| ("its session ended".to_owned(), Departure::Ended)),
                    };
                    let _ = events
                        .send(SessionEvent::Core(Event::BuilderLeft {
                            session,
                            reason,
                            departure,
                        }))
                        .await;
                })
            },
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn upload_log(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<UploadLogResponse>, Status> {
        let identity = auth::require(&request, &[Role::Builder])?;
        let chunks = Incoming::new(request.into_inner(), self.shutdown.clone());
        let stored = self.store_log(chunks, &identity).await?;
        self.metrics.received("log", stored.stored_bytes);
        Ok(Response::new(stored))
    }

    async fn upload_nar(
        &self,
        request: Request<Streaming<NarChunk>>,
    ) -> Result<Response<UploadNarResponse>, Status> {
        let identity = auth::require(&request, &[Role::Builder])?;
        let _permit = self
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| UploadError::Busy)?;
        let chunks = Incoming::new(request.into_inner(), self.shutdown.clone());
        let attempts = self.attempts.clone();
        let builder = identity.name.clone();
        let still_owned = move |attempt_id: &str| {
            Uuid::parse_str(attempt_id)
                .is_ok_and(|attempt| attempts.is_owned_by(&attempt, &builder))
        };
        let owner = |attempt_id: &str| self.owned_attempt(parse_attempt(attempt_id)?, &identity);
        let published = upload::receive(chunks, &self.cache, owner, still_owned).await?;
        self.metrics.received("nar", published.nar_size);
        Ok(Response::new(published))
    }
}

impl BuilderServiceImpl {
    /// The owner of a running attempt, if it is `builder`.
    fn owned_attempt(
        &self,
        attempt: Uuid,
        builder: &drover_tls::Identity,
    ) -> Result<AttemptOwner, AttemptError> {
        match self.attempts.owner(&attempt) {
            None => Err(AttemptError::NotRunning(attempt)),
            Some(owner) if owner.builder != builder.name => Err(AttemptError::NotYours {
                attempt,
                builder: builder.to_string(),
            }),
            Some(owner) => Ok(owner),
        }
    }

    /// Stores the log of the attempt the first chunk names, which must be `builder`'s.
    async fn store_log(
        &self,
        mut chunks: Incoming<LogChunk>,
        builder: &drover_tls::Identity,
    ) -> Result<UploadLogResponse, LogUploadError> {
        let first = chunks.message().await?.ok_or(LogUploadError::Empty)?;
        let attempt = parse_attempt(&first.attempt_id)?;
        self.owned_attempt(attempt, builder)?;
        let storage_error = |error: std::io::Error| {
            tracing::error!(%attempt, %error, "storing a log failed");
            LogUploadError::Storing(error)
        };
        let mut writer = self.logs.create(attempt).map_err(storage_error)?;
        writer.write(&first.data).map_err(storage_error)?;
        while let Some(chunk) = chunks.message().await? {
            if chunk.attempt_id != first.attempt_id {
                return Err(LogUploadError::MixedAttempts);
            }
            writer.write(&chunk.data).map_err(storage_error)?;
        }
        let (stored_bytes, truncated_bytes) = writer.finish().map_err(storage_error)?;
        Ok(UploadLogResponse {
            stored_bytes,
            truncated_bytes,
        })
    }
}

/// How a tunnel that failed with `status` ended: a transport failure (the codes the transport
/// reports a broken connection with) may be a blip the builder comes back from; anything else
/// (a message too large or malformed) is the builder's doing, and its attempts must not wait,
/// or a builder that sends the same bad message after every rejoin would hold them for ever.
fn departure_after(status: &Status) -> Departure {
    match status.code() {
        tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::Cancelled
        | tonic::Code::Unavailable => Departure::ConnectionLost,
        _ => Departure::Ended,
    }
}

/// One builder's tunnel: reads its messages until it leaves, goes silent, misbehaves or is
/// ended by the scheduler; [`BuilderServiceImpl::open_tunnel`] then tells the scheduler, which
/// requeues whatever it was running.
struct BuilderSession {
    name: String,
    session: SessionId,
    inbound: Streaming<BuilderMessage>,
    outbox: mpsc::Sender<OutboxItem>,
    events: mpsc::Sender<SessionEvent>,
    attempts: Attempts,
    cache: Arc<BinaryCache>,
    logs: LogStore,
    liveness_timeout: Duration,
    end: CancellationToken,
    metrics: UploadMetrics,
    /// Resolves, with the refusal to send, once the certificate this tunnel was opened with is
    /// revoked.
    revoked: Pin<Box<dyn Future<Output = Status> + Send + Sync>>,
}

impl BuilderSession {
    /// Reads messages until the session ends; returns why it ended, and whether the builder
    /// may come back for its attempts (only when the connection failed under it).
    async fn run(mut self) -> (String, Departure) {
        let ended = |reason: &str| (reason.to_owned(), Departure::Ended);
        let mut deadline = Instant::now() + self.liveness_timeout;
        loop {
            tokio::select! {
                () = self.end.cancelled() => return ended("the session was ended by the runner"),
                // Its steps are requeued at once: a revoked builder is not waited for.
                refusal = &mut self.revoked => {
                    let _ = self.outbox.try_send(Err(refusal));
                    return ended("its certificate was revoked");
                }
                () = tokio::time::sleep_until(deadline) => {
                    let _ = self.outbox.try_send(Err(SessionError::Silent.into()));
                    return ended("silent past the liveness timeout");
                }
                message = self.inbound.message() => match message {
                    Ok(Some(message)) => {
                        deadline = Instant::now() + self.liveness_timeout;
                        if let Err(error) = self.on_message(message).await {
                            let reason = error_context::report(&error).to_string();
                            tracing::warn!(builder = %self.name, %reason, "ending a builder session");
                            let _ = self.outbox.try_send(Err(error.into()));
                            return ended(&reason);
                        }
                    }
                    Ok(None) => return ended("the builder closed its tunnel"),
                    Err(status) => {
                        let reason = format!("the tunnel failed: {}", status.message());
                        return (reason, departure_after(&status));
                    }
                },
            }
        }
    }

    async fn on_message(&mut self, message: BuilderMessage) -> Result<(), SessionError> {
        let event = match message.message {
            Some(Inbound::StepResult(result)) => {
                // Receiving the result continues the trace of the builder's step.
                let span = tracing::info_span!("result", attempt = %result.attempt_id);
                traces::set_parent(&span, &result.traceparent);
                self.on_step_result(result).instrument(span).await?
            }
            Some(Inbound::Join(_)) => return Err(SessionError::Malformed("Join sent twice")),
            Some(Inbound::Ping(ping)) => Event::BuilderPinged {
                session: self.session,
                free_disk_bytes: (ping.free_disk_bytes > 0).then_some(ping.free_disk_bytes),
                memory_pressure_percent: ping
                    .memory_pressure_percent
                    .filter(|percent| percent.is_finite()),
            },
            Some(Inbound::Draining(_)) => Event::BuilderDraining {
                session: self.session,
            },
            Some(Inbound::StepUpdate(_)) | None => return Ok(()),
        };
        // The runner is shutting down when the scheduler is gone; the session ends with it.
        let _ = self.events.send(SessionEvent::Core(event)).await;
        Ok(())
    }

    /// Checks a result: the attempt must be this builder's, and a success must report exactly
    /// the step's outputs, as uploaded or carried inline (an inline log is stored, inline NARs
    /// published, as their uploads would be). A success that does not check out becomes an
    /// infrastructure failure of that attempt (severity Step); anything worse ends the session.
    async fn on_step_result(&self, result: StepResult) -> Result<Event, SessionError> {
        let attempt = parse_attempt(&result.attempt_id)?;
        let owner = match self.attempts.owner(&attempt) {
            None => {
                tracing::debug!(%attempt, builder = %self.name, "result for an attempt no longer running");
                None
            }
            Some(owner) if owner.builder != self.name => {
                return Err(AttemptError::NotYours {
                    attempt,
                    builder: format!("builder/{}", self.name),
                }
                .into());
            }
            Some(owner) => Some(owner),
        };
        let outcome = drover_proto::Outcome::try_from(result.outcome)
            .map(core_outcome)
            .map_err(SessionError::Outcome)?;
        let inline_bytes = result.log.len()
            + result
                .outputs
                .iter()
                .map(|output| output.nar.len())
                .sum::<usize>();
        let oversized = inline_bytes > drover_proto::MAX_INLINE_RESULT_BYTES;
        if result.log_inline && owner.is_some() && !oversized {
            self.store_inline_log(attempt, &result.log);
        }
        let mut report = Report {
            outcome,
            message: result.message,
            outputs: Vec::with_capacity(result.outputs.len()),
        };
        let mut refusal = oversized.then(|| {
            format!(
                "the result carried {inline_bytes} bytes inline, over the {} a result may",
                drover_proto::MAX_INLINE_RESULT_BYTES
            )
        });
        for output in result.outputs {
            let mut record = OutputRecord {
                name: output.name,
                path: output.path,
                nar_hash: output.nar_hash,
                nar_size: output.nar_size,
            };
            if let Some(owner) = owner.as_ref().filter(|_| !output.nar.is_empty())
                && outcome == Outcome::Succeeded
                && refusal.is_none()
            {
                match self
                    .publish_inline(owner, attempt, &record.path, &output.references, output.nar)
                    .await
                {
                    Ok(info) => {
                        self.metrics.received("nar", info.nar_size);
                        record.nar_hash = info.nar_hash.to_typed_base32();
                        record.nar_size = info.nar_size;
                    }
                    Err(error) => refusal = Some(error_context::report(&error).to_string()),
                }
            }
            report.outputs.push(record);
        }
        if outcome == Outcome::Succeeded
            && let Some(owner) = &owner
        {
            let checked = match refusal {
                Some(reason) => Err(reason),
                None => match self.check_outputs(owner, &report.outputs) {
                    Err(error) if error.severity() == Severity::Step => {
                        Err(error_context::report(&error).to_string())
                    }
                    Err(error) => return Err(error),
                    Ok(()) => Ok(()),
                },
            };
            if let Err(message) = checked {
                tracing::warn!(%attempt, builder = %self.name, error = %message, "refusing a claimed success");
                report = Report {
                    outcome: Outcome::InfrastructureFailure,
                    message,
                    outputs: Vec::new(),
                };
            }
        }
        // A result for an attempt that no longer runs still goes to the scheduler, which
        // acknowledges it so the builder can forget it.
        Ok(Event::StepFinished {
            session: self.session,
            attempt,
            report,
            at: std::time::Instant::now(),
        })
    }

    /// Stores the log a result carried inline, as an upload of it would.
    fn store_inline_log(&self, attempt: Uuid, log: &[u8]) {
        let stored = self.logs.create(attempt).and_then(|mut writer| {
            writer.write(log)?;
            writer.finish()
        });
        match stored {
            Ok((stored_bytes, _)) => self.metrics.received("log", stored_bytes),
            // As with an upload: the result counts, its log is missing.
            Err(error) => tracing::error!(%attempt, %error, "storing an inline log failed"),
        }
    }

    /// Publishes a NAR a result carried inline, checked as an upload of it would be.
    async fn publish_inline(
        &self,
        owner: &AttemptOwner,
        attempt: Uuid,
        path: &str,
        references: &[String],
        nar: Vec<u8>,
    ) -> Result<nix_primitives::narinfo::NarInfo, upload::UploadError> {
        let (attempts, builder) = (self.attempts.clone(), self.name.clone());
        let still_owned = move || attempts.is_owned_by(&attempt, &builder);
        upload::publish_inline(owner, path, references, nar, &self.cache, still_owned).await
    }

    /// A success must report exactly the step's outputs at their paths, each published in the
    /// farm's own cache with the NAR hash reported.
    fn check_outputs(
        &self,
        owner: &AttemptOwner,
        outputs: &[OutputRecord],
    ) -> Result<(), SessionError> {
        let reported: BTreeMap<&str, &str> = outputs
            .iter()
            .map(|output| (output.name.as_str(), output.path.as_str()))
            .collect();
        let expected: BTreeMap<&str, String> = owner
            .spec
            .outputs
            .iter()
            .map(|(name, path)| (name.as_str(), path.to_absolute()))
            .collect();
        let matches = reported.len() == expected.len()
            && expected
                .iter()
                .all(|(name, path)| reported.get(name) == Some(&path.as_str()));
        if !matches {
            return Err(SessionError::Outputs(format!(
                "the builder reported outputs {reported:?}, expected {expected:?}"
            )));
        }
        for output in outputs {
            let Ok(path) = StorePath::from_absolute(&output.path) else {
                return Err(SessionError::Outputs(format!(
                    "{:?} is not a store path",
                    output.path
                )));
            };
            let published =
                self.cache
                    .narinfo(&path)
                    .map_err(|source| SessionError::ReadCache {
                        path: output.path.clone(),
                        source,
                    })?;
            match published {
                None => {
                    return Err(SessionError::Outputs(format!(
                        "output {} was not uploaded",
                        output.path
                    )));
                }
                Some(info) if info.nar_hash.to_typed_base32() != output.nar_hash => {
                    return Err(SessionError::Outputs(format!(
                        "the builder reported NAR hash {} for {}, which is not what it uploaded",
                        output.nar_hash, output.path
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// The core's outcome for the one a builder sent.
fn core_outcome(wire: drover_proto::Outcome) -> Outcome {
    match wire {
        drover_proto::Outcome::Succeeded => Outcome::Succeeded,
        drover_proto::Outcome::Failed => Outcome::Failed,
        drover_proto::Outcome::TimedOut => Outcome::TimedOut,
        drover_proto::Outcome::InfrastructureFailure => Outcome::InfrastructureFailure,
        drover_proto::Outcome::LogLimitExceeded => Outcome::LogLimitExceeded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_transport_lets_a_builder_come_back_for_its_attempts() {
        for status in [
            Status::unknown("h2 protocol error: connection reset"),
            Status::cancelled(""),
            Status::unavailable(""),
            Status::internal(""),
        ] {
            assert_eq!(
                departure_after(&status),
                Departure::ConnectionLost,
                "{status:?}"
            );
        }
        for status in [
            Status::invalid_argument("a malformed message"),
            Status::out_of_range("message too large"),
            Status::resource_exhausted(""),
        ] {
            assert_eq!(departure_after(&status), Departure::Ended, "{status:?}");
        }
    }
}
