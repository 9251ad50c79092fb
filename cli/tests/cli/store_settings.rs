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

/// tests/optimise-store.sh: three derivations writing the same file.
const SAME: &str = r#"
let mk = name: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = ["-c" "mkdir $out; echo hello > $out/foo; ln -s foo $out/bar; printf flat > $out/flat"]; };
in { foo1 = mk "foo1"; foo2 = mk "foo2"; foo3 = mk "foo3"; }
"#;

/// (inode, link count) of a file.
fn stat(p: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.ino(), m.nlink())
}

/// Per output: (`foo` is the first output's inode, its link count, the same for `bar`).
type Shared = Vec<(bool, u64, bool, u64)>;

/// What optimisation left: for each output of `outs`, whether `foo`/`bar` share
/// the first output's inode and their link counts; and the `.links` entries.
fn linking(root: &TestRoot, outs: &str) -> (Shared, Vec<String>) {
    let outs: Vec<&str> = outs.lines().collect();
    let (foo0, bar0) = (
        stat(&format!("{}/foo", outs[0])),
        stat(&format!("{}/bar", outs[0])),
    );
    let per = outs
        .iter()
        .map(|o| {
            let (f, b) = (stat(&format!("{o}/foo")), stat(&format!("{o}/bar")));
            (f.0 == foo0.0, f.1, b.0 == bar0.0, b.1)
        })
        .collect();
    let mut links: Vec<String> = std::fs::read_dir(format!("{}/.links", root.store_dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    links.sort();
    (per, links)
}

#[test]
fn auto_optimise_store_hard_links_identical_files() {
    require_nix!();
    let root = TestRoot::new();
    let foo1 = instantiate(&root, SAME, "foo1");
    let file = root.path().join("e.nix");
    let foo2 = root.instantiate(&file, Some("foo2")).remove(0);
    let foo3 = root.instantiate(&file, Some("foo3")).remove(0);
    let args = [
        foo1.as_str(),
        foo2.as_str(),
        "--option",
        "auto-optimise-store",
        "true",
    ];
    let mut nix_linking = None;
    let (nix, _, ours, _) = both(&root, &args, |r| {
        let outs = r.run("nix-store", &["-r", &foo1, &foo2]);
        nix_linking = Some(linking(r, &outs));
    });
    assert_eq!(
        (nix.code, ours.code),
        (0, 0),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert_eq!(nix.stdout, ours.stdout);
    let nix_linking = nix_linking.unwrap();
    // both `foo`s are one inode with three links (two outputs and `.links`)
    assert_eq!(nix_linking.0, vec![(true, 3, true, 3), (true, 3, true, 3)]);
    assert_eq!(nix_linking, linking(&root, &ours.stdout));
    root.verify_store();
    // without the setting, a third copy stays on its own
    let out3 = crate::stdout_of(crate::drover(&root).args(["realise", &foo3]));
    let all = format!("{}{out3}", ours.stdout);
    let (per, _) = linking(&root, &all);
    assert!(!per[2].0, "{per:?}");
    // Nix's collector finds the layout it expects: with the outputs gone, every
    // `.links` entry is unused and deleted
    root.run("nix-store", &["--gc"]);
    assert_eq!(linking_entries(&root), Vec::<String>::new());
}

fn linking_entries(root: &TestRoot) -> Vec<String> {
    std::fs::read_dir(format!("{}/.links", root.store_dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Substituted paths are optimised too (Nix's `addToStore` calls `optimisePath`).
#[test]
fn auto_optimise_store_links_substituted_paths() {
    require_nix!();
    let root = TestRoot::new();
    let foo1 = instantiate(&root, SAME, "foo1");
    let file = root.path().join("e.nix");
    let foo2 = root.instantiate(&file, Some("foo2")).remove(0);
    let outs = root.realise(&[&foo1, &foo2]);
    let cache = format!("file://{}", root.path().join("cache").display());
    let mut copy = vec!["copy", "--to", &cache];
    copy.extend(outs.iter().map(String::as_str));
    root.run("nix", &copy);
    root.wipe_store();
    let foo1 = instantiate(&root, SAME, "foo1");
    let foo2 = root.instantiate(&file, Some("foo2")).remove(0);
    let args = [
        foo1.as_str(),
        foo2.as_str(),
        "--option",
        "substituters",
        &cache,
        "--option",
        "require-sigs",
        "false",
        "--option",
        "auto-optimise-store",
        "true",
    ];
    let mut nix_linking = None;
    let (nix, nix_db, ours, our_db) = both(&root, &args, |r| {
        nix_linking = Some(linking(r, &outs.join("\n")));
    });
    assert_eq!(
        (nix.code, ours.code),
        (0, 0),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert!(ours.stderr.contains("copying path"), "{}", ours.stderr);
    let nix_linking = nix_linking.unwrap();
    assert_eq!(nix_linking.0, vec![(true, 3, true, 3), (true, 3, true, 3)]);
    assert_eq!(nix_linking, linking(&root, &outs.join("\n")));
    assert_eq!(nix_db, our_db);
    root.verify_store();
}
