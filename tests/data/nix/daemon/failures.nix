# Failing builds and refused derivations, for what a client prints when a build
# through the daemon fails: a builder with a log tail longer than `log-lines`,
# a second one with a shorter tail, one that succeeds, one that depends on a
# failure, and an input-addressed derivation on an impure one.
let
  system = builtins.currentSystem;
  sh = name: script: extra: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // extra);
in
rec {
  fail = sh "fail" "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line $i; done; echo err >&2; exit 1" { };
  fail2 = sh "fail2" "echo two; exit 3" { };
  ok = sh "ok" "echo ok > $out" { };
  dep = sh "dep" "cat ${fail} > $out" { };
  impure = sh "impure" "echo impure > $out" { __impure = true; };
  onImpure = sh "on-impure" "cat ${impure} > $out" { };
}
