//! How a binary cache's files are fetched: from a directory (`file://`) or over
//! HTTP(S).
//!
//! A [`Transport`] opens one file of the cache by its path relative to the cache root
//! (`nix-cache-info`, `<hash>.narinfo`, `nar/….nar.xz`) and hands back a stream, or
//! `None` when the file does not exist (HTTP 404/403/410, as Nix treats them). Bodies
//! are streamed, never held in memory.
//!
//! The HTTP transport keeps one [`ureq::Agent`] (connections are reused), fails a
//! connection attempt after `connect_timeout` and a stalled transfer after
//! `stalled_timeout` without data (Nix's `connect-timeout` and
//! `stalled-download-timeout`), and retries transient failures (5xx, 429, connection
//! errors, timeouts before a response) up to `attempts` times in all (Nix's
//! `download-attempts`, default 5) with a doubling, jittered back-off, announcing
//! each retry as Nix does (`warning: error: unable to download '…': HTTP error 500
//! ('Internal Server Error'); retrying in 293 ms`). Other failures are errors naming
//! the URL. With [`HttpOptions::disable_on_failure`] (Nix does it under
//! `--fallback`), a failed download disables the cache for a minute (`disabling
//! binary cache '…' for 60 seconds`): further requests fail at once with
//! [`BinaryCacheError::Disabled`] instead of retrying a cache that just failed.
//!
//! Those lines are logged at `warn` level to the [`NOTICE`] target, worded
//! exactly as Nix prints them, so a front end can show them as they are.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::BinaryCacheError;

/// The `log` target of the lines Nix prints verbatim about caches (retries,
/// disabling): a front end shows their messages as they are.
pub const NOTICE: &str = "drover::notice";

/// How long a failing cache stays disabled (Nix's 60 seconds).
const DISABLED_FOR: Duration = Duration::from_secs(60);

/// A readable file of the cache.
pub type CacheFile = Box<dyn Read + Send>;

/// Where a binary cache's files come from.
pub trait Transport: Send + Sync {
    /// The cache's URL, as given (for messages).
    fn uri(&self) -> &str;
    /// Opens `rel` (relative to the cache root); `Ok(None)` when it does not exist.
    fn get(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError>;
}

/// A cache in a local directory (`file:///path`).
#[derive(Debug, Clone)]
pub struct FileTransport {
    uri: String,
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(uri: impl Into<String>, dir: impl Into<PathBuf>) -> FileTransport {
        FileTransport {
            uri: uri.into(),
            dir: dir.into(),
        }
    }
}

impl Transport for FileTransport {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn get(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        if rel.split('/').any(|c| c == "..") {
            return Err(BinaryCacheError::BadFileName(rel.to_owned()));
        }
        let path = self.dir.join(rel);
        match File::open(&path) {
            Ok(f) => Ok(Some(Box::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BinaryCacheError::Io {
                context: "opening",
                path,
                source,
            }),
        }
    }
}

/// Timeouts and retries of the HTTP transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Give up a transfer that delivers no data for this long.
    pub stalled_timeout: Duration,
    /// Attempts in all for a transient failure (at least 1).
    pub attempts: u32,
    /// The wait before the first retry; doubled for each further one (plus up to
    /// half as much again at random, so clients do not retry in step).
    pub initial_backoff: Duration,
    /// Disable the cache for a minute after a failed download (Nix's
    /// `maybeDisable`, which it does only with `--fallback`).
    pub disable_on_failure: bool,
}

impl Default for HttpOptions {
    /// Nix 2.8's defaults: `download-attempts = 5`, `stalled-download-timeout = 300`,
    /// and curl's 300 s connect timeout when `connect-timeout = 0`.
    fn default() -> HttpOptions {
        HttpOptions {
            connect_timeout: Duration::from_secs(300),
            stalled_timeout: Duration::from_secs(300),
            attempts: 5,
            initial_backoff: Duration::from_millis(250),
            disable_on_failure: false,
        }
    }
}

/// A cache served over HTTP or HTTPS.
pub struct HttpTransport {
    uri: String,
    base: String,
    agent: ureq::Agent,
    options: HttpOptions,
    disabled_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("uri", &self.uri)
            .field("options", &self.options)
            .finish()
    }
}

impl HttpTransport {
    /// A transport for the cache at `base` (`http(s)://host/path`, without query).
    pub fn new(uri: impl Into<String>, base: &str, options: HttpOptions) -> HttpTransport {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(options.connect_timeout)
            .timeout_read(options.stalled_timeout)
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpTransport {
            uri: uri.into(),
            base: base.trim_end_matches('/').to_owned(),
            agent,
            options,
            disabled_until: Mutex::new(None),
        }
    }

    /// `Err(Disabled)` while the cache is disabled after a failure.
    fn check_enabled(&self) -> Result<(), BinaryCacheError> {
        let mut until = self
            .disabled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *until {
            Some(t) if Instant::now() < t => Err(BinaryCacheError::Disabled(self.uri.clone())),
            Some(_) => {
                *until = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// A download failed for good: with `disable_on_failure`, no more requests for a
    /// minute.
    fn maybe_disable(&self) {
        if !self.options.disable_on_failure {
            return;
        }
        let mut until = self
            .disabled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if until.is_none() {
            *until = Some(Instant::now() + DISABLED_FOR);
            log::warn!(
                target: NOTICE,
                "disabling binary cache '{}' for {} seconds",
                self.uri,
                DISABLED_FOR.as_secs()
            );
        }
    }
}

/// `base` doubled `attempt - 1` times, then stretched by a random factor between 1
/// and 2^0.5 (Nix's jitter), in whole milliseconds.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = f64::from(nanos % 1000) / 1000.0 * 0.5;
    let ms = base.as_secs_f64() * 1000.0 * 2f64.powf(f64::from(attempt - 1) + jitter);
    Duration::from_millis(ms as u64)
}

impl Transport for HttpTransport {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn get(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        self.check_enabled()?;
        let url = format!("{}/{}", self.base, rel);
        let attempts = self.options.attempts.max(1);
        let mut attempt = 1;
        loop {
            let failure = match self.agent.get(&url).call() {
                Ok(resp) => return Ok(Some(Box::new(resp.into_reader()))),
                Err(ureq::Error::Status(404 | 403 | 410, _)) => return Ok(None),
                Err(ureq::Error::Status(code, resp)) if code >= 500 || code == 429 => {
                    format!("HTTP error {code} ('{}')", resp.status_text())
                }
                Err(ureq::Error::Status(code, resp)) => {
                    self.maybe_disable();
                    return Err(BinaryCacheError::Http {
                        url,
                        message: format!("HTTP error {code} ('{}')", resp.status_text()),
                    });
                }
                // Not `t.to_string()`: that repeats the URL the error names already.
                Err(ureq::Error::Transport(t)) => match t.message() {
                    Some(m) => format!("{}: {m}", t.kind()),
                    None => t.kind().to_string(),
                },
            };
            if attempt >= attempts {
                self.maybe_disable();
                return Err(BinaryCacheError::Http {
                    url,
                    message: failure,
                });
            }
            let wait = backoff(self.options.initial_backoff, attempt);
            log::warn!(
                target: NOTICE,
                "warning: error: unable to download '{url}': {failure}; retrying in {} ms",
                wait.as_millis()
            );
            std::thread::sleep(wait);
            attempt += 1;
        }
    }
}
