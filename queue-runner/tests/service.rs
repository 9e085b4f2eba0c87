//! The daemons as systemd runs them: `sd_notify` messages on a socket the test reads (READY
//! once the queue is recovered, a STATUS line, WATCHDOG fed from the scheduler's own loop, which
//! stops when that loop is stuck on a frozen database), `/healthz` and `/readyz`, and the units
//! in `contrib/systemd` passing `systemd-analyze verify`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nix_farm::http_get;
use common::{BuilderSpec, DEADLINE, Farm, Stored};
use test_support::{ChildGuard, TestPostgres, poll_until, workspace_binary};

/// A socket standing in for systemd's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self { socket, path }
    }

    /// The messages that arrive within `wait`.
    fn read_for(&self, wait: Duration) -> Vec<String> {
        let until = Instant::now() + wait;
        let mut messages = Vec::new();
        let mut buffer = [0; 4096];
        while Instant::now() < until {
            if let Ok(size) = self.socket.recv(&mut buffer) {
                messages.push(String::from_utf8_lossy(&buffer[..size]).into_owned());
            }
        }
        messages
    }

    /// Reads until a message starting with `prefix` arrives.
    fn wait_for(&self, prefix: &str) -> String {
        let until = Instant::now() + DEADLINE;
        let mut buffer = [0; 4096];
        while Instant::now() < until {
            if let Ok(size) = self.socket.recv(&mut buffer) {
                let message = String::from_utf8_lossy(&buffer[..size]).into_owned();
                if message.starts_with(prefix) {
                    return message;
                }
            }
        }
        panic!("no {prefix} within {DEADLINE:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_notifies_systemd_and_its_watchdog_stops_when_the_scheduler_is_stuck() {
    let mut farm = Farm::new().await;
    let cluster = TestPostgres::start();
    let database = cluster.create_database().await;
    let notify = NotifySocket::bind(farm.dir.path());
    let config = farm.dir.path().join("runner-notify.toml");
    fs_err::write(
        &config,
        farm.runner_config_text(&database.connection_string),
    )
    .unwrap();
    let log = fs_err::File::create(farm.dir.path().join("runner.log")).unwrap();
    let _runner = ChildGuard::spawn(
        Command::new(workspace_binary("drover-queue-runner"))
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify.path)
            // A 2 s watchdog: fed every second.
            .env("WATCHDOG_USEC", "2000000")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.into_parts().0),
    )
    .unwrap();
    assert_eq!(notify.wait_for("READY"), "READY=1");
    let status = notify.wait_for("STATUS=");
    assert!(
        status.contains("builds queued or running") && status.contains("builders connected"),
        "{status}"
    );
    let (ready, _) = http_get(farm.cache_port, "/readyz").await;
    assert!(ready.contains("200"), "{ready}");
    // A builder's pings give the scheduler something to write.
    farm.start_builder(&BuilderSpec::new("pinger"));
    assert!(notify.wait_for("STATUS=").starts_with("STATUS="));
    let fed = notify.read_for(Duration::from_secs(3));
    assert!(
        fed.iter()
            .filter(|message| *message == "WATCHDOG=1")
            .count()
            >= 2,
        "{fed:?}"
    );

    cluster.freeze();
    // The scheduler's next write hangs on the frozen database; its loop feeds the watchdog no
    // more, while the HTTP server still answers.
    let starved = poll_until(DEADLINE, "the watchdog to starve", || async {
        let fed = notify.read_for(Duration::from_secs(3));
        (!fed.iter().any(|message| message == "WATCHDOG=1")).then_some(())
    });
    starved.await;
    let (alive, _) = http_get(farm.cache_port, "/healthz").await;
    assert!(alive.contains("200"), "{alive}");
    let (unready, body) = http_get(farm.cache_port, "/readyz").await;
    assert!(unready.contains("503"), "{unready}");
    assert!(
        String::from_utf8_lossy(&body).contains("the database did not answer"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    cluster.thaw();
    assert_eq!(notify.wait_for("WATCHDOG"), "WATCHDOG=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_notifies_systemd_once_it_joined_the_runner_its_flag_names() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let notify = NotifySocket::bind(farm.dir.path());
    let config = farm.dir.path().join("builder-notify.toml");
    farm.start_builder(&BuilderSpec::new("config-source"));
    // The file names a port nothing listens on; the flag names the runner's.
    let text = fs_err::read_to_string(farm.dir.path().join("builder-config-source.toml"))
        .unwrap()
        .replace(&format!("localhost:{}", farm.grpc_port), "localhost:1");
    fs_err::write(&config, text).unwrap();
    let _builder = ChildGuard::spawn(
        Command::new(workspace_binary("drover-builder"))
            .arg("--config")
            .arg(&config)
            .args([
                "--runner-url",
                &format!("https://localhost:{}", farm.grpc_port),
            ])
            .env("NOTIFY_SOCKET", &notify.path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    assert_eq!(notify.wait_for("READY"), "READY=1");
    let status = notify.wait_for("STATUS=");
    assert!(
        status.starts_with("STATUS=joined https://localhost:"),
        "{status}"
    );
    // Fed from the session loop at every ping (every second on the test farm).
    assert_eq!(notify.wait_for("WATCHDOG"), "WATCHDOG=1");
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let binaries = tempfile::tempdir().unwrap();
    // `verify` checks that ExecStart names an executable: stand-ins at the units' paths would
    // need /usr/local/bin; the units name /usr/bin, which a package installs, so the test copies
    // the units and points them at the built binaries.
    let mut checked = 0;
    for entry in fs_err::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_none_or(|extension| extension != "service")
        {
            continue;
        }
        let text = fs_err::read_to_string(&path)
            .unwrap()
            .replace(
                "/usr/bin/drover-queue-runner",
                workspace_binary("drover-queue-runner").to_str().unwrap(),
            )
            .replace(
                "/usr/bin/drover-builder",
                workspace_binary("drover-builder").to_str().unwrap(),
            );
        let copy = binaries.path().join(path.file_name().unwrap());
        fs_err::write(&copy, text).unwrap();
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze (package systemd) to verify the units");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}: {stderr}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 2, "a unit for the runner and one for the builder");
}

#[test]
fn print_default_config_prints_the_documented_defaults_of_each_daemon() {
    for (daemon, file) in [
        ("drover-queue-runner", "queue-runner.toml"),
        ("drover-builder", "builder.toml"),
    ] {
        let output = Command::new(workspace_binary(daemon))
            .arg("--print-default-config")
            .output()
            .unwrap();
        assert!(output.status.success(), "{daemon}");
        let expected = fs_err::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/config")
                .join(file),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            expected,
            "{daemon}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_retry_limit_log_filter_and_certificate_without_a_restart() {
    let mut farm = Farm::new().await;
    let config = farm.dir.path().join("runner-reloaded.toml");
    let text = farm.runner_config_text(&farm.database.connection_string)
        + "\n[logging]\nfilter = \"warn\"\n";
    assert!(text.contains("max_attempts = 4"), "{text}");
    fs_err::write(&config, &text).unwrap();
    let log_path = farm.dir.path().join("runner.log");
    let log = fs_err::File::create(&log_path).unwrap();
    let mut runner = ChildGuard::spawn(
        Command::new(workspace_binary("drover-queue-runner"))
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.into_parts().0),
    )
    .unwrap();
    poll_until(DEADLINE, "the runner to be ready", || async {
        // Refused until it listens.
        tokio::net::TcpStream::connect(("127.0.0.1", farm.cache_port))
            .await
            .ok()?;
        let (status, _) = http_get(farm.cache_port, "/readyz").await;
        status.contains("200").then_some(())
    })
    .await;
    let served_before = served_certificate(&farm);
    let (renewed, renewed_key) = farm.renew_runner_certificate(&farm.dir.path().join("renewed"));
    let dir = farm.dir.path().display().to_string();
    fs_err::write(
        &config,
        text.replace("max_attempts = 4", "max_attempts = 1")
            .replace("heartbeat_ms = 15000", "heartbeat_ms = 5000")
            .replace(
                "filter = \"warn\"",
                "filter = \"info,drover_queue_runner=debug\"",
            )
            .replace(&format!("{dir}/runner-main.pem"), renewed.to_str().unwrap())
            .replace(
                &format!("{dir}/runner-main.key"),
                renewed_key.to_str().unwrap(),
            ),
    )
    .unwrap();
    let log = reload(&runner, &log_path, 1).await;
    assert!(
        !log.contains("queue recovered"),
        "info lines were logged under the file's first filter (warn): {log}"
    );
    assert!(
        log.contains("takes effect after a restart") && log.contains("grpc.heartbeat_ms"),
        "{log}"
    );
    let served_after = served_certificate(&farm);
    assert_ne!(served_before, served_after);
    assert_eq!(
        served_after,
        fingerprint(&["x509", "-in", renewed.to_str().unwrap()]),
        "new connections get the renewed certificate"
    );

    farm.start_builder(&BuilderSpec::new("b1"));
    let doomed = test_support::fake_derivations::Factory::default()
        .make(&test_support::fake_derivations::Spec::new("doomed").env("DROVER_NOOP_PANIC", "1"));
    let build = farm.submit(&[&doomed]).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Failed);
    let attempts = farm.attempts().await;
    assert_eq!(
        attempts.len(),
        1,
        "the reloaded limit allows one attempt: {attempts:?}"
    );
    assert!(
        fs_err::read_to_string(&log_path)
            .unwrap()
            .contains("dispatching"),
        "the reloaded filter logs the scheduler's debug lines"
    );
    assert!(
        runner.child_mut().try_wait().unwrap().is_none(),
        "the same runner process served it all"
    );

    // The same file again: the heartbeat still differs from what runs, so it still waits.
    let log = reload(&runner, &log_path, 2).await;
    let waiting = log
        .lines()
        .filter(|line| line.contains("after a restart") && line.contains("grpc.heartbeat_ms"))
        .count();
    assert_eq!(waiting, 2, "a second reload compares with what runs: {log}");
}

/// Sends the runner SIGHUP and waits until its log says it reloaded for the `count`th time;
/// returns the log.
async fn reload(runner: &ChildGuard, log_path: &Path, count: usize) -> String {
    let status = Command::new("kill")
        .args(["-HUP", &runner.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    poll_until(DEADLINE, "the runner to reload", || async {
        let log = fs_err::read_to_string(log_path).unwrap();
        (log.matches("configuration reloaded").count() == count).then_some(log)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_and_an_environment_variable_override_the_files_listen_addresses() {
    let farm = Farm::new().await;
    let config = farm.dir.path().join("runner-overridden.toml");
    fs_err::write(
        &config,
        farm.runner_config_text(&farm.database.connection_string),
    )
    .unwrap();
    let (grpc, cache) = (test_support::free_port(), test_support::free_port());
    let log_path = farm.dir.path().join("overridden.log");
    let log = fs_err::File::create(&log_path).unwrap();
    let _runner = ChildGuard::spawn(
        Command::new(workspace_binary("drover-queue-runner"))
            .arg("--config")
            .arg(&config)
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .env("DROVER_CACHE_LISTEN", format!("127.0.0.1:{cache}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.into_parts().0),
    )
    .unwrap();
    let serving = poll_until(DEADLINE, "the runner to serve", || async {
        let log = fs_err::read_to_string(&log_path).unwrap();
        log.lines()
            .find(|line| line.contains("queue runner serving"))
            .map(str::to_owned)
    })
    .await;
    assert!(
        serving.contains(&format!("grpc_address=127.0.0.1:{grpc}"))
            && serving.contains(&format!("cache_address=127.0.0.1:{cache}")),
        "{serving}"
    );
    let (status, _) = http_get(cache, "/healthz").await;
    assert!(status.contains("200"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_answers_grpc_reflection_with_its_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut client =
        ServerReflectionClient::new(farm.channel(drover_tls::Role::Client, "grpcurl").await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}");
    };
    let mut services: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    services.sort();
    for wanted in [
        "drover.v1.BuildService",
        "drover.v1.BuilderService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|name| name == wanted),
            "{wanted} missing from {services:?}"
        );
    }
}

/// The SHA-256 fingerprint `openssl` prints for the certificate its arguments name.
fn fingerprint(args: &[&str]) -> String {
    let output = Command::new("openssl")
        .args(args)
        .args(["-noout", "-fingerprint", "-sha256"])
        .output()
        .expect("openssl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The fingerprint of the certificate the runner's gRPC listener presents to a new connection.
fn served_certificate(farm: &Farm) -> String {
    let (cert, key) = farm.issue(drover_tls::Role::Client, "openssl");
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", farm.grpc_port),
        ])
        .args(["-servername", "localhost", "-cert", cert.to_str().unwrap()])
        .args(["-key", key.to_str().unwrap()])
        .arg("-CAfile")
        .arg(farm.dir.path().join("ca.pem"))
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let served = farm.dir.path().join("served.pem");
    fs_err::write(&served, &output.stdout).unwrap();
    fingerprint(&["x509", "-in", served.to_str().unwrap()])
}
