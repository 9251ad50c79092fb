//! What the library examples share: a scratch Nix store in a temporary directory
//! (no Nix installation needed, nothing outside the directory touched) and a way
//! to add a derivation to it, computing its output and `.drv` paths as Nix does.

use std::path::Path;
use std::sync::Arc;

use drover::config::{Env, Settings};
use drover::derivation::{Derivation, DerivationOutput, DrvHashCache};
use drover::store::{LocalStore, StoreError};
use drover::store_path::StorePath;

/// A temporary directory for the store, removed at the end (the store's files are
/// read-only, as in any Nix store, so they are made writable first).
pub struct Root(tempfile::TempDir);

impl Root {
    pub fn new() -> std::io::Result<Root> {
        Ok(Root(tempfile::tempdir()?))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(self.0.path())
            .status();
    }
}

/// Settings for a store under `root`: no sandbox (these builds run `/bin/sh` from
/// the host), no build users, no substituters.
pub fn settings(root: &Path) -> Settings {
    let dir = |p: &str| root.join(p).display().to_string();
    let env: Env = [
        ("NIX_STORE_DIR", dir("store")),
        ("NIX_STATE_DIR", dir("var/nix")),
        ("NIX_LOG_DIR", dir("var/log/nix")),
        ("NIX_CONF_DIR", dir("etc")),
        ("NIX_USER_CONF_FILES", String::new()),
        (
            "NIX_CONFIG",
            "sandbox = false\nbuild-users-group =\nsubstituters =\n".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Settings::load(&env, &[]).expect("scratch settings")
}

/// Adds a derivation `name` whose builder runs the shell `script` (with `$out`),
/// using the `out` output of each of `inputs`; returns its `.drv` path.
pub fn add_derivation(
    store: &Arc<LocalStore>,
    name: &str,
    script: &str,
    inputs: &[&StorePath],
) -> Result<StorePath, StoreError> {
    let sd = store.store_dir().clone();
    let mut drv = Derivation {
        system: drover::config::native_system(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        ..Default::default()
    };
    drv.outputs.insert("out".into(), DerivationOutput::Deferred);
    for (k, v) in [
        ("name", name),
        ("builder", "/bin/sh"),
        ("out", ""),
        ("system", &drv.system.clone()),
    ] {
        drv.env.insert(k.into(), v.into());
    }
    for i in inputs {
        drv.input_drvs
            .entry((*i).clone())
            .or_default()
            .insert("out".into());
        // The builder finds its inputs' outputs through the environment.
        let input = store.read_derivation(i)?;
        if let Some(out) = input.outputs["out"].path() {
            let var = input.env["name"].replace('-', "_");
            drv.env.insert(var, sd.print(out));
        }
    }
    let mut hashes = DrvHashCache::new();
    let drv = drv.with_output_paths::<_, StoreError>(&sd, name, |p| {
        hashes.hash_of(&sd, p, |q| store.read_derivation(q).map(Arc::new))
    })?;
    store.add_text_to_store(
        &format!("{name}.drv"),
        &drv.to_aterm_bytes(&sd),
        &drv.drv_references(),
    )
}
