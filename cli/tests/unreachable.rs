//! `drover submit`, `cancel`, `restart`, `status` and `logs` against a runner that is not there
//! say they could not reach the runner (not that the runner refused), and exit 69
//! (`EX_UNAVAILABLE`), naming its URL; one without connection settings says where they come from.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Output};

use drover_tls::{CertificateAuthority, Identity, Role};

/// A client's settings for a runner nobody listens on.
struct Nowhere {
    dir: tempfile::TempDir,
    port: u16,
}

impl Nowhere {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        ca.write(dir.path()).unwrap();
        ca.issue(&Identity::new(Role::Client, "alice").unwrap(), &[], &[])
            .unwrap()
            .write(dir.path())
            .unwrap();
        // A port nobody listens on: bound, then released.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self { dir, port }
    }

    /// `drover ARGS` with the connection settings.
    fn drover(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(args)
            .args(["--runner", &format!("https://localhost:{}", self.port)])
            .arg("--ca")
            .arg(self.dir.path().join("ca.pem"))
            .arg("--cert")
            .arg(self.dir.path().join("client-alice.pem"))
            .arg("--key")
            .arg(self.dir.path().join("client-alice.key"))
            .output()
            .unwrap()
    }
}

#[test]
fn commands_against_a_runner_that_is_not_there_say_they_could_not_reach_it() {
    let nowhere = Nowhere::new();
    let port = nowhere.port;
    let drv = format!("/nix/store/{}-x.drv", "0".repeat(32));
    for command in [
        ["submit", drv.as_str()],
        ["cancel", "7"],
        ["restart", "7"],
        ["status", "7"],
        ["logs", "7"],
    ] {
        let output = nowhere.drover(&command);
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
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("the runner's URL is not set: pass --runner or set DROVER_RUNNER")
            && stderr.contains("source DIR/env"),
        "{stderr}"
    );
}

#[test]
fn nix_arguments_reach_the_evaluation_before_the_runner_is_asked() {
    let nowhere = Nowhere::new();
    let dir = nowhere.dir.path();
    let file = dir.join("release.nix");
    fs_err::write(
        &file,
        r#"{ name, flavour }: derivation {
            name = "${name}-${flavour}";
            system = builtins.currentSystem;
            builder = "/bin/sh";
            args = [ "-c" "echo > $out" ];
        }"#,
    )
    .unwrap();
    fs_err::write(dir.join("lib.nix"), r#"{ flavour = "plain"; }"#).unwrap();
    let file = file.to_str().unwrap();
    let include = format!("drover-test={}", dir.display());
    let reached_the_runner = |output: &Output| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.code() == Some(69) && stderr.contains("could not reach the runner"),
            "evaluated, then the runner was asked: {stderr}"
        );
    };
    reached_the_runner(&nowhere.drover(&[
        "submit",
        file,
        "--argstr",
        "name",
        "x",
        "--arg",
        "flavour",
        "(import <drover-test/lib.nix>).flavour",
        "-I",
        &include,
    ]));
    reached_the_runner(&nowhere.drover(&[
        "submit",
        "-E",
        r#"derivation { name = "e"; system = builtins.currentSystem; builder = "/bin/sh"; }"#,
    ]));
    let without = nowhere.drover(&["submit", file]);
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(
        stderr.contains("nix-instantiate") && !stderr.contains("could not reach"),
        "a missing argument fails the evaluation: {stderr}"
    );
    assert_eq!(without.status.code(), Some(65), "EX_DATAERR: {stderr}");
}
