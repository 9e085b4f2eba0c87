//! Who calls the HTTP API: the farm's client certificate the connection presented (checked
//! against revocations on every request), or an API token sent as `Authorization: Bearer` or,
//! for the status page's reads only, in the `drover_token` cookie (checked against the database
//! on every request). The cookie never authorises a change: a page of another site, or of a
//! sibling site, cannot make a signed-in browser cancel a build.
//! Every refusal is an audit line and a counted refusal, as over gRPC.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use axum::serve::IncomingStream;
use drover_tls::{Identity, PeerCertificate, Role};
use tonic::Status;

use super::WebState;
use super::errors::ApiError;
use super::listener::TlsListener;

/// The cookie the status page's login sets.
pub const TOKEN_COOKIE: &str = "drover_token";

/// Roles that may use the build API.
pub const BUILD_API: &[Role] = &[Role::Client, Role::Admin];

/// A connection's peer: its address, and the client certificate it presented, if any.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Where it connects from.
    pub address: SocketAddr,
    /// Its certificate, signed by the farm's CA (the handshake checked that).
    pub certificate: Option<PeerCertificate>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let certificate = stream
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| PeerCertificate::from_der(leaf.as_ref()).ok());
        Self {
            address: *stream.remote_addr(),
            certificate,
        }
    }
}

/// How a caller proved who it is: what a stream watches to end when that proof is revoked.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A certificate, by serial.
    Certificate(String),
    /// An API token, by id.
    Token(i64),
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who it acts as.
    pub identity: Identity,
    /// How it proved it.
    pub credential: Credential,
}

impl Caller {
    /// The caller, if its role is one of `roles`; a refusal is logged.
    pub fn require(self, roles: &[Role], state: &WebState) -> Result<Self, ApiError> {
        if roles.contains(&self.identity.role) {
            return Ok(self);
        }
        let status =
            Status::permission_denied(format!("{} may not use the HTTP API", self.identity));
        Err(refuse(state, &self.identity.to_string(), status))
    }

    /// Resolves, with the refusal to end a stream with, once the caller's credential is
    /// revoked (a token revoked by SQL is noticed within a heartbeat).
    pub fn revoked(&self, state: &WebState) -> impl Future<Output = Status> + Send + use<> {
        let credential = self.credential.clone();
        let (revocations, tokens) = (state.revocations.clone(), state.tokens.clone());
        let every = state.heartbeat;
        let identity = self.identity.to_string();
        async move {
            match credential {
                Credential::Certificate(serial) => revocations.revoked(&serial).await,
                Credential::Token(token) => tokens.revoked(token, every).await,
            }
            Status::unauthenticated(format!("the credential of {identity} has been revoked"))
        }
    }
}

impl FromRequestParts<WebState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &WebState) -> Result<Self, ApiError> {
        authenticate(parts, state, Cookie::Ignored).await
    }
}

/// Whether the status page's cookie counts as a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cookie {
    /// For reads.
    Accepted,
    /// For changes.
    Ignored,
}

/// The caller a request's certificate or token names; a refusal is logged.
async fn authenticate(parts: &Parts, state: &WebState, cookie: Cookie) -> Result<Caller, ApiError> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<Peer>>()
        .map(|ConnectInfo(peer)| peer.clone());
    let address = peer
        .as_ref()
        .map_or_else(|| "unknown".to_owned(), |peer| peer.address.to_string());
    if let Some(certificate) = peer.and_then(|peer| peer.certificate) {
        if state.revocations.is_revoked(&certificate.serial) {
            let status = Status::unauthenticated(format!(
                "the certificate {} of {} has been revoked",
                certificate.serial, certificate.identity
            ));
            return Err(refuse(state, &certificate.identity.to_string(), status));
        }
        return Ok(Caller {
            identity: certificate.identity,
            credential: Credential::Certificate(certificate.serial),
        });
    }
    let Some(secret) = presented_token(parts, cookie) else {
        let status = Status::unauthenticated(
            "a client certificate or an API token (Authorization: Bearer) is required",
        );
        return Err(refuse(state, &address, status));
    };
    let holder = state
        .tokens
        .holder(&secret)
        .await
        .map_err(|error| ApiError::from(crate::grpc::status::unavailable(&error)))?;
    let Some(holder) = holder else {
        let status = Status::unauthenticated("the API token is not valid (revoked, or unknown)");
        return Err(refuse(state, &address, status));
    };
    Ok(Caller {
        identity: holder.identity,
        credential: Credential::Token(holder.token),
    })
}

/// A caller of a read-only route: an authenticated client or admin, or, when `[web]
/// public_status` is set, anyone who presents no credential (`None`).
#[derive(Debug, Clone)]
pub struct Reader(pub Option<Caller>);

impl Reader {
    /// Resolves, with the refusal to end a stream with, once the reader's credential is
    /// revoked; never for a reader without one.
    pub fn revoked(&self, state: &WebState) -> impl Future<Output = Status> + Send + use<> {
        let revoked = self.0.as_ref().map(|caller| caller.revoked(state));
        async move {
            match revoked {
                Some(revoked) => revoked.await,
                None => std::future::pending().await,
            }
        }
    }
}

impl FromRequestParts<WebState> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &WebState) -> Result<Self, ApiError> {
        let certified = parts
            .extensions
            .get::<ConnectInfo<Peer>>()
            .is_some_and(|ConnectInfo(peer)| peer.certificate.is_some());
        if state.public_status && !certified && presented_token(parts, Cookie::Accepted).is_none() {
            return Ok(Self(None));
        }
        let caller = authenticate(parts, state, Cookie::Accepted)
            .await
            .and_then(|caller| caller.require(BUILD_API, state));
        match caller {
            Ok(caller) => Ok(Self(Some(caller))),
            // A stale cookie does not lock anyone out of a public page.
            Err(_) if state.public_status => Ok(Self(None)),
            Err(refused) => Err(refused),
        }
    }
}

/// The token a request presents: `Authorization: Bearer`, else, for reads, the status page's
/// cookie.
fn presented_token(parts: &Parts, cookie: Cookie) -> Option<String> {
    let bearer = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let from_cookie = || {
        if cookie == Cookie::Ignored {
            return None;
        }
        parts
            .headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .find_map(|pair| pair.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
    };
    bearer.or_else(from_cookie).map(str::to_owned)
}

/// Logs and counts a refusal; returns it as the answer.
fn refuse(state: &WebState, caller: &str, status: Status) -> ApiError {
    state.refusals.refused(status.code());
    crate::audit::refused_rpc(caller, "HTTP API", status.message());
    ApiError::from(status)
}
