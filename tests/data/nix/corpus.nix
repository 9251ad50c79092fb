# The shared Nix expression corpus of drover's interop tests.
#
# `nix-instantiate corpus.nix` instantiates every top-level attribute; each one
# is a derivation that `nix-store --realise` builds in a drover test root
# (`tests/it/nix_env.rs`: sandbox = false, ca-derivations and impure-derivations
# enabled). Every builder is /bin/sh (dash): no stdenv exists. Together the
# attributes cover every derivation output type Nix 2.8 knows and the ATerm
# corner cases (escapes, unicode, structured attrs, passAsFile) -- except
# impure derivations, which live in `impure.nix` because `nix-store --realise`
# of Nix 2.8 cannot realise them.
let
  system = builtins.currentSystem;
  # A derivation running a shell snippet. Nix gives builders `PATH=/path-not-set`
  # unless the derivation sets it; the host's coreutils are fine without a sandbox.
  sh = name: script: attrs: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  } // attrs);
in
rec {
  # Input-addressed, one output, no inputs at all.
  simple = sh "simple" "echo simple > $out" { };

  # Input-addressed with three outputs; `out` refers to `dev` (a reference
  # between outputs), `doc` is independent.
  multi = sh "multi" ''
    echo "dev of multi" > $dev
    echo "see $dev" > $out
    echo "docs" > $doc
  '' { outputs = [ "out" "dev" "doc" ]; };

  # An output that refers to itself (a self-reference).
  selfRef = sh "self-ref" "echo \"I am $out\" > $out" { };

  # Fixed-output, flat, sha256 (`printf hello`).
  fodFlatSha256 = sh "fod-flat-sha256" "printf hello > $out" {
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
  };

  # Fixed-output, flat, sha1 given in hex: the `fixed:out:sha1:` path kind.
  fodFlatSha1 = sh "fod-flat-sha1" "printf hello > $out" {
    outputHashAlgo = "sha1";
    outputHash = "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d";
  };

  # Fixed-output, flat, sha512 given in nix base 32.
  fodFlatSha512 = sh "fod-flat-sha512" "printf hello > $out" {
    outputHashAlgo = "sha512";
    outputHash = "11w1pmwfdpz9pisbhp5qiv38q6dmidq2ipcqykw3p0sb6yrqcij79rwcwcjbxyzwbdal349qbxrncbk7pmd6snljrfpiwv2pljd4wcv";
  };

  # Fixed-output, recursive (NAR), sha256 given as SRI: a `source:` path.
  fodRecursive = sh "fod-recursive" "printf hello > $out" {
    outputHashMode = "recursive";
    outputHash = "sha256-CkMIecJm+LV/QJKg+TXPP6zUi7zN5XYNR0jKQFFx6Wk=";
  };

  # Fixed-output, recursive, sha1 of a directory: `fixed:out:r:sha1:`.
  fodRecursiveSha1 = sh "fod-recursive-sha1" "mkdir $out && printf hello > $out/greeting" {
    outputHashMode = "recursive";
    outputHashAlgo = "sha1";
    outputHash = "6a17d10bb0973c49375ccf31025e998721989d21";
  };

  # Depends on a fixed-output derivation: its hash modulo uses the FOD's
  # `fixed:out:…` hash instead of the FOD's .drv.
  usesFod = sh "uses-fod" "cat ${fodFlatSha256} ${fodRecursive} > $out" { };

  # A text file (`builtins.toFile`) as an input source, run as the script.
  textInput = sh "text-input" ". ${builtins.toFile "build.sh" ''
    echo "built by a toFile script" > $out
  ''}" { };

  # A source from a path literal (copied to the store as an input source).
  pathInput = sh "path-input" "cat ${./hello.txt} > $out" { };

  # Floating content-addressed: output path known only after the build;
  # `out` in env is the hash placeholder.
  caFloating = sh "ca-floating" "echo floating > $out" {
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };

  # Floating content-addressed with two outputs, flat mode for none: both
  # outputs recursive sha256 by default; `out` refers to `lib`.
  caFloatingMulti = sh "ca-floating-multi" ''
    echo lib > $lib
    echo "uses $lib" > $out
  '' {
    __contentAddressed = true;
    outputs = [ "out" "lib" ];
  };

  # Input-addressed but depending on a floating CA derivation: deferred
  # (no output path in the .drv, empty `out` in env).
  deferred = sh "deferred" "cat ${caFloating} ${caFloatingMulti.lib} > $out" { };

  # passAsFile: `big` is not in the builder's environment, `bigPath` is.
  passAsFile = sh "pass-as-file" "cat $bigPath > $out" {
    big = "a value passed as a file\nwith two lines";
    passAsFile = [ "big" ];
  };

  # Structured attrs: env holds only `__json` and the output variables. The
  # builder writes through the output placeholder (rewritten at build time)
  # because dash cannot read .attrs.sh.
  structured = sh "structured" "echo structured > ${builtins.placeholder "out"}" {
    __structuredAttrs = true;
    aList = [ 1 "two" true null ];
    anAttrset = { nested = { x = 1; }; s = "quote\" backslash\\"; };
    aBool = false;
  };

  # A chain: chain3 -> chain2 -> chain1 -> simple.
  chain1 = sh "chain1" "cat ${simple} > $out; echo 1 >> $out" { };
  chain2 = sh "chain2" "cat ${chain1} > $out; echo 2 >> $out" { };
  chain3 = sh "chain3" "cat ${chain2} > $out; echo 3 >> $out" { };

  # A diamond: diamondTop -> (diamondLeft, diamondRight) -> diamondBottom;
  # diamondTop also uses two outputs of `multi`.
  diamondBottom = sh "diamond-bottom" "echo bottom > $out" { };
  diamondLeft = sh "diamond-left" "cat ${diamondBottom} > $out; echo left >> $out" { };
  diamondRight = sh "diamond-right" "cat ${diamondBottom} > $out; echo right >> $out" { };
  diamondTop = sh "diamond-top" "cat ${diamondLeft} ${diamondRight} ${multi.dev} ${multi} > $out" { };

  # Escapes in env and args: quotes, backslashes, newline, carriage return,
  # tab, unicode, an empty string and a `$` that the shell must not expand.
  specialChars = derivation {
    name = "special-chars";
    inherit system;
    builder = "/bin/sh";
    args = [ "-c" "printf '%s\\n' \"$1\" \"$quoted\" > $out" "sh" "arg with \"quotes\" and \\ and\ttab" ];
    # only shell builtins are used here, so no PATH
    quoted = "double \" quote, back\\slash, new\nline, carriage\rreturn, tab\there";
    unicode = "grüße — λ → 🦀";
    empty = "";
    dollar = "$HOME \${notInterpolated}";
  };
}
