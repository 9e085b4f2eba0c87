//! `drover-builder`: reads its configuration and keeps a tunnel to the runner until SIGINT or
//! SIGTERM. A configuration error exits 78 (`EX_CONFIG`); a refusal by the runner, or no session
//! within the reconnect budget, prints the context chain and exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use drover_builder::config::Config;
use drover_builder::metrics::{self, BuilderMetrics};
use drover_builder::tunnel;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "The drover builder agent")]
struct Cli {
    /// The configuration file.
    #[arg(long, short, default_value = "/etc/drover/builder.toml")]
    config: PathBuf,
    /// Print a complete configuration file with every key at its default, documented, and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Overrides `[runner] url`.
    #[arg(long, env = "DROVER_RUNNER_URL", value_name = "URL")]
    runner_url: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", drover_builder::config::DEFAULT_CONFIG);
        return ExitCode::SUCCESS;
    }
    // The builder's filter comes from RUST_LOG only.
    let (_log_filter, traces) = drover_daemon::init_tracing("drover-builder");
    let load = |path: &std::path::Path| Config::load_overriding(path, cli.runner_url.as_deref());
    let config = match drover_daemon::load_config("drover-builder", &cli.config, load) {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    let shutdown = CancellationToken::new();
    let listener = match config.metrics_listen {
        None => None,
        Some(address) => match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => {
                tracing::info!(%address, "serving metrics");
                Some(listener)
            }
            Err(error) => {
                eprintln!("drover-builder: binding the metrics listener {address}: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let run = run(&config, &shutdown, listener);
    tokio::pin!(run);
    let result = tokio::select! {
        result = &mut run => result,
        signal = drover_daemon::termination() => {
            tracing::info!(signal, "shutting down: received {signal}");
            shutdown.cancel();
            run.await
        }
    };
    if let Some(traces) = traces {
        traces.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("drover-builder: {}", error.report());
            ExitCode::FAILURE
        }
    }
}

/// Keeps the tunnel, serving metrics on `listener` (if any) beside it; a metrics listener that
/// fails is logged, and the builder goes on building.
async fn run(
    config: &Config,
    shutdown: &CancellationToken,
    listener: Option<tokio::net::TcpListener>,
) -> Result<(), error_context::WithContext<tunnel::TunnelError>> {
    let metrics = BuilderMetrics::new(config.max_jobs);
    let tunnel = tunnel::run(config, shutdown, metrics.clone());
    let Some(listener) = listener else {
        return tunnel.await;
    };
    tokio::pin!(tunnel);
    tokio::select! {
        result = &mut tunnel => result,
        served = metrics::serve(listener, metrics, shutdown.clone()) => {
            if let Err(error) = served {
                tracing::error!(%error, "the metrics listener failed; building goes on");
            }
            tunnel.await
        }
    }
}
