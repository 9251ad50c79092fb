//! `builtin:fetchurl`, the builder of `<nix/fetchurl.nix>`: downloads `url` to
//! `out`.
//!
//! As Nix 2.8's `builtinFetchurl`:
//!
//! * a flat fixed-output derivation (`outputHashMode = "flat"`) first tries each
//!   `hashed-mirrors` entry at `<mirror>/<algo>/<base16 hash>`; a mirror's failure
//!   is not an error (the next one, then `url`, is tried);
//! * `unpack = "1"`: the download is a NAR (decompressed with xz when `url` ends in
//!   `.xz`) unpacked to `out`; otherwise it is written to the file `out`;
//! * `executable = "1"`: `out` is made mode 0755;
//! * every download is a file-transfer activity in the log (`downloading '<url>'`,
//!   its byte count, its end), as the JSON logger of Nix's forked child writes it.
//!
//! The hash itself is not checked here: the output is registered as any
//! fixed-output derivation's, so a mismatch is Nix's `hash mismatch in fixed-output
//! derivation` (exit status 102).
//!
//! URLs: `file://` (curl's wording when the file cannot be read: `Couldn't read a
//! file:// file (37)`) and `http://`/`https://` through drover's HTTP transport
//! (netrc credentials, timeouts and retries of the binary cache downloads). Nix
//! 2.8 does not verify TLS certificates here (the hash is checked anyway); drover
//! verifies them against the built-in roots, so a server with a certificate those
//! roots do not trust fails. Other schemes are refused with
//! `unsupported URL scheme`.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{attr, BuiltinError, BuiltinLog, BuiltinSettings};
use crate::hash::{Encoding, Hash, HashAlgo};

/// Runs `builtin:fetchurl` with the derivation's environment.
pub fn fetchurl(
    env: &BTreeMap<String, String>,
    settings: &BuiltinSettings,
    log: &mut BuiltinLog<'_>,
) -> Result<(), BuiltinError> {
    let out = PathBuf::from(attr(env, "out")?);
    let main_url = attr(env, "url")?;
    let unpack = env.get("unpack").is_some_and(|v| v == "1");
    let executable = env.get("executable").is_some_and(|v| v == "1");
    let xz = unpack && main_url.ends_with(".xz");
    let fetch = |url: &str, log: &mut BuiltinLog<'_>| -> Result<(), BuiltinError> {
        let id = log.start_download(url);
        let r = download(url, &out, unpack, xz, settings, log, id);
        log.stop(id);
        r?;
        if executable {
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))
                .map_err(BuiltinError::io("making executable", &out))?;
        }
        Ok(())
    };
    if attr(env, "outputHashMode")? == "flat" {
        for mirror in &settings.hashed_mirrors {
            let url = match mirror_url(mirror, env) {
                Ok(u) => u,
                Err(e) => {
                    log::debug!("{e}");
                    continue;
                }
            };
            match fetch(&url, log) {
                Ok(()) => return Ok(()),
                Err(e) => log::debug!("{e}"),
            }
        }
    }
    fetch(main_url, log)
}

/// `<mirror>/<algo>/<base16 digest>` of the derivation's `outputHash`.
fn mirror_url(mirror: &str, env: &BTreeMap<String, String>) -> Result<String, BuiltinError> {
    let mut m = mirror.to_owned();
    if !m.ends_with('/') {
        m.push('/');
    }
    let algo = attr(env, "outputHashAlgo")?;
    let algo = match algo {
        "" => None,
        a => Some(a.parse::<HashAlgo>()?),
    };
    let h = Hash::parse(attr(env, "outputHash")?, algo)?;
    Ok(format!(
        "{m}{}/{}",
        h.algo().name(),
        h.encode(Encoding::Base16)
    ))
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

fn download(
    url: &str,
    out: &Path,
    unpack: bool,
    xz: bool,
    settings: &BuiltinSettings,
    log: &mut BuiltinLog<'_>,
    id: u64,
) -> Result<(), BuiltinError> {
    let failed = |message: String| BuiltinError::Download {
        url: url.to_owned(),
        message,
    };
    let (source, expected) = open(url, settings).map_err(failed)?;
    let mut source = Counting {
        inner: source,
        n: 0,
    };
    {
        let reader: Box<dyn Read + '_> = if xz {
            crate::binary_cache::compression::decompressor("xz", Box::new(&mut source))
                .map_err(|e| failed(e.to_string()))?
        } else {
            Box::new(&mut source)
        };
        if unpack {
            crate::nar::restore(reader, out)?;
        } else {
            let mut f =
                std::fs::File::create(out).map_err(BuiltinError::io("creating file", out))?;
            let mut reader = reader;
            io::copy(&mut reader, &mut f).map_err(|e| {
                if e.kind() == io::ErrorKind::Other {
                    failed(e.to_string())
                } else {
                    BuiltinError::Io {
                        context: "writing file",
                        path: out.to_owned(),
                        source: e,
                    }
                }
            })?;
        }
    }
    log.progress(id, source.n, expected.unwrap_or(source.n));
    Ok(())
}

/// Opens the URL for reading; the error is the reason (after `unable to download`).
fn open(
    url: &str,
    settings: &BuiltinSettings,
) -> Result<(Box<dyn Read + Send>, Option<u64>), String> {
    if let Some(rest) = url.strip_prefix("file://") {
        // `file:///p` and `file://localhost/p`; curl decodes %XX.
        let path = rest.strip_prefix("localhost").unwrap_or(rest);
        let path = percent_decode(path);
        let cannot = || "Couldn't read a file:// file (37)".to_owned();
        if !path.starts_with('/') {
            return Err(cannot());
        }
        let f = std::fs::File::open(&path).map_err(|_| cannot())?;
        let meta = f.metadata().map_err(|_| cannot())?;
        if meta.is_dir() {
            return Err(cannot());
        }
        return Ok((Box::new(f), Some(meta.len())));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return open_http(url, settings);
    }
    Err(format!(
        "unsupported URL scheme '{}'",
        url.split(':').next().unwrap_or(url)
    ))
}

/// An HTTP(S) download: the body, and its length when the server says it.
/// Transient failures (5xx, 429, connection errors) are retried up to
/// `download-attempts` times in all, with a doubling wait; other statuses fail
/// with Nix's `HTTP error N ('<reason>')`, followed by the response body when it is
/// short or HTML (as Nix's `FileTransferError`).
fn open_http(
    url: &str,
    settings: &BuiltinSettings,
) -> Result<(Box<dyn Read + Send>, Option<u64>), String> {
    let o = &settings.http;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(o.connect_timeout)
        .timeout_read(o.stalled_timeout)
        .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
        .build();
    let authorization = match (
        &o.netrc_file,
        crate::binary_cache::transport::netrc_host(url),
    ) {
        (Some(file), Some(host)) => crate::binary_cache::Netrc::read(file)
            .map_err(|e| e.to_string())?
            .as_ref()
            .and_then(|n| n.lookup(host))
            .map(|c| {
                let pair = format!("{}:{}", c.login, c.password);
                format!("Basic {}", data_encoding::BASE64.encode(pair.as_bytes()))
            }),
        _ => None,
    };
    let attempts = o.attempts.max(1);
    let mut attempt = 1;
    loop {
        let mut request = agent.get(url);
        if let Some(a) = &authorization {
            request = request.set("Authorization", a);
        }
        let (message, transient) = match request.call() {
            Ok(resp) => {
                let len = resp.header("Content-Length").and_then(|l| l.parse().ok());
                return Ok((Box::new(resp.into_reader()), len));
            }
            Err(ureq::Error::Status(code, resp)) => {
                let reason = resp.status_text().to_owned();
                let body = resp.into_string().unwrap_or_default();
                let mut m = format!("HTTP error {code} ('{reason}')");
                let body = body.trim_end();
                if !body.is_empty() && (body.len() < 1024 || body.contains("<html>")) {
                    m = format!("{m}\n\nresponse body:\n\n{body}");
                }
                (m, code >= 500 || code == 429)
            }
            Err(ureq::Error::Transport(t)) => (t.to_string(), true),
        };
        if !transient || attempt >= attempts {
            return Err(message);
        }
        let wait = o.initial_backoff * 2u32.saturating_pow(attempt - 1);
        log::warn!(
            target: crate::binary_cache::NOTICE,
            "warning: error: unable to download '{url}': {message}; retrying in {} ms",
            wait.as_millis()
        );
        std::thread::sleep(wait);
        attempt += 1;
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::dump_path;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn run(e: &BTreeMap<String, String>, s: &BuiltinSettings) -> (i32, String) {
        let mut log = Vec::new();
        let st =
            super::super::run_builtin("builtin:fetchurl", e, s, &mut |b| log.extend_from_slice(b));
        (st.code().unwrap(), String::from_utf8(log).unwrap())
    }

    #[test]
    fn a_flat_file_an_executable_and_a_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a b.txt");
        std::fs::write(&src, "hello\n").unwrap();
        let out = d.path().join("out");
        let url = format!("file://{}", d.path().join("a%20b.txt").display());
        let mut e = env(&[
            ("out", out.to_str().unwrap()),
            ("url", &url),
            ("outputHashMode", "flat"),
            ("executable", "1"),
        ]);
        let (code, log) = run(&e, &BuiltinSettings::default());
        assert_eq!(code, 0, "{log}");
        assert_eq!(std::fs::read(&out).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            log.contains(&format!("\"text\":\"downloading '{url}'\",\"type\":101")),
            "{log}"
        );
        assert!(log.contains("\"fields\":[6,6,0,0]"), "{log}");

        e.insert("url".into(), "file:///no/such/file".into());
        let (code, log) = run(&e, &BuiltinSettings::default());
        assert_eq!(code, 1);
        assert!(log.ends_with(
            "\x1b[31;1merror:\x1b[0m unable to download 'file:///no/such/file': Couldn't read a file:// file (37)\n"
        ), "{log}");

        e.remove("outputHashMode");
        let (code, log) = run(&e, &BuiltinSettings::default());
        assert_eq!(code, 1);
        assert!(
            log.ends_with("attribute '\x1b[35;1moutputHashMode\x1b[0m' missing\n"),
            "{log}"
        );
    }

    #[test]
    fn unpacks_plain_and_xz_nars_and_tries_hashed_mirrors_first() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("f", tree.join("l")).unwrap();
        let mut nar = Vec::new();
        dump_path(&tree, &mut nar).unwrap();
        std::fs::write(d.path().join("t.nar"), &nar).unwrap();
        let mut xz = Vec::new();
        {
            let mut w = liblzma::write::XzEncoder::new(&mut xz, 6);
            std::io::Write::write_all(&mut w, &nar).unwrap();
            w.finish().unwrap();
        }
        std::fs::write(d.path().join("t.nar.xz"), &xz).unwrap();
        for name in ["t.nar", "t.nar.xz"] {
            let out = d.path().join(format!("out-{name}"));
            let e = env(&[
                ("out", out.to_str().unwrap()),
                ("url", &format!("file://{}/{name}", d.path().display())),
                ("outputHashMode", "recursive"),
                ("unpack", "1"),
            ]);
            let (code, log) = run(&e, &BuiltinSettings::default());
            assert_eq!(code, 0, "{log}");
            assert_eq!(std::fs::read(out.join("f")).unwrap(), b"x");
            assert_eq!(std::fs::read_link(out.join("l")).unwrap(), Path::new("f"));
        }

        // A hashed mirror holding the file under its sha256: `url` is never read.
        let data = b"mirrored";
        let h = HashAlgo::Sha256.digest(data);
        let dir = d.path().join("mirror/sha256");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(h.encode(Encoding::Base16)), data).unwrap();
        let out = d.path().join("out-m");
        let e = env(&[
            ("out", out.to_str().unwrap()),
            ("url", "file:///no/such/file"),
            ("outputHashMode", "flat"),
            ("outputHashAlgo", "sha256"),
            ("outputHash", &h.encode(Encoding::Base32)),
        ]);
        let s = BuiltinSettings {
            hashed_mirrors: vec![
                "file:///no/such/mirror".into(),
                format!("file://{}/mirror", d.path().display()),
            ],
            ..Default::default()
        };
        let (code, log) = run(&e, &s);
        assert_eq!(code, 0, "{log}");
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }
}
