//! Interop tests of `drover::derivation` against Nix 2.8 over the expression corpus
//! (`tests/data/nix/corpus.nix` and `impure.nix`, with the whole `.drv` closure):
//! ATerm round trips, `nix show-derivation` JSON, output path and `.drv` path
//! computation from JSON without paths (which proves `hashDerivationModulo`), and
//! rejection of tampered paths.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover::derivation::json::{
    from_json, from_json_map, to_json, to_json_value, to_nix_json_string,
};
use drover::derivation::{
    name_from_drv_path, Derivation, DerivationError, DerivationOutput, DrvHashCache,
};
use drover::store_path::{StoreDir, StorePath};
use serde_json::Value;

use crate::nix_env::{corpus_dir, TestRoot};
use crate::require_nix;

/// Every `.drv` of the corpus closure: path → (file bytes, parsed derivation).
struct Corpus {
    root: TestRoot,
    store_dir: StoreDir,
    drvs: BTreeMap<StorePath, (Vec<u8>, Arc<Derivation>)>,
    /// The top-level attributes' `.drv` paths.
    top: Vec<StorePath>,
}

/// `nix.conf` lines for roots that build. As root with a `nixbld` group, Nix 2.8
/// builds as `nixbld1`… and afterwards kills every process of that user; each test
/// root has its own user pool, so concurrent roots pick the same user and kill each
/// other's builders ("failed due to signal 9"). Building as the caller avoids it.
const NO_BUILD_USERS: &str = "build-users-group =";

fn instantiate_corpus() -> Corpus {
    let root = TestRoot::with_conf(NO_BUILD_USERS);
    let store_dir = StoreDir::new(root.store_dir.clone()).unwrap();
    let mut top = root.instantiate(&corpus_dir().join("corpus.nix"), None);
    top.extend(root.instantiate(&corpus_dir().join("impure.nix"), None));
    let mut args = vec!["-qR"];
    args.extend(top.iter().map(String::as_str));
    let closure = root.run("nix-store", &args);
    let mut drvs = BTreeMap::new();
    for line in closure.lines().filter(|l| l.ends_with(".drv")) {
        let bytes = std::fs::read(line).unwrap();
        let drv = Derivation::from_aterm_bytes(&bytes, &store_dir)
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        drvs.insert(store_dir.parse(line).unwrap(), (bytes, Arc::new(drv)));
    }
    let top = top.iter().map(|p| store_dir.parse(p).unwrap()).collect();
    Corpus {
        root,
        store_dir,
        drvs,
        top,
    }
}

impl Corpus {
    fn read(&self, p: &StorePath) -> Result<Arc<Derivation>, DerivationError> {
        self.drvs
            .get(p)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| DerivationError::NotADrvPath(p.to_string()))
    }

    fn show_derivation(&self) -> (String, Value) {
        let mut args = vec!["show-derivation"];
        let paths: Vec<String> = self.drvs.keys().map(|p| self.store_dir.print(p)).collect();
        args.extend(paths.iter().map(String::as_str));
        let text = self.root.run("nix", &args);
        let v = serde_json::from_str(&text).unwrap();
        (text, v)
    }
}

#[test]
fn corpus_covers_every_output_kind() {
    require_nix!();
    let c = instantiate_corpus();
    assert!(c.top.len() >= 25, "{} top-level derivations", c.top.len());
    let kinds: std::collections::BTreeSet<&str> = c
        .drvs
        .values()
        .flat_map(|(_, d)| d.outputs.values().map(DerivationOutput::kind_name))
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "deferred",
            "fixed-output",
            "floating content-addressed",
            "impure",
            "input-addressed"
        ]
    );
}

#[test]
fn aterm_round_trips_byte_identically() {
    require_nix!();
    let c = instantiate_corpus();
    for (p, (bytes, drv)) in &c.drvs {
        let printed = drv.to_aterm_bytes(&c.store_dir);
        assert_eq!(
            String::from_utf8_lossy(&printed),
            String::from_utf8_lossy(bytes),
            "{p}"
        );
        // The .drv path is the text path of these bytes and references.
        let name = name_from_drv_path(p).unwrap();
        assert_eq!(&drv.drv_path(&c.store_dir, name).unwrap(), p);
    }
}

#[test]
fn json_matches_nix_show_derivation() {
    require_nix!();
    let c = instantiate_corpus();
    let (text, nix) = c.show_derivation();
    let mut all = serde_json::Map::new();
    for (p, (_, drv)) in &c.drvs {
        let ours = to_json(p, drv, &c.store_dir);
        let key = c.store_dir.print(p);
        assert_eq!(ours[&key], nix[&key], "{p}");
        all.insert(key, to_json_value(drv, &c.store_dir));
    }
    // Same text, byte for byte (Nix prints the paths sorted, then a newline).
    assert_eq!(to_nix_json_string(&Value::Object(all)) + "\n", text);
    // And back: the whole map parses to the same derivations.
    let parsed = from_json_map(&nix, &c.store_dir).unwrap();
    for (p, (_, drv)) in &c.drvs {
        assert_eq!(&parsed[p], drv.as_ref(), "{p}");
    }
}

/// Removes every output `path` and blanks (or removes) the output variables.
fn strip_paths(v: &Value, remove_env: bool) -> Value {
    let mut v = v.clone();
    let names: Vec<String> = v["outputs"].as_object().unwrap().keys().cloned().collect();
    for o in &names {
        v["outputs"][o].as_object_mut().unwrap().remove("path");
        let env = v["env"].as_object_mut().unwrap();
        if remove_env {
            env.remove(o);
        } else if env.contains_key(o) {
            env.insert(o.clone(), Value::from(""));
        }
    }
    v
}

#[test]
fn json_without_paths_gives_the_same_outputs_and_drv_path() {
    require_nix!();
    let c = instantiate_corpus();
    let (_, nix) = c.show_derivation();
    let mut cache = DrvHashCache::new();
    for (p, (_, drv)) in &c.drvs {
        let key = c.store_dir.print(p);
        for remove_env in [false, true] {
            let stripped = strip_paths(&nix[&key], remove_env);
            // Structured-attrs derivations have no env.name: give the name then.
            let given = drover::derivation::json::name_from_json(&stripped)
                .is_none()
                .then(|| name_from_drv_path(p).unwrap());
            let (name, parsed) = from_json(&stripped, &c.store_dir, given).unwrap();
            assert_eq!(name, name_from_drv_path(p).unwrap());
            let filled = parsed
                .with_output_paths(&c.store_dir, &name, |i| {
                    cache.hash_of(&c.store_dir, i, |q| c.read(q))
                })
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(&filled, drv.as_ref(), "{p} (remove_env: {remove_env})");
            assert_eq!(filled.drv_path(&c.store_dir, &name).unwrap(), *p);
        }
        // The complete derivation checks out as it is.
        drv.verify_output_paths(&c.store_dir, name_from_drv_path(p).unwrap(), |i| {
            cache.hash_of(&c.store_dir, i, |q| c.read(q))
        })
        .unwrap_or_else(|e| panic!("{p}: {e}"));
    }
}

#[test]
fn tampered_output_paths_are_rejected() {
    require_nix!();
    let c = instantiate_corpus();
    let (_, nix) = c.show_derivation();
    let other = format!(
        "{}/00000000000000000000000000000000-other",
        c.store_dir.as_str()
    );
    let mut cache = DrvHashCache::new();
    let mut checked = 0;
    for (p, (_, drv)) in &c.drvs {
        let key = c.store_dir.print(p);
        let name = name_from_drv_path(p).unwrap();
        let Some((o, _)) = drv.outputs.iter().find(|(_, o)| o.path().is_some()) else {
            continue;
        };
        // A wrong output path.
        let mut v = nix[&key].clone();
        v["outputs"][o]["path"] = Value::from(other.clone());
        let (_, parsed) = from_json(&v, &c.store_dir, Some(name)).unwrap();
        let err = parsed
            .with_output_paths(&c.store_dir, name, |i| {
                cache.hash_of(&c.store_dir, i, |q| c.read(q))
            })
            .unwrap_err();
        assert_eq!(
            err,
            DerivationError::OutputPathMismatch {
                output: o.clone(),
                expected: c.store_dir.print(drv.outputs[o].path().unwrap()),
                given: other.clone(),
            },
            "{p}"
        );
        // A wrong output variable.
        let mut v = nix[&key].clone();
        v["env"][o] = Value::from(other.clone());
        let (_, parsed) = from_json(&v, &c.store_dir, Some(name)).unwrap();
        let err = parsed
            .with_output_paths(&c.store_dir, name, |i| {
                cache.hash_of(&c.store_dir, i, |q| c.read(q))
            })
            .unwrap_err();
        assert!(
            matches!(err, DerivationError::OutputEnvMismatch { ref output, .. } if output == o),
            "{p}: {err}"
        );
        checked += 1;
    }
    assert!(checked > 15, "{checked}");
}

#[test]
fn realised_corpus_matches_static_output_hashes_and_paths() {
    require_nix!();
    let c = instantiate_corpus();
    // Only corpus.nix: Nix 2.8 cannot `nix-store --realise` impure derivations.
    let top: Vec<String> = c
        .top
        .iter()
        .filter(|p| !p.name().starts_with("impure"))
        .map(|p| c.store_dir.print(p))
        .collect();
    let args: Vec<&str> = top.iter().map(String::as_str).collect();
    let built: std::collections::BTreeSet<String> = c.root.realise(&args).into_iter().collect();

    // With ca-derivations enabled, Nix 2.8 registers a realisation for every built
    // output (input-addressed and fixed-output too), keyed by the static (masked)
    // hash modulo.
    let db = rusqlite::Connection::open_with_flags(
        c.root.state_dir.join("db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db
        .prepare(
            "select r.drvPath, r.outputName, v.path from Realisations r \
             join ValidPaths v on v.id = r.outputPath",
        )
        .unwrap();
    let realisations: BTreeMap<String, String> = stmt
        .query_map([], |row| {
            Ok((
                format!("{}!{}", row.get::<_, String>(0)?, row.get::<_, String>(1)?),
                row.get::<_, String>(2)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();

    let mut cache = DrvHashCache::new();
    let mut checked = 0;
    for (p, (_, drv)) in &c.drvs {
        if drv.derivation_type().unwrap() == drover::derivation::DerivationType::Impure {
            continue;
        }
        let hashes = drv
            .static_output_hashes(&c.store_dir, |i| {
                cache.hash_of(&c.store_dir, i, |q| c.read(q))
            })
            .unwrap();
        for (o, h) in hashes {
            let id = drover::realisation::DrvOutput {
                drv_hash: h,
                output: o.clone(),
            }
            .to_string();
            let out_path = realisations
                .get(&id)
                .unwrap_or_else(|| panic!("{p}: no realisation {id}"));
            if let Some(static_path) = drv.outputs[&o].path() {
                assert_eq!(*out_path, c.store_dir.print(static_path), "{p}!{o}");
            }
            checked += 1;
        }
        for o in drv.outputs.values() {
            if let Some(sp) = o.path() {
                assert!(c.store_dir.to_path_buf(sp).exists(), "{p}: {sp} not built");
            }
        }
    }
    assert!(checked >= 27, "{checked}");
    assert!(built.len() >= 25);
}

#[test]
fn resolved_deferred_derivation_is_the_one_nix_writes() {
    require_nix!();
    let c = instantiate_corpus();
    let deferred = c
        .top
        .iter()
        .find(|p| p.name() == "deferred.drv")
        .unwrap()
        .clone();
    let out = c.root.realise(&[&c.store_dir.print(&deferred)]);
    let drv = &c.drvs[&deferred].1;
    let name = name_from_drv_path(&deferred).unwrap();

    // The paths of the floating inputs' outputs come from the realisations Nix
    // registered, looked up by the inputs' static hashes.
    let mut cache = DrvHashCache::new();
    let lookup_db = rusqlite::Connection::open_with_flags(
        c.root.state_dir.join("db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let resolved = drv
        .try_resolve(&c.store_dir, name, |input, o| {
            let h = c.drvs[input]
                .1
                .static_output_hashes(&c.store_dir, |i| {
                    cache.hash_of(&c.store_dir, i, |q| c.read(q))
                })
                .ok()?;
            let id = format!(
                "{}",
                drover::realisation::DrvOutput {
                    drv_hash: h[o].clone(),
                    output: o.to_owned(),
                }
            );
            let (hash, output) = id.split_once('!').unwrap();
            let path: String = lookup_db
                .query_row(
                    "select v.path from Realisations r join ValidPaths v on v.id = r.outputPath \
                     where r.drvPath = ? and r.outputName = ?",
                    [hash, output],
                    |row| row.get(0),
                )
                .ok()?;
            c.store_dir.parse(&path).ok()
        })
        .unwrap()
        .expect("all inputs are built");
    assert!(resolved.input_drvs.is_empty());
    assert_eq!(resolved.input_srcs.len(), 2);
    // Nix wrote the resolved derivation to the store, and built its output.
    let resolved_path = resolved.drv_path(&c.store_dir, name).unwrap();
    let on_disk = std::fs::read(c.store_dir.to_path_buf(&resolved_path))
        .unwrap_or_else(|e| panic!("{resolved_path} not in the store: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&on_disk),
        String::from_utf8_lossy(&resolved.to_aterm_bytes(&c.store_dir))
    );
    assert_eq!(
        c.store_dir.print(resolved.outputs["out"].path().unwrap()),
        out[0]
    );
}
