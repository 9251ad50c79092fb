# Derivations for the tests of drover next to Nix's garbage collector
# (`actors/tests/cli/gc.rs`): Nix 2.8's tests/gc-concurrent.nix and its two
# builders, with /bin/sh as the only tool, and the rounds of the stress test.
{ lockFifo ? "", round ? "0", steps ? 8, sync ? "" }:
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
  input1 = sh "dependencies-input-1" "mkdir $out; echo FOO > $out/foo" { };
  input2 = sh "dependencies-input-2" "mkdir $out; echo BAR > $out/bar" { };

  # gc-concurrent.builder.sh: stops on the fifo while a collector runs.
  test1 = sh "gc-concurrent" ''
    echo "Build started" > "$lockFifo"
    mkdir $out
    echo $(cat $input1/foo)$(cat $input2/bar) > $out/foobar
    # Wait for someone to write on the fifo
    cat "$lockFifo"
    # $out must not have been collected meanwhile, nor its lock
    mkdir -p $out
    test -e "$out.lock"
    ln -s $input2 $out/input-2
  '' { inherit input1 input2 lockFifo; };

  # gc-concurrent2.builder.sh
  test2 = sh "gc-concurrent2" ''
    mkdir $out
    echo $(cat $input1/foo)$(cat $input2/bar)xyzzy > $out/foobar
    test -e "$out.lock"
  '' { inherit input1 input2; };

  simple = sh "simple" "echo simple > $out" { };

  # gc-non-blocking.sh: the build that lets the waiting collector go on.
  nonBlocking = sh "non-blocking" ''
    test -e ${sync}/running
    mkdir $out
    echo > ${sync}/fifo
  '' { };

  # One round of the stress test: an input built in the same run and one
  # substituted (`cached`, built by Nix into a binary cache beforehand), then a
  # build of a few seconds that writes its output step by step and checks, at the
  # end, that its output, lock and inputs are all still there.
  dep = sh "stress-dep-${round}" "mkdir $out; echo dep ${round} > $out/x" { };
  cached = sh "stress-cached-${round}" "mkdir $out; echo cached ${round} > $out/c" { };
  src = builtins.toFile "stress-src-${round}" "source ${round}\n";
  work = sh "stress-${round}" ''
    mkdir $out
    i=0
    while [ $i -lt ${toString steps} ]; do
      echo "step $i" > $out/step-$i
      sleep 0.25
      i=$((i + 1))
    done
    test -e "$out.lock"
    cat $dep/x > $out/dep
    cat $cached/c > $out/cached
    cat ${src} > $out/src
    ln -s $dep $out/dep-link
  '' { inherit dep cached; };
}
