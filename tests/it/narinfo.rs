//! Interop of narinfo files, signing keys and realisations with real Nix 2.8.
//!
//! Nix builds three small derivations (`a`, referring to itself; `b`, referring to
//! `a`; `c`, a floating content-addressed derivation referring to `b` and itself) and `nix copy`s them to `file://`
//! binary caches. drover must read and print those narinfo files byte-identically,
//! verify and reproduce Nix's signatures, and produce signatures Nix accepts.

use std::path::{Path, PathBuf};
use std::process::Output;

use drover::narinfo::{NarInfo, MAX_SIGS};
use drover::realisation::Realisation;
use drover::signature::{PublicKey, PublicKeys, SecretKey};
use drover::store_path::StoreDir;

use crate::nix_env::TestRoot;
use crate::require_nix;

const EXPR: &str = r#"
rec {
  a = derivation { name = "a"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo hi $out > $out"]; };
  b = derivation { name = "b"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo ${a} > $out"]; };
  c = derivation { name = "c"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo ${b} $out > $out"];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
}
"#;

/// Output paths of a, b and c after building them in `root`.
struct Built {
    expr: PathBuf,
    outs: Vec<String>,
}

/// Roots for these tests. As root, Nix 2.8 builds as `nixbld1` (uid 999) in every
/// test root and kills all of that uid's processes after each build, killing
/// concurrent builds of other roots; `build-users-group =` builds as the caller.
fn new_root(extra: &str) -> TestRoot {
    TestRoot::with_conf(&format!("build-users-group =\n{extra}"))
}

fn build(root: &TestRoot) -> Built {
    let expr = root.path().join("t.nix");
    std::fs::write(&expr, EXPR).unwrap();
    let drvs = root.instantiate(&expr, None);
    assert_eq!(drvs.len(), 3, "{drvs:?}");
    let drvs: Vec<&str> = drvs.iter().map(String::as_str).collect();
    let outs = root.realise(&drvs);
    assert_eq!(outs.len(), 3, "{outs:?}");
    Built { expr, outs }
}

fn output(root: &TestRoot, program: &str, args: &[&str]) -> Output {
    root.cmd(program)
        .env("XDG_CACHE_HOME", root.path().join("xdg-cache"))
        .args(args)
        .output()
        .unwrap()
}

fn run(root: &TestRoot, program: &str, args: &[&str]) -> String {
    let out = output(root, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `nix copy`s the closure of `c` (with its realisations) to `cache` with these URL
/// parameters.
fn copy_to(root: &TestRoot, built: &Built, cache: &Path, params: &str) {
    let url = format!("file://{}?{params}", cache.display());
    run(
        root,
        "nix",
        &[
            "copy",
            "--to",
            &url,
            "-f",
            built.expr.to_str().unwrap(),
            "c",
        ],
    );
}

fn narinfos(cache: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .collect();
    v.sort();
    v
}

fn realisations(cache: &Path) -> Vec<PathBuf> {
    let dir = cache.join("realisations");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[test]
fn nix_copy_narinfos_round_trip_and_signatures_match() {
    require_nix!();
    let root = new_root("");
    let built = build(&root);
    let sd = StoreDir::new(root.store_dir.clone()).unwrap();
    let sec = root.path().join("sec");
    let pubk = root.path().join("pub");
    run(
        &root,
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "test-cache-1",
            sec.to_str().unwrap(),
            pubk.to_str().unwrap(),
        ],
    );
    // Key files as Nix writes them: `name:base64`, no trailing newline.
    let secret = SecretKey::parse(&read(&sec)).unwrap();
    assert_eq!(secret.to_key_file(), read(&sec));
    let public = PublicKey::parse(&read(&pubk)).unwrap();
    assert_eq!(public.to_string(), read(&pubk));
    assert_eq!(secret.to_public_key(), public);
    let trusted: PublicKeys = [public].into_iter().collect();
    let impostor: PublicKeys = [SecretKey::generate("test-cache-1").unwrap().to_public_key()]
        .into_iter()
        .collect();

    for (compression, ext) in [
        ("xz", ".nar.xz"),
        ("zstd", ".nar.zst"),
        ("bzip2", ".nar.bz2"),
        ("none", ".nar"),
    ] {
        let cache = root.path().join(format!("cache-{compression}"));
        copy_to(
            &root,
            &built,
            &cache,
            &format!("secret-key={}&compression={compression}", sec.display()),
        );
        let files = narinfos(&cache);
        assert_eq!(files.len(), 3, "{compression}");
        let mut seen_ca = false;
        for f in &files {
            let text = read(f);
            let ni = NarInfo::parse(&text, &sd).unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!(ni.to_string(&sd), text, "{f:?}");
            assert_eq!(ni.compression, compression);
            assert!(ni.url.ends_with(ext), "{}", ni.url);
            assert!(cache.join(&ni.url).is_file(), "{}", ni.url);
            assert!(built.outs.contains(&sd.print(&ni.store_path)));
            seen_ca |= ni.ca.is_some();
            let self_ref = ni.references.contains(&ni.store_path);
            assert_eq!(self_ref, ni.store_path.name() != "b", "{text}");
            // Only the floating CA output is trusted for its CA field alone.
            assert_eq!(ni.is_content_addressed(&sd), ni.ca.is_some(), "{text}");
            assert_eq!(
                ni.check_signatures(&sd, &impostor),
                Ok(if ni.ca.is_some() { MAX_SIGS } else { 0 })
            );

            assert_eq!(ni.valid_signatures(&sd, &trusted), Ok(1), "{f:?}");
            assert_eq!(ni.valid_signatures(&sd, &impostor), Ok(0), "{f:?}");
            assert_eq!(ni.valid_signatures(&sd, &PublicKeys::new()), Ok(0));

            let mut unsigned = ni.clone();
            unsigned.signatures.clear();
            unsigned.sign(&sd, &secret).unwrap();
            assert_eq!(unsigned.signatures, ni.signatures, "{f:?}");
            assert_eq!(unsigned.to_string(&sd), text);
        }
        assert!(seen_ca, "the floating CA output has a CA field");

        let dois = realisations(&cache);
        assert!(!dois.is_empty(), "{compression}: no realisations");
        for d in dois {
            let text = read(&d);
            let r = Realisation::from_json(text.as_bytes()).unwrap();
            assert_eq!(r.to_json(), text, "{d:?}");
            let name = d.file_name().unwrap().to_str().unwrap();
            assert_eq!(name, format!("{}.doi", r.id));
            assert!(built.outs.contains(&sd.print(&r.out_path)));
        }
    }
}

#[test]
fn realisations_signed_by_nix_verify_in_drover() {
    require_nix!();
    let keydir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("realisation-key-1").unwrap();
    let sec = keydir.path().join("sec");
    std::fs::write(&sec, key.to_key_file()).unwrap();
    // With `secret-key-files`, Nix signs realisations (and path infos) as it builds.
    let root = new_root(&format!("secret-key-files = {}", sec.display()));
    let built = build(&root);
    let sd = StoreDir::new(root.store_dir.clone()).unwrap();
    let cache = root.path().join("cache");
    copy_to(&root, &built, &cache, "compression=none");
    let trusted: PublicKeys = [key.to_public_key()].into_iter().collect();
    let dois = realisations(&cache);
    assert!(!dois.is_empty());
    for d in dois {
        let text = read(&d);
        let r = Realisation::from_json(text.as_bytes()).unwrap();
        assert_eq!(r.to_json(), text);
        assert_eq!(r.signatures.len(), 1, "{text}");
        assert_eq!(
            drover::signature::check_realisation_signatures(&r, &trusted),
            Ok(1),
            "{text}"
        );
        let mut resigned = r.clone();
        resigned.signatures.clear();
        drover::signature::sign_realisation(&mut resigned, &key);
        assert_eq!(resigned, r);
    }
    // The narinfos carry the signatures Nix made at build time.
    for f in narinfos(&cache) {
        let ni = NarInfo::parse(&read(&f), &sd).unwrap();
        assert_eq!(ni.valid_signatures(&sd, &trusted), Ok(1), "{f:?}");
    }
}

/// Makes every file below `dir` writable and removes it (store paths are read-only).
fn remove_store(dir: &Path) {
    fn make_writable(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.file_type().is_symlink() {
            return;
        }
        let mut perm = meta.permissions();
        perm.set_mode(perm.mode() | 0o700);
        let _ = std::fs::set_permissions(p, perm);
        if meta.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                make_writable(&e.unwrap().path());
            }
        }
    }
    make_writable(dir);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Re-signs every narinfo in `cache` with `key` only.
fn resign(cache: &Path, sd: &StoreDir, key: &SecretKey) {
    for f in narinfos(cache) {
        let mut ni = NarInfo::parse(&read(&f), sd).unwrap();
        ni.signatures.clear();
        ni.sign(sd, key).unwrap();
        std::fs::write(&f, ni.to_string(sd)).unwrap();
    }
}

/// A fresh Nix root (new state dir, empty store) for the store dir of `src`.
fn fresh_root_for(src: &TestRoot) -> TestRoot {
    remove_store(Path::new(&src.store_dir));
    let mut fresh = new_root("");
    fresh.store_dir = src.store_dir.clone();
    fresh
}

fn substitute(root: &TestRoot, cache: &Path, key: &PublicKey, paths: &[&str]) -> Output {
    let url = format!("file://{}", cache.display());
    let key = key.to_string();
    let mut args = vec![
        "--realise",
        "--option",
        "substituters",
        &url,
        "--option",
        "trusted-public-keys",
        &key,
        "--option",
        "require-sigs",
        "true",
    ];
    args.extend(paths);
    output(root, "nix-store", &args)
}

#[test]
fn nix_accepts_cache_signed_by_drover_key_and_refuses_untrusted() {
    require_nix!();
    let src = new_root("");
    let built = build(&src);
    let sd = StoreDir::new(src.store_dir.clone()).unwrap();
    let good = src.path().join("cache-good");
    let bad = src.path().join("cache-bad");
    for cache in [&good, &bad] {
        copy_to(&src, &built, cache, "compression=xz");
        for f in narinfos(cache) {
            assert!(NarInfo::parse(&read(&f), &sd)
                .unwrap()
                .signatures
                .is_empty());
        }
    }
    let key = SecretKey::generate("drover-test-1").unwrap();
    resign(&good, &sd, &key);
    // Same key name, different key: Nix must not trust it.
    let untrusted = SecretKey::generate("drover-test-1").unwrap();
    resign(&bad, &sd, &untrusted);

    let fresh = fresh_root_for(&src);
    let outs: Vec<&str> = built.outs.iter().map(String::as_str).collect();
    let a_and_b = &outs[..2];

    let refused = substitute(&fresh, &bad, &key.to_public_key(), a_and_b);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not signed by any of the keys in 'trusted-public-keys'"),
        "{stderr}"
    );
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(!Path::new(outs[0]).exists());

    let accepted = substitute(&fresh, &good, &key.to_public_key(), &outs);
    let stderr = String::from_utf8_lossy(&accepted.stderr);
    assert!(accepted.status.success(), "{stderr}");
    assert!(!stderr.contains("building"), "{stderr}");
    let printed: Vec<String> = String::from_utf8(accepted.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(printed, built.outs);
    for p in &outs {
        assert!(Path::new(p).exists(), "{p}");
    }
}
