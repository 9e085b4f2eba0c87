//! What a cache garbage collection keeps: closures of roots and young paths, and which roots a
//! size bound drops (the oldest first, never live or pinned ones).

use proptest::prelude::*;

use crate::retention::{CachedPath, Marked, Root, RootKind, mark};

fn path(bytes: u64, references: &[usize]) -> CachedPath {
    CachedPath {
        bytes,
        references: references.to_vec(),
        young: false,
    }
}

fn root(build: i64, kind: RootKind, finished_at: Option<i64>, paths: &[usize]) -> Root {
    Root {
        build: Some(build),
        kind,
        finished_at,
        paths: paths.to_vec(),
    }
}

fn kept(marked: &Marked) -> Vec<usize> {
    (0..marked.keep.len()).filter(|&i| marked.keep[i]).collect()
}

#[test]
fn a_root_keeps_its_closure_and_nothing_else() {
    // 0 -> 1 -> 2 (and 2 refers to itself); 3 -> 2; 4 alone.
    let paths = [
        path(10, &[1]),
        path(20, &[2]),
        path(30, &[2]),
        path(40, &[2]),
        path(50, &[]),
    ];
    let marked = mark(&paths, &[root(1, RootKind::Recent, Some(5), &[0])], None);
    assert_eq!(kept(&marked), vec![0, 1, 2]);
    assert_eq!(marked.kept_bytes, 60);
    assert!(marked.dropped.is_empty());
}

#[test]
fn a_young_path_keeps_its_closure_without_a_root() {
    let mut paths = [path(1, &[1]), path(2, &[]), path(4, &[])];
    paths[0].young = true;
    let marked = mark(&paths, &[], None);
    assert_eq!(kept(&marked), vec![0, 1]);
    assert_eq!(marked.protected_bytes, 3);
}

#[test]
fn the_bound_drops_the_oldest_roots_first() {
    let paths = [
        path(100, &[]),
        path(100, &[]),
        path(100, &[]),
        path(100, &[]),
    ];
    let roots = [
        root(1, RootKind::Recent, Some(10), &[0]),
        root(2, RootKind::Recent, Some(30), &[1]),
        root(3, RootKind::NewestOfKey, Some(20), &[2]),
        root(4, RootKind::Recent, Some(40), &[3]),
    ];
    let marked = mark(&paths, &roots, Some(250));
    assert_eq!(kept(&marked), vec![1, 3], "the two newest fit");
    assert_eq!(
        marked.dropped,
        vec![3, 1],
        "dropped newest first, all older than the first"
    );
    assert_eq!(marked.kept_bytes, 200);
}

#[test]
fn a_shared_path_counts_once_and_a_dropped_root_keeps_what_others_need() {
    // Both roots need 2; the older one alone also needs 1.
    let paths = [path(10, &[2]), path(100, &[2]), path(50, &[])];
    let roots = [
        root(1, RootKind::Recent, Some(1), &[1]),
        root(2, RootKind::Recent, Some(2), &[0]),
    ];
    let marked = mark(&paths, &roots, Some(100));
    assert_eq!(kept(&marked), vec![0, 2]);
    assert_eq!(marked.dropped, vec![1]);
}

#[test]
fn live_and_pinned_builds_stay_over_the_bound_and_say_so() {
    let paths = [path(300, &[]), path(300, &[]), path(10, &[])];
    let roots = [
        root(1, RootKind::Live, None, &[0]),
        root(2, RootKind::Pinned, Some(1), &[1]),
        root(3, RootKind::Recent, Some(99), &[2]),
    ];
    let marked = mark(&paths, &roots, Some(500));
    assert_eq!(kept(&marked), vec![0, 1]);
    assert_eq!(marked.dropped, vec![3]);
    assert_eq!(marked.protected_bytes, 600);
    assert!(marked.protected_over(Some(500)));
    assert!(!marked.protected_over(None));
}

fn listing() -> impl Strategy<Value = Vec<CachedPath>> {
    (1usize..40).prop_flat_map(|len| {
        prop::collection::vec(
            (
                1u64..1000,
                prop::collection::vec(0..len, 0..4),
                prop::bool::weighted(0.1),
            )
                .prop_map(|(bytes, references, young)| CachedPath {
                    bytes,
                    references,
                    young,
                }),
            len,
        )
    })
}

fn roots(len: usize) -> impl Strategy<Value = Vec<Root>> {
    let kind = prop_oneof![
        Just(RootKind::Live),
        Just(RootKind::Pinned),
        Just(RootKind::NewestOfKey),
        Just(RootKind::Recent),
    ];
    prop::collection::vec((kind, 0i64..100, prop::collection::vec(0..len, 0..3)), 0..8).prop_map(
        |roots| {
            roots
                .into_iter()
                .enumerate()
                .map(|(build, (kind, finished_at, paths))| Root {
                    build: i64::try_from(build).ok(),
                    kind,
                    finished_at: (kind != RootKind::Live).then_some(finished_at),
                    paths,
                })
                .collect()
        },
    )
}

proptest! {
    #[test]
    fn what_stays_is_closed_and_fits(
        (paths, roots, max) in listing().prop_flat_map(|paths| {
            let len = paths.len();
            (Just(paths), roots(len), prop::option::of(0u64..20_000))
        })
    ) {
        let marked = mark(&paths, &roots, max);
        for (index, path) in paths.iter().enumerate() {
            if marked.keep[index] {
                for &reference in &path.references {
                    prop_assert!(marked.keep[reference], "{index} kept without {reference}");
                }
            }
            if path.young {
                prop_assert!(marked.keep[index]);
            }
        }
        let bytes: u64 = (0..paths.len()).filter(|&i| marked.keep[i]).map(|i| paths[i].bytes).sum();
        prop_assert_eq!(bytes, marked.kept_bytes);
        for root in &roots {
            let whole = root.paths.iter().all(|&p| marked.keep[p]);
            let dropped = root.build.is_some_and(|build| marked.dropped.contains(&build));
            if !root.kind.droppable() || !dropped {
                prop_assert!(whole, "root {:?} lost a path", root.build);
            }
        }
        if let Some(max) = max
            && !marked.protected_over(Some(max))
        {
            prop_assert!(marked.kept_bytes <= max);
        }
        if max.is_none() {
            prop_assert!(marked.dropped.is_empty());
        }
    }
}
