//! `drover path-info` against `nix path-info` on a store Nix populated.

use serde_json::Value;

use crate::nix_env::TestRoot;
use crate::{corpus_drvs, drover, stdout_of};

#[test]
fn json_matches_nix_path_info() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root, true);
    // Build the top-level derivations so outputs, sources and drvs are all present.
    let mut args = vec!["--realise"];
    args.extend(drvs.iter().map(String::as_str));
    let outs = root.run("nix-store", &args);
    let mut paths: Vec<String> = outs.lines().map(str::to_owned).collect();
    let mut args = vec!["-qR"];
    args.extend(drvs.iter().map(String::as_str));
    paths.extend(root.run("nix-store", &args).lines().map(str::to_owned));
    paths.sort();
    paths.dedup();

    // Nix 2.8's `nix path-info X.drv` describes the derivation's *outputs*; drover's
    // describes the path it is given. Compare outputs and sources with Nix directly,
    // and `.drv`s with what `nix-store --query` says of them.
    let (drv_paths, others): (Vec<String>, Vec<String>) =
        paths.into_iter().partition(|p| p.ends_with(".drv"));
    let mut args = vec!["path-info", "--json"];
    args.extend(others.iter().map(String::as_str));
    let nix: Value = serde_json::from_str(&root.run("nix", &args)).unwrap();
    let ours: Value = serde_json::from_str(&stdout_of(
        drover(&root).args(["path-info", "--json"]).args(&others),
    ))
    .unwrap();
    assert_eq!(ours, nix);

    let ours: Value = serde_json::from_str(&stdout_of(
        drover(&root).args(["path-info", "--json"]).args(&drv_paths),
    ))
    .unwrap();
    for (info, drv) in ours.as_array().unwrap().iter().zip(&drv_paths) {
        assert_eq!(info["path"], drv.as_str());
        let q = |flag: &str| root.run("nix-store", &["-q", flag, drv.as_str()]);
        let nar_hash = drover::hash::Hash::parse_any_prefixed(q("--hash").trim()).unwrap();
        assert_eq!(info["narHash"], nar_hash.to_sri(), "{drv}");
        assert_eq!(info["narSize"], q("--size").trim().parse::<u64>().unwrap());
        let refs: Vec<&str> = info["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        let want = q("--references");
        assert_eq!(refs, want.lines().collect::<Vec<_>>(), "{drv}");
        assert!(info["ca"].as_str().unwrap().starts_with("text:sha256:"));
        assert!(info.get("deriver").is_none());
    }
}

#[test]
fn plain_output_and_invalid_paths() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root, true);
    let drv = &drvs[0];
    let plain = stdout_of(drover(&root).arg("path-info").arg(drv));
    assert_eq!(plain.trim(), drv.as_str());

    // A path that is not valid: an error naming it, exit 1, as `nix path-info` does.
    let missing = format!(
        "{}/00000000000000000000000000000000-missing",
        root.store_dir
    );
    let o = drover(&root)
        .arg("path-info")
        .arg(&missing)
        .output()
        .unwrap();
    let n = root
        .cmd("nix")
        .args(["path-info", &missing])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), n.status.code());
    assert!(String::from_utf8_lossy(&o.stderr).contains(&missing));

    let o = drover(&root)
        .args(["path-info", "--json"])
        .arg(&missing)
        .output()
        .unwrap();
    let n = root
        .cmd("nix")
        .args(["path-info", "--json", &missing])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), n.status.code());
    if n.status.success() {
        let nj: Value = serde_json::from_slice(&n.stdout).unwrap();
        let oj: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(oj, nj);
    }
}
