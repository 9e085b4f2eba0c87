//! Telling a certificate problem from a network fault in a failed connection: the TLS layer's
//! error is buried in the transport's chain of causes (TLS 1.3 even reports the server's refusal
//! of a client certificate only after the client thinks it connected, as an alert on its first
//! request). A refused certificate will be refused again, so a daemon must stop instead of
//! retrying, and say why; a network fault is worth retrying.
//!
//! The TLS stream under tonic turns rustls's error into an I/O error of kind `InvalidData` that
//! keeps only its text, so that kind, which no network fault has, is what marks a TLS failure;
//! a typed rustls error is used where one survives.

use std::error::Error;

use rustls::AlertDescription;

/// What was wrong with a certificate, if that is why `error` happened: walks its causes, looking
/// inside I/O errors too (their `source` skips the error they wrap).
#[must_use]
pub fn certificate_problem(error: &(dyn Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(error) = current {
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()?
                .get_ref()?
                .downcast_ref::<rustls::Error>()
        });
        if let Some(problem) = tls.and_then(describe) {
            return Some(problem);
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
            && let Some(inner) = io.get_ref()
        {
            return Some(format!(
                "the TLS handshake failed ({inner}): is the certificate issued by the farm's CA?"
            ));
        }
        current = error.source();
    }
    None
}

fn describe(error: &rustls::Error) -> Option<String> {
    match error {
        rustls::Error::InvalidCertificate(reason) => Some(format!(
            "the peer's certificate is not acceptable ({reason:?}): is it from this farm's CA?"
        )),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired),
        ) => Some(format!(
            "the peer refused this certificate ({alert:?}): is it issued by the farm's CA?"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(std::io::Error);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }

    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_tls_failure_that_kept_only_its_text_is_found_by_its_kind() {
        let refused = Wrapper(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: UnknownCA",
        ));
        let problem = certificate_problem(&refused).unwrap();
        assert!(problem.contains("UnknownCA"), "{problem}");
    }

    #[test]
    fn a_refusal_inside_an_io_error_is_found_and_a_network_fault_is_not_one() {
        let refused = Wrapper(std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::UnknownCA,
        )));
        let problem = certificate_problem(&refused).unwrap();
        assert!(problem.contains("UnknownCA"), "{problem}");
        let reset = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(certificate_problem(&reset), None);
        let other_alert = Wrapper(std::io::Error::other(rustls::Error::AlertReceived(
            AlertDescription::CloseNotify,
        )));
        assert_eq!(certificate_problem(&other_alert), None);
    }
}
