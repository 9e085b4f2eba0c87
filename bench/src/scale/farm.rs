//! The farm a scale run measures: a durable PostgreSQL cluster, the runner as a child process
//! (so its memory and CPU are its own), simulated builders in this process (the real builder
//! library with the noop executor over real mTLS tunnels), and a client.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{DerivationText, SubmitRequest};
use drover_tls::{CertificateAuthority, Identity, Role};
use nix_primitives::SecretKey;
use test_support::fake_derivations::FakeDrv;
use test_support::{ChildGuard, TestPostgres, workspace_binary};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A runner process with its database, certificates and builders.
pub struct Farm {
    dir: tempfile::TempDir,
    runner: ChildGuard,
    port: u16,
    builders: CancellationToken,
    ca: CertificateAuthority,
    pub db: tokio_postgres::Client,
}

impl Farm {
    /// Starts the runner on a fresh database of `cluster`.
    pub async fn start(cluster: &TestPostgres) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("scale CA").unwrap();
        ca.write(dir.path()).unwrap();
        ca.issue(
            &Identity::new(Role::Runner, "scale").unwrap(),
            &["localhost".to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )
        .unwrap()
        .write(dir.path())
        .unwrap();
        ca.issue(&Identity::new(Role::Client, "scale").unwrap(), &[], &[])
            .unwrap()
            .write(dir.path())
            .unwrap();
        fs_err::write(
            dir.path().join("cache.sec"),
            SecretKey::generate("scale-1").unwrap().to_nix_format(),
        )
        .unwrap();
        let database = cluster.create_database().await;
        let port = free_port();
        let config = dir.path().join("runner.toml");
        fs_err::write(
            &config,
            runner_config(dir.path(), &database.connection_string, port),
        )
        .unwrap();
        let runner = ChildGuard::spawn(
            Command::new(workspace_binary("drover-queue-runner"))
                .args(["--config", config.to_str().unwrap(), "run"])
                .env(
                    "RUST_LOG",
                    std::env::var("DROVER_RUNNER_LOG").unwrap_or_else(|_| "warn".to_owned()),
                )
                .env("MALLOC_ARENA_MAX", "2")
                .stdout(Stdio::null()),
        )
        .unwrap();
        let db = database.connect().await;
        Self {
            dir,
            runner,
            port,
            builders: CancellationToken::new(),
            ca,
            db,
        }
    }

    /// The runner's process id.
    pub fn runner_pid(&self) -> u32 {
        self.runner.id()
    }

    /// Starts `count` builders with `jobs` slots each, named `prefix-<n>`, and waits until all
    /// joined.
    pub async fn start_builders(&self, prefix: &str, count: usize, jobs: u32) {
        for index in 0..count {
            let name = format!("{prefix}-{index}");
            self.ca
                .issue(&Identity::new(Role::Builder, &name).unwrap(), &[], &[])
                .unwrap()
                .write(self.dir.path())
                .unwrap();
            let text = format!(
                "[runner]\nurl = \"https://localhost:{port}\"\n[tls]\nca_certificate = \"{d}/ca.pem\"\n\
                 certificate = \"{d}/builder-{name}.pem\"\nkey = \"{d}/builder-{name}.key\"\n\
                 [builder]\nsystems = [\"x86_64-linux\"]\nmax_jobs = {jobs}\n[executor]\nkind = \"noop\"\n\
                 [reconnect]\ninitial_ms = 100\nmax_ms = 1000\nbudget_secs = 120\n",
                port = self.port,
                d = self.dir.path().display()
            );
            let config =
                drover_builder::config::Config::parse(&text, Path::new("builder.toml")).unwrap();
            let token = self.builders.clone();
            tokio::spawn(async move { drover_builder::tunnel::run(&config, &token).await });
        }
        let expected = i64::try_from(count).unwrap();
        test_support::poll_until(Duration::from_mins(5), "the builders to join", || async {
            let joined: i64 = self
                .db
                .query_one(
                    "SELECT count(*) FROM machines WHERE connected AND name LIKE $1",
                    &[&format!("{prefix}-%")],
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
                fs_err::read(self.dir.path().join("ca.pem")).unwrap(),
            ))
            .identity(tonic::transport::Identity::from_pem(
                fs_err::read(self.dir.path().join("client-scale.pem")).unwrap(),
                fs_err::read(self.dir.path().join("client-scale.key")).unwrap(),
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

    /// Submits the derivations as one build of the last; returns its id.
    pub async fn submit(&self, drvs: &[FakeDrv]) -> i64 {
        self.client()
            .await
            .submit(SubmitRequest {
                derivations: drvs
                    .iter()
                    .map(|drv| DerivationText {
                        path: drv.path.to_absolute(),
                        text: drv.text.clone(),
                    })
                    .collect(),
                top_drv_path: drvs.last().unwrap().path.to_absolute(),
                ..SubmitRequest::default()
            })
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
        let _ = self.runner.terminate(Duration::from_secs(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn runner_config(dir: &Path, database: &str, port: u16) -> String {
    let d = dir.display();
    format!(
        "[database]\nurl = \"{database}\"\npool_size = 16\n[grpc]\nlisten = \"127.0.0.1:{port}\"\n\
         [tls]\nca_certificate = \"{d}/ca.pem\"\ncertificate = \"{d}/runner-scale.pem\"\nkey = \"{d}/runner-scale.key\"\n\
         [logs]\ndirectory = \"{d}/logs\"\n[cache]\ndirectory = \"{d}/cache\"\nlisten = \"127.0.0.1:0\"\nsecret_key_file = \"{d}/cache.sec\"\n\
         [builders]\nping_interval_secs = 10\nliveness_timeout_secs = 60\n"
    )
}

/// What `/proc` says about a process: resident memory now and at its peak, and CPU time used.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
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
