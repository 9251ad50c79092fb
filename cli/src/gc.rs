//! `drover gc`: the garbage collector, with the options and output of Nix 2.8's
//! `nix-store --gc` and `nix-store --delete`.
//!
//! * `drover gc`: deletes the dead paths; prints `N store paths deleted, X MiB
//!   freed` on stdout (`--max-freed N[K|M|G|T]` stops after N bytes);
//! * `--print-roots`: `link -> store path` per root, sorted, nothing collected;
//! * `--print-live`, `--print-dead`: the live or dead paths, one per line;
//! * `--delete PATH...` (`--ignore-liveness`): deletes those paths if they are
//!   dead, else fails with Nix's message; the summary line is printed either way,
//!   as `nix-store` prints it.
//!
//! The collector's messages (`finding garbage collector roots...`, `deleting
//! '…'`, …) go to stderr at Nix's levels: info by default, `-v` for the unused
//! links, `--debug` for the rest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use drover::store::gc::{self, GcAction, GcLevel, GcOptions, GcResults};
use drover::store::gc_roots::canon_path;
use drover::store::LocalStore;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the roots (`link -> path`) instead of collecting.
    #[arg(long, conflicts_with_all = ["print_live", "print_dead", "delete", "max_freed"])]
    print_roots: bool,
    /// Print the live paths instead of collecting.
    #[arg(long, conflicts_with_all = ["print_dead", "delete"])]
    print_live: bool,
    /// Print the dead paths instead of collecting.
    #[arg(long, conflicts_with = "delete")]
    print_dead: bool,
    /// Stop after more than this many bytes were freed (suffix K, M, G or T).
    #[arg(long, value_name = "BYTES", value_parser = parse_max_freed, conflicts_with = "delete")]
    max_freed: Option<u64>,
    /// Delete the given paths, if nothing keeps them alive (as `nix-store --delete`).
    #[arg(long)]
    delete: bool,
    /// With --delete: ignore the roots (the paths must still be unreferenced).
    #[arg(long, requires = "delete")]
    ignore_liveness: bool,
    /// The paths to delete (with --delete).
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
}

/// Nix's `string2IntWithUnitPrefix` for `--max-freed`; negative values are 0.
fn parse_max_freed(s: &str) -> Result<u64, String> {
    let (digits, multiplier) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: i64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                u => return Err(format!("invalid unit specifier '{u}'")),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("'{digits}' is not an integer"))?;
    Ok(n.saturating_mul(multiplier).max(0) as u64)
}

/// Nix's `followLinksToStorePath`: symlinks outside the store are followed until
/// the path is in it.
fn follow_links_to_store_path(store: &LocalStore, p: &Path) -> anyhow::Result<String> {
    let sd = store.store_dir();
    let cwd = std::env::current_dir()?;
    let mut path = canon_path(&cwd.join(p));
    while !sd.is_in_store(&path.to_string_lossy()) {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&path)
                    .with_context(|| format!("reading symlink '{}'", path.display()))?;
                let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
                path = canon_path(&dir.join(target));
            }
            _ => break,
        }
    }
    let printed = path.to_string_lossy().into_owned();
    if !sd.is_in_store(&printed) {
        anyhow::bail!("path '{printed}' is not in the Nix store");
    }
    Ok(printed)
}

pub fn run(ctx: &crate::Context, args: Args) -> anyhow::Result<ExitCode> {
    if !args.delete && !args.paths.is_empty() {
        // nix-store --gc's words
        anyhow::bail!("no arguments expected");
    }
    let store = ctx.open_store()?;
    let verbosity = ctx.verbosity;
    let log = move |level: GcLevel, msg: &str| {
        let needed = match level {
            GcLevel::Error => 0,
            GcLevel::Info => crate::LVL_INFO,
            GcLevel::Talkative => crate::LVL_INFO + 1,
            GcLevel::Debug => 6,
        };
        if verbosity >= needed {
            eprintln!("{msg}");
        }
    };
    if args.print_roots {
        let roots = gc::find_roots(&store, false, &log)?;
        let mut lines: Vec<(String, String)> = roots
            .iter()
            .flat_map(|(p, links)| {
                let p = store.store_dir().print(p);
                links.iter().map(move |l| (l.clone(), p.clone()))
            })
            .collect();
        lines.sort();
        for (link, target) in lines {
            println!("{link} -> {target}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut options = GcOptions {
        ignore_liveness: args.ignore_liveness,
        ..GcOptions::default()
    };
    if args.delete {
        options.action = GcAction::DeleteSpecific;
        for p in &args.paths {
            let printed = follow_links_to_store_path(&store, p)?;
            options
                .paths_to_delete
                .insert(store.store_dir().parse_prefix(&printed)?);
        }
    } else if args.print_live {
        options.action = GcAction::ReturnLive;
    } else if args.print_dead {
        options.action = GcAction::ReturnDead;
    }
    if let Some(m) = args.max_freed {
        options.max_freed = m;
    }
    let mut results = GcResults::default();
    let r = gc::collect_garbage_into(&store, &options, &mut results, &log);
    match options.action {
        GcAction::DeleteDead | GcAction::DeleteSpecific => println!(
            "{} store paths deleted, {:.2} MiB freed",
            results.paths.len(),
            results.bytes_freed as f64 / (1024.0 * 1024.0)
        ),
        GcAction::ReturnLive | GcAction::ReturnDead if r.is_ok() => {
            for p in &results.paths {
                println!("{p}");
            }
        }
        _ => {}
    }
    r?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_freed_takes_binary_unit_suffixes() {
        assert_eq!(parse_max_freed("10"), Ok(10));
        assert_eq!(parse_max_freed("2k"), Ok(2048));
        assert_eq!(parse_max_freed("1M"), Ok(1 << 20));
        assert_eq!(parse_max_freed("1T"), Ok(1 << 40));
        assert_eq!(parse_max_freed("-5"), Ok(0));
        assert_eq!(
            parse_max_freed("1x"),
            Err("invalid unit specifier 'X'".into())
        );
        assert_eq!(
            parse_max_freed("abc"),
            Err("invalid unit specifier 'C'".into())
        );
        assert_eq!(
            parse_max_freed("1.5"),
            Err("'1.5' is not an integer".into())
        );
    }
}
