//! Finding PostgreSQL's server binaries and running them as a user they accept.
//!
//! `initdb` and `pg_ctl` refuse to run as root, so when the tests run as root (CI containers do)
//! every server command goes through `runuser -u nobody --` and the cluster belongs to `nobody`;
//! a cluster that stands in for a distribution's packaged server belongs to `postgres` instead.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The unprivileged user that owns the clusters made while the tests run as root.
pub(crate) const UNPRIVILEGED_USER: &str = "nobody";

/// The OS user that owns a distribution's packaged cluster (Debian's `postgresql` package
/// creates it), and the superuser role peer authentication maps it to.
pub(crate) const POSTGRES_USER: &str = "postgres";

/// Where Debian and Ubuntu install the server binaries, one `N/bin` directory per major version.
const VERSIONED_ROOT: &str = "/usr/lib/postgresql";

/// The programs a cluster's life cycle needs; they must sit in one directory, because `pg_ctl`
/// starts the `postgres` next to itself.
const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// The located server binaries and how to run them.
#[derive(Debug, Clone)]
pub(crate) struct PgTools {
    /// The directory holding every program in [`REQUIRED`].
    bin_dir: PathBuf,
    /// The user the programs run as through `runuser` (we are root), who must then own the
    /// cluster's files; `None` runs them as ourselves.
    run_as: Option<&'static str>,
}

impl PgTools {
    /// Finds the binaries on `PATH`, else in the newest `/usr/lib/postgresql/N/bin`, to run as
    /// `run_as` (`None`: as ourselves).
    pub(crate) fn locate(run_as: Option<&'static str>) -> Result<Self, String> {
        let bin_dir = find_bin_dir().ok_or_else(|| {
            format!(
                "the PostgreSQL server binaries ({}) are neither on PATH nor in \
                 {VERSIONED_ROOT}/*/bin: install the `postgresql` package (scripts/test installs it)",
                REQUIRED.join(", ")
            )
        })?;
        Ok(Self { bin_dir, run_as })
    }

    /// The argument vector that runs `tool` as a user it accepts; the watchdog needs it as
    /// plain arguments because it runs the command from a shell after we are gone.
    pub(crate) fn argv(&self, tool: &str) -> Vec<OsString> {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(user) = self.run_as {
            argv.extend(["runuser", "-u", user, "--"].map(OsString::from));
        }
        argv.push(self.bin_dir.join(tool).into_os_string());
        argv
    }

    /// The user the programs run as, who must then own the cluster's files; `None`: ourselves.
    pub(crate) const fn run_as(&self) -> Option<&'static str> {
        self.run_as
    }

    /// A [`Command`] that runs `tool` as a user it accepts, from `/` so that that user never
    /// needs access to our working directory.
    pub(crate) fn command(&self, tool: &str) -> Command {
        command_from(&self.argv(tool))
    }
}

/// Builds a [`Command`] from an argument vector whose first element is the program.
fn command_from(argv: &[OsString]) -> Command {
    let (program, rest) = argv
        .split_first()
        .map_or((OsString::new(), &[][..]), |(p, a)| (p.clone(), a));
    let mut command = Command::new(program);
    command.args(rest).current_dir("/");
    command
}

/// Runs `command` to completion with no input, turning a failure into a message with its output.
pub(crate) fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("could not run {command:?}: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end(),
    ))
}

/// The first directory on `PATH`, then in `/usr/lib/postgresql/*/bin` from the highest version
/// down, that holds every program in [`REQUIRED`].
fn find_bin_dir() -> Option<PathBuf> {
    let on_path: Vec<PathBuf> = env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(versioned_bin_dirs())
        .find(|dir| has_required(dir))
}

/// `/usr/lib/postgresql/<version>/bin` for every numeric version present, highest first.
fn versioned_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs_err::read_dir(VERSIONED_ROOT) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// Whether `dir` holds every program in [`REQUIRED`].
fn has_required(dir: &Path) -> bool {
    REQUIRED.iter().all(|tool| dir.join(tool).is_file())
}
