//! Interop: drover's `BinaryCache` reading caches written by Nix 2.8's `nix copy`,
//! from a directory and over HTTP, into a fresh store that Nix then verifies.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover::binary_cache::{BinaryCache, BinaryCacheError, HttpOptions, TrustPolicy};
use drover::config::{Env, Settings};
use drover::narinfo::NarInfo;
use drover::realisation::Realisation;
use drover::signature::{PublicKey, PublicKeys};
use drover::store::LocalStore;
use drover::store_path::{StoreDir, StorePath};

use crate::http_server::{Action, HttpServer};
use crate::nix_env::TestRoot;
use crate::require_nix;

/// An input-addressed chain `a` ← `b` (a directory with an executable and a
/// symlink) ← `c`, a floating content-addressed derivation.
const EXPR: &str = r#"
let
  mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // args);
  a = mk { name = "a"; args = ["-c" "echo a > $out"]; };
  b = mk { name = "b"; inherit a; args = ["-c" "/bin/mkdir $out; echo $a > $out/dep; echo bin > $out/x; /bin/chmod +x $out/x; /bin/ln -s x $out/l"]; };
  c = mk { name = "c"; inherit b; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; args = ["-c" "echo $b > $out"]; };
in { inherit a b c; }
"#;

const METHODS: &[&str] = &["xz", "zstd", "bzip2", "none", "br", "gzip"];

/// A root whose closure of `c` was built by Nix and copied to one cache per
/// compression method, after which the root's store was emptied.
struct Fixture {
    root: TestRoot,
    /// The closure of `c`, references first.
    closure: Vec<String>,
    public_key: String,
}

impl Fixture {
    fn new() -> Fixture {
        let root = TestRoot::new();
        let expr = root.path().join("e.nix");
        std::fs::write(&expr, EXPR).unwrap();
        let drv = root.instantiate(&expr, Some("c")).remove(0);
        let out = root.realise(&[&drv]).remove(0);
        let closure: Vec<String> = root
            .run("nix-store", &["-qR", &out])
            .lines()
            .map(str::to_owned)
            .collect();
        let sk = root.path().join("sk");
        let pk = root.path().join("pk");
        root.run(
            "nix-store",
            &[
                "--generate-binary-cache-key",
                "test-1",
                sk.to_str().unwrap(),
                pk.to_str().unwrap(),
            ],
        );
        for m in METHODS {
            let url = format!(
                "file://{}?compression={m}&secret-key={}",
                root.path().join(format!("cache-{m}")).display(),
                sk.display()
            );
            root.run(
                "nix",
                &["copy", "--to", &url, "-f", expr.to_str().unwrap(), "c"],
            );
        }
        let public_key = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
        let f = Fixture {
            root,
            closure,
            public_key,
        };
        f.wipe();
        f
    }

    fn cache_dir(&self, method: &str) -> PathBuf {
        self.root.path().join(format!("cache-{method}"))
    }

    fn cache_url(&self, method: &str) -> String {
        format!("file://{}", self.cache_dir(method).display())
    }

    /// Removes the store and its database.
    fn wipe(&self) {
        self.root.wipe_store();
    }

    fn store(&self) -> LocalStore {
        let mut env = Env::new();
        for (k, v) in self.root.env() {
            env.insert(k.into(), v);
        }
        env.insert("NIX_USER_CONF_FILES".into(), String::new());
        LocalStore::open(&Settings::load(&env, &[]).unwrap()).unwrap()
    }

    fn store_dir(&self) -> StoreDir {
        StoreDir::new(self.root.store_dir.clone()).unwrap()
    }

    fn policy(&self) -> TrustPolicy {
        TrustPolicy {
            require_sigs: true,
            keys: [PublicKey::parse(&self.public_key).unwrap()]
                .into_iter()
                .collect(),
        }
    }

    fn path(&self, name: &str) -> StorePath {
        let p = self
            .closure
            .iter()
            .find(|p| p.ends_with(&format!("-{name}")))
            .unwrap();
        self.store_dir().parse(p).unwrap()
    }

    fn narinfo_file(&self, method: &str, name: &str) -> PathBuf {
        self.cache_dir(method)
            .join(format!("{}.narinfo", self.path(name).hash_part()))
    }

    /// Copies the whole closure and every realisation of the cache into `store`.
    fn substitute_all(&self, cache: &BinaryCache, store: &LocalStore) {
        for p in &self.closure {
            let p = self.store_dir().parse(p).unwrap();
            cache.copy_into(&p, store, &self.policy()).unwrap();
        }
        // Realisations: those without dependencies first.
        let mut todo: Vec<Realisation> =
            std::fs::read_dir(self.cache_dir("xz").join("realisations"))
                .unwrap()
                .map(|e| {
                    let name = e.unwrap().file_name().into_string().unwrap();
                    let id = name.strip_suffix(".doi").unwrap().parse().unwrap();
                    cache.query_realisation(&id).unwrap().unwrap()
                })
                .collect();
        assert_eq!(todo.len(), 2, "b and c have realisations");
        todo.sort_by_key(|r| r.dependent_realisations.len());
        for r in &todo {
            store.register_realisation(r).unwrap();
        }
    }
}

fn assert_nothing_registered(store: &LocalStore, p: &StorePath) {
    assert!(!store.is_valid_path(p).unwrap());
    assert!(!store.real_path(p).exists());
    for e in std::fs::read_dir(store.store_dir().as_path()).unwrap() {
        let n = e.unwrap().file_name();
        assert!(!n.to_string_lossy().contains("drover-tmp"), "{n:?} left");
    }
}

#[test]
fn substitutes_closures_written_by_nix_with_every_compression() {
    require_nix!();
    let f = Fixture::new();
    for m in METHODS {
        f.wipe();
        let store = f.store();
        let cache =
            BinaryCache::open(&f.cache_url(m), &f.store_dir(), &HttpOptions::default()).unwrap();
        f.substitute_all(&cache, &store);
        drop(store);
        f.root.verify_store();
        let out = f.closure.last().unwrap();
        let got: Vec<String> = f
            .root
            .run("nix-store", &["-qR", out])
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            got.iter().collect::<BTreeSet<_>>(),
            f.closure.iter().collect::<BTreeSet<_>>(),
            "{m}"
        );
        // The executable and the symlink of `b` came through.
        let b = f.store_dir().print(&f.path("b"));
        let x = std::fs::metadata(format!("{b}/x")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&x.permissions()) & 0o111,
            0o111
        );
        assert_eq!(
            std::fs::read_link(format!("{b}/l")).unwrap(),
            Path::new("x")
        );
        // Nix sees the realisation of the floating CA output.
        let info = f.root.run("nix", &["path-info", "--json", out]);
        assert!(info.contains("\"signatures\""), "{info}");
    }
}

#[test]
fn refusals_register_nothing() {
    require_nix!();
    let f = Fixture::new();
    let store = f.store();
    let sd = f.store_dir();
    let open = || BinaryCache::open(&f.cache_url("xz"), &sd, &HttpOptions::default()).unwrap();
    let a = f.path("a");

    // No trusted key, or another key, under require-sigs.
    let cache = open();
    for keys in [
        PublicKeys::new(),
        [drover::signature::SecretKey::generate("other-1")
            .unwrap()
            .to_public_key()]
        .into_iter()
        .collect(),
    ] {
        let policy = TrustPolicy {
            require_sigs: true,
            keys,
        };
        let e = cache.copy_into(&a, &store, &policy).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot add path '{}' because it lacks a valid signature",
                sd.print(&a)
            )
        );
        assert_nothing_registered(&store, &a);
        // The content-addressed output needs no signature.
        let c = cache.query_narinfo(&f.path("c")).unwrap().unwrap();
        cache.check_trust(&c, &policy).unwrap();
    }

    // A NAR whose hash does not match its narinfo (signatures off to get that far).
    let narinfo_path = f.narinfo_file("xz", "a");
    let original = std::fs::read_to_string(&narinfo_path).unwrap();
    let mut info = NarInfo::parse(&original, &sd).unwrap();
    info.nar_hash = drover::hash::HashAlgo::Sha256.digest(b"not the NAR");
    std::fs::write(&narinfo_path, info.to_string(&sd)).unwrap();
    let e = open()
        .copy_into(&a, &store, &TrustPolicy::default())
        .unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "hash mismatch importing path '{}';\n  specified: sha256:",
            sd.print(&a)
        )),
        "{e}"
    );
    assert_nothing_registered(&store, &a);
    std::fs::write(&narinfo_path, &original).unwrap();

    // A truncated NAR.
    let nar = f
        .cache_dir("xz")
        .join(NarInfo::parse(&original, &sd).unwrap().url);
    let bytes = std::fs::read(&nar).unwrap();
    std::fs::write(&nar, &bytes[..bytes.len() / 2]).unwrap();
    let e = open().copy_into(&a, &store, &f.policy()).unwrap_err();
    assert!(matches!(e, BinaryCacheError::Nar { .. }), "{e}");
    assert!(e.to_string().contains("is corrupt or incomplete"), "{e}");
    assert_nothing_registered(&store, &a);
    std::fs::write(&nar, &bytes).unwrap();

    // A narinfo of another store directory.
    let moved = original.replace(&f.root.store_dir, "/elsewhere/store");
    std::fs::write(&narinfo_path, moved).unwrap();
    let e = open().copy_into(&a, &store, &f.policy()).unwrap_err();
    assert!(matches!(e, BinaryCacheError::NarInfo { .. }), "{e}");
    assert!(e.to_string().contains("/elsewhere/store"), "{e}");
    assert_nothing_registered(&store, &a);
    std::fs::write(&narinfo_path, &original).unwrap();

    // A cache for another store directory.
    let info_file = f.cache_dir("xz").join("nix-cache-info");
    std::fs::write(&info_file, "StoreDir: /elsewhere/store\n").unwrap();
    let e = BinaryCache::open(&f.cache_url("xz"), &sd, &HttpOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "binary cache '{}' is for Nix stores with prefix '/elsewhere/store', not '{}'",
            f.cache_url("xz"),
            sd.as_str()
        )
    );

    // Everything intact again: the copy works.
    std::fs::write(&info_file, format!("StoreDir: {}\n", sd.as_str())).unwrap();
    open().copy_into(&a, &store, &f.policy()).unwrap();
    assert!(store.is_valid_path(&a).unwrap());
}

fn quick_http() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(5),
        stalled_timeout: Duration::from_secs(1),
        attempts: 3,
        initial_backoff: Duration::from_millis(10),
        disable_on_failure: false,
        ..HttpOptions::default()
    }
}

#[test]
fn substitutes_over_http_and_reports_failing_servers() {
    require_nix!();
    let f = Fixture::new();
    let sd = f.store_dir();

    let server = HttpServer::start(f.cache_dir("zstd"));
    let store = f.store();
    let cache = BinaryCache::open(&server.url(), &sd, &quick_http()).unwrap();
    f.substitute_all(&cache, &store);
    drop(store);
    f.root.verify_store();
    let before = server.hits();
    assert!(cache.query_narinfo(&f.path("a")).unwrap().is_some());
    assert_eq!(server.hits(), before, "narinfo answered from memory");

    // A download cut off halfway: an error, nothing registered.
    f.wipe();
    let store = f.store();
    let server = HttpServer::with_policy(f.cache_dir("none"), |r| {
        if r.path.starts_with("/nar/") {
            Action::Truncate(r.file_len() / 2)
        } else {
            Action::Serve
        }
    });
    let cache = BinaryCache::open(&server.url(), &sd, &quick_http()).unwrap();
    let a = f.path("a");
    let e = cache.copy_into(&a, &store, &f.policy()).unwrap_err();
    assert!(matches!(e, BinaryCacheError::Nar { .. }), "{e}");
    assert_nothing_registered(&store, &a);

    // A server that fails: retried, then a clear error naming the URL.
    let server = HttpServer::with_policy(f.cache_dir("zstd"), |_| Action::INTERNAL_SERVER_ERROR);
    let url = server.url();
    let e = BinaryCache::open(&url, &sd, &quick_http()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "unable to download '{url}/nix-cache-info': HTTP error 500 ('Internal Server Error')"
        )
    );
    assert_eq!(server.hits(), 3);

    // With `--fallback` a failing cache is left alone for a minute afterwards.
    let mut o = quick_http();
    o.disable_on_failure = true;
    use drover::binary_cache::Transport;
    let t = drover::binary_cache::HttpTransport::new(url.clone(), &url, o);
    assert!(matches!(
        t.get("x.narinfo"),
        Err(BinaryCacheError::Http { .. })
    ));
    assert_eq!(server.hits(), 6);
    let e = t.get("y.narinfo").err().unwrap();
    assert_eq!(e.to_string(), format!("substituter '{url}' is disabled"));
    assert_eq!(server.hits(), 6, "a disabled cache is not asked");

    // A server that hangs: the stalled-transfer timeout ends it.
    let server = HttpServer::with_policy(f.cache_dir("zstd"), |_| Action::Hang);
    let url = server.url();
    let mut o = quick_http();
    o.attempts = 1;
    let start = Instant::now();
    let e = BinaryCache::open(&url, &sd, &o).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        e.to_string()
            .starts_with(&format!("unable to download '{url}/nix-cache-info': ")),
        "{e}"
    );
}
