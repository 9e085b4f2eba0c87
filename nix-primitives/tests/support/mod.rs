//! Runs the real Nix for the tests: every test gets its own store under a temporary directory
//! (`--store <dir>`, a "chroot store"), its own narinfo cache, and settings that never reach for
//! the network, so tests run in parallel and leave nothing behind.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix_primitives::StorePath;
use nix_primitives::store_path::STORE_DIR;

/// Settings every Nix call gets: no sandbox or build users (single-user root), no substituters
/// (otherwise each call waits seconds for a network timeout), and the experimental features that
/// let Nix 2.8 instantiate floating content-addressed and impure derivations.
const NIX_CONFIG: &str = "sandbox = false\nbuild-users-group =\nsubstituters =\n\
experimental-features = nix-command ca-derivations impure-derivations\n\
narinfo-cache-negative-ttl = 0\n";

/// A private Nix store and cache directory for one test.
pub struct Nix {
    dir: tempfile::TempDir,
}

impl Nix {
    /// A fresh, empty store. Fails the test with instructions if Nix is not installed.
    pub fn new() -> Self {
        let found = Command::new("nix-store")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            found,
            "nix-store is not on PATH: these tests compare against the real Nix; install it with \
             `apt-get install -y nix-bin` (scripts/test does this)"
        );
        Self {
            dir: tempfile::tempdir().expect("creating a temporary directory"),
        }
    }

    /// The directory that holds this test's store (`<root>/nix/store`).
    pub fn store_root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A scratch directory of this test, removed with it.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs_err::create_dir_all(&path).expect("creating a scratch directory");
        path
    }

    /// Where a store path's contents are on disk.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.store_root()
            .join(STORE_DIR.trim_start_matches('/'))
            .join(path.base_name())
    }

    /// A Nix command bound to this test's store and settings.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .arg("--store")
            .arg(self.store_root())
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("HOME", self.dir.path());
        command
    }

    /// Evaluates a Nix expression (in read-write mode, so derivations are written to the store)
    /// and returns its JSON value.
    pub fn eval_json(&self, expression: &str, directory: &Path) -> serde_json::Value {
        let mut command = self.command("nix-instantiate");
        command
            .current_dir(directory)
            .args([
                "--eval",
                "--strict",
                "--json",
                "--read-write-mode",
                "--expr",
            ])
            .arg(expression);
        serde_json::from_slice(&run(command)).expect("nix-instantiate printed invalid JSON")
    }
}

/// Serialises a path with `nix-store --dump`.
pub fn nix_store_dump(path: &Path) -> Vec<u8> {
    let mut command = Command::new("nix-store");
    command.arg("--dump").arg(path);
    run(command)
}

/// Runs a command to completion and returns its standard output, failing the test with its
/// standard error if it fails.
pub fn run(mut command: Command) -> Vec<u8> {
    let output = command.output().expect("starting a Nix command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        describe(&output)
    );
    output.stdout
}

/// The exit status and standard error of a finished command.
pub fn describe(output: &Output) -> String {
    format!(
        "{}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The directory holding the Nix expressions and files the tests instantiate.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Parses a store path the test got from Nix.
pub fn store_path(text: &str) -> StorePath {
    StorePath::from_absolute(text).unwrap_or_else(|error| panic!("{text}: {error}"))
}
