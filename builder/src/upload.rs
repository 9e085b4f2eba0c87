//! Uploading a finished attempt's outputs, each as a NAR on its own stream, in reference order,
//! and turning the report into the result message; outputs small enough together
//! ([`INLINE_NAR_BYTES`]) go inline in the result instead, checked by the runner the same way. An output the runner refuses turns a success
//! into an infrastructure failure (the runner requeues it); an upload cut with its session is
//! made again over the next one; the hashes in the result are the ones the runner computed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use drover_proto::v1::{BuiltOutput as WireOutput, NarChunk, StepOutcome, StepResult};
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff;
use crate::executor::nix::ServeProcess;
use crate::executor::{BuiltOutput, NarSource, Outcome, Report};
use crate::job::Job;
use crate::link::{Client, Link};
use crate::upload_error::UploadError;

/// NAR bytes per upload message.
const NAR_CHUNK: usize = 256 * 1024;

/// The most NAR bytes a result carries inline, all outputs together: with an inline log
/// ([`crate::log_upload::INLINE_LOG_BYTES`]) a result stays within
/// [`drover_proto::MAX_INLINE_RESULT_BYTES`].
pub const INLINE_NAR_BYTES: u64 = 192 * 1024;

const _: () = assert!(
    INLINE_NAR_BYTES + crate::log_upload::INLINE_LOG_BYTES as u64
        <= drover_proto::MAX_INLINE_RESULT_BYTES as u64
);

/// How an upload the runner turned away for lack of room (`RESOURCE_EXHAUSTED`: too many at
/// once) is tried again: after this pause, doubling up to [`UPLOAD_BUSY_MAX_PAUSE`], each with
/// jitter ([`backoff::jittered`]), for at most [`UPLOAD_BUSY_BUDGET`] in all. A busy runner is not the step's fault, and failing the step
/// would only move the same upload to another builder.
const UPLOAD_BUSY_FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between tries of a turned-away upload.
const UPLOAD_BUSY_MAX_PAUSE: Duration = Duration::from_secs(2);
/// How long a turned-away upload is tried again before the step fails.
const UPLOAD_BUSY_BUDGET: Duration = Duration::from_mins(2);

/// Uploads the outputs of a successful report and builds the result to send.
pub async fn outputs(
    link: &mut Link,
    job: &Job,
    report: Report,
) -> Result<StepResult, UploadError> {
    let mut outcome = report.outcome;
    let mut message = report.message;
    let mut uploaded = Vec::new();
    let small = report
        .outputs
        .iter()
        .map(|output| output.nar_size)
        .sum::<u64>()
        <= INLINE_NAR_BYTES;
    if outcome == Outcome::Succeeded && small {
        for output in report.outputs {
            match inline(output).await {
                Ok(wire) => uploaded.push(wire),
                Err(error) => {
                    outcome = Outcome::InfrastructureFailure;
                    message = error_context::report(&error).to_string();
                    uploaded.clear();
                    break;
                }
            }
        }
    } else if outcome == Outcome::Succeeded {
        for output in &report.outputs {
            match upload_over_sessions(link, &job.attempt_id, output).await? {
                Ok(wire) => uploaded.push(wire),
                Err(status) => {
                    outcome = Outcome::InfrastructureFailure;
                    message = format!("uploading {} failed: {}", output.path, status.message());
                    uploaded.clear();
                    break;
                }
            }
        }
    }
    Ok(StepResult {
        attempt_id: job.attempt_id.clone(),
        outcome: StepOutcome::from(outcome).into(),
        message,
        outputs: uploaded,
        ..StepResult::default()
    })
}

/// An output with its whole NAR, to go inline in the result.
async fn inline(output: BuiltOutput) -> Result<WireOutput, FeedError> {
    let nar = match output.nar {
        NarSource::Bytes(bytes) => bytes,
        NarSource::Serve(process) => {
            let collect = |nar: &mut Vec<u8>, bytes: &[u8]| nar.extend_from_slice(bytes);
            dump(process, output.path.clone(), Vec::new(), collect).await?
        }
    };
    Ok(WireOutput {
        name: output.name,
        path: output.path,
        nar_hash: String::new(),
        nar_size: nar.len() as u64,
        nar,
        references: output.references,
    })
}

/// Uploads one output over the joined session, and over the next one if that session ends
/// during the upload. The inner error is the runner's refusal; the outer one, that the builder
/// is stopping.
async fn upload_over_sessions(
    link: &mut Link,
    attempt_id: &str,
    output: &BuiltOutput,
) -> Result<Result<WireOutput, tonic::Status>, UploadError> {
    let mut failed = None;
    loop {
        let (session, mut client) = link.client(failed).await.ok_or(UploadError::Stopping)?;
        match upload_when_room(&mut client, attempt_id, output).await {
            Err(status) if link.cut(session, &status).await => {
                tracing::info!(attempt = %attempt_id, path = %output.path, "an output upload was cut with its session; sending it again over the next");
                failed = Some(session);
            }
            result => return Ok(result),
        }
    }
}

/// Uploads one output, again while the runner answers that it has no room.
async fn upload_when_room(
    client: &mut Client,
    attempt_id: &str,
    output: &BuiltOutput,
) -> Result<WireOutput, tonic::Status> {
    let started = Instant::now();
    let mut pauses = backoff::jittered(UPLOAD_BUSY_FIRST_PAUSE, UPLOAD_BUSY_MAX_PAUSE);
    loop {
        match upload_one(client, attempt_id, output).await {
            Err(status) if status.code() == tonic::Code::ResourceExhausted => match pauses.next() {
                Some(pause) if started.elapsed() + pause < UPLOAD_BUSY_BUDGET => {
                    tokio::time::sleep(pause).await;
                }
                _ => return Err(status),
            },
            result => return result,
        }
    }
}

async fn upload_one(
    client: &mut Client,
    attempt_id: &str,
    output: &BuiltOutput,
) -> Result<WireOutput, tonic::Status> {
    let header = NarChunk {
        attempt_id: attempt_id.to_owned(),
        store_path: output.path.clone(),
        references: output.references.clone(),
        data: Vec::new(),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<NarChunk>(4);
    let feeding = feed(sender, header, attempt_id.to_owned(), output.clone());
    let upload = client.upload_nar(ReceiverStream::new(receiver));
    let (fed, response) = tokio::join!(feeding, upload);
    let response = response?;
    if let Err(error) = fed {
        let message = error_context::report(&error).to_string();
        return Err(tonic::Status::aborted(message));
    }
    let response = response.into_inner();
    Ok(WireOutput {
        name: output.name.clone(),
        path: output.path.clone(),
        nar_hash: response.nar_hash,
        nar_size: response.nar_size,
        ..WireOutput::default()
    })
}

/// Why an output's NAR could not be read from the local store.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    /// The serve process could not send it.
    #[error("reading the NAR from nix-store --serve")]
    Serve(#[source] crate::serve::ServeError),
    /// Another upload on the same process panicked.
    #[error("the serve process was left unusable by a panic")]
    Poisoned,
    /// The blocking task reading it failed.
    #[error("the task reading the NAR failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Sends the header, then the NAR in chunks. If the upload stops, the rest of the NAR is still
/// read (and dropped), so the serve process stays in step for another try.
async fn feed(
    sender: tokio::sync::mpsc::Sender<NarChunk>,
    header: NarChunk,
    attempt_id: String,
    output: BuiltOutput,
) -> Result<(), FeedError> {
    let chunk = move |data: Vec<u8>| NarChunk {
        attempt_id: attempt_id.clone(),
        data,
        ..NarChunk::default()
    };
    if sender.send(header).await.is_err() {
        return Ok(());
    }
    match output.nar {
        NarSource::Bytes(bytes) => {
            for data in bytes.chunks(NAR_CHUNK) {
                if sender.send(chunk(data.to_vec())).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        NarSource::Serve(process) => {
            let chunks = sender.clone();
            let to_chunk = chunk.clone();
            let send = move |(pending, stopped): &mut (Vec<u8>, bool), bytes: &[u8]| {
                if *stopped {
                    return;
                }
                pending.extend_from_slice(bytes);
                if pending.len() >= NAR_CHUNK {
                    let full = std::mem::replace(pending, Vec::with_capacity(NAR_CHUNK));
                    *stopped = chunks.blocking_send(to_chunk(full)).is_err();
                }
            };
            let unsent = (Vec::with_capacity(NAR_CHUNK), false);
            let (pending, _) = dump(process, output.path, unsent, send).await?;
            if !pending.is_empty() {
                let _ = sender.send(chunk(pending)).await;
            }
            Ok(())
        }
    }
}

/// Reads `path`'s NAR from the serve process that built it, on a blocking thread, handing each
/// piece to `each` with `state`; returns the state.
async fn dump<T: Send + 'static>(
    process: Arc<Mutex<ServeProcess>>,
    path: String,
    mut state: T,
    mut each: impl FnMut(&mut T, &[u8]) + Send + 'static,
) -> Result<T, FeedError> {
    tokio::task::spawn_blocking(move || {
        let mut process = process.lock().map_err(|_| FeedError::Poisoned)?;
        process
            .connection
            .dump_store_path(&path, &mut |bytes: &[u8]| {
                each(&mut state, bytes);
                Ok(())
            })
            .map_err(FeedError::Serve)?;
        Ok(state)
    })
    .await
    .map_err(FeedError::Task)?
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn job() -> Job {
        Job {
            attempt_id: "attempt".to_owned(),
            drv_path: "/nix/store/00000000000000000000000000000000-x.drv".to_owned(),
            drv_text: Vec::new(),
            outputs: BTreeMap::new(),
            input_paths: Vec::new(),
            max_log_bytes: u64::MAX,
            timeout: None,
            max_silent: None,
            max_output_bytes: u64::MAX,
            traceparent: String::new(),
        }
    }

    fn success_with_nar_of(bytes: usize) -> Report {
        let nar = vec![7; bytes];
        Report {
            outcome: Outcome::Succeeded,
            message: String::new(),
            outputs: vec![BuiltOutput {
                name: "out".to_owned(),
                path: "/nix/store/00000000000000000000000000000000-x".to_owned(),
                references: vec!["/nix/store/00000000000000000000000000000000-x".to_owned()],
                nar_size: nar.len() as u64,
                nar: NarSource::Bytes(nar),
            }],
            pins: None,
            phases: crate::executor::Phases::default(),
        }
    }

    #[tokio::test]
    async fn outputs_up_to_the_inline_limit_go_in_the_result_and_larger_ones_are_uploaded() {
        // No session will ever come: an upload finds the builder stopping.
        let (publisher, mut link) = crate::link::new();
        drop(publisher);
        let limit = usize::try_from(INLINE_NAR_BYTES).unwrap();
        let result = outputs(&mut link, &job(), success_with_nar_of(limit))
            .await
            .expect("an inline output needs no session");
        assert_eq!(result.outputs[0].nar.len(), limit);
        assert_eq!(result.outputs[0].nar_hash, "", "the runner computes it");
        assert_eq!(result.outputs[0].references.len(), 1);
        let uploaded = outputs(&mut link, &job(), success_with_nar_of(limit + 1)).await;
        assert!(
            matches!(uploaded, Err(UploadError::Stopping)),
            "a larger output waits for a session to upload over: {uploaded:?}"
        );
    }
}
