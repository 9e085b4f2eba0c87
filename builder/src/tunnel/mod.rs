//! The builder's side of the tunnel: dial the runner with the builder's certificate, Join, and
//! run a [`Session`] until it ends. When the tunnel drops, [`run`] dials again under the
//! [`Reconnect`] policy while the steps go on ([`crate::jobs`]); every Join names the attempts
//! the builder still runs or holds a result of, and results are sent again until the runner
//! acknowledges them, so a restarted runner takes them back instead of building them again.
//! Refusals that retrying cannot fix (wrong API version, bad certificate, wrong role) end the
//! builder.
//!
//! - [`error`]: why a session ended, and whether that ends the builder.
//! - [`session`]: one joined session's run loop, and what the builder holds across sessions.

pub mod error;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use drover_daemon::notify::Notifier;
use drover_proto::API_VERSION;
use drover_proto::v1::builder_message::Message as Outbound;
use drover_proto::v1::builder_service_client::BuilderServiceClient;
use drover_proto::v1::runner_message::Message as Inbound;
use drover_proto::v1::{Join, RunnerMessage};
use error_context::{Classify as _, ResultExt as _, Severity, WithContext};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use error::TunnelError;
use session::{Session, Timing, Work, send};

use crate::config::{Config, ExecutorConfig};
use crate::executor::Executor;
use crate::executor::nix::NixExecutor;
use crate::executor::noop::NoopExecutor;
use crate::link::{self, Link, Publisher};
use crate::metrics::BuilderMetrics;
use crate::reconnect::Reconnect;

/// How long running steps get to stop when the builder stops.
const JOB_STOP_GRACE: Duration = Duration::from_secs(10);

/// Messages queued towards the runner.
const OUTBOX: usize = 256;

/// Keeps a tunnel to the runner until `shutdown`, dialling again with jittered exponential
/// backoff; fails on a fatal refusal or when no session joined within the reconnect budget.
pub async fn run(
    config: &Config,
    shutdown: &CancellationToken,
    metrics: Arc<BuilderMetrics>,
) -> Result<(), WithContext<TunnelError>> {
    let executor = match &config.executor {
        ExecutorConfig::Noop { build_time } => Executor::Noop(NoopExecutor {
            build_time: *build_time,
        }),
        ExecutorConfig::Nix(nix) => Executor::Nix(NixExecutor::new(
            nix,
            config.max_jobs,
            metrics.serve_processes_started.clone(),
        )),
    };
    let nix_version = match &executor {
        Executor::Nix(nix) => nix
            .prepare()
            .await
            .map_err(|problem| WithContext::from(TunnelError::Executor(problem)))?,
        Executor::Noop(_) => String::new(),
    };
    let (publisher, link) = link::new();
    let mut tunnel = Tunnel {
        config,
        executor,
        nix_version,
        publisher,
        link,
        work: Work::new(Notifier::from_env(), metrics),
        reconnect: Reconnect::new(&config.reconnect),
    };
    let result = tunnel.keep(shutdown).await;
    let Tunnel {
        publisher, work, ..
    } = tunnel;
    // Steps waiting for a session to upload over learn that none will come.
    drop(publisher);
    work.jobs.stop(JOB_STOP_GRACE).await;
    result
}

/// The builder's tunnel across sessions.
struct Tunnel<'a> {
    config: &'a Config,
    executor: Executor,
    nix_version: String,
    /// Publishes each joined session's client to the running steps.
    publisher: Publisher,
    link: Link,
    work: Work,
    reconnect: Reconnect,
}

impl Tunnel<'_> {
    /// Runs sessions one after another until `shutdown` (or a drain) ends one cleanly, a
    /// refusal is fatal, or no session joined within the reconnect budget.
    async fn keep(&mut self, shutdown: &CancellationToken) -> Result<(), WithContext<TunnelError>> {
        loop {
            let result = self
                .session(shutdown)
                .await
                .map_err(TunnelError::or_certificate_refused);
            self.publisher.down();
            self.work.metrics.left();
            let error = match result {
                Ok(()) => return Ok(()),
                Err(error) if error.severity() == Severity::Fatal => {
                    let context = error.fatal_context();
                    return Err(WithContext::from(error)).context(context);
                }
                Err(error) => error,
            };
            let Some(delay) = self.reconnect.after_loss() else {
                let budget = self.reconnect.budget();
                return Err(WithContext::from(error))
                    .with_context(|| format!("no session with the runner for {budget:?}"));
            };
            let running = self.work.jobs.len();
            tracing::warn!(error = %error_context::report(&error), retry_in = ?delay, running, "tunnel lost; running steps go on");
            self.work.systemd.status(&format!(
                "no tunnel ({error}); reconnecting; {running} steps running"
            ));
            self.work.systemd.watchdog();
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Dials, joins, and runs one session to its end.
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), TunnelError> {
        let channel = dial(self.config).await?;
        let mut client = BuilderServiceClient::new(channel)
            .max_decoding_message_size(drover_proto::MAX_TUNNEL_MESSAGE_BYTES)
            .max_encoding_message_size(drover_proto::MAX_TUNNEL_MESSAGE_BYTES);
        let (outbox, receiver) = mpsc::channel(OUTBOX);
        send(&outbox, Outbound::Join(self.join())).await?;
        let mut inbound = client
            .open_tunnel(ReceiverStream::new(receiver))
            .await
            .map_err(TunnelError::Status)?
            .into_inner();
        let ping_interval = match inbound.message().await.map_err(TunnelError::Status)? {
            Some(RunnerMessage {
                message: Some(Inbound::Joined(joined)),
            }) => Duration::from_millis(joined.ping_interval_ms.max(100)),
            _ => return Err(TunnelError::NotJoined),
        };
        self.reconnect.joined();
        self.work.metrics.joined();
        let runner = &self.config.runner_url;
        let running = self.work.jobs.len();
        tracing::info!(%runner, held = running + self.work.results.len(), "joined the runner");
        self.publisher.up(client);
        self.work.systemd.ready();
        self.work
            .systemd
            .status(&format!("joined {runner}; {running} steps running"));
        let timing = Timing {
            ping_interval,
            drain_deadline: self.config.drain_deadline,
        };
        Session::new(
            inbound,
            outbox,
            &self.link,
            &self.executor,
            &mut self.work,
            timing,
        )
        .run(shutdown)
        .await
    }

    /// What this builder offers, and the attempts it holds.
    fn join(&self) -> Join {
        let config = self.config;
        Join {
            api_version: API_VERSION.to_owned(),
            systems: config.systems.clone(),
            supported_features: config.supported_features.clone(),
            mandatory_features: config.mandatory_features.clone(),
            max_jobs: config.max_jobs,
            speed_factor: config.speed_factor,
            nix_version: self.nix_version.clone(),
            held_attempts: self.work.held_attempts().cloned().collect(),
        }
    }
}

/// Connects to the runner over mTLS with the builder's certificate.
async fn dial(config: &Config) -> Result<Channel, TunnelError> {
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
