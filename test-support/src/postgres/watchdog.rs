//! A process that stops a cluster and deletes its directory once the test process is gone.
//!
//! Statics are never dropped, and a test process killed by a timeout or a `panic = "abort"` runs
//! no destructors, so without this every such run would leave a PostgreSQL server and its
//! directory behind. The watchdog reads a pipe whose only write end lives in the test process
//! (std opens pipes close-on-exec, so no child inherits it): the kernel closes that end when the
//! process exits, however it exits, and end of file is the signal to clean up. No polling, no
//! sleeping. The owner writes `disarm` when it has cleaned up itself.

use std::ffi::OsString;
use std::io::{self, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The watchdog program. Arguments: the directory to delete, then the command that stops the
/// server. Output goes nowhere: by the time it runs there is no test left to report to.
const SCRIPT: &str = r#"if read -r word && [ "$word" = disarm ]; then exit 0; fi
dir=$1
shift
"$@"
rm -rf -- "$dir"
"#;

/// The running watchdog of one cluster; dropping it closes the pipe and reaps the process.
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// The `sh` running [`SCRIPT`], with its stdin piped from us.
    child: Child,
}

impl Watchdog {
    /// Starts a watchdog that, once the pipe closes without a `disarm`, runs `stop_argv` and
    /// then deletes `dir`.
    ///
    /// It runs in its own process group so that the signals a test runner or a terminal sends
    /// to the test's group (nextest kills the group on timeout, Ctrl-C interrupts it) do not
    /// stop it before it has cleaned up.
    pub(crate) fn spawn(dir: &Path, stop_argv: &[OsString]) -> io::Result<Self> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("drover-test-postgres-watchdog")
            .arg(dir)
            .args(stop_argv)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(Self { child })
    }

    /// Tells the watchdog that the owner has stopped the server and will delete the directory.
    pub(crate) fn disarm(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            // A watchdog that is already gone has nothing left to do, so a failed write is fine.
            let _ = stdin.write_all(b"disarm\n");
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing stdin lets the script proceed: exit if disarmed, clean up otherwise.
        drop(self.child.stdin.take());
        if let Err(error) = self.child.wait() {
            eprintln!("test-support: waiting for the PostgreSQL watchdog: {error}");
        }
    }
}
