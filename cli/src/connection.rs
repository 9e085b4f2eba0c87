//! How the CLI reaches a runner: its gRPC URL and the client certificate to present, from flags
//! or the `DROVER_*` environment variables `drover dev-farm` prints.

use std::path::PathBuf;

use clap::Args;
use error_context::{Classify, Severity};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::exit::{Exit, ExitStatus};

/// Where the runner is and who we are.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// The runner's gRPC endpoint.
    #[arg(long, env = "DROVER_RUNNER", value_name = "URL")]
    pub runner: Option<String>,
    /// The farm's CA certificate.
    #[arg(long, env = "DROVER_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (role client or admin).
    #[arg(long, env = "DROVER_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This client's private key.
    #[arg(long, env = "DROVER_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// Why the runner cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A setting is neither a flag nor in the environment.
    #[error(
        "{what} is not set: pass --{flag} or set {variable} (`drover dev-farm --dir DIR` writes \
         every setting to DIR/env: `source DIR/env`)"
    )]
    Missing {
        /// What it is.
        what: &'static str,
        /// Its flag, without dashes.
        flag: &'static str,
        /// Its environment variable.
        variable: &'static str,
    },
    /// A certificate or key file cannot be read.
    #[error("reading a certificate file")]
    Read(#[source] std::io::Error),
    /// The URL is not usable.
    #[error("{0:?} is not an https:// URL with a host")]
    Url(String),
    /// The connection failed.
    #[error("could not reach the runner at {url}")]
    Transport {
        /// The runner's URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A certificate was refused in the TLS handshake.
    #[error("{0}")]
    CertificateRefused(String),
}

impl Classify for ConnectError {
    fn severity(&self) -> Severity {
        match self {
            Self::Url(_) | Self::Missing { .. } => Severity::Reject,
            // Out of reach: try again later (exit 69).
            Self::Transport { .. } => Severity::Session,
            Self::Read(_) | Self::CertificateRefused(_) => Severity::Fatal,
        }
    }
}

impl ExitStatus for ConnectError {
    fn exit(&self) -> Exit {
        match self {
            Self::Transport { .. } => Exit::Unavailable,
            Self::Missing { .. } | Self::Url(_) | Self::Read(_) | Self::CertificateRefused(_) => {
                Exit::Config
            }
        }
    }
}

impl ConnectionArgs {
    /// Opens an mTLS channel to the runner.
    pub async fn connect(&self) -> Result<Channel, ConnectError> {
        let runner = setting(
            self.runner.as_ref(),
            "the runner's URL",
            "runner",
            "DROVER_RUNNER",
        )?;
        let ca = setting(self.ca.as_ref(), "the farm's CA", "ca", "DROVER_CA")?;
        let cert = setting(
            self.cert.as_ref(),
            "the client certificate",
            "cert",
            "DROVER_CERT",
        )?;
        let key = setting(self.key.as_ref(), "the client key", "key", "DROVER_KEY")?;
        let host = runner
            .strip_prefix("https://")
            .and_then(|rest| rest.split([':', '/']).next())
            .filter(|host| !host.is_empty())
            .ok_or_else(|| ConnectError::Url(runner.clone()))?;
        let read = |path: &PathBuf| fs_err::read(path).map_err(ConnectError::Read);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca)?))
            .identity(Identity::from_pem(read(cert)?, read(key)?))
            .domain_name(host);
        let transport = |source| ConnectError::Transport {
            url: runner.clone(),
            source,
        };
        Endpoint::from_shared(runner.clone())
            .map_err(transport)?
            .tls_config(tls)
            .map_err(transport)?
            .connect()
            .await
            .map_err(
                |error| match drover_tls::refusal::certificate_problem(&error) {
                    Some(problem) => ConnectError::CertificateRefused(problem),
                    None => transport(error),
                },
            )
    }
}

/// A connection setting, or the error naming its flag and variable.
fn setting<'a, T>(
    value: Option<&'a T>,
    what: &'static str,
    flag: &'static str,
    variable: &'static str,
) -> Result<&'a T, ConnectError> {
    value.ok_or(ConnectError::Missing {
        what,
        flag,
        variable,
    })
}
