//! How the runner reaches PostgreSQL: the connection string of the configuration, the password
//! read from a file of its own (so the string, which may land in a world-readable Nix store,
//! carries no secret), timeouts and TCP keepalives so a lost server is noticed in seconds (the
//! URL's `connect_timeout` wins; its `sslmode` must agree with `database.ssl_mode`), and
//! TLS through rustls: `require` encrypts without checking the server's certificate (libpq's
//! meaning), `verify-full` checks it against a CA file and the host name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{DbError, Pool};

/// How long opening a connection may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Idle time before TCP keepalive probes start on a connection, the time between probes, and
/// how many may go unanswered: a server that vanished without closing its sockets is noticed
/// after about 8 s of silence.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_RETRIES: u32 = 3;

/// How long the pool may take to open a connection (TLS and authentication included) or to
/// check one it hands out again.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether and how connections are encrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain connections (a Unix socket, or a trusted network).
    #[default]
    Disable,
    /// Encrypted; the server's certificate is not checked.
    Require,
    /// Encrypted; the server's certificate must chain to `ssl_root_certificate` and name the host.
    VerifyFull,
}

/// The `[database]` settings a connection is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// libpq-style connection string.
    pub url: String,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// Encryption.
    pub ssl_mode: SslMode,
    /// The CA that signed the server's certificate (read for `verify-full` only).
    pub ssl_root_certificate: Option<PathBuf>,
}

impl DatabaseConfig {
    /// A connection string alone: no password file, no TLS.
    #[must_use]
    pub fn plain(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            password_file: None,
            ssl_mode: SslMode::Disable,
            ssl_root_certificate: None,
        }
    }
}

/// Why connections cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The connection string does not parse.
    #[error("parsing database.url")]
    Url(#[source] tokio_postgres::Error),
    /// The URL sets `sslmode=require`, which `database.ssl_mode` (default `disable`) governs.
    #[error(
        "database.url sets sslmode; set database.ssl_mode = \"require\" or \"verify-full\" instead"
    )]
    SslModeInUrl,
    /// The password file cannot be read (the error names it).
    #[error("reading database.password_file")]
    PasswordFile(#[source] std::io::Error),
    /// The password file holds nothing.
    #[error("database.password_file {0} is empty")]
    EmptyPassword(PathBuf),
    /// `verify-full` without a CA to verify against.
    #[error("database.ssl_mode = \"verify-full\" needs database.ssl_root_certificate")]
    NoRootCertificate,
    /// The CA file cannot be read or holds no certificate.
    #[error("reading database.ssl_root_certificate {path}")]
    RootCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The TLS library refuses its default protocol versions.
    #[error("preparing TLS for PostgreSQL")]
    Protocols(#[source] rustls::Error),
    /// A certificate of the CA file is not usable as a root.
    #[error("database.ssl_root_certificate {path} holds an unusable certificate")]
    BadRootCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// A connection made by a [`Connector`], encrypted or not.
pub type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// Opens connections as the configuration says; shared by the pool and the LISTEN connection.
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").finish_non_exhaustive()
    }
}

impl Connector {
    /// Reads the password and CA files and prepares the connection settings.
    pub fn new(settings: &DatabaseConfig) -> Result<Self, ConnectorError> {
        let mut config: tokio_postgres::Config =
            settings.url.parse().map_err(ConnectorError::Url)?;
        if config.get_ssl_mode() == DriverSslMode::Require && settings.ssl_mode == SslMode::Disable
        {
            // The URL asks for TLS, which database.ssl_mode governs: never connect in plain text
            // behind the operator's back.
            return Err(ConnectorError::SslModeInUrl);
        }
        if let Some(path) = &settings.password_file {
            config.password(read_password(path)?);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .ssl_mode(match settings.ssl_mode {
                SslMode::Disable => DriverSslMode::Disable,
                SslMode::Require | SslMode::VerifyFull => DriverSslMode::Require,
            });
        let tls = client_config(settings.ssl_mode, settings.ssl_root_certificate.as_deref())?;
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(tls),
        })
    }

    /// A pool of `size` connections, opened lazily.
    pub fn pool(&self, size: usize) -> Result<Pool, DbError> {
        let manager = deadpool_postgres::Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|error| DbError::Configure(deadpool_postgres::CreatePoolError::Build(error)))
    }

    /// One connection outside the pool, with the task that drives it left to the caller.
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, Connection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }
}

/// The password in `path`, without the line break an editor adds.
fn read_password(path: &Path) -> Result<String, ConnectorError> {
    let text = fs_err::read_to_string(path).map_err(ConnectorError::PasswordFile)?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(ConnectorError::EmptyPassword(path.to_owned()));
    }
    Ok(password.to_owned())
}

/// The rustls settings for `mode` (unused when it is `disable`).
fn client_config(
    mode: SslMode,
    root_certificate: Option<&Path>,
) -> Result<rustls::ClientConfig, ConnectorError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(ConnectorError::Protocols)?;
    let config = match (mode, root_certificate) {
        (SslMode::VerifyFull, None) => return Err(ConnectorError::NoRootCertificate),
        (SslMode::VerifyFull, Some(path)) => builder
            .with_root_certificates(root_store(path)?)
            .with_no_client_auth(),
        (SslMode::Disable | SslMode::Require, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// The CA certificates in `path`.
fn root_store(path: &Path) -> Result<rustls::RootCertStore, ConnectorError> {
    let read_error = |source| ConnectorError::RootCertificate {
        path: path.to_owned(),
        source,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(read_error)?;
    if certificates.is_empty() {
        return Err(read_error(rustls::pki_types::pem::Error::NoItemsFound));
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots
            .add(certificate)
            .map_err(|source| ConnectorError::BadRootCertificate {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(roots)
}

/// `sslmode=require`: any certificate is accepted (the connection is encrypted, its peer not
/// authenticated), but the handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
