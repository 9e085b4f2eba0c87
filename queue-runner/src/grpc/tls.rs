//! The runner's side of mutual TLS, owned here rather than by tonic so that SIGHUP can replace
//! the certificate, key and CA without a restart: a rustls server configuration (client
//! certificates required, signed by the farm's CA; HTTP/2 by ALPN) that every new connection
//! takes, and the stream of accepted connections, each with Nagle's algorithm off and its
//! handshake done (concurrently, under a deadline) before tonic sees it. Connections already
//! open keep the configuration they were accepted with. The web listener (`[web]`) is served
//! the same way, with its own certificate and key, client certificates optional, and HTTP/1.1
//! besides HTTP/2.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::TcpListenerStream;

use crate::certificates::Sightings;
use crate::config::Config;

/// Handshakes in progress at once; more connections wait for one to finish.
const CONCURRENT_HANDSHAKES: usize = 64;

/// How long a connection may take to finish its handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Why the TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read or holds no PEM item of the kind.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The CA certificate cannot verify client certificates.
    #[error("using the CA certificate to verify clients")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls refused the certificate, key or CA.
    #[error("configuring TLS")]
    Rustls(#[source] rustls::Error),
    /// The configuration has no `[web]` listener any more.
    #[error("[web] is gone from the configuration; removing the listener takes a restart")]
    NoWeb,
}

/// Which listener a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// gRPC: the runner's certificate, client certificates required, HTTP/2.
    Grpc,
    /// The web listener: its own certificate, client certificates optional, HTTP/1.1 too.
    Web,
}

/// The current server configuration, replaceable.
#[derive(Debug, Clone)]
pub struct ServerTls {
    side: Side,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl ServerTls {
    /// The configuration of `side` from the files `config` names.
    pub fn load(config: &Config, side: Side) -> Result<Self, TlsError> {
        Ok(Self {
            side,
            current: Arc::new(RwLock::new(Arc::new(server_config(config, side)?))),
        })
    }

    /// Replaces the configuration for new connections with one from the files `config` names;
    /// on failure the current one stays.
    pub fn reload(&self, config: &Config) -> Result<(), TlsError> {
        let new = Arc::new(server_config(config, self.side)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = new;
        Ok(())
    }

    /// Which listener it is for.
    #[must_use]
    pub const fn side(&self) -> Side {
        self.side
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The connections `listener` accepts, once their handshakes succeed, each reported to
    /// `seen`; the others are dropped (the client sees the TLS alert).
    pub fn accept(
        &self,
        listener: TcpListenerStream,
        seen: Sightings,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + use<> {
        let tls = self.clone();
        listener
            .map(move |accepted| {
                let acceptor = TlsAcceptor::from(tls.current());
                let seen = seen.clone();
                async move {
                    let stream = accepted?;
                    let peer = stream.peer_addr().ok();
                    // Left on, a builder's small messages on concurrent streams (a step's log
                    // end and its NAR upload) waited for delayed acknowledgements: ~45 ms a step.
                    stream.set_nodelay(true)?;
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(stream))
                            .await
                            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
                            .and_then(|handshake| handshake);
                    match &handshake {
                        Ok(stream) => seen.handshake(stream.get_ref().1.peer_certificates()),
                        Err(error) => crate::audit::refused_handshake(
                            peer,
                            &error_context::report(error).to_string(),
                        ),
                    }
                    handshake
                }
            })
            .buffer_unordered(CONCURRENT_HANDSHAKES)
            .filter_map(|handshake| async move { handshake.ok().map(Ok) })
    }
}

fn server_config(config: &Config, side: Side) -> Result<rustls::ServerConfig, TlsError> {
    let (certificate, key) = match side {
        Side::Grpc => (&config.certificate, &config.key),
        Side::Web => {
            let web = config.web.as_ref().ok_or(TlsError::NoWeb)?;
            (&web.certificate, &web.key)
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(&config.ca_certificate)? {
        roots.add(ca).map_err(TlsError::Rustls)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    // A browser has no certificate of the farm: the web listener takes tokens too.
    let verifier = match side {
        Side::Grpc => verifier.build(),
        Side::Web => verifier.allow_unauthenticated().build(),
    }
    .map_err(TlsError::Verifier)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
        path: key.clone(),
        source,
    })?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(certificate)?, key)
        .map_err(TlsError::Rustls)?;
    server.alpn_protocols = match side {
        Side::Grpc => vec![b"h2".to_vec()],
        Side::Web => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(server)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if certificates.is_empty() {
        return Err(read_error(rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(certificates)
}
