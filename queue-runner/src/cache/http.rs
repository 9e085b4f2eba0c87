//! The binary cache over plain HTTP, on its own listener: stock Nix cannot present a client
//! certificate, and signatures (plus content addresses) give integrity. Serves
//! `/nix-cache-info`, `/<hash>.narinfo`, `/nar/<file>` and `/log/<drv>` (so `nix log` works).
//! Every name is validated before it touches the filesystem.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use nix_primitives::StorePath;
use nix_primitives::store_path::HASH_CHARS;
use tokio_util::io::ReaderStream;

use super::BinaryCache;
use crate::db::{Pool, queries};
use crate::logs::LogStore;
use crate::metrics::CacheMetrics;

/// What the handlers share.
#[derive(Clone)]
struct Served {
    cache: Arc<BinaryCache>,
    logs: LogStore,
    pool: Pool,
    metrics: CacheMetrics,
}

/// The cache's routes; each answer about a cached file moves `metrics`.
pub fn router(
    cache: Arc<BinaryCache>,
    logs: LogStore,
    pool: Pool,
    metrics: CacheMetrics,
) -> Router {
    Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/{name}", get(narinfo))
        .route("/nar/{name}", get(nar))
        .route("/log/{name}", get(log))
        .with_state(Served {
            cache,
            logs,
            pool,
            metrics,
        })
}

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

async fn cache_info(State(served): State<Served>) -> Response {
    file(
        &served,
        "nix-cache-info",
        ("other", "text/x-nix-cache-info"),
    )
    .await
}

async fn narinfo(State(served): State<Served>, Path(name): Path<String>) -> Response {
    let valid = name.strip_suffix(".narinfo").is_some_and(|hash| {
        hash.len() == HASH_CHARS && hash.bytes().all(nix_primitives::base32::is_digit)
    });
    if !valid {
        // Not a narinfo name (a browser's favicon, a scanner): counted apart.
        served.metrics.request("other", "miss");
        return not_found();
    }
    file(&served, &name, ("narinfo", "text/x-nix-narinfo")).await
}

async fn nar(State(served): State<Served>, Path(name): Path<String>) -> Response {
    let valid = name
        .strip_suffix(".nar.zst")
        .is_some_and(|hash| !hash.is_empty() && hash.bytes().all(nix_primitives::base32::is_digit));
    if !valid {
        served.metrics.request("nar", "miss");
        return not_found();
    }
    file(
        &served,
        &format!("nar/{name}"),
        ("nar", "application/x-nix-nar"),
    )
    .await
}

async fn log(State(served): State<Served>, Path(name): Path<String>) -> Response {
    let Ok(drv) = StorePath::from_base_name(&name) else {
        return not_found();
    };
    let Ok(client) = served.pool.get().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let (attempt, file_name) = match queries::latest_log_file(&client, &drv.to_absolute()).await {
        Ok(Some(queries::LatestLog::Kept(attempt, file_name))) => (attempt, file_name),
        Ok(Some(queries::LatestLog::Expired(_)) | None) => return not_found(),
        Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    match served.logs.read_so_far(attempt, &file_name) {
        Ok(log) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            log.bytes,
        )
            .into_response(),
        Err(_) => not_found(),
    }
}

/// Streams a file of the cache directory, relative to it, of a `kind` (a metrics label) and
/// content type. Its bytes count as served when the answer starts.
async fn file(
    served: &Served,
    relative: &str,
    (kind, content_type): (&'static str, &'static str),
) -> Response {
    let Ok(file) = tokio::fs::File::open(served.cache.directory().join(relative)).await else {
        served.metrics.request(kind, "miss");
        return not_found();
    };
    served.metrics.request(kind, "hit");
    if let Ok(metadata) = file.metadata().await {
        served.metrics.served(metadata.len());
    }
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(ReaderStream::new(file)),
    )
        .into_response()
}
