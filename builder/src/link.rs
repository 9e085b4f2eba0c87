//! The builder's current connection to the runner, shared with its running steps. Steps
//! outlive sessions: a step's log and outputs go up over whichever session is joined, and an
//! upload cut with its session waits for the next one (the runner may be restarting) instead of
//! failing the step.

use std::time::Duration;

use drover_proto::v1::builder_service_client::BuilderServiceClient;
use tokio::sync::watch;
use tonic::transport::Channel;

/// How long a failed call waits for its session to end before the failure counts as the
/// runner's answer: a runner that dies fails the tunnel and every call on it at nearly the same
/// moment.
const SESSION_END_WAIT: Duration = Duration::from_secs(5);

/// A client of the runner's builder service.
pub type Client = BuilderServiceClient<Channel>;

/// A joined session's client and its number: sessions are numbered in order.
type Current = Option<(u64, Client)>;

/// The end steps read: the current session's client, when there is one.
#[derive(Debug, Clone)]
pub struct Link {
    current: watch::Receiver<Current>,
}

/// The end the tunnel writes: it publishes each session once the runner accepted its Join, and
/// withdraws it when the session ends. Dropping it tells waiting steps the builder is stopping.
#[derive(Debug)]
pub struct Publisher {
    current: watch::Sender<Current>,
    sessions: u64,
}

/// A new link with no session yet.
#[must_use]
pub fn new() -> (Publisher, Link) {
    let (current, receiver) = watch::channel(None);
    (
        Publisher {
            current,
            sessions: 0,
        },
        Link { current: receiver },
    )
}

impl Publisher {
    /// A session joined: steps use `client` from now on.
    pub fn up(&mut self, client: Client) {
        self.sessions += 1;
        self.current.send_replace(Some((self.sessions, client)));
    }

    /// The session ended: steps wait for the next.
    pub fn down(&self) {
        self.current.send_replace(None);
    }
}

impl Link {
    /// The client of the joined session, once there is one newer than session `failed` (the one
    /// an upload was cut with); `None` once the builder is stopping.
    pub async fn client(&mut self, failed: Option<u64>) -> Option<(u64, Client)> {
        loop {
            if let Some((session, client)) = &*self.current.borrow_and_update()
                && failed.is_none_or(|failed| *session > failed)
            {
                return Some((*session, client.clone()));
            }
            self.current.changed().await.ok()?;
        }
    }

    /// Whether a call that failed with `status` over `session` was cut with the session (and
    /// may be made again over the next one) rather than refused by the runner.
    pub async fn cut(&mut self, session: u64, status: &tonic::Status) -> bool {
        use tonic::Code;
        if !matches!(
            status.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
        ) {
            return false;
        }
        let ended = async {
            loop {
                if self
                    .current
                    .borrow_and_update()
                    .as_ref()
                    .is_none_or(|(current, _)| *current != session)
                {
                    return;
                }
                if self.current.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(SESSION_END_WAIT, ended).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn client() -> Client {
        BuilderServiceClient::new(Channel::from_static("http://127.0.0.1:1").connect_lazy())
    }

    #[tokio::test]
    async fn an_upload_cut_with_one_session_waits_for_the_next_and_stops_with_the_builder() {
        let (mut publisher, mut link) = new();
        publisher.up(client());
        let (first, _) = link.client(None).await.unwrap();
        publisher.down();
        let mut waiting = link.clone();
        let next = waiting.client(Some(first));
        publisher.up(client());
        assert_eq!(next.await.map(|(session, _)| session), Some(first + 1));
        let again = tokio::time::timeout(Duration::from_secs(1), link.client(Some(first + 1)));
        drop(publisher);
        assert!(
            again.await.unwrap().is_none(),
            "a stopping builder ends the wait"
        );
    }
}
