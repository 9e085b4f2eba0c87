//! The farm's own certificate authority: generated once, written to a directory, reloaded at
//! startup, and used to issue one leaf certificate per runner, builder, client and admin.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::error::CertError;
use crate::files;
use crate::identity::Identity;

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";

/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long the CA is valid: ten years, counting leap days. Long, because replacing it means
/// reissuing every certificate in the farm.
const CA_VALIDITY: Duration = Duration::days(10 * 365 + 2);

/// How long a leaf certificate is valid: 825 days, the longest lifetime common TLS clients
/// (Apple's among them) accept for server certificates.
const LEAF_VALIDITY: Duration = Duration::days(825);

/// How far `notBefore` is backdated, so that a machine whose clock runs a little behind the CA's
/// still accepts a certificate issued a moment ago.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);

/// The longest DNS name accepted (RFC 1035, without the trailing dot).
const MAX_DNS_NAME_LEN: usize = 253;

/// The longest DNS label accepted (RFC 1035).
const MAX_DNS_LABEL_LEN: usize = 63;

/// A CA certificate with its private key, able to issue leaf certificates.
///
/// Its `Debug` shows only the CA's subject: the key must never reach a log.
pub struct CertificateAuthority {
    /// rcgen's signer: the CA's name, key identifier and private key.
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, as written to `ca.pem` and trusted by every peer.
    cert_pem: String,
    /// The CA's subject, such as `CN=drover CA`, for `Debug` and error messages.
    subject: String,
}

impl CertificateAuthority {
    /// Generates a self-signed CA (ECDSA P-256, valid ten years) that may sign leaf certificates
    /// only, not further CAs.
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        let generate_error = |error: rcgen::Error| CertError::Generate {
            subject: common_name.to_owned(),
            reason: error.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_only(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        let certificate = params.self_signed(&key).map_err(generate_error)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: certificate.pem(),
            subject: format!("CN={common_name}"),
        })
    }

    /// Reloads a CA from the PEM texts [`CertificateAuthority::write`] wrote. Checks that the
    /// certificate is a CA and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|error| CertError::InvalidCertificate(error.to_string()))?;
        let certificate = pem
            .parse_x509()
            .map_err(|error| CertError::InvalidCertificate(error.to_string()))?;
        let subject = certificate.subject().to_string();
        if !certificate.is_ca() {
            return Err(CertError::NotCa(subject));
        }
        let key =
            KeyPair::from_pem(key_pem).map_err(|error| CertError::InvalidKey(error.to_string()))?;
        if key.der_bytes() != &*certificate.public_key().subject_public_key.data {
            return Err(CertError::KeyMismatch(subject));
        }
        let issuer = Issuer::from_ca_cert_der(&pem.contents.as_slice().into(), key)
            .map_err(|error| CertError::InvalidCertificate(error.to_string()))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            subject,
        })
    }

    /// Loads the CA from `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_pem = files::read(&dir.join(CA_CERT_FILE))?;
        let key_pem = files::read(&dir.join(CA_KEY_FILE))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Writes `dir/ca.pem` and `dir/ca.key` (mode 0600) into an existing directory, refusing to
    /// replace either file. The paths are `dir` joined with [`CA_CERT_FILE`] and [`CA_KEY_FILE`].
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        let key_pem = self.issuer.key().serialize_pem();
        files::write_pair(
            &dir.join(CA_CERT_FILE),
            &self.cert_pem,
            &dir.join(CA_KEY_FILE),
            &key_pem,
        )
    }

    /// The CA certificate in PEM: what every runner, builder and client trusts.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's subject, such as `CN=drover CA`.
    #[must_use]
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key for `identity`, valid 825 days.
    ///
    /// Its subject alternative names are the identity's `drover://` URI plus `dns_names` and
    /// `ip_addresses` (which a runner needs so that builders can verify it as a server); its
    /// common name is the identity (`builder/b1`). It may serve as both a TLS server and a TLS
    /// client certificate.
    pub fn issue(
        &self,
        identity: &Identity,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
    ) -> Result<IssuedCertificate, CertError> {
        let generate_error = |error: rcgen::Error| CertError::Generate {
            subject: identity.to_string(),
            reason: error.to_string(),
        };
        let mut subject_alt_names = Vec::with_capacity(1 + dns_names.len() + ip_addresses.len());
        subject_alt_names.push(SanType::URI(
            Ia5String::try_from(identity.uri()).map_err(generate_error)?,
        ));
        for dns_name in dns_names {
            subject_alt_names.push(SanType::DnsName(dns_name_san(dns_name)?));
        }
        subject_alt_names.extend(ip_addresses.iter().copied().map(SanType::IpAddress));

        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_only(&identity.to_string());
        params.subject_alt_names = subject_alt_names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY);

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_error)?;
        Ok(IssuedCertificate {
            identity: identity.clone(),
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate and its private key, as issued by a [`CertificateAuthority`].
///
/// Its `Debug` leaves out the key.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// Who the certificate speaks for.
    pub identity: Identity,
    /// The certificate in PEM.
    pub cert_pem: String,
    /// The private key in PKCS#8 PEM. Secret: write it with [`IssuedCertificate::write`], never
    /// log it.
    pub key_pem: String,
}

impl IssuedCertificate {
    /// Writes `dir/<role>-<name>.pem` and `dir/<role>-<name>.key` (mode 0600) into an existing
    /// directory, refusing to replace either file. Returns the certificate and key paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), CertError> {
        let stem = format!("{}-{}", self.identity.role, self.identity.name);
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        files::write_pair(&cert_path, &self.cert_pem, &key_path, &self.key_pem)?;
        Ok((cert_path, key_path))
    }
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// A distinguished name holding only a common name.
fn common_name_only(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Makes the certificate valid from a little before now for `validity`.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW_ALLOWANCE;
    params.not_after = now + validity;
}

/// Checks that `name` is a host name (dot-separated labels of 1 to 63 ASCII letters, digits and
/// hyphens, not starting or ending with a hyphen; 253 characters at most) and encodes it.
fn dns_name_san(name: &str) -> Result<Ia5String, CertError> {
    let valid_label = |label: &str| {
        (1..=MAX_DNS_LABEL_LEN).contains(&label.len())
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let invalid = || CertError::InvalidDnsName(name.to_owned());
    if name.len() > MAX_DNS_NAME_LEN || !name.split('.').all(valid_label) {
        return Err(invalid());
    }
    Ia5String::try_from(name).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    use super::*;
    use crate::identity::Role;

    /// The DER inside a PEM certificate.
    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    fn mode(path: &Path) -> u32 {
        fs_err::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn validity_days(certificate: &X509Certificate<'_>) -> i64 {
        let validity = certificate.validity();
        (validity.not_after.to_datetime() - validity.not_before.to_datetime()).whole_days()
    }

    #[test]
    fn ca_is_a_self_signed_p256_ca_valid_ten_years() {
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        let der = der(ca.cert_pem());
        let certificate = parse(&der);
        assert!(certificate.is_ca());
        assert_eq!(certificate.subject().to_string(), "CN=drover test CA");
        assert_eq!(ca.subject(), "CN=drover test CA");
        assert_eq!(
            certificate.subject().as_raw(),
            certificate.issuer().as_raw()
        );
        certificate.verify_signature(None).unwrap();
        assert_eq!(
            certificate.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
        assert_eq!(validity_days(&certificate), 3652);
    }

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        for role in Role::ALL {
            let identity = Identity::new(role, "m1").unwrap();
            let issued = ca.issue(&identity, &[], &[]).unwrap();
            assert_eq!(issued.identity, identity);
            assert_eq!(
                Identity::from_certificate_der(&der(&issued.cert_pem)).unwrap(),
                identity
            );
        }
    }

    #[test]
    fn a_renewed_certificate_has_the_same_identity_and_another_serial() {
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        let identity = Identity::new(Role::Builder, "b1").unwrap();
        let read = |issued: &IssuedCertificate| {
            crate::PeerCertificate::from_der(&der(&issued.cert_pem)).unwrap()
        };
        let first = read(&ca.issue(&identity, &[], &[]).unwrap());
        let renewed = read(&ca.issue(&identity, &[], &[]).unwrap());
        assert_eq!(first.identity, identity);
        assert_eq!(renewed.identity, identity);
        assert_ne!(first.serial, renewed.serial);
        for serial in [&first.serial, &renewed.serial] {
            assert!(!serial.starts_with('0'), "{serial}");
            assert!(
                serial
                    .bytes()
                    .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)),
                "{serial}"
            );
        }
    }

    #[test]
    fn leaf_has_the_names_usages_and_lifetime_asked_for() {
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        let identity = Identity::new(Role::Runner, "r1").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let issued = ca
            .issue(&identity, &["localhost".to_owned()], &[ip])
            .unwrap();
        let leaf_der = der(&issued.cert_pem);
        let leaf = parse(&leaf_der);
        let ca_der = der(ca.cert_pem());
        let ca_certificate = parse(&ca_der);

        assert!(!leaf.is_ca());
        assert_eq!(leaf.subject().to_string(), "CN=runner/r1");
        assert_eq!(leaf.issuer().as_raw(), ca_certificate.subject().as_raw());
        leaf.verify_signature(Some(ca_certificate.public_key()))
            .unwrap();
        assert_eq!(validity_days(&leaf), 825);

        let names = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::URI("drover://runner/r1")));
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert_eq!(names.len(), 3);

        let key_usage = leaf.key_usage().unwrap().unwrap().value;
        assert!(key_usage.digital_signature());
        assert!(!key_usage.key_cert_sign());
        let extended = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(extended.server_auth && extended.client_auth);

        let key = KeyPair::from_pem(&issued.key_pem).unwrap();
        assert_eq!(key.der_bytes(), &*leaf.public_key().subject_public_key.data);
    }

    #[test]
    fn ca_written_and_loaded_issues_leaves_it_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        ca.write(dir.path()).unwrap();

        let reloaded = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(reloaded.cert_pem(), ca.cert_pem());
        assert_eq!(reloaded.subject(), ca.subject());

        let identity = Identity::new(Role::Builder, "b1").unwrap();
        let issued = reloaded.issue(&identity, &[], &[]).unwrap();
        let leaf_der = der(&issued.cert_pem);
        let leaf = parse(&leaf_der);
        let ca_der = der(ca.cert_pem());
        let ca_certificate = parse(&ca_der);
        assert_eq!(leaf.issuer().as_raw(), ca_certificate.subject().as_raw());
        leaf.verify_signature(Some(ca_certificate.public_key()))
            .unwrap();
        let authority_key_id =
            leaf.iter_extensions()
                .find_map(|extension| match extension.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
                    _ => None,
                });
        let ca_key_id = ca_certificate.iter_extensions().find_map(|extension| {
            match extension.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.clone()),
                _ => None,
            }
        });
        assert!(ca_key_id.is_some());
        assert_eq!(authority_key_id, ca_key_id);
    }

    #[test]
    fn key_files_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        ca.write(dir.path()).unwrap();
        let (ca_cert, ca_key) = (dir.path().join(CA_CERT_FILE), dir.path().join(CA_KEY_FILE));
        let identity = Identity::new(Role::Client, "alice").unwrap();
        let (cert, key) = ca
            .issue(&identity, &[], &[])
            .unwrap()
            .write(dir.path())
            .unwrap();
        assert_eq!(cert, dir.path().join("client-alice.pem"));
        assert_eq!(key, dir.path().join("client-alice.key"));
        assert_eq!(mode(&ca_key), 0o600);
        assert_eq!(mode(&key), 0o600);
        for public in [ca_cert, cert] {
            assert_eq!(mode(&public) & 0o600, 0o600);
        }
    }

    #[test]
    fn write_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertificateAuthority::generate("first").unwrap();
        first.write(dir.path()).unwrap();
        let (cert_path, key_path) = (dir.path().join(CA_CERT_FILE), dir.path().join(CA_KEY_FILE));
        let key_before = fs_err::read_to_string(&key_path).unwrap();
        let second = CertificateAuthority::generate("second").unwrap();
        assert!(matches!(
            second.write(dir.path()),
            Err(CertError::AlreadyExists(path)) if path == cert_path
        ));
        assert_eq!(
            fs_err::read_to_string(&cert_path).unwrap(),
            first.cert_pem()
        );
        assert_eq!(fs_err::read_to_string(&key_path).unwrap(), key_before);

        let identity = Identity::new(Role::Admin, "ops").unwrap();
        let issued = first.issue(&identity, &[], &[]).unwrap();
        issued.write(dir.path()).unwrap();
        let again = first.issue(&identity, &[], &[]).unwrap();
        assert!(matches!(
            again.write(dir.path()),
            Err(CertError::AlreadyExists(_))
        ));
        assert_eq!(
            fs_err::read_to_string(dir.path().join("admin-ops.key")).unwrap(),
            issued.key_pem
        );
    }

    #[test]
    fn debug_never_shows_private_keys() {
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        let issued = ca
            .issue(&Identity::new(Role::Builder, "b1").unwrap(), &[], &[])
            .unwrap();
        assert!(issued.key_pem.contains("PRIVATE KEY"));
        for debug in [format!("{ca:?}"), format!("{issued:?}"), format!("{ca:#?}")] {
            assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        }
        assert!(!format!("{issued:?}").contains(&issued.key_pem));
    }

    #[test]
    fn from_pem_checks_what_it_loads() {
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.write(dir.path()).unwrap();
        let ca_key = fs_err::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
        let other = CertificateAuthority::generate("other").unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        other.write(other_dir.path()).unwrap();
        let other_key = fs_err::read_to_string(other_dir.path().join(CA_KEY_FILE)).unwrap();
        let leaf = ca
            .issue(&Identity::new(Role::Builder, "b1").unwrap(), &[], &[])
            .unwrap();

        assert!(CertificateAuthority::from_pem(ca.cert_pem(), &ca_key).is_ok());
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), &other_key),
            Err(CertError::KeyMismatch(_))
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(CertError::NotCa(_))
        ));
        assert!(matches!(
            CertificateAuthority::from_pem("not pem", &ca_key),
            Err(CertError::InvalidCertificate(_))
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), "not pem"),
            Err(CertError::InvalidKey(_))
        ));
    }

    #[test]
    fn loading_from_an_empty_directory_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            CertificateAuthority::load(dir.path()),
            Err(CertError::Read { path, .. }) if path == dir.path().join(CA_CERT_FILE)
        ));
    }

    #[test]
    fn invalid_dns_names_are_rejected() {
        let ca = CertificateAuthority::generate("drover test CA").unwrap();
        let identity = Identity::new(Role::Runner, "r1").unwrap();
        let too_long = vec!["a".repeat(63); 4].join(".");
        for name in [
            "",
            "a..b",
            "-a",
            "a-",
            "a b",
            "ä.example",
            "*.example.org",
            &too_long,
        ] {
            assert!(
                matches!(
                    ca.issue(&identity, &[name.to_owned()], &[]),
                    Err(CertError::InvalidDnsName(rejected)) if rejected == name
                ),
                "{name:?}"
            );
        }
        for name in ["localhost", "runner.example.org", "r-1.internal"] {
            assert!(
                ca.issue(&identity, &[name.to_owned()], &[]).is_ok(),
                "{name:?}"
            );
        }
    }
}
