//! `drover path-info`: what the store knows of store paths, as `nix path-info` prints
//! it — one path per line (with `-s`, `-S`, `--sigs` columns), or with `--json` the
//! same JSON array as Nix 2.8.
//!
//! One difference: Nix 2.8 takes a `.drv` argument to mean the derivation's outputs
//! (building them if needed); drover describes the path it is given, `.drv` or not.

use std::process::ExitCode;

use anyhow::bail;
use drover::store::{path_infos_to_json, LocalStore, ValidPathInfo};
use drover::store_path::{StorePath, StorePathSet};
use serde_json::Value;

use crate::{args, Context};

#[derive(clap::Args)]
// `-h` means `--human-readable` here, as in Nix; help stays on `--help`.
#[command(disable_help_flag = true)]
pub struct Args {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Print JSON (an array of objects), as `nix path-info --json`.
    #[arg(long)]
    json: bool,
    /// Apply to the closure of the paths.
    #[arg(short, long)]
    recursive: bool,
    /// Print the size of the NAR serialisation of each path.
    #[arg(short = 's', long = "size")]
    size: bool,
    /// Print the sum of the NAR sizes of each path's closure.
    #[arg(short = 'S', long = "closure-size")]
    closure_size: bool,
    /// Print sizes such as 1.2M instead of bytes.
    #[arg(short = 'h', long = "human-readable")]
    human_readable: bool,
    /// Print whether each path is ultimately trusted, its content address and its
    /// signatures.
    #[arg(long)]
    sigs: bool,
    /// Store paths, or paths that resolve into the store.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let store = ctx.open_store()?;
    let store_dir = ctx.settings.store_dir();
    let mut paths: Vec<StorePath> = a
        .paths
        .iter()
        .map(|p| args::store_path(store_dir, p))
        .collect::<Result<_, _>>()?;
    if a.recursive {
        paths = store.compute_closure(&paths)?.into_iter().collect();
    }
    paths.sort();
    paths.dedup();
    let infos: Vec<(StorePath, Option<ValidPathInfo>)> = paths
        .into_iter()
        .map(|p| {
            let info = store.query_path_info(&p)?;
            Ok((p, info))
        })
        .collect::<anyhow::Result<_>>()?;

    if a.json {
        let mut json = path_infos_to_json(store_dir, &infos);
        if a.closure_size {
            add_closure_sizes(&store, &infos, &mut json)?;
        }
        println!("{json}");
        return Ok(ExitCode::SUCCESS);
    }

    let width = infos
        .iter()
        .map(|(p, _)| store_dir.print(p).len())
        .max()
        .unwrap_or(0);
    for (path, info) in &infos {
        let printed = store_dir.print(path);
        let Some(info) = info else {
            bail!("path '{printed}' is not valid");
        };
        let mut line = printed.clone();
        if a.size || a.closure_size || a.sigs {
            line.push_str(&" ".repeat(width - printed.len()));
        }
        if a.size {
            line.push_str(&size_column(info.nar_size, a.human_readable));
        }
        if a.closure_size {
            let size = closure_size(&store, path)?;
            line.push_str(&size_column(size, a.human_readable));
        }
        if a.sigs {
            let mut parts = Vec::new();
            if info.ultimate {
                parts.push("ultimate".to_owned());
            }
            if let Some(ca) = &info.ca {
                parts.push(format!("ca:{ca}"));
            }
            parts.extend(info.sigs.iter().cloned());
            line.push('\t');
            line.push_str(&parts.join(" "));
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A size column as Nix prints it: `\t%11d`, or `\t%6.1f<unit>` when human-readable.
fn size_column(bytes: u64, human: bool) -> String {
    if !human {
        return format!("\t{bytes:>11}");
    }
    const UNITS: [char; 9] = [' ', 'K', 'M', 'G', 'T', 'P', 'E', 'Z', 'Y'];
    let mut value = bytes as f64;
    let mut power = 0;
    while value > 1024.0 && power < UNITS.len() - 1 {
        power += 1;
        value /= 1024.0;
    }
    format!("\t{value:>6.1}{}", UNITS[power])
}

fn closure_size(store: &LocalStore, path: &StorePath) -> anyhow::Result<u64> {
    let closure: StorePathSet = store.compute_closure(std::slice::from_ref(path))?;
    let mut total = 0;
    for p in &closure {
        total += store.query_path_info(p)?.map_or(0, |i| i.nar_size);
    }
    Ok(total)
}

/// Adds `closureSize` where Nix puts it: after `references` and `ca`, before the
/// fields that describe this store's registration.
fn add_closure_sizes(
    store: &LocalStore,
    infos: &[(StorePath, Option<ValidPathInfo>)],
    json: &mut Value,
) -> anyhow::Result<()> {
    let Some(items) = json.as_array_mut() else {
        return Ok(());
    };
    for (item, (path, info)) in items.iter_mut().zip(infos) {
        let (Some(obj), Some(_)) = (item.as_object_mut(), info) else {
            continue;
        };
        let size = closure_size(store, path)?;
        let mut rebuilt = serde_json::Map::new();
        let mut pending = Some(size);
        for (k, v) in std::mem::take(obj) {
            if matches!(
                k.as_str(),
                "deriver" | "registrationTime" | "ultimate" | "signatures"
            ) {
                if let Some(s) = pending.take() {
                    rebuilt.insert("closureSize".into(), s.into());
                }
            }
            rebuilt.insert(k, v);
        }
        if let Some(s) = pending {
            rebuilt.insert("closureSize".into(), s.into());
        }
        *obj = rebuilt;
    }
    Ok(())
}
