//! The `drover` command line: argument parsing and dispatch, one module per command.
//!
//! Errors are printed as Nix prints them (`error: …` on stderr) and exit with status 1;
//! `warning: …` lines from the settings (unknown `nix.conf` settings) come first, as
//! Nix prints them. This binary is the only place that uses `anyhow`.

mod args;
mod derivation;
mod display;
mod log;
mod log_format;
mod path_info;
mod realise;

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

    /// Increase the logging verbosity level (repeatable: `-vvv`), as Nix's `-v`.
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Decrease the logging verbosity level (repeatable), as Nix's `--quiet`.
    #[arg(long = "quiet", global = true, action = clap::ArgAction::Count)]
    quiet: u8,

    /// Set the logging verbosity level to 'debug' (then `-v` adds to it).
    #[arg(long = "debug", global = true)]
    debug: bool,

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

/// Nix's verbosity levels: `lvlError` 0, `lvlWarn` 1, `lvlNotice` 2, `lvlInfo` 3
/// (the default), `lvlTalkative` 4, `lvlChatty` 5, `lvlDebug` 6, `lvlVomit` 7.
pub const LVL_INFO: u32 = 3;
/// `lvlWarn`: warnings are printed from here on.
pub const LVL_WARN: u32 = 1;

impl Cli {
    /// The verbosity as Nix computes it from `-v`, `--quiet` and `--debug`: info,
    /// or debug with `--debug`; one more per `-v`, one less per `--quiet` down to
    /// `lvlError`. (Nix applies the flags in the order given, so `-v --debug` is
    /// debug there and debug + 1 here.)
    fn verbosity(&self) -> u32 {
        let base = if self.debug { 6 } else { LVL_INFO };
        (base + u32::from(self.verbose)).saturating_sub(u32::from(self.quiet))
    }
}

/// The `log` filter for drover's own diagnostics at a Nix verbosity: errors only
/// up to info (the default: Nix prints its own messages, not drover's), warnings at
/// talkative (`-v`), info at chatty, debug at debug, trace at vomit.
fn log_filter(verbosity: u32) -> ::log::LevelFilter {
    use ::log::LevelFilter;
    match verbosity {
        0..=3 => LevelFilter::Error,
        4 => LevelFilter::Warn,
        5 => LevelFilter::Info,
        6 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// The settings and the store a command works on.
pub struct Context {
    /// The process environment the settings were read from.
    pub env: Env,
    pub settings: Settings,
    /// Nix's verbosity level ([`LVL_INFO`] by default; `-v` adds one): given to the
    /// build hook and the log collectors.
    pub verbosity: u32,
}

impl Context {
    fn new(options: &[String], verbosity: u32) -> anyhow::Result<Context> {
        let pairs: Vec<(String, String)> = options
            .chunks(2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect();
        let env: Env = std::env::vars().collect();
        let settings = Settings::load(&env, &pairs)?;
        for w in settings.warnings().iter().filter(|_| verbosity >= LVL_WARN) {
            eprintln!("warning: {w}");
        }
        Ok(Context {
            env,
            settings,
            verbosity,
        })
    }

    /// Opens the local store the settings describe.
    pub fn open_store(&self) -> anyhow::Result<LocalStore> {
        Ok(LocalStore::open(&self.settings)?)
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::new(&cli.option, cli.verbosity())?;
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
    let cli = Cli::parse();
    // `RUST_LOG`, when set, overrides what the verbosity flags select.
    let default_filter = log_filter(cli.verbosity()).to_string().to_lowercase();
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
            .format_target(false)
            .format_timestamp(None)
            .build();
    ::log::set_max_level(inner.filter().max(::log::LevelFilter::Warn));
    let _ = ::log::set_boxed_logger(Box::new(CliLogger { inner }));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Nix's form: `error: <message>`, the causes on the same line.
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verbosity(args: &[&str]) -> u32 {
        let mut argv = vec!["drover"];
        argv.extend(args);
        argv.extend(["realise", "/x"]);
        Cli::try_parse_from(argv).unwrap().verbosity()
    }

    #[test]
    fn verbosity_flags_count_as_in_nix() {
        assert_eq!(verbosity(&[]), 3);
        assert_eq!(verbosity(&["-v"]), 4);
        assert_eq!(verbosity(&["-vvvv"]), 7);
        assert_eq!(verbosity(&["-v", "--verbose", "-vv"]), 7);
        assert_eq!(verbosity(&["--quiet"]), 2);
        assert_eq!(verbosity(&["--quiet", "--quiet", "--quiet", "--quiet"]), 0);
        assert_eq!(verbosity(&["--debug"]), 6);
        assert_eq!(verbosity(&["-v", "--quiet"]), 3);
        // After the subcommand too.
        let cli = Cli::try_parse_from(["drover", "realise", "-vv", "/x"]).unwrap();
        assert_eq!(cli.verbosity(), 5);
        assert_eq!(log_filter(3), ::log::LevelFilter::Error);
        assert_eq!(log_filter(6), ::log::LevelFilter::Debug);
    }
}
