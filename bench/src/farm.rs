//! The farm a benchmark measures: a durable PostgreSQL cluster, the runner as a child process
//! (so its memory and CPU are its own), builders, and a client. Builders are either simulated in
//! this process (the real builder library with the noop executor over real mTLS tunnels) or
//! real `drover-builder` processes with the Nix executor, each with a private `/nix`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{
    DerivationText, Job, StageDerivationsRequest, SubmitJobSetRequest, SubmitRequest,
};
use drover_tls::Role;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use test_support::fake_derivations::FakeDrv;
use test_support::farm::{
    BuilderExecutor, BuilderToml, ConfigFile, FarmFiles, Reconnect, nix_environment,
};
use test_support::{ChildGuard, TestPostgres, free_port, private_store_command, workspace_binary};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use test_support::farm::NIX_CONFIG;

/// A runner process with its database, certificates and builders.
pub struct Farm {
    /// Holds the farm's files; removed when the farm is dropped.
    _dir: tempfile::TempDir,
    files: FarmFiles,
    config: std::path::PathBuf,
    runner: ChildGuard,
    port: u16,
    cache_port: u16,
    /// The web listener's port (the HTTP/JSON API).
    web_port: u16,
    builders: CancellationToken,
    builder_processes: Vec<ChildGuard>,
    /// A connection to the farm's database.
    pub db: tokio_postgres::Client,
}

impl Farm {
    /// Starts the runner on a fresh database of `cluster`.
    pub async fn start(cluster: &TestPostgres) -> Self {
        Self::start_with(cluster, |config| config).await
    }

    /// Starts the runner on a fresh database of `cluster`, its configuration adjusted by
    /// `adjust`.
    pub async fn start_with(
        cluster: &TestPostgres,
        adjust: impl FnOnce(ConfigFile) -> ConfigFile,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = FarmFiles::create(dir.path(), "scale").unwrap();
        files.issue(Role::Client, "scale").unwrap();
        let database = cluster.create_database().await;
        let port = free_port();
        let cache_port = free_port();
        let web_port = free_port();
        let config = dir.path().join("runner.toml");
        let file = |name: &str| files.path(name).display().to_string();
        let text = adjust(
            files
                .runner_config(&database.connection_string, port, cache_port)
                .set("web.listen", format!("127.0.0.1:{web_port}"))
                .set("web.certificate", file("runner-scale.pem"))
                .set("web.key", file("runner-scale.key"))
                .set("database.pool_size", 16)
                .set("builders.ping_interval_secs", 10)
                .set("builders.liveness_timeout_secs", 60),
        )
        .to_toml();
        fs_err::write(&config, text).unwrap();
        let runner = spawn_runner(&config);
        let db = database.connect().await;
        Self {
            _dir: dir,
            files,
            config,
            runner,
            port,
            cache_port,
            web_port,
            builders: CancellationToken::new(),
            builder_processes: Vec::new(),
            db,
        }
    }

    /// Stops the runner (SIGTERM) and starts it again on the same database.
    pub fn restart_runner(&mut self) {
        let _ = self.runner.terminate(Duration::from_secs(20));
        self.runner = spawn_runner(&self.config);
    }

    /// Stages `drvs` in chunks of about 16 MiB, then submits the derivations at `jobs` as one
    /// job set; returns its build ids.
    pub async fn submit_job_set(&self, drvs: &[FakeDrv], jobs: &[usize]) -> Vec<i64> {
        let mut client = self.client().await;
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for drv in drvs {
            bytes += drv.text.len();
            chunk.push(DerivationText {
                path: drv.path.to_absolute(),
                text: drv.text.clone(),
            });
            if bytes >= 16 << 20 {
                stage(&mut client, std::mem::take(&mut chunk)).await;
                bytes = 0;
            }
        }
        stage(&mut client, chunk).await;
        let request = SubmitJobSetRequest {
            jobs: jobs
                .iter()
                .map(|index| Job {
                    name: format!("job-{index}"),
                    drv_path: drvs[*index].path.to_absolute(),
                })
                .collect(),
            ..SubmitJobSetRequest::default()
        };
        client
            .submit_job_set(request)
            .await
            .unwrap()
            .into_inner()
            .builds
            .iter()
            .map(|build| build.build_id)
            .collect()
    }

    /// The runner's process id.
    pub fn runner_pid(&self) -> u32 {
        self.runner.id()
    }

    /// The configuration of builder `name` with `jobs` slots and `executor`; issues its
    /// certificate.
    fn builder_config(&self, name: &str, jobs: u32, executor: BuilderExecutor<'_>) -> String {
        self.files
            .builder_toml(&BuilderToml {
                executor,
                reconnect: Some(Reconnect {
                    initial_ms: 100,
                    max_ms: 1000,
                    budget_secs: 120,
                }),
                ..BuilderToml::new(name, self.port, jobs)
            })
            .unwrap()
    }

    /// Starts `count` builders with `jobs` slots each, named `prefix-<n>`, and waits until all
    /// joined.
    pub async fn start_builders(&self, prefix: &str, count: usize, jobs: u32) {
        for index in 0..count {
            let name = format!("{prefix}-{index}");
            let text = self.builder_config(&name, jobs, BuilderExecutor::Noop { build_ms: 0 });
            let config =
                drover_builder::config::Config::parse(&text, Path::new("builder.toml")).unwrap();
            let token = self.builders.clone();
            let metrics = drover_builder::metrics::BuilderMetrics::new(jobs);
            tokio::spawn(
                async move { drover_builder::tunnel::run(&config, &token, metrics).await },
            );
        }
        self.wait_for_builders(prefix, count).await;
    }

    /// Starts builder `name` as a `drover-builder` process with the Nix executor, `jobs` slots,
    /// and `store` as its private `/nix`, logging to `log` at `log_level`; waits until it
    /// joined.
    pub async fn start_nix_builder(
        &mut self,
        name: &str,
        jobs: u32,
        store: &Path,
        log: &Path,
        log_level: &str,
    ) {
        let cache_key = self.files.cache_key().public_key().to_string();
        let executor = BuilderExecutor::Nix {
            cache_url: format!("http://127.0.0.1:{}", self.cache_port),
            trusted_public_keys: vec![&cache_key],
            upstream_substituters: Vec::new(),
            store: "local",
        };
        let config = self.files.path(&format!("builder-{name}.toml"));
        fs_err::write(&config, self.builder_config(name, jobs, executor)).unwrap();
        let home = self.files.path(&format!("home-{name}"));
        fs_err::create_dir_all(&home).unwrap();
        fs_err::create_dir_all(store).unwrap();
        let log = fs_err::File::create(log).unwrap().into_parts().0;
        let mut command = private_store_command(store);
        nix_environment(&mut command, &home);
        let child = ChildGuard::spawn(
            command
                .arg(workspace_binary("drover-builder"))
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", log_level)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap();
        self.builder_processes.push(child);
        self.wait_for_builders(name, 1).await;
    }

    /// Waits until `count` builders whose names start with `prefix` are connected.
    async fn wait_for_builders(&self, prefix: &str, count: usize) {
        let expected = i64::try_from(count).unwrap();
        test_support::poll_until(Duration::from_mins(5), "the builders to join", || async {
            let joined: i64 = self
                .db
                .query_one(
                    "SELECT count(*) FROM machines WHERE connected AND name LIKE $1",
                    &[&format!("{prefix}%")],
                )
                .await
                .ok()?
                .get(0);
            (joined == expected).then_some(())
        })
        .await;
    }

    /// A client of the build service.
    pub async fn client(&self) -> BuildServiceClient<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                fs_err::read(self.files.ca_certificate()).unwrap(),
            ))
            .identity(tonic::transport::Identity::from_pem(
                fs_err::read(self.files.path("client-scale.pem")).unwrap(),
                fs_err::read(self.files.path("client-scale.key")).unwrap(),
            ))
            .domain_name("localhost");
        let endpoint = Endpoint::from_shared(format!("https://localhost:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .unwrap();
        let channel = test_support::poll_until(
            Duration::from_mins(1),
            "the runner to accept connections",
            || async { endpoint.connect().await.ok() },
        )
        .await;
        BuildServiceClient::new(channel)
            .max_encoding_message_size(1 << 30)
            .max_decoding_message_size(1 << 30)
    }

    /// An HTTP client of the web listener, with the client's certificate: one connection of its
    /// own, HTTP/2 if `http2` (offered by ALPN, as browsers do), else HTTP/1.1.
    #[must_use]
    pub fn web_client(&self, http2: bool) -> reqwest::Client {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(self.files.ca_certificate()).unwrap() {
            roots.add(certificate.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_file_iter(self.files.path("client-scale.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(self.files.path("client-scale.key")).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        if http2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .build()
            .unwrap()
    }

    /// The address of `path` on the web listener.
    #[must_use]
    pub fn web_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.web_port)
    }

    /// Submits the derivations as one build of the last; returns its id.
    pub async fn submit(&self, drvs: &[FakeDrv]) -> i64 {
        self.client()
            .await
            .submit(request(drvs))
            .await
            .unwrap()
            .into_inner()
            .build_id
    }

    /// Waits until build `id` succeeded; panics if it ended otherwise.
    pub async fn wait_for_success(&self, id: i64) {
        loop {
            let row = self
                .db
                .query_one(
                    "SELECT status::text, failure_reason FROM builds WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            let status: String = row.get(0);
            match status.as_str() {
                "succeeded" => return,
                "queued" | "running" => tokio::time::sleep(Duration::from_millis(10)).await,
                other => panic!(
                    "the benchmark build ended {other}: {:?}",
                    row.get::<_, Option<String>>(1)
                ),
            }
        }
    }

    /// Stops the builders and the runner.
    pub fn stop(mut self) {
        self.builders.cancel();
        for mut builder in self.builder_processes.drain(..) {
            let _ = builder.terminate(Duration::from_secs(10));
        }
        let _ = self.runner.terminate(Duration::from_secs(20));
    }
}

/// Starts the runner with `config`.
fn spawn_runner(config: &Path) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(workspace_binary("drover-queue-runner"))
            .args(["--config", config.to_str().unwrap(), "run"])
            .env(
                "RUST_LOG",
                std::env::var("DROVER_RUNNER_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .env("MALLOC_ARENA_MAX", "2")
            .stdout(Stdio::null()),
    )
    .unwrap()
}

/// Stages one chunk of derivations.
async fn stage(client: &mut BuildServiceClient<Channel>, derivations: Vec<DerivationText>) {
    if derivations.is_empty() {
        return;
    }
    client
        .stage_derivations(StageDerivationsRequest {
            derivations,
            sources: Vec::new(),
        })
        .await
        .unwrap();
}

/// The Submit request for one build of the last of `drvs`.
pub fn request(drvs: &[FakeDrv]) -> SubmitRequest {
    SubmitRequest {
        derivations: drvs
            .iter()
            .map(|drv| DerivationText {
                path: drv.path.to_absolute(),
                text: drv.text.clone(),
            })
            .collect(),
        top_drv_path: drvs.last().unwrap().path.to_absolute(),
        ..SubmitRequest::default()
    }
}

/// The builders and the runner need a file descriptor per connection.
pub fn raise_open_file_limit() {
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--nofile=20000:20000",
        ])
        .status();
    if !status.is_ok_and(|status| status.success()) {
        println!("(could not raise the open-file limit; the idle run may fail)");
    }
}

/// What `/proc` says about a process: resident memory now and at its peak, and CPU time used.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    /// Resident memory now.
    pub rss_bytes: u64,
    /// Resident memory at its peak.
    pub peak_rss_bytes: u64,
    /// CPU time used, user and system.
    pub cpu: Duration,
}

impl ProcessStats {
    /// Reads the stats of process `pid`.
    pub fn read(pid: u32) -> Self {
        let status = fs_err::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or(0)
                * 1024
        };
        let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which may hold spaces) start at the last ')'.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Self {
            rss_bytes: kib("VmRSS:"),
            peak_rss_bytes: kib("VmHWM:"),
            // Linux counts CPU time in ticks of 1/100 s (USER_HZ) in /proc.
            cpu: Duration::from_millis(ticks * 10),
        }
    }
}
