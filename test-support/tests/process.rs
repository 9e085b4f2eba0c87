//! `ChildGuard` leaves no process behind, and `workspace_binary` says how to fix a missing binary.

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::{ChildGuard, workspace_binary};

#[test]
fn dropping_the_guard_terminates_and_reaps_the_child() {
    let guard = ChildGuard::spawn(Command::new("sleep").arg("1000")).unwrap();
    let proc_dir = format!("/proc/{}", guard.id());
    assert!(Path::new(&proc_dir).exists());
    drop(guard);
    assert!(!Path::new(&proc_dir).exists(), "{proc_dir} still exists");
}

#[test]
fn terminate_sends_sigterm_first() {
    let mut guard = ChildGuard::spawn(Command::new("sleep").arg("1000")).unwrap();
    let status = guard.terminate(Duration::from_secs(10)).unwrap();
    assert_eq!(status.signal(), Some(15));
}

#[test]
fn terminate_escalates_to_sigkill_when_sigterm_is_ignored() {
    let mut guard = ChildGuard::spawn(
        Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; exec sleep 1000"])
            .stdout(Stdio::piped()),
    )
    .unwrap();
    // Wait until the trap is set, or SIGTERM would arrive first and the test would prove nothing.
    let mut line = String::new();
    BufReader::new(guard.child_mut().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");

    let status = guard.terminate(Duration::from_millis(100)).unwrap();
    assert_eq!(status.signal(), Some(9));
}

#[test]
#[should_panic(expected = "binary no-such-binary not found at")]
fn workspace_binary_names_a_missing_binary() {
    let _ = workspace_binary("no-such-binary");
}
