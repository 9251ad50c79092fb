# Two clients' overlapping builds: `a` needs `shared` and `onlyA`, `b` only
# `shared`. Builders mark in `marks` (outside the store) when they start and
# finish, so a test sees which were killed.
{ marks }:
let
  system = builtins.currentSystem;
  sh = name: script: derivation {
    inherit name system marks;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
in
rec {
  shared = sh "shared" "touch $marks/shared-started; sleep 4; echo shared > $out; touch $marks/shared-finished";
  onlyA = sh "only-a" "touch $marks/only-a-started; sleep 6; echo a > $out; touch $marks/only-a-finished";
  a = sh "a" "cat ${shared} ${onlyA} > $out";
  b = sh "b" "cat ${shared} > $out";
}
