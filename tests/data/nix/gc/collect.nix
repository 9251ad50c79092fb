# Derivations for the comparison of `drover gc` with `nix-store --gc`
# (`cli/tests/cli/gc_collect.rs`): a chain of references, outputs kept by roots of
# every kind, dead paths (one of them a read-only tree with a file big enough to
# count in MiB), and identical files for `.links` under auto-optimise-store.
let
  system = builtins.currentSystem;
  sh = name: script: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
in
rec {
  dep = sh "dep" "echo dep > $out";
  top = sh "top" "echo ${dep} > $out";
  lone = sh "lone" "echo lone > $out";
  prof = sh "prof" "mkdir $out; echo profile > $out/p";
  cwd = sh "cwd" "mkdir $out";
  fd = sh "fd" "echo fd > $out";
  dead1 = sh "dead1" "mkdir -p $out/d; head -c 1500000 /dev/zero | tr '\\0' x > $out/d/big; chmod 555 $out/d";
  dead2 = sh "dead2" "echo ${dead1} > $out";
  # the same 300 kB file, dead twice (its link goes) and live once beside a dead one
  twin1 = sh "twin1" "mkdir $out; head -c 300000 /dev/zero | tr '\\0' t > $out/f";
  twin2 = sh "twin2" "mkdir $out; head -c 300000 /dev/zero | tr '\\0' t > $out/f";
  half1 = sh "half1" "mkdir $out; head -c 200000 /dev/zero | tr '\\0' h > $out/f";
  half2 = sh "half2" "mkdir $out; head -c 200000 /dev/zero | tr '\\0' h > $out/f";
}
