//! `drover derivation show` and `drover derivation add`.
//!
//! `show` prints derivations as the JSON of `nix show-derivation` (byte for byte):
//! one object keyed by `.drv` path, in store-path order. Arguments are `.drv` store
//! paths, other store paths (their deriver is shown), or `.drv` files outside the
//! store (keyed by the path they would have in the store).
//!
//! `add` reads one derivation as JSON (the value of one entry of `show`'s output),
//! computes its output paths (absent or empty ones are filled in, given ones must be
//! right) and its `.drv` path, writes the `.drv` into the store with its references
//! and prints its path. Its inputs must be valid already.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use drover::derivation::{json, name_from_drv_path, Derivation, DrvHashCache};
use drover::store::{LocalStore, StoreError};
use drover::store_path::StorePath;
use serde_json::Value;

use crate::{args, Context};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Print derivations as JSON, as `nix show-derivation` does.
    Show {
        /// Also show the derivations these depend on, recursively.
        #[arg(short, long)]
        recursive: bool,
        /// `.drv` store paths, store paths with a known deriver, or `.drv` files.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Add a derivation given as JSON to the store and print its `.drv` path.
    Add {
        /// The JSON file to read; `-` or nothing for standard input.
        #[arg(value_name = "FILE|-")]
        file: Option<PathBuf>,
    },
}

pub fn run(ctx: &Context, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Show { recursive, paths } => show(ctx, &paths, recursive),
        Command::Add { file } => add(ctx, file),
    }
}

fn show(ctx: &Context, paths: &[String], recursive: bool) -> anyhow::Result<ExitCode> {
    let store_dir = ctx.settings.store_dir();
    let mut store: Option<LocalStore> = None;
    let mut shown: BTreeMap<StorePath, Arc<Derivation>> = BTreeMap::new();
    let mut todo: Vec<StorePath> = Vec::new();
    for arg in paths {
        let in_store = store_dir.is_in_store(arg) || !arg.ends_with(".drv");
        if !in_store {
            // A `.drv` file outside the store: keyed by its would-be store path.
            let bytes = std::fs::read(arg).with_context(|| format!("reading '{arg}'"))?;
            let drv = Derivation::from_aterm_bytes(&bytes, store_dir)
                .with_context(|| format!("parsing derivation '{arg}'"))?;
            let name = drv
                .env_name()
                .with_context(|| format!("derivation '{arg}' has no 'name' attribute"))?
                .to_owned();
            let drv_path = drv.drv_path(store_dir, &name)?;
            todo.extend(drv.input_drvs.keys().filter(|_| recursive).cloned());
            shown.insert(drv_path, Arc::new(drv));
            continue;
        }
        let s = open(ctx, &mut store)?;
        let path = args::store_path(store_dir, arg)?;
        let drv_path = if path.is_derivation() {
            path
        } else {
            s.query_path_info(&path)?
                .with_context(|| format!("path '{}' is not valid", store_dir.print(&path)))?
                .deriver
                .with_context(|| {
                    format!(
                        "path '{}' has no known deriver to show",
                        store_dir.print(&path)
                    )
                })?
        };
        todo.push(drv_path);
    }
    while let Some(p) = todo.pop() {
        if shown.contains_key(&p) {
            continue;
        }
        let drv = open(ctx, &mut store)?.read_derivation(&p)?;
        if recursive {
            todo.extend(drv.input_drvs.keys().cloned());
        }
        shown.insert(p, Arc::new(drv));
    }
    let map: serde_json::Map<String, Value> = shown
        .iter()
        .map(|(p, d)| (store_dir.print(p), json::to_json_value(d, store_dir)))
        .collect();
    println!("{}", json::to_nix_json_string(&Value::Object(map)));
    Ok(ExitCode::SUCCESS)
}

fn open<'a>(ctx: &Context, store: &'a mut Option<LocalStore>) -> anyhow::Result<&'a LocalStore> {
    if store.is_none() {
        *store = Some(ctx.open_store()?);
    }
    Ok(store.as_ref().expect("just opened"))
}

fn add(ctx: &Context, file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let store_dir = ctx.settings.store_dir();
    let (source, text) = match file.as_deref() {
        None => ("standard input".to_owned(), read_stdin()?),
        Some(p) if p.as_os_str() == "-" => ("standard input".to_owned(), read_stdin()?),
        Some(p) => (
            format!("'{}'", p.display()),
            std::fs::read(p).with_context(|| format!("reading '{}'", p.display()))?,
        ),
    };
    let value: Value = serde_json::from_slice(&text)
        .with_context(|| format!("parsing the derivation JSON in {source}"))?;
    let store = ctx.open_store()?;

    // The inputs must be valid before the `.drv` that refers to them can be.
    let (_, parsed) = json::from_json(&value, store_dir, None)
        .with_context(|| format!("reading the derivation in {source}"))?;
    let references = parsed.drv_references();
    let wanted: Vec<StorePath> = references.iter().cloned().collect();
    let valid = store.query_valid_paths(&wanted)?;
    if let Some(missing) = wanted.iter().find(|p| !valid.contains(p)) {
        bail!(
            "input '{}' of the derivation in {source} is not valid in the store",
            store_dir.print(missing)
        );
    }

    let mut hashes = DrvHashCache::new();
    let read = |p: &StorePath| store.read_derivation(p).map(Arc::new);
    let (drv_path, drv) = json::from_json_with_paths(&value, store_dir, |p: &StorePath| {
        hashes.hash_of(store_dir, p, read)
    })
    .map_err(|e: StoreError| anyhow::Error::new(e))
    .with_context(|| format!("computing the paths of the derivation in {source}"))?;

    let name = name_from_drv_path(&drv_path)?;
    let written = store.add_text_to_store(
        &format!("{name}.drv"),
        &drv.to_aterm_bytes(store_dir),
        &drv.drv_references(),
    )?;
    if written != drv_path {
        bail!(
            "internal error: derivation written to '{}' but its path is '{}'",
            store_dir.print(&written),
            store_dir.print(&drv_path)
        );
    }
    println!("{}", store_dir.print(&drv_path));
    Ok(ExitCode::SUCCESS)
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .context("reading standard input")?;
    Ok(buf)
}
