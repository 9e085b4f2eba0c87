//! The test cluster behaves like a private PostgreSQL: databases are isolated, one cluster is
//! shared per test binary, committed data survives a crash, and nothing is left behind.

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use test_support::{TestPostgres, poll_until};

/// Marks the line on which the helper test prints the shared cluster's directory.
const SOCKET_DIR_LINE: &str = "shared-cluster-dir=";

/// The postmaster's process id, from the first line of its pid file.
fn postmaster_pid(socket_dir: &Path) -> Option<u32> {
    let pid_file = fs_err::read_to_string(socket_dir.join("data/postmaster.pid")).ok()?;
    pid_file.lines().next()?.trim().parse().ok()
}

/// Whether process `pid` still runs; a zombie (which nobody may reap in a container) does not.
fn is_running(pid: u32) -> bool {
    let Ok(stat) = fs_err::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ...": the command may contain spaces and parentheses, the state follows
    // the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z')
}

#[tokio::test]
async fn databases_are_isolated_from_each_other() {
    let postgres = TestPostgres::shared();
    let first = postgres.create_database().await;
    let second = postgres.create_database().await;
    assert_ne!(first.name, second.name);

    first
        .connect()
        .await
        .batch_execute("CREATE TABLE marker (value TEXT); INSERT INTO marker VALUES ('first')")
        .await
        .unwrap();

    let other = second.connect().await;
    let invisible: bool = other
        .query_one("SELECT to_regclass('marker') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(invisible, "the second database sees the first one's table");
    other
        .batch_execute("CREATE TABLE marker (value TEXT)")
        .await
        .unwrap();
    let rows: i64 = other
        .query_one("SELECT count(*) FROM marker", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn shared_returns_one_cluster_per_test_binary() {
    let first = TestPostgres::shared();
    let second = TestPostgres::shared();
    assert!(std::ptr::eq(first, second));
    assert_eq!(
        first.connection_string("some_db"),
        format!(
            "host={} port={} user=drover dbname=some_db",
            first.socket_dir().display(),
            first.port()
        )
    );
    assert!(
        first
            .socket_dir()
            .join(format!(".s.PGSQL.{}", first.port()))
            .exists()
    );

    let client = second.create_database().await.connect().await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn committed_data_survives_kill_and_restart() {
    let postgres = TestPostgres::start();
    let database = postgres.create_database().await;
    let client = database.connect().await;
    client
        .batch_execute("CREATE TABLE kept (value INT); INSERT INTO kept VALUES (42)")
        .await
        .unwrap();

    postgres.kill();
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    assert!(database.try_connect().await.is_err());

    postgres.restart();
    let value: i32 = database
        .connect()
        .await
        .query_one("SELECT value FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, 42);
}

#[tokio::test]
async fn dropping_stops_the_server_and_removes_its_directory() {
    let postgres = TestPostgres::start();
    let dir = postgres.socket_dir().to_owned();
    let database = postgres.create_database().await;
    let pid = postmaster_pid(&dir).expect("the running cluster has a postmaster.pid");
    assert!(is_running(pid));

    drop(postgres);

    assert!(!dir.exists(), "{} is still there", dir.display());
    let error = database
        .try_connect()
        .await
        .expect_err("connected to a dropped cluster");
    let kind = error
        .source()
        .and_then(|source| source.downcast_ref::<io::Error>())
        .map(io::Error::kind);
    assert!(
        matches!(
            kind,
            Some(io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
        ),
        "unexpected connection error: {error:?}"
    );
    poll_until(
        Duration::from_secs(10),
        "the postmaster to exit",
        || async { (!is_running(pid)).then_some(()) },
    )
    .await;
}

/// Not a test on its own: run in a child process by
/// `shared_cluster_is_removed_after_the_process_exits`.
#[test]
#[ignore = "helper that the watchdog test runs in a child process"]
fn helper_print_shared_cluster_dir() {
    println!(
        "{SOCKET_DIR_LINE}{}",
        TestPostgres::shared().socket_dir().display()
    );
}

#[tokio::test]
async fn shared_cluster_is_removed_after_the_process_exits() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_print_shared_cluster_dir",
            "--ignored",
            "--nocapture",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "helper failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir: PathBuf = stdout
        .lines()
        .find_map(|line| line.strip_prefix(SOCKET_DIR_LINE))
        .unwrap_or_else(|| panic!("no {SOCKET_DIR_LINE} line in: {stdout}"))
        .into();

    // The watchdog stops the server before it deletes the directory.
    poll_until(
        Duration::from_secs(10),
        "the watchdog to remove the shared cluster",
        || async { (!dir.exists()).then_some(()) },
    )
    .await;
}
