//! The two phase errors of this crate: [`IdentityError`] for a peer or command line that names no
//! valid drover identity, and [`CertError`] for making, loading and writing certificates.

use std::io;
use std::path::PathBuf;

use error_context::{Classify, Severity};

/// Why a role, a name or a certificate does not yield a drover identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The role is not one of `runner`, `builder`, `client` or `admin`.
    #[error("{0:?} is not a role (expected runner, builder, client or admin)")]
    InvalidRole(String),
    /// The name is empty, longer than 63 characters, uses characters outside `[a-z0-9._-]`, or
    /// starts with `.` or `-`.
    #[error(
        "{0:?} is not a valid name (1 to 63 of a-z, 0-9, '.', '_', '-', not starting with '.' or '-')"
    )]
    InvalidName(String),
    /// The text has no `/` between role and name (as in `builder/b1`).
    #[error("{0:?} is not of the form role/name")]
    Malformed(String),
    /// The certificate has no `drover://` URI among its subject alternative names.
    #[error("the certificate names no drover:// identity")]
    NoIdentity,
    /// The certificate has more than one `drover://` URI, so it is ambiguous who it is.
    #[error("the certificate names several drover:// identities: {}", .0.join(", "))]
    SeveralIdentities(Vec<String>),
    /// The DER is not a certificate, or its subject alternative names cannot be parsed.
    #[error("unreadable certificate: {0}")]
    Certificate(String),
}

impl Classify for IdentityError {
    fn severity(&self) -> Severity {
        match self {
            Self::InvalidRole(_)
            | Self::InvalidName(_)
            | Self::Malformed(_)
            | Self::NoIdentity
            | Self::SeveralIdentities(_)
            | Self::Certificate(_) => Severity::Reject,
        }
    }
}

/// Why a certificate authority or a certificate could not be made, loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading a PEM file failed; the source names the path.
    #[error("reading a certificate or key file")]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The failure, from `fs_err`, naming the path.
        #[source]
        source: io::Error,
    },
    /// Writing a PEM file failed; the source names the path.
    #[error("writing a certificate or key file")]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// The failure, from `fs_err`, naming the path.
        #[source]
        source: io::Error,
    },
    /// The file to write exists already. Certificates and keys are never replaced silently: an
    /// overwritten CA key would orphan every certificate it signed.
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    AlreadyExists(PathBuf),
    /// Generating a key or signing a certificate failed inside rcgen.
    #[error("generating the certificate for {subject}: {reason}")]
    Generate {
        /// The subject being generated, such as `drover CA` or `builder/b1`.
        subject: String,
        /// rcgen's error text.
        reason: String,
    },
    /// A DNS name to put into a certificate is not a valid host name.
    #[error("{0:?} is not a valid DNS name")]
    InvalidDnsName(String),
    /// The CA certificate PEM (or the DER inside it) cannot be parsed.
    #[error("the CA certificate cannot be parsed: {0}")]
    InvalidCertificate(String),
    /// The CA private key PEM cannot be parsed.
    #[error("the CA private key cannot be parsed: {0}")]
    InvalidKey(String),
    /// The certificate parses but is not a CA certificate (no `CA:TRUE` basic constraint), so
    /// peers would reject everything it signs.
    #[error("the certificate for {0} is not a CA certificate")]
    NotCa(String),
    /// The private key does not belong to the CA certificate, so certificates signed with it would
    /// not verify.
    #[error("the private key does not belong to the CA certificate for {0}")]
    KeyMismatch(String),
}

impl Classify for CertError {
    fn severity(&self) -> Severity {
        match self {
            Self::InvalidDnsName(_) => Severity::Reject,
            Self::Read { .. }
            | Self::Write { .. }
            | Self::AlreadyExists(_)
            | Self::Generate { .. }
            | Self::InvalidCertificate(_)
            | Self::InvalidKey(_)
            | Self::NotCa(_)
            | Self::KeyMismatch(_) => Severity::Fatal,
        }
    }
}
