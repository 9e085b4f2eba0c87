//! A directory served over HTTPS, as a binary cache on the internet is: a certificate the test
//! issues, HTTP/2 or HTTP/1.1 as the client chooses, 404 for what is not there.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A running server; dropping it stops it.
pub struct HttpsDirectory {
    port: u16,
    requests: Arc<AtomicU64>,
    _task: JoinSet<()>,
}

impl HttpsDirectory {
    /// Serves `directory` on a free port of 127.0.0.1 with the certificate and key in PEM.
    ///
    /// # Panics
    /// If the certificate or key does not parse, or no port can be bound.
    pub async fn serve(directory: &Path, certificate_pem: &str, key_pem: &str) -> Self {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(certificate_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap_or_else(|error| panic!("reading the server certificate: {error}"));
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .unwrap_or_else(|error| panic!("reading the server key: {error}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
            .unwrap_or_else(|error| panic!("configuring TLS: {error}"));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|error| panic!("binding the HTTPS server: {error}"));
        let port = tcp
            .local_addr()
            .unwrap_or_else(|error| panic!("the HTTPS server's address: {error}"))
            .port();
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        };
        let requests = Arc::new(AtomicU64::new(0));
        let router = axum::Router::new()
            .route("/{*file}", axum::routing::get(file))
            .with_state(Served {
                directory: directory.to_owned(),
                requests: Arc::clone(&requests),
            });
        let mut task = JoinSet::new();
        task.spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            port,
            requests,
            _task: task,
        }
    }

    /// How many files were asked for so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Its port; its URL is `https://localhost:<port>`.
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }
}

/// What the server serves, and its count of requests.
#[derive(Clone)]
struct Served {
    directory: PathBuf,
    requests: Arc<AtomicU64>,
}

async fn file(
    State(served): State<Served>,
    UrlPath(file): UrlPath<String>,
) -> Result<Vec<u8>, StatusCode> {
    served.requests.fetch_add(1, Ordering::Relaxed);
    if file.split('/').any(|part| part == "..") {
        return Err(StatusCode::NOT_FOUND);
    }
    tokio::fs::read(served.directory.join(file))
        .await
        .map_err(|_| StatusCode::NOT_FOUND)
}

/// TCP connections that complete a TLS handshake; failed handshakes are dropped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, address)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(stream) = self.acceptor.accept(stream).await {
                return (stream, address);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
