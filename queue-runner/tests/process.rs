//! The `drover-queue-runner` binary as operators run it: configuration errors exit 78, `migrate`
//! is idempotent, and losing the database ends the runner non-zero with the whole context chain,
//! so systemd restarts it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use common::nix_farm::http_get;
use common::{BuilderSpec, DEADLINE, Farm};
use drover_proto::v1::GetRequest;
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_tls::Role;
use test_support::fake_derivations::{Factory, Spec};
use test_support::{ChildGuard, TestDatabase, TestPostgres, poll_until};

const RUNNER: &str = env!("CARGO_BIN_EXE_drover-queue-runner");

fn run(args: &[&str]) -> Output {
    Command::new(RUNNER)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_configuration_exits_78_naming_every_problem() {
    let farm = Farm::new().await;
    let config = farm.dir.path().join("bad.toml");
    let text = farm
        .runner_config_text(&farm.database.connection_string)
        .replace("ping_interval_secs = 1", "ping_interval_secs = 0")
        .replace("pool_size = 4", "pool_size = 0");
    fs_err::write(&config, text).unwrap();
    let output = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("database.pool_size") && stderr.contains("builders.ping_interval_secs"),
        "{stderr}"
    );

    fs_err::write(
        &config,
        "[database]\nurl = \"x\"\nunknown_key = 1\n[grpc]\nlisten_addr = \"\"\n",
    )
    .unwrap();
    let output = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("database.unknown_key") && stderr.contains("grpc.listen_addr"),
        "every unknown key at once: {stderr}"
    );

    // Files the configuration names: missing, or there but unusable.
    let valid = farm.runner_config_text(&farm.database.connection_string);
    let key = farm.dir.path().join("cache-key.sec");
    let moved = farm.dir.path().join("cache-key.moved");
    fs_err::rename(&key, &moved).unwrap();
    fs_err::write(&config, &valid).unwrap();
    let output = run(&["--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!("cache.secret_key_file = {}", key.display())),
        "{stderr}"
    );
    fs_err::write(&key, "not a key").unwrap();
    let output = run(&["--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "an unusable key: {stderr}");
    fs_err::rename(&moved, &key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_schema_once() {
    let farm = Farm::new().await;
    let config = farm.dir.path().join("runner.toml");
    fs_err::write(
        &config,
        farm.runner_config_text(&farm.database.connection_string),
    )
    .unwrap();
    let first = run(&["--config", config.to_str().unwrap(), "migrate"]);
    assert!(first.status.success(), "{first:?}");
    let shipped = fs_err::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    let every: Vec<usize> = (1..=shipped).collect();
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        format!("applied migrations: {every:?}")
    );
    let second = run(&["--config", config.to_str().unwrap(), "migrate"]);
    assert!(second.status.success(), "{second:?}");
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        "applied migrations: []"
    );
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        !said.contains("already exists"),
        "PostgreSQL's notices stay out of the log: {said}"
    );
    let undocumented: i64 = farm
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM information_schema.columns c
             JOIN pg_class t ON t.relname = c.table_name AND t.relkind = 'r'
             JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = 'public'
             WHERE c.table_schema = 'public' AND c.table_name <> 'schema_migrations'
               AND col_description(t.oid, c.ordinal_position::int) IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(undocumented, 0, "every column carries a comment");
}

/// Waits (with the test's deadline) for `child` to exit; returns how and how long it took.
async fn exit_of(child: ChildGuard) -> (ExitStatus, Duration) {
    let since = Instant::now();
    let child = std::sync::Mutex::new(child);
    let status = poll_until(DEADLINE, "the runner to exit", || async {
        child.lock().unwrap().child_mut().try_wait().unwrap()
    })
    .await;
    (status, since.elapsed())
}

/// Starts a runner process on a cluster of its own, and a noop builder running a step that
/// lasts a minute, unless `with_step` is false; returns the cluster (with the runner's
/// database) and the runner.
async fn runner_on_own_cluster(
    farm: &mut Farm,
    with_step: bool,
) -> ((TestPostgres, TestDatabase), ChildGuard) {
    let cluster = TestPostgres::start();
    let database = cluster.create_database().await;
    let runner = farm
        .spawn_runner_process(&database.connection_string, "runner.log")
        .await;
    if with_step {
        farm.start_builder(&BuilderSpec {
            build_ms: 60_000,
            ..BuilderSpec::new("b1")
        });
        let long = Factory::default().make(&Spec::new("long"));
        farm.submit(&[&long]).await;
        let db = database.connect().await;
        poll_until(DEADLINE, "the step to run", || async {
            let running: i64 = db
                .query_one("SELECT count(*) FROM steps WHERE status = 'running'", &[])
                .await
                .unwrap()
                .get(0);
            (running == 1).then_some(())
        })
        .await;
    }
    ((cluster, database), runner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_ends_the_runner_within_5_s_with_its_context_chain() {
    for with_step in [false, true] {
        let mut farm = Farm::new().await;
        let ((cluster, _database), runner) = runner_on_own_cluster(&mut farm, with_step).await;
        cluster.kill();
        let (status, took) = exit_of(runner).await;
        assert_eq!(status.code(), Some(1), "the runner must exit non-zero");
        assert!(
            took < Duration::from_secs(5),
            "the runner took {took:?} to end after losing its database (step running: {with_step})"
        );
        let log = fs_err::read_to_string(farm.dir.path().join("runner.log")).unwrap();
        let Some((_, report)) = log.split_once("drover-queue-runner: ") else {
            panic!("no final report: {log}");
        };
        assert!(
            report.contains("caused by:") && report.contains("database"),
            "the whole chain is printed, down to the database: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_builder_connected_ends_the_runner_within_2_s() {
    let mut farm = Farm::new().await;
    let ((_cluster, database), runner) = runner_on_own_cluster(&mut farm, true).await;
    terminate(&runner);
    let (status, took) = exit_of(runner).await;
    assert!(status.success(), "a stopped runner exits 0: {status}");
    assert!(
        took < Duration::from_secs(2),
        "the runner took {took:?} to stop with a builder connected"
    );

    // The builder kept its step; the next runner re-adopts it, no loss counted.
    let _next = farm
        .spawn_runner_process(&database.connection_string, "next-runner.log")
        .await;
    poll_until(
        DEADLINE,
        "the builder to rejoin holding its step",
        || async {
            fs_err::read_to_string(farm.dir.path().join("next-runner.log"))
                .unwrap()
                .contains("held=1")
                .then_some(())
        },
    )
    .await;
    let db = database.connect().await;
    let (running, losses): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'running'), coalesce(sum(builder_losses), 0)
                 FROM steps",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((running, losses), (1, 0), "the step runs on, re-adopted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_builder_cannot_hold_a_stop_and_readyz_says_503_until_the_end() {
    let mut farm = Farm::new().await;
    let (_database, runner) = runner_on_own_cluster(&mut farm, true).await;
    // A frozen builder never closes its half of the tunnel, so the stop waits its grace.
    farm.signal_builder(0, "STOP");
    let since = Instant::now();
    terminate(&runner);
    let answer = poll_until(DEADLINE, "/readyz to refuse", || async {
        let (status, body) = http_get(farm.cache_port, "/readyz").await;
        (!status.contains("200")).then(|| format!("{status} {}", String::from_utf8_lossy(&body)))
    })
    .await;
    assert!(
        answer.contains("503") && answer.contains("shutting down"),
        "{answer}"
    );
    let (status, _) = exit_of(runner).await;
    farm.signal_builder(0, "CONT");
    let took = since.elapsed();
    assert!(status.success(), "a stopped runner exits 0: {status}");
    assert!(
        took < Duration::from_secs(2),
        "the runner took {took:?} to stop with a frozen builder"
    );
}

/// Sends SIGTERM to `process`, as systemd stopping it would.
fn terminate(process: &ChildGuard) {
    let pid = process.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success(), "kill -TERM {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rpcs_and_handshakes_are_logged_once_each_and_a_flood_is_cut() {
    use std::io::Write as _;
    let farm = Farm::new().await;
    let _runner = farm
        .spawn_runner_process(&farm.database.connection_string, "runner.log")
        .await;
    let log_path = farm.dir.path().join("runner.log");

    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", farm.grpc_port)).unwrap();
    stranger.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let peer = stranger.local_addr().unwrap().to_string();
    let mut builds = BuildServiceClient::new(farm.channel(Role::Builder, "b1").await);
    let refused = builds
        .get(GetRequest { build_id: 1 })
        .await
        .expect_err("a builder may not read builds");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let log = poll_until(DEADLINE, "both refusals in the log", || async {
        let log = fs_err::read_to_string(&log_path).unwrap();
        (log.contains("refused a TLS handshake") && log.contains("refused an RPC")).then_some(log)
    })
    .await;
    let lines = |log: &str, what: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains(what))
            .map(str::to_owned)
            .collect()
    };
    let handshakes = lines(&log, "refused a TLS handshake");
    assert_eq!(handshakes.len(), 1, "{log}");
    assert!(handshakes[0].contains(&format!("peer={peer}")), "{log}");
    let rpcs = lines(&log, "refused an RPC");
    assert_eq!(rpcs.len(), 1, "{log}");
    assert!(
        rpcs[0].contains("caller=builder/b1")
            && rpcs[0].contains("method=drover.v1.BuildService/Get")
            && rpcs[0].contains("may not call this service"),
        "{log}"
    );

    for _ in 0..300 {
        let _ = builds.get(GetRequest { build_id: 1 }).await;
    }
    let log = fs_err::read_to_string(&log_path).unwrap();
    let logged = lines(&log, "refused an RPC").len();
    assert!(
        (2..=40).contains(&logged),
        "300 refusals in a burst give a bounded number of lines, not {logged}"
    );
}
