//! `drover derivation show` and `drover derivation add` against `nix show-derivation`
//! and the `.drv` files `nix-instantiate` writes.

use serde_json::Value;

use crate::nix_env::TestRoot;
use crate::{corpus_drvs, drover, stdout_of};

#[test]
fn show_matches_nix_show_derivation() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root, false);
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
    let drvs = corpus_drvs(&root, false);
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
        // Structured-attrs derivations have no `env.name`: give the top-level `name`.
        if json["env"].get("name").is_none() {
            let base = drv.rsplit('/').next().unwrap();
            let name = base[33..].strip_suffix(".drv").unwrap();
            json["name"] = Value::String(name.to_owned());
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
    root.verify_store();
}

#[test]
fn add_from_stdin_and_rejects_a_wrong_output_path() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root, false);
    let drv = drvs.last().unwrap();
    let shown: Value =
        serde_json::from_str(&root.run("nix", &["show-derivation", drv.as_str()])).unwrap();
    let mut json = shown[drv.as_str()].clone();
    // Which derivation comes last depends on the store dir's hashes; structured-attrs
    // ones have no `env.name`, so give the name explicitly.
    let base = drv.rsplit('/').next().unwrap();
    json["name"] = Value::String(base[33..].trim_end_matches(".drv").to_owned());

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

/// The README's example derivations, added by drover, are real: Nix builds them.
#[test]
fn bundled_examples_build_with_nix() {
    require_nix!();
    let root = TestRoot::new();
    let examples = crate::nix_env::corpus_dir().join("../../../examples");
    let add = |file: &str| {
        let out = stdout_of(
            drover(&root)
                .args(["derivation", "add"])
                .arg(examples.join(file)),
        );
        out.trim().to_owned()
    };
    let out_of = |drv: &str| {
        let v: Value =
            serde_json::from_str(&stdout_of(drover(&root).args(["derivation", "show", drv])))
                .unwrap();
        v[drv]["outputs"]["out"]["path"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let hello = add("hello.drv.json");
    let fetched = add("fetched.drv.json");
    let text = std::fs::read_to_string(examples.join("greeting.drv.json"))
        .unwrap()
        .replace("@HELLO_DRV@", &hello)
        .replace("@FETCHED_DRV@", &fetched)
        .replace("@HELLO_OUT@", &out_of(&hello))
        .replace("@FETCHED_OUT@", &out_of(&fetched));
    let file = root.tmp_dir().join("greeting.json");
    std::fs::write(&file, text).unwrap();
    let greeting = add(file.to_str().unwrap());
    let outs = root.realise(&[&greeting]);
    assert_eq!(outs.len(), 2, "{outs:?}");
    let built = std::fs::read_to_string(out_of(&greeting)).unwrap();
    assert!(
        built.starts_with("Hello, world! (checked against "),
        "{built}"
    );
    root.verify_store();
}
