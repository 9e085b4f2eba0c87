# A file that evaluates to several derivations, as a CI job set does: `drover submit` submits each
# as its own build and, with --watch, waits for all of them.
#   drover submit examples/jobs.nix --watch
{ system ? "x86_64-linux" }:
let diamond = import ./diamond.nix { inherit system; };
in {
  inherit (diamond) left right;
}
