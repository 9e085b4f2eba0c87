//! Certificates for drover.
//!
//! Every connection in the farm is mutual TLS under one private certificate authority. A
//! certificate says who its holder is with exactly one subject alternative name of the form
//! `drover://<role>/<name>` (`drover://builder/b1`), where the role is one of runner, builder,
//! client or admin. The runner reads that [`Identity`] from a verified peer certificate and
//! authorises by its [`Role`]; host names and IP addresses in the certificate serve only TLS
//! server verification.
//!
//! # Layout
//!
//! - [`identity`](Identity): roles, names, and reading an identity from a DER certificate.
//! - [`authority`](CertificateAuthority): generating, loading and writing the CA, and issuing
//!   leaf certificates.
//! - `files`: writing PEM files without ever replacing one, keys with mode 0600.
//! - `error`: [`IdentityError`] and [`CertError`], each classified by variant.
//! - [`refusal`]: finding a certificate problem in a failed connection's chain of causes.
//!
//! This crate does no TLS itself: it makes and reads the certificates that the runner's and the
//! builder's TLS configuration load.

mod authority;
mod error;
mod files;
mod identity;
pub mod refusal;

pub use authority::{CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority, IssuedCertificate};
pub use error::{CertError, IdentityError};
pub use identity::{Identity, PeerCertificate, Role};
