//! NAR hashing throughput: drover's walk + serialise + SHA-256 against
//! `nix-store --dump DIR | sha256sum` and against Nix's own in-process `nix-hash --type sha256`
//! on the same tree, warm page cache, median of several runs. It also times the strict parser
//! ([`nar::summarize`]) on the same NAR in memory against plain SHA-256 of those bytes.
//!
//! Usage: `cargo run --release -p drover-bench --bin nar-hash -- [SIZE_MIB] [RUNS]`
//! (defaults: 200 MiB, 7 runs). Both sides must produce the same hash, or the run fails.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use nix_primitives::Hash;
use nix_primitives::hash::{HashAlgorithm, Hasher};
use nix_primitives::nar;

/// Files in the tree, spread over this many directories.
const DIRECTORIES: usize = 40;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let size_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    match run(size_mib, runs.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nar-hash: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(size_mib: usize, runs: usize) -> Result<(), String> {
    let scratch =
        tempfile::tempdir().map_err(|e| format!("creating a temporary directory: {e}"))?;
    let tree = scratch.path().join("tree");
    let total = build_tree(&tree, size_mib * 1024 * 1024).map_err(|e| e.to_string())?;
    let mut nar_bytes = Vec::new();
    nar::dump(&tree, &mut nar_bytes).map_err(|e| e.to_string())?;
    let nar_size = nar_bytes.len() as u64;
    println!(
        "tree: {:.1} MiB of file contents, NAR {:.1} MiB, {runs} runs each after one warm-up",
        mib(total),
        mib(nar_size)
    );
    let report = |label: &str, (time, _): &(Duration, String)| {
        println!(
            "{label:<34} median {:>7.1} ms {:>6.0} MiB/s",
            time.as_secs_f64() * 1000.0,
            mib(nar_size) / time.as_secs_f64()
        );
    };

    let drover = measure(runs, || {
        let mut hasher = Hasher::new(HashAlgorithm::Sha256);
        nar::dump(&tree, &mut hasher).map_err(|e| e.to_string())?;
        Ok(hasher.finish().to_base16())
    })?;
    let piped = measure(runs, || {
        command_hash(
            Command::new("sh")
                .arg("-c")
                .arg("nix-store --dump \"$1\" | sha256sum")
                .arg("sh")
                .arg(&tree),
        )
    })?;
    let nix_hash = measure(runs, || {
        command_hash(
            Command::new("nix-hash")
                .args(["--type", "sha256"])
                .arg(&tree),
        )
    })?;
    let parse = measure(runs, || {
        let summary = nar::summarize(nar_bytes.as_slice()).map_err(|e| e.to_string())?;
        Ok(summary.nar_hash.to_base16())
    })?;
    let sha256_only = measure(runs, || Ok(Hash::sha256(&nar_bytes).to_base16()))?;
    for other in [&piped, &nix_hash, &parse, &sha256_only] {
        if other.1 != drover.1 {
            return Err(format!("hashes differ: {} and {}", drover.1, other.1));
        }
    }

    println!("sha256 {}", drover.1);
    report("drover nar::dump + sha2", &drover);
    report("nix-store --dump | sha256sum", &piped);
    report("nix-hash --type sha256", &nix_hash);
    report("drover nar::summarize (in memory)", &parse);
    report("sha256 of the NAR (in memory)", &sha256_only);
    let ratio = |baseline: &(Duration, String), measured: &(Duration, String)| {
        baseline.0.as_secs_f64() / measured.0.as_secs_f64()
    };
    println!(
        "walk+serialise+hash, baseline time / drover time: nix-store --dump | sha256sum {:.2}, nix-hash {:.2}",
        ratio(&piped, &drover),
        ratio(&nix_hash, &drover)
    );
    println!(
        "strict parse+hash, time / plain sha256 time: {:.2}",
        ratio(&parse, &sha256_only)
    );
    Ok(())
}

/// Runs a command that prints a base16 hash first on its output, and returns that hash.
fn command_hash(command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!("{command:?} failed: {}", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Runs `job` once to warm up, then `runs` times; returns the median time and the job's result,
/// which must be the same every time.
fn measure(
    runs: usize,
    mut job: impl FnMut() -> Result<String, String>,
) -> Result<(Duration, String), String> {
    let expected = job()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let result = job()?;
        times.push(start.elapsed());
        if result != expected {
            return Err("a run produced a different hash".to_owned());
        }
    }
    times.sort();
    Ok((times[times.len() / 2], expected))
}

/// Writes a tree of about `bytes` of pseudo-random file contents: mostly small and medium files
/// (like a typical package) plus a few large ones, with some executables and symlinks.
fn build_tree(root: &Path, bytes: usize) -> std::io::Result<u64> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut written = 0usize;
    let mut index = 0usize;
    while written < bytes {
        let directory = root.join(format!("dir-{}", index % DIRECTORIES));
        fs_err::create_dir_all(&directory)?;
        let size = match index % 100 {
            0 => 8 * 1024 * 1024,
            1..=20 => 256 * 1024,
            _ => 1024 + (next() % (32 * 1024)) as usize,
        }
        .min(bytes - written);
        let contents: Vec<u8> = (0..size.div_ceil(8))
            .flat_map(|_| next().to_le_bytes())
            .take(size)
            .collect();
        let path = directory.join(format!("file-{index}"));
        fs_err::write(&path, &contents)?;
        if index.is_multiple_of(17) {
            use std::os::unix::fs::PermissionsExt as _;
            fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        if index.is_multiple_of(23) {
            std::os::unix::fs::symlink(
                format!("file-{index}"),
                directory.join(format!("link-{index}")),
            )?;
        }
        written += size;
        index += 1;
    }
    Ok(written as u64)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "byte counts far below 2^52 print exactly enough"
)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
