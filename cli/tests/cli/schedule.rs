//! The critical-path scheduler seen from the command line, beside Nix 2.8: the
//! same `.drv`s realised by both tools in the same root (snapshot, Nix, restore,
//! drover) give the same exit status, stdout, `building` lines (as a set: Nix's
//! order is its own) and DB rows; drover's order follows the longest estimated
//! path, with an empty history (every build the default estimate: the longest
//! chain first) and with a warm one (a slow lone build before the chain).

use crate::nix_env::TestRoot;
use crate::realise::{db_rows, restore, run, snapshot};
use crate::{drover, stdout_of};

const EXPR: &str = r#"
let
  sys = builtins.currentSystem;
  mk = name: secs: inputs: derivation {
    inherit name; system = sys; builder = "/bin/sh";
    args = ["-c" "/bin/sleep ${secs} && echo ${toString inputs} > $out"];
  };
  c0 = mk "c0" "0.4" [];
  c1 = mk "c1" "0.4" [c0];
  c2 = mk "c2" "0.4" [c1];
in { inherit c2; i0 = mk "i0" "0.05" []; i1 = mk "i1" "4" []; i2 = mk "i2" "0.05" []; }
"#;

/// The names of the derivations in the `building '…'` lines, in order.
fn building(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("building '"))
        .filter_map(|l| l.split('\'').next())
        .map(|p| {
            let base = p.rsplit('/').next().unwrap_or(p);
            base.split_once('-')
                .map(|(_, n)| n.trim_end_matches(".drv").to_owned())
                .unwrap_or_default()
        })
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn start_order_follows_the_critical_path_beside_nix() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("s.nix");
    std::fs::write(&file, EXPR).unwrap();
    let drvs: Vec<String> = ["c2", "i0", "i1", "i2"]
        .iter()
        .map(|a| root.instantiate(&file, Some(a)).remove(0))
        .collect();
    let mut args = vec!["-j1"];
    args.extend(drvs.iter().map(String::as_str));
    let snap = snapshot(&root);
    let nix = run(root.cmd("nix-store").arg("--realise").args(&args));
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    let nix_rows = db_rows(&root);
    restore(&root, &snap);
    let d = run(drover(&root).arg("realise").args(&args));
    assert_eq!(d.code, nix.code, "{}", d.stderr);
    assert_eq!(d.stdout, nix.stdout);
    assert_eq!(db_rows(&root), nix_rows);
    assert_eq!(sorted(building(&d.stderr)), sorted(building(&nix.stderr)));
    // Empty history: the chain (3 × the default estimate) first; then c2 ties with
    // the lone builds and was requested first.
    assert_eq!(building(&d.stderr), ["c0", "c1", "c2", "i0", "i1", "i2"]);
    let history = root.state_dir.join("drover/build-history.sqlite");
    assert!(history.exists());
    assert!(!root.state_dir.join("db/drover").exists());

    // Warm: the same derivations again after deleting their outputs. i1 (4 s)
    // outweighs the chain (3 × ~0.4 s); the chain then goes before the short ones.
    let closure = stdout_of(root.cmd("nix-store").arg("-qR").args(&drvs));
    let all: Vec<&str> = closure.lines().filter(|l| l.ends_with(".drv")).collect();
    let outs = stdout_of(root.cmd("nix-store").args(["-q", "--outputs"]).args(&all));
    let mut del = vec!["--delete"];
    del.extend(outs.lines());
    stdout_of(root.cmd("nix-store").args(&del));
    let d = run(drover(&root).arg("realise").args(&args));
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(d.stdout, nix.stdout);
    let order = building(&d.stderr);
    assert_eq!(order[..4], ["i1", "c0", "c1", "c2"], "{order:?}");
    assert_eq!(sorted(order), sorted(building(&nix.stderr)));
}
