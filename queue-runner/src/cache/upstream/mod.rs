//! Upstream binary caches (the public NixOS cache, Cachix, a company cache): a step whose
//! outputs an upstream has, signed by its key, is not built; outputs may refer to paths that
//! live upstream. Upstreams are best-effort: one that cannot be reached, or answers nonsense,
//! counts as not having the path, costs a bounded delay and is logged, and never fails a build.
//!
//! `file://` directories are read directly; `http://` and `https://` caches through one HTTP
//! client per upstream ([`client`]: keep-alive, HTTP/2 where offered, a bounded number of
//! requests at once, the system's roots plus an optional CA file). What an upstream answered is
//! remembered ([`answers`]): a miss for `cache.upstream_negative_ttl_secs` (Nix's own default
//! is an hour), a hit for a day. Upstreams are asked in the order of the `Priority` their
//! `nix-cache-info` declares, lowest first, as Nix does.

mod answers;
mod client;

use std::path::PathBuf;
use std::time::Duration;

use nix_primitives::StorePath;
use nix_primitives::narinfo::NarInfo;
use nix_primitives::signing::PublicKey;
use tokio::sync::OnceCell;

use answers::Answers;
use client::{Fetched, HttpSource};

pub use client::ClientError;

/// The priority of an upstream whose `nix-cache-info` names none (Nix's default).
const DEFAULT_PRIORITY: u32 = 50;

/// Why an upstream cache's URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    /// Neither `file://`, `http://` nor `https://`.
    #[error("{0:?} is neither file://, http:// nor https://")]
    Scheme(String),
    /// No host.
    #[error("{0:?} has no host")]
    Host(String),
}

/// One upstream cache as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `file:///dir`, `http://host[:port][/prefix]` or `https://…`, without a trailing slash.
    pub url: String,
    /// The key its narinfos must be signed with.
    pub key: PublicKey,
    /// A PEM file of CAs to trust for it, besides the system's.
    pub ca_certificate: Option<PathBuf>,
}

impl UpstreamConfig {
    /// Checks `url`'s form.
    pub fn new(
        url: &str,
        key: PublicKey,
        ca_certificate: Option<PathBuf>,
    ) -> Result<Self, UpstreamUrlError> {
        let url = url.trim_end_matches('/');
        let rest = ["http://", "https://"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme));
        match rest {
            Some(rest) if rest.split(['/', ':']).next().is_none_or(str::is_empty) => {
                return Err(UpstreamUrlError::Host(url.to_owned()));
            }
            Some(_) => {}
            None if url.starts_with("file://") => {}
            None => return Err(UpstreamUrlError::Scheme(url.to_owned())),
        }
        Ok(Self {
            url: url.to_owned(),
            key,
            ca_certificate,
        })
    }
}

/// Where an upstream's files are.
#[derive(Debug)]
enum Source {
    /// A directory in Nix's binary cache layout.
    Directory(PathBuf),
    /// An HTTP(S) server.
    Http(HttpSource),
}

/// One upstream cache, ready to be asked.
#[derive(Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    source: Source,
    answers: Answers,
    priority: OnceCell<u32>,
}

impl Upstream {
    /// Prepares `config`'s upstream: its HTTP client, if it has one, reads its CA file now.
    pub fn open(config: UpstreamConfig, negative_ttl: Duration) -> Result<Self, ClientError> {
        let source = match config.url.strip_prefix("file://") {
            Some(directory) => Source::Directory(PathBuf::from(directory)),
            None => Source::Http(HttpSource::new(&config)?),
        };
        Ok(Self {
            config,
            source,
            answers: Answers::new(negative_ttl),
            priority: OnceCell::new(),
        })
    }

    /// Its URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// The priority its `nix-cache-info` declares (asked once), or Nix's default.
    pub async fn priority(&self) -> u32 {
        *self
            .priority
            .get_or_init(|| async {
                let Fetched::Found(info) = self.fetch("nix-cache-info").await else {
                    return DEFAULT_PRIORITY;
                };
                info.lines()
                    .find_map(|line| line.strip_prefix("Priority:"))
                    .and_then(|value| value.trim().parse().ok())
                    .unwrap_or(DEFAULT_PRIORITY)
            })
            .await
    }

    /// Whether this upstream has `path` signed by its key, from what it answered before if that
    /// is still fresh.
    pub async fn has(&self, path: &StorePath) -> bool {
        match self.answers.get(path.hash_part()) {
            Some(answer) => answer,
            None => self.narinfo(path).await.is_some(),
        }
    }

    /// The narinfo of `path`, if this upstream has it signed by its key. A miss is remembered;
    /// an upstream that could not be asked is not.
    pub async fn narinfo(&self, path: &StorePath) -> Option<NarInfo> {
        if self.answers.get(path.hash_part()) == Some(false) {
            return None;
        }
        let text = match self.fetch(&format!("{}.narinfo", path.hash_part())).await {
            Fetched::Found(text) => text,
            Fetched::Missing => {
                self.answers.insert(path.hash_part(), false);
                return None;
            }
            Fetched::Failed => return None,
        };
        let info = NarInfo::parse(&text).ok().filter(|info| {
            let signed = info.is_signed_by_any(std::slice::from_ref(&self.config.key));
            if !signed {
                tracing::warn!(upstream = %self.config.url, %path, "an upstream narinfo is not signed by its key: treated as a miss");
            }
            info.store_path == *path && signed
        });
        self.answers.insert(path.hash_part(), info.is_some());
        info
    }

    /// A file of the cache.
    async fn fetch(&self, name: &str) -> Fetched {
        match &self.source {
            Source::Directory(directory) => {
                match tokio::fs::read_to_string(directory.join(name)).await {
                    Ok(text) => Fetched::Found(text),
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => Fetched::Missing,
                    Err(_) => Fetched::Failed,
                }
            }
            Source::Http(http) => http.get(name).await,
        }
    }
}

/// The upstreams of a cache, asked in the order of their priorities.
#[derive(Debug, Default)]
pub struct Upstreams(Vec<Upstream>);

impl Upstreams {
    /// `upstreams`, asked in the order of their `nix-cache-info` priorities.
    #[must_use]
    pub const fn new(upstreams: Vec<Upstream>) -> Self {
        Self(upstreams)
    }

    /// The upstreams by priority, lowest first; equal ones in the configuration's order.
    async fn by_priority(&self) -> Vec<&Upstream> {
        let mut ordered = Vec::with_capacity(self.0.len());
        for upstream in &self.0 {
            ordered.push((upstream.priority().await, upstream));
        }
        ordered.sort_by_key(|(priority, _)| *priority);
        ordered.into_iter().map(|(_, upstream)| upstream).collect()
    }

    /// Whether any upstream has `path`.
    pub async fn has(&self, path: &StorePath) -> bool {
        for upstream in self.by_priority().await {
            if upstream.has(path).await {
                return true;
            }
        }
        false
    }

    /// The narinfo of `path` from the first upstream that has it.
    pub async fn narinfo(&self, path: &StorePath) -> Option<NarInfo> {
        for upstream in self.by_priority().await {
            if let Some(info) = upstream.narinfo(path).await {
                return Some(info);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PublicKey {
        nix_primitives::SecretKey::from_seed("up-1", &[1; 32]).public_key()
    }

    /// Puts a narinfo of `path` signed by `key` into `dir`, its URL naming `priority`.
    fn write_narinfo(
        dir: &std::path::Path,
        priority: u32,
        path: &StorePath,
        key: &nix_primitives::SecretKey,
    ) {
        let mut info = NarInfo {
            store_path: path.clone(),
            url: format!("nar/from-priority-{priority}.nar"),
            compression: "none".to_owned(),
            file_hash: None,
            file_size: None,
            nar_hash: nix_primitives::Hash::sha256(b"nar"),
            nar_size: 3,
            references: std::collections::BTreeSet::new(),
            deriver: None,
            system: None,
            signatures: Vec::new(),
            content_address: None,
        };
        info.sign(key);
        fs_err::write(
            dir.join(format!("{}.narinfo", path.hash_part())),
            info.to_string(),
        )
        .unwrap();
    }

    /// A `file://` upstream in `dir` declaring `priority`, holding `path` signed by `key`.
    fn upstream_with(
        dir: &std::path::Path,
        priority: u32,
        path: &StorePath,
        key: &nix_primitives::SecretKey,
    ) -> Upstream {
        fs_err::create_dir_all(dir).unwrap();
        fs_err::write(
            dir.join("nix-cache-info"),
            format!("Priority: {priority}\n"),
        )
        .unwrap();
        write_narinfo(dir, priority, path, key);
        let config =
            UpstreamConfig::new(&format!("file://{}", dir.display()), key.public_key(), None)
                .unwrap();
        Upstream::open(config, Duration::from_hours(1)).unwrap()
    }

    #[tokio::test]
    async fn upstreams_are_asked_by_their_priority_and_a_miss_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let key = nix_primitives::SecretKey::from_seed("up-1", &[1; 32]);
        let path =
            StorePath::from_absolute("/nix/store/00000000000000000000000000000000-x").unwrap();
        let upstreams = Upstreams::new(vec![
            upstream_with(&dir.path().join("late"), 60, &path, &key),
            upstream_with(&dir.path().join("early"), 10, &path, &key),
        ]);
        let info = upstreams.narinfo(&path).await.unwrap();
        assert_eq!(info.url, "nar/from-priority-10.nar");

        let missing =
            StorePath::from_absolute("/nix/store/11111111111111111111111111111111-y").unwrap();
        assert!(!upstreams.has(&missing).await);
        // Published upstream afterwards: the miss is believed until its TTL ends.
        write_narinfo(&dir.path().join("early"), 10, &missing, &key);
        assert!(
            !upstreams.has(&missing).await,
            "a remembered miss was asked again"
        );
        let fresh = upstream_with(&dir.path().join("fresh"), 10, &missing, &key);
        assert!(fresh.has(&missing).await, "the narinfo written is valid");
    }

    #[test]
    fn urls_are_checked() {
        for good in [
            "file:///var/cache/up",
            "http://cache.local:8080/nix/",
            "https://cache.nixos.org",
        ] {
            let config = UpstreamConfig::new(good, key(), None).unwrap();
            assert!(!config.url.ends_with('/'), "{config:?}");
        }
        assert!(matches!(
            UpstreamConfig::new("s3://bucket", key(), None),
            Err(UpstreamUrlError::Scheme(_))
        ));
        assert!(matches!(
            UpstreamConfig::new("https://:443", key(), None),
            Err(UpstreamUrlError::Host(_))
        ));
    }
}
