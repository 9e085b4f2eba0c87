//! What a garbage collection of the binary cache keeps: the closure, through narinfo
//! references, of the roots (the outputs and inputs of builds still wanted) and of paths too
//! young to judge; under a size bound, which roots go first (the oldest finished builds; never
//! live or pinned ones). Plain data: paths are indices into the caller's listing of the cache.

/// One path of the cache, as listed.
#[derive(Debug, Clone, Default)]
pub struct CachedPath {
    /// Its compressed NAR's size, what deleting it frees.
    pub bytes: u64,
    /// The listed paths it refers to (indices; itself included or not).
    pub references: Vec<usize>,
    /// Published within the grace period, or touched while the sweep runs: kept with its
    /// closure whatever the roots say.
    pub young: bool,
}

/// Why a build's paths are roots, in the order a size bound respects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RootKind {
    /// Queued or running: everything it needs (outputs of its steps, input sources). Never
    /// dropped.
    Live,
    /// Pinned by an admin. Never dropped.
    Pinned,
    /// Among the newest builds of its key (a jobset, a branch).
    NewestOfKey,
    /// Finished within the days kept.
    Recent,
}

impl RootKind {
    /// Whether a size bound may drop it.
    #[must_use]
    pub const fn droppable(self) -> bool {
        matches!(self, Self::NewestOfKey | Self::Recent)
    }

    /// Its name in logs, metrics and `gc --dry-run`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Pinned => "pinned",
            Self::NewestOfKey => "newest_of_key",
            Self::Recent => "recent",
        }
    }
}

/// A build whose paths must stay.
#[derive(Debug, Clone)]
pub struct Root {
    /// The build; `None` for every live build at once (they are never dropped, so they need
    /// not be told apart).
    pub build: Option<i64>,
    /// Why.
    pub kind: RootKind,
    /// When it finished, in seconds since the epoch (a live build has not: `None`).
    pub finished_at: Option<i64>,
    /// The listed paths it names (its closure follows from their references).
    pub paths: Vec<usize>,
}

/// What a sweep keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    /// For each listed path, whether it stays.
    pub keep: Vec<bool>,
    /// The bytes of what stays.
    pub kept_bytes: u64,
    /// The builds whose roots the size bound dropped, newest first.
    pub dropped: Vec<i64>,
    /// The bytes of what must stay whatever the bound: live and pinned builds and young
    /// paths, with their closures.
    pub protected_bytes: u64,
}

impl Marked {
    /// Whether what must stay alone exceeds `max_bytes`.
    #[must_use]
    pub const fn protected_over(&self, max_bytes: Option<u64>) -> bool {
        match max_bytes {
            Some(max) => self.protected_bytes > max,
            None => false,
        }
    }
}

/// Marks what stays: the closure of the young paths and of every root; with `max_bytes`, the
/// droppable roots are taken newest first while their closures fit, and the first one that
/// does not fit is dropped with every older one.
#[must_use]
pub fn mark(paths: &[CachedPath], roots: &[Root], max_bytes: Option<u64>) -> Marked {
    let mut marker = Marker {
        paths,
        keep: vec![false; paths.len()],
        bytes: 0,
    };
    let young = (0..paths.len()).filter(|&index| paths[index].young);
    marker.add(young);
    for root in roots.iter().filter(|root| !root.kind.droppable()) {
        marker.add(root.paths.iter().copied());
    }
    let protected_bytes = marker.bytes;
    let mut droppable: Vec<&Root> = roots.iter().filter(|root| root.kind.droppable()).collect();
    droppable.sort_by_key(|root| std::cmp::Reverse(root.finished_at.unwrap_or(i64::MAX)));
    let mut dropped = Vec::new();
    for root in droppable {
        if !dropped.is_empty() {
            dropped.extend(root.build);
            continue;
        }
        let added = marker.add(root.paths.iter().copied());
        if max_bytes.is_some_and(|max| marker.bytes > max) {
            marker.undo(&added);
            dropped.extend(root.build);
        }
    }
    Marked {
        keep: marker.keep,
        kept_bytes: marker.bytes,
        dropped,
        protected_bytes,
    }
}

/// Marking in progress: what stays so far and its bytes.
struct Marker<'a> {
    paths: &'a [CachedPath],
    keep: Vec<bool>,
    bytes: u64,
}

impl Marker<'_> {
    /// Marks the closure of `from`; returns the paths newly marked.
    fn add(&mut self, from: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut added = Vec::new();
        let mut pending: Vec<usize> = from.into_iter().collect();
        while let Some(index) = pending.pop() {
            let Some(path) = self.paths.get(index) else {
                continue;
            };
            if std::mem::replace(&mut self.keep[index], true) {
                continue;
            }
            self.bytes += path.bytes;
            added.push(index);
            pending.extend(
                path.references
                    .iter()
                    .filter(|&&next| self.keep.get(next).is_some_and(|kept| !kept)),
            );
        }
        added
    }

    /// Unmarks what [`Self::add`] marked.
    fn undo(&mut self, added: &[usize]) {
        for &index in added {
            self.keep[index] = false;
            self.bytes -= self.paths[index].bytes;
        }
    }
}
