//! Garbage collection of the cache directory: list every narinfo, let the core
//! ([`drover_scheduler::retention`]) mark what the roots and young paths need, then delete the
//! rest in small batches, narinfos first (flushed) and NAR files after, so a client never finds
//! a narinfo whose NAR is gone. Blocking file-system work: run it on a blocking thread.
//!
//! A path published after the sweep began, or found published by ingest or a publisher since
//! the previous sweep began ([`super::marks`]), stays with its closure. Narinfos are deleted
//! referrers first, so those present are always closed under their references. One sweep at a
//! time.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_scheduler::retention::{self, CachedPath, Marked, Root, RootKind};
use nix_primitives::StorePath;
use nix_primitives::narinfo::NarInfo;
use tokio_util::sync::CancellationToken;

use super::marks::Noted;
use super::{BinaryCache, CacheError};

/// Paths deleted while the sweep's lock is held, at most: short enough that a lookup waits
/// milliseconds.
const BATCH: usize = 256;

/// A build's paths as the database names them.
#[derive(Debug, Clone)]
pub struct RootPaths {
    /// The build (`None`: every live build).
    pub build: Option<i64>,
    /// Why it is a root.
    pub kind: RootKind,
    /// When it finished, seconds since the epoch.
    pub finished_at: Option<i64>,
    /// Store paths it needs (absolute); those not in the cache are ignored.
    pub paths: Vec<String>,
}

/// One narinfo of the cache.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The store path it describes.
    pub path: StorePath,
    /// Its file's name in the cache directory, as listed (deleted by that name).
    pub file: String,
    /// Its NAR file, relative to the cache.
    pub url: String,
    /// The store paths it refers to.
    pub references: Vec<StorePath>,
    /// Its NAR file's size.
    pub bytes: u64,
    /// When its narinfo appeared (the inode's change time: a rename into place sets it).
    pub published: SystemTime,
}

/// What a sweep decided.
#[derive(Debug)]
pub struct Plan {
    /// The cache as listed.
    pub listed: Vec<Listed>,
    /// What stays.
    pub marked: Marked,
    /// How many builds (live ones counted as one) were roots.
    pub root_count: usize,
    /// Each listed path's position, by store path.
    index: HashMap<StorePath, usize>,
    /// The listed paths each one refers to.
    references: Vec<Vec<usize>>,
}

impl Plan {
    /// The paths that go.
    pub fn doomed(&self) -> impl Iterator<Item = &Listed> {
        self.listed
            .iter()
            .zip(&self.marked.keep)
            .filter(|(_, keep)| !**keep)
            .map(|(listed, _)| listed)
    }

    /// How many paths stay.
    #[must_use]
    pub fn kept(&self) -> usize {
        self.marked.keep.iter().filter(|keep| **keep).count()
    }

    /// The doomed paths, each before the paths it refers to: a narinfo is deleted only after
    /// every narinfo referring to it, so those still present are closed under references.
    fn deletion_order(&self) -> Vec<usize> {
        let mut order = Vec::new();
        let mut visited = vec![false; self.listed.len()];
        for start in (0..self.listed.len()).filter(|&at| !self.marked.keep[at]) {
            let mut stack = vec![(start, false)];
            while let Some((at, inputs_done)) = stack.pop() {
                if inputs_done {
                    order.push(at);
                } else if !std::mem::replace(&mut visited[at], true) {
                    stack.push((at, true));
                    stack.extend(
                        self.references[at]
                            .iter()
                            .filter(|&&next| !visited[next] && !self.marked.keep[next])
                            .map(|&next| (next, false)),
                    );
                }
            }
        }
        order.reverse();
        order
    }
}

/// What a sweep deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Narinfos deleted.
    pub paths: u64,
    /// NAR bytes deleted.
    pub bytes: u64,
    /// Files that could not be deleted (logged; the next sweep tries again).
    pub failed: u64,
}

/// Reads every narinfo of the cache in `directory`. A narinfo that cannot be read is kept and
/// logged: GC never deletes what it does not understand.
pub fn list(directory: &Path) -> Result<Vec<Listed>, CacheError> {
    let mut listed = Vec::new();
    for entry in fs_err::read_dir(directory).map_err(CacheError::Io)? {
        let entry = entry.map_err(CacheError::Io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|name| name.ends_with(".narinfo")) else {
            continue;
        };
        let published = match entry.metadata() {
            Ok(metadata) => {
                let nanos = u32::try_from(metadata.ctime_nsec()).unwrap_or(0);
                UNIX_EPOCH + Duration::new(metadata.ctime().unsigned_abs(), nanos)
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(CacheError::Io(error)),
        };
        let text = match fs_err::read_to_string(entry.path()) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(CacheError::Io(error)),
        };
        match NarInfo::parse(&text) {
            Ok(info) => listed.push(Listed {
                file: name.to_owned(),
                bytes: info.file_size.unwrap_or(info.nar_size),
                url: info.url,
                references: info.references.into_iter().collect(),
                path: info.store_path,
                published,
            }),
            Err(error) => tracing::warn!(file = name, %error, "narinfo kept: it cannot be read"),
        }
    }
    Ok(listed)
}

/// Marks what stays: the closure of `roots`, of every path published within `grace` of
/// `started` (or after it) and of every path `used` since the previous sweep began; under
/// `max_bytes`, the newest roots that fit.
#[must_use]
pub fn plan(listed: Vec<Listed>, roots: &[RootPaths], used: &Noted, policy: &Timing) -> Plan {
    let index: HashMap<StorePath, usize> = listed
        .iter()
        .enumerate()
        .map(|(at, listed)| (listed.path.clone(), at))
        .collect();
    let young_after = policy
        .started
        .checked_sub(policy.grace)
        .unwrap_or(UNIX_EPOCH);
    let references: Vec<Vec<usize>> = listed
        .iter()
        .map(|listed| {
            listed
                .references
                .iter()
                .filter_map(|reference| index.get(reference).copied())
                .collect()
        })
        .collect();
    let paths: Vec<CachedPath> = listed
        .iter()
        .zip(&references)
        .map(|(listed, references)| CachedPath {
            bytes: listed.bytes,
            references: references.clone(),
            young: listed.published >= young_after || used.paths.contains(&listed.path),
        })
        .collect();
    let core_roots: Vec<Root> = roots
        .iter()
        .map(|root| Root {
            build: root.build,
            kind: root.kind,
            finished_at: root.finished_at,
            paths: root
                .paths
                .iter()
                .filter_map(|path| StorePath::from_absolute(path).ok())
                .filter_map(|path| index.get(&path).copied())
                .collect(),
        })
        .collect();
    Plan {
        marked: retention::mark(&paths, &core_roots, policy.max_bytes),
        listed,
        root_count: roots.len(),
        index,
        references,
    }
}

/// When a sweep starts and what it may delete.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When it began (before its roots were read).
    pub started: SystemTime,
    /// Paths published this long before `started` stay.
    pub grace: Duration,
    /// The bound on NAR bytes.
    pub max_bytes: Option<u64>,
}

/// Deletes what `plan` does not keep, less what is looked up or published meanwhile and the
/// NAR files `placed` since the previous sweep began; stops between batches once `stop` is
/// cancelled. A file that cannot be deleted is logged and counted, and the sweep goes on.
pub fn sweep(
    cache: &BinaryCache,
    plan: &mut Plan,
    placed: impl IntoIterator<Item = String>,
    stop: &CancellationToken,
) -> Swept {
    cache.marks().doom(Noted {
        paths: plan.doomed().map(|listed| listed.path.clone()).collect(),
        nars: plan.doomed().map(|listed| listed.url.clone()).collect(),
    });
    let swept = delete(cache, plan, placed.into_iter().collect(), stop);
    cache.marks().doom(Noted::default());
    swept
}

/// Deletes the doomed narinfos, then the NAR files only they named.
fn delete(
    cache: &BinaryCache,
    plan: &mut Plan,
    mut placed: HashSet<String>,
    stop: &CancellationToken,
) -> Swept {
    let mut deleted = Vec::new();
    let mut swept = Swept::default();
    for batch in plan.deletion_order().chunks(BATCH) {
        if stop.is_cancelled() {
            break;
        }
        let (_deleting, noted) = cache.marks().hold();
        placed.extend(noted.nars);
        protect(cache, plan, &noted.paths);
        for &at in batch {
            if plan.marked.keep[at] {
                continue;
            }
            if remove(&cache.directory().join(&plan.listed[at].file), &mut swept) {
                deleted.push(at);
            }
        }
    }
    if let Err(error) = cache.flush() {
        tracing::warn!(%error, "flushing the cache after deleting narinfos failed; NAR files kept");
        return swept;
    }
    let kept_nars: HashSet<&str> = (0..plan.listed.len())
        .filter(|&at| plan.marked.keep[at])
        .map(|at| plan.listed[at].url.as_str())
        .collect();
    let mut orphaned: Vec<(&str, u64)> = deleted
        .iter()
        .map(|&at| (plan.listed[at].url.as_str(), plan.listed[at].bytes))
        .filter(|(url, _)| !kept_nars.contains(url) && is_nar_file(url))
        .collect();
    orphaned.sort_unstable();
    orphaned.dedup_by_key(|(url, _)| *url);
    swept.paths = u64::try_from(deleted.len()).unwrap_or(u64::MAX);
    for batch in orphaned.chunks(BATCH) {
        if stop.is_cancelled() {
            break;
        }
        let (_deleting, noted) = cache.marks().hold();
        placed.extend(noted.nars);
        for (url, bytes) in batch {
            if !placed.contains(*url) && remove(&cache.directory().join(url), &mut swept) {
                swept.bytes += bytes;
            }
        }
    }
    swept
}

/// Whether a narinfo's URL names a file of the cache's `nar/` directory.
fn is_nar_file(url: &str) -> bool {
    url.strip_prefix("nar/")
        .is_some_and(|name| !name.is_empty() && !name.contains('/') && !name.starts_with('.'))
}

/// Keeps every path in `noted` that is still listed, with its closure. Called with the gate
/// held exclusively: it reads nothing through [`BinaryCache`]'s lookups, which would wait on it.
fn protect(cache: &BinaryCache, plan: &mut Plan, noted: &HashSet<StorePath>) {
    let mut keep: Vec<usize> = Vec::new();
    for path in noted {
        if let Some(&at) = plan.index.get(path) {
            keep.push(at);
            continue;
        }
        // Published after the listing: what it refers to is listed, and referrers go first,
        // so its references are all still here.
        let info = fs_err::read_to_string(cache.narinfo_file(path))
            .ok()
            .and_then(|text| NarInfo::parse(&text).ok());
        for reference in info.iter().flat_map(|info| &info.references) {
            keep.extend(plan.index.get(reference).copied());
        }
    }
    while let Some(at) = keep.pop() {
        if !std::mem::replace(&mut plan.marked.keep[at], true) {
            plan.marked.kept_bytes += plan.listed[at].bytes;
            keep.extend(plan.references[at].iter().copied());
        }
    }
}

/// Deletes a file that may be gone already; false, logged and counted, when it cannot be.
fn remove(file: &Path, swept: &mut Swept) -> bool {
    match fs_err::remove_file(file) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(%error, "a cache file could not be deleted; kept");
            swept.failed += 1;
            false
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "a panic in a test is a failed assertion"
    )]

    use std::collections::BTreeSet;

    use nix_primitives::nar::write_file_nar;
    use nix_primitives::signing::SecretKey;
    use nix_primitives::{ContentAddress, Hash};

    use super::*;
    use crate::cache::upstream::Upstreams;

    /// Publishes a `builtins.toFile`-like text referring to `references`; returns its path.
    fn text(cache: &BinaryCache, name: &str, references: &[&StorePath]) -> StorePath {
        let references: BTreeSet<StorePath> = references.iter().map(|&path| path.clone()).collect();
        let contents = format!("{name} {references:?}");
        let path = ContentAddress::Text(Hash::sha256(contents.as_bytes()))
            .store_path(name, &references, false)
            .unwrap();
        let mut nar = Vec::new();
        write_file_nar(contents.as_bytes(), false, &mut nar).unwrap();
        cache.publish_source(&path, references, &nar).unwrap();
        path
    }

    fn open() -> (tempfile::TempDir, BinaryCache) {
        let directory = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("gc-test-1").unwrap();
        let cache = BinaryCache::open(directory.path(), key, Upstreams::new(Vec::new())).unwrap();
        (directory, cache)
    }

    /// A sweep an hour from now with no grace: nothing is young.
    fn later() -> Timing {
        Timing {
            started: SystemTime::now() + Duration::from_hours(1),
            grace: Duration::ZERO,
            max_bytes: None,
        }
    }

    /// Sweeps what `marked` does not keep, nothing placed, no shutdown.
    fn sweep_now(cache: &BinaryCache, marked: &mut Plan) -> Swept {
        sweep(cache, marked, HashSet::new(), &CancellationToken::new())
    }

    fn nar_files(cache: &BinaryCache) -> usize {
        fs_err::read_dir(cache.directory().join("nar"))
            .unwrap()
            .count()
    }

    #[test]
    fn a_path_looked_up_during_the_sweep_stays_with_its_closure() {
        let (_directory, cache) = open();
        let leaf = text(&cache, "leaf", &[]);
        let middle = text(&cache, "middle", &[&leaf]);
        let top = text(&cache, "top", &[&middle]);
        let lone = text(&cache, "lone", &[]);
        // Marked as if nothing were young, used or rooted: everything is doomed.
        cache.marks().take();
        let listed = list(cache.directory()).unwrap();
        let mut marked = plan(listed, &[], &Noted::default(), &later());
        assert_eq!(marked.doomed().count(), 4);
        // Ingest finds `top` published between the marking and the deletion.
        assert!(cache.is_published(&top));
        let swept = sweep_now(&cache, &mut marked);
        assert_eq!(swept.paths, 1);
        for kept in [&top, &middle, &leaf] {
            assert!(cache.is_published(kept), "{kept} was deleted");
        }
        assert!(!cache.is_published(&lone));
        assert_eq!(
            nar_files(&cache),
            3,
            "the lone path's NAR went with its narinfo"
        );
    }

    #[test]
    fn referrers_are_deleted_before_what_they_refer_to() {
        let (_directory, cache) = open();
        let leaf = text(&cache, "leaf", &[]);
        let middle = text(&cache, "middle", &[&leaf]);
        let top = text(&cache, "top", &[&middle, &leaf]);
        let marked = plan(
            list(cache.directory()).unwrap(),
            &[],
            &Noted::default(),
            &later(),
        );
        let order: Vec<&StorePath> = marked
            .deletion_order()
            .into_iter()
            .map(|at| &marked.listed[at].path)
            .collect();
        assert_eq!(order, [&top, &middle, &leaf]);
    }

    #[test]
    fn roots_and_young_paths_stay_and_the_rest_goes_narinfo_and_nar() {
        let (_directory, cache) = open();
        let leaf = text(&cache, "leaf", &[]);
        let rooted = text(&cache, "rooted", &[&leaf]);
        let gone = text(&cache, "gone", &[&leaf]);
        let roots = [RootPaths {
            build: Some(1),
            kind: RootKind::Recent,
            finished_at: Some(1),
            paths: vec![rooted.to_absolute()],
        }];
        // As if a sweep had begun since they were published.
        cache.marks().take();
        let listed = list(cache.directory()).unwrap();
        let mut marked = plan(listed, &roots, &Noted::default(), &later());
        let swept = sweep_now(&cache, &mut marked);
        assert_eq!(swept.paths, 1);
        assert!(cache.is_published(&rooted) && cache.is_published(&leaf));
        assert!(!cache.is_published(&gone));
        assert_eq!(nar_files(&cache), 2);

        // Published now, within an hour's grace: young, so it stays.
        let fresh = text(&cache, "fresh", &[]);
        let timing = Timing {
            started: SystemTime::now(),
            grace: Duration::from_hours(1),
            max_bytes: None,
        };
        let mut marked = plan(
            list(cache.directory()).unwrap(),
            &[],
            &Noted::default(),
            &timing,
        );
        let swept = sweep_now(&cache, &mut marked);
        assert_eq!(swept.paths, 0);
        assert!(cache.is_published(&fresh));
        // Looked up since the previous sweep began: it stays however old.
        let used = cache.marks().take();
        assert!(used.paths.contains(&fresh), "{:?}", used.paths);
        let marked = plan(list(cache.directory()).unwrap(), &[], &used, &later());
        assert_eq!(marked.doomed().count(), 0);
    }
}
