//! `drover derivation show` and `drover derivation add` against `nix show-derivation`
//! and the `.drv` files `nix-instantiate` writes.

use serde_json::Value;

use crate::nix_env::TestRoot;
use crate::{corpus_drvs, drover, stdout_of};

#[test]
fn show_matches_nix_show_derivation() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root);
    let mut args = vec!["show-derivation"];
    args.extend(drvs.iter().map(String::as_str));
    let nix: Value = serde_json::from_str(&root.run("nix", &args)).unwrap();
    let ours: Value = serde_json::from_str(&stdout_of(
        drover(&root).arg("derivation").arg("show").args(&drvs),
    ))
    .unwrap();
    assert_eq!(ours, nix);
    // Nix prints one object with the derivations in store-path order; so do we.
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(&nix));
}

/// Deletes the corpus' `.drv`s from the store, re-adds each from its JSON with every
/// output path removed, and checks drover recomputes the same `.drv` path and outputs
/// and writes a `.drv` Nix finds valid and identical.
#[test]
fn add_recomputes_paths_of_deleted_drvs() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root);
    let mut args = vec!["show-derivation"];
    args.extend(drvs.iter().map(String::as_str));
    let shown: Value = serde_json::from_str(&root.run("nix", &args)).unwrap();
    let originals: Vec<Vec<u8>> = drvs.iter().map(|d| std::fs::read(d).unwrap()).collect();

    let mut args = vec!["--delete"];
    args.extend(drvs.iter().map(String::as_str));
    root.run("nix-store", &args);
    assert!(!std::path::Path::new(&drvs[0]).exists());

    for (drv, original) in drvs.iter().zip(&originals) {
        let mut json = shown[drv.as_str()].clone();
        for (_, out) in json["outputs"].as_object_mut().unwrap() {
            out.as_object_mut().unwrap().remove("path");
        }
        let dir = root.tmp_dir();
        let file = dir.join("drv.json");
        std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
        let printed = stdout_of(drover(&root).args(["derivation", "add"]).arg(&file));
        assert_eq!(printed.trim(), drv, "recomputed .drv path");
        assert_eq!(&std::fs::read(drv).unwrap(), original, "{drv} bytes");
    }
    let nix: Value = {
        let mut args = vec!["show-derivation"];
        args.extend(drvs.iter().map(String::as_str));
        serde_json::from_str(&root.run("nix", &args)).unwrap()
    };
    assert_eq!(nix, shown, "output paths recomputed as Nix computed them");
    let verify = root
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    assert!(verify.status.success());
    assert_eq!(String::from_utf8_lossy(&verify.stderr), "");
}

#[test]
fn add_from_stdin_and_rejects_a_wrong_output_path() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root);
    let drv = drvs.last().unwrap();
    let shown: Value =
        serde_json::from_str(&root.run("nix", &["show-derivation", drv.as_str()])).unwrap();
    let mut json = shown[drv.as_str()].clone();

    // Given output paths are checked.
    let out = json["outputs"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap();
    if let Some(p) = out.get_mut("path") {
        let wrong = p
            .as_str()
            .unwrap()
            .replacen(|c: char| c.is_ascii_digit(), "z", 1);
        *p = Value::String(wrong);
        let mut child = drover(&root)
            .args(["derivation", "add", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(&json).unwrap())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("output"), "{err}");
    }

    // Malformed JSON is a clear error, not a panic.
    let o = drover(&root)
        .args(["derivation", "add", "-"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("error"));
}
