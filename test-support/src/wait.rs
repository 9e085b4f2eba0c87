//! Waiting for something to happen: poll with a deadline. A fixed sleep is either too short on a
//! loaded machine (a flaky test) or too long everywhere else (a slow suite).

use std::future::Future;
use std::time::Duration;

/// How often [`poll_until`] asks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value.
///
/// The deadline also bounds a single call of `f` that hangs.
///
/// # Panics
/// With "timed out after {deadline:?} waiting for {what}" when the deadline passes first.
pub async fn poll_until<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polling = async {
        loop {
            if let Some(value) = f().await {
                return value;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    };
    tokio::time::timeout(deadline, polling)
        .await
        .unwrap_or_else(|_elapsed| panic!("timed out after {deadline:?} waiting for {what}"))
}
