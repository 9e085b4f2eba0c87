//! What every drover farm is made of, shared by the integration tests, the benchmarks and
//! `drover dev-farm`: a directory holding a CA, certificates and the cache's signing key
//! ([`FarmFiles`]); the runner's and the builders' configuration files
//! ([`FarmFiles::runner_config`], [`BuilderToml`]); the environment of a Nix process
//! ([`nix_environment`]); and free ports. How each of them runs the processes differs (the tests
//! run the runner in their own process, the benchmarks as a child, `drover dev-farm` ties its
//! children to itself), so that stays with them.
//!
//! Unlike the rest of this crate, what can fail for reasons outside the program (files,
//! certificates) returns an error instead of panicking: `drover dev-farm` is a user's command.
//! Only mistakes of the calling code panic (a TOML path that is not a table, a port that cannot
//! be bound at all).

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

use drover_tls::{CertError, CertificateAuthority, Identity, IdentityError, Role};
use nix_primitives::SecretKey;

/// Settings of every Nix a farm's builders run: single-user root, no sandbox, no network
/// substituters (each builder is given the farm's cache), no negative narinfo caching (a path
/// missing a moment ago may be in the cache now).
pub const NIX_CONFIG: &str = "sandbox = false\nbuild-users-group =\nsubstituters =\n\
narinfo-cache-negative-ttl = 0\nexperimental-features = nix-command\n";

/// The Nix settings of a nix-daemon that builds in Nix's sandbox, as NixOS runs it: the farm's
/// settings with `sandbox = true`, and `sandbox-paths` giving builds this host's `/bin` (the
/// test derivations use its `sh` and coreutils; there is no Nix-built shell on a test host) and
/// the library directories `/bin/sh` loads from.
///
/// # Panics
/// If `ldd /bin/sh` cannot be run.
#[must_use]
pub fn sandboxed_nix_config() -> String {
    let bin =
        std::fs::canonicalize("/bin").unwrap_or_else(|error| panic!("resolving /bin: {error}"));
    let ldd = Command::new("ldd")
        .arg("/bin/sh")
        .output()
        .unwrap_or_else(|error| panic!("running ldd /bin/sh (libc-bin): {error}"));
    let mut paths = vec![format!("/bin={}", bin.display())];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let Some(library) = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(Path::new)
        else {
            continue;
        };
        if let Some(directory) = library.parent().map(|dir| dir.display().to_string())
            && !paths.contains(&directory)
        {
            paths.push(directory);
        }
    }
    format!(
        "{}sandbox = true\nsandbox-paths = {}\n",
        NIX_CONFIG.replace("sandbox = false\n", ""),
        paths.join(" ")
    )
}

/// Why a farm's files could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    /// A certificate or the CA could not be made or written.
    #[error("making certificates")]
    Certificates(#[from] CertError),
    /// A name is not usable in a certificate.
    #[error("naming a certificate")]
    Identity(#[from] IdentityError),
    /// A file could not be written.
    #[error("writing the farm's files")]
    Files(#[from] std::io::Error),
    /// The cache's signing key could not be made.
    #[error("making the cache's signing key: {0}")]
    CacheKey(String),
}

/// A farm's directory: the CA (`ca.pem`), the runner's certificate for `localhost`
/// (`runner-NAME.pem`), the cache's signing key (`cache-key.sec`), and every certificate issued
/// since (`ROLE-NAME.pem` and `.key`). The directory must not hold a CA yet: making one refuses
/// to replace another's files.
pub struct FarmFiles {
    dir: PathBuf,
    ca: CertificateAuthority,
    runner_name: String,
    cache_key: SecretKey,
}

impl FarmFiles {
    /// Makes the CA, the runner `runner_name`'s certificate and the cache's key in `dir`.
    pub fn create(dir: &Path, runner_name: &str) -> Result<Self, FarmError> {
        let ca = CertificateAuthority::generate(&format!("drover {runner_name} CA"))?;
        ca.write(dir)?;
        let cache_key = SecretKey::generate(&format!("drover-{runner_name}-farm-1"))
            .map_err(|error| FarmError::CacheKey(error.to_string()))?;
        write_secret(
            &dir.join("cache-key.sec"),
            cache_key.to_nix_format().as_bytes(),
        )?;
        let files = Self {
            dir: dir.to_owned(),
            ca,
            runner_name: runner_name.to_owned(),
            cache_key,
        };
        files.issue_runner(dir)?;
        Ok(files)
    }

    /// Opens the farm an earlier [`Self::create`] made in `dir` (its CA, cache key and runner
    /// certificate), or makes one there.
    pub fn open_or_create(dir: &Path, runner_name: &str) -> Result<Self, FarmError> {
        if !dir.join(drover_tls::CA_CERT_FILE).exists() {
            return Self::create(dir, runner_name);
        }
        let ca = CertificateAuthority::load(dir)?;
        let key_text = fs_err::read_to_string(dir.join("cache-key.sec"))?;
        let cache_key = SecretKey::parse(key_text.trim())
            .map_err(|error| FarmError::CacheKey(error.to_string()))?;
        let files = Self {
            dir: dir.to_owned(),
            ca,
            runner_name: runner_name.to_owned(),
            cache_key,
        };
        if !files.path(&format!("runner-{runner_name}.pem")).exists() {
            files.issue_runner(dir)?;
        }
        Ok(files)
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the directory.
    #[must_use]
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The CA's certificate.
    #[must_use]
    pub fn ca_certificate(&self) -> PathBuf {
        self.path(drover_tls::CA_CERT_FILE)
    }

    /// The key the farm's cache signs with.
    #[must_use]
    pub fn cache_key(&self) -> &SecretKey {
        &self.cache_key
    }

    /// The certificate and key of `role`/`name`, issued the first time they are asked for (a
    /// test may put another CA's in place first, to see it refused).
    pub fn issue(&self, role: Role, name: &str) -> Result<(PathBuf, PathBuf), FarmError> {
        let certificate = self.path(&format!("{role}-{name}.pem"));
        let key = self.path(&format!("{role}-{name}.key"));
        if certificate.exists() && key.exists() {
            return Ok((certificate, key));
        }
        Ok(self
            .ca
            .issue(&Identity::new(role, name)?, &[], &[])?
            .write(&self.dir)?)
    }

    /// Issues the runner a certificate for `localhost` and 127.0.0.1 into `dir` (a new one each
    /// time, as a renewal would); returns its certificate and key.
    pub fn issue_runner(&self, dir: &Path) -> Result<(PathBuf, PathBuf), FarmError> {
        fs_err::create_dir_all(dir)?;
        Ok(self
            .ca
            .issue(
                &Identity::new(Role::Runner, &self.runner_name)?,
                &["localhost".to_owned()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            )?
            .write(dir)?)
    }

    /// The runner's configuration for this farm: `[database]`, `[grpc]`, `[tls]`, `[logs]`,
    /// `[cache]` and `[metrics]` (on any free port), with logs and the cache in the farm's
    /// directory; farms set the keys they tune with [`ConfigFile::set`].
    #[must_use]
    pub fn runner_config(&self, database_url: &str, grpc_port: u16, cache_port: u16) -> ConfigFile {
        let file = |name: &str| self.path(name).display().to_string();
        let name = &self.runner_name;
        ConfigFile(toml::Table::new())
            .set("database.url", database_url)
            .set("grpc.listen", format!("127.0.0.1:{grpc_port}"))
            .set("tls.ca_certificate", file(drover_tls::CA_CERT_FILE))
            .set("tls.certificate", file(&format!("runner-{name}.pem")))
            .set("tls.key", file(&format!("runner-{name}.key")))
            .set("logs.directory", file("logs"))
            .set("cache.directory", file("cache"))
            .set("cache.listen", format!("127.0.0.1:{cache_port}"))
            .set("cache.secret_key_file", file("cache-key.sec"))
            .set("metrics.listen", "127.0.0.1:0")
            // Builders share the machine's disk with everything else of a one-machine farm: a
            // floor any machine that builds this project has.
            .set("builders.min_free_disk_bytes", 1_i64 << 30)
    }

    /// Builder `builder.name`'s configuration; issues its certificate.
    pub fn builder_toml(&self, builder: &BuilderToml<'_>) -> Result<String, FarmError> {
        let (certificate, key) = self.issue(Role::Builder, builder.name)?;
        let path = |path: PathBuf| path.display().to_string();
        let list =
            |items: &[&str]| -> Vec<String> { items.iter().map(|&item| item.to_owned()).collect() };
        let mut config = ConfigFile(toml::Table::new())
            .set(
                "runner.url",
                format!("https://localhost:{}", builder.runner_port),
            )
            .set("tls.ca_certificate", path(self.ca_certificate()))
            .set("tls.certificate", path(certificate))
            .set("tls.key", path(key))
            .set("builder.systems", list(builder.systems))
            .set(
                "builder.supported_features",
                list(builder.supported_features),
            )
            .set(
                "builder.mandatory_features",
                list(builder.mandatory_features),
            )
            .set("builder.max_jobs", i64::from(builder.max_jobs))
            .set(
                "builder.state_directory",
                path(self.path(&format!("builder-state/{}", builder.name))),
            );
        if let Some(secs) = builder.drain_deadline_secs {
            config = config.set("builder.drain_deadline_secs", integer(secs));
        }
        config = match &builder.executor {
            BuilderExecutor::Noop { build_ms } => config
                .set("executor.kind", "noop")
                .set("executor.build_ms", integer(*build_ms)),
            BuilderExecutor::Nix {
                cache_url,
                trusted_public_keys,
                upstream_substituters,
                store,
            } => config
                .set("executor.kind", "nix")
                .set("executor.store", *store)
                .set("executor.cache_url", cache_url.as_str())
                .set("executor.trusted_public_keys", list(trusted_public_keys))
                .set(
                    "executor.upstream_substituters",
                    list(upstream_substituters),
                ),
        };
        if let Some(reconnect) = &builder.reconnect {
            config = config
                .set("reconnect.initial_ms", integer(reconnect.initial_ms))
                .set("reconnect.max_ms", integer(reconnect.max_ms))
                .set("reconnect.budget_secs", integer(reconnect.budget_secs));
        }
        if let Some(port) = builder.metrics_port {
            config = config
                .set("metrics.enabled", true)
                .set("metrics.listen", format!("127.0.0.1:{port}"));
        }
        Ok(config.to_toml())
    }
}

/// A count or a limit as a TOML integer (TOML has no unsigned integers).
///
/// # Panics
/// Past `i64::MAX`, which no setting of a farm comes near.
#[must_use]
pub fn integer(value: u64) -> i64 {
    i64::try_from(value).unwrap_or_else(|_| panic!("{value} does not fit a TOML integer"))
}

/// A configuration file, as a TOML table to adjust.
#[derive(Debug, Clone)]
pub struct ConfigFile(toml::Table);

impl ConfigFile {
    /// Sets the key at dotted `path` (`"builders.ping_interval_secs"`), making its tables.
    ///
    /// # Panics
    /// If a table on the path is already set to something else.
    #[must_use]
    pub fn set(mut self, path: &str, value: impl Into<toml::Value>) -> Self {
        let (tables, key) = path.rsplit_once('.').unwrap_or(("", path));
        let mut table = &mut self.0;
        for name in tables.split('.').filter(|name| !name.is_empty()) {
            table = table
                .entry(name)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{name} in {path} is not a table"));
        }
        table.insert(key.to_owned(), value.into());
        self
    }

    /// Appends a table of string `entries` to the array of tables at dotted `path`
    /// (`"cache.upstreams"`).
    ///
    /// # Panics
    /// If something else is set there.
    #[must_use]
    pub fn push(self, path: &str, entries: &[(&str, &str)]) -> Self {
        let table: toml::Table = entries
            .iter()
            .map(|(key, value)| ((*key).to_owned(), toml::Value::from(*value)))
            .collect();
        let mut array = self
            .get(path)
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default();
        array.push(toml::Value::Table(table));
        self.set(path, array)
    }

    fn get(&self, path: &str) -> Option<&toml::Value> {
        let mut names = path.split('.');
        let first = self.0.get(names.next()?)?;
        names.try_fold(first, |value, name| value.get(name))
    }

    /// The file's text.
    #[must_use]
    pub fn to_toml(&self) -> String {
        self.0.to_string()
    }
}

/// A builder's configuration, as far as farms vary it.
#[derive(Debug, Clone)]
pub struct BuilderToml<'a> {
    /// Its name (its certificate's identity).
    pub name: &'a str,
    /// The runner's gRPC port on `localhost`.
    pub runner_port: u16,
    /// Systems it builds for.
    pub systems: &'a [&'a str],
    /// Features it supports.
    pub supported_features: &'a [&'a str],
    /// Features a step must ask for to run on it.
    pub mandatory_features: &'a [&'a str],
    /// Steps it runs at once.
    pub max_jobs: u32,
    /// How long a drain lets running steps finish; the default if `None`.
    pub drain_deadline_secs: Option<u64>,
    /// How it runs steps.
    pub executor: BuilderExecutor<'a>,
    /// How it dials the runner again; the defaults if `None`.
    pub reconnect: Option<Reconnect>,
    /// Where it serves its metrics; none if `None`.
    pub metrics_port: Option<u16>,
}

impl<'a> BuilderToml<'a> {
    /// An `x86_64-linux` builder named `name` with `max_jobs` slots and instant noop builds.
    #[must_use]
    pub fn new(name: &'a str, runner_port: u16, max_jobs: u32) -> Self {
        Self {
            name,
            runner_port,
            systems: &["x86_64-linux"],
            supported_features: &[],
            mandatory_features: &[],
            max_jobs,
            drain_deadline_secs: None,
            executor: BuilderExecutor::Noop { build_ms: 0 },
            reconnect: None,
            metrics_port: None,
        }
    }
}

/// How a builder runs steps.
#[derive(Debug, Clone)]
pub enum BuilderExecutor<'a> {
    /// Builds nothing, in `build_ms` milliseconds.
    Noop {
        /// How long each step takes.
        build_ms: u64,
    },
    /// Builds with Nix, substituting from the farm's cache.
    Nix {
        /// The farm's cache.
        cache_url: String,
        /// Keys it trusts.
        trusted_public_keys: Vec<&'a str>,
        /// Upstream caches it substitutes inputs from.
        upstream_substituters: Vec<&'a str>,
        /// `"local"` (single-user Nix, the store opened directly) or `"daemon"`.
        store: &'a str,
    },
}

/// A builder's `[reconnect]` table.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// First delay, in milliseconds.
    pub initial_ms: u64,
    /// Longest delay, in milliseconds.
    pub max_ms: u64,
    /// How long the builder tries without a session, in seconds.
    pub budget_secs: u64,
}

/// Sets the environment a Nix process (a builder, or a test's own Nix) needs on a farm: the
/// farm's Nix settings, and a home and narinfo cache of its own (processes that share
/// `~/.cache/nix` share negative answers).
pub fn nix_environment(command: &mut Command, home: &Path) {
    command
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HOME", home);
}

/// A TCP port on 127.0.0.1 that no listener used a moment ago.
///
/// # Panics
/// If no port can be bound at all.
#[must_use]
pub fn free_port() -> u16 {
    unused_port().unwrap_or_else(|error| panic!("finding a free port: {error}"))
}

/// A TCP port on 127.0.0.1 that no listener used a moment ago, or why none could be bound.
/// Drawn below the kernel's ephemeral range (32768 and up by default), where outgoing
/// connections take their local ports: a port the kernel handed out would be free now and may
/// be some test's client socket by the time a runner binds it.
pub fn unused_port() -> std::io::Result<u16> {
    use std::hash::{BuildHasher as _, RandomState};
    let seed = RandomState::new();
    for attempt in 0..200_u64 {
        let port = 20_000 + u16::try_from(seed.hash_one(attempt) % 12_000).unwrap_or(0);
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            return Ok(listener.local_addr()?.port());
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Writes a new file only its owner may read.
fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use fs_err::os::unix::fs::OpenOptionsExt as _;
    use std::io::Write as _;
    let mut file = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}
