//! Content-addressed derivations and their realisations: `drover realise` against
//! `nix-store --realise` (Nix 2.8) in the same root (snapshot, Nix builds, restore,
//! drover builds), comparing DB rows and what `nix copy` writes from each store.

use std::collections::BTreeMap;
use std::path::Path;

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{db_rows, restore, run, snapshot, Run};

/// Floating CA derivations depending on floating CA derivations: `d` refers to
/// `c` only, `c` to `b`, `b` to `a` (and `d` also has `a` as an input).
const CHAIN: &str = r#"
let
  mk = args: derivation ({
    system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  } // args);
  a = mk { name = "a"; args = ["-c" "echo a > $out"]; };
  b = mk { name = "b"; inherit a; args = ["-c" "echo $a > $out"]; };
  c = mk { name = "c"; inherit b; args = ["-c" "echo $b > $out"]; };
  d = mk { name = "d"; inherit a c; args = ["-c" "echo $c > $out"]; };
in { inherit a b c d; }
"#;

/// Writes `expr` into the root and instantiates `attr`.
pub(crate) fn instantiate(root: &TestRoot, expr: &str, attr: &str) -> String {
    let file = root.path().join("e.nix");
    std::fs::write(&file, expr).unwrap();
    root.instantiate(&file, Some(attr)).remove(0)
}

/// `nix copy --to file://<root>/<name> -f e.nix <attr>`; returns every file of the
/// cache's `realisations/` directory (name → bytes).
fn copy_realisations(root: &TestRoot, name: &str, attr: &str) -> BTreeMap<String, Vec<u8>> {
    let cache = root.path().join(name);
    let file = root.path().join("e.nix");
    root.run(
        "nix",
        &[
            "copy",
            "--to",
            &format!("file://{}", cache.display()),
            "-f",
            file.to_str().unwrap(),
            attr,
        ],
    );
    files_of(&cache.join("realisations"))
}

/// The entries of a directory: name → contents (empty for a directory).
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap_or_default(),
                )
            })
            .collect()
        })
        .unwrap_or_default()
}

/// The same `realise` by both tools from the same snapshot: (Nix's run, Nix's DB
/// rows, drover's run, drover's DB rows). The root is left as drover left it;
/// `between` runs after Nix's build, before the snapshot is restored.
pub(crate) fn both(
    root: &TestRoot,
    args: &[&str],
    mut between: impl FnMut(&TestRoot),
) -> (Run, String, Run, String) {
    let snap = snapshot(root);
    let nix = run(root.cmd("nix-store").arg("--realise").args(args));
    let nix_db = db_rows(root);
    between(root);
    restore(root, &snap);
    let ours = run(drover(root).arg("realise").args(args));
    let our_db = db_rows(root);
    (nix, nix_db, ours, our_db)
}

#[test]
fn ca_chain_records_realisation_refs_and_copies_identical_doi_files() {
    require_nix!();
    let root = TestRoot::new();
    let drv = instantiate(&root, CHAIN, "d");
    let mut nix_doi = BTreeMap::new();
    let (nix, nix_db, ours, our_db) = both(&root, &[&drv], |r| {
        nix_doi = copy_realisations(r, "cache-nix", "d");
    });
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    assert_eq!(ours.code, 0, "{}", ours.stderr);
    assert_eq!(nix.stdout, ours.stdout);
    // three links: d → c → b → a, as Nix records them
    assert_eq!(
        nix_db.lines().filter(|l| l.starts_with("RR|")).count(),
        3,
        "{nix_db}"
    );
    assert_eq!(nix_db, our_db);
    let our_doi = copy_realisations(&root, "cache-drover", "d");
    // one .doi per output of the closure's (unresolved) derivations, with their
    // dependentRealisations filled in
    assert_eq!(nix_doi.len(), 4, "{:?}", nix_doi.keys());
    assert!(
        nix_doi
            .values()
            .any(|v| !String::from_utf8_lossy(v).contains("\"dependentRealisations\":{}")),
        "{nix_doi:?}"
    );
    assert_eq!(nix_doi, our_doi);
    root.verify_store();
}

/// A fixed-output derivation (`printf hello`) and an input-addressed one using it.
const FOD: &str = r#"
let mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; } // args);
in rec {
  fod = mk { name = "fod"; args = ["-c" "printf hello > $out"]; outputHashMode = "flat"; outputHashAlgo = "sha256";
             outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; };
  ia = mk { name = "ia"; inherit fod; args = ["-c" "cat $fod > $out"]; };
}
"#;

/// The `R|…` (Realisations) lines of `db_rows`.
fn realisation_rows(rows: &str) -> Vec<&str> {
    rows.lines().filter(|l| l.starts_with("R|")).collect()
}

#[test]
fn fixed_output_found_valid_gets_its_realisation() {
    require_nix!();
    let root = TestRoot::new();
    let ia = instantiate(&root, FOD, "ia");
    // the FOD's output made valid by hand: no realisation yet
    let hello = root.path().join("fod");
    std::fs::write(&hello, "hello").unwrap();
    root.run(
        "nix-store",
        &["--add-fixed", "sha256", hello.to_str().unwrap()],
    );
    let (nix, nix_db, ours, our_db) = both(&root, &[&ia], |_| {});
    assert_eq!(
        (nix.code, ours.code),
        (0, 0),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert_eq!(nix.stdout, ours.stdout);
    // Nix registers the valid FOD output's realisation, and the built one's
    assert_eq!(realisation_rows(&nix_db).len(), 2, "{nix_db}");
    assert_eq!(nix_db, our_db);
    root.verify_store();
}

#[test]
fn fixed_output_substituted_gets_its_realisation() {
    require_nix!();
    let root = TestRoot::new();
    let fod = instantiate(&root, FOD, "fod");
    let out = root.realise(&[&fod]).remove(0);
    let cache = format!("file://{}", root.path().join("cache").display());
    root.run("nix", &["copy", "--to", &cache, &out]);
    root.wipe_store();
    let ia = instantiate(&root, FOD, "ia");
    let args = [
        ia.as_str(),
        "--option",
        "substituters",
        &cache,
        "--option",
        "require-sigs",
        "false",
    ];
    let (nix, nix_db, ours, our_db) = both(&root, &args, |_| {});
    assert_eq!(
        (nix.code, ours.code),
        (0, 0),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert!(nix.stderr.contains("copying path"), "{}", nix.stderr);
    assert!(ours.stderr.contains("copying path"), "{}", ours.stderr);
    assert_eq!(nix.stdout, ours.stdout);
    assert_eq!(realisation_rows(&nix_db).len(), 2, "{nix_db}");
    assert_eq!(nix_db, our_db);
    root.verify_store();
}

/// Fixed-output derivations whose output does not match their hash: flat and
/// recursive.
const BAD_FOD: &str = r#"
let mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  outputHashAlgo = "sha256"; outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; } // args);
in {
  flat = mk { name = "bad-flat"; args = ["-c" "printf bye > $out"]; outputHashMode = "flat"; };
  nar = mk { name = "bad-nar"; args = ["-c" "mkdir $out; echo bye > $out/x"]; outputHashMode = "recursive"; };
}
"#;

/// Nix registers what a mismatching fixed-output build produced under its actual
/// content's path, and no realisation for it, with or without `--keep-failed`.
#[test]
fn fixed_output_hash_mismatch_registers_the_actual_output_only() {
    require_nix!();
    for keep in [false, true] {
        let root = TestRoot::new();
        let flat = instantiate(&root, BAD_FOD, "flat");
        let rec = root
            .instantiate(&root.path().join("e.nix"), Some("nar"))
            .remove(0);
        let mut args = vec![flat.as_str(), rec.as_str(), "--keep-going"];
        if keep {
            args.push("--keep-failed");
        }
        let mut nix_files = BTreeMap::new();
        let (nix, nix_db, ours, our_db) = both(&root, &args, |r| {
            nix_files = files_of(Path::new(&r.store_dir));
        });
        // the same store entries (outputs, lock files) are left behind
        let our_files = files_of(Path::new(&root.store_dir));
        assert_eq!(
            nix_files.keys().collect::<Vec<_>>(),
            our_files.keys().collect::<Vec<_>>()
        );
        // 0x60 | hash mismatch | build failure
        assert_eq!(nix.code, 102, "{}", nix.stderr);
        assert_eq!(ours.code, 102, "{}", ours.stderr);
        for drv in [&flat, &rec] {
            let msg = format!("error: hash mismatch in fixed-output derivation '{drv}':");
            assert!(nix.stderr.contains(&msg), "{}", nix.stderr);
            assert!(ours.stderr.contains(&msg), "{}", ours.stderr);
        }
        assert_eq!(
            nix.stderr.contains("note: keeping build directory"),
            keep,
            "{}",
            nix.stderr
        );
        assert_eq!(
            ours.stderr.contains("note: keeping build directory"),
            keep,
            "{}",
            ours.stderr
        );
        // the two actual outputs are valid, no realisation names them
        let outputs = |rows: &str| {
            rows.lines()
                .filter(|l| l.starts_with("VP|"))
                .filter(|l| !l.split('|').nth(1).unwrap().ends_with(".drv"))
                .count()
        };
        assert_eq!(outputs(&nix_db), 2, "{nix_db}");
        assert!(realisation_rows(&nix_db).is_empty(), "{nix_db}");
        assert_eq!(nix_db, our_db);
        root.verify_store();
    }
}
