//! The `drover-queue-runner` binary as operators run it: configuration errors exit 78, `migrate`
//! is idempotent, and losing the database ends the runner non-zero with the whole context chain,
//! so systemd restarts it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::Farm;
use test_support::{TestPostgres, poll_until};

const RUNNER: &str = env!("CARGO_BIN_EXE_drover-queue-runner");

fn run(args: &[&str]) -> Output {
    Command::new(RUNNER)
        .args(args)
        .env("RUST_LOG", "warn")
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

    fs_err::write(&config, "[database]\nurl = \"x\"\nunknown_key = 1\n").unwrap();
    let output = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(78));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_ends_the_runner_with_its_context_chain() {
    let farm = Farm::new().await;
    let cluster = TestPostgres::start();
    let database = cluster.create_database().await;
    let runner = farm
        .spawn_runner_process(&database.connection_string, "runner.log")
        .await;
    let log_path = farm.dir.path().join("runner.log");

    cluster.kill();
    let runner = std::sync::Mutex::new(runner);
    let status = poll_until(Duration::from_secs(45), "the runner to exit", || async {
        runner.lock().unwrap().child_mut().try_wait().unwrap()
    })
    .await;
    assert_eq!(status.code(), Some(1), "the runner must exit non-zero");
    let log = fs_err::read_to_string(&log_path).unwrap();
    assert!(log.contains("the database failed"), "{log}");
    assert!(
        log.contains("caused by:"),
        "the whole chain is printed: {log}"
    );
}
