//! Recursive Nix (`recursive-nix`): `drover realise` beside `nix-store --realise`
//! (Nix 2.8) on the scenario of Nix's `tests/recursive.sh`, with the Nix client
//! binaries of the host (`/usr/bin`) inside the builder, unsandboxed:
//!
//! * the builder of a derivation with `requiredSystemFeatures = ["recursive-nix"]`
//!   reaches a daemon through `NIX_REMOTE`, which shows it its input closure and
//!   nothing else (a valid path outside it is invalid there, and cannot be built);
//! * what it adds (`nix-store --add`) and what it builds (`nix-build`) become
//!   visible to it, and its outputs may refer to them: they end up in the
//!   output's closure;
//! * through `drover daemon` as through `nix-daemon`;
//! * without the experimental feature the derivation is refused as Nix refuses it
//!   (no machine has the feature; with `system-features` naming it, Nix's
//!   `startDaemon` error).

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{run, Run};

const CONF: &str = "experimental-features = nix-command recursive-nix";

/// The expression of the scenario; `unreachable` is a valid path outside the
/// input closure and `unreachable_drv` a `.drv`, as strings without context.
fn expr(unreachable: &str, unreachable_drv: &str) -> String {
    format!(
        r#"
derivation {{
  name = "recursive";
  system = builtins.currentSystem;
  builder = "/usr/bin/bash";
  dummy = builtins.toFile "dummy" "bla bla";
  unreachable = "{unreachable}";
  unreachableDrv = "{unreachable_drv}";
  requiredSystemFeatures = [ "recursive-nix" ];
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    set -ex
    mkdir $out
    # Paths of the input closure can be queried and built.
    nix-store -q --hash $dummy
    nix-store -r $dummy
    # Others cannot, valid as they are.
    (! nix-store -q --hash $unreachable)
    (! nix-store -r $unreachable)
    # What the builder adds can, and the outputs may refer to it.
    echo foobar > foobar
    foobar=$(nix-store --add ./foobar)
    nix-store -q --hash $foobar
    ln -s $foobar $out/foobar
    nix --experimental-features nix-command path-info --all | wc -l > $out/all
    # A derivation built from inside.
    inner=$(nix-build --no-out-link -E 'derivation {{ name = "inner1"; system = builtins.currentSystem; builder = "/bin/sh"; fnord = builtins.toFile "fnord" "fnord"; args = ["-c" "echo $fnord blaat > $out"]; }}')
    ln -s $inner $out/inner1
    nix-store -q --references $inner > $out/inner-refs
    # What the restricted store answers, refuses and censors.
    {{
      # Added and built paths are there to read (in a sandbox too).
      cat $foobar $inner
      nix-store -q --deriver $dummy
      nix-store -q --referrers $dummy
      nix --experimental-features nix-command path-info --json $dummy
      nix-store -q --deriver $unreachable || echo "exit $?"
      nix-store -r $unreachable || echo "exit $?"
      nix-store -r $unreachableDrv || echo "exit $?"
      nix-store -q --outputs $unreachableDrv || echo "exit $?"
      nix --experimental-features nix-command build --no-link $unreachableDrv || echo "exit $?"
      nix-store --gc || echo "exit $?"
      nix-store --optimise || echo "exit $?"
      nix-store --verify || echo "exit $?"
    }} > $out/log 2>&1
  '' ];
}}
"#
    )
}

/// Sets the root up (the unreachable path added, the derivation instantiated):
/// the same paths every time, the store dir being the root's.
fn setup(root: &TestRoot) -> String {
    let file = root.path().join("unreachable");
    std::fs::write(&file, "not an input").unwrap();
    let unreachable = root
        .run("nix-store", &["--add", file.to_str().unwrap()])
        .trim()
        .to_owned();
    let other = root.path().join("other.nix");
    std::fs::write(
        &other,
        r#"derivation { name = "other"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo > $out"]; }"#,
    )
    .unwrap();
    let unreachable_drv = root.instantiate(&other, None).remove(0);
    let nix = root.path().join("recursive.nix");
    std::fs::write(&nix, expr(&unreachable, &unreachable_drv)).unwrap();
    root.instantiate(&nix, None).remove(0)
}

/// What a run left: exit code, printed output path, its closure and
/// references, and what the builder recorded.
fn outcome(root: &TestRoot, r: &Run) -> String {
    let out = r.stdout.trim().to_owned();
    let mut s = format!("code {}\nout {out}\n", r.code);
    if r.code != 0 {
        return s;
    }
    for q in ["-qR", "--query --references"] {
        let mut args: Vec<&str> = q.split(' ').collect();
        args.push(&out);
        s += &format!("{q}:\n{}", root.run("nix-store", &args));
    }
    for f in ["all", "inner-refs", "inner1", "log"] {
        let text = std::fs::read_to_string(format!("{out}/{f}")).unwrap();
        s += &format!("{f}: {text}");
    }
    s
}

#[test]
fn recursive_nix_builds_as_with_nix() {
    require_nix!();
    scenario(CONF);
}

/// In a sandbox, with the host's `/usr` and libraries for the Nix clients: the
/// socket is in the build directory, and what the builder adds or builds is
/// made to appear in the sandbox's store.
#[test]
fn recursive_nix_builds_in_a_sandbox_as_with_nix() {
    require_nix!();
    if !crate::sandbox::sandbox_available("recursive_nix_builds_in_a_sandbox_as_with_nix") {
        return;
    }
    scenario(&format!(
        "{CONF}\nsandbox = true\nsandbox-paths = /bin /usr /lib /lib64\n"
    ));
}

fn scenario(conf: &str) {
    let root = TestRoot::with_conf(conf);
    let drv = setup(&root);
    let nix = run(root.cmd("nix-store").args(["--realise", &drv]));
    let expected = outcome(&root, &nix);
    assert_eq!(nix.code, 0, "nix:\n{}", nix.stderr);
    root.wipe_store();
    assert_eq!(setup(&root), drv);
    let ours = run(drover(&root).args(["realise", &drv]));
    assert_eq!(
        outcome(&root, &ours),
        expected,
        "drover:\n{}\nnix:\n{}",
        ours.stderr,
        nix.stderr
    );
    // The added and the inner paths are in the output's closure.
    for name in ["-foobar", "-inner1", "-fnord"] {
        assert!(expected.contains(name), "{name} in {expected}");
    }
    // The builder saw its input and what it added, nothing else.
    assert!(expected.contains("all: 2\n"), "{expected}");
    for refused in [
        "in recursive Nix because path is unknown",
        "cannot substitute unknown path",
    ] {
        assert!(expected.contains(refused), "{refused} in {expected}");
    }
    root.verify_store();
}

/// The same scenario built by each daemon for a client (`NIX_REMOTE=daemon`):
/// the daemon's builder gets the socket.
#[test]
fn recursive_nix_through_drover_daemon_as_through_nix_daemon() {
    use crate::daemon::{client, Daemon, Which};
    require_nix!();
    let root = TestRoot::with_conf(CONF);
    let mut seen = Vec::new();
    for which in [Which::Nix, Which::Drover] {
        root.wipe_store();
        let drv = setup(&root);
        let daemon = Daemon::start(&root, which);
        let r = run(client(&root, "nix-store").args(["--realise", &drv]));
        seen.push((outcome(&root, &r), r.stderr));
        drop(daemon);
    }
    let (nix, nix_err) = &seen[0];
    let (ours, ours_err) = &seen[1];
    assert!(nix.starts_with("code 0\n"), "{nix_err}");
    assert_eq!(
        ours, nix,
        "drover daemon:\n{ours_err}\nnix-daemon:\n{nix_err}"
    );
}

fn error_lines(r: &Run) -> Vec<&str> {
    r.stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect()
}

#[test]
fn without_the_experimental_feature_it_is_refused_as_by_nix() {
    require_nix!();
    let root = TestRoot::with_conf("experimental-features = nix-command");
    let nix_file = root.path().join("r.nix");
    std::fs::write(
        &nix_file,
        r#"derivation { name = "r"; system = builtins.currentSystem; builder = "/bin/sh";
           requiredSystemFeatures = [ "recursive-nix" ]; args = ["-c" "echo $NIX_REMOTE > $out"]; }"#,
    )
    .unwrap();
    let drv = root.instantiate(&nix_file, None).remove(0);
    for extra in [
        &[][..],
        &["--option", "system-features", "recursive-nix"][..],
    ] {
        let nix = run(root.cmd("nix-store").arg("--realise").arg(&drv).args(extra));
        let ours = run(drover(&root).arg("realise").arg(&drv).args(extra));
        assert_eq!(nix.code, 1, "{}", nix.stderr);
        assert_eq!(ours.code, nix.code, "drover:\n{}", ours.stderr);
        assert_eq!(error_lines(&ours), error_lines(&nix));
    }
    let nix = run(root.cmd("nix-store").args([
        "--realise",
        &drv,
        "--option",
        "system-features",
        "recursive-nix",
    ]));
    assert_eq!(
        error_lines(&nix),
        ["error: experimental Nix feature 'recursive-nix' is disabled; use '--extra-experimental-features recursive-nix' to override"]
    );
}
