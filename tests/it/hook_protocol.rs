//! Interop of the build-hook wire format: a recording hook (`tests/data/hooks/record.py`)
//! run by real `nix-store --realise` saves every byte Nix 2.8 sends; drover's encoder,
//! given the same settings and request, must produce the same bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use drover::config::{Env, Settings};
use drover::hook_protocol::{
    encode_accept_follow_up, settings_preamble, Reader, TryRequest, NIX_2_8_HOOK_SETTINGS,
};

use crate::nix_env::TestRoot;
use crate::require_nix;

fn recorder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hooks/record.py")
}

/// A root whose build hook is the recorder, and the directory it records into.
fn root_with_recorder(extra: &str) -> (TestRoot, PathBuf) {
    let root = TestRoot::with_conf(&format!("build-hook = {}\n{extra}", recorder().display()));
    let rec = root.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    (root, rec)
}

/// The environment Nix ran with (the process environment plus the root's), as drover
/// loads settings from it.
fn env_of(root: &TestRoot) -> Env {
    let mut env: Env = std::env::vars().collect();
    for (k, v) in root.env() {
        env.insert(k.to_owned(), v);
    }
    env
}

fn write_expr(root: &TestRoot, text: &str) -> PathBuf {
    let f = root.path().join("e.nix");
    std::fs::write(&f, text).unwrap();
    f
}

#[test]
fn preamble_and_try_request_are_byte_identical() {
    require_nix!();
    let (root, rec) = root_with_recorder("max-jobs = 3\nextra-system-features = zzz\n");
    let f = write_expr(
        &root,
        r#"derivation { name = "hook-feat"; system = builtins.currentSystem; builder = "/bin/sh";
             args = ["-c" "echo hi > $out"]; requiredSystemFeatures = ["kvm" "big-parallel"]; }"#,
    );
    let drv = root.instantiate(&f, None).remove(0);
    let out = root
        .cmd("nix-store")
        .args(["--realise", &drv])
        .env("HOOK_DIR", &rec)
        .env("HOOK_REPLIES", "decline")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = std::fs::read(rec.join("stdin.bin")).unwrap();

    let env = env_of(&root);
    let settings = Settings::load(&env, &[]).unwrap();
    let preamble = settings_preamble(&settings, &env);
    let mut r = Reader::new(&sent);
    let nix_settings = r.read_settings().unwrap();
    let names: Vec<&str> = nix_settings.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, NIX_2_8_HOOK_SETTINGS);
    let ours = Reader::new(&preamble).read_settings().unwrap();
    for (a, b) in nix_settings.iter().zip(&ours) {
        assert_eq!(a, b, "setting differs");
    }
    assert_eq!(&sent[..r.position()], &preamble[..]);

    let req = TryRequest {
        am_willing: true,
        system: drover::config::native_system(),
        drv_path: drv.clone(),
        required_features: ["kvm".to_owned(), "big-parallel".to_owned()].into(),
    };
    assert_eq!(r.rest(), &req.encode()[..]);
    // The hook's argv: the verbosity only (argv[0] is the base name).
    let argv = std::fs::read_to_string(rec.join("argv")).unwrap();
    assert!(argv.trim_end().ends_with(" 3"), "{argv}");
    assert_eq!(std::fs::read_to_string(rec.join("cwd")).unwrap(), "/\n");
}

#[test]
fn accept_follow_up_is_byte_identical() {
    require_nix!();
    let (root, rec) = root_with_recorder("");
    std::fs::write(root.path().join("hello.txt"), "hello").unwrap();
    let f = write_expr(
        &root,
        r#"let dep = derivation { name = "hook-dep"; system = builtins.currentSystem;
             builder = "/bin/sh"; args = ["-c" "echo dep > $out"]; preferLocalBuild = true; };
           in derivation { name = "accepted"; system = builtins.currentSystem; builder = "/bin/sh";
             outputs = ["out" "dev"]; src = ./hello.txt; inherit dep;
             args = ["-c" "echo hi > $out; echo hi > $dev"]; }"#,
    );
    let drv = root.instantiate(&f, None).remove(0);
    let out = root
        .cmd("nix-store")
        .args(["--realise", &drv])
        .env("HOOK_DIR", &rec)
        .env("HOOK_REPLIES", "accept:machine-1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The recorder built nothing: Nix finds the outputs invalid.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("some outputs are unexpectedly invalid"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("building '{drv}' on 'machine-1'")),
        "{stderr}"
    );
    assert!(stderr.contains("remote log line"), "{stderr}");
    // The `@nix` msg line the hook printed before its reply is shown (its text);
    // a plain line on the hook's stderr after acceptance is dropped by Nix 2.8.
    assert!(stderr.contains("recorder pid "), "{stderr}");
    assert!(!stderr.contains("a plain stderr line"), "{stderr}");
    assert!(stderr.contains("remote says hi"), "{stderr}");

    let sent = std::fs::read(rec.join("stdin.bin")).unwrap();
    let mut r = Reader::new(&sent);
    r.read_settings().unwrap();
    let req = r.read_try().unwrap();
    assert_eq!(req.drv_path, drv);
    assert!(req.required_features.is_empty());
    let follow_up = r.rest().to_vec();

    let refs = root.run("nix-store", &["-q", "--references", &drv]);
    let mut inputs = BTreeSet::new();
    for p in refs.lines() {
        if p.ends_with(".drv") {
            inputs.insert(
                root.run("nix-store", &["-q", "--outputs", p])
                    .trim()
                    .to_owned(),
            );
        } else {
            inputs.insert(p.to_owned());
        }
    }
    assert_eq!(inputs.len(), 2);
    assert_eq!(follow_up, encode_accept_follow_up(&inputs, ["out", "dev"]));
}
