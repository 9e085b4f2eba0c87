//! Child processes that cannot outlive the test that started them, commands that run with a
//! private `/nix` of their own, and finding the binaries the workspace built.

use std::env;
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// How long a dropped [`ChildGuard`] lets its process shut down after SIGTERM before SIGKILL;
/// long enough for a server to drain, short enough that a hung one does not stall the suite.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How often [`ChildGuard::terminate`] checks whether the process has exited.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A child process that is terminated (SIGTERM, then SIGKILL after a grace period) and reaped
/// when the guard is dropped, so a failing test leaves no server running behind it.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Guards an already spawned child.
    #[must_use]
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    /// Spawns `command` and guards the child.
    pub fn spawn(command: &mut Command) -> io::Result<Self> {
        command.spawn().map(Self)
    }

    /// The child's process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// The child itself: its stdio handles, `try_wait`, or `kill` to simulate a crash. It stays
    /// guarded; dropping the guard after the child exited just reaps it.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.0
    }

    /// Sends SIGTERM, waits up to `grace` for the process to exit, then sends SIGKILL; returns
    /// how it ended. Returns at once if it had already exited.
    pub fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.0.try_wait()? {
            return Ok(status);
        }
        // The child is not reaped yet, so its pid cannot have been reused. If `kill` cannot
        // be run, the grace period passes and SIGKILL follows.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(EXIT_POLL_INTERVAL);
        }
        self.0.kill()?;
        self.0.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(error) = self.terminate(DEFAULT_GRACE) {
            eprintln!(
                "test-support: terminating child process {}: {error}",
                self.0.id()
            );
        }
    }
}

/// The path of binary `name` built in the same target directory as the running test
/// (`target/<profile>/`; the test itself runs from `target/<profile>/deps/`).
///
/// # Panics
/// If the binary is not there: integration tests do not build the other crates' binaries.
#[must_use]
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = env::current_exe()
        .unwrap_or_else(|error| panic!("locating the running test executable: {error}"));
    let mut dir = exe.parent().unwrap_or(&exe);
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(format!("{name}{}", env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary {name} not found at {}: run `cargo build --workspace` (scripts/test does)",
        path.display()
    );
    path
}

/// A command that runs its arguments with `store` (created if missing) bind-mounted over `/nix`
/// in a mount namespace of its own, as a separate machine's store would be. Needs root.
///
/// # Panics
/// If `store` cannot be created or `/nix` does not exist.
#[must_use]
pub fn private_store_command(store: &std::path::Path) -> Command {
    fs_err::create_dir_all(store)
        .unwrap_or_else(|error| panic!("creating the private store: {error}"));
    require_nix_directory();
    let mut command = Command::new("unshare");
    command.args(private_store_arguments(store));
    command
}

/// Like [`private_store_command`], further restricted as the shipped builder unit restricts its
/// service: `/proc/sys` read-only (systemd's `ProtectKernelTunables=`) and `/nix` read-only but
/// for `/nix/var/nix/gcroots` (`ProtectSystem=strict` with `ReadWritePaths=`), which every Nix
/// installation has and which is made here if missing, and no capability but `CAP_SYS_ADMIN`
/// (`CapabilityBoundingSet=`, `NoNewPrivileges=`).
///
/// # Panics
/// If `/nix` does not exist.
#[must_use]
pub fn restricted_private_store_command(store: &std::path::Path) -> Command {
    require_nix_directory();
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            r#"set -e
mkdir -p "$0/var/nix/gcroots"
mount --bind "$0" /nix
mount --bind /nix/var/nix/gcroots /nix/var/nix/gcroots
mount -o remount,bind,ro /nix
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
exec setpriv --bounding-set -all,+sys_admin --inh-caps -all --no-new-privs -- "$@""#,
        );
    command.arg(store);
    command
}

/// Panics unless `/nix` exists: private stores are mounted over it.
fn require_nix_directory() {
    assert!(
        std::path::Path::new("/nix").is_dir(),
        "/nix must exist to mount private stores over it (install nix-bin; scripts/test does)"
    );
}

/// The arguments of `unshare` that run what follows them with `store` bind-mounted over `/nix`
/// in a mount namespace of their own (for callers that build the command themselves).
#[must_use]
pub fn private_store_arguments(store: &std::path::Path) -> [&std::ffi::OsStr; 7] {
    [
        "--mount".as_ref(),
        "--propagation".as_ref(),
        "private".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        r#"mount --bind "$0" /nix && exec "$@""#.as_ref(),
        store.as_os_str(),
    ]
}
