# One build that fails at once and one that takes a while (`--keep-going` or
# not decides whether it is finished).
let
  system = builtins.currentSystem;
  sh = name: script: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
in
{
  fail = sh "fail" "echo failing; exit 1";
  slow = sh "slow" "sleep 3; echo slow > $out";
}
