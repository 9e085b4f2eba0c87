//! Who is calling: the identity in the verified client certificate, never a message field.

use drover_tls::{Identity, Role};
use tonic::{Request, Status};

/// The caller's identity, if its role is one of `roles`.
pub fn require<T>(request: &Request<T>, roles: &[Role]) -> Result<Identity, Status> {
    let certificates = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certificates
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let identity = Identity::from_certificate_der(leaf.as_ref()).map_err(|error| {
        Status::unauthenticated(format!(
            "the client certificate names no drover identity: {error}"
        ))
    })?;
    if roles.contains(&identity.role) {
        Ok(identity)
    } else {
        Err(Status::permission_denied(format!(
            "{identity} may not call this service"
        )))
    }
}
