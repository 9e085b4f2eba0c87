//! How the CLI reaches a runner: its gRPC URL and the client certificate to present, from flags
//! or the `DROVER_*` environment variables `drover dev-farm` prints.

use std::path::PathBuf;

use clap::Args;
use error_context::{Classify, Severity};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where the runner is and who we are.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// The runner's gRPC endpoint.
    #[arg(long, env = "DROVER_RUNNER", value_name = "URL")]
    pub runner: String,
    /// The farm's CA certificate.
    #[arg(long, env = "DROVER_CA", value_name = "FILE")]
    pub ca: PathBuf,
    /// This client's certificate (role client or admin).
    #[arg(long, env = "DROVER_CERT", value_name = "FILE")]
    pub cert: PathBuf,
    /// This client's private key.
    #[arg(long, env = "DROVER_KEY", value_name = "FILE")]
    pub key: PathBuf,
}

/// Why the runner cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A certificate or key file cannot be read.
    #[error("reading a certificate file")]
    Read(#[source] std::io::Error),
    /// The URL is not usable.
    #[error("{0:?} is not an https:// URL with a host")]
    Url(String),
    /// The connection failed.
    #[error("could not reach the runner")]
    Transport(#[source] tonic::transport::Error),
    /// A certificate was refused in the TLS handshake.
    #[error("{0}")]
    CertificateRefused(String),
}

impl Classify for ConnectError {
    fn severity(&self) -> Severity {
        match self {
            Self::Url(_) => Severity::Reject,
            // Out of reach: try again later (exit 69).
            Self::Transport(_) => Severity::Session,
            Self::Read(_) | Self::CertificateRefused(_) => Severity::Fatal,
        }
    }
}

impl ConnectionArgs {
    /// Opens an mTLS channel to the runner.
    pub async fn connect(&self) -> Result<Channel, ConnectError> {
        let host = self
            .runner
            .strip_prefix("https://")
            .and_then(|rest| rest.split([':', '/']).next())
            .filter(|host| !host.is_empty())
            .ok_or_else(|| ConnectError::Url(self.runner.clone()))?;
        let read = |path: &PathBuf| fs_err::read(path).map_err(ConnectError::Read);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
            .domain_name(host);
        Endpoint::from_shared(self.runner.clone())
            .map_err(ConnectError::Transport)?
            .tls_config(tls)
            .map_err(ConnectError::Transport)?
            .connect()
            .await
            .map_err(
                |error| match drover_tls::refusal::certificate_problem(&error) {
                    Some(problem) => ConnectError::CertificateRefused(problem),
                    None => ConnectError::Transport(error),
                },
            )
    }
}
