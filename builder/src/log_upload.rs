//! Streaming a step's log to the runner while the build runs. Every byte also goes to a spool
//! file, so a log cut with its session (the runner restarting) is sent again, whole, over the
//! next session: the runner starts an attempt's log afresh on every upload of it. While no
//! session is up the build's log keeps flowing into the spool, so the build never blocks on it.

use std::os::unix::fs::FileExt as _;

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

/// Streams `log` to the runner as attempt `attempt_id`'s log, over as many sessions as it takes,
/// until the executor drops its sink and the runner has stored the whole log (or said it no
/// longer runs the attempt).
pub async fn upload(
    mut link: Link,
    attempt_id: &str,
    mut log: mpsc::Receiver<Vec<u8>>,
) -> Result<(), UploadError> {
    let mut spool = Spool::new()?;
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
            Ok(_) => return Ok(()),
            // The runner no longer runs this attempt (it was requeued): its result will be
            // ignored too, and the build is not disturbed.
            Err(status) if status.code() == Code::NotFound => return Ok(()),
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
