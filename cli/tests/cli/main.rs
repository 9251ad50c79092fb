//! Tests of the `drover` command line, run as a process like a user runs it.
//!
//! The interop tests compare the CLI's output with Nix 2.8's on the shared corpus of
//! Nix expressions in `tests/data/nix/` (see `nix_env` for how test roots are made and
//! when tests are skipped).

#[path = "../../../tests/it/nix_env.rs"]
#[macro_use]
mod nix_env;

#[path = "../../../tests/it/http_server.rs"]
mod http_server;

mod build_done;
mod builtins;
mod ca;
mod daemon;
mod daemon_compat;
mod daemon_options;
mod derivation;
mod fallback;
mod faults;
mod gc;
mod gc_collect;
mod hook;
mod hook_process;
mod hook_try;
mod impure;
mod incomplete_closure;
mod interrupt;
mod log_blocks;
mod log_format;
mod path_info;
mod progress;
mod realise;
mod recursive;
mod remote;
mod repeat;
mod sandbox;
mod schedule;
mod store_settings;
mod subst_closure;
mod substitute;
mod tree;

use std::process::{Command, Output};

use nix_env::TestRoot;

/// A `drover` command with the environment of `root`.
pub fn drover(root: &TestRoot) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover"));
    for (k, v) in root.env() {
        c.env(k, v);
    }
    c
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
#[track_caller]
pub fn stdout_of(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every `.drv` in the closures of the corpus' derivations, dependencies first
/// (`realisable`: only those `nix-store --realise` can build, i.e. not impure ones).
pub fn corpus_drvs(root: &TestRoot, realisable: bool) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(nix_env::corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "nix"))
        .filter(|p| !realisable || !p.ends_with("impure.nix"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the Nix corpus is empty");
    let mut tops = Vec::new();
    for f in &files {
        tops.extend(root.instantiate(f, None));
    }
    let mut args = vec!["-qR"];
    args.extend(tops.iter().map(String::as_str));
    // `nix-store -qR` prints a closure in topological order, references first.
    let drvs: Vec<String> = root
        .run("nix-store", &args)
        .lines()
        .filter(|l| l.ends_with(".drv"))
        .map(str::to_owned)
        .collect();
    assert!(drvs.len() >= tops.len());
    drvs
}
