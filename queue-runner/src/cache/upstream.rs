//! Upstream binary caches (the public NixOS cache, a company cache): a step whose outputs an
//! upstream has, signed by its key, is not built; outputs may refer to paths that live upstream.
//! Upstreams are best-effort: one that cannot be reached counts as not having the path.
//!
//! `file://` and plain `http://` caches are read here; `https://` needs a TLS client and is
//! refused by the configuration for now.

use std::path::PathBuf;

use nix_primitives::StorePath;
use nix_primitives::narinfo::NarInfo;
use nix_primitives::signing::PublicKey;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long one narinfo request to an upstream may take before it counts as not found.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest narinfo read from an upstream.
const MAX_NARINFO_BYTES: u64 = 1024 * 1024;

/// Where an upstream is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// A directory in Nix's binary cache layout.
    Directory(PathBuf),
    /// An HTTP server: host, port and path prefix.
    Http {
        host: String,
        port: u16,
        prefix: String,
    },
}

/// Why an upstream cache's URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    /// Neither `file://` nor `http://`.
    #[error("{0:?} is neither file:// nor http://")]
    Scheme(String),
    /// The port is not a number.
    #[error("{0:?} has an invalid port")]
    Port(String),
    /// No host.
    #[error("{0:?} has no host")]
    Host(String),
}

/// One upstream cache and the key its narinfos must be signed with.
#[derive(Debug, Clone)]
pub struct Upstream {
    location: Location,
    key: PublicKey,
}

impl Upstream {
    /// An upstream at `url` (`file:///dir` or `http://host[:port][/prefix]`).
    pub fn new(url: &str, key: PublicKey) -> Result<Self, UpstreamUrlError> {
        let location = if let Some(path) = url.strip_prefix("file://") {
            Location::Directory(PathBuf::from(path))
        } else if let Some(rest) = url.strip_prefix("http://") {
            let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (
                    host,
                    port.parse()
                        .map_err(|_| UpstreamUrlError::Port(url.to_owned()))?,
                ),
                None => (authority, 80),
            };
            if host.is_empty() {
                return Err(UpstreamUrlError::Host(url.to_owned()));
            }
            Location::Http {
                host: host.to_owned(),
                port,
                prefix: prefix.trim_end_matches('/').to_owned(),
            }
        } else {
            return Err(UpstreamUrlError::Scheme(url.to_owned()));
        };
        Ok(Self { location, key })
    }

    /// The narinfo of `path`, if this upstream has it signed by its key.
    pub async fn narinfo(&self, path: &StorePath) -> Option<NarInfo> {
        let name = format!("{}.narinfo", path.hash_part());
        let text = match &self.location {
            Location::Directory(directory) => tokio::fs::read_to_string(directory.join(&name))
                .await
                .ok()?,
            Location::Http { host, port, prefix } => {
                let path = format!("{prefix}/{name}");
                tokio::time::timeout(REQUEST_TIMEOUT, http_get(host, *port, &path))
                    .await
                    .ok()??
            }
        };
        let info = NarInfo::parse(&text).ok()?;
        (info.store_path == *path && info.is_signed_by_any(std::slice::from_ref(&self.key)))
            .then_some(info)
    }
}

/// A minimal HTTP/1.0 GET; `None` for anything but a 200 with a body under the limit.
async fn http_get(host: &str, port: u16, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: drover\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream
        .take(MAX_NARINFO_BYTES)
        .read_to_end(&mut response)
        .await
        .ok()?;
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")?;
    let status = std::str::from_utf8(&response[..split])
        .ok()?
        .lines()
        .next()?
        .to_owned();
    if status.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    String::from_utf8(response[split + 4..].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PublicKey {
        nix_primitives::SecretKey::from_seed("up-1", &[1; 32]).public_key()
    }

    #[test]
    fn urls_are_parsed_or_refused() {
        let file = Upstream::new("file:///var/cache/up", key()).unwrap();
        assert_eq!(
            file.location,
            Location::Directory(PathBuf::from("/var/cache/up"))
        );
        let http = Upstream::new("http://cache.local:8080/nix/", key()).unwrap();
        assert_eq!(
            http.location,
            Location::Http {
                host: "cache.local".to_owned(),
                port: 8080,
                prefix: "nix".to_owned()
            }
        );
        assert!(matches!(
            Upstream::new("https://cache.nixos.org", key()),
            Err(UpstreamUrlError::Scheme(_))
        ));
        assert!(matches!(
            Upstream::new("http://:80", key()),
            Err(UpstreamUrlError::Host(_))
        ));
        assert!(matches!(
            Upstream::new("http://host:port", key()),
            Err(UpstreamUrlError::Port(_))
        ));
    }
}
