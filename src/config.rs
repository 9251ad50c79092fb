//! Settings: the environment variables and `nix.conf` files Nix 2.8 reads.
//!
//! Directories come from the environment, which is passed in as a value ([`Env`]) so
//! nothing here reads the process environment unless asked to
//! ([`Settings::from_process_env`]):
//!
//! * `NIX_STORE_DIR` (else `NIX_STORE`, else `/nix/store`), `NIX_STATE_DIR`
//!   (`/nix/var/nix`), `NIX_LOG_DIR` (`/nix/var/log/nix`), `NIX_CONF_DIR` (`/etc/nix`),
//!   `NIX_LIBEXEC_DIR` (`/usr/libexec`, for the default `build-hook`). Nix 2.8 does
//!   not read `NIX_LOCALSTATE_DIR`; drover uses it (`<dir>/nix`, `<dir>/log/nix`)
//!   only as the default of the state and log dirs when those are unset.
//! * `TMPDIR` (else `/tmp`): where build directories go (2.8 has no `build-dir`).
//! * `NIX_REMOTE_SYSTEMS` (`a:b` → `builders = @a @b`), kept for compatibility.
//!
//! Configuration is applied in Nix's order: `$NIX_CONF_DIR/nix.conf`, then the user
//! files (`NIX_USER_CONF_FILES`, `:`-separated, else `$XDG_CONFIG_HOME` (default
//! `~/.config`) and each of `$XDG_CONFIG_DIRS` (default `/etc/xdg`) + `/nix/nix.conf`)
//! applied last-to-first so the first one wins, then the contents of `NIX_CONFIG`,
//! then `--option NAME VALUE`s. A missing file is skipped silently.
//!
//! A file is read line by line: everything from `#` on is a comment; the line is split
//! on whitespace; `include PATH` / `!include PATH` read another file (relative to the
//! including file's directory; `!include` skips a missing one); otherwise the line
//! must be `NAME = VALUE…` with `=` a separate token, and the value is the remaining
//! tokens joined by single spaces. `extra-NAME` appends to a list setting. Later
//! assignments override earlier ones. Names may be aliases (`build-max-jobs`).
//!
//! Every setting Nix 2.8 knows is accepted (values of those drover reads are checked
//! when set, as Nix does); an unknown name, in a configuration file or given with
//! `--option`, is remembered and reported as `unknown setting 'NAME'` by
//! [`Settings::warnings`] (Nix prints these as warnings, `nix-store --option
//! max-log-size 1` included).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::store_path::{StoreDir, StorePathError};

/// Environment variables, as a value.
pub type Env = BTreeMap<String, String>;

/// Nix's error for a derivation or command that needs an experimental feature the
/// settings do not enable (e.g. `ca-derivations`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("experimental Nix feature '{0}' is disabled; use '--extra-experimental-features {0}' to override")]
pub struct MissingExperimentalFeature(pub String);

/// Why settings could not be loaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("illegal configuration line '{text}' in '{file}' (line {line})")]
    IllegalLine {
        file: String,
        line: usize,
        text: String,
    },
    #[error("file '{included}' included from '{file}' (line {line}) not found")]
    IncludeNotFound {
        file: String,
        line: usize,
        included: String,
    },
    #[error("setting '{name}' has invalid value '{value}' (expected {expected}) in '{file}' (line {line})")]
    InvalidValue {
        file: String,
        line: usize,
        name: String,
        value: String,
        expected: &'static str,
    },
    #[error("include depth exceeded in '{0}' (recursive include?)")]
    IncludeTooDeep(String),
    #[error("environment variable {var}='{value}' is not an absolute path")]
    NotAbsolute { var: String, value: String },
    #[error("invalid store directory: {0}")]
    StoreDir(#[from] StorePathError),
}

/// The type of a setting's value, which decides how it is checked and appended to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    /// Unsigned integer.
    UInt,
    /// Signed integer (`time_t` settings).
    Int,
    /// `max-jobs`: `auto` or an unsigned integer.
    MaxJobs,
    /// `sandbox`: `true`, `false` or `relaxed`.
    Sandbox,
    /// A string (the whole value).
    Str,
    /// An ordered list of whitespace-separated words (appendable).
    List,
    /// A sorted set of words (appendable).
    Set,
    /// `key=value` words (appendable).
    Map,
    /// `experimental-features` (appendable, unknown features warn).
    Features,
}

struct Def {
    name: &'static str,
    aliases: &'static [&'static str],
    kind: Kind,
}

const fn d(name: &'static str, aliases: &'static [&'static str], kind: Kind) -> Def {
    Def {
        name,
        aliases,
        kind,
    }
}

/// Every global setting of Nix 2.8.0 (as `nix show-config --json` lists them) with its
/// aliases.
static DEFS: &[Def] = &[
    d("accept-flake-config", &[], Kind::Bool),
    d("access-tokens", &[], Kind::Map),
    d("allow-dirty", &[], Kind::Bool),
    d("allow-import-from-derivation", &[], Kind::Bool),
    d("allow-new-privileges", &[], Kind::Bool),
    d("allow-symlinked-store", &[], Kind::Bool),
    d(
        "allow-unsafe-native-code-during-evaluation",
        &[],
        Kind::Bool,
    ),
    d("allowed-impure-host-deps", &[], Kind::Set),
    d("allowed-uris", &[], Kind::List),
    d("allowed-users", &[], Kind::List),
    d("auto-optimise-store", &[], Kind::Bool),
    d("bash-prompt", &[], Kind::Str),
    d("bash-prompt-suffix", &[], Kind::Str),
    d("build-hook", &[], Kind::Str),
    d("build-poll-interval", &[], Kind::UInt),
    d("build-users-group", &[], Kind::Str),
    d("builders", &[], Kind::Str),
    d("builders-use-substitutes", &[], Kind::Bool),
    d("commit-lockfile-summary", &[], Kind::Str),
    d("compress-build-log", &["build-compress-log"], Kind::Bool),
    d("connect-timeout", &[], Kind::UInt),
    d("cores", &["build-cores"], Kind::UInt),
    d("diff-hook", &[], Kind::Str),
    d("download-attempts", &[], Kind::UInt),
    d("enforce-determinism", &[], Kind::Bool),
    d("eval-cache", &[], Kind::Bool),
    d("experimental-features", &[], Kind::Features),
    d("extra-platforms", &[], Kind::Set),
    d("fallback", &["build-fallback"], Kind::Bool),
    d("filter-syscalls", &[], Kind::Bool),
    d("flake-registry", &[], Kind::Str),
    d("fsync-metadata", &[], Kind::Bool),
    d("gc-reserved-space", &[], Kind::UInt),
    d("hashed-mirrors", &[], Kind::List),
    d(
        "http-connections",
        &["binary-caches-parallel-connections"],
        Kind::UInt,
    ),
    d("http2", &[], Kind::Bool),
    d("ignored-acls", &[], Kind::Set),
    d(
        "impersonate-linux-26",
        &["build-impersonate-linux-26"],
        Kind::Bool,
    ),
    d("keep-build-log", &["build-keep-log"], Kind::Bool),
    d("keep-derivations", &["gc-keep-derivations"], Kind::Bool),
    d(
        "keep-env-derivations",
        &["env-keep-derivations"],
        Kind::Bool,
    ),
    d("keep-failed", &[], Kind::Bool),
    d("keep-going", &[], Kind::Bool),
    d("keep-outputs", &["gc-keep-outputs"], Kind::Bool),
    d("log-lines", &[], Kind::UInt),
    d("max-build-log-size", &["build-max-log-size"], Kind::UInt),
    d("max-free", &[], Kind::UInt),
    d("max-jobs", &["build-max-jobs"], Kind::MaxJobs),
    d("max-silent-time", &["build-max-silent-time"], Kind::Int),
    d("min-free", &[], Kind::UInt),
    d("min-free-check-interval", &[], Kind::UInt),
    d("nar-buffer-size", &[], Kind::UInt),
    d("narinfo-cache-negative-ttl", &[], Kind::UInt),
    d("narinfo-cache-positive-ttl", &[], Kind::UInt),
    d("netrc-file", &[], Kind::Str),
    d("nix-path", &[], Kind::List),
    d("plugin-files", &[], Kind::List),
    d("post-build-hook", &[], Kind::Str),
    d("pre-build-hook", &[], Kind::Str),
    d("preallocate-contents", &[], Kind::Bool),
    d("print-missing", &[], Kind::Bool),
    d("pure-eval", &[], Kind::Bool),
    d("repeat", &["build-repeat"], Kind::UInt),
    d("require-sigs", &[], Kind::Bool),
    d("restrict-eval", &[], Kind::Bool),
    d("run-diff-hook", &[], Kind::Bool),
    d(
        "sandbox",
        &["build-use-chroot", "build-use-sandbox"],
        Kind::Sandbox,
    ),
    d("sandbox-build-dir", &[], Kind::Str),
    d("sandbox-dev-shm-size", &[], Kind::Str),
    d("sandbox-fallback", &[], Kind::Bool),
    d(
        "sandbox-paths",
        &["build-chroot-dirs", "build-sandbox-paths"],
        Kind::Set,
    ),
    d("secret-key-files", &[], Kind::List),
    d("show-trace", &[], Kind::Bool),
    d("stalled-download-timeout", &[], Kind::UInt),
    d("store", &[], Kind::Str),
    d("substitute", &["build-use-substitutes"], Kind::Bool),
    d("substituters", &["binary-caches"], Kind::List),
    d("sync-before-registering", &[], Kind::Bool),
    d("system", &[], Kind::Str),
    d("system-features", &[], Kind::Set),
    d("tarball-ttl", &[], Kind::UInt),
    d("timeout", &["build-timeout"], Kind::Int),
    d("trace-function-calls", &[], Kind::Bool),
    d(
        "trusted-public-keys",
        &["binary-cache-public-keys"],
        Kind::List,
    ),
    d(
        "trusted-substituters",
        &["trusted-binary-caches"],
        Kind::Set,
    ),
    d("trusted-users", &[], Kind::List),
    d("use-case-hack", &[], Kind::Bool),
    d("use-registries", &[], Kind::Bool),
    d("use-sqlite-wal", &[], Kind::Bool),
    d("user-agent-suffix", &[], Kind::Str),
    d("warn-dirty", &[], Kind::Bool),
];

/// The experimental features Nix 2.8.0 knows.
pub const KNOWN_EXPERIMENTAL_FEATURES: &[&str] = &[
    "ca-derivations",
    "impure-derivations",
    "flakes",
    "nix-command",
    "recursive-nix",
    "no-url-literals",
    "fetch-closure",
];

fn lookup(name: &str) -> Option<&'static Def> {
    DEFS.iter()
        .find(|d| d.name == name || d.aliases.contains(&name))
}

/// `sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    Enabled,
    Relaxed,
    Disabled,
}

/// A checked value of a setting that was set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Scalar(String),
    Words(Vec<String>),
}

/// Where a value came from, for error messages.
struct Origin<'a> {
    file: &'a str,
    line: usize,
}

/// Nix's settings, resolved from an environment, `nix.conf` files and `--option`s.
#[derive(Debug, Clone)]
pub struct Settings {
    store_dir: StoreDir,
    state_dir: PathBuf,
    log_dir: PathBuf,
    conf_dir: PathBuf,
    libexec_dir: PathBuf,
    tmp_dir: PathBuf,
    user_conf_files: Vec<PathBuf>,
    /// Set values, keyed by canonical setting name.
    values: BTreeMap<&'static str, Value>,
    /// Unknown names with their last value (Nix keeps a map, so each warns once).
    unknown: BTreeMap<String, String>,
    /// Warnings given while setting values (e.g. unknown experimental features).
    immediate_warnings: Vec<String>,
}

/// Nix's `canonPath` without following symlinks: absolute, no `.`/`..`/`//`, no
/// trailing slash.
fn canon_path(var: &str, value: &str) -> Result<String, ConfigError> {
    if !value.starts_with('/') {
        return Err(ConfigError::NotAbsolute {
            var: var.to_owned(),
            value: value.to_owned(),
        });
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in value.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn env_dir(env: &Env, var: &str, default: &str) -> Result<PathBuf, ConfigError> {
    let v = env.get(var).map(String::as_str).unwrap_or(default);
    Ok(PathBuf::from(canon_path(var, v)?))
}

/// Splits like Nix's `tokenizeString`: on spaces, tabs, newlines and carriage returns.
fn tokenize(s: &str) -> Vec<String> {
    s.split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The user configuration files, highest priority first.
fn user_conf_files(env: &Env) -> Vec<PathBuf> {
    if let Some(files) = env.get("NIX_USER_CONF_FILES") {
        return files
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    let mut dirs = Vec::new();
    let home = env.get("HOME").cloned().or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.dir.to_string_lossy().into_owned())
    });
    match env.get("XDG_CONFIG_HOME") {
        Some(d) => dirs.push(d.clone()),
        None => {
            if let Some(h) = home {
                dirs.push(format!("{h}/.config"));
            }
        }
    }
    let xdg_dirs = env
        .get("XDG_CONFIG_DIRS")
        .map(String::as_str)
        .unwrap_or("/etc/xdg");
    dirs.extend(
        xdg_dirs
            .split(':')
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    );
    dirs.into_iter()
        .map(|d| PathBuf::from(format!("{d}/nix/nix.conf")))
        .collect()
}

/// Nix's `system` for the machine drover was compiled for (`x86_64-linux`).
pub fn native_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

fn cpu_count() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
}

const MAX_INCLUDE_DEPTH: usize = 32;

/// The warning Nix 2.8 prints for an `--option` it could not set: the text of its
/// usage error, `error: ` included.
fn option_warning(e: &ConfigError) -> String {
    match e {
        ConfigError::InvalidValue {
            name,
            value,
            expected,
            ..
        } => {
            let msg = match *expected {
                "'auto' or an integer" => {
                    format!("configuration setting '{name}' should be 'auto' or an integer")
                }
                "a Boolean" => format!("Boolean setting '{name}' has invalid value '{value}'"),
                "'true', 'false' or 'relaxed'" => {
                    format!("option '{name}' has invalid value '{value}'")
                }
                _ => format!("setting '{name}' has invalid value '{value}'"),
            };
            format!("error: {msg}")
        }
        e => e.to_string(),
    }
}

impl Settings {
    /// Settings with the directories from `env` and nothing set (no files read).
    pub fn defaults(env: &Env) -> Result<Settings, ConfigError> {
        let store = env
            .get("NIX_STORE_DIR")
            .or_else(|| env.get("NIX_STORE"))
            .map(String::as_str)
            .unwrap_or("/nix/store");
        let store_dir = StoreDir::new(canon_path("NIX_STORE_DIR", store)?)?;
        let (state_default, log_default) = match env.get("NIX_LOCALSTATE_DIR") {
            Some(l) => (format!("{l}/nix"), format!("{l}/log/nix")),
            None => ("/nix/var/nix".to_owned(), "/nix/var/log/nix".to_owned()),
        };
        let mut s = Settings {
            store_dir,
            state_dir: env_dir(env, "NIX_STATE_DIR", &state_default)?,
            log_dir: env_dir(env, "NIX_LOG_DIR", &log_default)?,
            conf_dir: env_dir(env, "NIX_CONF_DIR", "/etc/nix")?,
            libexec_dir: env_dir(env, "NIX_LIBEXEC_DIR", "/usr/libexec")?,
            tmp_dir: env_dir(env, "TMPDIR", "/tmp")?,
            user_conf_files: user_conf_files(env),
            values: BTreeMap::new(),
            unknown: BTreeMap::new(),
            immediate_warnings: Vec::new(),
        };
        if let Some(systems) = env.get("NIX_REMOTE_SYSTEMS") {
            let builders: Vec<String> = systems
                .split(':')
                .filter(|p| !p.is_empty())
                .map(|p| format!("@{p}"))
                .collect();
            s.values
                .insert("builders", Value::Scalar(builders.join(" ")));
        }
        Ok(s)
    }

    /// Loads settings as a Nix command does: the environment, `nix.conf`, user
    /// configuration files, `NIX_CONFIG`, then `options` (`--option NAME VALUE`).
    /// Warnings (unknown settings, …) are logged and kept in [`Settings::warnings`].
    pub fn load(env: &Env, options: &[(String, String)]) -> Result<Settings, ConfigError> {
        let mut s = Settings::defaults(env)?;
        let main = s.conf_dir.join("nix.conf");
        s.apply_config_file(&main)?;
        for f in s.user_conf_files.clone().iter().rev() {
            s.apply_config_file(f)?;
        }
        if let Some(c) = env.get("NIX_CONFIG") {
            s.apply_config(c, "NIX_CONFIG")?;
        }
        for (name, value) in options {
            s.apply_option(name, value);
        }
        for w in s.warnings() {
            log::warn!("{w}");
        }
        Ok(s)
    }

    /// Settings for a self-contained store rooted in `dir` — the store at
    /// `<dir>/store`, state in `<dir>/var/nix`, logs in `<dir>/var/log/nix`, no
    /// `nix.conf` read from outside, builds as the invoking user without a sandbox
    /// (`sandbox = false`, `build-users-group =`) — plus the
    /// `nix.conf` lines in `extra_config`. For tests (feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub fn for_root(dir: &Path, extra_config: &str) -> Result<Settings, ConfigError> {
        let path = |p: &str| dir.join(p).display().to_string();
        let env: Env = [
            ("NIX_STORE_DIR", path("store")),
            ("NIX_STATE_DIR", path("var/nix")),
            ("NIX_LOG_DIR", path("var/log/nix")),
            ("NIX_CONF_DIR", path("etc")),
            ("NIX_USER_CONF_FILES", String::new()),
            (
                "NIX_CONFIG",
                format!("sandbox = false\nbuild-users-group =\n{extra_config}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Settings::load(&env, &[])
    }

    /// [`Settings::load`] with the process environment.
    pub fn from_process_env(options: &[(String, String)]) -> Result<Settings, ConfigError> {
        let env: Env = std::env::vars().collect();
        Settings::load(&env, options)
    }

    /// Reads and applies a configuration file; a file that cannot be read is skipped
    /// (as Nix does).
    pub fn apply_config_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        self.apply_config_file_at(path, 0)
    }

    fn apply_config_file_at(&mut self, path: &Path, depth: usize) -> Result<(), ConfigError> {
        if depth > MAX_INCLUDE_DEPTH {
            return Err(ConfigError::IncludeTooDeep(path.display().to_string()));
        }
        match std::fs::read(path) {
            Ok(bytes) => {
                let contents = String::from_utf8_lossy(&bytes);
                self.apply_config_at(&contents, &path.display().to_string(), depth)
            }
            Err(e) => {
                log::debug!("skipping configuration file '{}': {e}", path.display());
                Ok(())
            }
        }
    }

    /// Applies the contents of a configuration file; `path` names it in errors and is
    /// the base of relative includes.
    pub fn apply_config(&mut self, contents: &str, path: &str) -> Result<(), ConfigError> {
        self.apply_config_at(contents, path, 0)
    }

    fn apply_config_at(
        &mut self,
        contents: &str,
        path: &str,
        depth: usize,
    ) -> Result<(), ConfigError> {
        for (i, raw) in contents.split('\n').enumerate() {
            let line_no = i + 1;
            let line = raw.split('#').next().unwrap_or_default();
            let tokens = tokenize(line);
            if tokens.is_empty() {
                continue;
            }
            let illegal = || ConfigError::IllegalLine {
                file: path.to_owned(),
                line: line_no,
                text: line.to_owned(),
            };
            if tokens.len() < 2 {
                return Err(illegal());
            }
            let (include, ignore_missing) = match tokens[0].as_str() {
                "include" => (true, false),
                "!include" => (true, true),
                _ => (false, false),
            };
            if include {
                if tokens.len() != 2 {
                    return Err(illegal());
                }
                let base = Path::new(path).parent().unwrap_or(Path::new("."));
                let included = base.join(&tokens[1]);
                if included.exists() {
                    self.apply_config_file_at(&included, depth + 1)?;
                } else if !ignore_missing {
                    return Err(ConfigError::IncludeNotFound {
                        file: path.to_owned(),
                        line: line_no,
                        included: included.display().to_string(),
                    });
                }
                continue;
            }
            if tokens[1] != "=" {
                return Err(illegal());
            }
            let value = tokens[2..].join(" ");
            self.set_at(
                &tokens[0],
                &value,
                &Origin {
                    file: path,
                    line: line_no,
                },
            )?;
        }
        Ok(())
    }

    /// Applies `--option NAME VALUE`: like a configuration line, except that an
    /// invalid value only gives a warning (as in Nix, which words it as the usage
    /// error it caught: `warning: error: setting 'cores' has invalid value 'x'`).
    pub fn apply_option(&mut self, name: &str, value: &str) {
        if let Err(e) = self.set_at(
            name,
            value,
            &Origin {
                file: "--option",
                line: 0,
            },
        ) {
            self.immediate_warnings.push(option_warning(&e));
        }
    }

    /// Sets `name` (a setting, an alias or `extra-<list setting>`) to `value`.
    /// Returns `false` (and remembers the name for a warning) when it is unknown.
    pub fn set(&mut self, name: &str, value: &str) -> Result<bool, ConfigError> {
        self.set_at(
            name,
            value,
            &Origin {
                file: "(set)",
                line: 0,
            },
        )
    }

    fn set_at(&mut self, name: &str, value: &str, origin: &Origin) -> Result<bool, ConfigError> {
        let (def, append) = match lookup(name) {
            Some(def) => (def, false),
            None => match name.strip_prefix("extra-").and_then(lookup) {
                Some(def)
                    if matches!(
                        def.kind,
                        Kind::List | Kind::Set | Kind::Map | Kind::Features
                    ) =>
                {
                    (def, true)
                }
                _ => {
                    // Unknown names of `--option` are warned about too, as
                    // `nix-store` 2.8 does (`warning: unknown setting 'NAME'`).
                    self.unknown.insert(name.to_owned(), value.to_owned());
                    return Ok(false);
                }
            },
        };
        let invalid = |expected| ConfigError::InvalidValue {
            file: origin.file.to_owned(),
            line: origin.line,
            name: name.to_owned(),
            value: value.to_owned(),
            expected,
        };
        let new = match def.kind {
            Kind::Bool => match value {
                "true" | "yes" | "1" => Value::Scalar("true".into()),
                "false" | "no" | "0" => Value::Scalar("false".into()),
                _ => return Err(invalid("a Boolean")),
            },
            Kind::UInt => {
                value
                    .parse::<u64>()
                    .map_err(|_| invalid("an unsigned integer"))?;
                Value::Scalar(value.to_owned())
            }
            Kind::Int => {
                value.parse::<i64>().map_err(|_| invalid("an integer"))?;
                Value::Scalar(value.to_owned())
            }
            Kind::MaxJobs => {
                if value != "auto" {
                    value
                        .parse::<u64>()
                        .map_err(|_| invalid("'auto' or an integer"))?;
                }
                Value::Scalar(value.to_owned())
            }
            Kind::Sandbox => match value {
                "true" | "false" | "relaxed" => Value::Scalar(value.to_owned()),
                _ => return Err(invalid("'true', 'false' or 'relaxed'")),
            },
            Kind::Str => Value::Scalar(value.to_owned()),
            Kind::List | Kind::Set | Kind::Map | Kind::Features => {
                let mut words = if append {
                    match self.values.get(def.name) {
                        Some(Value::Words(w)) => w.clone(),
                        _ => self.default_words(def.name),
                    }
                } else {
                    Vec::new()
                };
                for w in tokenize(value) {
                    if def.kind == Kind::Features
                        && !KNOWN_EXPERIMENTAL_FEATURES.contains(&w.as_str())
                    {
                        self.immediate_warnings
                            .push(format!("unknown experimental feature '{w}'"));
                        continue;
                    }
                    words.push(w);
                }
                if matches!(def.kind, Kind::Set | Kind::Features) {
                    let set: BTreeSet<String> = words.into_iter().collect();
                    words = set.into_iter().collect();
                }
                Value::Words(words)
            }
        };
        self.values.insert(def.name, new);
        Ok(true)
    }

    /// Warnings to print (each without the `warning: ` prefix): problems met while
    /// setting values, then `unknown setting 'NAME'` for each unknown name, sorted.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = self.immediate_warnings.clone();
        w.extend(
            self.unknown
                .keys()
                .map(|n| format!("unknown setting '{n}'")),
        );
        w
    }

    /// The name of the setting `name` stands for: itself, the setting it is an
    /// alias of, or for `extra-<list setting>` that setting; `None` if unknown.
    pub fn canonical_name(name: &str) -> Option<&'static str> {
        lookup(name)
            .or_else(|| name.strip_prefix("extra-").and_then(lookup))
            .map(|d| d.name)
    }

    /// Whether `name` (or one of its aliases) was set explicitly.
    pub fn is_set(&self, name: &str) -> bool {
        lookup(name).is_some_and(|d| self.values.contains_key(d.name))
    }

    /// The value of a known setting as Nix prints it (`nix show-config`), with its
    /// default when unset; `None` for unknown names.
    pub fn get(&self, name: &str) -> Option<String> {
        let def = lookup(name)?;
        Some(match self.values.get(def.name) {
            Some(Value::Scalar(s)) => s.clone(),
            Some(Value::Words(w)) => w.join(" "),
            None => match def.kind {
                Kind::List | Kind::Set | Kind::Map | Kind::Features => {
                    self.default_words(def.name).join(" ")
                }
                _ => self.default_scalar(def.name),
            },
        })
    }

    fn default_words(&self, name: &str) -> Vec<String> {
        let v: Vec<&str> = match name {
            "substituters" => vec!["https://cache.nixos.org/"],
            "trusted-public-keys" => {
                vec!["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
            }
            "allowed-users" => vec!["*"],
            "trusted-users" => vec!["root"],
            "ignored-acls" => vec!["security.selinux", "system.nfs4_acl"],
            "system-features" => {
                let mut f = vec!["benchmark", "big-parallel"];
                if nix::unistd::access(
                    "/dev/kvm",
                    nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
                )
                .is_ok()
                {
                    f.push("kvm");
                }
                f.push("nixos-test");
                f
            }
            _ => vec![],
        };
        v.into_iter().map(str::to_owned).collect()
    }

    fn default_scalar(&self, name: &str) -> String {
        match name {
            "max-jobs" => "1".into(),
            "cores" => cpu_count().to_string(),
            "log-lines" => "10".into(),
            "system" => native_system(),
            "build-hook" => format!("{}/nix/build-remote", self.libexec_dir.display()),
            "builders" => format!("@{}/machines", self.conf_dir.display()),
            "sandbox" => if cfg!(target_os = "linux") {
                "true"
            } else {
                "false"
            }
            .into(),
            "require-sigs"
            | "compress-build-log"
            | "fsync-metadata"
            | "use-sqlite-wal"
            | "substitute"
            | "keep-build-log"
            | "keep-derivations"
            | "print-missing"
            | "sandbox-fallback"
            | "enforce-determinism"
            | "filter-syscalls"
            | "allow-dirty"
            | "allow-import-from-derivation"
            | "eval-cache"
            | "http2"
            | "use-registries"
            | "warn-dirty" => "true".into(),
            "gc-reserved-space" => (8u64 * 1024 * 1024).to_string(),
            "build-poll-interval" | "min-free-check-interval" | "download-attempts" => "5".into(),
            "sandbox-build-dir" => "/build".into(),
            "sandbox-dev-shm-size" => "50%".into(),
            "build-users-group" => {
                if nix::unistd::geteuid().is_root() {
                    "nixbld".into()
                } else {
                    String::new()
                }
            }
            "netrc-file" => format!("{}/netrc", self.conf_dir.display()),
            "http-connections" => "25".into(),
            "tarball-ttl" | "narinfo-cache-negative-ttl" => "3600".into(),
            "narinfo-cache-positive-ttl" => (30 * 24 * 3600).to_string(),
            "stalled-download-timeout" => "300".into(),
            "nar-buffer-size" => (32u64 * 1024 * 1024).to_string(),
            "max-free" => u64::MAX.to_string(),
            "flake-registry" => {
                "https://github.com/NixOS/flake-registry/raw/master/flake-registry.json".into()
            }
            _ => match lookup(name).map(|d| d.kind) {
                Some(Kind::Bool) => "false".into(),
                Some(Kind::UInt | Kind::Int) => "0".into(),
                _ => String::new(),
            },
        }
    }

    fn bool(&self, name: &str) -> bool {
        self.get(name).as_deref() == Some("true")
    }

    fn uint(&self, name: &str) -> u64 {
        self.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    fn int(&self, name: &str) -> i64 {
        self.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    fn words(&self, name: &str) -> Vec<String> {
        self.get(name).map(|v| tokenize(&v)).unwrap_or_default()
    }

    fn opt_string(&self, name: &str) -> Option<String> {
        self.get(name).filter(|s| !s.is_empty())
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// These settings for another local store (a `--store local?state=…` URI):
    /// the same values, with that store's store, state and log directories.
    pub fn for_local_store(
        &self,
        store_dir: StoreDir,
        state_dir: PathBuf,
        log_dir: PathBuf,
    ) -> Settings {
        Settings {
            store_dir,
            state_dir,
            log_dir,
            ..self.clone()
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    /// The user configuration files Nix reads, highest priority first.
    pub fn user_conf_files(&self) -> &[PathBuf] {
        &self.user_conf_files
    }

    /// Where build directories are created (`$TMPDIR`, else `/tmp`).
    pub fn build_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// `max-jobs` (`auto` = the number of CPUs).
    pub fn max_jobs(&self) -> u64 {
        match self.get("max-jobs").as_deref() {
            Some("auto") => cpu_count(),
            Some(v) => v.parse().unwrap_or(1),
            None => 1,
        }
    }

    /// `cores` (default: the number of CPUs; 0 means "all" to builders).
    pub fn cores(&self) -> u64 {
        self.uint("cores")
    }

    /// `substituters` (with any `extra-substituters` appended).
    pub fn substituters(&self) -> Vec<String> {
        self.words("substituters")
    }

    pub fn trusted_public_keys(&self) -> Vec<String> {
        self.words("trusted-public-keys")
    }

    pub fn require_sigs(&self) -> bool {
        self.bool("require-sigs")
    }

    /// `build-hook`; `None` when set to the empty string (no hook).
    pub fn build_hook(&self) -> Option<String> {
        self.opt_string("build-hook")
    }

    /// `builders` (a `;`/newline-separated machine list or `@file`).
    pub fn builders(&self) -> String {
        self.get("builders").unwrap_or_default()
    }

    /// The machine lines of `builders` as Nix 2.8's `getMachines` expands them:
    /// split on newlines and `;`, trimmed, `#` comments removed, `@FILE` replaced by
    /// the lines of that file (a missing or unreadable file gives none; includes
    /// nest at most 10 deep). Nix's worker only asks whether there are any: with
    /// `max-jobs = 0` and none, `either increase '--max-jobs' or enable remote
    /// builds`, else `remote machines may not have all required system features`.
    pub fn builder_lines(&self) -> Vec<String> {
        fn expand(text: &str, depth: u32, out: &mut Vec<String>) {
            for line in text.split(['\n', ';']) {
                let line = line.trim();
                let line = line.split('#').next().unwrap_or_default().trim_end();
                if line.is_empty() {
                    continue;
                }
                match line.strip_prefix('@') {
                    Some(path) if depth < 10 => {
                        if let Ok(t) = std::fs::read_to_string(path.trim()) {
                            expand(&t, depth + 1, out);
                        }
                    }
                    Some(_) => {}
                    None => out.push(line.to_owned()),
                }
            }
        }
        let mut out = Vec::new();
        expand(&self.builders(), 0, &mut out);
        out
    }

    pub fn keep_going(&self) -> bool {
        self.bool("keep-going")
    }

    pub fn fallback(&self) -> bool {
        self.bool("fallback")
    }

    pub fn keep_failed(&self) -> bool {
        self.bool("keep-failed")
    }

    /// `timeout` in seconds; 0 = none.
    pub fn timeout(&self) -> i64 {
        self.int("timeout")
    }

    /// `max-silent-time` in seconds; 0 = none.
    pub fn max_silent_time(&self) -> i64 {
        self.int("max-silent-time")
    }

    /// `max-build-log-size` in bytes; 0 = unlimited.
    pub fn max_build_log_size(&self) -> u64 {
        self.uint("max-build-log-size")
    }

    pub fn compress_build_log(&self) -> bool {
        self.bool("compress-build-log")
    }

    pub fn log_lines(&self) -> u64 {
        self.uint("log-lines")
    }

    /// `post-build-hook`; `None` when empty.
    pub fn post_build_hook(&self) -> Option<String> {
        self.opt_string("post-build-hook")
    }

    pub fn sandbox(&self) -> SandboxMode {
        match self.get("sandbox").as_deref() {
            Some("true") => SandboxMode::Enabled,
            Some("relaxed") => SandboxMode::Relaxed,
            _ => SandboxMode::Disabled,
        }
    }

    /// `sandbox-fallback`: build unsandboxed when the kernel cannot make the namespaces.
    pub fn sandbox_fallback(&self) -> bool {
        self.bool("sandbox-fallback")
    }

    /// `sandbox-paths` (plus `extra-sandbox-paths`): `target[=source][?]` entries.
    pub fn sandbox_paths(&self) -> Vec<String> {
        self.words("sandbox-paths")
    }

    /// `pre-build-hook` (run before sandboxed builds); `None` when empty.
    pub fn pre_build_hook(&self) -> Option<String> {
        self.opt_string("pre-build-hook")
    }

    /// `allowed-impure-host-deps`: prefixes `__impureHostDeps` may name.
    pub fn allowed_impure_host_deps(&self) -> Vec<String> {
        self.words("allowed-impure-host-deps")
    }

    /// `sandbox-build-dir` (`/build`).
    pub fn sandbox_build_dir(&self) -> String {
        self.get("sandbox-build-dir")
            .unwrap_or_else(|| "/build".into())
    }

    /// `sandbox-dev-shm-size` (`50%`).
    pub fn sandbox_dev_shm_size(&self) -> String {
        self.get("sandbox-dev-shm-size")
            .unwrap_or_else(|| "50%".into())
    }

    pub fn system(&self) -> String {
        self.get("system").unwrap_or_else(native_system)
    }

    /// The local store's system features, as Nix 2.8's `StoreConfig` computes
    /// them: the `system-features` setting, plus `ca-derivations` and
    /// `recursive-nix` when those experimental features are enabled (the hook is
    /// still sent the setting itself, without them).
    pub fn system_features(&self) -> BTreeSet<String> {
        let mut f: BTreeSet<String> = self.words("system-features").into_iter().collect();
        for xp in ["ca-derivations", "recursive-nix"] {
            if self.is_experimental_feature_enabled(xp) {
                f.insert(xp.to_owned());
            }
        }
        f
    }

    pub fn extra_platforms(&self) -> BTreeSet<String> {
        self.words("extra-platforms").into_iter().collect()
    }

    pub fn experimental_features(&self) -> BTreeSet<String> {
        self.words("experimental-features").into_iter().collect()
    }

    pub fn is_experimental_feature_enabled(&self, feature: &str) -> bool {
        self.experimental_features().contains(feature)
    }

    pub fn fsync_metadata(&self) -> bool {
        self.bool("fsync-metadata")
    }

    /// `sync-before-registering`: `sync()` before new paths become valid.
    pub fn sync_before_registering(&self) -> bool {
        self.bool("sync-before-registering")
    }

    pub fn use_sqlite_wal(&self) -> bool {
        self.bool("use-sqlite-wal")
    }

    /// `build-users-group` (`nixbld` by default when running as root).
    pub fn build_users_group(&self) -> Option<String> {
        self.opt_string("build-users-group")
    }

    /// `gc-reserved-space` in bytes (the size of `db/reserved`).
    pub fn gc_reserved_space(&self) -> u64 {
        self.uint("gc-reserved-space")
    }

    /// `secret-key-files`: keys every locally built path and realisation is signed with.
    pub fn secret_key_files(&self) -> Vec<PathBuf> {
        self.words("secret-key-files")
            .into_iter()
            .map(PathBuf::from)
            .collect()
    }

    /// `auto-optimise-store`: hard-link identical files of new paths through `.links`.
    pub fn auto_optimise_store(&self) -> bool {
        self.bool("auto-optimise-store")
    }

    /// `keep-outputs` (`gc-keep-outputs`): the collector keeps live derivations' outputs.
    pub fn gc_keep_outputs(&self) -> bool {
        self.bool("keep-outputs")
    }

    /// `keep-derivations` (`gc-keep-derivations`, on by default): the collector keeps
    /// the derivers of live paths.
    pub fn gc_keep_derivations(&self) -> bool {
        self.bool("keep-derivations")
    }

    /// `repeat` (`build-repeat`): how many more times each build is run to compare.
    pub fn repeat(&self) -> u64 {
        self.uint("repeat")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(root: &Path) -> Env {
        let mut e = Env::new();
        e.insert(
            "NIX_CONF_DIR".into(),
            root.join("etc").display().to_string(),
        );
        e.insert(
            "NIX_STORE_DIR".into(),
            root.join("store").display().to_string(),
        );
        e.insert("NIX_USER_CONF_FILES".into(), String::new());
        e
    }

    fn write(root: &Path, rel: &str, s: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn defaults() {
        let e = Env::new();
        let s = Settings::defaults(&e).unwrap();
        assert_eq!(s.store_dir().as_str(), "/nix/store");
        assert_eq!(s.state_dir(), Path::new("/nix/var/nix"));
        assert_eq!(s.log_dir(), Path::new("/nix/var/log/nix"));
        assert_eq!(s.max_jobs(), 1);
        assert!(s.require_sigs());
        assert_eq!(s.substituters(), vec!["https://cache.nixos.org/"]);
        assert_eq!(s.log_lines(), 10);
        assert!(s.compress_build_log());
        assert_eq!(s.builders(), "@/etc/nix/machines");
        assert_eq!(
            s.build_hook().as_deref(),
            Some("/usr/libexec/nix/build-remote")
        );
        assert_eq!(s.timeout(), 0);
        assert!(s.fsync_metadata());
        assert!(!s.keep_failed());
        assert!(s.system_features().contains("big-parallel"));
        assert!(!s.system_features().contains("ca-derivations"));
        assert_eq!(s.system(), native_system());
    }

    #[test]
    fn builder_lines_expand_files_as_nix_does() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("machines");
        std::fs::write(
            &f,
            "# comment\nssh://m1 x86_64-linux - 1 1 fa - # trailing\n\n@/nonexistent\n",
        )
        .unwrap();
        let env: Env = [("NIX_CONF_DIR".to_owned(), dir.path().display().to_string())].into();
        let s = Settings::load(&env, &[]).unwrap();
        // The default, `@$NIX_CONF_DIR/machines`.
        assert_eq!(s.builder_lines(), ["ssh://m1 x86_64-linux - 1 1 fa -"]);
        let opts = [(
            "builders".to_owned(),
            format!(" ssh://m0 ; @{} ;; @/missing/file", f.display()),
        )];
        let s = Settings::load(&env, &opts).unwrap();
        assert_eq!(
            s.builder_lines(),
            ["ssh://m0", "ssh://m1 x86_64-linux - 1 1 fa -"]
        );
        let none = [("builders".to_owned(), "@/missing/file".to_owned())];
        assert!(Settings::load(&env, &none)
            .unwrap()
            .builder_lines()
            .is_empty());
        // An include of itself ends.
        std::fs::write(&f, format!("@{}\n", f.display())).unwrap();
        assert!(Settings::load(&env, &opts).unwrap().builder_lines() == ["ssh://m0"]);
    }

    #[test]
    fn experimental_features_add_local_system_features() {
        let env: Env = [("NIX_CONF_DIR".to_owned(), "/nonexistent".to_owned())].into();
        let opts = [
            (
                "experimental-features".to_owned(),
                "ca-derivations recursive-nix".to_owned(),
            ),
            ("system-features".to_owned(), "kvm".to_owned()),
        ];
        let s = Settings::load(&env, &opts).unwrap();
        assert_eq!(
            s.system_features().into_iter().collect::<Vec<_>>(),
            vec!["ca-derivations", "kvm", "recursive-nix"]
        );
        // The setting itself (what the hook is sent) is unchanged.
        assert_eq!(s.get("system-features").as_deref(), Some("kvm"));
    }

    #[test]
    fn env_dirs() {
        let mut e = Env::new();
        e.insert("NIX_STORE_DIR".into(), "/tmp/x//store/".into());
        e.insert("NIX_LOCALSTATE_DIR".into(), "/var/l".into());
        e.insert("NIX_LOG_DIR".into(), "/logs".into());
        let s = Settings::defaults(&e).unwrap();
        assert_eq!(s.store_dir().as_str(), "/tmp/x/store");
        assert_eq!(s.state_dir(), Path::new("/var/l/nix"));
        assert_eq!(s.log_dir(), Path::new("/logs"));
        e.insert("NIX_STATE_DIR".into(), "relative".into());
        assert!(matches!(
            Settings::defaults(&e),
            Err(ConfigError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn xdg_user_files() {
        let mut e = Env::new();
        e.insert("HOME".into(), "/home/u".into());
        e.insert("XDG_CONFIG_DIRS".into(), "/a:/b".into());
        let s = Settings::defaults(&e).unwrap();
        assert_eq!(
            s.user_conf_files(),
            &[
                PathBuf::from("/home/u/.config/nix/nix.conf"),
                PathBuf::from("/a/nix/nix.conf"),
                PathBuf::from("/b/nix/nix.conf")
            ]
        );
        e.insert("NIX_USER_CONF_FILES".into(), "/x.conf:/y.conf".into());
        let s = Settings::defaults(&e).unwrap();
        assert_eq!(s.user_conf_files().len(), 2);
    }

    #[test]
    fn parse_files_includes_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "etc/nix.conf",
            "# comment\n\nmax-jobs = 4 # trailing\ninclude sub/more.conf\n!include missing.conf\n\
             substituters = https://a https://b\nextra-substituters = https://c\n\
             build-max-silent-time = 7\nfoo-bar = 1\nsystem-features = kvm  big\n",
        );
        write(
            root,
            "etc/sub/more.conf",
            "max-jobs = 2\nkeep-going = true\n",
        );
        write(root, "user.conf", "max-jobs = auto\nlog-lines = 25\n");
        write(root, "user2.conf", "log-lines = 30\ntimeout = 9\n");
        let mut e = env(root);
        e.insert(
            "NIX_USER_CONF_FILES".into(),
            format!(
                "{}:{}",
                root.join("user.conf").display(),
                root.join("user2.conf").display()
            ),
        );
        e.insert("NIX_CONFIG".into(), "fallback = true\n".into());
        let s = Settings::load(
            &e,
            &[
                ("timeout".into(), "11".into()),
                ("other-unknown".into(), "x".into()),
            ],
        )
        .unwrap();
        assert_eq!(s.max_jobs(), cpu_count());
        assert!(s.keep_going());
        assert_eq!(s.log_lines(), 25, "the first user file wins");
        assert_eq!(s.timeout(), 11);
        assert!(s.fallback());
        assert_eq!(s.max_silent_time(), 7);
        assert_eq!(
            s.substituters(),
            vec!["https://a", "https://b", "https://c"]
        );
        assert_eq!(
            s.system_features().into_iter().collect::<Vec<_>>(),
            vec!["big", "kvm"]
        );
        // Unknown names given with `--option` are warned about as those of the
        // files, sorted by name, as `nix-store` 2.8 prints them.
        assert_eq!(
            s.warnings(),
            vec![
                "unknown setting 'foo-bar'".to_string(),
                "unknown setting 'other-unknown'".to_string()
            ]
        );
    }

    #[test]
    fn invalid_option_values_warn_in_nix_words() {
        let mut s = Settings::defaults(&Env::new()).unwrap();
        s.apply_option("max-jobs", "abc");
        s.apply_option("keep-going", "maybe");
        s.apply_option("cores", "x");
        s.apply_option("max-log-size", "1000000");
        assert_eq!(
            s.warnings(),
            vec![
                "error: configuration setting 'max-jobs' should be 'auto' or an integer",
                "error: Boolean setting 'keep-going' has invalid value 'maybe'",
                "error: setting 'cores' has invalid value 'x'",
                "unknown setting 'max-log-size'",
            ]
        );
    }

    #[test]
    fn extra_appends_to_default() {
        let mut s = Settings::defaults(&Env::new()).unwrap();
        s.apply_config("extra-substituters = file:///x\n", "t")
            .unwrap();
        assert_eq!(
            s.substituters(),
            vec!["https://cache.nixos.org/", "file:///x"]
        );
        s.apply_config("extra-experimental-features = nix-command bogus\nextra-experimental-features = ca-derivations\n", "t").unwrap();
        assert!(s.is_experimental_feature_enabled("ca-derivations"));
        assert!(s.is_experimental_feature_enabled("nix-command"));
        assert_eq!(s.warnings(), vec!["unknown experimental feature 'bogus'"]);
        // not appendable: unknown
        assert!(!s.set("extra-max-jobs", "3").unwrap());
        assert!(s
            .warnings()
            .contains(&"unknown setting 'extra-max-jobs'".to_string()));
    }

    #[test]
    fn errors_name_file_and_line() {
        let mut s = Settings::defaults(&Env::new()).unwrap();
        assert_eq!(
            s.apply_config("\nmax-jobs 3\n", "/f.conf"),
            Err(ConfigError::IllegalLine {
                file: "/f.conf".into(),
                line: 2,
                text: "max-jobs 3".into()
            })
        );
        assert!(matches!(
            s.apply_config("max-jobs=3\n", "/f.conf"),
            Err(ConfigError::IllegalLine { line: 1, .. })
        ));
        assert!(matches!(
            s.apply_config("keep-going = true\nmax-jobs = lots\n", "/f.conf"),
            Err(ConfigError::InvalidValue { line: 2, ref name, .. }) if name == "max-jobs"
        ));
        assert!(matches!(
            s.apply_config("keep-going = maybe\n", "/f.conf"),
            Err(ConfigError::InvalidValue { .. })
        ));
        assert!(matches!(
            s.apply_config("include /nonexistent/x.conf\n", "/f.conf"),
            Err(ConfigError::IncludeNotFound { line: 1, .. })
        ));
        assert!(matches!(
            s.apply_config("include a b\n", "/f.conf"),
            Err(ConfigError::IllegalLine { .. })
        ));
        // --option with a bad value only warns
        s.apply_option("sandbox", "perhaps");
        assert_eq!(s.warnings().len(), 1);
        assert_eq!(
            s.sandbox(),
            if cfg!(target_os = "linux") {
                SandboxMode::Enabled
            } else {
                SandboxMode::Disabled
            }
        );
    }

    #[test]
    fn recursive_include_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.conf", "include a.conf\n");
        let mut s = Settings::defaults(&Env::new()).unwrap();
        assert!(matches!(
            s.apply_config_file(&dir.path().join("a.conf")),
            Err(ConfigError::IncludeTooDeep(_))
        ));
    }

    #[test]
    fn aliases_and_values() {
        let mut s = Settings::defaults(&Env::new()).unwrap();
        s.apply_config(
            "build-max-jobs = 0\nbuild-use-sandbox = relaxed\nbuild-cores = 3\npost-build-hook = /bin/hook\nbuild-hook =\n",
            "t",
        )
        .unwrap();
        assert_eq!(s.max_jobs(), 0);
        assert_eq!(s.sandbox(), SandboxMode::Relaxed);
        assert_eq!(s.cores(), 3);
        assert!(s.is_set("cores"));
        assert_eq!(s.post_build_hook().as_deref(), Some("/bin/hook"));
        assert_eq!(s.build_hook(), None);
        assert!(s.warnings().is_empty());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_config_never_panics(s in ".{0,200}") {
            let mut st = Settings::defaults(&Env::new()).unwrap();
            let _ = st.apply_config(&s, "/p/x.conf");
        }
    }
}
