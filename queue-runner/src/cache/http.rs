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

/// What the handlers share.
#[derive(Clone)]
struct Served {
    cache: Arc<BinaryCache>,
    logs: LogStore,
    pool: Pool,
}

/// The cache's routes.
pub fn router(cache: Arc<BinaryCache>, logs: LogStore, pool: Pool) -> Router {
    Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/{name}", get(narinfo))
        .route("/nar/{name}", get(nar))
        .route("/log/{name}", get(log))
        .with_state(Served { cache, logs, pool })
}

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

async fn cache_info(State(served): State<Served>) -> Response {
    file(&served, "nix-cache-info", "text/x-nix-cache-info").await
}

async fn narinfo(State(served): State<Served>, Path(name): Path<String>) -> Response {
    let valid = name.strip_suffix(".narinfo").is_some_and(|hash| {
        hash.len() == HASH_CHARS && hash.bytes().all(nix_primitives::base32::is_digit)
    });
    if !valid {
        return not_found();
    }
    file(&served, &name, "text/x-nix-narinfo").await
}

async fn nar(State(served): State<Served>, Path(name): Path<String>) -> Response {
    let valid = name
        .strip_suffix(".nar.zst")
        .is_some_and(|hash| !hash.is_empty() && hash.bytes().all(nix_primitives::base32::is_digit));
    if !valid {
        return not_found();
    }
    file(&served, &format!("nar/{name}"), "application/x-nix-nar").await
}

async fn log(State(served): State<Served>, Path(name): Path<String>) -> Response {
    let Ok(drv) = StorePath::from_base_name(&name) else {
        return not_found();
    };
    let Ok(client) = served.pool.get().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let (attempt, file_name) = match queries::latest_log_file(&client, &drv.to_absolute()).await {
        Ok(Some(latest)) => latest,
        Ok(None) => return not_found(),
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

/// Streams a file of the cache directory, relative to it.
async fn file(served: &Served, relative: &str, content_type: &'static str) -> Response {
    match tokio::fs::File::open(served.cache.directory().join(relative)).await {
        Ok(file) => (
            [(header::CONTENT_TYPE, content_type)],
            Body::from_stream(ReaderStream::new(file)),
        )
            .into_response(),
        Err(_) => not_found(),
    }
}
