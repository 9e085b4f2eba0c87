//! The dev farm: a whole farm on this machine for trying drover: an ephemeral PostgreSQL, a
//! CA with certificates, the runner, and N builders with the Nix executor, each in its own mount
//! namespace with an empty private `/nix` (so they behave like separate machines). Prints how to
//! point the CLI and stock Nix at it, writes the same as shell exports to `DIR/env`, and removes
//! everything again when interrupted.
//!
//! Private stores need root (`mount --bind` over `/nix` in a new mount namespace).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Args;
use drover_queue_runner::app;
use drover_queue_runner::config::Config;
use drover_tls::{CertError, CertificateAuthority, Identity, Role};
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use nix_primitives::SecretKey;
use test_support::{ChildGuard, TestPostgres};
use tokio_util::sync::CancellationToken;

/// Settings every Nix in the farm runs with: single-user root, no sandbox, no network
/// substituters besides the farm's own, no negative narinfo caching.
pub const NIX_CONFIG: &str = "sandbox = false\nbuild-users-group =\nsubstituters =\n\
narinfo-cache-negative-ttl = 0\n";

/// How long the farm may take to have every builder joined.
const READY_DEADLINE: Duration = Duration::from_mins(1);

/// `drover dev-farm` arguments.
#[derive(Debug, Args)]
pub struct DevFarmArgs {
    /// Builders to start, each with its own private store.
    #[arg(long, default_value_t = 2)]
    builders: u32,
    /// Steps each builder runs at once.
    #[arg(long, default_value_t = 2)]
    max_jobs: u32,
    /// Directory for the farm's state (certificates, stores, logs); a temporary one by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// gRPC port (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    grpc_port: u16,
    /// Binary cache port (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    cache_port: u16,
}

/// Why the dev farm could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevFarmError {
    /// Not root.
    #[error("dev-farm needs root: each builder mounts a private /nix in its own mount namespace")]
    NotRoot,
    /// `/nix` is missing.
    #[error("/nix does not exist: install Nix (apt-get install nix-bin) first")]
    NoNix,
    /// A file of the farm could not be written.
    #[error("preparing the farm directory")]
    Files(#[source] std::io::Error),
    /// Certificates could not be made.
    #[error("making certificates")]
    Certificates(#[from] CertError),
    /// The runner failed.
    #[error("the runner failed: {0}")]
    Runner(String),
    /// A builder process could not start.
    #[error("starting a builder")]
    Builder(#[source] std::io::Error),
    /// The builders did not all join in time.
    #[error(
        "only {joined} of {wanted} builders joined within {READY_DEADLINE:?}; see DIR/builder-*.log"
    )]
    NotReady {
        /// Builders connected.
        joined: i64,
        /// Builders started.
        wanted: u32,
    },
}

impl Classify for DevFarmError {
    fn severity(&self) -> Severity {
        Severity::Fatal
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

/// Runs the farm until SIGINT or SIGTERM.
pub async fn run(args: DevFarmArgs) -> Result<(), WithContext<DevFarmError>> {
    if !is_root() {
        return Err(DevFarmError::NotRoot.into());
    }
    if !Path::new("/nix").is_dir() {
        return Err(DevFarmError::NoNix.into());
    }
    let temporary = match &args.dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("drover-dev-farm.")
                .tempdir()
                .map_err(DevFarmError::Files)?,
        ),
    };
    let dir = args
        .dir
        .clone()
        .or_else(|| temporary.as_ref().map(|t| t.path().to_owned()))
        .unwrap_or_default();
    fs_err::create_dir_all(&dir).map_err(DevFarmError::Files)?;

    eprintln!("starting PostgreSQL");
    let postgres = TestPostgres::start();
    let database = postgres.create_database().await;
    let cache_key = SecretKey::generate("drover-dev-farm-1")
        .map_err(|error| DevFarmError::Files(std::io::Error::other(error)))?;
    write(&dir.join("cache-key.sec"), &cache_key.to_nix_format())?;
    certificates(&dir, args.builders).context("issuing the farm's certificates")?;
    let config = runner_config(&dir, &database.connection_string, &args)?;

    let shutdown = CancellationToken::new();
    let runner = app::start(config, shutdown.clone())
        .await
        .map_err(|error| DevFarmError::Runner(error.report().to_string()))?;
    let grpc = runner.grpc_address;
    let cache_url = format!("http://127.0.0.1:{}", runner.cache_address.port());
    let public_key = runner.cache_public_key.to_string();
    let mut builders = Vec::new();
    for index in 1..=args.builders {
        builders.push(start_builder(
            &dir,
            index,
            &args,
            grpc.port(),
            &cache_url,
            &public_key,
        )?);
    }
    wait_until_joined(&database, args.builders).await?;

    let exports = format!(
        "export DROVER_RUNNER=https://localhost:{port} DROVER_CA={dir}/ca.pem \
DROVER_CERT={dir}/client-dev.pem DROVER_KEY={dir}/client-dev.key \
DROVER_CACHE={cache_url} DROVER_CACHE_KEY={public_key}\n",
        port = grpc.port(),
        dir = dir.display(),
    );
    write(&dir.join("env"), &exports)?;
    println!(
        "drover dev farm is up ({} builders, state in {})",
        args.builders,
        dir.display()
    );
    println!("  runner (mTLS gRPC): https://localhost:{}", grpc.port());
    println!("  binary cache:       {cache_url}");
    println!("  cache public key:   {public_key}");
    println!("  database:           {}", database.connection_string);
    println!("point the CLI at it:");
    println!("  {}", exports.trim_end());
    println!("then: drover submit examples/diamond.nix --attr top --watch");
    println!("press Ctrl-C to stop and remove everything");

    let waiting = runner.wait();
    tokio::pin!(waiting);
    let result = tokio::select! {
        result = &mut waiting => result.map_err(|error| DevFarmError::Runner(error.report().to_string())),
        _ = drover_daemon::termination() => {
            shutdown.cancel();
            waiting.await.map_err(|error| DevFarmError::Runner(error.report().to_string()))
        }
    };
    drop(builders);
    drop(postgres);
    eprintln!("drover dev farm stopped");
    Ok(result?)
}

/// Writes a file whole or not at all (a temporary file renamed into place): scripts wait for
/// `DIR/env` to appear and must never read half of it.
fn write(path: &Path, contents: &str) -> Result<(), DevFarmError> {
    let partial = path.with_extension("partial");
    fs_err::write(&partial, contents).map_err(DevFarmError::Files)?;
    fs_err::rename(&partial, path).map_err(DevFarmError::Files)
}

/// A CA, the runner's certificate, one per builder, and a client certificate `client/dev`.
fn certificates(dir: &Path, builders: u32) -> Result<(), DevFarmError> {
    let ca = CertificateAuthority::generate("drover dev farm CA")?;
    ca.write(dir)?;
    let runner = Identity::new(Role::Runner, "dev")
        .map_err(|e| DevFarmError::Files(std::io::Error::other(e)))?;
    ca.issue(
        &runner,
        &["localhost".to_owned()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )?
    .write(dir)?;
    let mut identities = vec![(Role::Client, "dev".to_owned())];
    identities.extend((1..=builders).map(|index| (Role::Builder, format!("b{index}"))));
    for (role, name) in identities {
        let identity = Identity::new(role, &name)
            .map_err(|e| DevFarmError::Files(std::io::Error::other(e)))?;
        ca.issue(&identity, &[], &[])?.write(dir)?;
    }
    Ok(())
}

fn runner_config(dir: &Path, database: &str, args: &DevFarmArgs) -> Result<Config, DevFarmError> {
    let text = format!(
        r#"
[database]
url = "{database}"
[grpc]
listen = "127.0.0.1:{grpc_port}"
[tls]
ca_certificate = "{dir}/ca.pem"
certificate = "{dir}/runner-dev.pem"
key = "{dir}/runner-dev.key"
[logs]
directory = "{dir}/logs"
[cache]
directory = "{dir}/cache"
listen = "127.0.0.1:{cache_port}"
secret_key_file = "{dir}/cache-key.sec"
"#,
        dir = dir.display(),
        grpc_port = args.grpc_port,
        cache_port = args.cache_port,
    );
    let path = dir.join("queue-runner.toml");
    write(&path, &text)?;
    Config::parse(&text, &path)
        .map_err(|error| DevFarmError::Runner(error_context::report(&error).to_string()))
}

/// Starts builder `b<index>` in its own mount namespace with `DIR/stores/b<index>` as `/nix`.
fn start_builder(
    dir: &Path,
    index: u32,
    args: &DevFarmArgs,
    grpc_port: u16,
    cache_url: &str,
    public_key: &str,
) -> Result<ChildGuard, DevFarmError> {
    let name = format!("b{index}");
    let store = dir.join("stores").join(&name);
    let home = dir.join("homes").join(&name);
    fs_err::create_dir_all(&store).map_err(DevFarmError::Files)?;
    fs_err::create_dir_all(&home).map_err(DevFarmError::Files)?;
    let config = format!(
        r#"
[runner]
url = "https://localhost:{grpc_port}"
[tls]
ca_certificate = "{dir}/ca.pem"
certificate = "{dir}/builder-{name}.pem"
key = "{dir}/builder-{name}.key"
[builder]
systems = ["x86_64-linux"]
max_jobs = {max_jobs}
[executor]
kind = "nix"
cache_url = "{cache_url}"
trusted_public_keys = ["{public_key}"]
"#,
        dir = dir.display(),
        max_jobs = args.max_jobs,
    );
    let config_path = dir.join(format!("builder-{name}.toml"));
    write(&config_path, &config)?;
    let log = fs_err::File::create(dir.join(format!("builder-{name}.log")))
        .map_err(DevFarmError::Files)?;
    let (log, _) = log.into_parts();
    let stderr = log.try_clone().map_err(DevFarmError::Files)?;
    let binary = std::env::current_exe()
        .map_err(DevFarmError::Builder)?
        .with_file_name("drover-builder");
    // Tied to this process: a farm killed with SIGKILL takes its builders (and, through them,
    // their builds) along instead of leaving them retrying a runner that is gone.
    drover_daemon::tied::spawn("unshare", |command| {
        command
            .args(test_support::private_store_arguments(&store))
            .arg(binary)
            .arg("--config")
            .arg(&config_path)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("HOME", &home)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
    })
    .map(ChildGuard::new)
    .map_err(DevFarmError::Builder)
}

async fn wait_until_joined(
    database: &test_support::TestDatabase,
    wanted: u32,
) -> Result<(), DevFarmError> {
    let client = database.connect().await;
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    loop {
        let joined: i64 = client
            .query_one("SELECT count(*) FROM machines WHERE connected", &[])
            .await
            .map_or(0, |row| row.get(0));
        if joined >= i64::from(wanted) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DevFarmError::NotReady { joined, wanted });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
