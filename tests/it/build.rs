//! Local builds with drover's primitives (`drover::build`), compared with real Nix
//! 2.8 building the same derivations in the same store: output paths, NAR hashes,
//! references, `ca` fields and database rows must be identical, and so must the
//! builder's environment.

use std::sync::Arc;

use drover::build::{build_blocking, BuildMode, BuildOutcome, BuildSettings, BuildSpec};
use drover::build_result::BuildStatus;
use drover::config::{Env, Settings};
use drover::store::LocalStore;
use drover::store_path::StorePath;

use crate::nix_env::{corpus_dir, TestRoot};
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

struct Drover {
    store: LocalStore,
    bs: BuildSettings,
}

fn drover(root: &TestRoot, caller_env: &[(&str, &str)]) -> Drover {
    let s = settings(root);
    let mut bs = BuildSettings::from_settings(&s);
    bs.caller_env = caller_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Drover {
        store: LocalStore::open(&s).unwrap(),
        bs,
    }
}

impl Drover {
    fn sp(&self, s: &str) -> StorePath {
        self.store.store_dir().parse(s.trim()).unwrap()
    }

    /// Builds `drv` (whose inputs must be valid) as the goal would ask for it.
    fn build(&self, drv: &str, mode: BuildMode, keep_failed: bool) -> (BuildOutcome, String) {
        let drv_path = self.sp(drv);
        let d = Arc::new(self.store.read_derivation(&drv_path).unwrap());
        let output_paths = d
            .outputs
            .iter()
            .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
            .collect();
        let mut inputs: Vec<StorePath> = d.input_srcs.iter().cloned().collect();
        for (i, outs) in &d.input_drvs {
            let m = self.store.query_derivation_outputs(i).unwrap();
            inputs.extend(outs.iter().map(|o| m[o].clone()));
        }
        let spec = BuildSpec {
            drv_path,
            drv: d,
            output_paths,
            input_closure: self.store.compute_closure(&inputs).unwrap(),
            mode,
            keep_failed,
            round: Default::default(),
        };
        let mut log = Vec::new();
        let o = build_blocking(&self.store, &self.bs, &spec, |b| log.extend_from_slice(b)).unwrap();
        (o, String::from_utf8_lossy(&log).into_owned())
    }
}

/// `nix path-info --json` of paths, without registration times.
fn path_info(root: &TestRoot, paths: &[String]) -> serde_json::Value {
    let mut args = vec!["path-info", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let mut v: serde_json::Value = serde_json::from_str(&root.run("nix", &args)).unwrap();
    for i in v.as_array_mut().unwrap() {
        i.as_object_mut().unwrap().remove("registrationTime");
    }
    v
}

/// Rows of the Realisations and DerivationOutputs tables, as text.
fn db_rows(root: &TestRoot) -> Vec<String> {
    let db = root.state_dir.join("db/db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut rows = Vec::new();
    for sql in [
        "select drvPath || ' ' || outputName || ' ' || (select path from ValidPaths where id = outputPath) from Realisations",
        "select (select path from ValidPaths where id = drv) || ' ' || id || ' ' || path from DerivationOutputs",
        "select path || ' ' || hash || ' ' || coalesce(deriver, '-') || ' ' || coalesce(narSize, '-') || ' ' || coalesce(ultimate, '-') || ' ' || coalesce(ca, '-') from ValidPaths",
    ] {
        let mut st = conn.prepare(sql).unwrap();
        let r = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.extend(r.map(|x| x.unwrap()));
    }
    rows.sort();
    rows
}

fn topo(d: &Drover, drvs: &[String]) -> Vec<String> {
    fn visit(d: &Drover, p: &str, seen: &mut Vec<String>) {
        if seen.iter().any(|s| s == p) {
            return;
        }
        let drv = d.store.read_derivation(&d.sp(p)).unwrap();
        for i in drv.input_drvs.keys() {
            visit(d, &d.store.store_dir().print(i), seen);
        }
        seen.push(p.to_owned());
    }
    let mut seen = Vec::new();
    for p in drvs {
        visit(d, p, &mut seen);
    }
    seen
}

#[test]
fn corpus_builds_like_nix() {
    require_nix!();
    let root = TestRoot::new();
    let corpus = corpus_dir().join("corpus.nix");
    let all = root.instantiate(&corpus, None);
    let d = drover(&root, &[]);
    // Deferred derivations need resolution first (the goal's job): not built here.
    let drvs: Vec<String> = topo(&d, &all)
        .into_iter()
        .filter(|p| {
            let drv = d.store.read_derivation(&d.sp(p)).unwrap();
            drv.derivation_type()
                .map(|t| {
                    !matches!(
                        t,
                        drover::derivation::DerivationType::InputAddressed { deferred: true }
                    )
                })
                .unwrap_or(false)
        })
        .collect();
    let refs: Vec<&str> = drvs.iter().map(String::as_str).collect();
    let nix_outs = root.realise(&refs);
    let nix_info = path_info(&root, &nix_outs);
    let nix_rows = db_rows(&root);
    let mut args = vec!["--delete"];
    args.extend(nix_outs.iter().map(String::as_str));
    root.run("nix-store", &args);
    for o in &nix_outs {
        assert!(!std::path::Path::new(o).exists(), "{o} deleted");
    }
    let mut drover_outs = Vec::new();
    for p in &drvs {
        let (o, log) = d.build(p, BuildMode::Normal, false);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{p}: {} {log}",
            o.result.error_msg
        );
        assert!(o.kept_build_dir.is_none());
        drover_outs.extend(o.outputs.values().map(|p| d.store.store_dir().print(p)));
    }
    drover_outs.sort();
    let mut sorted_nix = nix_outs.clone();
    sorted_nix.sort();
    assert_eq!(drover_outs, sorted_nix);
    assert_eq!(path_info(&root, &nix_outs), nix_info);
    assert_eq!(db_rows(&root), nix_rows);
    root.verify_store();
    // --check of every (deterministic) derivation passes: scratch outputs are
    // rewritten back to the final paths before comparing
    for p in &drvs {
        let (o, log) = d.build(p, BuildMode::Check, false);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{p}: {} {log}",
            o.result.error_msg
        );
    }
    assert_eq!(path_info(&root, &nix_outs), nix_info);
    // no build directories or scratch paths are left behind
    for e in std::fs::read_dir(&root.store_dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        if n.starts_with('.') || n.ends_with(".lock") {
            continue;
        }
        assert!(
            d.store
                .is_valid_path(&d.sp(&format!("{}/{n}", root.store_dir)))
                .unwrap(),
            "{n}"
        );
    }
    assert_eq!(std::fs::read_dir(root.tmp_dir()).unwrap().count(), 0);
}

/// A fixed-output derivation dumping its environment (with `impureEnvVars`); the
/// output depends on the test root, so its declared hash is wrong on purpose: both
/// tools register it at the path of what it really contains and report the mismatch.
const ENV_FOD: &str = r#"
{
  fod = derivation {
    name = "env-fod"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "/usr/bin/env | /usr/bin/sort > $out" ];
    impureEnvVars = [ "MY_IMPURE" "UNSET_IMPURE" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
  };
}
"#;

#[test]
fn builder_environment_is_nixs() {
    require_nix!();
    let root = TestRoot::new();
    let file = corpus_dir().join("build/env.nix");
    let fod_file = root.path().join("env-fod.nix");
    std::fs::write(&fod_file, ENV_FOD).unwrap();
    let d = drover(&root, &[("MY_IMPURE", "hello")]);
    for attr in ["plain", "structured", "ca", "fod"] {
        let f = if attr == "fod" { &fod_file } else { &file };
        let drv = root.instantiate(f, Some(attr)).remove(0);
        let nix = root
            .cmd("nix-store")
            .env("MY_IMPURE", "hello")
            .args(["--realise", &drv])
            .output()
            .unwrap();
        let (o, log) = d.build(&drv, BuildMode::Normal, false);
        if attr == "fod" {
            // The wrong hash: Nix fails with 102 and registers the real content address.
            assert_eq!(nix.status.code(), Some(102));
            let stderr = String::from_utf8_lossy(&nix.stderr);
            assert_eq!(o.result.status, BuildStatus::OutputRejected);
            assert!(o.hash_mismatch);
            let msg = o.result.error_msg.clone();
            assert!(msg.starts_with(&format!(
                "hash mismatch in fixed-output derivation '{drv}':\n  specified: sha256-AAAA"
            )));
            let indented = msg.replace('\n', "\n       ");
            assert!(
                stderr.contains(&format!("error: {indented}")),
                "{stderr}\n{msg}"
            );
            continue;
        }
        assert!(
            nix.status.success(),
            "{}",
            String::from_utf8_lossy(&nix.stderr)
        );
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{attr}: {} {log}",
            o.result.error_msg
        );
        // Nix built first: drover's outputs were already valid; compare the contents
        // after deleting Nix's and rebuilding.
        let outs: Vec<String> = o
            .outputs
            .values()
            .map(|p| d.store.store_dir().print(p))
            .collect();
        let nix_contents: Vec<Vec<u8>> = outs.iter().map(|p| std::fs::read(p).unwrap()).collect();
        let info = path_info(&root, &outs);
        // This process's drover build holds temporary roots on them, as a running
        // Nix would, and the collector refuses to delete live paths: drop them.
        d.store.release_temp_roots();
        let mut args = vec!["--delete"];
        args.extend(outs.iter().map(String::as_str));
        root.run("nix-store", &args);
        let (o2, log) = d.build(&drv, BuildMode::Normal, false);
        assert_eq!(
            o2.result.status,
            BuildStatus::Built,
            "{attr}: {} {log}",
            o2.result.error_msg
        );
        assert_eq!(o2.outputs, o.outputs);
        let ours: Vec<Vec<u8>> = outs.iter().map(|p| std::fs::read(p).unwrap()).collect();
        for (n, o) in nix_contents.iter().zip(&ours) {
            assert_eq!(
                String::from_utf8_lossy(o),
                String::from_utf8_lossy(n),
                "{attr}"
            );
        }
        assert_eq!(path_info(&root, &outs), info, "{attr}");
    }
    root.verify_store();
}

const FAILING: &str = r#"
let dep = builtins.toFile "dep" "x"; dep2 = builtins.toFile "dep2" "uses ${dep}";
  sh = name: script: attrs: derivation ({ inherit name; system = builtins.currentSystem;
  builder = "/bin/sh"; args = ["-c" script]; PATH = "/usr/bin:/bin"; } // attrs);
in {
  noOutput = sh "no-output" "echo not writing" { };
  fails = sh "fails" "echo one; echo two; exit 3" { };
  fodFails = sh "fod-fails" "exit 3" { outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; };
  nondet = sh "nondet" "echo $RANDOM$$ > $out" { };
  missingBuilder = derivation { name = "missing-builder"; system = builtins.currentSystem; builder = "/no/such/builder"; };
  disallowed = sh "disallowed" "echo ${dep} > $out" { disallowedReferences = [ dep ]; };
  allowedSelf = sh "allowed-self" "echo $out ${dep} > $out" { allowedRequisites = [ dep ]; };
  allowedNone = sh "allowed-none" "echo $out ${dep} > $out" { allowedReferences = [ ]; };
  graph = sh "graph" "cat refs > $out" { exportReferencesGraph = [ "refs" dep2 ]; };
  structuredGraph = sh "structured-graph" "/bin/cat .attrs.json > ${builtins.placeholder "out"}" {
    __structuredAttrs = true; exportReferencesGraph.refs = [ dep2 ]; };
  structMax = sh "struct-max" "echo 123456789 > ${builtins.placeholder "out"}" {
    __structuredAttrs = true; outputChecks.out.maxSize = 10; };
}
"#;

#[test]
fn failures_are_reported_as_nix_does() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("failing.nix");
    std::fs::write(&file, FAILING).unwrap();
    let d = drover(&root, &[]);
    let store_dir = d.store.store_dir().clone();

    let drv = root.instantiate(&file, Some("noOutput")).remove(0);
    let (o, log) = d.build(&drv, BuildMode::Normal, false);
    assert_eq!(log, "not writing\n");
    assert_eq!(o.result.status, BuildStatus::OutputRejected);
    let out = store_dir.print(
        d.store.read_derivation(&d.sp(&drv)).unwrap().outputs["out"]
            .path()
            .unwrap(),
    );
    assert_eq!(
        o.result.error_msg,
        format!("builder for '{drv}' failed to produce output path for output 'out' at '{out}'")
    );
    let nix = root
        .cmd("nix-store")
        .args(["--realise", &drv])
        .output()
        .unwrap();
    assert_eq!(nix.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&nix.stderr).contains(&format!("error: {}", o.result.error_msg))
    );

    let drv = root.instantiate(&file, Some("fails")).remove(0);
    let (o, log) = d.build(&drv, BuildMode::Normal, true);
    assert_eq!(log, "one\ntwo\n");
    assert_eq!(o.result.status, BuildStatus::PermanentFailure);
    assert_eq!(
        o.result.error_msg,
        format!("builder for '{drv}' failed with exit code 3")
    );
    let kept = o
        .kept_build_dir
        .expect("keep-failed keeps the build directory");
    assert_eq!(kept, root.tmp_dir().join("nix-build-fails.drv-0"));
    assert!(kept.is_dir());

    let drv = root.instantiate(&file, Some("fodFails")).remove(0);
    let (o, _) = d.build(&drv, BuildMode::Normal, false);
    assert_eq!(o.result.status, BuildStatus::TransientFailure);

    let drv = root.instantiate(&file, Some("missingBuilder")).remove(0);
    let (o, log) = d.build(&drv, BuildMode::Normal, false);
    assert_eq!(o.result.status, BuildStatus::PermanentFailure);
    // the log is the bytes Nix's child writes (a serialised error)
    let nix = root
        .cmd("nix-store")
        .args(["--realise", &drv])
        .output()
        .unwrap();
    assert_eq!(nix.status.code(), Some(100));
    let nix_log = root.cmd("nix").args(["log", &drv]).output().unwrap();
    assert_eq!(log.as_bytes(), &nix_log.stdout[..]);

    // output checks: drover's message is the one Nix prints, and Nix exits 1
    for attr in ["disallowed", "allowedNone", "structMax"] {
        let drv = root.instantiate(&file, Some(attr)).remove(0);
        let (o, _) = d.build(&drv, BuildMode::Normal, false);
        assert_eq!(o.result.status, BuildStatus::OutputRejected, "{attr}");
        let nix = root
            .cmd("nix-store")
            .args(["--realise", &drv])
            .output()
            .unwrap();
        assert_eq!(nix.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&nix.stderr);
        let expected = format!("error: {}", o.result.error_msg.replace('\n', "\n       "));
        assert!(stderr.contains(&expected), "{attr}: {stderr}\n{expected}");
    }
    // exportReferencesGraph: the same closure file as Nix writes
    let drv = root.instantiate(&file, Some("graph")).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let nix_graph = std::fs::read_to_string(&out).unwrap();
    assert!(nix_graph.contains("-dep2\n\n1\n"), "{nix_graph}");
    root.run("nix-store", &["--delete", &out]);
    let (o, _) = d.build(&drv, BuildMode::Normal, false);
    assert_eq!(
        o.result.status,
        BuildStatus::Built,
        "{}",
        o.result.error_msg
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), nix_graph);

    let drv = root.instantiate(&file, Some("structuredGraph")).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let nix_graph = std::fs::read_to_string(&out).unwrap();
    assert!(nix_graph.contains("\"closureSize\":"), "{nix_graph}");
    root.run("nix-store", &["--delete", &out]);
    let (o, _) = d.build(&drv, BuildMode::Normal, false);
    assert_eq!(
        o.result.status,
        BuildStatus::Built,
        "{}",
        o.result.error_msg
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), nix_graph);

    let drv = root.instantiate(&file, Some("allowedSelf")).remove(0);
    let (o, _) = d.build(&drv, BuildMode::Normal, false);
    assert_eq!(
        o.result.status,
        BuildStatus::Built,
        "{}",
        o.result.error_msg
    );

    // --check: a nondeterministic builder
    let drv = root.instantiate(&file, Some("nondet")).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let (o, _) = d.build(&drv, BuildMode::Check, false);
    assert_eq!(o.result.status, BuildStatus::NotDeterministic);
    assert_eq!(
        o.result.error_msg,
        format!("derivation '{drv}' may not be deterministic: output '{out}' differs")
    );
    let (o, _) = d.build(&drv, BuildMode::Check, true);
    assert_eq!(
        o.result.error_msg,
        format!("derivation '{drv}' may not be deterministic: output '{out}' differs from '{out}.check'")
    );
    assert!(std::path::Path::new(&format!("{out}.check")).exists());
    std::fs::remove_file(format!("{out}.check")).unwrap();
    // a deterministic one passes the check and leaves nothing behind
    let simple = root
        .instantiate(&corpus_dir().join("corpus.nix"), Some("simple"))
        .remove(0);
    root.realise(&[&simple]);
    let (o, _) = d.build(&simple, BuildMode::Check, false);
    assert_eq!(
        o.result.status,
        BuildStatus::Built,
        "{}",
        o.result.error_msg
    );
    root.verify_store();
    let leftovers: Vec<String> = std::fs::read_dir(&root.store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock") && !n.ends_with(".drv") && !n.starts_with('.'))
        .collect();
    // no scratch paths: only outputs (rejected ones stay invalid on disk, as in Nix)
    let names: Vec<&str> = leftovers.iter().map(|n| &n[33..]).collect();
    let known = [
        "graph",
        "structured-graph",
        "dep2",
        "allowed-self",
        "struct-max",
        "nondet",
        "simple",
        "dep",
        "allowed-none",
        "disallowed",
    ];
    assert!(names.iter().all(|n| known.contains(n)), "{leftovers:?}");
    assert_eq!(names.len(), known.len(), "{leftovers:?}");
}

#[test]
fn impure_derivations_get_content_addressed_outputs() {
    require_nix!();
    let root = TestRoot::new();
    let d = drover(&root, &[]);
    for attr in ["impure", "impureFlat"] {
        let drv = root
            .instantiate(&corpus_dir().join("impure.nix"), Some(attr))
            .remove(0);
        let (o, log) = d.build(&drv, BuildMode::Normal, false);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{attr}: {} {log}",
            o.result.error_msg
        );
        let outs: Vec<String> = o
            .outputs
            .values()
            .map(|p| d.store.store_dir().print(p))
            .collect();
        for i in path_info(&root, &outs).as_array().unwrap() {
            let ca = i["ca"].as_str().unwrap();
            let expected = if attr == "impure" {
                "fixed:r:sha256:"
            } else {
                "fixed:sha512:"
            };
            assert!(ca.starts_with(expected), "{i}");
        }
        // impure outputs get no realisations
        assert!(db_rows(&root)
            .iter()
            .all(|r| !(r.starts_with("sha256:") && r.contains("-impure"))));
    }
    root.verify_store();
}
