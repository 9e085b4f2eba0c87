//! The install of `docs/operations.md` ("A plain systemd host") followed as written, as far as it
//! runs without systemd, up to a ready runner: the system user; the role and database made as
//! `postgres` on a cluster with peer authentication, as Debian's package sets it up; the
//! certificates and the cache's key, and the permissions that let the runner read its own while
//! `ca.key` stays root's; the configuration from `--print-default-config`; `migrate` and `run` as
//! `drover`.
//!
//! Each command is checked to be in that section word for word, then run as root with the
//! layout (`/usr/bin`, `/etc/drover`, `/var/lib/drover`, `/var/log/drover`) under a directory of
//! the test's own, which stands in for `/`. The user `drover` is the machine's: the first run
//! makes it and later runs find it, so the test can run again on the same machine.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use common::DEADLINE;
use common::nix_farm::http_get;
use test_support::process::DEFAULT_GRACE;
use test_support::{ChildGuard, TestPostgres, free_port, poll_until, workspace_binary};

/// The document the test follows; included so that editing it rebuilds the test.
const OPERATIONS_MD: &str = include_str!("../../docs/operations.md");

/// The section of [`OPERATIONS_MD`] the test follows.
const SECTION: &str = "## A plain systemd host";

/// Step 2: the runner's system user, made unless it exists.
const CREATE_USER: &str = "\
id -u drover >/dev/null 2>&1 ||
useradd --system --home-dir /var/lib/drover --shell /usr/sbin/nologin drover";

/// Step 3, after `apt-get install postgresql`: the role and its database, made as `postgres`.
const CREATE_DATABASE: &str = "\
runuser -u postgres -- createuser drover
runuser -u postgres -- createdb -O drover drover";

/// Step 4: the CA, a certificate of each role, and the cache's signing key.
const CERTIFICATES: &str = "\
drover certs init-ca --dir /etc/drover
drover certs issue --dir /etc/drover --role runner --name main --dns runner.example.org
drover certs issue --dir /etc/drover --role builder --name b1
drover certs issue --dir /etc/drover --role client --name ci
drover certs issue --dir /etc/drover --role admin --name alice
nix-store --generate-binary-cache-key drover-1 \\
/etc/drover/cache-key.sec /etc/drover/cache-key.pub";

/// Step 5: what the runner may read.
const PERMISSIONS: &str = "\
chgrp drover /etc/drover /etc/drover/runner-main.key /etc/drover/cache-key.sec
chmod 0750 /etc/drover
chmod 0640 /etc/drover/runner-main.key /etc/drover/cache-key.sec";

/// Step 6: the configuration.
const CONFIGURATION: &str = "\
drover-queue-runner --print-default-config > /etc/drover/queue-runner.toml";

/// Step 6: the check, as the user the unit runs the runner as.
const MIGRATE: &str = "\
runuser -u drover -- drover-queue-runner --config /etc/drover/queue-runner.toml migrate";

/// The directories of the layout that commands and the configuration name, moved under the
/// test's stand-in for `/`. (`/usr/bin` is reached through `PATH` instead, as installed
/// binaries are.)
const LAYOUT: [&str; 3] = ["/etc/drover", "/var/lib/drover", "/var/log/drover"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_plain_host_install_reaches_a_ready_runner() {
    require_root_and_tools();
    require_documented();
    let postgres = TestPostgres::start_as_postgres_user();
    let host = Host::new(&postgres);
    host.install_binaries();
    let drover = host.create_user();
    // The commands name no server; PGHOST and PGPORT point them at the test's.
    host.run("step 3 (the database)", CREATE_DATABASE);
    host.make_certificates();
    host.grant_the_runner_its_files();
    let cache_port = free_port();
    let config = host.configure(free_port(), cache_port);
    let migrated = host.run("step 6 (migrate)", &host.relocate(MIGRATE));
    assert!(
        migrated.starts_with("applied migrations: [1"),
        "the first migrate applies every migration: {migrated}"
    );

    // 8. What the runner's unit does, then the runner as `drover`.
    host.make_state_directories();
    let journal = host.path("/journal.log");
    let output = fs_err::File::create(&journal).unwrap();
    let runner = ChildGuard::spawn(
        // `setpriv` execs the runner, so the guard's SIGTERM reaches the runner itself.
        Command::new("setpriv")
            .args([
                "--reuid",
                "drover",
                "--regid",
                "drover",
                "--init-groups",
                "--",
            ])
            .arg(host.path("/usr/bin/drover-queue-runner"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap().into_parts().0)
            .stderr(output.into_parts().0),
    )
    .expect("starting the runner with setpriv");
    let said = || fs_err::read_to_string(&journal).unwrap_or_default();
    let runner = Mutex::new(runner);
    poll_until(DEADLINE, "the runner's /readyz to answer 200", || async {
        let exited = runner.lock().unwrap().child_mut().try_wait().unwrap();
        if let Some(status) = exited {
            panic!(
                "the runner exited ({status}) before it was ready:\n{}",
                said()
            );
        }
        tokio::net::TcpStream::connect(("127.0.0.1", cache_port))
            .await
            .ok()?;
        let (status, _) = http_get(cache_port, "/readyz").await;
        status.contains(" 200").then_some(())
    })
    .await;
    let mut runner = runner.into_inner().unwrap();
    assert_eq!(
        process_uid(runner.id()),
        drover,
        "the runner runs as drover"
    );
    let stopped = runner.terminate(DEFAULT_GRACE).unwrap();
    assert!(
        stopped.success(),
        "SIGTERM stops the runner cleanly: {stopped}\n{}",
        said()
    );
}

/// A machine the section installs onto: `/` is a directory of the test's own, and PostgreSQL
/// is the test's cluster.
struct Host {
    /// The stand-in for `/`, under `/tmp` (mode 0755, like `/`): the runner runs as `drover`,
    /// which must reach what is below it.
    root: tempfile::TempDir,
    /// The cluster's socket directory, for libpq's `PGHOST`: the documented commands name no
    /// server, as Debian's cluster is the default one.
    socket_dir: PathBuf,
    /// The number in the cluster's socket name, for libpq's `PGPORT`.
    socket_port: u16,
}

impl Host {
    /// Makes the stand-in for `/` with `/etc` and `/usr/bin`, readable by everyone as theirs.
    fn new(postgres: &TestPostgres) -> Self {
        let root = tempfile::Builder::new()
            .prefix("drover-install-")
            .tempdir_in("/tmp")
            .expect("creating the stand-in for / under /tmp");
        fs_err::create_dir_all(root.path().join("usr/bin")).unwrap();
        fs_err::create_dir_all(root.path().join("etc")).unwrap();
        for dir in ["", "usr", "usr/bin", "etc"] {
            fs_err::set_permissions(
                root.path().join(dir),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
        }
        Self {
            root,
            socket_dir: postgres.socket_dir().to_owned(),
            socket_port: postgres.port(),
        }
    }

    /// Where `absolute` (a path of the real layout) is on this host.
    fn path(&self, absolute: &str) -> PathBuf {
        self.root.path().join(absolute.trim_start_matches('/'))
    }

    /// `text` with the directories of [`LAYOUT`] moved under this host's `/`.
    fn relocate(&self, text: &str) -> String {
        LAYOUT.iter().fold(text.to_owned(), |text, dir| {
            text.replace(dir, &self.path(dir).display().to_string())
        })
    }

    /// Step 1: the binaries, in this host's `/usr/bin`.
    fn install_binaries(&self) {
        for name in ["drover", "drover-queue-runner"] {
            let installed = self.path("/usr/bin").join(name);
            fs_err::copy(workspace_binary(name), &installed).expect("installing a binary");
            fs_err::set_permissions(&installed, std::fs::Permissions::from_mode(0o755))
                .expect("making the installed binary executable");
        }
    }

    /// Step 2: the user, the machine's own (not moved under this host's `/`: its home directory
    /// is only a field of the passwd entry, which outlives the test); returns its uid.
    fn create_user(&self) -> u32 {
        let created = self
            .shell(CREATE_USER)
            .output()
            .expect("running step 2 (the user)");
        // A concurrent run may have made the user between the check and `useradd`.
        assert!(
            created.status.success() || drover_uid().is_some(),
            "step 2 (the user) failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        drover_uid().expect("step 2 made no user drover")
    }

    /// Step 4: certificates and the cache's key, all root's, in a directory closed to others.
    fn make_certificates(&self) {
        self.run("step 4 (certificates)", &self.relocate(CERTIFICATES));
        let etc = self.path("/etc/drover");
        let mode = fs_err::metadata(&etc).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "init-ca makes the directory 0700");
        assert!(
            !drover_reads(&etc.join("runner-main.key")),
            "before step 5 the runner cannot read its key"
        );
    }

    /// Step 5: what the runner may read, and what it still may not.
    fn grant_the_runner_its_files(&self) {
        self.run("step 5 (permissions)", &self.relocate(PERMISSIONS));
        let etc = self.path("/etc/drover");
        for name in [
            "ca.pem",
            "runner-main.pem",
            "runner-main.key",
            "cache-key.sec",
        ] {
            assert!(
                drover_reads(&etc.join(name)),
                "after step 5 drover can read {name}"
            );
        }
        for name in [
            "ca.key",
            "builder-b1.key",
            "client-ci.key",
            "admin-alice.key",
        ] {
            assert!(
                !drover_reads(&etc.join(name)),
                "after step 5 {name} stays unreadable by drover"
            );
        }
        let ca_key = fs_err::metadata(etc.join("ca.key")).unwrap();
        assert_eq!(
            (
                ca_key.uid(),
                ca_key.gid(),
                ca_key.permissions().mode() & 0o777
            ),
            (0, 0, 0o600),
            "ca.key stays root's, mode 0600"
        );
    }

    /// Step 6: the configuration as printed, then what this host differs in (see
    /// [`adapt`](Self::adapt)); returns the file's path.
    fn configure(&self, grpc_port: u16, cache_port: u16) -> PathBuf {
        self.run("step 6 (configuration)", &self.relocate(CONFIGURATION));
        let config = self.path("/etc/drover/queue-runner.toml");
        let printed = fs_err::read_to_string(&config).unwrap();
        fs_err::write(&config, self.adapt(&printed, grpc_port, cache_port)).unwrap();
        config
    }

    /// What the runner's unit does before starting it (`StateDirectory=drover`,
    /// `LogsDirectory=drover`, both mode 0750).
    fn make_state_directories(&self) {
        let status = Command::new("install")
            .args(["-d", "-o", "drover", "-g", "drover", "-m", "0750"])
            .arg(self.path("/var/lib/drover"))
            .arg(self.path("/var/log/drover"))
            .status()
            .expect("running install -d");
        assert!(status.success(), "creating the state and log directories");
    }

    /// `script` run by `sh -e` as root from `/`, as in a root shell on Debian: umask 022, and
    /// the binaries installed in this host's `/usr/bin` found first on `PATH`.
    fn shell(&self, script: &str) -> Command {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path: OsString = std::env::join_paths(
            std::iter::once(self.path("/usr/bin")).chain(std::env::split_paths(&path)),
        )
        .expect("joining PATH");
        let mut command = Command::new("sh");
        command
            .arg("-ec")
            .arg(format!("umask 022\n{script}"))
            .env("PATH", path)
            .env("PGHOST", &self.socket_dir)
            .env("PGPORT", self.socket_port.to_string())
            .current_dir("/")
            .stdin(Stdio::null());
        command
    }

    /// Runs `script` (see [`shell`](Self::shell)); returns its stdout.
    ///
    /// # Panics
    /// If it fails, naming `step` and showing what it printed.
    fn run(&self, step: &str, script: &str) -> String {
        let output = self
            .shell(script)
            .output()
            .unwrap_or_else(|error| panic!("{step}: running sh: {error}"));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{step} failed ({}):\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// The printed default configuration with what this host differs in, and nothing else:
    /// the layout under this host's `/`, both listeners on 127.0.0.1 ports of the test's own
    /// (tests run in parallel), and the database at the test's cluster.
    fn adapt(&self, default: &str, grpc_port: u16, cache_port: u16) -> String {
        for dir in LAYOUT {
            assert!(
                default.contains(dir),
                "the default configuration names no path under {dir}:\n{default}"
            );
        }
        let edits = [
            ("\"0.0.0.0:7700\"", format!("\"127.0.0.1:{grpc_port}\"")),
            ("\"0.0.0.0:7701\"", format!("\"127.0.0.1:{cache_port}\"")),
            (
                "\"host=/run/postgresql dbname=drover user=drover\"",
                format!(
                    "\"host={} port={} dbname=drover user=drover\"",
                    self.socket_dir.display(),
                    self.socket_port
                ),
            ),
        ];
        edits
            .iter()
            .fold(self.relocate(default), |text, (default_value, value)| {
                assert!(
                    text.contains(default_value),
                    "the default configuration no longer has {default_value}:\n{default}"
                );
                text.replace(default_value, value)
            })
    }
}

/// Fails unless the section still says every command the test runs, word for word.
fn require_documented() {
    let section = documented_section();
    for command in [
        CREATE_USER,
        CREATE_DATABASE,
        CERTIFICATES,
        PERMISSIONS,
        CONFIGURATION,
        MIGRATE,
    ] {
        assert!(
            section.contains(command),
            "docs/operations.md, \"A plain systemd host\", no longer says (indentation aside):\n\
             {command}\n--- the section ---\n{section}"
        );
    }
}

/// The section the test follows, each line without its indentation (the commands sit in a
/// numbered list).
fn documented_section() -> String {
    let start = OPERATIONS_MD
        .find(SECTION)
        .expect("docs/operations.md has a section \"A plain systemd host\"");
    let section = &OPERATIONS_MD[start..];
    let end = section[SECTION.len()..]
        .find("\n## ")
        .map_or(section.len(), |at| SECTION.len() + at);
    section[..end]
        .lines()
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails, saying what to install, unless this process is root and every program the section
/// runs is on `PATH`. (`TestPostgres::start_as_postgres_user` names the package that makes the
/// OS user `postgres`.)
fn require_root_and_tools() {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .expect("running id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the documented install runs as root, and so must this test"
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (program, package) in [
        ("runuser", "util-linux"),
        ("setpriv", "util-linux"),
        ("useradd", "passwd"),
        ("install", "coreutils"),
        ("createuser", "postgresql-client"),
        ("nix-store", "nix-bin"),
    ] {
        assert!(
            std::env::split_paths(&path).any(|dir| dir.join(program).is_file()),
            "{program} is not on PATH: install {package} (the documented install runs it)"
        );
    }
}

/// The uid of the OS user `drover`, if it exists.
fn drover_uid() -> Option<u32> {
    let output = Command::new("id")
        .args(["-u", "drover"])
        .stderr(Stdio::null())
        .output()
        .expect("running id -u drover");
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// Whether the OS user `drover` may read `path`.
fn drover_reads(path: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", "drover", "--", "test", "-r"])
        .arg(path)
        .current_dir("/")
        .status()
        .expect("running runuser -u drover -- test -r")
        .success()
}

/// The real uid process `pid` runs as.
fn process_uid(pid: u32) -> u32 {
    let status = fs_err::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("no Uid line in /proc/{pid}/status:\n{status}"))
}
