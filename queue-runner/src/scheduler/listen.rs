//! The LISTEN connection: a dedicated connection (notifications on pooled connections are
//! lost) that wakes ingest on every notification of newly queued builds and after every
//! (re)connect, so builds queued while it was down are found. Only a wake-up: ingest finds the
//! builds by their durable marker (`ingested_at IS NULL`).

use std::sync::Arc;
use std::time::Duration;

use error_context::{ResultExt as _, WithContext};
use futures_util::StreamExt as _;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::{Connector, DbError};

/// The channel the builds trigger notifies.
pub const CHANNEL: &str = "drover_builds_queued";

/// How long the LISTEN connection may stay lost, reconnecting, before the database counts as
/// lost, which is fatal: the runner exits and systemd restarts it. Together with the connect
/// timeout this ends a runner within 5 s of losing PostgreSQL.
const LOSS_DEADLINE: Duration = Duration::from_secs(3);

/// How long opening the connection (TLS and authentication included) and subscribing may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The first delay between reconnects; each further one doubles it.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// How one LISTEN connection ended.
enum Ended {
    /// The runner is shutting down.
    Shutdown,
    /// It failed; `subscribed` if it had been listening (so the database was there until now).
    Failed {
        error: WithContext<DbError>,
        subscribed: bool,
    },
}

/// Keeps a dedicated connection listening on [`CHANNEL`] and wakes ingest on every
/// notification and after every (re)connect; fails when no connection could listen for
/// [`LOSS_DEADLINE`].
pub async fn listen(
    connector: Connector,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<(), WithContext<DbError>> {
    let mut lost_since = None;
    let mut delay = FIRST_RECONNECT_DELAY;
    loop {
        let (error, subscribed) = match listen_once(&connector, &wake, &shutdown).await {
            Ended::Shutdown => return Ok(()),
            Ended::Failed { error, subscribed } => (error, subscribed),
        };
        if subscribed {
            lost_since = None;
            delay = FIRST_RECONNECT_DELAY;
        }
        let since = *lost_since.get_or_insert_with(Instant::now);
        let retry_at = Instant::now() + delay;
        if retry_at >= since + LOSS_DEADLINE {
            return Err(error).with_context(|| {
                format!("the LISTEN connection could not be restored within {LOSS_DEADLINE:?}")
            });
        }
        tracing::warn!(error = %error.report(), retry_in = ?delay, "LISTEN connection lost; reconnecting");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(retry_at) => {}
        }
        delay *= 2;
    }
}

/// One LISTEN connection's life.
async fn listen_once(connector: &Connector, wake: &Notify, shutdown: &CancellationToken) -> Ended {
    let failed = |error: WithContext<DbError>, subscribed| Ended::Failed { error, subscribed };
    let what = "opening the LISTEN connection";
    let (client, mut connection) = match timeout(SUBSCRIBE_TIMEOUT, connector.connect()).await {
        Ok(Ok(connected)) => connected,
        Ok(Err(source)) => return failed(DbError::Query { what, source }.into(), false),
        Err(_) => return failed(DbError::TimedOut(what).into(), false),
    };
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {CHANNEL}");
    let listen = timeout(SUBSCRIBE_TIMEOUT, client.batch_execute(&statement));
    tokio::pin!(listen);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            result = &mut listen => {
                let what = "subscribing to build notifications";
                match result {
                    Ok(Ok(())) => break,
                    Ok(Err(source)) => return failed(DbError::Query { what, source }.into(), false),
                    Err(_) => return failed(DbError::TimedOut(what).into(), false),
                }
            }
            message = messages.next() => {
                if let Err(error) = handle_message(message, wake) {
                    return failed(error, false);
                }
            }
        }
    }
    wake.notify_one();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            message = messages.next() => {
                if let Err(error) = handle_message(message, wake) {
                    return failed(error, true);
                }
            }
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
