//! The `drover` command line: argument parsing and dispatch, one module per command.
//!
//! Errors are printed as Nix prints them (`error: …` on stderr, each cause once) and
//! exit with status 1, usage errors too (with a pointer to `--help`, as Nix);
//! `warning: …` lines from the settings (unknown `nix.conf` settings) come first, as
//! Nix prints them. This binary is the only place that uses `anyhow`.

mod args;
mod daemon;
mod derivation;
mod display;
mod gc;
mod interrupt;
mod log;
mod log_format;
mod path_info;
mod realise;
mod report;
mod roots;
mod tree;

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
    /// Collect garbage, or delete paths (as `nix-store --gc` and `--delete`).
    Gc(gc::Args),
    /// Serve Nix's worker protocol in place of `nix-daemon`.
    Daemon(daemon::Args),
    /// Print the report of the last `drover realise` (`--json`: as JSON).
    Report(report::Args),
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
        Command::Gc(a) => gc::run(&ctx, a),
        Command::Daemon(a) => daemon::run(&ctx, a),
        Command::Report(a) => report::run(&ctx, a),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // `RUST_LOG`, when set, overrides what the verbosity flags select.
    let default_filter = log_filter(cli.verbosity()).to_string().to_lowercase();
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
            .format_target(false)
            .format_timestamp(None)
            .build();
    ::log::set_max_level(inner.filter().max(::log::LevelFilter::Warn));
    let _ = ::log::set_boxed_logger(Box::new(CliLogger { inner }));
    let r = interrupt::install()
        .map_err(|e| anyhow::anyhow!("installing the signal handlers: {e}"))
        .and_then(|()| run(cli));
    // As Nix at exit: this process's temporary roots file goes away.
    drover::store::gc_roots::release_temp_roots();
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_message(&e));
            ExitCode::from(1)
        }
    }
}

/// Nix's form of an error: the message, then each cause not already part of the
/// text before it, on the same line. (Errors that print their source in their own
/// message, as `thiserror`'s `{source}` does, would otherwise show it twice.) An
/// OS error reads as `strerror` words it, without Rust's ` (os error N)`.
fn error_message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = strip_os_error(&cause.to_string());
        if text.is_empty() {
            text = c;
        } else if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// Removes every ` (os error N)` from a message.
fn strip_os_error(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + " (os error ".len()..];
        match tail.find(')') {
            Some(j) if tail[..j].bytes().all(|b| b.is_ascii_digit()) => rest = &tail[j + 1..],
            _ => {
                out.push_str(" (os error ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A command line clap refuses: as Nix's `UsageError`s, `error: <what>` and a
/// pointer to `--help`, exit status 1 (help and version requests print and exit 0).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(1);
        }
        _ => {}
    }
    let context = |k| match e.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let what = match e.kind() {
        // The check's own words (`-j abc`: Nix's message about `max-jobs`).
        ErrorKind::ValueValidation => std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| first_line(&e)),
        ErrorKind::UnknownArgument => match context(ContextKind::InvalidArg) {
            Some(a) if a.starts_with('-') => format!("unknown flag '{a}'"),
            Some(a) => format!("unexpected argument '{a}'"),
            None => first_line(&e),
        },
        _ => first_line(&e),
    };
    eprintln!("error: {what}\nTry 'drover --help' for more information.");
    ExitCode::from(1)
}

/// The first line of clap's message, without its `error: `.
fn first_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
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

    #[derive(Debug, thiserror::Error)]
    #[error("creating directory '/x': {source}")]
    struct Doubled {
        source: std::io::Error,
    }

    #[test]
    fn causes_are_printed_once_and_as_strerror() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(Doubled { source: io });
        assert_eq!(
            error_message(&e),
            "creating directory '/x': No such file or directory"
        );
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(13)).context("opening 'f'");
        assert_eq!(error_message(&e), "opening 'f': Permission denied");
        assert_eq!(strip_os_error("a (os error x) b"), "a (os error x) b");
    }

    #[test]
    fn usage_errors_are_nix_like() {
        let e = Cli::try_parse_from(["drover", "realise", "-j", "abc", "x"])
            .err()
            .unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(
            std::error::Error::source(&e).unwrap().to_string(),
            "configuration setting 'max-jobs' should be 'auto' or an integer"
        );
        assert!(Cli::try_parse_from(["drover", "realise", "-j", "2", "x"]).is_ok());
    }
}
