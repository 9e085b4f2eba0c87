//! Where the derivations builds are planned from come from: their closures read from the
//! database, each derivation verified once (its verified row stored, and read back by later job
//! sets and a restarted runner).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use drover_scheduler::StepSpec;

use nix_primitives::StorePath;

use crate::db::queries::{self, QueuedBuild};
use crate::db::{self, DbError};
use crate::scheduler::handoff::Handoff;
use crate::verify::{self, Loaded, VerifiedClosure, VerifyError};

/// The verified closure builds are expanded from. A build of its own gets a fresh one (Submit's,
/// from the handoff, when it left one); consecutive builds of one job set share theirs, so a
/// derivation they share is loaded and verified once, and the step specs planned from it, so
/// the slices of a job set do not make a step's spec again for each slice that needs it.
#[derive(Debug, Default)]
pub struct SharedClosure {
    job_set: Option<i64>,
    closure: VerifiedClosure,
    specs: HashMap<StorePath, Arc<StepSpec>>,
}

impl SharedClosure {
    /// The closure to expand `group` from (builds of one job set, or one build of its own), with
    /// the specs planned from it so far.
    pub fn for_group(
        &mut self,
        group: &[QueuedBuild],
        handoff: &Handoff,
    ) -> (&mut VerifiedClosure, &mut HashMap<StorePath, Arc<StepSpec>>) {
        let job_set = group.first().and_then(|build| build.job_set);
        if job_set.is_none() || job_set != self.job_set {
            self.job_set = job_set;
            // Submit and SubmitJobSet leave what they verified under the first build's id.
            self.closure = group
                .first()
                .and_then(|build| handoff.take(build.id))
                .unwrap_or_default();
            self.specs = HashMap::new();
        }
        (&mut self.closure, &mut self.specs)
    }
}

/// Reads the closures of `tops` from the database in one walk, verifies what `closure` lacks of
/// them, adds them there and stores what was verified from their text. Returns each top's
/// outcome, in order: its path, or why its closure is refused. The outer error is the
/// database's. A walk that meets a derivation missing or unreadable is done again top by top, so
/// each refusal names its own cause and the other tops are not held up by it.
pub async fn load_closures(
    client: &impl deadpool_postgres::GenericClient,
    tops: &[&str],
    closure: &mut VerifiedClosure,
) -> Result<Vec<Result<StorePath, VerifyError>>, DbError> {
    let parsed: Vec<Result<StorePath, VerifyError>> =
        tops.iter().map(|top| verify::parse_path(top)).collect();
    let walked: Vec<StorePath> = parsed
        .iter()
        .filter_map(|top| top.as_ref().ok().cloned())
        .collect();
    let mut loaded = BTreeMap::new();
    if complete_closure(client, &walked, closure, &mut loaded)
        .await?
        .is_err()
    {
        let mut outcomes = Vec::with_capacity(tops.len());
        for top in parsed {
            outcomes.push(match top {
                Ok(top) => load_closure(client, top, closure).await?,
                Err(error) => Err(error),
            });
        }
        return Ok(outcomes);
    }
    let mut verified = Vec::new();
    let outcomes = parsed
        .into_iter()
        .map(|top| {
            let top = top?;
            verified.append(&mut closure.add(&top, &mut loaded)?);
            Ok(top)
        })
        .collect();
    db::verified::store(client, &verified).await?;
    Ok(outcomes)
}

/// Reads the closure of `top` alone, as [`load_closures`] does for many.
async fn load_closure(
    client: &impl deadpool_postgres::GenericClient,
    top: StorePath,
    closure: &mut VerifiedClosure,
) -> Result<Result<StorePath, VerifyError>, DbError> {
    let mut loaded = BTreeMap::new();
    if let Err(error) =
        complete_closure(client, std::slice::from_ref(&top), closure, &mut loaded).await?
    {
        return Ok(Err(error));
    }
    match closure.add(&top, &mut loaded) {
        Ok(verified) => {
            db::verified::store(client, &verified).await?;
            Ok(Ok(top))
        }
        Err(error) => Ok(Err(error)),
    }
}

/// Adds to `loaded` every derivation of the closures of `tops` that neither it nor `known` has,
/// breadth-first with one or two queries per level for all of them: its stored verified row, or
/// else its text, parsed. The closure of a derivation `known` has is complete, so the walk stops
/// there.
pub async fn complete_closure(
    client: &impl deadpool_postgres::GenericClient,
    tops: &[StorePath],
    known: &VerifiedClosure,
    loaded: &mut BTreeMap<StorePath, Loaded>,
) -> Result<Result<(), VerifyError>, DbError> {
    let mut seen: BTreeSet<StorePath> = tops.iter().cloned().collect();
    let mut frontier: Vec<StorePath> = seen.iter().cloned().collect();
    while !frontier.is_empty() {
        frontier.retain(|path| !known.derivations.contains_key(path));
        let mut wanted: BTreeSet<String> = frontier
            .iter()
            .filter(|path| !loaded.contains_key(*path))
            .map(StorePath::to_absolute)
            .collect();
        if !wanted.is_empty() {
            let paths: Vec<String> = wanted.iter().cloned().collect();
            for stored in db::verified::load(client, &paths).await? {
                wanted.remove(&stored.path.to_absolute());
                loaded.insert(stored.path.clone(), Loaded::Stored(stored));
            }
        }
        if !wanted.is_empty() {
            let paths: Vec<String> = wanted.into_iter().collect();
            for (path_text, text) in queries::derivation_texts(client, &paths).await? {
                let path = match verify::parse_path(&path_text) {
                    Ok(path) => path,
                    Err(error) => return Ok(Err(error)),
                };
                match verify::parse_derivation(&path, &text) {
                    Ok(derivation) => {
                        loaded.insert(path, Loaded::Parsed(derivation));
                    }
                    Err(error) => return Ok(Err(error)),
                }
            }
        }
        let mut next = Vec::new();
        for path in &frontier {
            let Some(found) = loaded.get(path) else {
                return Ok(Err(VerifyError::Missing(path.clone())));
            };
            for input in found.inputs() {
                if seen.insert(input.clone()) {
                    next.push(input.clone());
                }
            }
        }
        frontier = next;
    }
    Ok(Ok(()))
}
