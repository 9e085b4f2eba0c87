# A file that evaluates to several derivations, as a CI job set does: `drover submit` queues them
# as one job set (a build each, all or none) and, with --watch, waits for all of them.
#   drover submit examples/jobs.nix --watch
{ system ? "x86_64-linux" }:
let diamond = import ./diamond.nix { inherit system; };
in {
  inherit (diamond) left right;
}
