//! An ephemeral PostgreSQL cluster for tests: its own directory under `/tmp`, reachable only
//! through a Unix socket in that directory, stopped and deleted when the test is done.
//!
//! Most tests share one cluster per test binary ([`TestPostgres::shared`]) and take a database of
//! their own ([`TestPostgres::create_database`]); making a database takes milliseconds, a cluster
//! most of a second. Tests that stop or crash the server start a private one
//! ([`TestPostgres::start`]) so that they do not pull it away from their neighbours. A test of
//! the documented install starts one set up as a distribution's package sets it up
//! ([`TestPostgres::start_as_postgres_user`]: owned by `postgres`, peer authentication).

mod tools;
mod watchdog;

use std::future::Future;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use self::tools::{POSTGRES_USER, PgTools, UNPRIVILEGED_USER, run};
use self::watchdog::Watchdog;

/// The role the clusters are made with; it is the superuser and needs no password.
const USER: &str = "drover";

/// The database every cluster has and that [`TestPostgres::create_database`] connects to.
const MAINTENANCE_DATABASE: &str = "postgres";

/// The port used when no free TCP port can be found. The number only names the socket file
/// (`.s.PGSQL.<port>`) in a directory of our own, so a clash is impossible; a distinct number
/// merely spares PostgreSQL a retry when it picks its shared-memory key.
const FALLBACK_PORT: u16 = 5432;

/// How long `pg_ctl` may wait for the server to start or stop, in seconds; its default is 60.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Numbers the databases made by this process so that their names never repeat.
static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);

/// Who owns a cluster, and so who may connect to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The test's own user (`nobody` when that is root): the superuser is the role `drover` and
    /// every local connection is trusted, so this process connects as it likes.
    Test,
    /// The OS user `postgres`, as a distribution's packaged server: the superuser is the role
    /// `postgres`, a local connection gets the role named like the OS user that makes it (peer
    /// authentication), and TCP is refused.
    PostgresUser,
}

impl Owner {
    /// `initdb`'s superuser and authentication arguments for such a cluster.
    const fn initdb_args(self) -> &'static [&'static str] {
        match self {
            Self::Test => &["--username", USER, "--auth=trust"],
            Self::PostgresUser => &[
                "--username",
                POSTGRES_USER,
                "--auth-local=peer",
                "--auth-host=reject",
            ],
        }
    }
}

/// A running PostgreSQL cluster that accepts connections only on a Unix socket.
///
/// Dropping it stops the server (`pg_ctl stop -m fast`) and deletes its directory, also when the
/// test failed. A watchdog process does the same if this process ends without dropping it (the
/// [`shared`](Self::shared) cluster, or a test killed by a timeout).
#[derive(Debug)]
pub struct TestPostgres {
    /// How to run `initdb` and `pg_ctl`.
    tools: PgTools,
    /// The number in the socket's name.
    port: u16,
    /// Declared before `dir` so that it is dropped first: a watchdog that was left armed because
    /// the fast stop failed still finds the data directory it has to stop.
    watchdog: Watchdog,
    /// Holds the socket, the data directory (`data`) and the server log (`log`).
    dir: TempDir,
    /// Whether commits are flushed to disk (`fsync` on): for benchmarks that claim durability.
    durable: bool,
    /// Whether it also listens on TCP `localhost:<port>`, for encrypted connections only.
    tls: bool,
}

/// What a cluster that takes encrypted connections serves and asks for.
#[derive(Debug, Clone, Copy)]
pub struct TlsSetup<'a> {
    /// The server's certificate, in PEM; it must name `localhost`.
    pub certificate_pem: &'a str,
    /// Its private key, in PEM.
    pub key_pem: &'a str,
    /// The password of the role `drover` over TCP.
    pub password: &'a str,
}

impl TestPostgres {
    /// Makes and starts a private cluster (about 0.7 s).
    ///
    /// # Panics
    /// If the PostgreSQL binaries are missing, or a command fails; the message carries the
    /// command's output and the server log.
    #[must_use]
    pub fn start() -> Self {
        Self::try_start(Owner::Test, false, None)
            .unwrap_or_else(|message| panic!("starting a test PostgreSQL: {message}"))
    }

    /// Makes and starts a private cluster that also listens on TCP `localhost`
    /// ([`tcp_connection_string`](Self::tcp_connection_string)), where it takes only TLS
    /// connections (`ssl = on`, no plain `host` line) authenticated by password (SCRAM).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    #[must_use]
    pub fn start_tls(setup: &TlsSetup<'_>) -> Self {
        Self::try_start(Owner::Test, false, Some(setup))
            .unwrap_or_else(|message| panic!("starting a TLS test PostgreSQL: {message}"))
    }

    /// Makes and starts a private cluster that flushes every commit to disk (`fsync` and
    /// `synchronous_commit` on, as a production server runs): for benchmarks.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    #[must_use]
    pub fn start_durable() -> Self {
        Self::try_start(Owner::Test, true, None)
            .unwrap_or_else(|message| panic!("starting a durable test PostgreSQL: {message}"))
    }

    /// Makes and starts a private cluster set up as Debian's `postgresql` package sets one up:
    /// owned by the OS user `postgres`, whose role is the superuser; a connection on the Unix
    /// socket gets the role named like the OS user that makes it (peer authentication), and TCP
    /// is refused. Its directory is mode 0755 so that every user reaches the socket, as in
    /// `/run/postgresql`; the data directory stays private to `postgres`.
    ///
    /// For tests of the documented install, which run clients as users:
    /// `runuser -u postgres -- createuser -h <socket_dir> -p <port> drover`, then the runner as
    /// the OS user `drover`. [`create_database`](Self::create_database) and the connection
    /// strings do not work on it: they connect as the role `drover` from this process, which
    /// runs as root, and peer authentication refuses that.
    ///
    /// # Panics
    /// If this process is not root (the server runs as `postgres` through `runuser`), if the OS
    /// user `postgres` does not exist (the `postgresql` package creates it), or as
    /// [`start`](Self::start).
    #[must_use]
    pub fn start_as_postgres_user() -> Self {
        Self::try_start(Owner::PostgresUser, false, None).unwrap_or_else(|message| {
            panic!("starting a test PostgreSQL owned by {POSTGRES_USER}: {message}")
        })
    }

    /// The cluster shared by every test in this test binary, started by the first caller.
    ///
    /// Give each test its own database with [`create_database`](Self::create_database), and do
    /// not [`kill`](Self::kill) this one: its neighbours use it too.
    ///
    /// # Panics
    /// As [`start`](Self::start); every caller retries and panics while the cluster cannot start.
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<TestPostgres> = OnceLock::new();
        SHARED.get_or_init(Self::start)
    }

    /// The directory holding the server's socket; the `host` to connect to.
    #[must_use]
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The port number that names the socket file (`.s.PGSQL.<port>`); nothing listens on TCP.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A key/value connection string for `database` (for `tokio_postgres::connect` or
    /// `tokio_postgres::Config::from_str`): `host=<socket dir> port=<port> user=drover dbname=<database>`.
    #[must_use]
    pub fn connection_string(&self, database: &str) -> String {
        format!(
            "host={} port={} user={USER} dbname={database}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// A connection string for `database` over TCP `localhost` (a [`start_tls`](Self::start_tls)
    /// cluster), without a password.
    #[must_use]
    pub fn tcp_connection_string(&self, database: &str) -> String {
        format!(
            "host=localhost port={} user={USER} dbname={database}",
            self.port
        )
    }

    /// Creates an empty database with a name unique in this cluster (`test_<pid>_<n>`).
    ///
    /// Must be called inside a Tokio runtime: the connection is driven by a spawned task.
    ///
    /// # Panics
    /// If the server cannot be reached or refuses to create the database.
    pub async fn create_database(&self) -> TestDatabase {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&self.connection_string(MAINTENANCE_DATABASE))
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "connecting to the test PostgreSQL in {}: {error}",
                    self.socket_dir().display()
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|error| panic!("creating test database {name}: {error}"));
        TestDatabase {
            connection_string: self.connection_string(&name),
            name,
        }
    }

    /// Crashes the server (`pg_ctl stop -m immediate`): no checkpoint, and every connection
    /// drops. Committed data survives, as after a real crash; [`restart`](Self::restart) it.
    ///
    /// # Panics
    /// If `pg_ctl` fails, for example because the server is not running.
    pub fn kill(&self) {
        self.stop("immediate")
            .unwrap_or_else(|message| panic!("killing the test PostgreSQL: {message}"));
    }

    /// Freezes the server and every backend (`SIGSTOP`): connections stay open and statements
    /// hang, as on a stalled database host. [`thaw`](Self::thaw) resumes it.
    ///
    /// # Panics
    /// If the server is not running.
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    /// Resumes a [`freeze`](Self::freeze)d server.
    ///
    /// # Panics
    /// If the server is not running.
    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    /// Sends `signal` to the postmaster and each of its children.
    fn signal_all(&self, signal: &str) {
        let pid_file = fs_err::read_to_string(self.data_dir().join("postmaster.pid"))
            .unwrap_or_else(|error| panic!("the test PostgreSQL is not running: {error}"));
        let postmaster = pid_file
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mut pids = vec![postmaster.clone()];
        for entry in fs_err::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = fs_err::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let parent = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(1));
            if parent == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&pids)
            .status()
            .unwrap_or_else(|error| panic!("running kill: {error}"));
        assert!(status.success(), "kill -{signal} {pids:?}");
    }

    /// Starts the server again on the same socket and data, after [`kill`](Self::kill); it
    /// runs crash recovery and is accepting connections when this returns.
    ///
    /// # Panics
    /// If the server does not start; the message carries the server log.
    pub fn restart(&self) {
        self.start_server()
            .unwrap_or_else(|message| panic!("restarting the test PostgreSQL: {message}"));
    }

    /// Makes the directory, the cluster and its watchdog, and starts the server.
    fn try_start(owner: Owner, durable: bool, tls: Option<&TlsSetup<'_>>) -> Result<Self, String> {
        // Under /tmp rather than $TMPDIR: a socket path must stay under 108 bytes, and the
        // cluster's user must be able to reach the directory, which /tmp (mode 1777) guarantees.
        let dir = tempfile::Builder::new()
            .prefix("drover-pg-")
            .tempdir_in("/tmp")
            .map_err(|error| format!("creating a directory under /tmp: {error}"))?;
        let as_root = fs_err::metadata(dir.path())
            .map_err(|error| error.to_string())?
            .uid()
            == 0;
        let run_as = match owner {
            Owner::Test => as_root.then_some(UNPRIVILEGED_USER),
            Owner::PostgresUser if !as_root => {
                return Err(format!(
                    "running the server as the OS user {POSTGRES_USER} (runuser) needs root"
                ));
            }
            Owner::PostgresUser => {
                run(std::process::Command::new("id").args(["-u", POSTGRES_USER])).map_err(
                    |message| {
                        format!(
                            "the OS user {POSTGRES_USER} does not exist: install the \
                             `postgresql` package, which creates it\n{message}"
                        )
                    },
                )?;
                Some(POSTGRES_USER)
            }
        };
        if let Some(user) = run_as {
            run(std::process::Command::new("chown")
                .arg(user)
                .arg(dir.path()))?;
        }
        if owner == Owner::PostgresUser {
            // Every user may reach the socket, as in /run/postgresql; `initdb` keeps the data
            // directory private to its owner.
            use std::os::unix::fs::PermissionsExt as _;
            fs_err::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(|error| error.to_string())?;
        }
        let tools = PgTools::locate(run_as)?;
        let data = dir.path().join("data");
        let mut stop_argv = tools.argv("pg_ctl");
        stop_argv.extend(pg_ctl_stop_args(&data, "immediate").map(Into::into));
        // Armed before the server exists, so that a process dying mid-start leaves nothing.
        let watchdog = Watchdog::spawn(dir.path(), &stop_argv)
            .map_err(|error| format!("starting the cleanup watchdog: {error}"))?;
        let cluster = Self {
            tools,
            port: socket_port(),
            watchdog,
            dir,
            durable,
            tls: tls.is_some(),
        };
        let mut initdb = cluster.tools.command("initdb");
        initdb
            .arg("--pgdata")
            .arg(cluster.data_dir())
            .args(owner.initdb_args())
            .arg("--encoding=UTF8")
            // The C locale keeps sorting independent of the machine's environment.
            .args(["--locale=C", "--no-sync"]);
        if let Some(setup) = tls {
            let password_file = cluster.dir.path().join("password");
            cluster.write_owned(&password_file, setup.password)?;
            initdb.arg("--pwfile").arg(&password_file);
        }
        run(&mut initdb)?;
        if let Some(setup) = tls {
            cluster.enable_tls(setup)?;
        }
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Gives the server its certificate and key, and lets TCP clients in only over TLS with a
    /// password.
    fn enable_tls(&self, setup: &TlsSetup<'_>) -> Result<(), String> {
        let data = self.data_dir();
        self.write_owned(&data.join("server.crt"), setup.certificate_pem)?;
        self.write_owned(&data.join("server.key"), setup.key_pem)?;
        self.write_owned(
            &data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n",
        )
    }

    /// Writes a file only the server's user may read (PostgreSQL refuses a key others can).
    fn write_owned(&self, path: &Path, text: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt as _;
        fs_err::write(path, text).map_err(|error| error.to_string())?;
        fs_err::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|error| error.to_string())?;
        if let Some(user) = self.tools.run_as() {
            run(std::process::Command::new("chown").arg(user).arg(path))?;
        }
        Ok(())
    }

    /// `pg_ctl start`: only the Unix socket, no fsync unless durable (a test cluster never
    /// outlives a crash of the machine), and wait until it accepts connections.
    fn start_server(&self) -> Result<(), String> {
        let sync = if self.durable {
            "-c fsync=on -c synchronous_commit=on"
        } else {
            "-c fsync=off"
        };
        let listen = if self.tls {
            "-c listen_addresses=localhost -c ssl=on"
        } else {
            "-c listen_addresses=''"
        };
        let options = format!(
            "-k '{}' -p {} {listen} {sync}",
            self.socket_dir().display(),
            self.port
        );
        run(self
            .tools
            .command("pg_ctl")
            .arg("--pgdata")
            .arg(self.data_dir())
            .arg("--log")
            .arg(self.log_file())
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-o", &options, "start"]))
        .map_err(|message| self.with_log(&message))
    }

    /// `pg_ctl stop` in `mode` (`fast` or `immediate`), waiting until the server is gone.
    fn stop(&self, mode: &str) -> Result<(), String> {
        run(self
            .tools
            .command("pg_ctl")
            .args(pg_ctl_stop_args(&self.data_dir(), mode)))
        .map_err(|message| self.with_log(&message))
    }

    /// Appends the server log to an error message.
    fn with_log(&self, message: &str) -> String {
        let log = fs_err::read_to_string(self.log_file())
            .unwrap_or_else(|error| format!("(no server log: {error})"));
        format!("{message}\n--- server log ---\n{}", log.trim_end())
    }

    /// The cluster's data directory.
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log that `pg_ctl` writes.
    fn log_file(&self) -> PathBuf {
        self.dir.path().join("log")
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // No pid file means the server was never started or was killed: nothing to stop.
        if self.data_dir().join("postmaster.pid").exists()
            && let Err(message) = self.stop("fast")
        {
            // Panicking here could abort an unwinding test; the armed watchdog tries again.
            eprintln!("test-support: stopping the test PostgreSQL: {message}");
            return;
        }
        self.watchdog.disarm();
        // The fields drop next: the watchdog is reaped, then `dir` deletes the directory.
    }
}

/// A database of its own for one test, in a [`TestPostgres`] cluster.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// The database's name, `test_<pid>_<n>`.
    pub name: String,
    /// A key/value connection string for it, as [`TestPostgres::connection_string`] makes.
    pub connection_string: String,
}

impl TestDatabase {
    /// Connects to the database, driving the connection on a spawned Tokio task.
    ///
    /// # Panics
    /// If the server cannot be reached; use [`try_connect`](Self::try_connect) to expect that.
    pub async fn connect(&self) -> Client {
        self.try_connect()
            .await
            .unwrap_or_else(|error| panic!("connecting to test database {}: {error}", self.name))
    }

    /// Connects to the database, returning the error, for tests in which the server may be down.
    pub async fn try_connect(&self) -> Result<Client, tokio_postgres::Error> {
        connect(&self.connection_string).await
    }
}

/// Connects without TLS (a Unix socket needs none) and drives the connection on its own task,
/// which ends when the [`Client`] is dropped or the server goes away.
async fn connect(connection_string: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(connection_string, NoTls).await?;
    drive(connection);
    Ok(client)
}

/// Spawns the task that drives a connection. Its error is dropped on purpose: the [`Client`]
/// reports the same failure to whoever uses it, where the test can assert on it.
#[expect(
    clippy::disallowed_methods,
    reason = "test harness: the task ends with its connection and needs no supervision"
)]
fn drive(connection: impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static) {
    tokio::spawn(async move {
        let _ = connection.await;
    });
}

/// The arguments of `pg_ctl stop` in `mode`, waiting until the server is gone.
fn pg_ctl_stop_args<'a>(data: &'a Path, mode: &'a str) -> [&'a std::ffi::OsStr; 8] {
    [
        "--pgdata".as_ref(),
        data.as_os_str(),
        "-m".as_ref(),
        mode.as_ref(),
        "-w".as_ref(),
        "-t".as_ref(),
        PG_CTL_TIMEOUT_SECS.as_ref(),
        "stop".as_ref(),
    ]
}

/// A port number no TCP listener on this machine uses right now, to name the socket.
fn socket_port() -> u16 {
    crate::farm::unused_port().unwrap_or(FALLBACK_PORT)
}
