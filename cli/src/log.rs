//! `drover log PATH`: prints the stored build log of a derivation, or of the
//! derivation that built an output path, as `nix-store --read-log` does.
//!
//! A compressed log that ends inside a bzip2 stream (its build is still running) is
//! printed up to its last complete block, followed by a warning on stderr; the exit
//! status is 0. (Nix 2.8 prints nothing then and says the log is not available.)

use std::process::ExitCode;

use drover::build_log::read::{read_build_log, LogEnd};

use crate::{args, Context};

#[derive(clap::Args)]
pub struct Args {
    /// A `.drv` path, or an output path whose deriver is known.
    #[arg(value_name = "PATH")]
    path: String,
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let store_dir = ctx.settings.store_dir();
    let path = args::store_path(store_dir, &a.path)?;
    let store = ctx.open_store()?;
    let deriver = |p: &drover::store_path::StorePath| {
        store
            .query_path_info(p)
            .ok()
            .flatten()
            .and_then(|info| info.deriver)
    };
    let mut out = std::io::stdout().lock();
    let end = read_build_log(ctx.settings.log_dir(), store_dir, &path, deriver, &mut out)?;
    if let LogEnd::Truncated { file } = end {
        eprintln!(
            "warning: build log '{}' ends inside a bzip2 stream (is its build still running?): printed up to its last complete block",
            file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
