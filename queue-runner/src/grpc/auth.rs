//! Who is calling: the identity in the verified client certificate, never a message field.
//! Every refusal is an audit line naming the caller, the method and why.

use drover_tls::{Identity, Role};
use tonic::{Request, Status};

/// The caller's identity, if its role is one of `roles`; a refusal is logged.
pub fn require<T>(request: &Request<T>, roles: &[Role]) -> Result<Identity, Status> {
    let identified = identify(request, roles);
    if let Err(status) = &identified {
        let caller = request.peer_certs().and_then(|certificates| {
            let leaf = certificates.first()?;
            Identity::from_certificate_der(leaf.as_ref()).ok()
        });
        let caller = match (caller, request.remote_addr()) {
            (Some(identity), _) => identity.to_string(),
            (None, Some(address)) => address.to_string(),
            (None, None) => "unknown".to_owned(),
        };
        let method = request
            .extensions()
            .get::<CalledMethod>()
            .map_or("", |method| method.0.as_str());
        crate::audit::refused_rpc(&caller, method, status.message());
    }
    identified
}

/// The gRPC method a request calls (`drover.v1.BuildService/Get`), which tonic's
/// server does not hand its handlers: [`record_method`] puts it in the request's extensions.
#[derive(Debug, Clone)]
pub struct CalledMethod(String);

/// Records the method `request` calls, for audit lines; the server runs it on every request.
pub fn record_method<B>(mut request: axum::http::Request<B>) -> axum::http::Request<B> {
    let method = request.uri().path().trim_start_matches('/').to_owned();
    request.extensions_mut().insert(CalledMethod(method));
    request
}

fn identify<T>(request: &Request<T>, roles: &[Role]) -> Result<Identity, Status> {
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
