//! Who is calling: the identity in the verified client certificate, never a message field, and
//! only while that certificate is not revoked (checked on every call: uploads reuse connections
//! opened before a revocation). Every refusal is an audit line naming the caller, the method
//! and why.

use drover_tls::{Identity, PeerCertificate, Role};
use tonic::{Request, Status};

use crate::certificates::Revocations;
use crate::metrics::RefusalMetrics;

/// The caller's identity, if its role is one of `roles`; a refusal is logged.
pub fn require<T>(request: &Request<T>, roles: &[Role]) -> Result<Identity, Status> {
    require_certificate(request, roles).map(|peer| peer.identity)
}

/// The caller's certificate, if its role is one of `roles`; a refusal is logged.
pub fn require_certificate<T>(
    request: &Request<T>,
    roles: &[Role],
) -> Result<PeerCertificate, Status> {
    let identified = identify(request, roles);
    if let Err(status) = &identified {
        if let Some(refusals) = request.extensions().get::<RefusalMetrics>() {
            refusals.refused(status.code());
        }
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
/// server does not hand its handlers: [`prepare`] puts it in the request's extensions.
#[derive(Debug, Clone)]
pub struct CalledMethod(String);

/// Resolves, with the refusal to send, once the certificate `peer` is revoked: for streams and
/// sessions that outlive the call's check.
pub fn revoked<T>(
    request: &Request<T>,
    peer: &PeerCertificate,
) -> Result<impl Future<Output = Status> + Send + Sync + 'static, Status> {
    let revocations = revocations(request)?.clone();
    let (serial, identity) = (peer.serial.clone(), peer.identity.to_string());
    Ok(async move {
        revocations.revoked(&serial).await;
        refusal(&serial, &identity)
    })
}

fn revocations<T>(request: &Request<T>) -> Result<&Revocations, Status> {
    // Without the registry nothing can be said to be valid: refuse rather than let a revoked
    // certificate through.
    request
        .extensions()
        .get::<Revocations>()
        .ok_or_else(|| Status::internal("the runner cannot check revocations"))
}

fn refusal(serial: &str, identity: &str) -> Status {
    Status::unauthenticated(format!(
        "the certificate {serial} of {identity} has been revoked"
    ))
}

/// Gives every request what [`require`] needs besides the certificate: the method it calls (for
/// audit lines) and the revoked serials. The server runs it on every request.
pub fn prepare<B>(
    revocations: Revocations,
    refusals: RefusalMetrics,
) -> impl Fn(axum::http::Request<B>) -> axum::http::Request<B> + Clone {
    move |mut request| {
        let method = request.uri().path().trim_start_matches('/').to_owned();
        request.extensions_mut().insert(CalledMethod(method));
        request.extensions_mut().insert(revocations.clone());
        request.extensions_mut().insert(refusals.clone());
        request
    }
}

fn identify<T>(request: &Request<T>, roles: &[Role]) -> Result<PeerCertificate, Status> {
    let certificates = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certificates
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let peer = PeerCertificate::from_der(leaf.as_ref()).map_err(|error| {
        Status::unauthenticated(format!(
            "the client certificate names no drover identity: {error}"
        ))
    })?;
    if revocations(request)?.is_revoked(&peer.serial) {
        return Err(refusal(&peer.serial, &peer.identity.to_string()));
    }
    if roles.contains(&peer.identity.role) {
        Ok(peer)
    } else {
        Err(Status::permission_denied(format!(
            "{} may not call this service",
            peer.identity
        )))
    }
}
