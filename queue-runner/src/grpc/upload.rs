//! Receiving an output NAR from a builder: the header is checked against what the attempt may
//! upload (one of its outputs, referring only to the step's input closure and its own outputs),
//! then the chunks flow through a bounded channel into the cache's streaming publisher on a
//! blocking thread. The bound is the backpressure: a slow disk slows the builder's stream, never
//! the runner's memory. A stream that breaks off publishes nothing. A small NAR carried inline
//! in a step result goes through the same checks and the same publisher ([`publish_inline`]).

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::sync::Arc;

use drover_proto::v1::{NarChunk, UploadNarResponse};
use drover_scheduler::StepSpec;
use error_context::{Classify, Severity};
use nix_primitives::narinfo::NarInfo;
use nix_primitives::store_path::StorePathError;
use nix_primitives::{ContentAddress, StorePath};
use tokio::sync::mpsc;
use tonic::Status;

use super::refusals::AttemptError;
use super::shutdown::Incoming;
use crate::cache::{BinaryCache, CacheError, Publication};
use crate::scheduler::attempts::AttemptOwner;

/// Chunks buffered between the gRPC stream and the publisher.
const QUEUED_CHUNKS: usize = 8;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// As many uploads as the runner takes at once are under way.
    #[error("too many NAR uploads at once; retry later")]
    Busy,
    /// The stream carried no chunk.
    #[error("an empty NAR upload")]
    Empty,
    /// The attempt named is not this builder's.
    #[error(transparent)]
    Attempt(#[from] AttemptError),
    /// The stream failed.
    #[error("reading the upload: {}", .0.message())]
    Stream(#[from] Status),
    /// The blocking task publishing it failed.
    #[error("the publisher failed")]
    Publisher(#[source] tokio::task::JoinError),
    /// A path in the header is not a store path.
    #[error("{text:?} is not a store path")]
    InvalidPath {
        /// The text.
        text: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// The path is not an output of the attempt's step.
    #[error("{0} is not an output of this attempt's derivation")]
    NotAnOutput(StorePath),
    /// A reference outside the step's input closure and outputs.
    #[error("{path} refers to {reference}, which is neither an input nor an output of its step")]
    ReferenceOutsideClosure {
        /// The output.
        path: StorePath,
        /// The reference.
        reference: StorePath,
    },
    /// Chunks of one upload named different attempts.
    #[error("an upload must name one attempt")]
    MixedAttempts,
    /// The cache refused or failed to publish it.
    #[error("publishing the output failed")]
    Cache(#[from] CacheError),
}

impl Classify for UploadError {
    fn severity(&self) -> Severity {
        match self {
            Self::Cache(error) => error.severity(),
            Self::Publisher(_) => Severity::Step,
            _ => Severity::Reject,
        }
    }
}

/// Receives one upload; `owner` checks the attempt named in the first chunk, and `still_owned`
/// checks it again just before the output becomes visible.
pub async fn receive(
    mut chunks: Incoming<NarChunk>,
    cache: &Arc<BinaryCache>,
    owner: impl FnOnce(&str) -> Result<AttemptOwner, AttemptError>,
    still_owned: impl Fn(&str) -> bool + Send + 'static,
) -> Result<UploadNarResponse, UploadError> {
    let first = chunks.message().await?.ok_or(UploadError::Empty)?;
    let owner = owner(&first.attempt_id)?;
    let publication = publication(&owner.spec, &first.store_path, &first.references, cache).await?;
    let (sender, receiver) = mpsc::channel::<Vec<u8>>(QUEUED_CHUNKS);
    let cache = cache.clone();
    let attempt_id = first.attempt_id.clone();
    let publishing = tokio::task::spawn_blocking(move || {
        let still_allowed = || still_owned(&attempt_id);
        cache.publish(&publication, ChannelReader::new(receiver), &still_allowed)
    });
    let mut mixed = false;
    if sender.send(first.data).await.is_ok() {
        // A failed stream stops the feed: the publisher then sees the NAR end early.
        while let Ok(Some(chunk)) = chunks.message().await {
            if chunk.attempt_id != first.attempt_id {
                mixed = true;
                break;
            }
            if sender.send(chunk.data).await.is_err() {
                break;
            }
        }
    }
    drop(sender);
    let result = publishing.await.map_err(UploadError::Publisher)?;
    if mixed {
        return Err(UploadError::MixedAttempts);
    }
    let (info, already_published) = result?;
    Ok(UploadNarResponse {
        nar_hash: info.nar_hash.to_typed_base32(),
        nar_size: info.nar_size,
        already_published,
    })
}

/// Publishes a NAR a step result carried inline, with the same checks as an upload of it by
/// `owner`'s attempt; `still_owned` is checked just before it becomes visible.
pub async fn publish_inline(
    owner: &AttemptOwner,
    store_path: &str,
    references: &[String],
    nar: Vec<u8>,
    cache: &Arc<BinaryCache>,
    still_owned: impl Fn() -> bool + Send + 'static,
) -> Result<NarInfo, UploadError> {
    let publication = publication(&owner.spec, store_path, references, cache).await?;
    let cache = cache.clone();
    let (info, _) = tokio::task::spawn_blocking(move || {
        cache.publish(&publication, nar.as_slice(), &still_owned)
    })
    .await
    .map_err(UploadError::Publisher)??;
    Ok(info)
}

/// Checks an upload's header against what the attempt may upload.
async fn publication(
    policy: &StepSpec,
    store_path: &str,
    references: &[String],
    cache: &BinaryCache,
) -> Result<Publication, UploadError> {
    let parse = |text: &str| {
        StorePath::from_absolute(text).map_err(|source| UploadError::InvalidPath {
            text: text.to_owned(),
            source,
        })
    };
    let path = parse(store_path)?;
    if !policy.outputs.values().any(|output| *output == path) {
        return Err(UploadError::NotAnOutput(path));
    }
    let references: BTreeSet<StorePath> = references
        .iter()
        .map(|r| parse(r))
        .collect::<Result<_, _>>()?;
    let (mut allowed, upstream_only) = cache.closure_with_upstreams(&policy.input_paths).await?;
    allowed.extend(policy.outputs.values().cloned());
    if let Some(reference) = references.iter().find(|r| !allowed.contains(*r)) {
        return Err(UploadError::ReferenceOutsideClosure {
            path,
            reference: reference.clone(),
        });
    }
    let upstream_references = references.intersection(&upstream_only).cloned().collect();
    Ok(Publication {
        store_path: path,
        references,
        upstream_references,
        deriver: Some(policy.drv_path.clone()),
        content_address: policy
            .fixed
            .map(|(method, hash)| ContentAddress::Fixed { method, hash }),
        fixed: policy.fixed,
    })
}

/// Reads the chunks of an upload on a blocking thread; ends when the sender is dropped.
struct ChannelReader {
    receiver: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    position: usize,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<Vec<u8>>) -> Self {
        Self {
            receiver,
            current: Vec::new(),
            position: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            match self.receiver.blocking_recv() {
                Some(chunk) => {
                    self.current = chunk;
                    self.position = 0;
                }
                None => return Ok(0),
            }
        }
        let len = buf.len().min(self.current.len() - self.position);
        buf[..len].copy_from_slice(&self.current[self.position..self.position + len]);
        self.position += len;
        Ok(len)
    }
}
