//! Streams that end when the runner shuts down. The gRPC server's graceful shutdown waits for
//! every open stream, and some never end by themselves (a Watch of a running build, a step's live
//! log upload), so each ends at once with UNAVAILABLE, which clients and builders take as "try
//! again": a builder sends the whole log again over its next session, a watcher reconnects.
//! Response streams can be cut the same way by anything else ([`cut_when`]: a revocation).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

/// What a stream cut by shutdown ends with.
#[must_use]
pub fn shutting_down() -> Status {
    Status::unavailable("the runner is shutting down; try again after it restarts")
}

/// A request stream that fails with [`shutting_down`] once `shutdown` is cancelled.
pub struct Incoming<T> {
    stream: Streaming<T>,
    shutdown: CancellationToken,
}

impl<T> Incoming<T> {
    /// Wraps `stream`.
    #[must_use]
    pub const fn new(stream: Streaming<T>, shutdown: CancellationToken) -> Self {
        Self { stream, shutdown }
    }

    /// The next message, `None` at the end.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => Err(shutting_down()),
            message = self.stream.message() => message,
        }
    }
}

/// A boxed response stream.
pub type Outbound<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `stream`, ended with [`shutting_down`] once `shutdown` is cancelled.
#[must_use]
pub fn until_shutdown<T: Send + 'static>(
    stream: Outbound<T>,
    shutdown: &CancellationToken,
) -> Outbound<T> {
    let shutdown = shutdown.clone();
    cut_when(stream, async move {
        shutdown.cancelled().await;
        shutting_down()
    })
}

/// `stream`, ended with the status `cut` resolves to, once it does.
#[must_use]
pub fn cut_when<T: Send + 'static>(
    stream: Outbound<T>,
    cut: impl Future<Output = Status> + Send + 'static,
) -> Outbound<T> {
    Box::pin(Cut {
        stream,
        until: Box::pin(cut),
        ended: false,
    })
}

struct Cut<T> {
    stream: Outbound<T>,
    until: Pin<Box<dyn Future<Output = Status> + Send>>,
    ended: bool,
}

impl<T> Stream for Cut<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(status) = self.until.as_mut().poll(cx) {
            self.ended = true;
            return Poll::Ready(Some(Err(status)));
        }
        self.stream.as_mut().poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn a_stream_ends_with_unavailable_at_shutdown_and_not_before() {
        let shutdown = CancellationToken::new();
        let endless: Outbound<u32> =
            Box::pin(tokio_stream::iter([Ok(1)]).chain(tokio_stream::pending()));
        let mut stream = until_shutdown(endless, &shutdown);
        assert_eq!(stream.next().await.map(Result::ok), Some(Some(1)));
        shutdown.cancel();
        let cut = stream.next().await.and_then(Result::err);
        assert_eq!(
            cut.map(|status| status.code()),
            Some(tonic::Code::Unavailable)
        );
        assert!(stream.next().await.is_none(), "nothing after the cut");
    }

    #[tokio::test]
    async fn a_stream_that_ends_by_itself_ends_without_an_error() {
        let shutdown = CancellationToken::new();
        let short: Outbound<u32> = Box::pin(tokio_stream::iter([Ok(1), Ok(2)]));
        let items: Vec<_> = until_shutdown(short, &shutdown).collect().await;
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(Result::is_ok));
    }
}
