# A small build graph for trying drover: a diamond (base, then left and right in parallel, then
# top) whose steps need nothing but /bin/sh, so it builds on any Linux builder without a nixpkgs.
#   drover submit examples/diamond.nix --attr top --watch
{ system ? "x86_64-linux" }:
let
  step = name: script: inputs: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // inputs);
in rec {
  base = step "diamond-base" ''
    echo "the base of the diamond" > $out
  '' { };
  left = step "diamond-left" ''
    read line < $base
    echo "left, built on: $line" > $out
  '' { inherit base; };
  right = step "diamond-right" ''
    read line < $base
    echo "right, built on: $line" > $out
  '' { inherit base; };
  top = step "diamond-top" ''
    /bin/mkdir -p $out/bin
    read l < $left
    read r < $right
    echo "$l / $r" > $out/summary
    echo "$left" > $out/left-path
    echo "#!/bin/sh" > $out/bin/show
    echo "echo $right" >> $out/bin/show
    /bin/chmod +x $out/bin/show
    /bin/ln -s $right $out/right
  '' { inherit left right; };
}
