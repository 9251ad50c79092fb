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
//! `download-attempts`, default 5) with a doubling back-off. Other failures are
//! errors naming the URL.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

use super::BinaryCacheError;

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
    /// The wait before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
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
        }
    }
}

/// A cache served over HTTP or HTTPS.
pub struct HttpTransport {
    uri: String,
    base: String,
    agent: ureq::Agent,
    options: HttpOptions,
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
        }
    }
}

impl Transport for HttpTransport {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn get(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        let url = format!("{}/{}", self.base, rel);
        let attempts = self.options.attempts.max(1);
        let mut backoff = self.options.initial_backoff;
        let mut attempt = 1;
        loop {
            let failure = match self.agent.get(&url).call() {
                Ok(resp) => return Ok(Some(Box::new(resp.into_reader()))),
                Err(ureq::Error::Status(404 | 403 | 410, _)) => return Ok(None),
                Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 => {
                    format!("HTTP error {code}")
                }
                Err(ureq::Error::Status(code, _)) => {
                    return Err(BinaryCacheError::Http {
                        url,
                        message: format!("HTTP error {code}"),
                    })
                }
                // Not `t.to_string()`: that repeats the URL the error names already.
                Err(ureq::Error::Transport(t)) => match t.message() {
                    Some(m) => format!("{}: {m}", t.kind()),
                    None => t.kind().to_string(),
                },
            };
            if attempt >= attempts {
                return Err(BinaryCacheError::Http {
                    url,
                    message: format!("{failure} (after {attempts} attempts)"),
                });
            }
            log::warn!("unable to download '{url}': {failure}; retrying in {backoff:?}");
            std::thread::sleep(backoff);
            backoff = backoff.saturating_mul(2);
            attempt += 1;
        }
    }
}
