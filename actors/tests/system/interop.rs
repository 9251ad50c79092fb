//! The Worker against stores written by Nix 2.8: derivations Nix instantiated are
//! realised (with the fake builder), and Nix then finds them realised — input
//! addressed outputs valid, content-addressed ones through their realisations.

use std::sync::Arc;

use actix::prelude::*;
use drover::build_result::BuildStatus;
use drover::config::{Env, Settings};
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store::LocalStore;
use drover_actors::messages::BuildMode;
use drover_actors::testing::FakeBuilder;
use drover_actors::{spawn_worker, Realise, WorkerConfig, WorkerSettings};

use crate::nix_env::TestRoot;

const EXPR: &str = r#"
let
  sys = builtins.currentSystem;
  a = derivation { name = "a"; system = sys; builder = "/bin/sh"; args = ["-c" "echo a > $out"]; };
  c = derivation {
    name = "c"; system = sys; builder = "/bin/sh"; args = ["-c" "cat ${a} > $out"];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  };
  b = derivation { name = "b"; system = sys; builder = "/bin/sh"; args = ["-c" "cat ${c} > $out"]; };
in { inherit a b c; }
"#;

#[actix::test]
async fn nix_sees_what_drover_realised() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("e.nix");
    std::fs::write(&file, EXPR).unwrap();
    let b = root.instantiate(&file, Some("b")).remove(0);
    let mut env: Env = root
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    let settings = Settings::load(&env, &[]).unwrap();
    let store = Arc::new(LocalStore::open(&settings).unwrap());
    let fb = FakeBuilder::new(store.clone());
    let log = fb.log.clone();
    let fb = fb.start();
    let w = spawn_worker(WorkerConfig {
        store: store.clone(),
        local_builder: fb.clone().recipient(),
        cancel_local_build: fb.recipient(),
        hook: None,
        cancel_hook_build: None,
        substituters: vec![],
        settings: WorkerSettings::from_settings(&settings),
        progress: None,
    });
    let drv = store.store_dir().parse(&b).unwrap();
    let outcome = w
        .send(Realise {
            requests: vec![DerivedPath::Built {
                drv_path: drv,
                outputs: OutputsSpec::All,
            }],
            mode: BuildMode::Normal,
        })
        .await
        .unwrap();
    assert_eq!(outcome.exit_status, 0, "{:?}", outcome.errors);
    assert_eq!(outcome.results[0].result.status, BuildStatus::Built);
    assert_eq!(log.lock().unwrap().started, ["a", "c", "b"]);
    // Nix finds nothing to build: every output is valid or realised.
    let out = root
        .cmd("nix-store")
        .args(["--realise", &b, "--max-jobs", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("will be built"), "{stderr}");
    root.verify_store();
}
