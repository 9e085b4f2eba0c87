//! Assembling and running the runner: connect PostgreSQL and migrate, load certificates, bind the
//! gRPC socket, start the supervised tasks, and wait for the first of them to end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::admin_service_server::AdminServiceServer;
use drover_proto::v1::build_service_server::BuildServiceServer;
use drover_proto::v1::builder_service_server::BuilderServiceServer;
use error_context::{Classify, Severity, WithContext};
use futures_util::future::OptionFuture;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

use drover_scheduler::Core;
use drover_scheduler::history::HistoryPolicy;

use crate::admin::Admin;
use crate::builds::{Builds, SubmitLimits};
use crate::cache::upstream::{Upstream, Upstreams};
use crate::certificates::{Revocations, Sightings, record_sightings};
use crate::config::Config;
use crate::db::{self, DbError};
use crate::grpc::admin_service::AdminServiceImpl;
use crate::grpc::build_service::BuildServiceImpl;
use crate::grpc::tls::{ServerTls, Side};
use crate::grpc::tunnel::{BuilderServiceImpl, SchedulerSide, SessionTiming, UploadTargets};
use crate::history::Pruner;
use crate::logs::LogStore;
use crate::metrics::Metrics;
use crate::scheduler::attempts::Attempts;
use crate::scheduler::driver::{Driver, Published, QueueRecovered, SchedulerError};
use crate::scheduler::handoff::Handoff;
use crate::scheduler::ingest::{Ingest, IngestError};
use crate::scheduler::listen;
use crate::sweeper::{LogExpiry, Sweeper};
use crate::tasks::Supervisor;
use crate::tokens::Tokens;
use drover_daemon::notify::Notifier;

/// Events buffered between builder sessions and the scheduler.
const EVENT_QUEUE: usize = 4096;

/// Plans buffered between ingest and the scheduler: few, since one may hold a whole closure.
const PLAN_QUEUE: usize = 4;

/// Committed batches of changes kept for Watch streams that read slowly; one that falls further
/// behind gets its build's whole state again.
const WATCH_QUEUE: usize = 1024;

/// How long shutdown waits for builder sessions and tasks to end. Streams that never end by
/// themselves are cut at shutdown (see [`crate::grpc::shutdown`]), so this only bounds requests
/// already under way; builders keep their steps and hand them to the next runner.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// How long the HTTP listener, stopped last, gets for its requests under way.
const HTTP_STOP_GRACE: Duration = Duration::from_millis(300);

/// Why the runner cannot start or had to stop. Every variant is fatal.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The database failed.
    #[error("the database failed")]
    Database(#[source] WithContext<DbError>),
    /// The database's settings (password file, TLS) cannot be used.
    #[error("preparing database connections")]
    Connector(#[source] db::ConnectorError),
    /// The scheduler failed.
    #[error("the scheduler failed")]
    Scheduler(#[source] WithContext<SchedulerError>),
    /// Ingest failed.
    #[error("ingest failed")]
    Ingest(#[source] WithContext<IngestError>),
    /// The cache signing key file cannot be read (certificates are [`RunnerError::Tls`]).
    #[error("reading {path}")]
    ReadCacheKey {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The binary cache cannot be opened, or its key read.
    #[error("opening the binary cache")]
    Cache(#[source] WithContext<crate::cache::CacheError>),
    /// The cache signing key is not a Nix secret key.
    #[error("reading the cache signing key {path}")]
    CacheKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix_primitives::signing::KeyError,
    },
    /// An upstream cache's client cannot be made (its CA file).
    #[error("preparing an upstream cache")]
    Upstream(#[source] crate::cache::upstream::ClientError),
    /// The cache's HTTP server failed.
    #[error("serving the binary cache")]
    ServeCache(#[source] std::io::Error),
    /// The metrics' HTTP server failed.
    #[error("serving metrics")]
    ServeMetrics(#[source] std::io::Error),
    /// The web listener's server failed.
    #[error("serving the web listener")]
    ServeWeb(#[source] std::io::Error),
    /// The log directory cannot be created.
    #[error("creating the log directory")]
    LogDirectory(#[source] std::io::Error),
    /// The gRPC socket cannot be bound.
    #[error("binding {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificates, key or CA cannot be used.
    #[error("setting up TLS")]
    Tls(#[source] crate::grpc::tls::TlsError),
    /// The gRPC server failed.
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
    /// The protocol's descriptors could not be read for gRPC reflection.
    #[error("preparing gRPC reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// A garbage collection of the cache (a dry run) failed.
    #[error("garbage collection of the cache")]
    Sweep(#[source] crate::sweeper::SweepError),
    /// Standard output is closed.
    #[error("writing to standard output")]
    Output(#[source] std::io::Error),
    /// A critical task returned while the runner was not shutting down.
    #[error("the {0} task ended unexpectedly")]
    TaskEnded(&'static str),
    /// A critical task panicked.
    #[error("a critical task panicked: {0}")]
    TaskPanicked(String),
}

impl RunnerError {
    /// Whether the runner cannot start because of what its configuration names (a key, a
    /// certificate, a password file that cannot be used), which a restart cannot fix.
    #[must_use]
    pub const fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::Connector(_)
                | Self::ReadCacheKey { .. }
                | Self::CacheKey { .. }
                | Self::Tls(_)
                | Self::Upstream(_)
        )
    }
}

impl Classify for RunnerError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

/// A started runner.
pub struct Runner {
    /// The address the gRPC server is bound to.
    pub grpc_address: SocketAddr,
    /// The address the binary cache is served on.
    pub cache_address: SocketAddr,
    /// The address metrics are served on, if they are.
    pub metrics_address: Option<SocketAddr>,
    /// The address the web listener is bound to, if there is one.
    pub web_address: Option<SocketAddr>,
    /// The key clients must trust to substitute from the cache.
    pub cache_public_key: nix_primitives::PublicKey,
    /// Set once the scheduler has recovered the queue; builders can join from then on.
    pub queue_recovered: QueueRecovered,
    systemd: Arc<Notifier>,
    scheduler: mpsc::Sender<crate::scheduler::driver::SessionEvent>,
    /// The TLS configurations SIGHUP reloads: gRPC's, and the web listener's.
    tls: Vec<ServerTls>,
    shutdown: CancellationToken,
    supervisor: Supervisor<RunnerError>,
    /// The HTTP listeners (binary cache and health; metrics), stopped after everything else so
    /// that `/readyz` answers 503 until the process ends.
    http: Supervisor<RunnerError>,
    http_stop: CancellationToken,
    sessions: TaskTracker,
}

/// How the database is reached, and its pool, with the schema migrated to this version.
async fn open_database(config: &Config) -> Result<(db::Connector, db::Pool), RunnerError> {
    let connector = db::Connector::new(&config.database).map_err(RunnerError::Connector)?;
    let pool = connector
        .pool(config.pool_size)
        .map_err(|error| RunnerError::Database(error.into()))?;
    let applied = db::migrate(&pool).await.map_err(|error| {
        RunnerError::Database(WithContext::from(error).context("migrating the schema"))
    })?;
    if !applied.is_empty() {
        tracing::info!(?applied, "database migrated");
    }
    Ok((connector, pool))
}

/// Connects, migrates, binds and starts every task; returns once the runner serves.
pub async fn start(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Runner, WithContext<RunnerError>> {
    fs_err::create_dir_all(&config.log_directory).map_err(RunnerError::LogDirectory)?;
    let (connector, pool) = open_database(&config).await?;
    let tls = ServerTls::load(&config, Side::Grpc).map_err(RunnerError::Tls)?;
    let (listener, grpc_address) = bind(config.grpc_listen).await?;
    let (web, web_address) = bind_web(&config).await?;
    let cache = Arc::new(open_cache(&config)?);
    let (cache_listener, cache_address) = bind(config.cache_listen).await?;
    let metrics_listener = OptionFuture::from(config.metrics_listen.map(bind))
        .await
        .transpose()?;
    let cache_public_key = cache.public_key();
    let metrics = Arc::new(Metrics::new());
    let logs = LogStore::new(config.log_directory.clone(), config.max_log_bytes);
    let attempts = Attempts::default();
    let (events, receiver) = mpsc::channel(EVENT_QUEUE);
    let handoff = Handoff::default();
    let systemd = Arc::new(Notifier::from_env());
    let published = Published::new(WATCH_QUEUE, systemd.clone(), metrics.scheduler.clone());
    let parts = SchedulerParts {
        connector,
        pool: &pool,
        cache: &cache,
        attempts: &attempts,
        handoff: &handoff,
        logs: &logs,
        gc_metrics: metrics.gc.clone(),
    };
    let mut supervisor = start_scheduler(&config, parts, &published, receiver, &shutdown);
    let (http, http_stop, metrics_address) = serve_http_listeners(HttpParts {
        cache_listener,
        metrics_listener,
        cache: cache.clone(),
        logs: logs.clone(),
        pool: pool.clone(),
        metrics: metrics.clone(),
        recovered: published.recovered.clone(),
        scheduler: events.clone(),
        cache_directory: config.cache_directory.clone(),
        shutdown: shutdown.clone(),
    });
    let sessions = TaskTracker::new();
    let builder_service = BuilderServiceImpl::new(
        SchedulerSide {
            events: events.clone(),
            recovered: published.recovered.clone(),
        },
        attempts,
        UploadTargets {
            cache: cache.clone(),
            logs: logs.clone(),
            metrics: metrics.uploads.clone(),
        },
        session_timing(&config),
        shutdown.clone(),
        sessions.clone(),
    );
    let served_tls = serve_grpc(
        GrpcParts {
            listener,
            tls,
            builder_service,
            pool: pool.clone(),
            scheduler: events.clone(),
            refusals: metrics.refusals.clone(),
            builds: Builds::new(
                pool,
                logs.clone(),
                cache,
                handoff,
                submit_limits(&config),
                events.clone(),
            ),
            changes: published.changes.clone(),
            heartbeat: config.heartbeat,
            max_submission_bytes: config.max_submission_bytes,
            web,
        },
        &shutdown,
        &mut supervisor,
    )
    .await?;
    tracing::info!(%grpc_address, %cache_address, ?metrics_address, %cache_public_key, version = env!("CARGO_PKG_VERSION"), api = drover_proto::API_VERSION, "queue runner serving");
    Ok(Runner {
        grpc_address,
        cache_address,
        metrics_address,
        web_address,
        cache_public_key,
        queue_recovered: published.recovered.clone(),
        systemd,
        scheduler: events,
        tls: served_tls,
        shutdown,
        supervisor,
        http,
        http_stop,
        sessions,
    })
}

/// Starts garbage collection, if it is on, as the task "garbage collector" of `supervisor`.
fn start_sweeper(
    config: &Config,
    parts: &SchedulerParts<'_>,
    shutdown: &CancellationToken,
    supervisor: &mut Supervisor<RunnerError>,
) {
    let Some(interval) = config.gc.interval else {
        return;
    };
    let logs = (config.log_keep_days > 0).then(|| LogExpiry {
        logs: parts.logs.clone(),
        keep_days: config.log_keep_days,
    });
    let history = (config.history_keep_days > 0).then(|| {
        Pruner::new(
            parts.pool.clone(),
            parts.handoff.gate().clone(),
            parts.logs.clone(),
            HistoryPolicy {
                keep_days: config.history_keep_days,
                cache_keep_days: config.gc.keep_days,
            },
            config.gc.key.clone(),
            config.gc.keep_per_key,
        )
    });
    if !config.gc.sweep && logs.is_none() && history.is_none() {
        return;
    }
    let sweeper = Sweeper::new(
        parts.pool.clone(),
        parts.cache.clone(),
        config.gc.clone(),
        logs,
        history,
    );
    let sweeping = sweeper.run(interval, parts.gc_metrics.clone(), shutdown.clone());
    supervisor.spawn_critical("garbage collector", async move {
        sweeping.await.map_err(|error| {
            RunnerError::Database(WithContext::from(error).context("collecting garbage"))
        })
    });
}

/// Reads the revoked certificates, and starts recording the ones seen at handshakes as the task
/// "certificate recorder" of `supervisor`.
async fn start_certificates(
    pool: &db::Pool,
    shutdown: &CancellationToken,
    supervisor: &mut Supervisor<RunnerError>,
) -> Result<(Revocations, Sightings), RunnerError> {
    let revocations = Revocations::load(pool).await.map_err(|error| {
        RunnerError::Database(WithContext::from(error).context("reading the revoked certificates"))
    })?;
    let (sightings, seen) = Sightings::channel();
    let recorder = record_sightings(pool.clone(), seen, shutdown.clone());
    supervisor.spawn_critical("certificate recorder", async move {
        recorder.await;
        Ok(())
    });
    Ok((revocations, sightings))
}

/// The gRPC listener and the services it serves.
struct GrpcParts {
    listener: tokio::net::TcpListener,
    tls: ServerTls,
    builder_service: BuilderServiceImpl,
    /// The build API, for the build service and the web listener.
    builds: Builds,
    /// What is committed, for Watch streams.
    changes: crate::scheduler::driver::CommittedChanges,
    /// How often idle streams send a heartbeat.
    heartbeat: Duration,
    /// For the admin service and the certificates.
    pool: db::Pool,
    scheduler: mpsc::Sender<crate::scheduler::driver::SessionEvent>,
    /// Counts refused calls.
    refusals: crate::metrics::RefusalMetrics,
    max_submission_bytes: usize,
    /// The web listener, if there is one.
    web: Option<WebListener>,
}

/// The web listener, bound, and its TLS configuration.
struct WebListener {
    listener: tokio::net::TcpListener,
    address: SocketAddr,
    tls: ServerTls,
    /// Whether the status page needs no credential.
    public_status: bool,
}

/// Binds the web listener, if `[web]` asks for one; returns it and its address.
async fn bind_web(
    config: &Config,
) -> Result<(Option<WebListener>, Option<SocketAddr>), RunnerError> {
    let Some(web) = &config.web else {
        return Ok((None, None));
    };
    let tls = ServerTls::load(config, Side::Web).map_err(RunnerError::Tls)?;
    let (listener, address) = bind(web.listen).await?;
    let listener = WebListener {
        listener,
        address,
        tls,
        public_status: web.public_status,
    };
    Ok((Some(listener), Some(address)))
}

/// Serves the gRPC services over mutual TLS as the task "grpc server" of `supervisor`, and
/// the web listener as the task "web server", until `shutdown`, checking every call against the
/// revoked certificates and recording those seen. Returns the TLS configurations served.
async fn serve_grpc(
    parts: GrpcParts,
    shutdown: &CancellationToken,
    supervisor: &mut Supervisor<RunnerError>,
) -> Result<Vec<ServerTls>, RunnerError> {
    let (revocations, sightings) = start_certificates(&parts.pool, shutdown, supervisor).await?;
    let tokens = Tokens::new(parts.pool.clone());
    let mut listeners_tls = vec![parts.tls.clone()];
    if let Some(web) = parts.web {
        listeners_tls.push(web.tls.clone());
        let state = crate::web::WebState {
            builds: parts.builds.clone(),
            tokens: tokens.clone(),
            revocations: revocations.clone(),
            refusals: parts.refusals.clone(),
            changes: parts.changes.clone(),
            heartbeat: parts.heartbeat,
            shutdown: shutdown.clone(),
            public_status: web.public_status,
            overview: crate::web::pages::OverviewCache::default(),
        };
        let router = crate::web::router(state, parts.max_submission_bytes)
            .into_make_service_with_connect_info::<crate::web::Peer>();
        let accepted = web
            .tls
            .accept(TcpListenerStream::new(web.listener), sightings.clone());
        let listener = crate::web::TlsListener::new(accepted, web.address);
        let stop = shutdown.clone();
        supervisor.spawn_critical("web server", async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .map_err(RunnerError::ServeWeb)
        });
    }
    let build_service = BuildServiceImpl::new(
        parts.builds,
        parts.changes,
        parts.heartbeat,
        shutdown.clone(),
    );
    let admin = Admin::new(parts.pool, parts.scheduler, revocations.clone());
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .layer(tower::util::MapRequestLayer::new(
            crate::grpc::auth::prepare::<tonic::body::Body>(revocations, parts.refusals),
        ))
        .add_service(health_service().await)
        .add_service(reflection()?)
        .add_service(
            BuilderServiceServer::new(parts.builder_service)
                .max_decoding_message_size(drover_proto::MAX_TUNNEL_MESSAGE_BYTES)
                .max_encoding_message_size(drover_proto::MAX_TUNNEL_MESSAGE_BYTES),
        )
        .add_service(
            BuildServiceServer::new(build_service)
                .max_decoding_message_size(parts.max_submission_bytes),
        )
        .add_service(AdminServiceServer::new(AdminServiceImpl::new(
            admin, tokens,
        )))
        .serve_with_incoming_shutdown(
            parts
                .tls
                .accept(TcpListenerStream::new(parts.listener), sightings),
            shutdown.clone().cancelled_owned(),
        );
    supervisor.spawn_critical("grpc server", async move {
        server.await.map_err(RunnerError::Serve)
    });
    Ok(listeners_tls)
}

/// gRPC server reflection of drover.v1 and grpc.health.v1, for grpcurl and the like.
fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    RunnerError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(drover_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(RunnerError::Reflection)
}

/// The HTTP listeners and what they serve.
struct HttpParts {
    cache_listener: tokio::net::TcpListener,
    /// The metrics' listener, if they are served, with its address.
    metrics_listener: Option<(tokio::net::TcpListener, SocketAddr)>,
    cache: Arc<crate::cache::BinaryCache>,
    logs: LogStore,
    pool: db::Pool,
    metrics: Arc<Metrics>,
    recovered: QueueRecovered,
    scheduler: mpsc::Sender<crate::scheduler::driver::SessionEvent>,
    cache_directory: PathBuf,
    shutdown: CancellationToken,
}

/// Serves the binary cache with the health routes, and metrics if they are wanted, until the
/// returned token is cancelled: after everything else has stopped. Returns their supervisor,
/// that token and the metrics' address.
fn serve_http_listeners(
    parts: HttpParts,
) -> (
    Supervisor<RunnerError>,
    CancellationToken,
    Option<SocketAddr>,
) {
    let stop = CancellationToken::new();
    let mut http = Supervisor::new();
    let cache_routes = crate::cache::http::router(
        parts.cache,
        parts.logs,
        parts.pool.clone(),
        parts.metrics.cache.clone(),
    )
    .merge(crate::health::router(
        parts.pool,
        parts.recovered,
        parts.shutdown,
    ));
    serve_http(
        &mut http,
        ("cache http server", RunnerError::ServeCache),
        parts.cache_listener,
        cache_routes,
        &stop,
    );
    let metrics_address = parts.metrics_listener.map(|(listener, address)| {
        let routes = crate::metrics::routes(parts.metrics, parts.scheduler, parts.cache_directory);
        serve_http(
            &mut http,
            ("metrics http server", RunnerError::ServeMetrics),
            listener,
            routes,
            &stop,
        );
        address
    });
    (http, stop, metrics_address)
}

/// Serves `routes` on an HTTP listener (the binary cache and health, or metrics) as the task
/// `name` of `supervisor`, until `stop` is cancelled: after everything else has stopped.
fn serve_http(
    supervisor: &mut Supervisor<RunnerError>,
    (name, failed): (&'static str, fn(std::io::Error) -> RunnerError),
    listener: tokio::net::TcpListener,
    routes: axum::Router,
    stop: &CancellationToken,
) {
    let shutdown = stop.clone();
    supervisor.spawn_critical(name, async move {
        axum::serve(listener, routes)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(failed)
    });
}

/// What a submission may carry.
fn submit_limits(config: &Config) -> SubmitLimits {
    SubmitLimits {
        max_derivation_bytes: config.max_derivation_bytes,
        refuse_unknown_systems: config.refuse_unknown_systems,
    }
}

/// `grpc.health.v1`, saying the builder service serves.
async fn health_service()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<BuilderServiceServer<BuilderServiceImpl>>()
        .await;
    service
}

/// How often builders ping, and how long one may be silent.
fn session_timing(config: &Config) -> SessionTiming {
    SessionTiming {
        ping_interval: config.ping_interval,
        liveness_timeout: config.liveness_timeout,
    }
}

/// What the scheduler and ingest share with the rest of the runner.
struct SchedulerParts<'a> {
    /// Opens the LISTEN connection that wakes ingest.
    connector: db::Connector,
    pool: &'a db::Pool,
    cache: &'a Arc<crate::cache::BinaryCache>,
    /// The running attempts, which the gRPC handlers authorise uploads with.
    attempts: &'a Attempts,
    /// Closures Submit verified, for ingest.
    handoff: &'a Handoff,
    /// Step logs, which garbage collection expires.
    logs: &'a LogStore,
    /// What garbage collection moves.
    gc_metrics: crate::metrics::GcMetrics,
}

/// Starts the scheduler (driver and core), ingest, which feeds it plans, the LISTEN
/// connection that wakes ingest, and garbage collection, on the supervisor it returns.
fn start_scheduler(
    config: &Config,
    parts: SchedulerParts<'_>,
    published: &Published,
    sessions: mpsc::Receiver<crate::scheduler::driver::SessionEvent>,
    shutdown: &CancellationToken,
) -> Supervisor<RunnerError> {
    let mut supervisor = Supervisor::new();
    start_sweeper(config, &parts, shutdown, &mut supervisor);
    let builds_queued = Arc::new(Notify::new());
    let listen = listen::listen(parts.connector, builds_queued.clone(), shutdown.clone());
    supervisor.spawn_critical("ingest listener", async move {
        listen.await.map_err(RunnerError::Database)
    });
    let (plans, plan_receiver) = mpsc::channel(PLAN_QUEUE);
    let core = Core::new(
        crate::reload::core_limits(config),
        Box::new(uuid::Uuid::new_v4),
    );
    let driver = Driver::new(
        core,
        parts.pool.clone(),
        parts.attempts.clone(),
        crate::reload::build_limits(config),
        published.clone(),
    );
    let scheduler_run = driver.run(sessions, plan_receiver, shutdown.clone());
    supervisor.spawn_critical("scheduler", async move {
        Box::pin(scheduler_run)
            .await
            .map_err(RunnerError::Scheduler)
    });
    let ingest_run = Ingest::new(
        parts.pool.clone(),
        parts.cache.clone(),
        plans,
        published.completions.clone(),
        parts.handoff.clone(),
        published.changes.clone(),
    )
    .run(builds_queued, shutdown.clone());
    supervisor.spawn_critical("ingest", async move {
        ingest_run.await.map_err(RunnerError::Ingest)
    });
    supervisor
}

/// Binds a listener and returns it with the address it got (port 0 picks a free port).
async fn bind(address: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), RunnerError> {
    let bind_error = |source| RunnerError::Bind { address, source };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

fn open_cache(config: &Config) -> Result<crate::cache::BinaryCache, RunnerError> {
    let path = &config.cache_secret_key_file;
    let text = fs_err::read_to_string(path).map_err(|source| RunnerError::ReadCacheKey {
        path: path.clone(),
        source,
    })?;
    let key = nix_primitives::SecretKey::parse(&text).map_err(|source| RunnerError::CacheKey {
        path: path.clone(),
        source,
    })?;
    let upstreams = config
        .upstreams
        .iter()
        .map(|upstream| Upstream::open(upstream.clone(), config.upstream_negative_ttl))
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunnerError::Upstream)?;
    crate::cache::BinaryCache::open(&config.cache_directory, key, Upstreams::new(upstreams))
        .map_err(|error| RunnerError::Cache(error.into()))
}

impl Runner {
    /// What applies the configuration file at `path` again (on SIGHUP), with the command
    /// line's `overrides`, to the scheduler and to `log_filter`; `running` is the configuration
    /// this runner was started with.
    #[must_use]
    pub fn reloader(
        &self,
        file: crate::reload::ConfigSource,
        running: Config,
        log_filter: drover_daemon::LogFilter,
    ) -> crate::reload::Reloader {
        crate::reload::Reloader::new(
            file,
            running,
            self.scheduler.clone(),
            log_filter,
            self.tls.clone(),
        )
    }

    /// Waits until a critical task ends. After a requested shutdown that is success; otherwise
    /// it is the fatal error the runner exits with. The other tasks are then told to stop.
    pub async fn wait(mut self) -> Result<(), WithContext<RunnerError>> {
        let first = tokio::select! {
            exit = self.supervisor.next_exit() => exit,
            exit = self.http.next_exit() => exit,
        };
        let shutting_down = self.shutdown.is_cancelled();
        self.shutdown.cancel();
        self.systemd.stopping();
        let result = match first {
            None => Ok(()),
            Some(Ok((_, Ok(())))) if shutting_down => Ok(()),
            Some(Ok((name, Ok(())))) => Err(RunnerError::TaskEnded(name).into()),
            Some(Ok((name, Err(error)))) => {
                Err(WithContext::from(error).context(format!("the {name} task failed")))
            }
            Some(Err(panic)) => Err(RunnerError::TaskPanicked(panic).into()),
        };
        self.sessions.close();
        let stopped = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.supervisor.next_exit().await.is_some() {}
            self.sessions.wait().await;
        })
        .await;
        if stopped.is_err() {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                tasks = ?self.supervisor.still_running(),
                builder_sessions = self.sessions.len(),
                "tasks still running at the end of the shutdown grace period"
            );
        }
        self.http_stop.cancel();
        let _ = tokio::time::timeout(HTTP_STOP_GRACE, async {
            while self.http.next_exit().await.is_some() {}
        })
        .await;
        tracing::info!("queue runner stopped");
        result
    }
}
