//! `FollowLog`: the log of a derivation's latest attempt, live while its builder sends it, from
//! its file once the upload ended, with heartbeats while nothing comes (a step not dispatched
//! yet is waited for).

use std::pin::Pin;
use std::time::Duration;

use drover_proto::v1::log_event::Event as Kind;
use drover_proto::v1::{Heartbeat, LogEvent};
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;
use uuid::Uuid;

use super::status::unavailable;
use crate::db::queries::{self, StepAttempts};
use crate::db::{DbError, Pool};
use crate::live_logs::{LiveChunk, LiveFollower};
use crate::logs::LogStore;

/// The stream `FollowLog` answers with.
pub type LogStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<LogEvent, Status>> + Send>>;

/// Bytes per message when a stored log is sent.
const STORED_CHUNK: usize = 64 * 1024;

/// How often a follower looks again for an attempt that runs but has sent no log yet.
const LOG_START_POLL: Duration = Duration::from_millis(200);

/// Where a follower is.
enum Stage {
    /// The step has not been dispatched, or its attempt runs and its upload has not started.
    Waiting,
    /// The upload is under way; bytes before `sent` have been sent.
    Live { follower: LiveFollower, sent: u64 },
    /// Stored bytes left to send, in order.
    Stored(Vec<Vec<u8>>),
    /// Nothing more.
    Done,
}

/// One `FollowLog` stream's state.
struct Follow {
    pool: Pool,
    logs: LogStore,
    drv_path: String,
    /// The attempt followed; nil until the step is dispatched.
    attempt: Uuid,
    heartbeat: Duration,
    stage: Stage,
}

fn data(bytes: Vec<u8>) -> LogEvent {
    LogEvent {
        event: Some(Kind::Data(bytes)),
    }
}

fn heartbeat() -> LogEvent {
    LogEvent {
        event: Some(Kind::Heartbeat(Heartbeat {})),
    }
}

/// Opens `FollowLog` of `drv_path`: `NOT_FOUND` if no step builds it.
pub async fn open(
    pool: Pool,
    logs: LogStore,
    drv_path: String,
    heartbeat: Duration,
) -> Result<LogStream, Status> {
    let step = latest_attempt(&pool, &drv_path).await?;
    let mut follow = Follow {
        pool,
        logs,
        drv_path,
        attempt: Uuid::nil(),
        heartbeat,
        stage: Stage::Waiting,
    };
    follow.stage = follow.stage_of(step).await?;
    Ok(Box::pin(futures_util::stream::unfold(follow, Follow::next)))
}

async fn latest_attempt(pool: &Pool, drv_path: &str) -> Result<StepAttempts, Status> {
    let client = pool
        .get()
        .await
        .map_err(|error| unavailable(&DbError::Connection(error)))?;
    queries::latest_attempt(&client, drv_path)
        .await
        .map_err(|error| unavailable(&error))?
        .ok_or_else(|| Status::not_found(format!("no step builds {drv_path}")))
}

impl Follow {
    /// Where the followed attempt's log is now: live, stored, or not started.
    async fn look(&mut self) -> Result<Stage, Status> {
        let latest = latest_attempt(&self.pool, &self.drv_path).await?;
        self.stage_of(latest).await
    }

    /// Where the followed attempt's log is, given the step's state: the first attempt seen is
    /// the one followed.
    async fn stage_of(&mut self, step: StepAttempts) -> Result<Stage, Status> {
        let Some(latest) = step.latest else {
            return Ok(if step.unfinished {
                Stage::Waiting
            } else {
                Stage::Done
            });
        };
        if self.attempt.is_nil() {
            self.attempt = latest.0;
        }
        if let Some(follower) = self.logs.follow(self.attempt) {
            let sent = follower.start;
            return Ok(Stage::Live { follower, sent });
        }
        let (attempt, running, file) = latest;
        if attempt != self.attempt {
            // A newer attempt started meanwhile: the older one's log is complete.
            return self.stored(file_of(&self.pool, self.attempt).await?);
        }
        if running {
            return Ok(Stage::Waiting);
        }
        self.stored(file)
    }

    fn stored(&self, file: Option<String>) -> Result<Stage, Status> {
        let Some(file) = file else {
            return Ok(Stage::Done);
        };
        let log = match self.logs.read(&file) {
            Ok(log) => log.bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => {
                tracing::error!(%file, %error, "reading a stored log failed");
                return Err(Status::internal("reading the stored log failed"));
            }
        };
        let mut chunks: Vec<Vec<u8>> = log.chunks(STORED_CHUNK).map(<[u8]>::to_vec).collect();
        chunks.reverse();
        Ok(Stage::Stored(chunks))
    }

    async fn next(mut self) -> Option<(Result<LogEvent, Status>, Self)> {
        loop {
            let stage = std::mem::replace(&mut self.stage, Stage::Done);
            match stage {
                Stage::Done => return None,
                Stage::Stored(mut chunks) => {
                    let chunk = chunks.pop()?;
                    self.stage = Stage::Stored(chunks);
                    return Some((Ok(data(chunk)), self));
                }
                Stage::Waiting => {
                    // Looks at least once per heartbeat, however short the heartbeat is.
                    let beat = tokio::time::Instant::now() + self.heartbeat;
                    loop {
                        let next = tokio::time::Instant::now() + LOG_START_POLL;
                        tokio::time::sleep_until(next.min(beat)).await;
                        match self.look().await {
                            Ok(Stage::Waiting) if tokio::time::Instant::now() >= beat => {
                                self.stage = Stage::Waiting;
                                return Some((Ok(heartbeat()), self));
                            }
                            Ok(Stage::Waiting) => {}
                            Ok(stage) => {
                                self.stage = stage;
                                break;
                            }
                            Err(status) => return Some((Err(status), self)),
                        }
                    }
                }
                Stage::Live { follower, sent } => {
                    if let Some(event) = self.live(follower, sent).await {
                        return Some((event, self));
                    }
                }
            }
        }
    }

    /// The next event of a live log (its backlog first); `None` when the stage moved on.
    async fn live(
        &mut self,
        mut follower: LiveFollower,
        sent: u64,
    ) -> Option<Result<LogEvent, Status>> {
        if !follower.backlog.is_empty() {
            let backlog = std::mem::take(&mut follower.backlog);
            let sent = follower.start + backlog.len() as u64;
            self.stage = Stage::Live { follower, sent };
            return Some(Ok(data(backlog)));
        }
        match tokio::time::timeout(self.heartbeat, follower.chunks.recv()).await {
            Err(_) => {
                self.stage = Stage::Live { follower, sent };
                Some(Ok(heartbeat()))
            }
            Ok(Ok(LiveChunk::Data(offset, bytes))) => {
                let end = offset + bytes.len() as u64;
                self.stage = Stage::Live {
                    follower,
                    sent: sent.max(end),
                };
                // Bytes the backlog already carried are skipped.
                let skip = usize::try_from(sent.saturating_sub(offset)).unwrap_or(usize::MAX);
                (skip < bytes.len()).then(|| Ok(data(bytes[skip..].to_vec())))
            }
            Ok(Ok(LiveChunk::End) | Err(RecvError::Closed)) => None,
            Ok(Err(RecvError::Lagged(_))) => Some(Err(Status::aborted(
                "this follower fell behind the live log; follow it again",
            ))),
        }
    }
}

/// The log file of an attempt.
async fn file_of(pool: &Pool, attempt: Uuid) -> Result<Option<String>, Status> {
    let client = pool
        .get()
        .await
        .map_err(|error| unavailable(&DbError::Connection(error)))?;
    queries::attempt_log_file(&client, attempt)
        .await
        .map_err(|error| unavailable(&error))
}
