//! The metrics listener's routes: `GET /metrics` in Prometheus' text format. The runner serves
//! them on an address of their own (loopback by default), apart from the public binary cache.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{CacheSpace, Metrics};
use crate::scheduler::driver::SessionEvent;

/// How long a scrape waits for the scheduler to count its state.
const SCHEDULER_PATIENCE: Duration = Duration::from_secs(5);

/// What the routes read.
struct Source {
    metrics: Arc<Metrics>,
    scheduler: mpsc::Sender<SessionEvent>,
    cache_directory: PathBuf,
    /// One scrape at a time sets the gauges and encodes them.
    encoding: Mutex<()>,
}

/// The routes, reading `metrics`, asking `scheduler` for its counts and measuring the space
/// left for `cache_directory` at each scrape.
pub fn routes(
    metrics: Arc<Metrics>,
    scheduler: mpsc::Sender<SessionEvent>,
    cache_directory: PathBuf,
) -> Router {
    let source = Arc::new(Source {
        metrics,
        scheduler,
        cache_directory,
        encoding: Mutex::new(()),
    });
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(source)
}

async fn scrape(State(source): State<Arc<Source>>) -> Response {
    let (reply, answer) = oneshot::channel();
    let asked = async {
        source
            .scheduler
            .send(SessionEvent::Scrape { reply })
            .await
            .ok()?;
        answer.await.ok()
    };
    let scrape = match tokio::time::timeout(SCHEDULER_PATIENCE, asked).await {
        Ok(Some(scrape)) => scrape,
        Ok(None) => return unavailable("the scheduler has stopped"),
        Err(_) => return unavailable("the scheduler did not answer within 5 s"),
    };
    let space = CacheSpace::of(&source.cache_directory);
    let _encoding = source.encoding.lock().await;
    match source.metrics.encode(&scrape, space) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed").into_response(),
    }
}

fn unavailable(why: &'static str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
}
