//! The farm a benchmark measures: a durable PostgreSQL cluster, the runner as a child process
//! (so its memory and CPU are its own), builders, and a client. Builders are either simulated in
//! this process (the real builder library with the noop executor over real mTLS tunnels) or
//! real `drover-builder` processes with the Nix executor, each with a private `/nix`.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{DerivationText, SubmitRequest};
use drover_tls::{CertificateAuthority, Identity, Role};
use nix_primitives::SecretKey;
use test_support::fake_derivations::FakeDrv;
use test_support::{ChildGuard, TestPostgres, private_store_command, workspace_binary};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Settings of every Nix the benchmarks run: single-user root, no sandbox, no network
/// substituters, no negative narinfo caching.
pub const NIX_CONFIG: &str = "sandbox = false\nbuild-users-group =\nsubstituters =\n\
narinfo-cache-negative-ttl = 0\n";

/// A runner process with its database, certificates and builders.
pub struct Farm {
    dir: tempfile::TempDir,
    runner: ChildGuard,
    port: u16,
    cache_port: u16,
    cache_key: SecretKey,
    builders: CancellationToken,
    builder_processes: Vec<ChildGuard>,
    ca: CertificateAuthority,
    /// A connection to the farm's database.
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
        let cache_key = SecretKey::generate("bench-1").unwrap();
        fs_err::write(dir.path().join("cache.sec"), cache_key.to_nix_format()).unwrap();
        let database = cluster.create_database().await;
        let port = free_port();
        let cache_port = free_port();
        let config = dir.path().join("runner.toml");
        fs_err::write(
            &config,
            runner_config(dir.path(), &database.connection_string, port, cache_port),
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
            cache_port,
            cache_key,
            builders: CancellationToken::new(),
            builder_processes: Vec::new(),
            ca,
            db,
        }
    }

    /// The runner's process id.
    pub fn runner_pid(&self) -> u32 {
        self.runner.id()
    }

    /// The configuration of builder `name` with `jobs` slots and the given `[executor]` table;
    /// issues its certificate.
    fn builder_config(&self, name: &str, jobs: u32, executor: &str) -> String {
        self.ca
            .issue(&Identity::new(Role::Builder, name).unwrap(), &[], &[])
            .unwrap()
            .write(self.dir.path())
            .unwrap();
        format!(
            "[runner]\nurl = \"https://localhost:{port}\"\n[tls]\nca_certificate = \"{d}/ca.pem\"\n\
             certificate = \"{d}/builder-{name}.pem\"\nkey = \"{d}/builder-{name}.key\"\n\
             [builder]\nsystems = [\"x86_64-linux\"]\nmax_jobs = {jobs}\n[executor]\n{executor}\n\
             [reconnect]\ninitial_ms = 100\nmax_ms = 1000\nbudget_secs = 120\n",
            port = self.port,
            d = self.dir.path().display()
        )
    }

    /// Starts `count` builders with `jobs` slots each, named `prefix-<n>`, and waits until all
    /// joined.
    pub async fn start_builders(&self, prefix: &str, count: usize, jobs: u32) {
        for index in 0..count {
            let text = self.builder_config(&format!("{prefix}-{index}"), jobs, "kind = \"noop\"");
            let config =
                drover_builder::config::Config::parse(&text, Path::new("builder.toml")).unwrap();
            let token = self.builders.clone();
            tokio::spawn(async move { drover_builder::tunnel::run(&config, &token).await });
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
        let executor = format!(
            "kind = \"nix\"\ncache_url = \"http://127.0.0.1:{}\"\ntrusted_public_keys = [\"{}\"]",
            self.cache_port,
            self.cache_key.public_key()
        );
        let config = self.dir.path().join(format!("builder-{name}.toml"));
        fs_err::write(&config, self.builder_config(name, jobs, &executor)).unwrap();
        let home = self.dir.path().join(format!("home-{name}"));
        fs_err::create_dir_all(&home).unwrap();
        fs_err::create_dir_all(store).unwrap();
        let log = fs_err::File::create(log).unwrap().into_parts().0;
        let child = ChildGuard::spawn(
            private_store_command(store)
                .arg(workspace_binary("drover-builder"))
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", log_level)
                .env("NIX_CONFIG", NIX_CONFIG)
                .env("XDG_CACHE_HOME", home.join("cache"))
                .env("HOME", &home)
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

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn runner_config(dir: &Path, database: &str, port: u16, cache_port: u16) -> String {
    let d = dir.display();
    format!(
        "[database]\nurl = \"{database}\"\npool_size = 16\n[grpc]\nlisten = \"127.0.0.1:{port}\"\n\
         [tls]\nca_certificate = \"{d}/ca.pem\"\ncertificate = \"{d}/runner-scale.pem\"\nkey = \"{d}/runner-scale.key\"\n\
         [logs]\ndirectory = \"{d}/logs\"\n[cache]\ndirectory = \"{d}/cache\"\nlisten = \"127.0.0.1:{cache_port}\"\nsecret_key_file = \"{d}/cache.sec\"\n\
         [builders]\nping_interval_secs = 10\nliveness_timeout_secs = 60\n"
    )
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
