# Outputs exercising every NAR feature, for the drover NAR interop tests
# (tests/it/nar.rs). Builders are /bin/sh with absolute tool paths (no stdenv).
let
  system = builtins.currentSystem;
  sh = name: script: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
in rec {
  # A single regular file.
  dep = sh "nar-dep" "echo dependency > $out";

  # A symlink at the root, referring to dep.
  rootlink = sh "nar-rootlink" "/bin/ln -s ${dep} $out";

  # A directory tree with every kind of node, names needing sorting care, a ~5 MB
  # file, a reference to dep and one to itself.
  tree = sh "nar-tree" ''
    set -e
    /bin/mkdir -p $out/a/b/c $out/emptydir $out/sort
    echo deep > $out/a/b/c/deep
    printf '#!/bin/sh\necho hi\n' > $out/exe
    /bin/chmod +x $out/exe
    : > $out/empty
    for n in B a a-b a.b ab Z _ é 'sp ace' '~tilde' 10 9 .hidden; do
      echo "$n" > "$out/sort/$n"
    done
    /bin/ln -s a/b $out/link
    /bin/ln -s ${dep} $out/deplink
    echo "I am $out" > $out/self
    /bin/head -c 5000000 /dev/urandom > $out/big
    /bin/chmod +x $out/a/b/c
  '';

  # A floating content-addressed output referring to itself and to dep.
  ca = derivation {
    name = "nar-ca";
    inherit system;
    builder = "/bin/sh";
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    args = [ "-c" ''
      /bin/mkdir $out
      echo "self: $out" > $out/self
      echo "dep: ${dep}" > $out/dep
      /bin/ln -s $out/self $out/selflink
    '' ];
  };
}
