//! `drover submit`, `cancel`, `restart`, `status` and `logs` against a runner that is not there
//! say they could not reach the runner (not that the runner refused), and exit 69
//! (`EX_UNAVAILABLE`), naming its URL; one without connection settings says where they come from.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;

use drover_tls::{CertificateAuthority, Identity, Role};

#[test]
fn commands_against_a_runner_that_is_not_there_say_they_could_not_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("test CA").unwrap();
    ca.write(dir.path()).unwrap();
    let (cert, key) = ca
        .issue(&Identity::new(Role::Client, "alice").unwrap(), &[], &[])
        .unwrap()
        .write(dir.path())
        .unwrap();
    // A port nobody listens on: bound, then released.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let drv = format!("/nix/store/{}-x.drv", "0".repeat(32));
    for command in [
        ["submit", drv.as_str()],
        ["cancel", "7"],
        ["restart", "7"],
        ["status", "7"],
        ["logs", "7"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(command)
            .args(["--runner", &format!("https://localhost:{port}")])
            .arg("--ca")
            .arg(dir.path().join("ca.pem"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(69),
            "EX_UNAVAILABLE: {command:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "could not reach the runner at https://localhost:{port}"
            )),
            "{command:?}: {stderr}"
        );
        assert!(!stderr.contains("refused:"), "{command:?}: {stderr}");
    }
}

#[test]
fn a_command_without_connection_settings_says_where_they_come_from() {
    let output = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["status", "7"])
        .env_remove("DROVER_RUNNER")
        .env_remove("DROVER_CA")
        .env_remove("DROVER_CERT")
        .env_remove("DROVER_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("the runner's URL is not set: pass --runner or set DROVER_RUNNER")
            && stderr.contains("source DIR/env"),
        "{stderr}"
    );
}
