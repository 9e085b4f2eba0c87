//! `drover build FILE|DRV`: `nix-build` on a farm. Submits every derivation the target evaluates
//! to, watches them, then substitutes their outputs into the local Nix store from the farm's
//! binary cache and leaves `./result` links as `nix-build` does (`result`, `result-dev`, …;
//! `result-2`, … for a second derivation), printing the output paths.
//!
//! On a multi-user Nix the daemon uses the farm's cache only if it is a trusted substituter: Nix
//! then says it ignores an untrusted substituter, and this command says how to fix that.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use error_context::WithContext;

use crate::submit::{self, SubmitError, TargetArgs};

/// `drover build` arguments.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// What to build, and where.
    #[command(flatten)]
    target: TargetArgs,
    /// The link to the output (`-dev` and the like are appended for other outputs).
    #[arg(long, short = 'o', default_value = "result")]
    out_link: PathBuf,
    /// Make no link.
    #[arg(long, conflicts_with = "out_link")]
    no_link: bool,
    /// The farm's binary cache (`drover dev-farm` exports it).
    #[arg(long, env = "DROVER_CACHE")]
    cache: String,
    /// The public key the farm signs its cache with.
    #[arg(long, env = "DROVER_CACHE_KEY")]
    cache_key: String,
}

/// Runs `drover build`.
pub async fn run(args: BuildArgs) -> Result<(), WithContext<SubmitError>> {
    let (mut client, builds) = submit::submit_target(&args.target).await?;
    let built = submit::watch(&mut client, &builds).await?;
    for (index, (_, outputs)) in built.iter().enumerate() {
        for (name, path) in outputs {
            let link = (!args.no_link).then(|| out_link(&args.out_link, index, name));
            substitute(path, link.as_deref(), &args.cache, &args.cache_key)?;
            println!("{path}");
        }
    }
    Ok(())
}

/// `nix-build`'s link name for output `name` of the `index`th derivation.
fn out_link(base: &Path, index: usize, name: &str) -> PathBuf {
    let mut link = base.as_os_str().to_owned();
    if index > 0 {
        link.push(format!("-{}", index + 1));
    }
    if name != "out" {
        link.push(format!("-{name}"));
    }
    PathBuf::from(link)
}

/// Makes `path` valid in the local store from the farm's cache, and links it from `link`.
fn substitute(
    path: &str,
    link: Option<&Path>,
    cache: &str,
    cache_key: &str,
) -> Result<(), SubmitError> {
    let mut command = Command::new("nix-store");
    command
        .args(["--realise", path])
        .args(["--option", "substituters", cache])
        .args(["--option", "trusted-public-keys", cache_key]);
    if let Some(link) = link {
        command.arg("--add-root").arg(link);
    }
    let output = command.output().map_err(|source| SubmitError::Nix {
        command: format!("{command:?}"),
        stderr: source.to_string(),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.contains("untrusted substituter") {
        return Err(SubmitError::UntrustedCache {
            cache: cache.to_owned(),
        });
    }
    Err(SubmitError::Nix {
        command: format!("{command:?}"),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_named_as_nix_build_names_them() {
        let base = Path::new("result");
        assert_eq!(out_link(base, 0, "out"), Path::new("result"));
        assert_eq!(out_link(base, 0, "dev"), Path::new("result-dev"));
        assert_eq!(out_link(base, 1, "out"), Path::new("result-2"));
        assert_eq!(out_link(base, 1, "dev"), Path::new("result-2-dev"));
    }
}
