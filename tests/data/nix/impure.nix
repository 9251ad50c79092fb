# An impure derivation (`__impure = true`), kept apart from `corpus.nix`.
#
# Nix 2.8 writes it with output `("out","","r:sha256","impure")`, env `out` = the
# hash placeholder, and its hash modulo is sha256("impure") (kind Deferred).
# `nix-store --realise` of Nix 2.8 runs the builder but then exits 1 with
# "output 'out' of derivation '…' has no store path mapped to it": impure
# outputs are only usable through `nix build`, so this file is for format
# tests, not for realising.
let system = builtins.currentSystem; in
{
  # Impure: no static output path; default method recursive, algo sha256.
  impure = derivation {
    name = "impure";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "date +%s%N > $out" ];
    PATH = "/usr/bin:/bin";
    __impure = true;
  };

  # Impure with flat sha512 and two outputs.
  impureFlat = derivation {
    name = "impure-flat";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "echo a > $out; echo b > $bin" ];
    outputs = [ "out" "bin" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha512";
    __impure = true;
  };
}
