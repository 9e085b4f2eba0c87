//! Who a certificate speaks for: a [`Role`] and a name, carried in the certificate as one
//! `drover://<role>/<name>` URI subject alternative name and read back from a peer's DER.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;

use crate::error::IdentityError;

/// The URI scheme (with its separator) that marks the identity among the subject alternative
/// names. Compared case-insensitively, as URI schemes are, so that a differently cased second
/// identity cannot hide from the "exactly one" rule.
const SCHEME_PREFIX: &str = "drover://";

/// The longest name accepted: one DNS label, so that a name can also serve as a host name.
const MAX_NAME_LEN: usize = 63;

/// What a certificate holder may do in the farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The queue runner: the server builders and clients connect to.
    Runner,
    /// A builder machine that connects to the runner and runs steps.
    Builder,
    /// A user or tool that submits and watches builds.
    Client,
    /// An operator allowed to change the farm (drain builders, cancel builds).
    Admin,
}

impl Role {
    /// Every role, in declaration order.
    pub const ALL: [Self; 4] = [Self::Runner, Self::Builder, Self::Client, Self::Admin];

    /// The lower-case name used in URIs, file names and on the command line.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Runner => "runner",
            Self::Builder => "builder",
            Self::Client => "client",
            Self::Admin => "admin",
        }
    }

    /// Parses a lower-case role name, as [`Role::as_str`] writes it.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        Self::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| IdentityError::InvalidRole(text.to_owned()))
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role and a name, such as `builder/b1`: what a certificate is issued to and what a verified
/// peer is authorised as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What the holder may do.
    pub role: Role,
    /// Which holder it is: 1 to 63 characters of `[a-z0-9._-]`, not starting with `.` or `-`.
    pub name: String,
}

impl Identity {
    /// An identity with a validated name.
    pub fn new(role: Role, name: &str) -> Result<Self, IdentityError> {
        if !is_valid_name(name) {
            return Err(IdentityError::InvalidName(name.to_owned()));
        }
        Ok(Self {
            role,
            name: name.to_owned(),
        })
    }

    /// The URI that carries this identity in a certificate, such as `drover://builder/b1`.
    #[must_use]
    pub fn uri(&self) -> String {
        format!("{SCHEME_PREFIX}{self}")
    }

    /// Reads the identity from a DER certificate: exactly one of its subject alternative names
    /// must be a `drover://` URI, and that URI must hold a valid role and name.
    ///
    /// This does not verify the certificate; call it on a peer certificate the TLS stack has
    /// already verified against the farm's CA.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        PeerCertificate::from_der(der).map(|peer| peer.identity)
    }

    /// The identity in a parsed certificate's subject alternative names.
    fn from_certificate(
        certificate: &x509_parser::certificate::X509Certificate<'_>,
    ) -> Result<Self, IdentityError> {
        let names = certificate
            .subject_alternative_name()
            .map_err(|error| IdentityError::Certificate(error.to_string()))?
            .map(|extension| extension.value.general_names.as_slice())
            .unwrap_or_default();
        let mut uris = names.iter().filter_map(|name| match name {
            GeneralName::URI(uri) if has_drover_scheme(uri) => Some(*uri),
            _ => None,
        });
        match (uris.next(), uris.next()) {
            (None, _) => Err(IdentityError::NoIdentity),
            (Some(uri), None) => uri[SCHEME_PREFIX.len()..].parse(),
            (Some(first), Some(second)) => {
                let all = [first, second]
                    .into_iter()
                    .chain(uris)
                    .map(str::to_owned)
                    .collect();
                Err(IdentityError::SeveralIdentities(all))
            }
        }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    /// Parses `role/name`, as [`Identity`]'s `Display` writes it.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (role, name) = text
            .split_once('/')
            .ok_or_else(|| IdentityError::Malformed(text.to_owned()))?;
        Self::new(Role::parse(role)?, name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Whether `uri` starts with `drover://`, in any case.
fn has_drover_scheme(uri: &str) -> bool {
    uri.get(..SCHEME_PREFIX.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME_PREFIX))
}

/// Whether `name` is 1 to 63 characters of `[a-z0-9._-]` not starting with `.` or `-`: safe as a
/// file name component, a URI path segment and a DNS label.
fn is_valid_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name.chars().all(allowed)
        && !name.starts_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()).unwrap(), role);
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!(matches!(
            Role::parse("Builder"),
            Err(IdentityError::InvalidRole(role)) if role == "Builder"
        ));
        assert!(matches!(
            Role::parse(""),
            Err(IdentityError::InvalidRole(_))
        ));
    }

    #[test]
    fn identity_displays_as_role_slash_name_and_uri() {
        let identity = Identity::new(Role::Builder, "b1").unwrap();
        assert_eq!(identity.to_string(), "builder/b1");
        assert_eq!(identity.uri(), "drover://builder/b1");
        assert_eq!("builder/b1".parse::<Identity>().unwrap(), identity);
    }

    #[test]
    fn valid_names_are_accepted() {
        let longest = "a".repeat(MAX_NAME_LEN);
        for name in ["b1", "0", "a.b_c-d", "x-", "host.example.org", &longest] {
            assert!(Identity::new(Role::Client, name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn invalid_names_are_rejected() {
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        for name in [
            "", ".hidden", "-flag", "B1", "a/b", "a b", "ä", "a:b", "a\n", &too_long,
        ] {
            assert!(
                matches!(
                    Identity::new(Role::Admin, name),
                    Err(IdentityError::InvalidName(rejected)) if rejected == name
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn malformed_identity_text_is_typed() {
        assert!(matches!(
            "builder".parse::<Identity>(),
            Err(IdentityError::Malformed(_))
        ));
        assert!(matches!(
            "root/b1".parse::<Identity>(),
            Err(IdentityError::InvalidRole(role)) if role == "root"
        ));
        assert!(matches!(
            "builder/b1/x".parse::<Identity>(),
            Err(IdentityError::InvalidName(_))
        ));
    }

    /// A self-signed certificate with exactly these subject alternative names.
    fn certificate_with(uris: &[&str], dns_names: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        for dns_name in dns_names {
            params
                .subject_alt_names
                .push(rcgen::SanType::DnsName((*dns_name).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_is_read_from_the_one_drover_uri() {
        let der = certificate_with(
            &["https://example.org/", "drover://runner/r1"],
            &["localhost"],
        );
        assert_eq!(
            Identity::from_certificate_der(&der).unwrap(),
            Identity::new(Role::Runner, "r1").unwrap()
        );
    }

    #[test]
    fn certificate_without_a_drover_uri_has_no_identity() {
        for der in [
            certificate_with(&[], &[]),
            certificate_with(&[], &["builder.example.org"]),
            certificate_with(&["https://builder/b1", "drover:builder/b1"], &[]),
        ] {
            assert!(matches!(
                Identity::from_certificate_der(&der),
                Err(IdentityError::NoIdentity)
            ));
        }
    }

    #[test]
    fn bad_role_or_name_in_the_uri_is_typed() {
        let der = certificate_with(&["drover://root/b1"], &[]);
        assert!(matches!(
            Identity::from_certificate_der(&der),
            Err(IdentityError::InvalidRole(role)) if role == "root"
        ));
        let der = certificate_with(&["drover://builder/-b1"], &[]);
        assert!(matches!(
            Identity::from_certificate_der(&der),
            Err(IdentityError::InvalidName(name)) if name == "-b1"
        ));
        let der = certificate_with(&["drover://builder"], &[]);
        assert!(matches!(
            Identity::from_certificate_der(&der),
            Err(IdentityError::Malformed(_))
        ));
    }

    #[test]
    fn several_drover_uris_are_ambiguous() {
        let der = certificate_with(&["drover://builder/b1", "DROVER://admin/root"], &[]);
        assert!(matches!(
            Identity::from_certificate_der(&der),
            Err(IdentityError::SeveralIdentities(uris)) if uris.len() == 2
        ));
    }

    #[test]
    fn garbage_der_is_a_certificate_error() {
        assert!(matches!(
            Identity::from_certificate_der(b"not a certificate"),
            Err(IdentityError::Certificate(_))
        ));
    }

    #[test]
    fn scheme_is_matched_case_insensitively() {
        assert!(has_drover_scheme("drover://builder/b1"));
        assert!(has_drover_scheme("DROVER://builder/b1"));
        assert!(!has_drover_scheme("https://builder/b1"));
        assert!(!has_drover_scheme("drover:"));
    }
}

/// A peer's certificate as the runner tells callers apart: the identity it names and its serial
/// number, which is what revocation names (one identity may hold several certificates, as a
/// renewal makes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// Whose it is.
    pub identity: Identity,
    /// Its serial number in hex, lowercase: what `openssl x509 -noout -serial` prints, in
    /// lowercase.
    pub serial: String,
}

impl PeerCertificate {
    /// Reads a DER certificate. Like [`Identity::from_certificate_der`], this does not verify
    /// it.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (rest, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| IdentityError::Certificate(error.to_string()))?;
        if !rest.is_empty() {
            return Err(IdentityError::Certificate(format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            )));
        }
        Ok(Self {
            identity: Identity::from_certificate(&certificate)?,
            serial: format!("{:x}", certificate.serial),
        })
    }
}
