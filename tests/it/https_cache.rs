//! Interop: a cache written by Nix 2.8's `nix copy`, served over HTTPS with a
//! certificate of a private CA (made at test time with `rcgen`), and behind HTTP
//! Basic authentication. drover refuses the server without the CA file, reaches it
//! with it, and sends netrc credentials where the server demands them; real Nix
//! 2.8 needs the same `NIX_SSL_CERT_FILE` and `netrc-file` against the same server.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover::binary_cache::{BinaryCache, BinaryCacheError, HttpOptions, TrustPolicy};
use drover::config::{Env, Settings};
use drover::store::LocalStore;
use drover::store_path::StoreDir;

use crate::nix_env::TestRoot;
use crate::require_nix;

/// A private CA and a certificate it issued for `127.0.0.1`.
struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "drover test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca_cert.der().clone()], key)
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    }
}

/// An HTTPS server on 127.0.0.1 serving `dir`, one request per connection; with
/// `auth` (`user:password`) it answers `401 Unauthorized` to requests without
/// those Basic credentials. It runs until the test process ends.
fn serve_https(config: Arc<rustls::ServerConfig>, dir: PathBuf, auth: Option<&str>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let expected = auth.map(|a| format!("Basic {}", data_encoding::BASE64.encode(a.as_bytes())));
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, dir, expected) = (config.clone(), dir.clone(), expected.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let _ = answer(&mut tls, &dir, expected.as_deref());
            });
        }
    });
    url
}

fn answer(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>,
    dir: &Path,
    expected: Option<&str>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(&mut *tls);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_owned());
            }
        }
    }
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
    let (status, body) = if expected.is_some() && authorization.as_deref() != expected {
        ("401 Unauthorized", Vec::new())
    } else {
        match std::fs::read(dir.join(path.trim_start_matches('/'))) {
            Ok(b) => ("200 OK", b),
            Err(_) => ("404 Not Found", Vec::new()),
        }
    };
    write!(
        tls,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nWWW-Authenticate: Basic realm=\"cache\"\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    tls.write_all(&body)?;
    tls.conn.send_close_notify();
    tls.flush()
}

/// A chain `a` ← `b` built by Nix and copied (unsigned) to `<root>/cache`; the
/// store is emptied afterwards. Returns the closure of `b`, references first.
fn fixture(root: &TestRoot) -> Vec<String> {
    let expr = root.path().join("e.nix");
    std::fs::write(
        &expr,
        r#"
let
  mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // args);
  a = mk { name = "a"; args = ["-c" "echo a > $out"]; };
  b = mk { name = "b"; inherit a; args = ["-c" "echo $a > $out"]; };
in { inherit a b; }
"#,
    )
    .unwrap();
    let drv = root.instantiate(&expr, Some("b")).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let closure: Vec<String> = root
        .run("nix-store", &["-qR", &out])
        .lines()
        .map(str::to_owned)
        .collect();
    let url = format!("file://{}", root.path().join("cache").display());
    root.run(
        "nix",
        &["copy", "--to", &url, "-f", expr.to_str().unwrap(), "b"],
    );
    root.wipe_store();
    closure
}

fn store(root: &TestRoot) -> LocalStore {
    let mut env = Env::new();
    for (k, v) in root.env() {
        env.insert(k.into(), v);
    }
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    LocalStore::open(&Settings::load(&env, &[]).unwrap()).unwrap()
}

fn options() -> HttpOptions {
    HttpOptions {
        attempts: 1,
        connect_timeout: Duration::from_secs(5),
        stalled_timeout: Duration::from_secs(5),
        ..HttpOptions::default()
    }
}

/// Copies `closure` from `cache` into a fresh store, which Nix then verifies.
fn substitute(root: &TestRoot, cache: &BinaryCache, closure: &[String]) {
    root.wipe_store();
    let store = store(root);
    let sd = StoreDir::new(root.store_dir.clone()).unwrap();
    let policy = TrustPolicy {
        require_sigs: false,
        ..TrustPolicy::default()
    };
    for p in closure {
        let p = sd.parse(p).unwrap();
        cache.copy_into(&p, &store, &policy).unwrap();
        assert!(store.is_valid_path(&p).unwrap());
    }
    drop(store);
    root.verify_store();
}

#[test]
fn private_ca_and_netrc_credentials() {
    require_nix!();
    let root = TestRoot::new();
    let closure = fixture(&root);
    let sd = StoreDir::new(root.store_dir.clone()).unwrap();
    let pki = pki();
    let ca_file = root.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let cache_dir = root.path().join("cache");

    // Without the CA: the certificate is refused, naming the URL.
    let url = serve_https(pki.server.clone(), cache_dir.clone(), None);
    let e = BinaryCache::open(&url, &sd, &options()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("unable to download '{url}/nix-cache-info': ")),
        "{msg}"
    );
    assert!(msg.contains("UnknownIssuer"), "{msg}");

    // With it: the closure is substituted.
    let with_ca = HttpOptions {
        ca_file: Some(ca_file.clone()),
        ..options()
    };
    let cache = BinaryCache::open(&url, &sd, &with_ca).unwrap();
    substitute(&root, &cache, &closure);

    // A CA file that is missing or holds no certificate: an error naming it.
    for (name, contents) in [("missing.pem", None), ("empty.pem", Some("no PEM here\n"))] {
        let f = root.path().join(name);
        if let Some(c) = contents {
            std::fs::write(&f, c).unwrap();
        }
        let o = HttpOptions {
            ca_file: Some(f.clone()),
            ..options()
        };
        let e = BinaryCache::open(&url, &sd, &o).unwrap_err();
        assert!(matches!(e, BinaryCacheError::Io { .. }), "{e}");
        assert!(e.to_string().contains(&f.display().to_string()), "{e}");
    }

    // A server that demands credentials: refused without a netrc entry, reached with
    // one.
    let url = serve_https(pki.server.clone(), cache_dir, Some("alice:s3 cret"));
    let netrc = root.path().join("netrc");
    std::fs::write(&netrc, "machine other.example.org login bob password x\n").unwrap();
    let no_entry = HttpOptions {
        netrc_file: Some(netrc.clone()),
        attempts: 3,
        ..with_ca.clone()
    };
    // As Nix: a 401 is "absent", so the cache looks like no binary cache at all.
    let e = BinaryCache::open(&url, &sd, &no_entry).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("'{url}' does not appear to be a binary cache")
    );
    std::fs::write(
        &netrc,
        "machine other.example.org login bob password x\nmachine 127.0.0.1\n  login alice\n  password \"s3 cret\"\n",
    )
    .unwrap();
    let cache = BinaryCache::open(&url, &sd, &no_entry).unwrap();
    substitute(&root, &cache, &closure);
}

/// Runs `nix-store -r` of `path` with `url` as the only substituter.
fn nix_realise(
    root: &TestRoot,
    url: &str,
    path: &str,
    ca_file: Option<&Path>,
    netrc: &Path,
) -> std::process::Output {
    let mut c = root.cmd("nix-store");
    c.env("XDG_CACHE_HOME", root.path().join("xdg-cache"))
        .env_remove("NIX_SSL_CERT_FILE")
        .env_remove("SSL_CERT_FILE");
    if let Some(f) = ca_file {
        c.env("NIX_SSL_CERT_FILE", f);
    }
    c.args(["-r", path, "--option", "substituters", url])
        .args(["--option", "require-sigs", "false"])
        .args(["--option", "download-attempts", "1"])
        .args(["--option", "netrc-file", netrc.to_str().unwrap()])
        .output()
        .unwrap()
}

/// Real Nix 2.8 against the same kind of server: it too refuses the certificate
/// without `NIX_SSL_CERT_FILE` (curl error 60), gets nowhere without a netrc entry
/// (it takes the 401 for a missing `nix-cache-info`: "does not appear to be a
/// binary cache"), and substitutes with both.
#[test]
fn nix_2_8_needs_the_same_ca_file_and_netrc() {
    require_nix!();
    let root = TestRoot::new();
    let closure = fixture(&root);
    let pki = pki();
    let ca_file = root.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let url = serve_https(
        pki.server.clone(),
        root.path().join("cache"),
        Some("alice:s3cret"),
    );
    let netrc = root.path().join("netrc");
    let b = closure.last().unwrap();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    std::fs::write(&netrc, "machine 127.0.0.1 login alice password s3cret\n").unwrap();
    let out = nix_realise(&root, &url, b, None, &netrc);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "warning: unable to download '{url}/nix-cache-info': SSL peer certificate or SSH remote key was not OK (60)"
        )),
        "{}",
        stderr(&out)
    );

    std::fs::write(&netrc, "").unwrap();
    let out = nix_realise(&root, &url, b, Some(&ca_file), &netrc);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "warning: '{url}' does not appear to be a binary cache"
        )),
        "{}",
        stderr(&out)
    );

    std::fs::write(&netrc, "machine 127.0.0.1 login alice password s3cret\n").unwrap();
    let out = nix_realise(&root, &url, b, Some(&ca_file), &netrc);
    assert!(out.status.success(), "{}", stderr(&out));
    root.verify_store();
}
