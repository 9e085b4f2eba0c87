//! Child processes that cannot outlive this one: [`spawn`] starts a command so that the kernel
//! kills it (SIGKILL) the moment this process dies, however it dies, SIGKILL included.
//!
//! The kernel's parent-death signal (`PR_SET_PDEATHSIG`) is set by `setpriv --pdeathsig`, which
//! then executes the real command, so no unsafe `pre_exec` hook is needed. That signal fires when
//! the *thread* that forked the child exits, not the process: a child forked from one of tokio's
//! blocking threads would be killed when that thread retires after being idle. So every tied
//! child is forked from one thread that lives as long as the process.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::sync::{Mutex, OnceLock};

/// A command to start and where to send the outcome.
type Request = (Command, SyncSender<io::Result<Child>>);

/// The sending end of the spawning thread's queue, made on first use.
static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();

/// Starts `program` with `args` as a child that the kernel kills when this process dies.
/// The caller sets up stdio, environment and directory on the command it gets to configure
/// through `configure`; the program is run through `setpriv`.
pub fn spawn(
    program: impl AsRef<std::ffi::OsStr>,
    configure: impl FnOnce(&mut Command),
) -> io::Result<Child> {
    let mut command = Command::new("setpriv");
    command.args(["--pdeathsig", "KILL", "--"]).arg(program);
    configure(&mut command);
    let (reply, outcome) = sync_channel(1);
    let sent = spawner()
        .lock()
        .map_err(|_| io::Error::other("the spawning thread's queue is poisoned"))?
        .send((command, reply));
    if sent.is_err() {
        return Err(io::Error::other("the spawning thread is gone"));
    }
    outcome
        .recv()
        .map_err(|_| io::Error::other("the spawning thread dropped a request"))?
}

fn spawner() -> &'static Mutex<Sender<Request>> {
    SPAWNER.get_or_init(|| {
        let (sender, requests) = std::sync::mpsc::channel();
        // If the thread cannot be started, `requests` is dropped and every spawn reports it.
        let _ = std::thread::Builder::new()
            .name("tied-spawner".to_owned())
            .spawn(move || serve(&requests));
        Mutex::new(sender)
    })
}

/// The spawning thread: forks every request, and never returns while the process runs (the
/// sender lives in a static), so its children's parent-death signal only fires with the process.
fn serve(requests: &Receiver<Request>) {
    while let Ok((mut command, reply)) = requests.recv() {
        let _ = reply.send(command.spawn());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tied_child_runs_its_command_with_the_given_arguments() {
        let output = spawn("echo", |command| {
            command.arg("tied").stdout(std::process::Stdio::piped());
        })
        .unwrap()
        .wait_with_output()
        .unwrap();
        assert!(output.status.success());
        assert_eq!(output.stdout, b"tied\n");
    }

    #[test]
    fn a_missing_program_is_an_error_of_the_child() {
        let status = spawn("/nonexistent/program", |_| {})
            .unwrap()
            .wait()
            .unwrap();
        assert!(!status.success());
    }
}
