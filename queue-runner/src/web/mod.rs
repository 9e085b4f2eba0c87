//! The farm on the web (`docs/web.md`): the build API as JSON over HTTP ([`api`]), Watch and
//! `FollowLog` as server-sent events ([`events`]), and the API's OpenAPI description
//! ([`openapi`]), on a TLS listener of their own with a certificate of their own (browsers do
//! not trust the farm's CA; an operator may also put it behind a reverse proxy). Callers
//! authenticate with a client certificate of the farm or an API token ([`auth`]). Every
//! handler calls the same use case of [`crate::builds`] as the gRPC service and maps its error
//! through the same status ([`errors`]).

pub mod api;
pub mod auth;
pub mod errors;
pub mod events;
pub mod listener;
pub mod openapi;
pub mod pages;
pub mod query;
pub mod tokens;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{MethodRouter, get, post};
use tokio_util::sync::CancellationToken;

use crate::builds::Builds;
use crate::certificates::Revocations;
use crate::metrics::RefusalMetrics;
use crate::scheduler::driver::CommittedChanges;
use crate::tokens::Tokens;

pub use auth::Peer;
pub use listener::TlsListener;

/// What the handlers share.
#[derive(Clone)]
pub struct WebState {
    /// The build API's use cases.
    pub builds: Builds,
    /// API tokens, checked on every request.
    pub tokens: Tokens,
    /// Revoked certificates, checked on every request.
    pub revocations: Revocations,
    /// Refusals, counted as over gRPC.
    pub refusals: RefusalMetrics,
    /// What the scheduler and ingest commit, for Watch streams.
    pub changes: CommittedChanges,
    /// How often an idle event stream sends a heartbeat (`grpc.heartbeat_ms`).
    pub heartbeat: Duration,
    /// Ends event streams when the runner shuts down.
    pub shutdown: CancellationToken,
    /// Whether the status page, and the reads it makes, need no credential.
    pub public_status: bool,
    /// The status page's overview, read once for every page open ([`pages::OverviewCache`]).
    pub overview: pages::OverviewCache,
}

/// Every route, with its handler (the API, then the status page); a test holds this list and
/// the OpenAPI description's operations to each other.
fn api_routes() -> Vec<(&'static str, Method, MethodRouter<WebState>)> {
    vec![
        ("/api/v1/builds", Method::POST, post(api::submit)),
        ("/api/v1/builds", Method::GET, get(api::list)),
        ("/api/v1/builds/{id}", Method::GET, get(api::get)),
        (
            "/api/v1/builds/{id}/cancel",
            Method::POST,
            post(api::cancel),
        ),
        (
            "/api/v1/builds/{id}/restart",
            Method::POST,
            post(api::restart),
        ),
        ("/api/v1/builds/{id}/events", Method::GET, get(api::watch)),
        ("/api/v1/logs", Method::GET, get(api::log)),
        ("/api/v1/logs/events", Method::GET, get(api::follow_log)),
        ("/api/v1/derivations", Method::POST, post(api::stage)),
        ("/api/v1/job-sets", Method::POST, post(api::submit_job_set)),
        ("/api/v1/tokens", Method::POST, post(tokens::create)),
        ("/api/v1/tokens", Method::GET, get(tokens::list)),
        (
            "/api/v1/tokens/{name}/revoke",
            Method::POST,
            post(tokens::revoke),
        ),
        ("/api/v1/openapi.json", Method::GET, get(openapi::serve)),
        ("/api/v1/status", Method::GET, get(pages::status)),
        (
            "/api/v1/status/events",
            Method::GET,
            get(pages::status_events),
        ),
        ("/", Method::GET, get(pages::overview)),
        ("/builds/{id}", Method::GET, get(pages::build)),
        ("/login", Method::GET, get(pages::login_form)),
        // The one route that takes a body without a credential: a form, a few bytes.
        (
            "/login",
            Method::POST,
            post(pages::login).layer(DefaultBodyLimit::max(4096)),
        ),
        ("/status/app.js", Method::GET, get(pages::script)),
        ("/status/style.css", Method::GET, get(pages::style)),
    ]
}

/// The path and method of every route the router has.
#[must_use]
pub fn routes() -> Vec<(&'static str, Method)> {
    api_routes()
        .into_iter()
        .map(|(path, method, _)| (path, method))
        .collect()
}

/// The web listener's router. A body may be as large as a gRPC submission
/// (`max_submission_bytes`) once base64 has grown it by a third.
pub fn router(state: WebState, max_submission_bytes: usize) -> Router {
    let limit = max_submission_bytes
        .saturating_mul(4)
        .div_ceil(3)
        .saturating_add(64 * 1024);
    api_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, _, handler)| {
            router.route(path, handler)
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(errors::json_refusals))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{openapi, routes};

    #[test]
    fn every_route_is_described_and_every_description_is_a_route() {
        let routed: BTreeSet<(String, String)> = routes()
            .into_iter()
            .map(|(path, method)| (path.to_owned(), method.as_str().to_lowercase()))
            .collect();
        let document = openapi::document();
        let mut described = BTreeSet::new();
        for (path, methods) in document["paths"].as_object().into_iter().flatten() {
            for method in methods.as_object().into_iter().flatten().map(|(m, _)| m) {
                described.insert((path.clone(), method.clone()));
            }
        }
        assert_eq!(routed, described);
    }

    #[test]
    fn every_schema_an_operation_names_exists() {
        let document = openapi::document();
        let schemas = document["components"]["schemas"].as_object();
        let text = document["paths"].to_string();
        for name in text.split("#/components/schemas/").skip(1) {
            let name = name.split('"').next().unwrap_or_default();
            assert!(
                schemas.is_some_and(|schemas| schemas.contains_key(name)),
                "{name} is not described"
            );
        }
        let get = &document["components"]["schemas"]["GetResponse"]["properties"];
        assert!(get.get("build_id").is_some(), "{get}");
    }
}
