# Derivations that fail (or misbehave) in the ways `nix-store --realise` reports,
# for `actors/tests/cli/realise.rs`. Kept out of the corpus-wide tests (subdirectory).
let
  system = builtins.currentSystem;
  sh = name: script: attrs: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // attrs);
in
rec {
  # Prints 12 lines, then fails: the log tail of `-Q` shows the last 10.
  fails = sh "fails" "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line $i; done; exit 1" { };
  # Depends on a failing derivation.
  dependent = sh "dependent" "cat ${fails} > $out" { };
  # A second, independent failure (for --keep-going).
  fails2 = sh "fails2" "echo second failure; exit 1" { };
  fine = sh "fine" "echo fine > $out" { };
  # A fixed-output derivation whose output does not match the declared hash.
  badHash = sh "bad-hash" "printf goodbye > $out" {
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
  };
  # Silent for longer than the timeouts the tests set.
  sleeper = sh "sleeper" "sleep 4; echo late > $out" { };
  # Exits 0 without creating $out.
  noOutput = sh "no-output" "echo no output here" { };
  # Writes about 20 kB of log.
  chatty = sh "chatty" "i=0; while [ $i -lt 400 ]; do echo chatter line $i of a builder that talks too much; i=$((i+1)); done; echo > $out" { };
  # A different output on every build.
  nondet = sh "nondet" "date +%s%N > $out" { };
  # 20 MB of log output.
  huge = sh "huge" "yes 'a line of a very long build log, repeated' | head -c 20000000; echo done > $out" { };
}
