//! The builder's configuration: a TOML file (every unknown key refused at once, every field
//! documented) validated into [`Config`], with every problem reported at once; loading it also
//! checks that its TLS files can be read.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use drover_daemon::ConfigError;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct RawConfig {
    runner: RawRunner,
    tls: RawTls,
    builder: RawBuilder,
    #[serde(default)]
    executor: RawExecutor,
    #[serde(default)]
    reconnect: RawReconnect,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Debug, Deserialize)]
struct RawMetrics {
    /// Serve Prometheus metrics at `http://LISTEN/metrics`. Default false.
    #[serde(default)]
    enabled: bool,
    /// Where, when enabled. Default `127.0.0.1:9299` (loopback: scrape it on the machine, or
    /// choose an address your Prometheus reaches).
    #[serde(default = "default_metrics_listen")]
    listen: String,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9299".to_owned()
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_metrics_listen(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRunner {
    /// The runner's gRPC endpoint, `https://host:port`.
    url: String,
    /// The name the runner's certificate must carry. Default: the URL's host.
    domain: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawTls {
    /// PEM file of the CA that signed the runner's certificate.
    ca_certificate: PathBuf,
    /// PEM file of this builder's certificate (role builder).
    certificate: PathBuf,
    /// PEM file of this builder's private key.
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
struct RawBuilder {
    /// Systems this builder builds for: its own plus extra platforms.
    systems: Vec<String>,
    /// Features it offers (`kvm`, `big-parallel`, ...).
    #[serde(default)]
    supported_features: Vec<String>,
    /// Features a step must require to be sent here.
    #[serde(default)]
    mandatory_features: Vec<String>,
    /// Steps run at once. Default 1.
    #[serde(default = "default_max_jobs")]
    max_jobs: u32,
    /// Relative speed; faster builders are preferred. Default 1.0.
    #[serde(default = "default_speed_factor")]
    speed_factor: f64,
    /// On SIGTERM the builder drains: it takes no new steps and lets running ones finish for at
    /// most this many seconds, then stops what is left and hands it back to the runner (which
    /// requeues it without counting a loss), and exits 0. Default 300.
    #[serde(default = "default_drain_deadline_secs")]
    drain_deadline_secs: u64,
    /// A directory of the builder's own (systemd's `StateDirectory=`): the scratch space of its
    /// Nix processes lives under it and is emptied at start, so a builder killed with SIGKILL
    /// leaves nothing behind for long. Default `/var/lib/drover-builder`.
    #[serde(default = "default_state_directory")]
    state_directory: PathBuf,
}

fn default_state_directory() -> PathBuf {
    PathBuf::from("/var/lib/drover-builder")
}

const fn default_drain_deadline_secs() -> u64 {
    300
}

/// The `[executor]` table: one struct for every kind, so that unknown keys are reported with the
/// file's others; which keys a kind takes is checked in [`Config::validate`].
#[derive(Debug, Default, Deserialize)]
struct RawExecutor {
    /// `noop` (the default when the table is absent) or `nix`.
    #[serde(default)]
    kind: ExecutorKind,
    /// noop: milliseconds each step takes. Default 0. A derivation whose environment sets
    /// `DROVER_NOOP_FAIL` fails, with that value in its log.
    build_ms: Option<u64>,
    /// nix: the farm's binary cache, e.g. `http://runner.example.org:7701`.
    cache_url: Option<String>,
    /// nix: keys Nix trusts for substitution: the farm's cache key and those of the upstreams.
    trusted_public_keys: Option<Vec<String>>,
    /// nix: further caches to substitute inputs from, after the farm's. Default none.
    upstream_substituters: Option<Vec<String>>,
    /// nix: which store steps build in. Default `daemon`.
    store: Option<NixStore>,
}

/// Which executor runs steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ExecutorKind {
    /// Builds nothing: waits `build_ms` and reports each output as a one-file NAR. For tests and
    /// benchmarks of the control plane.
    #[default]
    Noop,
    /// Builds with the local Nix (`nix-store` on PATH, configured by the environment, e.g.
    /// `NIX_CONFIG`).
    Nix,
}

/// Which Nix store the Nix executor builds in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NixStore {
    /// Through the local nix-daemon: builds run in the daemon's sandbox, outside the builder's
    /// own service and its restrictions (which break Nix's sandbox: a read-only `/proc/sys`
    /// forbids the sandbox's `/proc`). What a multi-user Nix, NixOS's, runs.
    #[default]
    Daemon,
    /// The store opened directly (single-user Nix, as root): builds run inside the builder's
    /// own process tree and inherit its restrictions.
    Local,
}

impl NixStore {
    /// The value of Nix's `--store` option.
    #[must_use]
    pub const fn uri(self) -> &'static str {
        match self {
            Self::Daemon => "daemon",
            Self::Local => "local",
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawReconnect {
    /// First delay before reconnecting, in milliseconds; each delay is lengthened by a random
    /// part of up to its own length, so a fleet does not reconnect in lockstep. Default 200.
    #[serde(default = "default_initial_ms")]
    initial_ms: u64,
    /// Longest delay between attempts before its random part, in milliseconds. Default 10000.
    #[serde(default = "default_max_ms")]
    max_ms: u64,
    /// Seconds without reaching the runner after which the builder exits non-zero. Default 300.
    #[serde(default = "default_budget_secs")]
    budget_secs: u64,
}

impl Default for RawReconnect {
    fn default() -> Self {
        Self {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            budget_secs: default_budget_secs(),
        }
    }
}

const fn default_max_jobs() -> u32 {
    1
}
const fn default_speed_factor() -> f64 {
    1.0
}
const fn default_initial_ms() -> u64 {
    200
}
const fn default_max_ms() -> u64 {
    10_000
}
const fn default_budget_secs() -> u64 {
    300
}

/// Which executor runs steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorConfig {
    /// The noop executor.
    Noop {
        /// How long each step takes.
        build_time: Duration,
    },
    /// The Nix executor.
    Nix(NixConfig),
}

/// How the Nix executor reaches Nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixConfig {
    /// Substituters, the farm's cache first.
    pub substituters: Vec<String>,
    /// Trusted public keys.
    pub trusted_public_keys: Vec<String>,
    /// The store steps build in.
    pub store: NixStore,
    /// Where each Nix process gets a scratch directory of its own; emptied at start.
    pub scratch: PathBuf,
}

/// The executor `raw` describes, or every key that does not belong to its kind and every one it
/// lacks.
fn executor(raw: RawExecutor, state_directory: &Path) -> Result<ExecutorConfig, Vec<String>> {
    let mut problems = Vec::new();
    let mut foreign = |key: &str, present: bool, kind: &str| {
        if present {
            problems.push(format!("executor.{key} is for kind = \"{kind}\""));
        }
    };
    let executor = match raw.kind {
        ExecutorKind::Noop => {
            foreign("cache_url", raw.cache_url.is_some(), "nix");
            foreign(
                "trusted_public_keys",
                raw.trusted_public_keys.is_some(),
                "nix",
            );
            foreign(
                "upstream_substituters",
                raw.upstream_substituters.is_some(),
                "nix",
            );
            foreign("store", raw.store.is_some(), "nix");
            ExecutorConfig::Noop {
                build_time: Duration::from_millis(raw.build_ms.unwrap_or(0)),
            }
        }
        ExecutorKind::Nix => {
            foreign("build_ms", raw.build_ms.is_some(), "noop");
            let (Some(cache_url), Some(trusted_public_keys)) =
                (raw.cache_url, raw.trusted_public_keys)
            else {
                problems.push(
                    "executor.kind = \"nix\" needs executor.cache_url and \
                     executor.trusted_public_keys"
                        .to_owned(),
                );
                return Err(problems);
            };
            ExecutorConfig::Nix(NixConfig {
                substituters: std::iter::once(cache_url)
                    .chain(raw.upstream_substituters.unwrap_or_default())
                    .collect(),
                trusted_public_keys,
                store: raw.store.unwrap_or_default(),
                scratch: state_directory.join("nix-scratch"),
            })
        }
    };
    if problems.is_empty() {
        Ok(executor)
    } else {
        Err(problems)
    }
}

/// How the builder retries reaching the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// First delay.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Time without a successful Join after which the builder gives up.
    pub budget: Duration,
}

/// A complete configuration file with every key at its default (and example values for the
/// keys that have none), each documented: what `--print-default-config` prints.
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/config/builder.toml");

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Runner endpoint.
    pub runner_url: String,
    /// Name the runner's certificate must carry.
    pub runner_domain: String,
    /// CA file.
    pub ca_certificate: PathBuf,
    /// Certificate file.
    pub certificate: PathBuf,
    /// Key file.
    pub key: PathBuf,
    /// Systems.
    pub systems: Vec<String>,
    /// Supported features.
    pub supported_features: Vec<String>,
    /// Mandatory features.
    pub mandatory_features: Vec<String>,
    /// Max jobs.
    pub max_jobs: u32,
    /// Speed factor.
    pub speed_factor: f64,
    /// How long a drain lets running steps finish.
    pub drain_deadline: Duration,
    /// Executor.
    pub executor: ExecutorConfig,
    /// Reconnect policy.
    pub reconnect: ReconnectPolicy,
    /// Where Prometheus metrics are served, if they are.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_overriding(path, None)
    }

    /// Reads a configuration file, replaces `[runner] url` with `runner_url` if given (what
    /// differs between machines of one configuration), and validates it.
    pub fn load_overriding(path: &Path, runner_url: Option<&str>) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = drover_daemon::read_toml(path)?;
        if let Some(url) = runner_url {
            url.clone_into(&mut raw.runner.url);
        }
        let config = Self::validate(raw)?;
        config.check_files()?;
        Ok(config)
    }

    /// Checks that the TLS files can be read by this process: a missing CA, certificate or key
    /// ends the start with `EX_CONFIG`, naming its key and path.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        drover_daemon::check_readable(&[
            ("tls.ca_certificate", &self.ca_certificate),
            ("tls.certificate", &self.certificate),
            ("tls.key", &self.key),
        ])
    }

    /// Parses and validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::validate(drover_daemon::parse_toml(text, path)?)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let host = raw
            .runner
            .url
            .strip_prefix("https://")
            .and_then(|rest| rest.split([':', '/']).next())
            .filter(|host| !host.is_empty());
        if host.is_none() {
            problems.push(format!(
                "runner.url = {:?} must look like https://host:port",
                raw.runner.url
            ));
        }
        if raw.builder.systems.is_empty() {
            problems.push("builder.systems is empty".to_owned());
        }
        let state = &raw.builder.state_directory;
        if !state.is_absolute() || state.parent().is_none() {
            problems.push(format!(
                "builder.state_directory = {} must be an absolute path below /",
                state.display()
            ));
        }
        if raw.builder.max_jobs == 0 {
            problems.push("builder.max_jobs = 0: need at least 1".to_owned());
        }
        if !(raw.builder.speed_factor.is_finite() && raw.builder.speed_factor > 0.0) {
            problems.push(format!(
                "builder.speed_factor = {} must be positive",
                raw.builder.speed_factor
            ));
        }
        if raw.reconnect.initial_ms == 0 || raw.reconnect.max_ms < raw.reconnect.initial_ms {
            problems.push("reconnect: need 0 < initial_ms <= max_ms".to_owned());
        }
        let metrics_listen = raw.metrics.enabled.then(|| {
            drover_daemon::listen_address(
                "metrics",
                &raw.metrics.listen,
                "127.0.0.1:9299",
                &mut problems,
            )
        });
        let executor = executor(raw.executor, &raw.builder.state_directory)
            .map_err(|found| problems.extend(found));
        let (Ok(executor), true) = (executor, problems.is_empty()) else {
            return Err(ConfigError::Invalid(problems));
        };
        let runner_domain = raw
            .runner
            .domain
            .unwrap_or_else(|| host.unwrap_or_default().to_owned());
        Ok(Self {
            runner_url: raw.runner.url,
            runner_domain,
            ca_certificate: raw.tls.ca_certificate,
            certificate: raw.tls.certificate,
            key: raw.tls.key,
            systems: raw.builder.systems,
            supported_features: raw.builder.supported_features,
            mandatory_features: raw.builder.mandatory_features,
            max_jobs: raw.builder.max_jobs,
            speed_factor: raw.builder.speed_factor,
            drain_deadline: Duration::from_secs(raw.builder.drain_deadline_secs),
            executor,
            reconnect: ReconnectPolicy {
                initial: Duration::from_millis(raw.reconnect.initial_ms),
                max: Duration::from_millis(raw.reconnect.max_ms),
                budget: Duration::from_secs(raw.reconnect.budget_secs),
            },
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_default_configuration_loads_and_holds_the_defaults() {
        let path = Path::new("builder.toml");
        let printed = Config::parse(DEFAULT_CONFIG, path).unwrap();
        assert_eq!(printed.runner_domain, "runner.example.org");
        // The required keys (and the executor, whose absence means noop) with nothing else.
        let mut required = String::from("[builder]\nsystems = [\"x86_64-linux\"]\n");
        for section in DEFAULT_CONFIG.split("\n[").filter(|section| {
            ["runner]", "tls]", "executor]"]
                .iter()
                .any(|name| section.starts_with(name))
        }) {
            required.push_str("\n[");
            required.push_str(section);
        }
        let defaults = Config::parse(&required, path).unwrap();
        assert_eq!(
            format!("{printed:?}"),
            format!("{defaults:?}"),
            "a value in the printed configuration is not the default"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [runner]
            url = "http://nowhere"
            [tls]
            ca_certificate = "ca.pem"
            certificate = "b.pem"
            key = "b.key"
            [builder]
            systems = []
            max_jobs = 0
            speed_factor = -1.0
            [executor]
            kind = "noop"
            cache_url = "http://runner:7701"
        "#;
        let Err(ConfigError::Invalid(problems)) = Config::parse(text, Path::new("b.toml")) else {
            panic!("invalid config accepted");
        };
        assert_eq!(
            problems.len(),
            5,
            "the executor's with the others: {problems:?}"
        );
    }

    #[test]
    fn every_unknown_key_is_reported_at_once_the_executors_included() {
        let text = DEFAULT_CONFIG
            .replace("max_jobs = 1", "max_job = 1")
            .replace("initial_ms = 200", "initial_millis = 200")
            .replace("cache_url =", "cache_ur =");
        let Err(ConfigError::UnknownKeys(keys)) = Config::parse(&text, Path::new("b.toml")) else {
            panic!("unknown keys accepted");
        };
        assert_eq!(
            keys,
            [
                "builder.max_job",
                "executor.cache_ur",
                "reconnect.initial_millis"
            ]
        );
    }

    #[test]
    fn an_executor_key_of_another_kind_is_refused() {
        let noop = DEFAULT_CONFIG.replace("kind = \"nix\"", "kind = \"noop\"");
        let Err(ConfigError::Invalid(problems)) = Config::parse(&noop, Path::new("b.toml")) else {
            panic!("nix keys accepted for noop");
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("executor.cache_url is for kind = \"nix\""));
        let nix = DEFAULT_CONFIG.replace("kind = \"nix\"", "kind = \"nix\"\nbuild_ms = 5");
        assert!(Config::parse(&nix, Path::new("b.toml")).is_err());
    }

    #[test]
    fn a_missing_local_ca_is_named_as_such() {
        let config = Config::parse(DEFAULT_CONFIG, Path::new("b.toml")).unwrap();
        let Err(ConfigError::Invalid(problems)) = config.check_files() else {
            panic!("missing TLS files accepted");
        };
        assert!(
            problems[0].starts_with("tls.ca_certificate = /etc/drover/ca.pem: "),
            "{problems:?}"
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
