# Derivations that dump their builder environment into their output, to compare
# the environment drover gives builders with Nix 2.8's (`tests/it/build.rs`):
# plain attributes of every type, passAsFile, a second output, structured attrs
# (`.attrs.json`/`.attrs.sh`), and a floating CA derivation whose argument and
# passAsFile value hold its own placeholder. (The fixed-output case, whose output
# depends on the test root, lives in `tests/it/build.rs`.)
let system = builtins.currentSystem; in
{
  plain = derivation {
    name = "env-plain"; inherit system; builder = "/bin/sh";
    args = [ "-c" "/usr/bin/env | /usr/bin/sort > $out; echo ARGS \"$0\" \"$@\" >> $out; /bin/ls -A . >> $out; /usr/bin/stat -c '%a %n' . .attr-* >> $out; umask >> $out; [ -t 1 ] && echo tty >> $out; echo d > $dev" "a0" "${builtins.placeholder "out"}" ];
    aBool = true; aFalse = false; aNull = null; anInt = 42; aList = [ 1 "two" true ];
    big = "line1\nline2"; passAsFile = [ "big" ];
    outputs = [ "out" "dev" ];
  };
  structured = derivation {
    name = "env-structured"; inherit system; builder = "/bin/sh";
    args = [ "-c" "/usr/bin/env | /usr/bin/sort > ${builtins.placeholder "out"}; /bin/cat .attrs.json >> ${builtins.placeholder "out"}; echo >> ${builtins.placeholder "out"}; /bin/cat .attrs.sh >> ${builtins.placeholder "out"}; echo x > ${builtins.placeholder "doc"}" ];
    __structuredAttrs = true;
    outputs = [ "out" "doc" ];
    aList = [ 1 "two" true null ]; strList = ["a" "b c"];
    anAttrset = { nested = { x = 1; }; s = "quote\" backslash\\"; };
    flat = { a = "x"; b = 2; c = true; };
    aBool = false; t = true; n = null; i = 7; f = 1.5; s = "it's";
    "bad-name" = "x"; uni = "grüße\u0001";
  };
  ca = derivation {
    name = "env-ca"; inherit system; builder = "/bin/sh";
    args = [ "-c" "/usr/bin/env | /usr/bin/sort > $out; echo $0 >> $out" "${builtins.placeholder "out"}" ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    big = "b ${builtins.placeholder "out"}"; passAsFile = ["big"];
  };
}
