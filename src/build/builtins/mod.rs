//! The builders built into Nix (`builder = "builtin:…"`), run inside drover as Nix
//! 2.8 runs them inside `nix-store` rather than as a program.
//!
//! Nix forks, sets up the build environment as for any builder, and calls the
//! builtin's function in the child with the derivation's environment (input
//! rewrites applied: `out` is the path the output is written to). The child's
//! log is its pty, and its logger is a JSON logger, so what a builtin logs (the
//! `downloading '…'` file-transfer activity of `fetchurl`) arrives as `@nix` lines.
//! A builtin that throws writes the error (`error: …`, in Nix's colours) as the last
//! log line and exits 1. drover does the same on a thread: [`run_builtin`] takes the
//! environment and a log sink and returns the exit status the child would have had,
//! and the output is then registered as any builder's (so a fixed-output
//! `fetchurl` is checked against its `outputHash`).
//!
//! * [`fetchurl`]: `builtin:fetchurl` (`<nix/fetchurl.nix>`);
//! * [`buildenv`]: `builtin:buildenv`, the `nix-env` profile builder;
//! * [`unpack_channel`]: `builtin:unpack-channel` (`nix-channel`).
//!
//! Any other `builtin:` name fails as in Nix: `unsupported builtin builder 'NAME'`.

pub mod buildenv;
pub mod fetchurl;
pub mod unpack_channel;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

use crate::binary_cache::HttpOptions;
use crate::config::Settings;

/// Nix's `ANSI_RED` bold `error:` prefix and `ANSI_WARNING` (bold magenta) for the
/// values Nix's `hintfmt` highlights.
const ERROR_PREFIX: &str = "\x1b[31;1merror:\x1b[0m ";
const WARNING_PREFIX: &str = "\x1b[35;1mwarning:\x1b[0m ";

/// A value as Nix's `hintfmt` shows it (bold magenta).
pub(crate) fn hl(s: impl std::fmt::Display) -> String {
    format!("\x1b[35;1m{s}\x1b[0m")
}

/// An I/O error as Nix's `SysError` words it: the C library's `strerror` text.
pub(crate) fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

/// What the builtins need besides the derivation.
#[derive(Debug, Clone, Default)]
pub struct BuiltinSettings {
    /// `hashed-mirrors`: tried first by a flat `fetchurl`, at
    /// `<mirror>/<algo>/<base16 hash>`.
    pub hashed_mirrors: Vec<String>,
    /// HTTP(S) downloads of `fetchurl` (netrc credentials, timeouts, retries).
    pub http: HttpOptions,
}

impl BuiltinSettings {
    pub fn from_settings(settings: &Settings) -> BuiltinSettings {
        let http = HttpOptions {
            netrc_file: settings
                .get("netrc-file")
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
            ..HttpOptions::default()
        };
        BuiltinSettings {
            hashed_mirrors: settings
                .get("hashed-mirrors")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            http,
        }
    }
}

/// Why a builtin builder failed (its message is Nix's, highlighting included).
#[derive(Debug, Error)]
pub enum BuiltinError {
    #[error("attribute '{}' missing", hl(.0))]
    MissingAttr(String),
    #[error("unsupported builtin builder '{}'", hl(.0))]
    Unsupported(String),
    #[error("unable to download '{url}': {message}")]
    Download { url: String, message: String },
    #[error("{context} '{}': {}", hl(.path.display()), strerror(.source))]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Nar(#[from] crate::nar::NarReadError),
    #[error("{0}")]
    Hash(#[from] crate::hash::HashError),
    /// A message of Nix's with its values already highlighted (collisions, bad
    /// channel tarballs, bad `derivations` lists).
    #[error("{0}")]
    Other(String),
}

impl BuiltinError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> BuiltinError {
        let path = path.into();
        move |source| BuiltinError::Io {
            context,
            path,
            source,
        }
    }
}

/// Where a builtin writes its log (the bytes a forked Nix child writes to its pty).
pub struct BuiltinLog<'a> {
    sink: &'a mut dyn FnMut(&[u8]),
}

/// Activity ids of the builtins' JSON logger: `(pid << 32) + n` as Nix numbers them,
/// from the top half of the counter so they never meet the front end's own ids.
static NEXT_ACTIVITY: AtomicU64 = AtomicU64::new(0);

impl BuiltinLog<'_> {
    pub fn new(sink: &mut dyn FnMut(&[u8])) -> BuiltinLog<'_> {
        BuiltinLog { sink }
    }

    fn line(&mut self, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(b'\n');
        (self.sink)(&b);
    }

    /// A warning, as Nix's JSON logger in the child writes it.
    pub fn warn(&mut self, msg: &str) {
        let v = serde_json::json!({
            "action": "msg",
            "level": 1,
            "msg": format!("{WARNING_PREFIX}{msg}"),
        });
        self.line(&format!("@nix {v}"));
    }

    /// Starts a file-transfer activity (`downloading '<url>'`, level 4 as Nix's).
    pub fn start_download(&mut self, url: &str) -> u64 {
        let id = (u64::from(std::process::id()) << 32)
            | 0x8000_0000
            | (NEXT_ACTIVITY.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff);
        let v = serde_json::json!({
            "action": "start",
            "fields": [url],
            "id": id,
            "level": 4,
            "text": format!("downloading '{url}'"),
            "type": 101,
        });
        self.line(&format!("@nix {v}"));
        id
    }

    /// Progress of a file transfer (`[done, expected, 0, 0]` bytes).
    pub fn progress(&mut self, id: u64, done: u64, expected: u64) {
        let v = serde_json::json!({
            "action": "result",
            "fields": [done, expected, 0, 0],
            "id": id,
            "type": 105,
        });
        self.line(&format!("@nix {v}"));
    }

    pub fn stop(&mut self, id: u64) {
        let v = serde_json::json!({"action": "stop", "id": id});
        self.line(&format!("@nix {v}"));
    }
}

/// The environment a builtin gets: the derivation's, with the input rewrites of
/// the build applied (Nix's `drv2.env`), so `out` names the path to write.
pub fn builtin_env(
    drv: &crate::derivation::Derivation,
    scratch: &super::ScratchOutputs,
) -> BTreeMap<String, String> {
    drv.env
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                super::env::rewrite_strings(v, &scratch.input_rewrites),
            )
        })
        .collect()
}

/// The exit status of a builtin: 0, or 1 when it failed (as Nix's child).
fn status(code: i32) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus::from_raw(code << 8)
}

/// Runs the builtin `builder` (`builtin:NAME`) with the derivation's environment
/// `env` (rewritten as for a builder), writing its log to `log`. A failure is logged
/// as its last line, `error: <message>`, and gives exit status 1.
pub fn run_builtin(
    builder: &str,
    env: &BTreeMap<String, String>,
    settings: &BuiltinSettings,
    log: &mut dyn FnMut(&[u8]),
) -> ExitStatus {
    let mut log = BuiltinLog::new(log);
    match dispatch(builder, env, settings, &mut log) {
        Ok(()) => status(0),
        Err(e) => {
            // As Nix shows an error: further lines indented under the message
            // (empty lines stay empty).
            let msg = e
                .to_string()
                .split('\n')
                .enumerate()
                .map(|(i, l)| match (i, l.is_empty()) {
                    (0, _) | (_, true) => l.to_owned(),
                    _ => format!("       {l}"),
                })
                .collect::<Vec<_>>()
                .join("\n");
            log.line(&format!("{ERROR_PREFIX}{msg}"));
            status(1)
        }
    }
}

fn dispatch(
    builder: &str,
    env: &BTreeMap<String, String>,
    settings: &BuiltinSettings,
    log: &mut BuiltinLog<'_>,
) -> Result<(), BuiltinError> {
    let name = builder.strip_prefix("builtin:").unwrap_or(builder);
    match name {
        "fetchurl" => fetchurl::fetchurl(env, settings, log),
        "buildenv" => buildenv::buildenv(env, log),
        "unpack-channel" => unpack_channel::unpack_channel(env),
        other => Err(BuiltinError::Unsupported(other.to_owned())),
    }
}

/// `getAttr`: a variable of the derivation's environment, which must be there.
pub(crate) fn attr<'a>(
    env: &'a BTreeMap<String, String>,
    name: &str,
) -> Result<&'a str, BuiltinError> {
    env.get(name)
        .map(String::as_str)
        .ok_or_else(|| BuiltinError::MissingAttr(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_builtins_and_missing_attributes_fail_with_nixs_messages() {
        let mut out = Vec::new();
        let st = run_builtin(
            "builtin:frobnicate",
            &BTreeMap::new(),
            &BuiltinSettings::default(),
            &mut |b| out.extend_from_slice(b),
        );
        assert_eq!(st.code(), Some(1));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\x1b[31;1merror:\x1b[0m unsupported builtin builder '\x1b[35;1mfrobnicate\x1b[0m'\n"
        );
        let mut out = Vec::new();
        let st = run_builtin(
            "builtin:fetchurl",
            &BTreeMap::new(),
            &BuiltinSettings::default(),
            &mut |b| out.extend_from_slice(b),
        );
        assert_eq!(st.code(), Some(1));
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("attribute '\x1b[35;1mout\x1b[0m' missing\n"));
    }
}
