//! A binary cache whose closure is incomplete (tests/binary-cache.sh of Nix 2.8,
//! "binary cache contains an incomplete closure"): the top path is in the cache but
//! a path it refers to is not. Nix 2.8's plan then lists the missing reference
//! under "don't know how to build these paths" (it is a reference, not a
//! derivation output the plan walks), yet the run builds it from its derivation
//! and substitutes the top path afterwards. drover's plan and run are compared with
//! `nix-store --realise` in the same root.

use crate::ca::{both, instantiate};
use crate::nix_env::TestRoot;

/// tests/dependencies.nix without stdenv: `top` refers to `input-2`, which refers
/// to `input-0`; `input-1` is read by `top`'s build but not referred to.
const DEPS: &str = r#"
let
  mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = ["-c" args.buildCommand]; } // args);
  input0 = mk { name = "dependencies-input-0"; buildCommand = "mkdir $out; echo foo > $out/bar"; };
  input1 = mk { name = "dependencies-input-1"; buildCommand = "mkdir $out; echo FOO > $out/foo"; };
  input2 = mk { name = "dependencies-input-2"; buildCommand = "mkdir $out; echo BAR > $out/bar; echo ${input0} > $out/input0"; };
in { top = mk { name = "dependencies-top"; inherit input1 input2; input0_drv = input0; buildCommand = "mkdir $out; cat $input1/foo $input2/bar > $out/foobar; echo $input2 > $out/i2"; }; }
"#;

/// Builds `top` with Nix, copies its closure to a cache, removes the narinfos of
/// `missing`, and empties the store. Returns the cache URL.
fn incomplete_cache(root: &TestRoot, missing: &str) -> String {
    let drv = instantiate(root, DEPS, "top");
    let out = root.realise(&[&drv]).remove(0);
    let dir = root.path().join("cache");
    let cache = format!("file://{}", dir.display());
    root.run("nix", &["copy", "--to", &cache, &out]);
    let mut removed = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo")
            && std::fs::read_to_string(&p)
                .unwrap()
                .lines()
                .any(|l| l.starts_with("StorePath:") && l.ends_with(missing))
        {
            std::fs::remove_file(&p).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "no narinfo of {missing}");
    root.wipe_store();
    cache
}

fn compare(missing: &str, dry_run: bool) {
    let root = TestRoot::new();
    let cache = incomplete_cache(&root, missing);
    let drv = instantiate(&root, DEPS, "top");
    let mut args = vec![
        drv.as_str(),
        "--option",
        "substituters",
        &cache,
        "--option",
        "require-sigs",
        "false",
    ];
    if dry_run {
        args.push("--dry-run");
    }
    let (nix, nix_db, ours, our_db) = both(&root, &args, |_| {});
    assert_eq!(
        (nix.code, ours.code),
        (0, 0),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert_eq!(nix.stdout, ours.stdout);
    let sd = &root.store_dir;
    let unknown = format!("don't know how to build these paths:\n  {sd}/");
    assert!(nix.stderr.contains(&unknown), "{}", nix.stderr);
    // the plan is printed first and is the same; the run's lines are the same
    // (their order may differ between schedulers)
    let plan = |s: &str| -> String {
        s.lines()
            .take_while(|l| !l.starts_with("copying ") && !l.starts_with("building "))
            .filter(|l| !l.starts_with("warning: you did not specify"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(plan(&nix.stderr), plan(&ours.stderr));
    let lines = |s: &str| {
        let mut v: Vec<String> = s
            .lines()
            .filter(|l| !l.starts_with("warning: you did not specify"))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    assert_eq!(lines(&nix.stderr), lines(&ours.stderr));
    if !dry_run {
        // the missing path was built, the top path still substituted
        assert!(
            nix.stderr.contains(&format!("{missing}.drv'...")),
            "{}",
            nix.stderr
        );
        assert!(
            nix.stderr.contains("-dependencies-top' from '"),
            "{}",
            nix.stderr
        );
    }
    assert_eq!(nix_db, our_db);
    root.verify_store();
}

#[test]
fn incomplete_closure_plan_and_run_match_nix() {
    require_nix!();
    compare("dependencies-input-2", false);
}

#[test]
fn incomplete_closure_two_levels_down_matches_nix() {
    require_nix!();
    compare("dependencies-input-0", false);
}

#[test]
fn incomplete_closure_dry_run_matches_nix() {
    require_nix!();
    compare("dependencies-input-2", true);
}
