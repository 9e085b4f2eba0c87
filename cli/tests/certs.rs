//! `drover certs` end to end: the real binary creates a CA and issues certificates in a temporary
//! directory, and refuses bad input and overwrites with the documented exit codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use drover_tls::{Identity, Role};
use x509_parser::extensions::GeneralName;

/// `EX_USAGE`: what the binary exits with when it refuses its command line.
const EX_USAGE: i32 = 64;

/// Runs `drover` with `args`.
fn drover<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .output()
        .expect("the drover binary runs")
}

/// Runs `drover certs <subcommand> --dir <dir> <args>`.
fn certs(subcommand: &str, dir: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&OsStr> = vec!["certs".as_ref(), subcommand.as_ref(), "--dir".as_ref()];
    all.push(dir.as_os_str());
    all.extend(args.iter().map(OsStr::new));
    drover(all)
}

/// Asserts that the command succeeded and returns the paths it printed.
fn succeeded(output: &Output) -> Vec<PathBuf> {
    assert!(
        output.status.success(),
        "status {}, stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs_err::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The DER of the certificate in a PEM file.
fn certificate_der(path: &Path) -> Vec<u8> {
    let pem = fs_err::read(path).unwrap();
    x509_parser::pem::parse_x509_pem(&pem).unwrap().1.contents
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs_err::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn init_ca_then_issue_builder_and_runner_certificates() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("pki");

    let written = succeeded(&certs("init-ca", &dir, &["--common-name", "test farm CA"]));
    assert_eq!(written, [dir.join("ca.pem"), dir.join("ca.key")]);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);

    let written = succeeded(&certs(
        "issue",
        &dir,
        &["--role", "builder", "--name", "b1"],
    ));
    let (builder_pem, builder_key) = (dir.join("builder-b1.pem"), dir.join("builder-b1.key"));
    assert_eq!(written, [builder_pem.clone(), builder_key.clone()]);
    assert_eq!(mode(&builder_key), 0o600);
    let identity = Identity::from_certificate_der(&certificate_der(&builder_pem)).unwrap();
    assert_eq!(identity, Identity::new(Role::Builder, "b1").unwrap());
    assert_eq!(identity.to_string(), "builder/b1");

    succeeded(&certs("issue", &dir, &["--role", "runner", "--name", "r1"]));
    assert_eq!(mode(&dir.join("runner-r1.key")), 0o600);
    let der = certificate_der(&dir.join("runner-r1.pem"));
    let (_, runner) = x509_parser::parse_x509_certificate(&der).unwrap();
    let names = &runner
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(names.contains(&GeneralName::URI("drover://runner/r1")));
    assert!(names.contains(&GeneralName::DNSName("localhost")));
    assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));

    assert_eq!(
        files_in(&dir),
        [
            "builder-b1.key",
            "builder-b1.pem",
            "ca.key",
            "ca.pem",
            "runner-r1.key",
            "runner-r1.pem"
        ]
    );
}

#[test]
fn explicit_names_replace_the_runner_defaults() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    succeeded(&certs("init-ca", dir, &[]));
    succeeded(&certs(
        "issue",
        dir,
        &[
            "--role",
            "runner",
            "--name",
            "r2",
            "--dns",
            "runner.example.org",
            "--ip",
            "::1",
        ],
    ));
    let der = certificate_der(&dir.join("runner-r2.pem"));
    let (_, runner) = x509_parser::parse_x509_certificate(&der).unwrap();
    let names = &runner
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(names.contains(&GeneralName::DNSName("runner.example.org")));
    assert!(!names.contains(&GeneralName::DNSName("localhost")));
    assert_eq!(names.len(), 3);
}

#[test]
fn invalid_role_or_name_is_refused_with_ex_usage() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    succeeded(&certs("init-ca", dir, &[]));
    for args in [
        ["--role", "root", "--name", "b1"],
        ["--role", "builder", "--name", "../b1"],
    ] {
        let output = certs("issue", dir, &args);
        assert_eq!(output.status.code(), Some(EX_USAGE), "{args:?}");
        assert!(!output.stderr.is_empty());
        assert!(output.stdout.is_empty());
    }
    assert_eq!(files_in(dir), ["ca.key", "ca.pem"]);
}

#[test]
fn init_ca_twice_fails_without_overwriting() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    succeeded(&certs("init-ca", dir, &[]));
    let cert_before = fs_err::read(dir.join("ca.pem")).unwrap();
    let key_before = fs_err::read(dir.join("ca.key")).unwrap();

    let output = certs("init-ca", dir, &[]);
    assert_eq!(
        output.status.code(),
        Some(78),
        "EX_CONFIG: the CA exists already"
    );
    assert!(!output.stderr.is_empty());
    assert_eq!(fs_err::read(dir.join("ca.pem")).unwrap(), cert_before);
    assert_eq!(fs_err::read(dir.join("ca.key")).unwrap(), key_before);
}

#[test]
fn issuing_without_a_ca_or_twice_fails() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let output = certs("issue", dir, &["--role", "client", "--name", "alice"]);
    assert_eq!(output.status.code(), Some(78), "EX_CONFIG: no CA");
    assert!(!output.stderr.is_empty());

    succeeded(&certs("init-ca", dir, &[]));
    succeeded(&certs(
        "issue",
        dir,
        &["--role", "client", "--name", "alice"],
    ));
    let key_before = fs_err::read(dir.join("client-alice.key")).unwrap();
    let output = certs("issue", dir, &["--role", "client", "--name", "alice"]);
    assert_eq!(
        output.status.code(),
        Some(78),
        "EX_CONFIG: the certificate exists already"
    );
    assert_eq!(
        fs_err::read(dir.join("client-alice.key")).unwrap(),
        key_before
    );
}
