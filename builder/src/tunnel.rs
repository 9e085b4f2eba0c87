//! The builder's side of the tunnel: dial the runner with the builder's certificate, Join, run
//! the steps it sends (at most `max_jobs` at once), report each result, and ping. When the
//! tunnel drops, [`run`] reconnects under the [`ReconnectPolicy`] while the steps go on
//! ([`crate::jobs`]); every Join names the attempts the builder still runs or holds a result of,
//! and results are sent again until the runner acknowledges them, so a restarted runner takes
//! them back instead of building them again. Refusals that retrying cannot fix (wrong API
//! version, bad certificate, wrong role) end the builder.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_proto::API_VERSION;
use drover_proto::v1::builder_message::Message as Outbound;
use drover_proto::v1::builder_service_client::BuilderServiceClient;
use drover_proto::v1::runner_message::Message as Inbound;
use drover_proto::v1::{BuilderMessage, Draining, Join, Ping, StepResult};
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{Config, ExecutorConfig, ReconnectPolicy};
use crate::executor::Executor;
use crate::executor::nix::NixExecutor;
use crate::executor::noop::NoopExecutor;
use crate::jobs::Jobs;
use crate::link::{self, Link, Publisher};
use drover_daemon::notify::Notifier;

/// How long running steps get to stop when the builder stops.
const JOB_STOP_GRACE: Duration = Duration::from_secs(10);

/// Messages queued towards the runner.
const OUTBOX: usize = 256;

/// One step the runner gave this builder.
#[derive(Debug, Clone)]
pub struct Job {
    /// The attempt id to quote.
    pub attempt_id: String,
    /// The derivation.
    pub drv_path: String,
    /// Its text.
    pub drv_text: Vec<u8>,
    /// Its outputs, name to path.
    pub outputs: BTreeMap<String, String>,
    /// The paths the build reads, to substitute first.
    pub input_paths: Vec<String>,
    /// The most log bytes to keep.
    pub max_log_bytes: u64,
    /// Longest the build may run.
    pub timeout: Option<Duration>,
    /// Longest the build may print nothing.
    pub max_silent: Option<Duration>,
    /// The largest NAR an output may have.
    pub max_output_bytes: u64,
}

/// Why the builder lost or could not get its tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A certificate or key file cannot be read.
    #[error("reading {path}")]
    ReadTls {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint or TLS settings are unusable, or the connection failed.
    #[error("connecting to the runner")]
    Connect(#[source] tonic::transport::Error),
    /// The runner refused or ended the tunnel.
    #[error("the runner ended the tunnel: {}", .0.message())]
    Status(tonic::Status),
    /// The runner closed the tunnel.
    #[error("the runner closed the tunnel")]
    Closed,
    /// The executor cannot work on this machine (for example, Nix is missing).
    #[error("preparing the executor")]
    Executor(#[source] crate::executor::nix::PrepareError),
    /// The runner did not answer Join with Joined.
    #[error("the runner did not acknowledge Join")]
    NotJoined,
    /// The builder stopped while a step waited for a session to upload over.
    #[error("the builder is stopping")]
    Stopping,
    /// A step's log could not be spooled to a temporary file.
    #[error("spooling the log")]
    Spool(#[source] std::io::Error),
    /// A certificate was refused in the TLS handshake (this builder's by the runner, or the
    /// runner's by this builder): retrying cannot help.
    #[error("{problem}")]
    CertificateRefused {
        /// What was wrong.
        problem: String,
    },
}

impl TunnelError {
    /// This error, or [`TunnelError::CertificateRefused`] if a refused certificate caused it.
    fn or_certificate_refused(self) -> Self {
        let problem = match &self {
            Self::Connect(error) => drover_tls::refusal::certificate_problem(error),
            Self::Status(status) => drover_tls::refusal::certificate_problem(status),
            _ => None,
        };
        problem.map_or(self, |problem| Self::CertificateRefused { problem })
    }
}

impl Classify for TunnelError {
    /// A refusal retrying cannot fix is fatal; anything else ends this session and is retried.
    fn severity(&self) -> Severity {
        match self {
            Self::ReadTls { .. } | Self::Executor(_) | Self::CertificateRefused { .. } => {
                Severity::Fatal
            }
            Self::Status(status)
                if matches!(
                    status.code(),
                    Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::FailedPrecondition
                        | Code::InvalidArgument
                ) =>
            {
                Severity::Fatal
            }
            Self::Connect(_)
            | Self::Status(_)
            | Self::Closed
            | Self::NotJoined
            | Self::Stopping
            | Self::Spool(_) => Severity::Session,
        }
    }
}

/// Keeps a tunnel to the runner until `shutdown`, reconnecting with exponential backoff; fails
/// on a fatal refusal or when no Join succeeded within the reconnect budget.
pub async fn run(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(), WithContext<TunnelError>> {
    let executor = match &config.executor {
        ExecutorConfig::Noop { build_time } => Executor::Noop(NoopExecutor {
            build_time: *build_time,
        }),
        ExecutorConfig::Nix {
            substituters,
            trusted_public_keys,
        } => Executor::Nix(NixExecutor::new(
            substituters,
            trusted_public_keys,
            config.max_jobs,
        )),
    };
    let nix_version = match &executor {
        Executor::Nix(nix) => nix
            .prepare()
            .await
            .map_err(|problem| WithContext::from(TunnelError::Executor(problem)))?,
        Executor::Noop(_) => String::new(),
    };
    let (mut publisher, link) = link::new();
    let mut work = Work {
        jobs: Jobs::default(),
        results: BTreeMap::new(),
        systemd: Notifier::from_env(),
    };
    let result = reconnect(
        config,
        (&executor, &nix_version),
        shutdown,
        (&mut publisher, &link),
        &mut work,
    )
    .await;
    drop(publisher);
    work.jobs.stop(JOB_STOP_GRACE).await;
    result
}

/// What the builder holds across sessions.
struct Work {
    /// The running steps.
    jobs: Jobs,
    /// Results sent (or to send) and not yet acknowledged, by attempt.
    results: BTreeMap<String, StepResult>,
    /// systemd: ready once joined, a status line, and the watchdog fed from the session loop.
    systemd: Notifier,
}

/// Runs sessions one after another until `shutdown` (or a drain) ends one cleanly, a refusal is
/// fatal, or no Join succeeded within the reconnect budget.
async fn reconnect(
    config: &Config,
    (executor, nix_version): (&Executor, &str),
    shutdown: &CancellationToken,
    (publisher, link): (&mut Publisher, &Link),
    work: &mut Work,
) -> Result<(), WithContext<TunnelError>> {
    let policy = &config.reconnect;
    let mut delay = policy.initial;
    let mut last_joined = Instant::now();
    loop {
        let mut joined = false;
        let result = session(
            config,
            (executor, nix_version),
            shutdown,
            (publisher, link),
            work,
            &mut joined,
        )
        .await
        .map_err(TunnelError::or_certificate_refused);
        publisher.down();
        if joined {
            last_joined = Instant::now();
            delay = policy.initial;
        }
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) if error.severity() == Severity::Fatal => {
                return Err(WithContext::from(error)).context("the runner refused this builder");
            }
            Err(error) => error,
        };
        if last_joined.elapsed() >= policy.budget {
            return Err(WithContext::from(error))
                .with_context(|| format!("no session with the runner for {:?}", policy.budget));
        }
        tracing::warn!(error = %error_context::report(&error), retry_in = ?delay, running = work.jobs.len(), "tunnel lost; running steps go on");
        work.systemd.status(&format!(
            "no tunnel ({error}); reconnecting; {} steps running",
            work.jobs.len()
        ));
        work.systemd.watchdog();
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = next_delay(delay, policy);
    }
}

/// A limit in milliseconds, where 0 means none.
fn limit(milliseconds: u64) -> Option<Duration> {
    (milliseconds > 0).then(|| Duration::from_millis(milliseconds))
}

fn next_delay(delay: Duration, policy: &ReconnectPolicy) -> Duration {
    (delay * 2).min(policy.max)
}

async fn connect(config: &Config) -> Result<Channel, TunnelError> {
    let read = |path: &std::path::PathBuf| {
        fs_err::read(path).map_err(|source| TunnelError::ReadTls {
            path: path.clone(),
            source,
        })
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&config.ca_certificate)?))
        .identity(Identity::from_pem(
            read(&config.certificate)?,
            read(&config.key)?,
        ))
        .domain_name(config.runner_domain.clone());
    Endpoint::from_shared(config.runner_url.clone())
        .map_err(TunnelError::Connect)?
        .tls_config(tls)
        .map_err(TunnelError::Connect)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .connect()
        .await
        .map_err(TunnelError::Connect)
}

/// One tunnel's life. Sets `joined` once the runner accepted Join, and publishes the session's
/// client to the steps.
async fn session(
    config: &Config,
    (executor, nix_version): (&Executor, &str),
    shutdown: &CancellationToken,
    (publisher, link): (&mut Publisher, &Link),
    work: &mut Work,
    joined: &mut bool,
) -> Result<(), TunnelError> {
    let channel = connect(config).await?;
    let mut client = BuilderServiceClient::new(channel)
        .max_decoding_message_size(drover_proto::MAX_TUNNEL_MESSAGE_BYTES)
        .max_encoding_message_size(drover_proto::MAX_TUNNEL_MESSAGE_BYTES);
    let (outbox, receiver) = mpsc::channel(OUTBOX);
    let join = Join {
        api_version: API_VERSION.to_owned(),
        systems: config.systems.clone(),
        supported_features: config.supported_features.clone(),
        mandatory_features: config.mandatory_features.clone(),
        max_jobs: config.max_jobs,
        speed_factor: config.speed_factor,
        nix_version: nix_version.to_owned(),
        held_attempts: work
            .jobs
            .attempts()
            .chain(work.results.keys())
            .cloned()
            .collect(),
    };
    send(&outbox, Outbound::Join(join)).await?;
    let mut inbound = client
        .open_tunnel(ReceiverStream::new(receiver))
        .await
        .map_err(TunnelError::Status)?
        .into_inner();
    let ping_interval = match inbound.message().await.map_err(TunnelError::Status)? {
        Some(drover_proto::v1::RunnerMessage {
            message: Some(Inbound::Joined(joined)),
        }) => Duration::from_millis(joined.ping_interval_ms.max(100)),
        _ => return Err(TunnelError::NotJoined),
    };
    *joined = true;
    tracing::info!(runner = %config.runner_url, held = work.jobs.len() + work.results.len(), "joined the runner");
    publisher.up(client);
    work.systemd.ready();
    work.systemd.status(&format!(
        "joined {}; {} steps running",
        config.runner_url,
        work.jobs.len()
    ));
    for result in work.results.values() {
        send(&outbox, Outbound::StepResult(result.clone())).await?;
    }
    let timing = Timing {
        ping_interval,
        drain_deadline: config.drain_deadline,
    };
    serve(
        &mut inbound,
        &outbox,
        link,
        executor,
        shutdown,
        timing,
        work,
    )
    .await
}

/// The session's clocks.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// How often to ping.
    ping_interval: Duration,
    /// How long a drain lets running steps finish.
    drain_deadline: Duration,
}

/// Reads the runner's messages, runs the steps it sends, pings, and sends each finished step's
/// result; jobs upload their own logs and outputs, so a long upload never delays pings.
///
/// On `shutdown` it drains: it tells the runner (which sends no more work), starts nothing new,
/// and returns once the running steps have finished and reported, or at the drain deadline;
/// the caller then stops what is left, which the runner hands back to its queue.
async fn serve(
    inbound: &mut tonic::Streaming<drover_proto::v1::RunnerMessage>,
    outbox: &mpsc::Sender<BuilderMessage>,
    link: &Link,
    executor: &Executor,
    shutdown: &CancellationToken,
    timing: Timing,
    work: &mut Work,
) -> Result<(), TunnelError> {
    let mut ping = tokio::time::interval(timing.ping_interval);
    let mut drain_until: Option<Instant> = None;
    // A drain ends only once the runner has acknowledged every result, since closing the tunnel
    // may drop what is still in flight.
    let Work {
        jobs,
        results,
        systemd,
    } = work;
    loop {
        tokio::select! {
            () = shutdown.cancelled(), if drain_until.is_none() => {
                if jobs.is_empty() && results.is_empty() {
                    return Ok(());
                }
                tracing::info!(running = jobs.len(), deadline = ?timing.drain_deadline, "draining: taking no new steps, letting the running ones finish");
                send(outbox, Outbound::Draining(Draining {})).await?;
                systemd.status(&format!("draining: {} steps still running", jobs.len()));
                drain_until = Some(Instant::now() + timing.drain_deadline);
            }
            () = sleep_until(drain_until), if drain_until.is_some() => {
                tracing::warn!(running = jobs.len(), "the drain deadline passed: stopping the steps still running and handing them back");
                return Ok(());
            }
            _ = ping.tick() => {
                systemd.watchdog();
                let running = u32::try_from(jobs.len()).unwrap_or(u32::MAX);
                let free_disk_bytes = free_store_bytes().await.unwrap_or(0);
                send(outbox, Outbound::Ping(Ping { running, free_disk_bytes, ..Ping::default() })).await?;
            }
            message = inbound.message() => match message.map_err(TunnelError::Status)? {
                Some(message) => match message.message {
                    Some(Inbound::Build(build)) if drain_until.is_some() => {
                        // Sent before the runner heard of the drain: handed back when we leave.
                        tracing::info!(attempt = %build.attempt_id, "not starting a step while draining");
                    }
                    Some(Inbound::Build(build)) => {
                        tracing::debug!(attempt = %build.attempt_id, "step received");
                        let job = Job {
                            attempt_id: build.attempt_id,
                            drv_path: build.drv_path,
                            drv_text: build.drv_text,
                            outputs: build.outputs.into_iter().collect(),
                            input_paths: build.input_paths,
                            max_log_bytes: build.limits.map_or(u64::MAX, |l| l.max_log_bytes),
                            timeout: build.limits.and_then(|l| limit(l.timeout_ms)),
                            max_silent: build.limits.and_then(|l| limit(l.max_silent_ms)),
                            max_output_bytes: build
                                .limits
                                .map_or(u64::MAX, |l| if l.max_output_bytes == 0 { u64::MAX } else { l.max_output_bytes }),
                        };
                        jobs.start(job, executor.clone(), link.clone());
                    }
                    Some(Inbound::Abort(abort)) => jobs.abort(&abort.attempt_id),
                    Some(Inbound::ResultRecorded(recorded)) => {
                        results.remove(&recorded.attempt_id);
                        if drain_until.is_some() && jobs.is_empty() && results.is_empty() {
                            tracing::info!("drained: every running step finished and was recorded");
                            return Ok(());
                        }
                    }
                    Some(Inbound::Ping(_) | Inbound::Joined(_)) | None => {}
                },
                None => return Err(TunnelError::Closed),
            },
            Some(result) = jobs.next() => {
                let attempt = result.attempt_id.clone();
                results.insert(attempt.clone(), result.clone());
                send(outbox, Outbound::StepResult(result)).await?;
                tracing::debug!(%attempt, "result sent");
            }
        }
    }
}

/// Resolves at `until`; never, without one.
async fn sleep_until(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// Free bytes on the file system of the Nix store, as `df` reports them; `None` if unknown.
async fn free_store_bytes() -> Option<u64> {
    let output = tokio::process::Command::new("df")
        .args(["--output=avail", "--block-size=1", "/nix/store"])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

async fn send(outbox: &mpsc::Sender<BuilderMessage>, message: Outbound) -> Result<(), TunnelError> {
    outbox
        .send(BuilderMessage {
            message: Some(message),
        })
        .await
        .map_err(|_| TunnelError::Closed)
}
