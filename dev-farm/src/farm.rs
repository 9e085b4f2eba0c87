//! The dev farm: a whole farm on this machine for trying drover: an ephemeral PostgreSQL, a
//! CA with certificates, the runner, and N builders with the Nix executor, each in its own mount
//! namespace with an empty private `/nix` (so they behave like separate machines). Prints how to
//! point the CLI and stock Nix at it, writes the same as shell exports to `DIR/env`, and removes
//! everything again when interrupted.
//!
//! Private stores need root (`mount --bind` over `/nix` in a new mount namespace).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Args;
use drover_queue_runner::app;
use drover_queue_runner::config::Config;
use drover_tls::Role;
use error_context::{Classify, ResultExt as _, Severity, WithContext};
use test_support::farm::{BuilderExecutor, BuilderToml, FarmError, FarmFiles, nix_environment};
use test_support::{ChildGuard, TestPostgres};
use tokio_util::sync::CancellationToken;

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
    /// Port of the web listener: the HTTP/JSON API and the status page, public on this
    /// machine's loopback (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    web_port: u16,
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
    /// Certificates, the cache's key or the configuration files could not be made.
    #[error("making the farm's certificates and configuration")]
    Farm(#[from] FarmError),
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
    let files = certificates(&dir, args.builders).context("issuing the farm's certificates")?;
    let config = runner_config(&files, &database.connection_string, &args)?;

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
            &files,
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
    if let Some(metrics) = runner.metrics_address {
        println!("  metrics:            http://{metrics}/metrics");
    }
    if let Some(web) = runner.web_address {
        println!(
            "  status page:        https://localhost:{}/ (signed by the farm's CA, {dir}/ca.pem)",
            web.port(),
            dir = dir.display()
        );
    }
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

/// A CA, the runner's certificate and the cache's key, one certificate per builder, and a
/// client certificate `client/dev`.
fn certificates(dir: &Path, builders: u32) -> Result<FarmFiles, DevFarmError> {
    // A directory of an earlier run keeps its CA, so clients pointed at it stay valid.
    let files = FarmFiles::open_or_create(dir, "dev")?;
    files.issue(Role::Client, "dev")?;
    for index in 1..=builders {
        files.issue(Role::Builder, &format!("b{index}"))?;
    }
    Ok(files)
}

fn runner_config(
    files: &FarmFiles,
    database: &str,
    args: &DevFarmArgs,
) -> Result<Config, DevFarmError> {
    let file = |name: &str| files.path(name).display().to_string();
    let text = files
        .runner_config(database, args.grpc_port, args.cache_port)
        .set("web.listen", format!("127.0.0.1:{}", args.web_port))
        .set("web.certificate", file("runner-dev.pem"))
        .set("web.key", file("runner-dev.key"))
        .set("web.public_status", true)
        .to_toml();
    let path = files.path("queue-runner.toml");
    write(&path, &text)?;
    Config::parse(&text, &path)
        .map_err(|error| DevFarmError::Runner(error_context::report(&error).to_string()))
}

/// Starts builder `b<index>` in its own mount namespace with `DIR/stores/b<index>` as `/nix`.
fn start_builder(
    files: &FarmFiles,
    index: u32,
    args: &DevFarmArgs,
    grpc_port: u16,
    cache_url: &str,
    public_key: &str,
) -> Result<ChildGuard, DevFarmError> {
    let name = format!("b{index}");
    let dir = files.dir();
    let store = dir.join("stores").join(&name);
    let home = dir.join("homes").join(&name);
    fs_err::create_dir_all(&store).map_err(DevFarmError::Files)?;
    fs_err::create_dir_all(&home).map_err(DevFarmError::Files)?;
    let config = files.builder_toml(&BuilderToml {
        executor: BuilderExecutor::Nix {
            cache_url: cache_url.to_owned(),
            trusted_public_keys: vec![public_key],
            upstream_substituters: Vec::new(),
            store: "local",
        },
        ..BuilderToml::new(&name, grpc_port, args.max_jobs)
    })?;
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
        nix_environment(command, &home);
        command
            .args(test_support::private_store_arguments(&store))
            .arg(binary)
            .arg("--config")
            .arg(&config_path)
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
