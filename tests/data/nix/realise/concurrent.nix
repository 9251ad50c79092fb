# A chain and a diamond whose builders append their name to a counter file outside
# the store and sleep a little: concurrent realisations must build each once.
{ counter }:
let
  system = builtins.currentSystem;
  sh = name: script: derivation {
    inherit name system counter;
    builder = "/bin/sh";
    args = [ "-c" "echo $name >> $counter; sleep 0.5; ${script}" ];
    PATH = "/usr/bin:/bin";
  };
in
rec {
  c1 = sh "c1" "echo 1 > $out";
  c2 = sh "c2" "cat ${c1} > $out";
  c3 = sh "c3" "cat ${c2} > $out";
  bottom = sh "bottom" "echo b > $out";
  left = sh "left" "cat ${bottom} > $out";
  right = sh "right" "cat ${bottom} > $out";
  top = sh "top" "cat ${left} ${right} ${c3} > $out";
}
