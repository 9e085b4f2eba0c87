//! Health on the runner's HTTP listener, for load balancers, orchestrators and people:
//! `/healthz` answers while the process serves; `/readyz` answers 200 only when the database
//! answers, the schema is migrated (the runner serves only after migrating) and the scheduler
//! has recovered its queue, and 503 with the reason otherwise, also while shutting down. Losing
//! the database for good is not a readiness matter: the runner exits and systemd restarts it.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::db::Pool;
use crate::scheduler::driver::QueueRecovered;

/// How long `/readyz` waits for the database.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness depends on.
#[derive(Clone)]
struct Readiness {
    pool: Pool,
    recovered: QueueRecovered,
    shutdown: CancellationToken,
}

/// The health routes.
pub fn router(pool: Pool, recovered: QueueRecovered, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "alive\n" }))
        .route("/readyz", get(ready))
        .with_state(Readiness {
            pool,
            recovered,
            shutdown,
        })
}

async fn ready(State(readiness): State<Readiness>) -> (StatusCode, String) {
    match unready(&readiness).await {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Why the runner is not ready, if it is not.
async fn unready(readiness: &Readiness) -> Option<String> {
    if readiness.shutdown.is_cancelled() {
        return Some("shutting down".to_owned());
    }
    let answered = tokio::time::timeout(DATABASE_TIMEOUT, async {
        let client = readiness
            .pool
            .get()
            .await
            .map_err(|error| error.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    })
    .await;
    match answered {
        Err(_) => {
            return Some(format!(
                "the database did not answer within {DATABASE_TIMEOUT:?}"
            ));
        }
        Ok(Err(error)) => return Some(format!("the database failed: {error}")),
        Ok(Ok(())) => {}
    }
    (!readiness.recovered.get()).then(|| "the scheduler is still recovering its queue".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_once_recovered_with_a_database_and_not_while_shutting_down() {
        let database = test_support::TestPostgres::shared().create_database().await;
        let readiness = Readiness {
            pool: crate::db::Connector::new(&crate::db::DatabaseConfig::plain(
                &database.connection_string,
            ))
            .unwrap()
            .pool(1)
            .unwrap(),
            recovered: QueueRecovered::default(),
            shutdown: CancellationToken::new(),
        };
        assert_eq!(
            unready(&readiness).await.as_deref(),
            Some("the scheduler is still recovering its queue")
        );
        readiness.recovered.set();
        assert_eq!(unready(&readiness).await, None);
        readiness.shutdown.cancel();
        assert_eq!(unready(&readiness).await.as_deref(), Some("shutting down"));
    }
}
