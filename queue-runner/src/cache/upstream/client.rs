//! An HTTP(S) upstream: one client per upstream (rustls with the system's roots plus an optional
//! CA file, keep-alive, HTTP/2 when the server offers it), at most [`CONCURRENT_REQUESTS`]
//! requests at once, each bounded by a timeout. An upstream that cannot be reached is not asked
//! again for [`DOWN_PAUSE`], so a closure of thousands of paths waits for one timeout, not for
//! thousands; the pause and the recovery are logged once each.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::sync::Semaphore;

use super::UpstreamConfig;

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests to one upstream at once (multiplexed on one HTTP/2 connection where offered).
const CONCURRENT_REQUESTS: usize = 32;

/// How long an upstream that could not be reached is left alone.
const DOWN_PAUSE: Duration = Duration::from_secs(30);

/// The largest file read from an upstream (a narinfo is a few hundred bytes).
const MAX_FILE_BYTES: usize = 1024 * 1024;

/// What asking for a file gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The file.
    Found(String),
    /// The upstream does not have it (404, or 403 as S3-backed caches answer).
    Missing,
    /// The upstream could not be asked, or answered something else; nothing is learnt.
    Failed,
}

/// Why an upstream's client cannot be made: a configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Its CA file cannot be read or holds no certificate.
    #[error("reading cache.upstreams ca_certificate {path} (upstream {url})")]
    CaFile {
        /// The upstream.
        url: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate of its CA file, or the TLS settings, cannot be used.
    #[error("preparing TLS for upstream {url}")]
    Tls {
        /// The upstream.
        url: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The HTTP client cannot be built.
    #[error("building the HTTP client of upstream {url}")]
    Client {
        /// The upstream.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
}

/// An upstream served over HTTP or HTTPS.
#[derive(Debug)]
pub struct HttpSource {
    url: String,
    client: reqwest::Client,
    permits: Semaphore,
    down_until: Mutex<Option<Instant>>,
    /// Whether the last request could not reach it, to log the recovery once.
    unreachable: AtomicBool,
}

impl HttpSource {
    /// A client for `config`'s upstream.
    pub fn new(config: &UpstreamConfig) -> Result<Self, ClientError> {
        let url = config.url.clone();
        let tls_error = |source| ClientError::Tls {
            url: url.clone(),
            source,
        };
        let mut roots = rustls::RootCertStore::empty();
        // A system certificate rustls cannot use is skipped, as every TLS client does.
        let (_, _) =
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(path) = &config.ca_certificate {
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .and_then(|certificates| {
                    if certificates.is_empty() {
                        Err(rustls::pki_types::pem::Error::NoItemsFound)
                    } else {
                        Ok(certificates)
                    }
                })
                .map_err(|source| ClientError::CaFile {
                    url: url.clone(),
                    path: path.clone(),
                    source,
                })?;
            for certificate in certificates {
                roots.add(certificate).map_err(tls_error)?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Client {
                url: url.clone(),
                source,
            })?;
        Ok(Self {
            url,
            client,
            permits: Semaphore::new(CONCURRENT_REQUESTS),
            down_until: Mutex::new(None),
            unreachable: AtomicBool::new(false),
        })
    }

    /// The file `name` below the cache's URL.
    pub async fn get(&self, name: &str) -> Fetched {
        if self.is_paused() {
            return Fetched::Failed;
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return Fetched::Failed;
        };
        let response = match self.client.get(format!("{}/{name}", self.url)).send().await {
            Ok(response) => response,
            Err(error) => {
                self.lost(&error);
                return Fetched::Failed;
            }
        };
        if self.unreachable.swap(false, Ordering::Relaxed) {
            tracing::info!(upstream = %self.url, "upstream cache answers again");
        }
        match response.status().as_u16() {
            200 => self.body(response).await,
            404 | 403 => Fetched::Missing,
            status => {
                tracing::warn!(upstream = %self.url, status, file = name, "upstream cache answered an error: treated as not having it");
                Fetched::Failed
            }
        }
    }

    /// The body of a 200 answer, up to [`MAX_FILE_BYTES`].
    async fn body(&self, mut response: reqwest::Response) -> Fetched {
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_FILE_BYTES => {
                    body.extend_from_slice(&chunk);
                }
                Ok(Some(_)) => return Fetched::Failed,
                Ok(None) => return String::from_utf8(body).map_or(Fetched::Failed, Fetched::Found),
                Err(error) => {
                    self.lost(&error);
                    return Fetched::Failed;
                }
            }
        }
    }

    fn is_paused(&self) -> bool {
        let down_until = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        down_until.is_some_and(|until| Instant::now() < until)
    }

    /// The upstream could not be reached: leave it alone for [`DOWN_PAUSE`], saying so once.
    fn lost(&self, error: &reqwest::Error) {
        *self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + DOWN_PAUSE);
        if !self.unreachable.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                upstream = %self.url,
                error = %error_context::report(error),
                pause = ?DOWN_PAUSE,
                "upstream cache unreachable: its paths count as missing and it is not asked during the pause"
            );
        }
    }
}
