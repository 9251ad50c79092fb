# Builds whose outcome shows which of the client's settings the daemon applied
# (`cli/tests/cli/daemon_options.rs`).
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
  hooked = sh "hooked" "echo hooked > $out";
  hooked-untrusted = sh "hooked-untrusted" "echo hooked > $out";
  signed = sh "signed" "echo signed > $out";
  cores = sh "cores" "echo $NIX_BUILD_CORES > $out";
  failing = sh "failing" "echo partial > left-behind; exit 1";
  silent = sh "silent" "sleep 20; echo late > $out";
  silent-untrusted = sh "silent-untrusted" "sleep 20; echo late > $out";
  optimised = sh "optimised" "mkdir $out; echo same-content > $out/a; echo same-content > $out/b";
}
