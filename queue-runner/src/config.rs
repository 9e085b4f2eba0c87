//! The runner's configuration: a TOML file read into raw serde structs (every field documented,
//! every unknown key refused at once), then validated into [`Config`], reporting every problem at
//! once; [`Config::load`] also checks that every file it names can be read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use drover_daemon::ConfigError;
use drover_daemon::listen_address;
use drover_scheduler::RetryPolicy;
use drover_scheduler::fleet::QuarantinePolicy;
use serde::Deserialize;

use crate::cache::upstream::UpstreamConfig;
use crate::db::{DatabaseConfig, SslMode};

/// The file as written.
#[derive(Debug, Deserialize)]
struct RawConfig {
    database: RawDatabase,
    grpc: RawGrpc,
    tls: RawTls,
    logs: RawLogs,
    cache: RawCache,
    #[serde(default)]
    builders: RawBuilders,
    #[serde(default)]
    submissions: RawSubmissions,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    gc: RawGc,
    #[serde(default)]
    history: RawHistory,
    #[serde(default)]
    web: RawWeb,
}

/// The HTTP/JSON API and the status page (`docs/web.md`), on a TLS listener of their own.
#[derive(Debug, Default, Deserialize)]
struct RawWeb {
    /// Address the web listener binds; unset (the default): no web listener.
    listen: Option<String>,
    /// PEM certificate it presents: one browsers trust (the farm's CA is not one), its chain
    /// first to last.
    certificate: Option<PathBuf>,
    /// PEM private key of that certificate.
    key: Option<PathBuf>,
    /// Serve the status page and its events without a token. Default false.
    #[serde(default)]
    public_status: bool,
}

impl RawWeb {
    fn validate(&self, problems: &mut Vec<String>) -> Option<WebConfig> {
        let listen = self.listen.as_ref()?;
        let listen = listen_address("web", listen, "0.0.0.0:8443", problems);
        let (Some(certificate), Some(key)) = (&self.certificate, &self.key) else {
            problems.push(
                "web.listen is set without web.certificate and web.key: the web listener \
                 serves TLS with a certificate of its own"
                    .to_owned(),
            );
            return None;
        };
        Some(WebConfig {
            listen,
            certificate: certificate.clone(),
            key: key.clone(),
            public_status: self.public_status,
        })
    }
}

/// The web listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Its certificate file.
    pub certificate: PathBuf,
    /// Its key file.
    pub key: PathBuf,
    /// Whether the status page needs no token.
    pub public_status: bool,
}

/// How long the rows of finished builds stay in the database (`docs/operations.md`).
#[derive(Debug, Default, Deserialize)]
struct RawHistory {
    /// Delete the rows of builds finished more than this many days ago (with the steps,
    /// attempts, logs and derivations nothing else needs), at each collection
    /// (`gc.interval_secs`); builds the cache keeps by `gc` stay. 0: forever; else at least 2.
    /// Default 0.
    #[serde(default)]
    keep_days: u32,
}

impl RawHistory {
    fn validate(&self, collecting: bool, problems: &mut Vec<String>) {
        // A derivation stored again is marked so at most once a day: a day of history must
        // stay whatever happens.
        if self.keep_days == 1 {
            problems.push("history.keep_days = 1: need 0 (forever) or at least 2".to_owned());
        }
        if self.keep_days > 0 && !collecting {
            problems.push(
                "history.keep_days is set but gc.interval_secs = 0: no collection would prune it"
                    .to_owned(),
            );
        }
    }
}

/// Garbage collection of the binary cache (`docs/binary-cache.md`). What stays is the closure
/// of the outputs of the builds still wanted, and everything live builds need.
#[derive(Debug, Deserialize)]
struct RawGc {
    /// Sweep the cache on a schedule. Default true.
    #[serde(default = "default_true")]
    enabled: bool,
    /// Seconds between the end of one collection (a cache sweep, logs expired, history
    /// pruned: whichever are on) and the start of the next. Default 3600.
    #[serde(default = "default_gc_interval_secs")]
    interval_secs: u64,
    /// Keep the outputs of builds finished within this many days. Default 30.
    #[serde(default = "default_gc_keep_days")]
    keep_days: u32,
    /// A metadata key (a jobset, a branch) whose values each keep their newest `keep_per_key`
    /// succeeded builds, however old. Default none.
    #[serde(default)]
    key: Option<String>,
    /// How many builds per value of `key` stay. Default 3.
    #[serde(default = "default_gc_keep_per_key")]
    keep_per_key: u32,
    /// Paths published within this many seconds stay whatever the roots say. Default 3600.
    #[serde(default = "default_gc_grace_secs")]
    grace_secs: u64,
    /// Bound on the cache's NAR bytes: the oldest kept builds are dropped first to stay under
    /// it; live and pinned builds never are. 0: no bound. Default 0.
    #[serde(default)]
    max_bytes: u64,
}

impl Default for RawGc {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: default_gc_interval_secs(),
            keep_days: default_gc_keep_days(),
            key: None,
            keep_per_key: default_gc_keep_per_key(),
            grace_secs: default_gc_grace_secs(),
            max_bytes: 0,
        }
    }
}

const fn default_gc_interval_secs() -> u64 {
    3600
}
const fn default_gc_keep_days() -> u32 {
    30
}
const fn default_gc_keep_per_key() -> u32 {
    3
}
const fn default_gc_grace_secs() -> u64 {
    3600
}

/// How the binary cache is garbage-collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcPolicy {
    /// Whether the cache is swept on a schedule.
    pub sweep: bool,
    /// Time between collections (of the cache, logs and history, whichever are on); `None`
    /// (`interval_secs = 0`, allowed only with the sweep off): no collection at all.
    pub interval: Option<Duration>,
    /// Days a finished build's outputs stay.
    pub keep_days: u32,
    /// A metadata key whose values each keep their newest builds.
    pub key: Option<String>,
    /// How many per value of `key`.
    pub keep_per_key: u32,
    /// Paths published this recently stay.
    pub grace: Duration,
    /// The bound on NAR bytes.
    pub max_bytes: Option<u64>,
}

impl RawGc {
    fn policy(&self, problems: &mut Vec<String>) -> GcPolicy {
        if self.enabled && self.interval_secs == 0 {
            problems.push("gc.interval_secs = 0: need at least 1".to_owned());
        }
        if self.key.as_deref().is_some_and(str::is_empty) {
            problems.push("gc.key is empty: name a metadata key, or leave it out".to_owned());
        }
        GcPolicy {
            sweep: self.enabled,
            interval: (self.interval_secs > 0).then(|| Duration::from_secs(self.interval_secs)),
            keep_days: self.keep_days,
            key: self.key.clone(),
            keep_per_key: self.keep_per_key,
            grace: Duration::from_secs(self.grace_secs),
            max_bytes: (self.max_bytes > 0).then_some(self.max_bytes),
        }
    }
}

/// Prometheus metrics, on a listener of their own: they say what the farm builds and who
/// builds it, so they are not served on the public cache listener.
#[derive(Debug, Deserialize)]
struct RawMetrics {
    /// Serve `GET /metrics`. Default true.
    #[serde(default = "default_true")]
    enabled: bool,
    /// Address the metrics listener binds. Default `127.0.0.1:9298` (loopback: scrape it from
    /// this machine, or bind another address and restrict who reaches it).
    #[serde(default = "default_metrics_listen")]
    listen: String,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9298".to_owned()
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_metrics_listen(),
        }
    }
}

/// How a step whose attempt failed for a reason not its own (an input that could not be made
/// valid, a transfer cut, a Nix process that died) is retried. A builder lost mid-step is not
/// such a failure: its step goes back in line at once (`builders.max_builder_losses`).
#[derive(Debug, Deserialize)]
struct RawLogging {
    /// What the runner logs, in `RUST_LOG` syntax (`info`, `warn,drover_queue_runner=debug`).
    /// `RUST_LOG`, when set, wins. Reloaded on SIGHUP. Default `info`.
    #[serde(default = "default_log_filter")]
    filter: String,
}

fn default_log_filter() -> String {
    "info".to_owned()
}

impl Default for RawLogging {
    fn default() -> Self {
        Self {
            filter: default_log_filter(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRetry {
    /// Attempts a step may have that fail this way; the last one's failure is final and the step
    /// ends `cancelled` with the reason. Default 5.
    #[serde(default = "default_retry_max_attempts")]
    max_attempts: u32,
    /// Milliseconds before the first retry. Default 10000.
    #[serde(default = "default_retry_initial_interval_ms")]
    initial_interval_ms: u64,
    /// Each further delay is the previous one times this (at least 1). Default 2.
    #[serde(default = "default_retry_multiplier")]
    multiplier: f64,
    /// The longest delay, in milliseconds. Default 600000 (10 minutes).
    #[serde(default = "default_retry_max_interval_ms")]
    max_interval_ms: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            max_attempts: default_retry_max_attempts(),
            initial_interval_ms: default_retry_initial_interval_ms(),
            multiplier: default_retry_multiplier(),
            max_interval_ms: default_retry_max_interval_ms(),
        }
    }
}

const fn default_retry_max_attempts() -> u32 {
    5
}
const fn default_retry_initial_interval_ms() -> u64 {
    10_000
}
const fn default_retry_multiplier() -> f64 {
    2.0
}
const fn default_retry_max_interval_ms() -> u64 {
    600_000
}

#[derive(Debug, Deserialize)]
struct RawSubmissions {
    /// The largest derivation (`.drv` text) a submission may contain, in bytes: larger ones are
    /// refused at submit. At most half of the tunnel's message limit (32 MiB), since a build step
    /// carries its derivation to the builder. Default 8 MiB.
    #[serde(default = "default_max_derivation_bytes")]
    max_derivation_bytes: u64,
    /// The largest Submit request (derivations and input sources together), in bytes. Default
    /// 256 MiB.
    #[serde(default = "default_max_submission_bytes")]
    max_submission_bytes: u64,
    /// Refuse (`FAILED_PRECONDITION`) a submission needing a system or feature that no builder
    /// has ever offered. A farm no builder has joined yet accepts everything. Default true.
    #[serde(default = "default_true")]
    refuse_unknown_systems: bool,
}

const fn default_true() -> bool {
    true
}

impl Default for RawSubmissions {
    fn default() -> Self {
        Self {
            refuse_unknown_systems: true,
            max_derivation_bytes: default_max_derivation_bytes(),
            max_submission_bytes: default_max_submission_bytes(),
        }
    }
}

const fn default_max_derivation_bytes() -> u64 {
    8 * 1024 * 1024
}
const fn default_max_submission_bytes() -> u64 {
    256 * 1024 * 1024
}

#[derive(Debug, Deserialize)]
struct RawCache {
    /// Directory of the binary cache (Nix's file:// layout); created if missing.
    directory: PathBuf,
    /// Address the plain-HTTP cache listener binds, e.g. `0.0.0.0:7701`; port 0 picks one.
    listen: String,
    /// File with the ed25519 secret key narinfos are signed with, in Nix's format
    /// (`name:base64`), as `nix-store --generate-binary-cache-key` writes it.
    secret_key_file: PathBuf,
    /// Caches to consult before building: a step whose outputs one of them has (signed by its
    /// key) is not built. Default none.
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    /// Seconds an upstream's "not here" is believed before the path is asked for again (Nix's
    /// `narinfo-cache-negative-ttl`). Default 3600.
    #[serde(default = "default_upstream_negative_ttl_secs")]
    upstream_negative_ttl_secs: u64,
}

const fn default_upstream_negative_ttl_secs() -> u64 {
    3600
}

#[derive(Debug, Deserialize)]
struct RawUpstream {
    /// `https://host[/prefix]`, `http://…` or `file:///dir`.
    url: String,
    /// The key its narinfos are signed with, `name:base64`.
    public_key: String,
    /// A PEM file of CAs to trust for it, besides the system's. Default none.
    ca_certificate: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct RawDatabase {
    /// libpq-style connection string, e.g. `host=/run/postgresql dbname=drover user=drover`.
    url: String,
    /// Connections in the pool. Default 8.
    #[serde(default = "default_pool_size")]
    pool_size: usize,
    /// A file holding the password (keep it out of `url`, which may be world-readable).
    password_file: Option<PathBuf>,
    /// `disable` (default), `require` (encrypted, certificate unchecked) or `verify-full`
    /// (encrypted, certificate checked against `ssl_root_certificate` and the host name).
    #[serde(default)]
    ssl_mode: SslMode,
    /// PEM file of the CA that signed PostgreSQL's certificate.
    ssl_root_certificate: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct RawGrpc {
    /// Address the mTLS gRPC server binds, e.g. `0.0.0.0:7700`; port 0 picks a free port.
    listen: String,
    /// A Watch stream with nothing to say sends a heartbeat this often, in milliseconds, so
    /// proxies and load balancers keep it open. Default 15000.
    #[serde(default = "default_heartbeat_ms")]
    heartbeat_ms: u64,
}

const fn default_heartbeat_ms() -> u64 {
    15_000
}

#[derive(Debug, Deserialize)]
struct RawTls {
    /// PEM file of the CA that signs builder and client certificates.
    ca_certificate: PathBuf,
    /// PEM file of the runner's certificate.
    certificate: PathBuf,
    /// PEM file of the runner's private key.
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
struct RawLogs {
    /// Directory for zstd-compressed step logs; created if missing.
    directory: PathBuf,
    /// Largest log kept per attempt, in bytes; the rest is dropped and counted. Default 64 MiB.
    #[serde(default = "default_max_log_bytes")]
    max_bytes: u64,
    /// Days a step's log is kept after its attempt ended; older ones are deleted at each
    /// garbage collection (`gc.interval_secs`), and asking for one says it expired. 0: forever.
    /// Default 90.
    #[serde(default = "default_log_keep_days")]
    keep_days: u32,
}

const fn default_log_keep_days() -> u32 {
    90
}

#[derive(Debug, Deserialize)]
struct RawBuilders {
    /// How often builders ping, in seconds. Default 10.
    #[serde(default = "default_ping_interval_secs")]
    ping_interval_secs: u64,
    /// A builder silent for this many seconds is disconnected and its steps requeued. Default 30.
    #[serde(default = "default_liveness_timeout_secs")]
    liveness_timeout_secs: u64,
    /// Builder losses a step survives (its builder disconnected or went silent mid-step); one
    /// more ends the step `cancelled` with the reason. Default 5.
    #[serde(default = "default_max_builder_losses")]
    max_builder_losses: u32,
    /// A build running longer than this many seconds is stopped as timed out. Default 36000.
    #[serde(default = "default_step_timeout_secs")]
    step_timeout_secs: u64,
    /// A build printing nothing for this many seconds is stopped as timed out. Default 3600.
    #[serde(default = "default_max_silent_secs")]
    max_silent_secs: u64,
    /// A build whose output NAR is larger than this many bytes fails. Default 32 GiB.
    #[serde(default = "default_max_output_bytes")]
    max_output_bytes: u64,
    /// Runnable steps that no connected builder can take (system, features) wait this many
    /// seconds, then end `unsupported`. Long enough for a whole fleet to restart. Default 900.
    #[serde(default = "default_unsupported_grace_secs")]
    unsupported_grace_secs: u64,
    /// After a restart, attempts the previous runner process left running wait this many
    /// seconds (from the moment the queue is recovered) for their builders to reconnect and
    /// claim them; then their steps are requeued. Longer than the builders' longest reconnect
    /// delay. Default 120.
    #[serde(default = "default_readoption_grace_secs")]
    readoption_grace_secs: u64,
    /// Attempts of a builder whose connection failed (not one that went silent past the
    /// liveness timeout, was refused, or closed its tunnel) wait this many seconds for it to
    /// dial again and claim them, so a network blip does not build a step twice; then their
    /// steps are requeued. 0 requeues them at once. Default 10.
    #[serde(default = "default_rejoin_grace_secs")]
    rejoin_grace_secs: u64,
    /// Order runnable steps by their critical path in durations learned from earlier builds
    /// (`step_durations`); `false` orders them by the number of steps above them, as Hydra
    /// does. Durations are learned either way. Default true.
    #[serde(default = "default_learned_durations")]
    learned_durations: bool,
    /// A builder with this many infrastructure failures in a row is quarantined: it gets no
    /// work for `quarantine_cool_down_secs`, then one probation step whose success lifts the
    /// quarantine. 0 never quarantines. Default 3.
    #[serde(default = "default_quarantine_after_failures")]
    quarantine_after_failures: u32,
    /// How long a quarantined builder gets no work before its probation step. Default 600.
    #[serde(default = "default_quarantine_cool_down_secs")]
    quarantine_cool_down_secs: u64,
    /// A builder whose latest ping reports less free space in its Nix store than this gets no
    /// new work until a ping reports more (it finishes what it runs). 0: no floor. Default 10
    /// GiB: room for a large build's outputs and the NARs made of them.
    #[serde(default = "default_min_free_disk_bytes")]
    min_free_disk_bytes: u64,
    /// A builder whose latest ping reports more memory pressure than this (the share of the
    /// last 10 s some task stalled waiting for memory, the kernel's PSI, in percent) gets no
    /// new work until a ping reports less. 0: no limit. Default 60, systemd-oomd's default
    /// limit.
    #[serde(default = "default_max_memory_pressure_percent")]
    max_memory_pressure_percent: f64,
}

const fn default_max_memory_pressure_percent() -> f64 {
    60.0
}

const fn default_min_free_disk_bytes() -> u64 {
    10 << 30
}

const fn default_quarantine_after_failures() -> u32 {
    3
}

const fn default_quarantine_cool_down_secs() -> u64 {
    600
}

const fn default_learned_durations() -> bool {
    true
}

const fn default_rejoin_grace_secs() -> u64 {
    10
}

const fn default_unsupported_grace_secs() -> u64 {
    900
}

const fn default_readoption_grace_secs() -> u64 {
    120
}

impl RawBuilders {
    /// Notes each problem in `problems`.
    fn validate(&self, problems: &mut Vec<String>) {
        if self.ping_interval_secs == 0 {
            problems.push("builders.ping_interval_secs = 0: need at least 1".to_owned());
        }
        if self.liveness_timeout_secs <= self.ping_interval_secs {
            problems.push(format!(
                "builders.liveness_timeout_secs = {} must exceed builders.ping_interval_secs = {}",
                self.liveness_timeout_secs, self.ping_interval_secs
            ));
        }
        if !(0.0..=100.0).contains(&self.max_memory_pressure_percent) {
            problems.push(format!(
                "builders.max_memory_pressure_percent = {}: need a percentage from 0 (no limit) \
                 to 100",
                self.max_memory_pressure_percent
            ));
        }
    }

    fn quarantine(&self) -> QuarantinePolicy {
        QuarantinePolicy {
            after_failures: self.quarantine_after_failures,
            cool_down: Duration::from_secs(self.quarantine_cool_down_secs),
        }
    }
}

impl Default for RawBuilders {
    fn default() -> Self {
        Self {
            ping_interval_secs: default_ping_interval_secs(),
            liveness_timeout_secs: default_liveness_timeout_secs(),
            max_builder_losses: default_max_builder_losses(),
            step_timeout_secs: default_step_timeout_secs(),
            max_silent_secs: default_max_silent_secs(),
            max_output_bytes: default_max_output_bytes(),
            unsupported_grace_secs: default_unsupported_grace_secs(),
            readoption_grace_secs: default_readoption_grace_secs(),
            rejoin_grace_secs: default_rejoin_grace_secs(),
            learned_durations: default_learned_durations(),
            quarantine_after_failures: default_quarantine_after_failures(),
            quarantine_cool_down_secs: default_quarantine_cool_down_secs(),
            min_free_disk_bytes: default_min_free_disk_bytes(),
            max_memory_pressure_percent: default_max_memory_pressure_percent(),
        }
    }
}

const fn default_pool_size() -> usize {
    8
}
const fn default_max_log_bytes() -> u64 {
    64 * 1024 * 1024
}
const fn default_ping_interval_secs() -> u64 {
    10
}
const fn default_liveness_timeout_secs() -> u64 {
    30
}
const fn default_max_builder_losses() -> u32 {
    5
}
const fn default_step_timeout_secs() -> u64 {
    36_000
}
const fn default_max_silent_secs() -> u64 {
    3_600
}
const fn default_max_output_bytes() -> u64 {
    32 * 1024 * 1024 * 1024
}

/// A complete configuration file with every key at its default (and example values for the
/// keys that have none), each documented: what `--print-default-config` prints.
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/config/queue-runner.toml");

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// How PostgreSQL is reached.
    pub database: DatabaseConfig,
    /// Pool size.
    pub pool_size: usize,
    /// gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// How often an idle Watch stream sends a heartbeat.
    pub heartbeat: Duration,
    /// CA certificate file.
    pub ca_certificate: PathBuf,
    /// Runner certificate file.
    pub certificate: PathBuf,
    /// Runner key file.
    pub key: PathBuf,
    /// Log directory.
    pub log_directory: PathBuf,
    /// Log limit per attempt.
    pub max_log_bytes: u64,
    /// Days logs are kept (0: forever).
    pub log_keep_days: u32,
    /// Days the rows of finished builds are kept (0: forever).
    pub history_keep_days: u32,
    /// The web listener, if any.
    pub web: Option<WebConfig>,
    /// Binary cache directory.
    pub cache_directory: PathBuf,
    /// Binary cache HTTP listen address.
    pub cache_listen: SocketAddr,
    /// Binary cache signing key file.
    pub cache_secret_key_file: PathBuf,
    /// Upstream caches.
    pub upstreams: Vec<UpstreamConfig>,
    /// How long an upstream's miss is believed.
    pub upstream_negative_ttl: Duration,
    /// Builder ping interval.
    pub ping_interval: Duration,
    /// Builder liveness deadline.
    pub liveness_timeout: Duration,
    /// Builder losses a step survives.
    pub max_builder_losses: u32,
    /// Longest a build may run.
    pub step_timeout: Duration,
    /// Longest a build may be silent.
    pub max_silent: Duration,
    /// Largest output NAR.
    pub max_output_bytes: u64,
    /// How long steps wait for a builder that can run them.
    pub unsupported_grace: Duration,
    /// How long attempts left by a previous runner process wait for their builders.
    pub readoption_grace: Duration,
    /// How long the attempts of a builder whose connection failed wait for it.
    pub rejoin_grace: Duration,
    /// Whether runnable steps are ordered by learned durations.
    pub learned_durations: bool,
    /// When builders are quarantined.
    pub quarantine: QuarantinePolicy,
    /// The least free disk a builder gets new work with.
    pub min_free_disk_bytes: u64,
    /// The most memory pressure a builder gets new work under.
    pub max_memory_pressure_percent: f64,
    /// Largest derivation in a submission.
    pub max_derivation_bytes: usize,
    /// Largest Submit request.
    pub max_submission_bytes: usize,
    /// Whether submissions needing a system or feature no builder ever offered are refused.
    pub refuse_unknown_systems: bool,
    /// How infrastructure failures are retried.
    pub retry: RetryPolicy,
    /// What the runner logs (`RUST_LOG` syntax).
    pub log_filter: String,
    /// Where Prometheus metrics are served, if they are.
    pub metrics_listen: Option<SocketAddr>,
    /// Garbage collection of the cache.
    pub gc: GcPolicy,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config = Self::validate(drover_daemon::read_toml(path)?)?;
        config.check_files()?;
        Ok(config)
    }

    /// Checks that every file the configuration names can be read by this process, so a
    /// missing or unreadable one ends the start with `EX_CONFIG`, naming its key and path.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        // The CA file is read only to verify the server (verify-full).
        let root_certificate = self
            .database
            .ssl_root_certificate
            .clone()
            .filter(|_| self.database.ssl_mode == SslMode::VerifyFull);
        let optional = [
            (
                "database.password_file",
                self.database.password_file.clone(),
            ),
            ("database.ssl_root_certificate", root_certificate),
        ];
        let files: Vec<(&str, &Path)> = [
            ("tls.ca_certificate", &self.ca_certificate),
            ("tls.certificate", &self.certificate),
            ("tls.key", &self.key),
            ("cache.secret_key_file", &self.cache_secret_key_file),
        ]
        .into_iter()
        .map(|(key, path)| (key, path.as_path()))
        .chain(
            optional
                .iter()
                .filter_map(|(key, path)| Some((*key, path.as_deref()?))),
        )
        .collect();
        drover_daemon::check_readable(&files)
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::validate(drover_daemon::parse_toml(text, path)?)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let grpc_listen = listen_address("grpc", &raw.grpc.listen, "0.0.0.0:7700", &mut problems);
        let cache_listen =
            listen_address("cache", &raw.cache.listen, "0.0.0.0:7701", &mut problems);
        let metrics_listen = raw.metrics.enabled.then(|| {
            listen_address(
                "metrics",
                &raw.metrics.listen,
                "127.0.0.1:9298",
                &mut problems,
            )
        });
        let upstreams = validate_upstreams(&raw.cache.upstreams, &mut problems);
        if raw.database.url.trim().is_empty() {
            problems.push("database.url is empty".to_owned());
        }
        if let Err(problem) = drover_daemon::check_log_filter(&raw.logging.filter) {
            problems.push(format!(
                "logging.filter {:?}: {problem}",
                raw.logging.filter
            ));
        }
        if raw.database.ssl_mode == SslMode::VerifyFull
            && raw.database.ssl_root_certificate.is_none()
        {
            problems.push(
                "database.ssl_mode = \"verify-full\" needs database.ssl_root_certificate"
                    .to_owned(),
            );
        }
        if raw.database.pool_size == 0 {
            problems.push("database.pool_size = 0: need at least 1".to_owned());
        }
        if raw.grpc.heartbeat_ms == 0 {
            problems.push("grpc.heartbeat_ms = 0: need at least 1".to_owned());
        }
        raw.builders.validate(&mut problems);
        let (max_derivation_bytes, max_submission_bytes) =
            validate_submissions(&raw.submissions, &mut problems);
        let retry = validate_retry(&raw.retry, &mut problems);
        let gc = raw.gc.policy(&mut problems);
        raw.history.validate(gc.interval.is_some(), &mut problems);
        let web = raw.web.validate(&mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Self {
            database: DatabaseConfig {
                url: raw.database.url,
                password_file: raw.database.password_file,
                ssl_mode: raw.database.ssl_mode,
                ssl_root_certificate: raw.database.ssl_root_certificate,
            },
            pool_size: raw.database.pool_size,
            grpc_listen,
            heartbeat: Duration::from_millis(raw.grpc.heartbeat_ms),
            ca_certificate: raw.tls.ca_certificate,
            certificate: raw.tls.certificate,
            key: raw.tls.key,
            log_directory: raw.logs.directory,
            max_log_bytes: raw.logs.max_bytes,
            log_keep_days: raw.logs.keep_days,
            history_keep_days: raw.history.keep_days,
            web,
            cache_directory: raw.cache.directory,
            cache_listen,
            cache_secret_key_file: raw.cache.secret_key_file,
            upstreams,
            upstream_negative_ttl: Duration::from_secs(raw.cache.upstream_negative_ttl_secs),
            ping_interval: Duration::from_secs(raw.builders.ping_interval_secs),
            liveness_timeout: Duration::from_secs(raw.builders.liveness_timeout_secs),
            max_builder_losses: raw.builders.max_builder_losses,
            step_timeout: Duration::from_secs(raw.builders.step_timeout_secs),
            max_silent: Duration::from_secs(raw.builders.max_silent_secs),
            max_output_bytes: raw.builders.max_output_bytes,
            unsupported_grace: Duration::from_secs(raw.builders.unsupported_grace_secs),
            readoption_grace: Duration::from_secs(raw.builders.readoption_grace_secs),
            rejoin_grace: Duration::from_secs(raw.builders.rejoin_grace_secs),
            learned_durations: raw.builders.learned_durations,
            quarantine: raw.builders.quarantine(),
            min_free_disk_bytes: raw.builders.min_free_disk_bytes,
            max_memory_pressure_percent: raw.builders.max_memory_pressure_percent,
            max_derivation_bytes,
            max_submission_bytes,
            refuse_unknown_systems: raw.submissions.refuse_unknown_systems,
            retry,
            log_filter: raw.logging.filter,
            metrics_listen,
            gc,
        })
    }
}

/// The submission limits, each problem noted in `problems`.
fn validate_upstreams(
    upstreams: &[RawUpstream],
    problems: &mut Vec<String>,
) -> Vec<UpstreamConfig> {
    let mut valid = Vec::new();
    for (index, upstream) in upstreams.iter().enumerate() {
        let key = nix_primitives::PublicKey::parse(&upstream.public_key)
            .map_err(|error| format!("cache.upstreams[{index}].public_key: {error}"));
        let parsed = key.and_then(|key| {
            UpstreamConfig::new(&upstream.url, key, upstream.ca_certificate.clone())
                .map_err(|error| error.to_string())
        });
        match parsed {
            Ok(parsed) => valid.push(parsed),
            Err(problem) => problems.push(format!("cache.upstreams[{index}]: {problem}")),
        }
    }
    valid
}

fn validate_submissions(
    submissions: &RawSubmissions,
    problems: &mut Vec<String>,
) -> (usize, usize) {
    let derivation_ceiling = drover_proto::MAX_TUNNEL_MESSAGE_BYTES / 2;
    let max_derivation_bytes =
        usize::try_from(submissions.max_derivation_bytes).unwrap_or(usize::MAX);
    if max_derivation_bytes == 0 || max_derivation_bytes > derivation_ceiling {
        problems.push(format!(
            "submissions.max_derivation_bytes = {max_derivation_bytes} must be between 1 and \
             {derivation_ceiling} (half the builder tunnel's message limit)"
        ));
    }
    let max_submission_bytes =
        usize::try_from(submissions.max_submission_bytes).unwrap_or(usize::MAX);
    if max_submission_bytes < max_derivation_bytes {
        problems.push(format!(
            "submissions.max_submission_bytes = {max_submission_bytes} is below \
             submissions.max_derivation_bytes = {max_derivation_bytes}"
        ));
    }
    (max_derivation_bytes, max_submission_bytes)
}

/// The retry policy, each problem noted in `problems`.
fn validate_retry(retry: &RawRetry, problems: &mut Vec<String>) -> RetryPolicy {
    if retry.max_attempts == 0 {
        problems.push("retry.max_attempts = 0: need at least 1".to_owned());
    }
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        problems.push(format!(
            "retry.multiplier = {} must be a number of at least 1",
            retry.multiplier
        ));
    }
    if retry.initial_interval_ms > retry.max_interval_ms {
        problems.push(format!(
            "retry.initial_interval_ms = {} exceeds retry.max_interval_ms = {}",
            retry.initial_interval_ms, retry.max_interval_ms
        ));
    }
    RetryPolicy {
        max_attempts: retry.max_attempts,
        initial: Duration::from_millis(retry.initial_interval_ms),
        multiplier: retry.multiplier,
        max: Duration::from_millis(retry.max_interval_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` without the lines that set keys other than `kept` (`section.key`).
    fn keeping(text: &str, kept: &[&str]) -> String {
        let mut section = String::new();
        let mut lines = Vec::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(name) = trimmed
                .strip_prefix('[')
                .and_then(|rest| rest.strip_suffix(']'))
            {
                name.clone_into(&mut section);
            } else if let Some((key, _)) = trimmed.split_once('=')
                && !trimmed.starts_with('#')
                && !kept.contains(&format!("{section}.{}", key.trim()).as_str())
            {
                continue;
            }
            lines.push(line);
        }
        lines.join("\n")
    }

    #[test]
    fn the_printed_default_configuration_loads_and_holds_the_defaults() {
        let path = Path::new("queue-runner.toml");
        let printed = Config::parse(DEFAULT_CONFIG, path).unwrap();
        let required = [
            "database.url",
            "grpc.listen",
            "tls.ca_certificate",
            "tls.certificate",
            "tls.key",
            "logs.directory",
            "cache.directory",
            "cache.listen",
            "cache.secret_key_file",
        ];
        let defaults = Config::parse(&keeping(DEFAULT_CONFIG, &required), path).unwrap();
        assert_eq!(
            format!("{printed:?}"),
            format!("{defaults:?}"),
            "a value in the printed configuration is not the default"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [database]
            url = ""
            pool_size = 0
            [grpc]
            listen = "nowhere"
            [tls]
            ca_certificate = "ca.pem"
            certificate = "r.pem"
            key = "r.key"
            [logs]
            directory = "logs"
            [cache]
            directory = "cache"
            listen = "127.0.0.1:0"
            secret_key_file = "key"
            [builders]
            ping_interval_secs = 10
            liveness_timeout_secs = 5
            max_memory_pressure_percent = 150.0
            [submissions]
            max_derivation_bytes = 1073741824
            max_submission_bytes = 1024
            [retry]
            max_attempts = 0
            multiplier = 0.5
        "#;
        let Err(ConfigError::Invalid(problems)) = Config::parse(text, Path::new("t.toml")) else {
            panic!("invalid config accepted");
        };
        assert_eq!(problems.len(), 9, "{problems:?}");
        for key in [
            "submissions.max_derivation_bytes",
            "builders.max_memory_pressure_percent",
        ] {
            assert!(
                problems.iter().any(|problem| problem.starts_with(key)),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn every_unknown_key_is_reported_at_once() {
        let text = DEFAULT_CONFIG
            .replace("pool_size = 8", "pool_size = 8\nbogus = 1")
            .replace("heartbeat_ms =", "heartbeat_millis =")
            .replace("max_attempts = 5", "max_attempt = 5");
        let Err(ConfigError::UnknownKeys(keys)) = Config::parse(&text, Path::new("t.toml")) else {
            panic!("unknown keys accepted");
        };
        assert_eq!(
            keys,
            [
                "database.bogus",
                "grpc.heartbeat_millis",
                "retry.max_attempt"
            ]
        );
    }

    #[test]
    fn every_file_the_configuration_names_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("present.pem");
        fs_err::write(&present, "").unwrap();
        let text = DEFAULT_CONFIG
            .replace("/etc/drover/ca.pem", &present.display().to_string())
            .replace("# password_file", "password_file");
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        let Err(ConfigError::Invalid(problems)) = config.check_files() else {
            panic!("missing files accepted");
        };
        let keys: Vec<&str> = problems
            .iter()
            .filter_map(|problem| problem.split(" = ").next())
            .collect();
        assert_eq!(
            keys,
            [
                "tls.certificate",
                "tls.key",
                "cache.secret_key_file",
                "database.password_file"
            ],
            "{problems:?}"
        );
        assert!(
            problems[0].contains("/etc/drover/runner-main.pem")
                && problems[0].contains("No such file"),
            "{problems:?}"
        );
    }
}
