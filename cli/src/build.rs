//! `drover build FILE|DRV`: `nix-build` on a farm. Each derivation the target evaluates to is
//! built for its default output (`out`, as `nix-build` builds a derivation attribute): when the
//! local store has it, or the farm's cache does, nothing is queued; otherwise the derivations
//! are submitted and watched. The outputs are substituted into the local Nix store from the
//! farm's binary cache, linked as `nix-build` links them (`result`, then `result-2`, …) and
//! printed.
//!
//! On a multi-user Nix the daemon uses the farm's cache only if it is a trusted substituter: Nix
//! then says it ignores an untrusted substituter, and this command says how to fix that.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use error_context::WithContext;
use nix_primitives::{Derivation, StorePath};

use crate::submit::{self, SubmitError, TargetArgs};
use crate::watch;

/// `drover build` arguments.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// What to build, and where.
    #[command(flatten)]
    target: TargetArgs,
    /// The link to the output (`-2`, `-3`, … are appended for further derivations).
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
    let instantiated = submit::instantiate(&args.target)?;
    let requested = submit::requested_outputs(&args.target);
    let wanted = outputs_to_build(&instantiated.tops, requested.as_deref())?;
    let links: Vec<Option<PathBuf>> = wanted
        .iter()
        .map(|(index, name, _)| (!args.no_link).then(|| out_link(&args.out_link, *index, name)))
        .collect();
    // Valid here, or in the farm's cache: nothing to queue.
    let ready = wanted
        .iter()
        .zip(&links)
        .all(|((_, _, path), link)| substitute(path, link.as_deref(), &args).is_ok());
    if !ready {
        let (mut client, builds) = submit::submit_tops(&args.target, &instantiated).await?;
        let built = watch::watch(&mut client, &builds).await?;
        for ((index, _, path), link) in wanted.iter().zip(&links) {
            let produced = built
                .get(*index)
                .is_some_and(|(_, outputs)| outputs.values().any(|built| built == path));
            if !produced {
                return Err(SubmitError::OutputMissing(path.clone()).into());
            }
            substitute(path, link.as_deref(), &args)?;
        }
    }
    for (_, _, path) in &wanted {
        println!("{path}");
    }
    Ok(())
}

/// The outputs to build of each derivation, as (its index, output name, path), read from the
/// local `.drv` files: those `requested` (`*`: all), or its default output (`out`, else its
/// first), as `nix-build` builds a derivation attribute.
fn outputs_to_build(
    tops: &[StorePath],
    requested: Option<&[String]>,
) -> Result<Vec<(usize, String, String)>, SubmitError> {
    let mut wanted = Vec::new();
    for (index, top) in tops.iter().enumerate() {
        let real = top.to_absolute();
        let text = fs_err::read(&real).map_err(|source| SubmitError::Read {
            path: real.clone().into(),
            source,
        })?;
        let derivation =
            Derivation::parse(&text).map_err(|_| SubmitError::NotAStorePath(real.clone()))?;
        let paths: Vec<(&String, String)> = derivation
            .outputs
            .iter()
            .filter_map(|(name, output)| Some((name, output.path()?.to_absolute())))
            .collect();
        let names: Vec<String> = match requested {
            Some([all]) if all == "*" => paths.iter().map(|(name, _)| (*name).clone()).collect(),
            Some(names) => names.to_vec(),
            None => paths
                .iter()
                .find(|(name, _)| *name == "out")
                .or_else(|| paths.first())
                .map(|(name, _)| (*name).clone())
                .into_iter()
                .collect(),
        };
        for name in names {
            let path = paths
                .iter()
                .find(|(output, _)| **output == name)
                .map(|(_, path)| path.clone())
                .ok_or_else(|| SubmitError::UnknownOutput {
                    drv: real.clone(),
                    output: name.clone(),
                })?;
            wanted.push((index, name, path));
        }
    }
    Ok(wanted)
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

/// Makes `path` valid in the local store (it is already, or it comes from the farm's cache:
/// realising an output path substitutes, it never builds), and links it from `link`.
fn substitute(path: &str, link: Option<&Path>, args: &BuildArgs) -> Result<(), SubmitError> {
    let (cache, cache_key) = (&args.cache, &args.cache_key);
    let mut command = Command::new("nix-store");
    command
        .args(["--realise", path])
        .args(["--option", "substituters", cache])
        .args(["--option", "trusted-public-keys", cache_key])
        // The look before submitting found nothing: Nix must not remember that for an hour.
        .args(["--option", "narinfo-cache-negative-ttl", "0"]);
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
    Err(SubmitError::Fetch {
        path: path.to_owned(),
        cache: cache.to_owned(),
        said: stderr.lines().last().unwrap_or_default().to_owned(),
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
