//! Streaming a step's log to the runner while the build runs. The log is first held back for
//! [`HOLD`]: a step whose whole log ends within it, at most [`INLINE_LOG_BYTES`] long, sends the
//! log inline in its result instead, which saves a call per step; then every byte also goes to a
//! spool file, so a log cut with its session (the runner restarting) is sent again, whole, over
//! the next session: the runner starts an attempt's log afresh on every upload of it. While no
//! session is up the build's log keeps flowing into the spool, so the build never blocks on it.

use std::os::unix::fs::FileExt as _;
use std::time::Duration;

use drover_proto::v1::LogChunk;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::link::Link;
use crate::upload_error::UploadError;

/// Log chunks buffered between the spool and the upload stream.
const UPLOAD_QUEUE: usize = 64;

/// Bytes read from the spool per chunk when a log is sent again.
const REPLAY_CHUNK: usize = 256 * 1024;

/// How long a log is held back before it starts streaming (what `FollowLog` and `GetLog` of a
/// running step wait for at first).
const HOLD: Duration = Duration::from_millis(500);

/// The longest log a result carries inline.
pub const INLINE_LOG_BYTES: usize = 64 * 1024;

/// Streams `log` to the runner as attempt `attempt_id`'s log, over as many sessions as it takes,
/// until the executor drops its sink and the runner has stored the whole log (or said it no
/// longer runs the attempt); or returns the whole log, to go inline in the result, when it ended
/// within [`HOLD`] at most [`INLINE_LOG_BYTES`] long.
pub async fn upload(
    mut link: Link,
    attempt_id: &str,
    mut log: mpsc::Receiver<Vec<u8>>,
) -> Result<Option<Vec<u8>>, UploadError> {
    let mut held = Vec::new();
    let hold_ends = tokio::time::sleep(HOLD);
    tokio::pin!(hold_ends);
    while held.len() <= INLINE_LOG_BYTES {
        tokio::select! {
            data = log.recv() => match data {
                Some(data) => held.extend_from_slice(&data),
                None => return Ok(Some(held)),
            },
            () = &mut hold_ends => break,
        }
    }
    let mut spool = Spool::new()?;
    spool.append(&held)?;
    let mut ended = false;
    let mut failed = None;
    loop {
        let (session, mut client) = loop {
            tokio::select! {
                connected = link.client(failed) => break connected.ok_or(UploadError::Stopping)?,
                data = log.recv(), if !ended => match data {
                    Some(data) => spool.append(&data)?,
                    None => ended = true,
                },
            }
        };
        let (sender, receiver) = mpsc::channel(UPLOAD_QUEUE);
        let feeding = feed(&mut spool, &mut log, &mut ended, sender, attempt_id);
        let (fed, stored) = tokio::join!(feeding, client.upload_log(ReceiverStream::new(receiver)));
        fed?;
        match stored {
            Ok(_) => return Ok(None),
            // The runner no longer runs this attempt (it was requeued): its result will be
            // ignored too, and the build is not disturbed.
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) if link.cut(session, &status).await => {
                tracing::info!(attempt = %attempt_id, "the log upload was cut with its session; sending it again over the next");
                failed = Some(session);
            }
            Err(status) => return Err(UploadError::Refused(status)),
        }
    }
}

/// Sends the spool so far, then the log as it comes (spooling it first), until the log ends or
/// the upload stops taking chunks.
async fn feed(
    spool: &mut Spool,
    log: &mut mpsc::Receiver<Vec<u8>>,
    ended: &mut bool,
    sender: mpsc::Sender<LogChunk>,
    attempt_id: &str,
) -> Result<(), UploadError> {
    let chunk = |data: Vec<u8>| LogChunk {
        attempt_id: attempt_id.to_owned(),
        data,
    };
    // The first message names the attempt even when the build prints nothing.
    if sender.send(chunk(Vec::new())).await.is_err() {
        return Ok(());
    }
    for data in spool.replay() {
        if sender.send(chunk(data?)).await.is_err() {
            return Ok(());
        }
    }
    while !*ended {
        let data = tokio::select! {
            data = log.recv() => data,
            () = sender.closed() => return Ok(()),
        };
        let Some(data) = data else {
            *ended = true;
            break;
        };
        spool.append(&data)?;
        if sender.send(chunk(data)).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The whole log so far, in an unnamed temporary file.
struct Spool {
    file: std::fs::File,
    length: u64,
}

impl Spool {
    fn new() -> Result<Self, UploadError> {
        let file = tempfile::tempfile().map_err(UploadError::Spool)?;
        Ok(Self { file, length: 0 })
    }

    fn append(&mut self, data: &[u8]) -> Result<(), UploadError> {
        self.file
            .write_all_at(data, self.length)
            .map_err(UploadError::Spool)?;
        self.length += data.len() as u64;
        Ok(())
    }

    /// The spooled bytes from the start, in chunks.
    fn replay(&self) -> impl Iterator<Item = Result<Vec<u8>, UploadError>> {
        (0..self.length).step_by(REPLAY_CHUNK).map(|offset| {
            let size = usize::try_from((self.length - offset).min(REPLAY_CHUNK as u64))
                .unwrap_or(REPLAY_CHUNK);
            let mut data = vec![0; size];
            self.file
                .read_exact_at(&mut data, offset)
                .map(|()| data)
                .map_err(UploadError::Spool)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_short_log_that_ends_within_the_hold_goes_inline_and_a_longer_one_streams() {
        // No session will ever come: streaming finds the builder stopping.
        let (publisher, link) = crate::link::new();
        drop(publisher);
        let (sender, receiver) = mpsc::channel(4);
        sender.send(vec![b'x'; INLINE_LOG_BYTES]).await.unwrap();
        drop(sender);
        let inline = upload(link.clone(), "attempt", receiver).await.unwrap();
        assert_eq!(inline.map(|log| log.len()), Some(INLINE_LOG_BYTES));

        let (sender, receiver) = mpsc::channel(4);
        sender.send(vec![b'x'; INLINE_LOG_BYTES + 1]).await.unwrap();
        drop(sender);
        let streamed = upload(link.clone(), "attempt", receiver).await;
        assert!(
            matches!(streamed, Err(UploadError::Stopping)),
            "{streamed:?}"
        );

        // A log still open when the hold ends streams, however short.
        let (sender, receiver) = mpsc::channel(4);
        sender.send(b"slow".to_vec()).await.unwrap();
        let slow = upload(link, "attempt", receiver).await;
        assert!(matches!(slow, Err(UploadError::Stopping)), "{slow:?}");
        drop(sender);
    }
}
