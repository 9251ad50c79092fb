//! Store settings that change what a build registers — `secret-key-files`,
//! `auto-optimise-store` — compared with `nix-store --realise` (Nix 2.8) in the same
//! root (tests/signing.sh, tests/optimise-store.sh of Nix 2.8).

use crate::ca::{both, instantiate};
use crate::nix_env::TestRoot;

/// An input-addressed pair and a floating CA pair on top of it.
const EXPR: &str = r#"
let mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; } // args);
  ca = { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
in rec {
  a = mk { name = "a"; args = ["-c" "echo a > $out"]; };
  b = mk { name = "b"; inherit a; args = ["-c" "mkdir $out; echo $a > $out/a; echo same > $out/x; echo same > $out/y"]; };
  c = mk (ca // { name = "c"; inherit b; args = ["-c" "echo $b > $out"]; });
  d = mk (ca // { name = "d"; inherit c; args = ["-c" "mkdir $out; echo $c > $out/c; echo same > $out/x"]; });
}
"#;

fn key(root: &TestRoot, name: &str) -> (String, String) {
    let (sk, pk) = (
        root.path().join(format!("{name}.sk")),
        root.path().join(format!("{name}.pk")),
    );
    root.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            name,
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    );
    (
        sk.to_str().unwrap().to_owned(),
        std::fs::read_to_string(pk).unwrap().trim().to_owned(),
    )
}

#[test]
fn secret_key_files_sign_every_built_path_and_realisation() {
    require_nix!();
    let root = TestRoot::new();
    let (sk1, _) = key(&root, "cache1.example.org");
    let (sk2, _) = key(&root, "cache2.example.org");
    let drv = instantiate(&root, EXPR, "d");
    let keys = format!("{sk1} {sk2}");
    let args = [drv.as_str(), "--option", "secret-key-files", &keys];
    // `nix path-info --sigs` of the output's closure
    let sigs = |r: &TestRoot| {
        let out = r.run("nix-store", &["-r", &drv]);
        r.run("nix", &["path-info", "--sigs", "-r", out.trim()])
    };
    let mut nix_sigs = String::new();
    let (nix, nix_db, ours, our_db) = both(&root, &args, |r| {
        nix_sigs = sigs(r);
    });
    assert_eq!(
        (nix.code, ours.code),
        (0, 0),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert_eq!(nix.stdout, ours.stdout);
    // every built output and every realisation carries both signatures
    for l in nix_db
        .lines()
        .filter(|l| l.starts_with("R|") || (l.starts_with("VP|") && l.contains("|1|")))
    {
        assert!(
            l.contains("cache1.example.org:") && l.contains("cache2.example.org:"),
            "{l}"
        );
    }
    assert_eq!(nix_db, our_db);
    let our_sigs = sigs(&root);
    assert!(nix_sigs.contains("cache1.example.org:"), "{nix_sigs}");
    assert_eq!(nix_sigs, our_sigs);
    root.verify_store();
}

#[test]
fn without_secret_key_files_nothing_is_signed() {
    require_nix!();
    let root = TestRoot::new();
    let drv = instantiate(&root, EXPR, "d");
    let (nix, nix_db, ours, our_db) = both(&root, &[&drv], |_| {});
    assert_eq!(
        (nix.code, ours.code),
        (0, 0),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert!(!nix_db.contains("example.org"), "{nix_db}");
    assert_eq!(nix_db, our_db);
}
