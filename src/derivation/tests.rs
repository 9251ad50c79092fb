//! Unit tests of derivations: golden vectors written by Nix 2.8 (`tests/data/drv`),
//! hand-written negative cases, and property tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::Value;

use super::json::{from_json, to_json, to_json_value, to_nix_json_string};
use super::*;
use crate::content_address::FileIngestionMethod;
use crate::hash::Hash;

const GOLDEN_STORE: &str = "/tmp/drover-golden/store";

fn sd() -> StoreDir {
    StoreDir::new(GOLDEN_STORE).unwrap()
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/drv")
}

/// Every golden `.drv`: path → (bytes, derivation, show-derivation JSON text).
fn golden() -> BTreeMap<StorePath, (Vec<u8>, Arc<Derivation>, String)> {
    let mut res = BTreeMap::new();
    for e in std::fs::read_dir(golden_dir()).unwrap() {
        let p = e.unwrap().path();
        let file = p.file_name().unwrap().to_str().unwrap().to_owned();
        if !file.ends_with(".drv") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let drv =
            Derivation::from_aterm_bytes(&bytes, &sd()).unwrap_or_else(|e| panic!("{file}: {e}"));
        let json = std::fs::read_to_string(p.with_file_name(format!("{file}.json"))).unwrap();
        res.insert(
            StorePath::from_base_name(&file).unwrap(),
            (bytes, Arc::new(drv), json),
        );
    }
    assert!(res.len() >= 26);
    res
}

fn golden_named(name: &str) -> (StorePath, Vec<u8>, Arc<Derivation>) {
    let (p, (b, d, _)) = golden()
        .into_iter()
        .find(|(p, _)| p.name() == format!("{name}.drv"))
        .unwrap();
    (p, b, d)
}

#[test]
fn golden_round_trip_json_and_drv_path() {
    let all = golden();
    for (p, (bytes, drv, json)) in &all {
        assert_eq!(drv.to_aterm_bytes(&sd()), *bytes, "{p}");
        let v = to_json(p, drv, &sd());
        assert_eq!(to_nix_json_string(&v) + "\n", *json, "{p}");
        let nix: Value = serde_json::from_str(json).unwrap();
        assert_eq!(v, nix);
        let name = name_from_drv_path(p).unwrap();
        let (_, back) = from_json(&to_json_value(drv, &sd()), &sd(), Some(name)).unwrap();
        assert_eq!(back, **drv, "{p}");
        assert_eq!(drv.drv_path(&sd(), name).unwrap(), *p);
    }
}

fn read_golden(
    all: &BTreeMap<StorePath, (Vec<u8>, Arc<Derivation>, String)>,
) -> impl FnMut(&StorePath) -> Result<Arc<Derivation>, DerivationError> + '_ {
    |p| {
        all.get(p)
            .map(|(_, d, _)| d.clone())
            .ok_or_else(|| DerivationError::NotADrvPath(p.to_string()))
    }
}

#[test]
fn golden_output_paths_are_recomputed() {
    let all = golden();
    let mut cache = DrvHashCache::new();
    for (p, (_, drv, _)) in &all {
        let name = name_from_drv_path(p).unwrap();
        let mut stripped = (**drv).clone();
        for (o, out) in stripped.outputs.iter_mut() {
            if let DerivationOutput::InputAddressed { .. } = out {
                *out = DerivationOutput::Deferred;
            }
            stripped.env.remove(o);
        }
        let filled = stripped
            .with_output_paths(&sd(), name, |i| cache.hash_of(&sd(), i, read_golden(&all)))
            .unwrap();
        assert_eq!(filled, **drv, "{p}");
    }
}

#[test]
fn hash_kinds_and_placeholders() {
    let all = golden();
    let mut cache = DrvHashCache::new();
    let mut kind_of = |name: &str| {
        let (p, _, _) = golden_named(name);
        cache.hash_of(&sd(), &p, read_golden(&all)).unwrap()
    };
    assert_eq!(kind_of("simple").kind, DrvHashKind::Regular);
    assert_eq!(kind_of("fod-recursive").kind, DrvHashKind::Regular);
    assert_eq!(kind_of("ca-floating").kind, DrvHashKind::Deferred);
    assert_eq!(kind_of("deferred").kind, DrvHashKind::Deferred);
    let impure = kind_of("impure-flat");
    assert_eq!(impure.kind, DrvHashKind::Deferred);
    assert_eq!(impure.hashes["bin"], impure_output_hash());
    // `printf impure | sha256sum`
    assert_eq!(
        impure_output_hash().encode(crate::hash::Encoding::Base16),
        "ddffc26775f61118da8597d1f2f62c544ec92461b31b5b1075ed8689a7ee8292"
    );
    // From the Nix manual (builtins.placeholder) and the golden env values.
    assert_eq!(
        hash_placeholder("out"),
        "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
    );
    let (_, _, floating) = golden_named("ca-floating-multi");
    assert_eq!(floating.env["lib"], hash_placeholder("lib"));
    // The deferred derivation's builder refers to its inputs by downstream placeholder.
    let (_, _, deferred) = golden_named("deferred");
    let (ca, _, _) = golden_named("ca-floating");
    let ph = downstream_placeholder(&ca, "out").unwrap();
    assert!(
        deferred.args[1].contains(&ph),
        "{ph} in {:?}",
        deferred.args
    );
}

#[test]
fn fixed_output_hash_modulo_ignores_the_builder() {
    let (_, _, fod) = golden_named("fod-flat-sha256");
    let mut other = (*fod).clone();
    other.args = vec!["-c".into(), "something else".into()];
    let h1 = fod
        .hash_derivation_modulo(&sd(), false, |_| -> Result<DrvHash, DerivationError> {
            unreachable!()
        })
        .unwrap();
    let h2 = other
        .hash_derivation_modulo(&sd(), false, |_| -> Result<DrvHash, DerivationError> {
            unreachable!()
        })
        .unwrap();
    assert_eq!(h1, h2);
    let expected = format!(
        "fixed:out:sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824:{}",
        sd().print(fod.outputs["out"].path().unwrap())
    );
    assert_eq!(h1.hashes["out"], HashAlgo::Sha256.digest(expected));
}

// ---- negative cases ----

const SIMPLE: &str = r#"Derive([("out","/tmp/drover-golden/store/00000000000000000000000000000000-x","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo"],[("a","1"),("out","/tmp/drover-golden/store/00000000000000000000000000000000-x")])"#;

fn parse(s: &str) -> Result<Derivation, DerivationError> {
    Derivation::from_aterm_bytes(s.as_bytes(), &sd())
}

#[test]
fn simple_parses() {
    let d = parse(SIMPLE).unwrap();
    assert_eq!(d.to_aterm_bytes(&sd()), SIMPLE.as_bytes());
}

#[test]
fn trailing_garbage() {
    assert_eq!(
        parse(&format!("{SIMPLE}\n")),
        Err(DerivationError::TrailingGarbage {
            offset: SIMPLE.len(),
            len: 1
        })
    );
}

#[test]
fn every_truncation_fails() {
    for i in 0..SIMPLE.len() {
        let e = parse(&SIMPLE[..i]).unwrap_err();
        assert!(
            matches!(e, DerivationError::Truncated { offset, .. } if offset == i),
            "{i}: {e}"
        );
    }
}

#[test]
fn bad_escape() {
    let s = SIMPLE.replace(r#"["-c","echo"]"#, r#"["-c","ec\ho"]"#);
    let off = s.find(r"\h").unwrap();
    assert_eq!(
        parse(&s),
        Err(DerivationError::BadEscape {
            offset: off,
            found: "h".into()
        })
    );
}

#[test]
fn escapes_are_decoded() {
    let s = SIMPLE.replace(r#"["-c","echo"]"#, r#"["-c","a\"b\\c\nd\re\tf"]"#);
    let d = parse(&s).unwrap();
    assert_eq!(d.args[1], "a\"b\\c\nd\re\tf");
    assert_eq!(d.to_aterm_bytes(&sd()), s.as_bytes());
}

#[test]
fn invalid_store_paths() {
    let s = SIMPLE.replacen("/tmp/drover-golden/store/0000", "/nix/store/0000", 1);
    assert!(matches!(
        parse(&s),
        Err(DerivationError::InvalidStorePath { ref at, .. }) if at == "ATerm, byte 15"
    ));
    let s = SIMPLE.replace(
        r#"[],[],"x86"#,
        r#"[],["/tmp/drover-golden/store/bad"],"x86"#,
    );
    assert!(matches!(
        parse(&s),
        Err(DerivationError::InvalidStorePath { .. })
    ));
}

#[test]
fn duplicate_and_unsorted_keys() {
    let s = SIMPLE.replace(r#"[("a","1"),"#, r#"[("a","1"),("a","2"),"#);
    assert!(matches!(
        parse(&s),
        Err(DerivationError::DuplicateKey { what: "environment variables", ref key, .. }) if key == "a"
    ));
    let s = SIMPLE.replace(r#"[("a","1"),"#, r#"[("b","1"),("a","2"),"#);
    assert!(matches!(
        parse(&s),
        Err(DerivationError::Unsorted { ref key, ref previous, .. }) if key == "a" && previous == "b"
    ));
    let src = "/tmp/drover-golden/store/00000000000000000000000000000000-s";
    let s = SIMPLE.replace(r#"[],[],"x86"#, &format!(r#"[],["{src}","{src}"],"x86"#));
    assert!(matches!(
        parse(&s),
        Err(DerivationError::DuplicateKey {
            what: "input sources",
            ..
        })
    ));
}

#[test]
fn not_utf8() {
    let mut b = SIMPLE.as_bytes().to_vec();
    let i = SIMPLE.find("echo").unwrap();
    b[i] = 0xff;
    assert_eq!(
        Derivation::from_aterm_bytes(&b, &sd()),
        Err(DerivationError::NotUtf8 { offset: i })
    );
}

#[test]
fn bad_outputs() {
    let p = "/tmp/drover-golden/store/00000000000000000000000000000000-x";
    let with = |o: &str| SIMPLE.replacen(&format!(r#"("out","{p}","","")"#), o, 1);
    for (o, what) in [
        (format!(r#"("out","{p}","sha256","sha256:abc")"#), "prefix"),
        (format!(r#"("out","{p}","sha256","")"#), "floating"),
        (r#"("out","","sha256","2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")"#.into(), "no path"),
        (format!(r#"("out","{p}","","abc")"#), "no hash algorithm"),
        (format!(r#"("out","{p}","foo","abc")"#), "bad hash algorithm"),
        (format!(r#"("out","{p}","sha256","abc")"#), "bad hash"),
        (format!(r#"("out","{p}","text:sha1","aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d")"#), "text hashing needs sha256"),
    ] {
        let e = parse(&with(&o)).unwrap_err();
        assert!(
            matches!(&e, DerivationError::InvalidOutput { reason, .. } if reason.contains(what)),
            "{o}: {e}"
        );
    }
}

fn out(path: Option<&str>) -> DerivationOutput {
    match path {
        Some(p) => DerivationOutput::InputAddressed {
            path: StorePath::from_base_name(p).unwrap(),
        },
        None => DerivationOutput::Deferred,
    }
}

#[test]
fn derivation_type_errors() {
    let fixed = DerivationOutput::CAFixed {
        ca: ContentAddress::Fixed(FileIngestionMethod::Flat, HashAlgo::Sha256.digest(b"")),
        path: StorePath::from_base_name("00000000000000000000000000000000-x").unwrap(),
    };
    let floating = |algo| DerivationOutput::CAFloating {
        method: ContentAddressMethod::Fixed(FileIngestionMethod::Recursive),
        algo,
    };
    let drv = |outs: Vec<(&str, DerivationOutput)>| Derivation {
        outputs: outs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..Default::default()
    };
    assert_eq!(
        drv(vec![]).derivation_type(),
        Err(DerivationError::NoOutputs)
    );
    assert_eq!(
        drv(vec![
            ("out", out(None)),
            ("dev", floating(HashAlgo::Sha256))
        ])
        .derivation_type(),
        Err(DerivationError::MixedOutputTypes(
            "floating, deferred".into()
        ))
    );
    assert_eq!(
        drv(vec![("out", fixed.clone()), ("dev", fixed.clone())]).derivation_type(),
        Err(DerivationError::MultipleFixedOutputs(2))
    );
    assert_eq!(
        drv(vec![("bin", fixed)]).derivation_type(),
        Err(DerivationError::FixedOutputNotOut("bin".into()))
    );
    assert!(matches!(
        drv(vec![
            ("a", floating(HashAlgo::Sha256)),
            ("b", floating(HashAlgo::Sha1))
        ])
        .derivation_type(),
        Err(DerivationError::FloatingAlgoMismatch { .. })
    ));
    assert_eq!(
        drv(vec![("out", out(None))]).derivation_type(),
        Ok(DerivationType::InputAddressed { deferred: true })
    );
}

#[test]
fn drv_name_helpers() {
    let p = StorePath::from_base_name("00000000000000000000000000000000-hello.drv").unwrap();
    assert_eq!(name_from_drv_path(&p), Ok("hello"));
    let p = StorePath::from_base_name("00000000000000000000000000000000-hello").unwrap();
    assert!(matches!(
        name_from_drv_path(&p),
        Err(DerivationError::NotADrvPath(_))
    ));
}

#[test]
fn json_errors() {
    let (_, _, simple) = golden_named("simple");
    let good = to_json_value(&simple, &sd());
    let check = |f: &dyn Fn(&mut Value), field: &str| {
        let mut v = good.clone();
        f(&mut v);
        match from_json(&v, &sd(), None) {
            Err(DerivationError::Json { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    };
    check(
        &|v| drop(v.as_object_mut().unwrap().remove("system")),
        "system",
    );
    check(&|v| v["args"] = Value::from(1), "args");
    check(&|v| v["args"][0] = Value::from(1), "args[0]");
    check(&|v| v["env"]["x"] = Value::Null, "env.x");
    check(&|v| v["bogus"] = Value::from(1), "bogus");
    check(
        &|v| v["outputs"]["out"]["colour"] = Value::from(1),
        "outputs.out.colour",
    );
    check(
        &|v| v["outputs"]["out"]["impure"] = Value::from("yes"),
        "outputs.out.impure",
    );
    let mut v = good.clone();
    v["outputs"]["out"]["path"] = Value::from("/elsewhere/x");
    assert!(matches!(
        from_json(&v, &sd(), None),
        Err(DerivationError::InvalidStorePath { .. })
    ));
    let mut v = good.clone();
    v["env"].as_object_mut().unwrap().remove("name");
    assert_eq!(
        from_json(&v, &sd(), None),
        Err(DerivationError::MissingName)
    );
    assert!(from_json(&Value::from(3), &sd(), None).is_err());
}

#[test]
fn from_json_with_paths_computes_the_drv_path() {
    let all = golden();
    let (p, _, uses_fod) = golden_named("uses-fod");
    let mut v = to_json_value(&uses_fod, &sd());
    v["outputs"]["out"].as_object_mut().unwrap().remove("path");
    v["env"]["out"] = Value::from("");
    let mut cache = DrvHashCache::new();
    let (drv_path, drv) = super::json::from_json_with_paths(&v, &sd(), |i| {
        cache.hash_of(&sd(), i, read_golden(&all))
    })
    .unwrap();
    assert_eq!(drv_path, p);
    assert_eq!(drv, *uses_fod);
}

#[test]
fn json_top_level_name_wins() {
    let (_, _, simple) = golden_named("simple");
    let mut v = to_json_value(&simple, &sd());
    v["name"] = Value::from("renamed");
    let (name, drv) = from_json(&v, &sd(), None).unwrap();
    assert_eq!(name, "renamed");
    assert_eq!(drv, *simple);
}

#[test]
fn nix_json_layout() {
    let v: Value =
        serde_json::from_str(r#"{"a":{},"b":[],"c":["\u0001\b\f\n\r\t\"\\é"],"d":true}"#).unwrap();
    assert_eq!(
        to_nix_json_string(&v),
        "{\n  \"a\": {},\n  \"b\": [],\n  \"c\": [\n    \"\\u0001\\u0008\\u000c\\n\\r\\t\\\"\\\\é\"\n  ],\n  \"d\": true\n}"
    );
}

#[test]
fn tampered_fixed_output_path() {
    let (p, _, fod) = golden_named("fod-recursive");
    let mut d = (*fod).clone();
    let other = StorePath::from_base_name("00000000000000000000000000000000-x").unwrap();
    if let Some(DerivationOutput::CAFixed { path, .. }) = d.outputs.get_mut("out") {
        *path = other;
    }
    let e = d
        .verify_output_paths(&sd(), name_from_drv_path(&p).unwrap(), |_| {
            Err::<DrvHash, _>(DerivationError::MissingName)
        })
        .unwrap_err();
    assert!(matches!(e, DerivationError::OutputPathMismatch { ref output, .. } if output == "out"));
}

#[test]
fn deferred_and_floating_outputs_are_not_checked_as_nix_does() {
    // As the `-env` derivation `nix-shell` writes for a content-addressed one:
    // a deferred output whose variable is a placeholder, not "".
    let d = Derivation {
        outputs: [
            ("out".to_owned(), DerivationOutput::Deferred),
            (
                "dev".to_owned(),
                DerivationOutput::CAFloating {
                    method: crate::content_address::ContentAddressMethod::Fixed(
                        FileIngestionMethod::Recursive,
                    ),
                    algo: crate::hash::HashAlgo::Sha256,
                },
            ),
        ]
        .into(),
        env: [
            (
                "out".to_owned(),
                "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9".to_owned(),
            ),
            ("dev".to_owned(), "anything".to_owned()),
        ]
        .into(),
        ..Default::default()
    };
    d.verify_output_paths(&sd(), "x", |_| {
        Err::<DrvHash, _>(DerivationError::MissingName)
    })
    .unwrap();
}

#[test]
fn cache_detects_cycles() {
    let a = StorePath::from_base_name("00000000000000000000000000000000-a.drv").unwrap();
    let b = StorePath::from_base_name("11111111111111111111111111111111-b.drv").unwrap();
    let mk = |dep: &StorePath| {
        Arc::new(Derivation {
            outputs: [("out".to_owned(), DerivationOutput::Deferred)].into(),
            input_drvs: [(dep.clone(), BTreeSet::from(["out".to_owned()]))].into(),
            ..Default::default()
        })
    };
    let (da, db) = (mk(&b), mk(&a));
    let e = DrvHashCache::new()
        .hash_of(&sd(), &a, |p| {
            Ok::<_, DerivationError>(if *p == a { da.clone() } else { db.clone() })
        })
        .unwrap_err();
    assert!(matches!(e, DerivationError::Cycle(_)));
}

// ---- property tests ----

fn arb_store_path(suffix: &'static str) -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9+._?=-]{1,20}")
        .prop_map(move |(d, n)| StorePath::from_digest(&d, &format!("{n}{suffix}")).unwrap())
}

fn arb_hash() -> impl Strategy<Value = Hash> {
    (
        prop_oneof![
            Just(HashAlgo::Md5),
            Just(HashAlgo::Sha1),
            Just(HashAlgo::Sha256),
            Just(HashAlgo::Sha512)
        ],
        any::<[u8; 64]>(),
    )
        .prop_map(|(a, d)| Hash::new(a, &d[..a.size()]).unwrap())
}

fn arb_method() -> impl Strategy<Value = ContentAddressMethod> {
    prop_oneof![
        Just(ContentAddressMethod::Fixed(FileIngestionMethod::Flat)),
        Just(ContentAddressMethod::Fixed(FileIngestionMethod::Recursive)),
        Just(ContentAddressMethod::Text),
    ]
}

fn arb_output() -> impl Strategy<Value = DerivationOutput> {
    prop_oneof![
        arb_store_path("").prop_map(|path| DerivationOutput::InputAddressed { path }),
        (arb_hash(), any::<bool>(), arb_store_path("")).prop_map(|(h, rec, path)| {
            let m = if rec {
                FileIngestionMethod::Recursive
            } else {
                FileIngestionMethod::Flat
            };
            DerivationOutput::CAFixed {
                ca: ContentAddress::Fixed(m, h),
                path,
            }
        }),
        (any::<[u8; 32]>(), arb_store_path("")).prop_map(|(d, path)| DerivationOutput::CAFixed {
            ca: ContentAddress::Text(Hash::new(HashAlgo::Sha256, &d).unwrap()),
            path,
        }),
        (arb_method(), arb_hash()).prop_map(|(method, h)| DerivationOutput::CAFloating {
            method,
            algo: h.algo()
        }),
        Just(DerivationOutput::Deferred),
        (arb_method(), arb_hash()).prop_map(|(method, h)| DerivationOutput::Impure {
            method,
            algo: h.algo()
        }),
    ]
}

prop_compose! {
    fn arb_derivation()(
        outputs in prop::collection::btree_map("[a-z]{1,6}", arb_output(), 0..4),
        input_drvs in prop::collection::btree_map(
            arb_store_path(".drv"),
            prop::collection::btree_set("[a-z]{1,6}", 0..3),
            0..3,
        ),
        input_srcs in prop::collection::btree_set(arb_store_path(""), 0..3),
        system in "[^\"\\\\]{0,12}",
        builder in ".{0,12}",
        args in prop::collection::vec(".{0,12}", 0..4),
        env in prop::collection::btree_map(".{0,8}", ".{0,16}", 0..5),
    ) -> Derivation {
        Derivation { outputs, input_drvs, input_srcs, system, builder, args, env }
    }
}

proptest! {
    #[test]
    fn aterm_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Derivation::from_aterm_bytes(&bytes, &sd());
        let mut prefixed = b"Derive([".to_vec();
        prefixed.extend(&bytes);
        let _ = Derivation::from_aterm_bytes(&prefixed, &sd());
    }

    #[test]
    fn mutated_aterm_never_panics(i in 0usize..SIMPLE.len(), b in any::<u8>(), cut in any::<bool>()) {
        let mut bytes = SIMPLE.as_bytes().to_vec();
        if cut { bytes.remove(i); } else { bytes[i] = b; }
        let _ = Derivation::from_aterm_bytes(&bytes, &sd());
    }

    #[test]
    fn json_parser_never_panics(s in ".{0,200}") {
        if let Ok(v) = serde_json::from_str::<Value>(&s) {
            let _ = from_json(&v, &sd(), None);
        }
    }

    #[test]
    fn mutated_json_never_panics(key in "[a-zA-Z]{0,10}", val in prop_oneof![
        Just(Value::Null), any::<bool>().prop_map(Value::from), ".{0,20}".prop_map(Value::from),
        Just(serde_json::json!({})), Just(serde_json::json!([])), Just(serde_json::json!(["x"]))
    ], target in 0usize..4) {
        let (_, _, fod) = golden_named("fod-flat-sha1");
        let mut v = to_json_value(&fod, &sd());
        match target {
            0 => v[&key] = val,
            1 => v["outputs"]["out"][&key] = val,
            2 => v["outputs"][&key] = val,
            _ => v["env"][&key] = val,
        }
        let _ = from_json(&v, &sd(), None);
    }

    #[test]
    fn generated_derivations_round_trip(drv in arb_derivation()) {
        let bytes = drv.to_aterm_bytes(&sd());
        let back = Derivation::from_aterm_bytes(&bytes, &sd());
        prop_assert_eq!(back.as_ref(), Ok(&drv));
        let (_, back) = from_json(&to_json_value(&drv, &sd()), &sd(), Some("n")).unwrap();
        prop_assert_eq!(back, drv);
    }
}
