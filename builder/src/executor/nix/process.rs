//! The `nix-store --serve --write` processes steps run in, and the spares kept ready for them.
//!
//! Each process runs as the first process of a PID namespace of its own (`unshare --pid --fork
//! --kill-child`), started through [`drover_daemon::tied`] so the kernel kills `unshare` when the
//! builder dies. `unshare` passes that on to `nix-store`, and when the first process of a PID
//! namespace dies the kernel kills every other process in it: the build's own processes, which
//! Nix starts in sessions of their own and which a signal to `nix-store` alone would miss. So a
//! builder killed with SIGKILL leaves nothing of its builds running.
//!
//! A process serves one step: Nix turns substitution off for the rest of a serve process's life
//! after its first BuildDerivation (see [`super::spares`] for the ones kept ready).

use std::io::{BufReader, BufWriter, Read as _};
use std::os::fd::OwnedFd;
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use crate::ansi::AnsiStripper;
use crate::executor::LogSink;
use crate::serve::{Connection, ServeError};

/// The conversation with one serve process.
pub type ServeConnection = Connection<BufReader<ChildStdout>, BufWriter<ChildStdin>>;

/// How long an aborted build may take to stop after SIGTERM before everything in its namespace
/// is killed. Nix stops the build and removes its temporary directory on SIGTERM; SIGKILL leaves
/// the directory behind.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// Why a serve process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The process could not be spawned.
    #[error("starting nix-store --serve in a PID namespace")]
    Spawn(#[source] std::io::Error),
    /// Its scratch directory could not be made.
    #[error("making a scratch directory for nix-store --serve")]
    Scratch(#[source] std::io::Error),
    /// It started but did not greet properly.
    #[error("greeting nix-store --serve")]
    Handshake(#[source] ServeError),
    /// The blocking task that starts it failed.
    #[error("the task starting nix-store --serve failed")]
    Task(#[source] tokio::task::JoinError),
}

/// How long a new process may take to greet: starting one takes ~20 ms.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The buffer replies are read through: output NARs come through it in pieces of this size.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// How much of the end of a serve process's stderr is kept to explain why it died.
const LAST_WORDS_BYTES: usize = 2048;

/// How long [`ServeProcess::last_words`] waits for the process's stderr to end.
const LAST_WORDS_WAIT: Duration = Duration::from_secs(2);

/// How serve processes start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// What follows `nix-store --serve --write`: the store and `--option NAME VALUE` pairs.
    pub arguments: Vec<String>,
    /// The directory each process's scratch directory is made in.
    pub scratch: std::path::PathBuf,
    /// Counts the processes started.
    pub started: prometheus_client::metrics::counter::Counter,
}

/// One serve process, killed (with everything it started) when dropped.
pub struct ServeProcess {
    /// The conversation.
    pub connection: ServeConnection,
    /// Stops the process.
    stopper: Stopper,
    /// Hands the log thread the sink of the step that takes this process.
    log: Option<SyncSender<LogSink>>,
    /// The end of what the process printed, and whether it has stopped printing.
    tail: Arc<Tail>,
    /// The process's own `XDG_CACHE_HOME` (under [`Launch::scratch`]), removed after it. Nix keeps a `SQLite` cache of
    /// narinfos there, and two processes filling a shared one at the same moment fail with
    /// "constraint failed" (seen here with two steps substituting the same input).
    _cache_home: tempfile::TempDir,
}

/// The last bytes a serve process printed (without colour codes), kept by its log thread.
#[derive(Default)]
struct Tail {
    state: Mutex<(Vec<u8>, bool)>,
    ended: Condvar,
}

impl Tail {
    fn push(&self, bytes: &[u8]) {
        if let Ok(mut state) = self.state.lock() {
            let kept = &mut state.0;
            kept.extend_from_slice(bytes);
            let excess = kept.len().saturating_sub(LAST_WORDS_BYTES);
            kept.drain(..excess);
        }
    }

    fn end(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.1 = true;
        }
        self.ended.notify_all();
    }
}

impl ServeProcess {
    /// Starts a process as `launch` says and greets it. Blocking.
    pub fn start(launch: &Launch) -> Result<Self, StartError> {
        let cache_home = tempfile::Builder::new()
            .prefix("serve-")
            .tempdir_in(&launch.scratch)
            .map_err(StartError::Scratch)?;
        let mut child = drover_daemon::tied::spawn("unshare", |command| {
            command
                .args([
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "nix-store",
                    "--serve",
                    "--write",
                ])
                .args(&launch.arguments)
                .env("XDG_CACHE_HOME", cache_home.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        })
        .map_err(StartError::Spawn)?;
        launch.started.inc();
        let stopper = match Stopper::new(child.id()) {
            Ok(stopper) => stopper,
            Err(error) => {
                // Not reaped yet, so the pid is still this child's.
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartError::Spawn(error));
            }
        };
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            stopper.kill();
            return Err(StartError::Spawn(std::io::Error::other(
                "a pipe is missing",
            )));
        };
        let (log, sink) = sync_channel(1);
        let tail = Arc::new(Tail::default());
        let kept = Arc::clone(&tail);
        std::thread::Builder::new()
            .name("nix-serve-log".to_owned())
            .spawn(move || {
                copy_log(stderr, &sink, &kept);
                kept.end();
                // The process ended (its stderr closed): reap it.
                let _ = child.wait();
            })
            .map_err(|error| {
                stopper.kill();
                StartError::Spawn(error)
            })?;
        // A process that never greets (Nix stuck on a lock of its store, say) is killed, which
        // ends the handshake's read, so no step waits on it for ever.
        let (greeted, greeting) = std::sync::mpsc::channel::<()>();
        let watchdog = stopper.clone();
        std::thread::Builder::new()
            .name("nix-serve-start".to_owned())
            .spawn(move || {
                if greeting.recv_timeout(START_TIMEOUT) == Err(RecvTimeoutError::Timeout) {
                    watchdog.kill();
                }
            })
            .map_err(|error| {
                stopper.kill();
                StartError::Spawn(error)
            })?;
        let reader = BufReader::with_capacity(READ_BUFFER_BYTES, stdout);
        let connection = Connection::handshake(reader, BufWriter::new(stdin)).map_err(|error| {
            stopper.kill();
            StartError::Handshake(error)
        })?;
        let _ = greeted.send(());
        Ok(Self {
            connection,
            stopper,
            log: Some(log),
            tail,
            _cache_home: cache_home,
        })
    }

    /// After a failed exchange: kills the process, waits (briefly, blocking) for its stderr to
    /// end, and returns the last line it printed, which says why Nix gave up.
    #[must_use]
    pub fn last_words(&self) -> String {
        self.stopper.kill();
        let Ok(state) = self.tail.state.lock() else {
            return String::new();
        };
        let Ok((state, _)) =
            self.tail
                .ended
                .wait_timeout_while(state, LAST_WORDS_WAIT, |(_, ended)| !*ended)
        else {
            return String::new();
        };
        String::from_utf8_lossy(&state.0)
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Sends what the process prints from now on (the build's log, then Nix's) to `sink`,
    /// without colour codes, until the process ends.
    pub fn attach_log(&mut self, sink: LogSink) {
        if let Some(log) = self.log.take() {
            let _ = log.send(sink);
        }
    }

    /// Something that can stop this process while another thread talks to it.
    #[must_use]
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.stopper.kill();
    }
}

/// Stops a serve process and everything in its PID namespace. It holds a pidfd, so a signal can
/// never reach another process that reused the pid.
#[derive(Clone)]
pub struct Stopper {
    /// `unshare`, whose death takes the namespace with it.
    namespace: Arc<OwnedFd>,
    /// Its pid, to find `nix-store` among its children.
    namespace_pid: u32,
}

impl Stopper {
    fn new(pid: u32) -> std::io::Result<Self> {
        let raw = i32::try_from(pid).map_err(std::io::Error::other)?;
        let pid = Pid::from_raw(raw).ok_or_else(|| std::io::Error::other("pid 0"))?;
        let namespace = pidfd_open(pid, PidfdFlags::empty())?;
        Ok(Self {
            namespace: Arc::new(namespace),
            namespace_pid: pid.as_raw_nonzero().get().unsigned_abs(),
        })
    }

    /// Kills everything in the namespace at once.
    pub fn kill(&self) {
        let _ = pidfd_send_signal(&*self.namespace, Signal::KILL);
    }

    /// Asks `nix-store` to stop its build and clean up (SIGTERM), and kills the namespace if it
    /// has not ended after [`TERMINATE_GRACE`]; returns when `ended` resolves or the grace ran out.
    pub async fn terminate(&self, ended: impl Future<Output = ()>) {
        if let Some(nix_store) = self.nix_store() {
            let _ = pidfd_send_signal(&nix_store, Signal::TERM);
        }
        if tokio::time::timeout(TERMINATE_GRACE, ended).await.is_err() {
            self.kill();
        }
    }

    /// A pidfd of `nix-store`, the only child of `unshare`.
    fn nix_store(&self) -> Option<OwnedFd> {
        let pid = self.namespace_pid;
        let children = fs_err::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        let child: i32 = children.split_whitespace().next()?.parse().ok()?;
        pidfd_open(Pid::from_raw(child)?, PidfdFlags::empty()).ok()
    }
}

/// Copies a serve process's stderr to the sink a step attaches, stripping colour codes, until
/// the process ends. Before a step attaches (a spare), nothing is read: a spare prints nothing.
fn copy_log(mut stderr: std::process::ChildStderr, sink: &Receiver<LogSink>, tail: &Tail) {
    let mut sink = sink.recv().ok();
    let mut stripper = AnsiStripper::default();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut clean = Vec::with_capacity(buffer.len());
    loop {
        let read = match stderr.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        clean.clear();
        stripper.strip(&buffer[..read], &mut clean);
        tail.push(&clean);
        if let Some(sink) = &mut sink {
            sink.blocking_write(&clean);
        }
    }
}
