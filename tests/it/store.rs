//! Interop of drover's settings and local store with real Nix 2.8.

use std::collections::BTreeMap;
use std::time::Duration;

use drover::config::{Env, Settings};
use drover::hash::HashAlgo;
use drover::nar;
use drover::realisation::DrvOutput;
use drover::store::{path_infos_to_json, LocalStore, PathLocks, ValidPathInfo};
use drover::store_path::{StorePath, StorePathSet};

use crate::nix_env::TestRoot;
use crate::require_nix;

fn settings(root: &TestRoot) -> Settings {
    let mut env: Env = root
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    Settings::load(&env, &[]).unwrap()
}

fn open(root: &TestRoot) -> LocalStore {
    LocalStore::open(&settings(root)).unwrap()
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

fn sp(store: &LocalStore, s: &str) -> StorePath {
    store.store_dir().parse(s.trim()).unwrap()
}

fn printed(store: &LocalStore, set: &StorePathSet) -> Vec<String> {
    set.iter().map(|p| store.store_dir().print(p)).collect()
}

const EXPR: &str = r#"
let
  sh = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // args);
  a = sh { name = "a"; args = ["-c" "echo a > $out"]; };
  b = sh { name = "b"; args = ["-c" "echo ${a} > $out"]; };
  multi = sh { name = "multi"; outputs = ["out" "dev"]; args = ["-c" "echo ${b} > $out; echo $out > $dev"]; };
  fixed = sh { name = "fixed"; args = ["-c" "echo -n fixed > $out"]; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "fixed"; };
  ca = sh { name = "ca"; args = ["-c" "echo ${fixed} > $out"]; __contentAddressed = true;
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  cadep = sh { name = "cadep"; args = ["-c" "echo ${ca} > $out"]; __contentAddressed = true;
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
in { inherit a b multi fixed ca cadep; }
"#;

#[test]
fn reads_a_store_nix_populated() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("e.nix");
    std::fs::write(&file, EXPR).unwrap();
    let drvs = root.instantiate(&file, None);
    assert_eq!(drvs.len(), 6);
    let outs = root.realise(&drvs.iter().map(String::as_str).collect::<Vec<_>>());
    let store = open(&root);

    let all = root.run(
        "nix-store",
        &["-qR"]
            .iter()
            .copied()
            .chain(drvs.iter().map(String::as_str))
            .collect::<Vec<_>>(),
    );
    let everything: Vec<String> = lines(&all)
        .into_iter()
        .chain(outs.iter().cloned())
        .collect();
    let paths: Vec<StorePath> = everything.iter().map(|p| sp(&store, p)).collect();
    let valid = store.query_valid_paths(&paths).unwrap();
    assert_eq!(
        valid.len(),
        paths
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );

    for p in &everything {
        let path = sp(&store, p);
        // path info JSON identical to `nix path-info --json`
        let nix_json: serde_json::Value =
            serde_json::from_str(&root.run("nix", &["path-info", "--json", p])).unwrap();
        let info = store.query_path_info(&path).unwrap().expect("valid");
        let ours = path_infos_to_json(store.store_dir(), &[(path.clone(), Some(info))]);
        // (`nix path-info` turns a CA `.drv` into its output; compare the others)
        if nix_json[0]["path"] == p.as_str() {
            assert_eq!(ours.to_string(), nix_json.to_string(), "{p}");
        }
        // references and referrers
        let refs = lines(&root.run("nix-store", &["-q", "--references", p]));
        assert_eq!(
            printed(&store, &store.query_references(&path).unwrap()),
            refs,
            "{p}"
        );
        let referrers = lines(&root.run("nix-store", &["-q", "--referrers", p]));
        assert_eq!(
            printed(&store, &store.query_referrers(&path).unwrap()),
            referrers,
            "{p}"
        );
        // closures
        let closure = lines(&root.run("nix-store", &["-qR", p]));
        assert_eq!(
            printed(
                &store,
                &store.compute_closure(std::slice::from_ref(&path)).unwrap()
            ),
            closure,
            "{p}"
        );
    }

    // derivation outputs of the input-addressed ones, derivers
    for drv in drvs
        .iter()
        .filter(|d| !d.ends_with("-ca.drv") && !d.ends_with("-cadep.drv"))
    {
        let d = sp(&store, drv);
        let outs = lines(&root.run("nix-store", &["-q", "--outputs", drv]));
        let ours: Vec<String> = store
            .query_derivation_outputs(&d)
            .unwrap()
            .values()
            .map(|p| store.store_dir().print(p))
            .collect();
        let mut ours = ours;
        ours.sort();
        assert_eq!(ours, outs, "{drv}");
        for o in &outs {
            assert!(store
                .query_valid_derivers(&sp(&store, o))
                .unwrap()
                .contains(&d));
        }
    }

    // realisations of the CA outputs: as recorded in the DB by Nix
    let db = root.state_dir.join("db/db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let rows: Vec<(String, String, String)> = conn
        .prepare("select drvPath, outputName, v.path from Realisations join ValidPaths v on v.id = outputPath")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(rows.len() >= 2, "{rows:?}");
    let mut with_deps = 0;
    for (h, o, out) in rows {
        let id: DrvOutput = format!("{h}!{o}").parse().unwrap();
        let r = store.query_realisation(&id).unwrap().expect("realisation");
        assert_eq!(store.store_dir().print(&r.out_path), out);
        for (dep, dep_path) in &r.dependent_realisations {
            with_deps += 1;
            assert_eq!(
                store.query_realisation(dep).unwrap().unwrap().out_path,
                *dep_path
            );
        }
    }
    assert!(
        with_deps >= 1,
        "the CA dependent records its input's realisation"
    );
}

#[test]
fn paths_drover_adds_are_accepted_by_nix() {
    require_nix!();
    let root = TestRoot::new();
    // drover creates the database
    let store = open(&root);
    // a text file, as builtins.toFile
    let text = store
        .add_text_to_store("foo", b"bar", &StorePathSet::new())
        .unwrap();
    let nix_text = root.run(
        "nix-instantiate",
        &["--eval", "-E", r#"builtins.toFile "foo" "bar""#],
    );
    assert_eq!(
        nix_text.trim().trim_matches('"'),
        store.store_dir().print(&text)
    );

    // a source tree, as nix-store --add
    let src = root.path().join("src-tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/file"), b"hello").unwrap();
    std::fs::write(src.join("exe"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        src.join("exe"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
    let added = store.add_path_to_store(&src, "src-tree").unwrap();

    // a hand-built output referring to both, with a text that refers to it
    let tmp = root.tmp_dir().join("out");
    std::fs::write(
        &tmp,
        format!(
            "{} {}",
            store.store_dir().print(&text),
            store.store_dir().print(&added)
        ),
    )
    .unwrap();
    let (nar_hash, nar_size) = nar::nar_hash_of_path(&tmp).unwrap();
    let out_path = store
        .store_dir()
        .make_store_path(
            "output:out",
            &HashAlgo::Sha256.digest(b"hand-built"),
            "hand-built",
        )
        .unwrap();
    std::fs::copy(&tmp, store.real_path(&out_path)).unwrap();
    drover::store::canonicalise_path_meta_data(&store.real_path(&out_path), None).unwrap();
    let mut info = ValidPathInfo::new(out_path.clone(), nar_hash, nar_size);
    info.references = [text.clone(), added.clone()].into_iter().collect();
    info.ultimate = true;
    store.register_valid_paths(&[info]).unwrap();
    drop(store);

    let nix_added = root.run("nix-store", &["--add", src.to_str().unwrap()]);
    let store = open(&root);
    assert_eq!(nix_added.trim(), store.store_dir().print(&added));
    root.verify_store();

    for p in [&text, &added, &out_path] {
        let s = store.store_dir().print(p);
        let nix_json: serde_json::Value =
            serde_json::from_str(&root.run("nix", &["path-info", "--json", &s])).unwrap();
        let info = store.query_path_info(p).unwrap();
        assert!(info.is_some());
        let ours = path_infos_to_json(store.store_dir(), &[(p.clone(), info)]);
        assert_eq!(ours.to_string(), nix_json.to_string());
    }
    let closure = lines(&root.run("nix-store", &["-qR", &store.store_dir().print(&out_path)]));
    assert_eq!(closure.len(), 3);

    // the schema Nix would have created
    let nix_root = TestRoot::new();
    nix_root.run("nix-store", &["--init"]);
    let dump = |db: &std::path::Path| -> Vec<(String, String, Option<String>)> {
        let c =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let mut st = c
            .prepare("select type, name, sql from sqlite_master order by rowid")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(
        dump(&root.state_dir.join("db/db.sqlite")),
        dump(&nix_root.state_dir.join("db/db.sqlite"))
    );
    for f in ["schema", "ca-schema"] {
        assert_eq!(
            std::fs::read(root.state_dir.join("db").join(f)).unwrap(),
            std::fs::read(nix_root.state_dir.join("db").join(f)).unwrap()
        );
    }
    let c = rusqlite::Connection::open(root.state_dir.join("db/db.sqlite")).unwrap();
    let mode: String = c
        .query_row("pragma journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(
        std::fs::metadata(root.state_dir.join("db/reserved"))
            .unwrap()
            .len(),
        8 * 1024 * 1024
    );
}

#[test]
fn invalid_path_json() {
    require_nix!();
    let root = TestRoot::new();
    let store = open(&root);
    let p = store
        .store_dir()
        .make_store_path(
            "output:out",
            &HashAlgo::Sha256.digest(b"nothing"),
            "nothing",
        )
        .unwrap();
    let s = store.store_dir().print(&p);
    let out = root
        .cmd("nix")
        .args(["path-info", "--json", &s])
        .output()
        .unwrap();
    let nix = String::from_utf8_lossy(&out.stdout).to_string();
    let ours = path_infos_to_json(store.store_dir(), &[(p, None)]).to_string();
    if out.status.success() {
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&nix)
                .unwrap()
                .to_string(),
            ours
        );
    } else {
        // Nix 2.8 refuses invalid paths before printing JSON
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not valid"));
    }
}

#[test]
fn path_lock_blocks_nix_building_the_same_output() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("e.nix");
    std::fs::write(
        &file,
        r#"derivation { name = "locked"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo hi > $out"]; }"#,
    )
    .unwrap();
    let drv = root.instantiate(&file, None).remove(0);
    let store = open(&root);
    let outs: BTreeMap<String, StorePath> =
        store.query_derivation_outputs(&sp(&store, &drv)).unwrap();
    let out = store.real_path(&outs["out"]);
    let lock = PathLocks::lock(&[out.clone()].into_iter().collect()).unwrap();
    let mut child = root
        .cmd("nix-store")
        .args(["--realise", &drv])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "nix-store finished while drover held the lock"
    );
    assert!(!out.exists());
    drop(lock);
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(store.is_valid_path(&outs["out"]).unwrap());
}
