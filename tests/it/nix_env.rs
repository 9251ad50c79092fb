//! Scratch Nix test roots for interop tests.
//!
//! A [`TestRoot`] is a temporary directory holding a store dir, state dir, log dir and
//! `nix.conf` (`sandbox = false`, CA and impure derivations enabled), and builds
//! `Command`s for Nix's tools with the matching environment. Each test makes its own
//! root, so tests run in parallel without sharing a database.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether Nix is on PATH; when it is not, prints why the calling test is skipped,
/// or panics when `DROVER_REQUIRE_NIX` is set (CI must not skip interop tests).
pub fn nix_available(test: &str) -> bool {
    let found = Command::new("nix-store")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("DROVER_REQUIRE_NIX").is_some_and(|v| v != "0") {
            panic!("{test}: nix-store is not on PATH but DROVER_REQUIRE_NIX is set");
        }
        eprintln!("SKIPPED {test}: nix-store (Nix 2.8) is not on PATH; install nix-bin to run interop tests");
    }
    found
}

/// Returns early from a test when Nix is missing (see [`nix_available`]).
#[macro_export]
macro_rules! require_nix {
    () => {
        if !$crate::nix_env::nix_available(module_path!()) {
            return;
        }
    };
}

/// A scratch Nix installation rooted in a temporary directory.
pub struct TestRoot {
    pub dir: tempfile::TempDir,
    pub store_dir: String,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub conf_dir: PathBuf,
}

impl TestRoot {
    /// A fresh root with store dir `<tmp>/store`.
    pub fn new() -> TestRoot {
        Self::with_conf("")
    }

    /// A fresh root with extra `nix.conf` lines.
    pub fn with_conf(extra: &str) -> TestRoot {
        let dir = tempfile::Builder::new()
            .prefix("drover-it-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_owned();
        // Builds run as the invoking user (`build-users-group =` below): with build
        // users, parallel roots would pick the same `nixbld` uid from their separate
        // user pools and kill each other's builders. The root stays world-readable for
        // tests that turn build users back on.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let conf_dir = root.join("etc");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::write(
            conf_dir.join("nix.conf"),
            format!(
                "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command ca-derivations impure-derivations\nsubstituters =\n{extra}\n"
            ),
        )
        .unwrap();
        TestRoot {
            store_dir: root.join("store").to_str().unwrap().to_owned(),
            state_dir: root.join("var/nix"),
            log_dir: root.join("var/log/nix"),
            conf_dir,
            dir,
        }
    }

    /// The environment variables that point Nix (and drover) at this root.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("NIX_STORE_DIR", self.store_dir.clone()),
            ("NIX_STATE_DIR", self.state_dir.to_str().unwrap().to_owned()),
            ("NIX_LOG_DIR", self.log_dir.to_str().unwrap().to_owned()),
            ("NIX_CONF_DIR", self.conf_dir.to_str().unwrap().to_owned()),
            ("NIX_REMOTE", String::new()),
            ("NIX_PATH", String::new()),
            ("TMPDIR", self.tmp_dir().to_str().unwrap().to_owned()),
        ]
    }

    /// A temporary directory inside the root, for builds and scratch files.
    pub fn tmp_dir(&self) -> PathBuf {
        let t = self.dir.path().join("tmp");
        std::fs::create_dir_all(&t).unwrap();
        t
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command with this root's environment.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c
    }

    /// Runs a command and returns its stdout; panics with stderr when it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program).args(args).output().unwrap();
        check(program, args, &out);
        String::from_utf8(out.stdout).unwrap()
    }

    /// `nix-instantiate` of a file: the `.drv` paths it prints, one per attribute.
    pub fn instantiate(&self, file: &Path, attr: Option<&str>) -> Vec<String> {
        let mut args = vec![file.to_str().unwrap()];
        if let Some(a) = attr {
            args.extend(["-A", a]);
        }
        self.run("nix-instantiate", &args)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// `nix-store --realise` of paths: the output paths it prints.
    pub fn realise(&self, paths: &[&str]) -> Vec<String> {
        let mut args = vec!["--realise"];
        args.extend(paths);
        self.run("nix-store", &args)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl TestRoot {
    /// Removes the store (made writable first) and the state directory: the root is
    /// empty again, as before its first use.
    pub fn wipe_store(&self) {
        let store = Path::new(&self.store_dir);
        if store.exists() {
            let st = Command::new("chmod")
                .args(["-R", "u+w"])
                .arg(store)
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::remove_dir_all(store).unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }

    /// `nix-store --verify --check-contents` succeeds and reports nothing beyond its
    /// progress lines (it always prints those).
    #[track_caller]
    pub fn verify_store(&self) {
        let out = self
            .cmd("nix-store")
            .args(["--verify", "--check-contents"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let noise: Vec<&str> = stderr
            .lines()
            .filter(|l| !(l.starts_with("reading the Nix store") || l.starts_with("checking ")))
            .collect();
        assert!(noise.is_empty(), "nix-store --verify complained: {noise:?}");
    }
}

fn check(program: &str, args: &[&str], out: &Output) {
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The directory of the shared Nix expression corpus (found from either crate of the
/// workspace).
pub fn corpus_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|d| d.join("tests/data/nix"))
        .find(|d| d.is_dir())
        .expect("tests/data/nix exists in the workspace")
}
