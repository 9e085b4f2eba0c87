//! SIGHUP: the runner reads its configuration file again and applies what can change while it
//! runs: the scheduler's limits (builder losses, the retry policy, the unsupported and
//! re-adoption grace periods), the limits every step is sent with (time, silence, output size),
//! the log filter, and the TLS certificate, key and CA (for new connections). Everything else is
//! read once at start (listeners, the database, the cache, submission limits, the runner's own
//! log cap): a change to it is named in the log as waiting for a restart. A file that does not
//! load is logged and the running configuration kept.

use std::path::PathBuf;

use drover_daemon::LogFilter;
use drover_proto::v1::BuildLimits;
use drover_scheduler::CoreLimits;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::grpc::tls::ServerTls;
use crate::scheduler::driver::SessionEvent;

/// What the command line overrides in the file, applied again to every reload.
pub type Overrides = Box<dyn Fn(&mut Config) + Send + Sync>;

/// Where the configuration comes from: the file, and what the command line overrides in it.
pub struct ConfigSource {
    /// The file.
    pub path: PathBuf,
    /// Applied to every load of it.
    pub overrides: Overrides,
}

/// Reloads the configuration on request.
pub struct Reloader {
    path: PathBuf,
    /// The configuration the runner started with: what runs of the keys read only at start.
    started: Config,
    overrides: Overrides,
    scheduler: mpsc::Sender<SessionEvent>,
    log_filter: LogFilter,
    tls: Vec<ServerTls>,
}

/// The scheduler core's limits in a configuration.
#[must_use]
pub fn core_limits(config: &Config) -> CoreLimits {
    CoreLimits {
        max_builder_losses: config.max_builder_losses,
        retry: config.retry,
        unsupported_grace: config.unsupported_grace,
        readoption_grace: config.readoption_grace,
        rejoin_grace: config.rejoin_grace,
        learned_durations: config.learned_durations,
        quarantine: config.quarantine,
        min_free_disk_bytes: config.min_free_disk_bytes,
        max_memory_pressure_percent: config.max_memory_pressure_percent,
    }
}

/// The limits every step is sent with, in a configuration.
#[must_use]
pub fn build_limits(config: &Config) -> BuildLimits {
    let millis =
        |duration: std::time::Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    BuildLimits {
        timeout_ms: millis(config.step_timeout),
        max_silent_ms: millis(config.max_silent),
        max_log_bytes: config.max_log_bytes,
        max_output_bytes: config.max_output_bytes,
    }
}

impl Reloader {
    /// A reloader of the file `source` names, from which `started` was loaded (with its
    /// overrides applied), telling `scheduler`, `log_filter` and the listeners' `tls` (gRPC's,
    /// and the web listener's if there is one).
    #[must_use]
    pub fn new(
        source: ConfigSource,
        started: Config,
        scheduler: mpsc::Sender<SessionEvent>,
        log_filter: LogFilter,
        tls: Vec<ServerTls>,
    ) -> Self {
        Self {
            path: source.path,
            started,
            overrides: source.overrides,
            scheduler,
            log_filter,
            tls,
        }
    }

    /// Reads the file again and applies what can change without a restart.
    pub async fn reload(&mut self) {
        let mut new = match Config::load(&self.path) {
            Ok(new) => new,
            Err(error) => {
                tracing::error!(path = %self.path.display(), error = %error_context::report(&error), "SIGHUP: the configuration file cannot be used; keeping the running configuration");
                return;
            }
        };
        (self.overrides)(&mut new);
        // Compared with what runs, not with the last file read: a key changed twice still
        // waits for a restart, and one changed back no longer does.
        let waiting = needs_restart(&self.started, &new);
        // The runner's own log cap is part of its log store: keep what runs, for builders too.
        new.max_log_bytes = self.started.max_log_bytes;
        let reconfigure = SessionEvent::Reconfigure {
            limits: core_limits(&new),
            build_limits: build_limits(&new),
        };
        if self.scheduler.send(reconfigure).await.is_err() {
            return;
        }
        // Read again even if the paths are the same: renewed files replace the old ones.
        for tls in &self.tls {
            match tls.reload(&new) {
                Ok(()) => {
                    tracing::info!(listener = ?tls.side(), "SIGHUP: certificates and key reloaded for new connections");
                }
                Err(error) => {
                    tracing::error!(listener = ?tls.side(), error = %error_context::report(&error), "SIGHUP: keeping the running certificates");
                }
            }
        }
        match self.log_filter.set(&new.log_filter) {
            Ok(true) => tracing::info!(filter = %new.log_filter, "SIGHUP: log filter changed"),
            Ok(false) => {}
            Err(problem) => tracing::error!(%problem, "SIGHUP: keeping the log filter"),
        }
        for key in &waiting {
            tracing::warn!(
                key,
                "SIGHUP: changed in the file, takes effect after a restart"
            );
        }
        tracing::info!(path = %self.path.display(), "SIGHUP: configuration reloaded");
    }
}

/// The keys whose values differ between `old` and `new` and are read only at start.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    [
        ("database", differs(&old.database, &new.database)),
        (
            "database.pool_size",
            differs(&old.pool_size, &new.pool_size),
        ),
        ("grpc.listen", differs(&old.grpc_listen, &new.grpc_listen)),
        ("grpc.heartbeat_ms", differs(&old.heartbeat, &new.heartbeat)),
        (
            "logs.directory",
            differs(&old.log_directory, &new.log_directory),
        ),
        (
            "logs.max_bytes",
            differs(&old.max_log_bytes, &new.max_log_bytes),
        ),
        (
            "cache",
            differs(
                &(
                    &old.cache_directory,
                    &old.cache_listen,
                    &old.cache_secret_key_file,
                ),
                &(
                    &new.cache_directory,
                    &new.cache_listen,
                    &new.cache_secret_key_file,
                ),
            ),
        ),
        ("cache.upstreams", differs(&old.upstreams, &new.upstreams)),
        ("metrics", differs(&old.metrics_listen, &new.metrics_listen)),
        ("gc", differs(&old.gc, &new.gc)),
        (
            "logs.keep_days",
            differs(&old.log_keep_days, &new.log_keep_days),
        ),
        (
            "history.keep_days",
            differs(&old.history_keep_days, &new.history_keep_days),
        ),
        (
            "web",
            differs(
                &old.web.as_ref().map(|web| (web.listen, web.public_status)),
                &new.web.as_ref().map(|web| (web.listen, web.public_status)),
            ),
        ),
        (
            "builders.ping_interval_secs",
            differs(&old.ping_interval, &new.ping_interval),
        ),
        (
            "builders.liveness_timeout_secs",
            differs(&old.liveness_timeout, &new.liveness_timeout),
        ),
        (
            "submissions",
            differs(
                &(
                    old.max_derivation_bytes,
                    old.max_submission_bytes,
                    old.refuse_unknown_systems,
                ),
                &(
                    new.max_derivation_bytes,
                    new.max_submission_bytes,
                    new.refuse_unknown_systems,
                ),
            ),
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}
