//! `drover-queue-runner`: reads its configuration, then runs the runner until SIGINT or SIGTERM
//! (or migrates the database and exits). A configuration error exits 78 (`EX_CONFIG`, which the
//! systemd unit does not restart on); a fatal error prints its whole context chain and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover_queue_runner::app::{self, RunnerError};
use drover_queue_runner::cache::gc::{self, Timing};
use drover_queue_runner::cache::marks::Noted;
use drover_queue_runner::config::Config;
use drover_queue_runner::reload::{ConfigSource, Overrides};
use drover_queue_runner::{db, sweeper};
use error_context::WithContext;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "The drover queue runner")]
struct Cli {
    /// The configuration file.
    #[arg(long, short, default_value = "/etc/drover/queue-runner.toml")]
    config: PathBuf,
    /// Print a complete configuration file with every key at its default, documented, and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Overrides `[grpc] listen` (what differs between machines of one configuration).
    #[arg(long, env = "DROVER_GRPC_LISTEN", value_name = "ADDRESS:PORT")]
    grpc_listen: Option<std::net::SocketAddr>,
    /// Overrides `[cache] listen`.
    #[arg(long, env = "DROVER_CACHE_LISTEN", value_name = "ADDRESS:PORT")]
    cache_listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the queue runner (the default).
    Run,
    /// Apply database migrations and exit.
    Migrate,
    /// Print what the next garbage collection of the cache would delete, and why.
    ///
    /// Sweeps run inside the runner every `gc.interval_secs`; this command deletes nothing. One
    /// path a line: path, NAR bytes, reason (tab-separated), then a summary line starting `#`.
    Gc {
        /// Print what would go; required (deleting is the running runner's job).
        #[arg(long, required = true)]
        dry_run: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", drover_queue_runner::config::DEFAULT_CONFIG);
        return ExitCode::SUCCESS;
    }
    let (log_filter, traces) = drover_daemon::init_tracing("drover-queue-runner");
    let mut config =
        match drover_daemon::load_config("drover-queue-runner", &cli.config, Config::load) {
            Ok(config) => config,
            Err(exit) => return exit,
        };
    let (grpc_listen, cache_listen) = (cli.grpc_listen, cli.cache_listen);
    let overrides: Overrides = Box::new(move |config: &mut Config| {
        config.grpc_listen = grpc_listen.unwrap_or(config.grpc_listen);
        config.cache_listen = cache_listen.unwrap_or(config.cache_listen);
    });
    overrides(&mut config);
    if let Err(problem) = log_filter.set(&config.log_filter) {
        tracing::error!(%problem, "keeping the log filter");
    }
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => migrate(&config).await,
        Command::Gc { .. } => gc_dry_run(&config).await,
        Command::Run => {
            let source = ConfigSource {
                path: cli.config,
                overrides,
            };
            run(config, source, log_filter).await
        }
    };
    if let Some(traces) = traces {
        traces.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("drover-queue-runner: {}", error.report());
            // A file that cannot be used is the configuration's fault: systemd must not restart
            // the runner into the same failure every few seconds.
            if error.root().is_configuration() {
                ExitCode::from(drover_daemon::EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn migrate(config: &Config) -> Result<(), WithContext<RunnerError>> {
    let pool = db::Connector::new(&config.database)
        .map_err(RunnerError::Connector)?
        .pool(1)
        .map_err(|error| RunnerError::Database(error.into()))?;
    let applied = db::migrate(&pool).await.map_err(|error| {
        RunnerError::Database(WithContext::from(error).context("migrating the schema"))
    })?;
    println!("applied migrations: {applied:?}");
    Ok(())
}

async fn gc_dry_run(config: &Config) -> Result<(), WithContext<RunnerError>> {
    let pool = db::Connector::new(&config.database)
        .map_err(RunnerError::Connector)?
        .pool(1)
        .map_err(|error| RunnerError::Database(error.into()))?;
    let (listed, roots) = sweeper::listing(&pool, config.cache_directory.clone(), &config.gc)
        .await
        .map_err(RunnerError::Sweep)?;
    let timing = Timing {
        started: std::time::SystemTime::now(),
        grace: config.gc.grace,
        max_bytes: config.gc.max_bytes,
    };
    // What the runner looked up since its last sweep is not known here: a dry run may list a
    // path the sweep will keep for that reason.
    let used = Noted::default();
    let unbounded = gc::plan(
        listed.clone(),
        &roots,
        &used,
        &Timing {
            max_bytes: None,
            ..timing
        },
    );
    let bounded = gc::plan(listed, &roots, &used, &timing);
    sweeper::write_dry_run(&bounded, &unbounded, &mut std::io::stdout().lock())
        .map_err(RunnerError::Output)?;
    Ok(())
}

async fn run(
    config: Config,
    file: ConfigSource,
    log_filter: drover_daemon::LogFilter,
) -> Result<(), WithContext<RunnerError>> {
    let shutdown = CancellationToken::new();
    let runner = app::start(config.clone(), shutdown.clone()).await?;
    let mut reloader = runner.reloader(file, config, log_filter);
    let signals = shutdown.clone();
    let waiting = runner.wait();
    tokio::pin!(waiting);
    let mut hangups = drover_daemon::hangups();
    loop {
        tokio::select! {
            result = &mut waiting => return result,
            signal = drover_daemon::termination() => {
                tracing::info!(signal, "shutting down: received {signal}");
                signals.cancel();
                break;
            }
            () = drover_daemon::hangup(&mut hangups) => reloader.reload().await,
        }
    }
    let result = waiting.await;
    tracing::info!("queue runner stopped");
    result
}
