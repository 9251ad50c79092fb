//! Impure derivations (`__impure = true`) and disabled experimental features:
//! `drover realise` beside `nix-store --realise` (Nix 2.8).
//!
//! What Nix 2.8 does, and drover with it:
//! * a derivation needing a disabled feature stops the run before the plan is
//!   printed: `error: experimental Nix feature 'impure-derivations' is disabled; use
//!   '--extra-experimental-features impure-derivations' to override` (the same for
//!   `ca-derivations`), exit 1;
//! * a pure, not fixed-output derivation depending on an impure one is refused after
//!   the plan: `error: pure derivation '…' depends on impure derivation '…'`, exit 1;
//! * an impure derivation is built every time, its outputs registered as
//!   content-addressed paths (`fixed:r:sha256`) with no realisation: all impure
//!   outputs share the hash `sha256("impure")`, so a realisation would stand for
//!   every one of them.
//!
//! One difference, on purpose: `nix-store --realise` of an impure derivation builds
//! it and then fails (`output 'out' of derivation '…' has no store path mapped to
//! it`, exit 1) — the legacy command cannot name an output without a realisation —
//! while drover prints the path it just built.

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{run, Run};

const EXPR: &str = r#"
let
  mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // args);
  imp = mk { name = "imp"; __impure = true; args = ["-c" "echo $$ > $out"]; };
in {
  inherit imp;
  other = mk { name = "other"; __impure = true; args = ["-c" "echo other > $out"]; };
  pure = mk { name = "pure-on-impure"; inherit imp; args = ["-c" "read x < $imp; echo $x > $out"]; };
  ca = mk { name = "ca"; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; args = ["-c" "echo ca > $out"]; };
}
"#;

fn instantiate(root: &TestRoot, attr: &str) -> String {
    let expr = root.path().join("impure.nix");
    std::fs::write(&expr, EXPR).unwrap();
    root.instantiate(&expr, Some(attr)).remove(0)
}

fn both(root: &TestRoot, args: &[&str]) -> (Run, Run) {
    let nix = run(root.cmd("nix-store").arg("--realise").args(args));
    let ours = run(drover(root).arg("realise").args(args));
    (nix, ours)
}

#[track_caller]
fn assert_same(nix: &Run, ours: &Run, code: i32) {
    assert_eq!(nix.code, code, "nix:\n{}", nix.stderr);
    assert_eq!(
        ours.code, nix.code,
        "drover:\n{}\nnix:\n{}",
        ours.stderr, nix.stderr
    );
    assert_eq!(ours.stdout, nix.stdout);
    assert_eq!(ours.stderr, nix.stderr);
}

#[test]
fn disabled_features_stop_the_run_before_the_plan() {
    require_nix!();
    let root = TestRoot::new();
    for (attr, feature) in [("imp", "impure-derivations"), ("ca", "ca-derivations")] {
        let drv = instantiate(&root, attr);
        let args = [
            drv.as_str(),
            "--option",
            "experimental-features",
            "nix-command",
        ];
        let (nix, ours) = both(&root, &args);
        assert_same(&nix, &ours, 1);
        assert_eq!(
            ours.stderr,
            format!(
                "error: experimental Nix feature '{feature}' is disabled; use \
                 '--extra-experimental-features {feature}' to override\n"
            )
        );
    }
}

#[test]
fn a_pure_derivation_may_not_depend_on_an_impure_one() {
    require_nix!();
    let root = TestRoot::new();
    let drv = instantiate(&root, "pure");
    let (nix, ours) = both(&root, &[drv.as_str()]);
    assert_same(&nix, &ours, 1);
    assert!(
        ours.stderr.contains(&format!(
            "error: pure derivation '{drv}' depends on impure derivation '"
        )),
        "{}",
        ours.stderr
    );
    assert!(!ours.stderr.contains("building '"), "{}", ours.stderr);
}

#[test]
fn impure_derivations_are_built_every_time_and_never_confused() {
    require_nix!();
    let root = TestRoot::new();
    let imp = instantiate(&root, "imp");
    let other = instantiate(&root, "other");
    let realise = |drv: &str| {
        let r = run(drover(&root).args(["realise", drv]));
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains("building '"), "built again: {}", r.stderr);
        r.stdout.trim().to_owned()
    };
    let first = realise(&imp);
    let second = realise(&imp);
    let third = realise(&other);
    assert_ne!(first, second, "an impure derivation is rebuilt");
    assert_eq!(std::fs::read_to_string(&third).unwrap(), "other\n");
    for out in [&first, &second, &third] {
        let info = root.run("nix", &["path-info", "--json", out]);
        assert!(info.contains("\"ca\":\"fixed:r:sha256:"), "{info}");
    }
    let conn = rusqlite::Connection::open(root.state_dir.join("db/db.sqlite")).unwrap();
    let n: i64 = conn
        .query_row("select count(*) from Realisations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0, "impure outputs get no realisation");
    root.verify_store();

    // Nix builds it too, then cannot name the output (the one difference).
    let nix = run(root.cmd("nix-store").args(["--realise", &imp]));
    assert_eq!(nix.code, 1, "{}", nix.stderr);
    assert!(
        nix.stderr.contains(&format!(
            "output 'out' of derivation '{imp}' has no store path mapped to it"
        )),
        "{}",
        nix.stderr
    );
}
