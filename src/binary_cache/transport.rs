//! How a binary cache's files are fetched: from a directory (`file://`) or over
//! HTTP(S).
//!
//! A [`Transport`] opens one file of the cache by its path relative to the cache root
//! (`nix-cache-info`, `<hash>.narinfo`, `nar/….nar.xz`) and hands back a stream, or
//! `None` when the file does not exist (HTTP 404 and 410, and 401/403/407, which Nix
//! also takes for "absent": a private cache without credentials looks empty). Bodies
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
//! HTTPS servers are verified against the CA certificates of
//! [`HttpOptions::ca_file`] (a PEM bundle; every certificate in it is trusted) when
//! it is set, as Nix 2.8 hands curl its `NIX_SSL_CERT_FILE`/`SSL_CERT_FILE`/system
//! bundle; otherwise against the built-in webpki roots. With
//! [`HttpOptions::netrc_file`], a request to a host that has an entry there (or a
//! `default` entry) carries HTTP Basic credentials, as curl does for Nix's
//! `netrc-file`; a missing netrc file means no credentials. A CA file that cannot
//! be read or holds no certificate, or a netrc file that cannot be parsed, fails
//! every request of the cache with an error naming the file. An answer of `401`
//! (`407`) is not retried: `unable to download '<url>': HTTP error 401
//! ('Unauthorized')`.
//!
//! Those lines are logged at `warn` level to the [`NOTICE`] target, worded
//! exactly as Nix prints them, so a front end can show them as they are.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netrc::Netrc;
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
    /// [`get`](Self::get) in one attempt that leaves no trace: no retry, no
    /// notice, no disabling of the cache on failure. For a download made ahead of
    /// time, whose failure is retried in the ordinary way (and so printed as Nix
    /// prints it) when the path's turn comes.
    fn get_quietly(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        self.get(rel)
    }
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
    /// The PEM bundle of CA certificates HTTPS servers are verified against
    /// (Nix's `NIX_SSL_CERT_FILE`); `None`: the built-in webpki roots. Not read
    /// for `http://` caches.
    pub ca_file: Option<PathBuf>,
    /// The netrc file with credentials for HTTP Basic authentication (Nix's
    /// `netrc-file`); it need not exist.
    pub netrc_file: Option<PathBuf>,
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
            ca_file: None,
            netrc_file: None,
        }
    }
}

/// A cache served over HTTP or HTTPS.
pub struct HttpTransport {
    uri: String,
    base: String,
    agent: ureq::Agent,
    /// Why the transport cannot be used (an unusable CA or netrc file): every
    /// request fails with it.
    setup_error: Option<SetupError>,
    /// `Basic …` for the cache's host, from the netrc file.
    authorization: Option<String>,
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
        let mut setup_error = None;
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(options.connect_timeout)
            .timeout_read(options.stalled_timeout)
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")));
        // Only TLS needs the bundle (curl too reads it only for HTTPS).
        if let Some(ca_file) = options
            .ca_file
            .as_ref()
            .filter(|_| base.starts_with("https://"))
        {
            match tls_config(ca_file) {
                Ok(config) => builder = builder.tls_config(config),
                Err(message) => {
                    setup_error = Some(SetupError {
                        context: "using the CA certificates in",
                        path: ca_file.clone(),
                        message,
                    })
                }
            }
        }
        let mut authorization = None;
        if let (Some(netrc_file), Some(host)) = (&options.netrc_file, netrc_host(base)) {
            match Netrc::read(netrc_file) {
                Ok(netrc) => {
                    authorization = netrc.as_ref().and_then(|n| n.lookup(host)).map(|c| {
                        let pair = format!("{}:{}", c.login, c.password);
                        format!("Basic {}", data_encoding::BASE64.encode(pair.as_bytes()))
                    })
                }
                Err(e) => {
                    setup_error = setup_error.or(Some(SetupError {
                        context: "using netrc file",
                        path: netrc_file.clone(),
                        message: e.to_string(),
                    }))
                }
            }
        }
        HttpTransport {
            uri: uri.into(),
            base: base.trim_end_matches('/').to_owned(),
            agent: builder.build(),
            setup_error,
            authorization,
            options,
            disabled_until: Mutex::new(None),
        }
    }

    /// `Err(Disabled)` while the cache is disabled after a failure; the setup
    /// error when the CA or netrc file is unusable.
    fn check_enabled(&self) -> Result<(), BinaryCacheError> {
        if let Some(e) = &self.setup_error {
            return Err(BinaryCacheError::Io {
                context: e.context,
                path: e.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e.message.clone()),
            });
        }
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

/// Why an [`HttpTransport`] cannot be used.
#[derive(Debug, Clone)]
struct SetupError {
    context: &'static str,
    path: PathBuf,
    message: String,
}

/// A TLS client configuration trusting exactly the certificates of the PEM file
/// `ca_file`, with the crypto provider ureq itself uses (ring).
fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bytes = std::fs::read(ca_file).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok);
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err("the file holds no usable PEM certificate".to_owned());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The host of `base` (`scheme://host[:port]/…`) as netrc names it, or `None`
/// when the URL carries its own credentials (curl then ignores the netrc file).
pub(crate) fn netrc_host(base: &str) -> Option<&str> {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return None;
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    (!host.is_empty()).then_some(host)
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

    fn get_quietly(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        self.check_enabled()?;
        let url = format!("{}/{}", self.base, rel);
        let mut request = self.agent.get(&url);
        if let Some(auth) = &self.authorization {
            request = request.set("Authorization", auth);
        }
        match request.call() {
            Ok(resp) => Ok(Some(Box::new(resp.into_reader()))),
            Err(ureq::Error::Status(404 | 401 | 403 | 407 | 410, _)) => Ok(None),
            Err(e) => Err(BinaryCacheError::Http {
                url,
                message: e.to_string(),
            }),
        }
    }

    fn get(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        self.check_enabled()?;
        let url = format!("{}/{}", self.base, rel);
        let attempts = self.options.attempts.max(1);
        let mut attempt = 1;
        loop {
            let mut request = self.agent.get(&url);
            if let Some(auth) = &self.authorization {
                request = request.set("Authorization", auth);
            }
            let failure = match request.call() {
                Ok(resp) => return Ok(Some(Box::new(resp.into_reader()))),
                // As Nix: "forbidden" (401, 403, 407) counts as absent, like 404/410.
                Err(ureq::Error::Status(404 | 401 | 403 | 407 | 410, _)) => return Ok(None),
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
                // The source says why (e.g. the TLS certificate's `UnknownIssuer`).
                Err(ureq::Error::Transport(t)) => {
                    let mut m = match t.message() {
                        Some(m) => format!("{}: {m}", t.kind()),
                        None => t.kind().to_string(),
                    };
                    let mut source = std::error::Error::source(&t);
                    while let Some(e) = source {
                        m = format!("{m}: {e}");
                        source = e.source();
                    }
                    m
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netrc_host_is_the_urls_host() {
        assert_eq!(
            netrc_host("https://cache.example.org/sub"),
            Some("cache.example.org")
        );
        assert_eq!(netrc_host("http://127.0.0.1:8080"), Some("127.0.0.1"));
        assert_eq!(netrc_host("https://[::1]:443/x"), Some("::1"));
        assert_eq!(netrc_host("https://u:p@cache.example.org"), None);
        assert_eq!(netrc_host("https://"), None);
    }

    #[test]
    fn credentials_from_netrc_and_unusable_files_fail_every_request() {
        let d = tempfile::tempdir().unwrap();
        let netrc = d.path().join("netrc");
        std::fs::write(
            &netrc,
            "machine cache.example.org login alice password pw\n",
        )
        .unwrap();
        let o = HttpOptions {
            netrc_file: Some(netrc.clone()),
            ..HttpOptions::default()
        };
        let t = HttpTransport::new("u", "https://cache.example.org", o.clone());
        assert_eq!(t.authorization.as_deref(), Some("Basic YWxpY2U6cHc="));
        let t = HttpTransport::new("u", "https://other.org", o);
        assert_eq!(t.authorization, None);

        std::fs::write(&netrc, "machine \"x\n").unwrap();
        let o = HttpOptions {
            netrc_file: Some(netrc.clone()),
            ..HttpOptions::default()
        };
        let e = HttpTransport::new("u", "https://x", o).get("nix-cache-info");
        let e = e.err().unwrap().to_string();
        assert!(e.contains("unterminated quoted string"), "{e}");

        let ca = d.path().join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        let o = HttpOptions {
            ca_file: Some(ca.clone()),
            ..HttpOptions::default()
        };
        let plain = HttpTransport::new("u", "http://x", o.clone());
        assert!(plain.setup_error.is_none(), "http:// needs no CA file");
        let e = HttpTransport::new("u", "https://x", o).get("nix-cache-info");
        assert_eq!(
            e.err().unwrap().to_string(),
            format!(
                "using the CA certificates in '{}': the file holds no usable PEM certificate",
                ca.display()
            )
        );
    }
}
