//! The `drover` command line: argument parsing and dispatch, one module per command.
//!
//! Errors are printed as Nix prints them (`error: …` on stderr) and exit with status 1;
//! `warning: …` lines from the settings (unknown `nix.conf` settings) come first, as
//! Nix prints them. This binary is the only place that uses `anyhow`.

mod args;
mod derivation;
mod display;
mod interrupt;
mod log;
mod path_info;
mod plan;
mod realise;
mod roots;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover::config::{Env, Settings};
use drover::store::LocalStore;

/// drover: realise Nix derivations in a Nix store, as Nix does.
#[derive(Parser)]
#[command(name = "drover", version, max_term_width = 100)]
struct Cli {
    /// Set the nix.conf setting NAME to VALUE for this run (as Nix's `--option`).
    #[arg(long = "option", global = true, num_args = 2, value_names = ["NAME", "VALUE"])]
    option: Vec<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with derivations (`.drv` files).
    #[command(subcommand)]
    Derivation(derivation::Command),
    /// Show what the store knows of store paths (as `nix path-info`).
    PathInfo(path_info::Args),
    /// Build or fetch derivations' outputs and store paths (as `nix-store --realise`).
    Realise(realise::Args),
    /// Print the build log of a derivation or of an output's deriver.
    Log(log::Args),
}

/// The settings and the store a command works on.
pub struct Context {
    /// The process environment the settings were read from.
    pub env: Env,
    pub settings: Settings,
}

impl Context {
    fn new(options: &[String]) -> anyhow::Result<Context> {
        let pairs: Vec<(String, String)> = options
            .chunks(2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect();
        let env: Env = std::env::vars().collect();
        let settings = Settings::load(&env, &pairs)?;
        for w in settings.warnings() {
            eprintln!("warning: {w}");
        }
        Ok(Context { env, settings })
    }

    /// Opens the local store the settings describe.
    pub fn open_store(&self) -> anyhow::Result<LocalStore> {
        Ok(LocalStore::open(&self.settings)?)
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::new(&cli.option)?;
    match cli.command {
        Command::Derivation(c) => derivation::run(&ctx, c),
        Command::PathInfo(a) => path_info::run(&ctx, a),
        Command::Realise(a) => realise::run(&mut ctx, a),
        Command::Log(a) => log::run(&ctx, a),
    }
}

/// `RUST_LOG`-filtered logging (errors only by default), except the lines Nix
/// prints verbatim about caches (`log` target [`drover::binary_cache::NOTICE`]):
/// those are always shown, as they are, through the display.
struct CliLogger {
    inner: env_logger::Logger,
}

impl ::log::Log for CliLogger {
    fn enabled(&self, m: &::log::Metadata) -> bool {
        m.target() == drover::binary_cache::NOTICE || self.inner.enabled(m)
    }

    fn log(&self, r: &::log::Record) {
        if r.target() == drover::binary_cache::NOTICE {
            display::notice(&r.args().to_string());
        } else {
            self.inner.log(r);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

fn main() -> ExitCode {
    // As Nix's `initNix`: store objects, the database and logs are readable by
    // everybody and writable by nobody else, whatever umask the caller has.
    // SAFETY: umask only swaps the process's file mode mask.
    unsafe { libc::umask(0o022) };
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error"))
            .format_target(false)
            .format_timestamp(None)
            .build();
    ::log::set_max_level(inner.filter().max(::log::LevelFilter::Warn));
    let _ = ::log::set_boxed_logger(Box::new(CliLogger { inner }));
    let cli = Cli::parse();
    let r = interrupt::install()
        .map_err(|e| anyhow::anyhow!("installing the signal handlers: {e}"))
        .and_then(|()| run(cli));
    // As Nix at exit: this process's temporary roots file goes away.
    drover::store::gc_roots::release_temp_roots();
    match r {
        Ok(code) => code,
        Err(e) => {
            // Nix's form: `error: <message>`, the causes on the same line.
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
