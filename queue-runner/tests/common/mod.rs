//! The farm harness every runner integration test uses: its own PostgreSQL database, a CA and
//! certificates made for the test, the runner serving mTLS gRPC on a real socket (in this
//! process, with its own shutdown token), and builders as real `drover-builder` processes. All of
//! it is torn down when the [`Farm`] is dropped, also when the test fails.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod nix;
pub mod nix_farm;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::builder_service_client::BuilderServiceClient;
use drover_proto::v1::{DerivationText, GetRequest, SubmitRequest};
use drover_queue_runner::app;
use drover_queue_runner::config::Config;
use drover_tls::Role;
use nix_primitives::SecretKey;
use test_support::farm::{
    BuilderExecutor, BuilderToml, FarmFiles, Reconnect, integer, nix_environment,
};
use test_support::{
    ChildGuard, TestDatabase, TestPostgres, free_port, poll_until, workspace_binary,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use test_support::fake_derivations::FakeDrv;

/// A build's status as the runner stores it (not the wire's `BuildStatus`).
pub use drover_queue_runner::db::status::BuildStatus as Stored;
pub use drover_queue_runner::db::status::{AttemptStatus, StepStatus};

/// A step status read from a `status::text` column.
pub fn step_status(label: &str) -> StepStatus {
    StepStatus::from_label(label).unwrap_or_else(|| panic!("unknown step status {label:?}"))
}

/// An attempt status read from a `status::text` column.
pub fn attempt_status(label: &str) -> AttemptStatus {
    AttemptStatus::from_label(label).unwrap_or_else(|| panic!("unknown attempt status {label:?}"))
}

/// A build status read from a `status::text` column.
pub fn build_status(label: &str) -> Stored {
    Stored::from_label(label).unwrap_or_else(|| panic!("unknown build status {label:?}"))
}

/// A fresh database with the runner's schema, and a pool of two connections on it.
pub async fn migrated_database() -> (TestDatabase, drover_queue_runner::db::Pool) {
    use drover_queue_runner::db;
    let database = TestPostgres::shared().create_database().await;
    let pool = db::Connector::new(&db::DatabaseConfig::plain(&database.connection_string))
        .unwrap()
        .pool(2)
        .unwrap();
    db::migrate(&pool).await.unwrap();
    (database, pool)
}

/// How long a test waits for the farm to reach a state.
pub const DEADLINE: Duration = Duration::from_mins(1);

/// A running runner.
struct RunningRunner {
    /// Where it serves metrics.
    metrics_address: Option<std::net::SocketAddr>,
    /// Where it serves the web listener, if it does.
    web_address: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

/// One test's farm.
pub struct Farm {
    /// Certificates, configs and logs.
    pub dir: tempfile::TempDir,
    /// The test's database.
    pub database: TestDatabase,
    /// Its CA, certificates and cache key, in `dir`.
    files: FarmFiles,
    /// The runner's gRPC port, fixed at the first start so builders can reconnect.
    pub grpc_port: u16,
    /// The runner's binary cache port.
    pub cache_port: u16,
    /// Upstream caches (URL, public key) for the runner and the Nix builders.
    pub upstreams: Vec<(String, String)>,
    /// A CA the runner and the Nix builders trust for the upstreams (`NIX_SSL_CERT_FILE` for
    /// Nix).
    pub upstream_ca: Option<PathBuf>,
    /// Whether the Nix builders are left without the upstreams (the runner still uses them), so
    /// a step's input the runner expects from an upstream cannot be substituted.
    pub hide_upstreams_from_builders: bool,
    /// The runner's step time limit and silence limit, in seconds.
    pub step_limits_secs: (u64, u64),
    /// The runner's output size limit.
    pub max_output_bytes: u64,
    /// How long runnable steps wait for a builder that can run them, in seconds.
    pub unsupported_grace_secs: u64,
    /// How long attempts left by a previous runner wait for their builders, in seconds.
    pub readoption_grace_secs: u64,
    /// How long the attempts of a builder whose connection failed wait for it, in seconds.
    pub rejoin_grace_secs: u64,
    /// How often idle Watch streams send a heartbeat, in milliseconds.
    pub heartbeat_ms: u64,
    /// How long a builder may be silent before its session ends, in seconds.
    pub liveness_timeout_secs: u64,
    /// Whether Submit refuses systems and features no builder ever offered (off by default
    /// here, so tests can queue work for builders that join later).
    pub refuse_unknown_systems: bool,
    /// `[builders] min_free_disk_bytes`: 1 GiB unless a test changes it.
    pub min_free_disk_bytes: i64,
    /// `[builders] quarantine_after_failures`: 0 (never) unless a test changes it, so tests of
    /// retries on one builder see every retry.
    pub quarantine_after_failures: i64,
    /// Where runner and builder processes export traces (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub otlp_endpoint: Option<String>,
    /// More keys of the runner's configuration (`gc.keep_days`, …), set last.
    pub runner_settings: Vec<(&'static str, toml::Value)>,
    runner: Option<RunningRunner>,
    builders: Vec<ChildGuard>,
    /// The nix-daemons of sandboxed builders.
    daemons: Vec<ChildGuard>,
}

/// What a builder offers.
#[derive(Debug, Clone)]
pub struct BuilderSpec<'a> {
    /// Its name (certificate identity).
    pub name: &'a str,
    /// Systems.
    pub systems: &'a [&'a str],
    /// Supported features.
    pub features: &'a [&'a str],
    /// Mandatory features.
    pub mandatory: &'a [&'a str],
    /// Max jobs.
    pub max_jobs: u32,
    /// Milliseconds each noop step takes.
    pub build_ms: u64,
    /// With a directory: the builder runs the Nix executor with that directory as its private
    /// `/nix` (a mount namespace of its own).
    pub nix_store: Option<&'a Path>,
    /// How long a drain (SIGTERM) lets running steps finish.
    pub drain_deadline_secs: u64,
    /// With a `nix_store`: builds go through a nix-daemon of that store that builds in Nix's
    /// sandbox, and the builder runs restricted as the shipped unit restricts it.
    pub sandboxed: bool,
    /// The port it dials instead of the runner's (a proxy's).
    pub runner_port: Option<u16>,
    /// Where it serves its metrics; none if `None`.
    pub metrics_port: Option<u16>,
}

impl<'a> BuilderSpec<'a> {
    /// An `x86_64-linux` builder with two slots and instant builds.
    pub fn new(name: &'a str) -> Self {
        Self {
            name,
            systems: &["x86_64-linux"],
            features: &[],
            mandatory: &[],
            max_jobs: 2,
            build_ms: 0,
            nix_store: None,
            drain_deadline_secs: 30,
            sandboxed: false,
            runner_port: None,
            metrics_port: None,
        }
    }
}

impl Farm {
    /// A farm with a fresh database and CA; nothing started yet.
    pub async fn new() -> Self {
        let database = TestPostgres::shared().create_database().await;
        let dir = tempfile::tempdir().unwrap();
        let files = FarmFiles::create(dir.path(), "main").unwrap();
        Self {
            dir,
            database,
            files,
            // Fixed at the first start: the runner binds them again at every start, so
            // builders reconnect to the same address.
            grpc_port: free_port(),
            cache_port: free_port(),
            upstreams: Vec::new(),
            upstream_ca: None,
            hide_upstreams_from_builders: false,
            step_limits_secs: (600, 600),
            max_output_bytes: 1 << 30,
            unsupported_grace_secs: 300,
            readoption_grace_secs: 120,
            rejoin_grace_secs: 1,
            heartbeat_ms: 15_000,
            liveness_timeout_secs: 5,
            refuse_unknown_systems: false,
            min_free_disk_bytes: 1 << 30,
            quarantine_after_failures: 0,
            otlp_endpoint: None,
            runner_settings: Vec::new(),
            runner: None,
            builders: Vec::new(),
            daemons: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The runner's configuration for this farm.
    pub fn runner_config(&self) -> Config {
        let text = self.runner_config_text(&self.database.connection_string);
        Config::parse(&text, &self.path("runner.toml")).unwrap()
    }

    /// The key the farm's cache is signed with.
    pub fn cache_key(&self) -> &SecretKey {
        self.files.cache_key()
    }

    /// The runner's configuration file for this farm, with another database if wanted.
    pub fn runner_config_text(&self, database_url: &str) -> String {
        let (step_timeout, max_silent) = self.step_limits_secs;
        let config = self
            .files
            .runner_config(database_url, self.grpc_port, self.cache_port)
            .set("database.pool_size", 4)
            .set("grpc.heartbeat_ms", integer(self.heartbeat_ms))
            .set("logs.max_bytes", 1_048_576)
            .set("builders.ping_interval_secs", 1)
            .set(
                "builders.liveness_timeout_secs",
                integer(self.liveness_timeout_secs),
            )
            .set("builders.max_builder_losses", 3)
            .set("builders.step_timeout_secs", integer(step_timeout))
            .set("builders.max_silent_secs", integer(max_silent))
            .set("builders.max_output_bytes", integer(self.max_output_bytes))
            .set(
                "builders.unsupported_grace_secs",
                integer(self.unsupported_grace_secs),
            )
            .set(
                "builders.readoption_grace_secs",
                integer(self.readoption_grace_secs),
            )
            .set(
                "builders.rejoin_grace_secs",
                integer(self.rejoin_grace_secs),
            )
            .set(
                "submissions.refuse_unknown_systems",
                self.refuse_unknown_systems,
            )
            .set("builders.min_free_disk_bytes", self.min_free_disk_bytes)
            // This machine's own memory pressure must not hold test builders.
            .set("builders.max_memory_pressure_percent", 0.0)
            .set(
                "builders.quarantine_after_failures",
                self.quarantine_after_failures,
            )
            .set("retry.max_attempts", 4)
            .set("retry.initial_interval_ms", 100)
            .set("retry.multiplier", 2.0)
            .set("retry.max_interval_ms", 400);
        let config = self
            .runner_settings
            .iter()
            .fold(config, |config, (key, value)| {
                config.set(key, value.clone())
            });
        let ca = self
            .upstream_ca
            .as_ref()
            .map(|path| path.display().to_string());
        self.upstreams
            .iter()
            .fold(config, |config, (url, key)| {
                let mut entry = vec![("url", url.as_str()), ("public_key", key.as_str())];
                entry.extend(ca.as_deref().map(|ca| ("ca_certificate", ca)));
                config.push("cache.upstreams", &entry)
            })
            .to_toml()
    }

    /// Starts the runner (again).
    pub async fn start_runner(&mut self) {
        assert!(self.runner.is_none(), "the runner is already running");
        let shutdown = CancellationToken::new();
        let runner = app::start(self.runner_config(), shutdown.clone())
            .await
            .unwrap_or_else(|error| panic!("starting the runner: {}", error.report()));
        let recovered = runner.queue_recovered.clone();
        let (metrics_address, web_address) = (runner.metrics_address, runner.web_address);
        #[expect(clippy::disallowed_methods, reason = "the test owns the runner task")]
        let task = tokio::spawn(async move {
            runner
                .wait()
                .await
                .map_err(|error| error.report().to_string())
        });
        self.runner = Some(RunningRunner {
            metrics_address,
            web_address,
            shutdown,
            task,
        });
        poll_until(DEADLINE, "the runner to recover its queue", || async {
            recovered.get().then_some(())
        })
        .await;
    }

    /// Where the running runner serves its web listener (`[web]`, which a test sets with
    /// [`Farm::serve_web`]).
    pub fn web_address(&self) -> std::net::SocketAddr {
        let runner = self.runner.as_ref().expect("a running runner");
        runner.web_address.expect("a web listener")
    }

    /// Makes the runner serve the web listener (on any free port), presenting the runner's
    /// own certificate (issued by the farm's CA for localhost).
    pub fn serve_web(&mut self) {
        let file = |name: &str| self.path(name).display().to_string();
        self.runner_settings.extend([
            ("web.listen", "127.0.0.1:0".into()),
            ("web.certificate", file("runner-main.pem").into()),
            ("web.key", file("runner-main.key").into()),
        ]);
    }

    /// Where the running runner serves metrics.
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        let runner = self.runner.as_ref().expect("a running runner");
        runner.metrics_address.expect("metrics served")
    }

    /// Starts the `drover-queue-runner` binary on this farm's ports with `database_url`, logging
    /// to `log_name` in the farm directory, and waits until it has recovered its queue (builders
    /// can join). For tests that kill the runner or watch it exit.
    pub async fn spawn_runner_process(&self, database_url: &str, log_name: &str) -> ChildGuard {
        let config = self.path("runner-process.toml");
        fs_err::write(&config, self.runner_config_text(database_url)).unwrap();
        let log_path = self.path(log_name);
        let log = fs_err::File::create(&log_path).unwrap();
        let mut command = Command::new(workspace_binary("drover-queue-runner"));
        if let Some(endpoint) = &self.otlp_endpoint {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        let runner = ChildGuard::spawn(
            command
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.into_parts().0),
        )
        .unwrap();
        poll_until(DEADLINE, "the runner to recover its queue", || async {
            fs_err::read_to_string(&log_path)
                .unwrap()
                .contains("queue recovered")
                .then_some(())
        })
        .await;
        runner
    }

    /// Stops the runner and waits until it has.
    pub async fn stop_runner(&mut self) {
        let runner = self.runner.take().expect("the runner is not running");
        runner.shutdown.cancel();
        let result = runner.task.await.unwrap();
        assert_eq!(result, Ok(()), "the runner did not stop cleanly");
    }

    /// Issues a certificate for `role`/`name` into the farm directory; returns (cert, key).
    pub fn issue(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        self.files.issue(role, name).unwrap()
    }

    /// Issues the runner a new certificate and key (same identity) into `dir`; returns their
    /// paths.
    pub fn renew_runner_certificate(&self, dir: &Path) -> (PathBuf, PathBuf) {
        self.files.issue_runner(dir).unwrap()
    }

    /// Starts a `drover-builder` process; returns its index for [`Farm::kill_builder`].
    pub fn start_builder(&mut self, spec: &BuilderSpec<'_>) -> usize {
        let cache_key = self.cache_key().public_key().to_string();
        let executor = match spec.nix_store {
            None => BuilderExecutor::Noop {
                build_ms: spec.build_ms,
            },
            Some(_) => BuilderExecutor::Nix {
                cache_url: format!("http://127.0.0.1:{}", self.cache_port),
                trusted_public_keys: std::iter::once(cache_key.as_str())
                    .chain(self.upstreams.iter().map(|(_, key)| key.as_str()))
                    .collect(),
                upstream_substituters: self
                    .upstreams
                    .iter()
                    .filter(|_| !self.hide_upstreams_from_builders)
                    .map(|(url, _)| url.as_str())
                    .collect(),
                store: if spec.sandboxed { "daemon" } else { "local" },
            },
        };
        let config = self
            .files
            .builder_toml(&BuilderToml {
                systems: spec.systems,
                supported_features: spec.features,
                mandatory_features: spec.mandatory,
                drain_deadline_secs: Some(spec.drain_deadline_secs),
                executor,
                reconnect: Some(Reconnect {
                    initial_ms: 50,
                    max_ms: 500,
                    budget_secs: 60,
                }),
                metrics_port: spec.metrics_port,
                ..BuilderToml::new(
                    spec.name,
                    spec.runner_port.unwrap_or(self.grpc_port),
                    spec.max_jobs,
                )
            })
            .unwrap();
        let config_path = self.path(&format!("builder-{}.toml", spec.name));
        fs_err::write(&config_path, config).unwrap();
        let log = fs_err::File::create(self.path(&format!("builder-{}.log", spec.name))).unwrap();
        let mut command = match spec.nix_store {
            None => Command::new(workspace_binary("drover-builder")),
            Some(store) if spec.sandboxed => {
                self.start_nix_daemon(spec.name, store);
                let mut command = test_support::restricted_private_store_command(store);
                command.arg(workspace_binary("drover-builder"));
                command
            }
            Some(store) => {
                let mut command = nix::private_store_command(store);
                command.arg(workspace_binary("drover-builder"));
                command
            }
        };
        let home = self.path(&format!("home-{}", spec.name));
        fs_err::create_dir_all(&home).unwrap();
        nix_environment(&mut command, &home);
        if let Some(ca) = &self.upstream_ca {
            command.env("NIX_SSL_CERT_FILE", ca);
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        if spec.sandboxed {
            // The nix.conf the daemon reads, as on a real host: a trusted client's settings
            // override the daemon's, `sandbox = false` included.
            command.env("NIX_CONFIG", test_support::farm::sandboxed_nix_config());
        }
        let child = ChildGuard::spawn(
            command
                .arg("--config")
                .arg(&config_path)
                // Each step's phases (process, inputs, build, outputs), for a failed test's log.
                .env("RUST_LOG", "info,drover_builder::jobs=debug")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap().into_parts().0)
                .stderr(log.into_parts().0),
        )
        .unwrap();
        self.builders.push(child);
        self.builders.len() - 1
    }

    /// Starts a root nix-daemon on `store` that builds in Nix's sandbox, as NixOS runs it, and
    /// waits for its socket.
    fn start_nix_daemon(&mut self, name: &str, store: &Path) {
        let home = self.path(&format!("home-daemon-{name}"));
        fs_err::create_dir_all(&home).unwrap();
        let log = fs_err::File::create(self.path(&format!("nix-daemon-{name}.log"))).unwrap();
        let mut command = nix::private_store_command(store);
        nix_environment(&mut command, &home);
        let daemon = ChildGuard::spawn(
            command
                .arg("nix-daemon")
                .env("NIX_CONFIG", test_support::farm::sandboxed_nix_config())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap().into_parts().0)
                .stderr(log.into_parts().0),
        )
        .unwrap();
        self.daemons.push(daemon);
        let socket = store.join("var/nix/daemon-socket/socket");
        let deadline = std::time::Instant::now() + DEADLINE;
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "nix-daemon made no socket at {}",
                socket.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM to builder `index`, as systemd stopping it would.
    pub fn terminate_builder(&mut self, index: usize) {
        let pid = self.builders[index].id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
    }

    /// How builder `index` exited, if it has.
    pub fn builder_exit(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        self.builders[index].child_mut().try_wait().unwrap()
    }

    /// Waits up to `within` for builder `index` to exit; its exit status.
    pub async fn wait_builder_exit(
        &mut self,
        index: usize,
        within: std::time::Duration,
    ) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.builder_exit(index) {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "builder {index} did not exit within {within:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Kills a builder process with SIGKILL, as a crashed machine would vanish.
    pub fn kill_builder(&mut self, index: usize) {
        let child = self.builders[index].child_mut();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to builder `index`, as `kill -SIGNAL` would.
    pub fn signal_builder(&mut self, index: usize, signal: &str) {
        let pid = self.builders[index].child_mut().id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// A TLS channel to the runner presenting the certificate of `role`/`name`.
    pub async fn channel(&self, role: Role, name: &str) -> Channel {
        let (cert, key) = self.issue(role, name);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                fs_err::read(self.files.ca_certificate()).unwrap(),
            ))
            .identity(tonic::transport::Identity::from_pem(
                fs_err::read(cert).unwrap(),
                fs_err::read(key).unwrap(),
            ))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://localhost:{}", self.grpc_port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// The `drover` command line, set up to reach this farm as a client.
    pub fn drover(&self) -> std::process::Command {
        self.drover_as(Role::Client, "tester")
    }

    /// The `drover` command line, set up to reach this farm as `name` with `role`.
    pub fn drover_as(&self, role: Role, name: &str) -> std::process::Command {
        let (cert, key) = self.issue(role, name);
        let mut command = std::process::Command::new(workspace_binary("drover"));
        command
            .env(
                "DROVER_RUNNER",
                format!("https://localhost:{}", self.grpc_port),
            )
            .env("DROVER_CA", self.files.ca_certificate())
            .env("DROVER_CERT", cert)
            .env("DROVER_KEY", key);
        command
    }

    /// Runs `drover ARGS` against this farm to its end, off the test's runtime threads.
    pub async fn run_drover(&self, args: &[&str]) -> std::process::Output {
        self.run_drover_as(Role::Client, args).await
    }

    /// Runs `drover ARGS` against this farm with a certificate of `role`.
    pub async fn run_drover_as(&self, role: Role, args: &[&str]) -> std::process::Output {
        let mut command = self.drover_as(role, "tester");
        command.args(args);
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    }

    /// A build client with a client certificate.
    pub async fn client(&self) -> BuildServiceClient<Channel> {
        BuildServiceClient::new(self.channel(Role::Client, "tester").await)
    }

    /// A builder-service client with a builder certificate, for scripted builders.
    pub async fn builder_client(&self, name: &str) -> BuilderServiceClient<Channel> {
        BuilderServiceClient::new(self.channel(Role::Builder, name).await)
    }

    /// Submits the derivations, building the last one.
    pub async fn submit(&self, drvs: &[&FakeDrv]) -> i64 {
        self.submit_request(Self::request(drvs)).await
    }

    /// The Submit request for the derivations, building the last one.
    pub fn request(drvs: &[&FakeDrv]) -> SubmitRequest {
        let top = drvs.last().expect("at least one derivation");
        SubmitRequest {
            derivations: drvs
                .iter()
                .map(|drv| DerivationText {
                    path: drv.path.to_absolute(),
                    text: drv.text.clone(),
                })
                .collect(),
            top_drv_path: top.path.to_absolute(),
            priority: 0,
            metadata: [("origin".to_owned(), "test".to_owned())].into(),
            ..SubmitRequest::default()
        }
    }

    /// Submits a request; returns the build id.
    pub async fn submit_request(&self, request: SubmitRequest) -> i64 {
        self.client()
            .await
            .submit(request)
            .await
            .unwrap_or_else(|status| panic!("submit refused: {status}"))
            .into_inner()
            .build_id
    }

    /// A connection to the test database.
    pub async fn db(&self) -> tokio_postgres::Client {
        self.database.connect().await
    }

    /// The single number a `SELECT count(*) …` (or any one-value query) returns.
    pub async fn count(&self, sql: &str) -> i64 {
        self.db().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Every attempt as (builder, status, message), oldest first.
    pub async fn attempts(&self) -> Vec<(String, AttemptStatus, String)> {
        self.db()
            .await
            .query(
                "SELECT machine, status::text, coalesce(message, '') FROM step_attempts
                 ORDER BY started_at",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), attempt_status(row.get(1)), row.get(2)))
            .collect()
    }

    /// Waits until a one-number query returns `expected`.
    pub async fn wait_for_count(&self, what: &str, sql: &str, expected: i64) {
        let db = self.db().await;
        poll_until(DEADLINE, what, || async {
            let count: i64 = db.query_one(sql, &[]).await.unwrap().get(0);
            (count == expected).then_some(())
        })
        .await;
    }

    /// Waits until a build is in a terminal state and returns that state.
    pub async fn wait_for_build(&self, id: i64) -> Stored {
        let db = self.db().await;
        poll_until(DEADLINE, &format!("build {id} to finish"), || async {
            let row = db
                .query_one(
                    "SELECT status::text, finished_at IS NOT NULL FROM builds WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            row.get::<_, bool>(1).then(|| build_status(row.get(0)))
        })
        .await
    }

    /// Reads a build through the API.
    pub async fn get(&self, id: i64) -> drover_proto::v1::GetResponse {
        self.client()
            .await
            .get(GetRequest { build_id: id })
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        if let Some(runner) = self.runner.take() {
            runner.shutdown.cancel();
        }
        // A failed test shows what its processes said (builders, runner processes, nix-daemons):
        // their logs go with the test's directory.
        if std::thread::panicking() {
            let logs = fs_err::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten();
            for entry in logs {
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_log = entry.path().extension().is_some_and(|ext| ext == "log");
                if is_log {
                    let text = fs_err::read_to_string(entry.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    eprintln!("--- last lines of {name} ---");
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}
