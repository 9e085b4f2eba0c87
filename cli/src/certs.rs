//! `drover certs`: create the farm's certificate authority in a directory and issue role
//! certificates from it into the same directory.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use drover_tls::{
    CA_CERT_FILE, CA_KEY_FILE, CertError, CertificateAuthority, Identity, IdentityError, Role,
};
use error_context::{Classify, ResultExt as _, Severity, WithContext};

use crate::exit::{Exit, ExitStatus};

/// Mode of a CA directory this command creates: it holds private keys, so only its owner may
/// list or enter it.
const PRIVATE_DIR_MODE: u32 = 0o700;

/// The `drover certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a certificate authority: writes DIR/ca.pem and DIR/ca.key, creating DIR if needed.
    InitCa {
        /// The directory for the CA (created with mode 0700 if it does not exist).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, value_name = "NAME", default_value = "drover CA")]
        common_name: String,
    },
    /// Issue a certificate signed by the CA in DIR: writes DIR/<role>-<name>.pem and .key.
    Issue {
        /// The directory holding ca.pem and ca.key; the new files are written there too.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// What the holder may do: runner, builder, client or admin.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// Which holder it is: 1 to 63 of a-z, 0-9, '.', '_', '-', not starting with '.' or '-'.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// A DNS name to add, for TLS server verification (repeatable). A runner with neither
        /// --dns nor --ip gets localhost and 127.0.0.1.
        #[arg(long = "dns", value_name = "NAME")]
        dns_names: Vec<String>,
        /// An IP address to add, for TLS server verification (repeatable).
        #[arg(long = "ip", value_name = "ADDR")]
        ip_addresses: Vec<IpAddr>,
    },
}

/// Why a `drover certs` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The role or name on the command line is not a valid identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Making, loading or writing a certificate failed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The CA directory could not be created; the source names the path.
    #[error("creating the CA directory")]
    CreateDir {
        /// The directory that could not be created.
        path: PathBuf,
        /// The failure, from `fs_err`.
        #[source]
        source: io::Error,
    },
}

impl ExitStatus for CertsError {
    /// A refused identity or name is bad usage; a missing CA, one that exists already or a
    /// directory that cannot be written is this machine's state.
    fn exit(&self) -> Exit {
        match self.severity() {
            Severity::Reject => Exit::Usage,
            _ => Exit::Config,
        }
    }
}

impl Classify for CertsError {
    fn severity(&self) -> Severity {
        match self {
            Self::Identity(error) => error.severity(),
            Self::Cert(error) => error.severity(),
            Self::CreateDir { .. } => Severity::Fatal,
        }
    }
}

/// Runs one `drover certs` subcommand, printing the paths it wrote to stdout.
pub fn run(command: CertsCommand) -> Result<(), WithContext<CertsError>> {
    let written = match command {
        CertsCommand::InitCa { dir, common_name } => init_ca(&dir, &common_name)?,
        CertsCommand::Issue {
            dir,
            role,
            name,
            dns_names,
            ip_addresses,
        } => issue(&dir, &role, &name, dns_names, ip_addresses)?,
    };
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Creates `dir` if needed and writes a new CA into it. Returns the certificate and key paths.
fn init_ca(dir: &Path, common_name: &str) -> Result<[PathBuf; 2], WithContext<CertsError>> {
    create_private_dir(dir)?;
    let ca = CertificateAuthority::generate(common_name)
        .map_err(CertsError::from)
        .with_context(|| format!("generating the CA {common_name:?}"))?;
    ca.write(dir)
        .map_err(CertsError::from)
        .with_context(|| format!("writing the CA to {}", dir.display()))?;
    Ok([dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE)])
}

/// Issues a certificate from the CA in `dir` and writes it next to the CA. Returns the certificate
/// and key paths.
fn issue(
    dir: &Path,
    role: &str,
    name: &str,
    mut dns_names: Vec<String>,
    mut ip_addresses: Vec<IpAddr>,
) -> Result<[PathBuf; 2], WithContext<CertsError>> {
    let identity = Role::parse(role)
        .and_then(|role| Identity::new(role, name))
        .map_err(CertsError::from)
        .context("reading --role and --name")?;
    if identity.role == Role::Runner && dns_names.is_empty() && ip_addresses.is_empty() {
        // A runner certificate without host names verifies nowhere; default to the local machine
        // so that a single-host farm works out of the box.
        dns_names.push("localhost".to_owned());
        ip_addresses.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let ca = CertificateAuthority::load(dir)
        .map_err(CertsError::from)
        .with_context(|| format!("loading the CA from {}", dir.display()))?;
    let issued = ca
        .issue(&identity, &dns_names, &ip_addresses)
        .map_err(CertsError::from)
        .with_context(|| format!("issuing a certificate for {identity}"))?;
    let (cert_path, key_path) = issued
        .write(dir)
        .map_err(CertsError::from)
        .with_context(|| format!("writing the certificate for {identity}"))?;
    Ok([cert_path, key_path])
}

/// Creates `dir` and its parents; a directory created here gets mode 0700.
fn create_private_dir(dir: &Path) -> Result<(), CertsError> {
    if dir.is_dir() {
        return Ok(());
    }
    let create_error = |source| CertsError::CreateDir {
        path: dir.to_owned(),
        source,
    };
    fs_err::create_dir_all(dir).map_err(create_error)?;
    fs_err::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .map_err(create_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_identities_are_refused_input() {
        let dir = tempfile::tempdir().unwrap();
        for (role, name) in [("root", "b1"), ("builder", "-b1")] {
            let error = issue(dir.path(), role, name, vec![], vec![]).unwrap_err();
            assert!(matches!(error.root(), CertsError::Identity(_)));
            assert_eq!(error.severity(), Severity::Reject);
        }
        // Refused before the (missing) CA is even looked at.
        assert!(fs_err::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn a_bad_dns_name_is_refused_input_once_the_ca_exists() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA").unwrap();
        let error = issue(dir.path(), "runner", "r1", vec!["a b".to_owned()], vec![]).unwrap_err();
        assert!(matches!(
            error.root(),
            CertsError::Cert(CertError::InvalidDnsName(_))
        ));
        assert_eq!(error.severity(), Severity::Reject);
    }

    #[test]
    fn a_missing_ca_or_a_second_init_is_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let error = issue(dir.path(), "builder", "b1", vec![], vec![]).unwrap_err();
        assert!(matches!(
            error.root(),
            CertsError::Cert(CertError::Read { .. })
        ));
        assert_eq!(error.severity(), Severity::Fatal);

        init_ca(dir.path(), "test CA").unwrap();
        let error = init_ca(dir.path(), "test CA").unwrap_err();
        assert!(matches!(
            error.root(),
            CertsError::Cert(CertError::AlreadyExists(_))
        ));
        assert_eq!(error.severity(), Severity::Fatal);
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs_err::write(&file, "").unwrap();
        let error = init_ca(&file.join("ca"), "test CA").unwrap_err();
        assert!(matches!(error.root(), CertsError::CreateDir { .. }));
    }
}
