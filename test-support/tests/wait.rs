//! `poll_until` returns the first `Some` and panics with a clear message at its deadline.

use std::cell::Cell;
use std::time::Duration;

use test_support::poll_until;

#[tokio::test]
async fn returns_the_first_some() {
    let calls = Cell::new(0);
    let value = poll_until(Duration::from_secs(10), "the third call", || {
        calls.set(calls.get() + 1);
        let n = calls.get();
        async move { (n == 3).then_some(n * 10) }
    })
    .await;
    assert_eq!(value, 30);
    assert_eq!(calls.get(), 3);
}

#[tokio::test]
#[should_panic(expected = "timed out after 50ms waiting for a condition that never holds")]
async fn panics_at_the_deadline() {
    poll_until(
        Duration::from_millis(50),
        "a condition that never holds",
        || async { None::<()> },
    )
    .await;
}

#[tokio::test]
#[should_panic(expected = "timed out after 50ms waiting for a check that hangs")]
async fn the_deadline_bounds_a_check_that_hangs() {
    poll_until(Duration::from_millis(50), "a check that hangs", || {
        std::future::pending::<Option<()>>()
    })
    .await;
}
