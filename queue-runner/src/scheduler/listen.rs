//! The LISTEN connection: a dedicated connection (notifications on pooled connections are
//! lost) that wakes ingest on every notification of newly queued builds and after every
//! (re)connect, so builds queued while it was down are found. Only a wake-up: ingest finds the
//! builds by their durable marker (`ingested_at IS NULL`).

use std::sync::Arc;
use std::time::Duration;

use error_context::{ResultExt as _, WithContext};
use futures_util::StreamExt as _;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::DbError;

/// The channel the builds trigger notifies.
pub const CHANNEL: &str = "drover_builds_queued";

/// Consecutive failed (re)connections of the LISTEN connection before the database counts as
/// lost, which is fatal.
const LISTEN_RECONNECTS: u32 = 5;

/// Keeps a dedicated connection listening on [`CHANNEL`] and wakes ingest on every
/// notification and after every (re)connect.
pub async fn listen(
    url: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<(), WithContext<DbError>> {
    let mut failures = 0;
    loop {
        match listen_once(&url, &wake, &shutdown, &mut failures).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                failures += 1;
                if failures >= LISTEN_RECONNECTS {
                    return Err(error).context("the LISTEN connection failed repeatedly");
                }
                tracing::warn!(error = %error.report(), "LISTEN connection lost; reconnecting");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(200 << failures)) => {}
                }
            }
        }
    }
}

/// One LISTEN connection's life; `Ok` only on shutdown. A connection that subscribed resets
/// the count of consecutive failures.
async fn listen_once(
    url: &str,
    wake: &Notify,
    shutdown: &CancellationToken,
    failures: &mut u32,
) -> Result<(), WithContext<DbError>> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(DbError::query("opening the LISTEN connection"))?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {CHANNEL}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    loop {
        tokio::select! {
            result = &mut listen => {
                result.map_err(DbError::query("subscribing to build notifications"))?;
                break;
            }
            message = messages.next() => handle_message(message, wake)?,
        }
    }
    *failures = 0;
    wake.notify_one();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = messages.next() => handle_message(message, wake)?,
        }
    }
}

fn handle_message(
    message: Option<Result<AsyncMessage, tokio_postgres::Error>>,
    wake: &Notify,
) -> Result<(), WithContext<DbError>> {
    match message {
        Some(Ok(AsyncMessage::Notification(_))) => {
            wake.notify_one();
            Ok(())
        }
        Some(Ok(_)) => Ok(()),
        Some(Err(source)) => Err(DbError::Query {
            what: "receiving notifications",
            source,
        }
        .into()),
        None => Err(DbError::ConnectionClosed("the LISTEN connection").into()),
    }
}
