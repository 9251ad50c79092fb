//! Interop: drover and Nix 2.8 share `binary-cache-v6.sqlite`. Each tool answers
//! from rows the other wrote, without asking the HTTP cache again, and both write the
//! same rows for the same answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover::binary_cache::{
    BinaryCache, CacheOptions, HttpOptions, NarInfoCacheTtl, NarInfoDiskCache, TrustPolicy,
};
use drover::config::{Env, Settings};
use drover::narinfo::NarInfo;
use drover::realisation::{DrvOutput, Realisation};
use drover::store::LocalStore;
use drover::store_path::{StoreDir, StorePath};

use crate::http_server::{Action, HttpServer, Request};
use crate::nix_env::TestRoot;
use crate::require_nix;

const EXPR: &str = r#"
let
  mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // args);
  a = mk { name = "a"; args = ["-c" "echo a > $out"]; };
  b = mk { name = "b"; inherit a; args = ["-c" "echo $a > $out"]; };
  c = mk { name = "c"; inherit b; __contentAddressed = true; outputHashMode = "recursive";
           outputHashAlgo = "sha256"; args = ["-c" "echo $b > $out"]; };
in { inherit a b c; }
"#;

/// 500 for everything but NARs.
fn fail_metadata(r: &Request) -> Action {
    if r.path.starts_with("/nar/") {
        Action::Serve
    } else {
        Action::INTERNAL_SERVER_ERROR
    }
}

/// 500 for everything.
fn fail_all(_: &Request) -> Action {
    Action::INTERNAL_SERVER_ERROR
}

/// Serves the cache as it is.
fn serve(_: &Request) -> Action {
    Action::Serve
}

/// A root whose outputs `a` ← `b` ← `c` (floating content-addressed) were built by
/// Nix and copied to `<root>/cache`, after which the store was emptied; the cache is
/// served over HTTP.
struct Fixture {
    root: TestRoot,
    expr: PathBuf,
    a: String,
    b: String,
    c: String,
    /// A path no cache has.
    missing: String,
    server: HttpServer,
}

impl Fixture {
    fn new() -> Fixture {
        let root = TestRoot::new();
        let expr = root.path().join("e.nix");
        std::fs::write(&expr, EXPR).unwrap();
        let drv = root.instantiate(&expr, Some("c")).remove(0);
        let c = root.realise(&[&drv]).remove(0);
        let closure = root.run("nix-store", &["-qR", &c]);
        let find = |name: &str| {
            closure
                .lines()
                .find(|l| l.ends_with(name))
                .unwrap()
                .to_owned()
        };
        let (a, b) = (find("-a"), find("-b"));
        let cache = root.path().join("cache");
        let url = format!("file://{}", cache.display());
        root.run(
            "nix",
            &["copy", "--to", &url, "-f", expr.to_str().unwrap(), "c"],
        );
        let missing = format!("{}/{}-missing", root.store_dir, "0".repeat(32));
        let server = HttpServer::start(cache);
        let f = Fixture {
            root,
            expr,
            a,
            b,
            c,
            missing,
            server,
        };
        f.wipe();
        f
    }

    /// Removes the store and its database.
    fn wipe(&self) {
        self.root.wipe_store();
    }

    fn xdg(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn db(&self, xdg: &str) -> PathBuf {
        self.xdg(xdg).join("nix/binary-cache-v6.sqlite")
    }

    /// A Nix command using the HTTP cache and the disk cache under `xdg`.
    fn nix(&self, xdg: &str, program: &str, args: &[&str]) -> std::process::Output {
        self.root
            .cmd(program)
            .env("XDG_CACHE_HOME", self.xdg(xdg))
            .args(args)
            .args(["--option", "substituters", &self.server.url()])
            .args(["--option", "require-sigs", "false"])
            .output()
            .unwrap()
    }

    fn store_dir(&self) -> StoreDir {
        StoreDir::new(self.root.store_dir.clone()).unwrap()
    }

    fn path(&self, p: &str) -> StorePath {
        self.store_dir().parse(p).unwrap()
    }

    fn store(&self) -> LocalStore {
        let mut env = Env::new();
        for (k, v) in self.root.env() {
            env.insert(k.into(), v);
        }
        env.insert("NIX_USER_CONF_FILES".into(), String::new());
        LocalStore::open(&Settings::load(&env, &[]).unwrap()).unwrap()
    }

    /// drover's view of the HTTP cache, with the disk cache under `xdg`.
    fn drover(&self, xdg: &str) -> BinaryCache {
        let mut env = Env::new();
        env.insert("XDG_CACHE_HOME".into(), self.xdg(xdg).display().to_string());
        let disk = NarInfoDiskCache::open_default(&env, NarInfoCacheTtl::default()).unwrap();
        let options = CacheOptions {
            http: HttpOptions {
                attempts: 1,
                connect_timeout: Duration::from_secs(5),
                stalled_timeout: Duration::from_secs(5),
                ..HttpOptions::default()
            },
            disk_cache: Some(Arc::new(disk)),
        };
        let cache =
            BinaryCache::open_with(&self.server.url(), &self.store_dir(), &options).unwrap();
        assert!(cache.uses_disk_cache());
        cache
    }

    /// The narinfo file of `p` in the cache, as Nix wrote it.
    fn narinfo(&self, p: &str) -> NarInfo {
        let p = self.path(p);
        let text = std::fs::read_to_string(
            self.root
                .path()
                .join(format!("cache/{}.narinfo", p.hash_part())),
        )
        .unwrap();
        let mut ni = NarInfo::parse(&text, &self.store_dir()).unwrap();
        ni.system = None; // not kept in the disk cache
        ni
    }
}

/// The rows of a disk cache file, without ids and timestamps (which differ between
/// runs), sorted.
fn rows(db: &Path) -> (Vec<String>, Vec<String>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let caches = conn
        .prepare("select url, storeDir, wantMassQuery, priority from BinaryCaches order by url")
        .unwrap()
        .query_map([], |r| {
            Ok(format!(
                "{}|{}|{}|{}",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?
            ))
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let cols = "hashPart, namePart, url, compression, fileHash, fileSize, narHash, narSize, refs, deriver, sigs, ca, present";
    let nars = conn
        .prepare(&format!("select {cols} from NARs order by hashPart"))
        .unwrap()
        .query_map([], |r| {
            (0..13)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => "NULL".to_owned(),
                        rusqlite::types::ValueRef::Integer(n) => format!("{n}"),
                        rusqlite::types::ValueRef::Text(t) => {
                            format!("'{}'", String::from_utf8_lossy(t))
                        }
                        v => format!("{v:?}"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join("|"))
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (caches, nars)
}

/// The columns, keys and foreign keys of every table of a disk cache file.
fn schema(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut out = Vec::new();
    for table in ["BinaryCaches", "NARs", "Realisations", "LastPurge"] {
        for pragma in ["table_info", "foreign_key_list", "index_list"] {
            let mut st = conn.prepare(&format!("pragma {pragma}({table})")).unwrap();
            let n = st.column_count();
            let rows = st
                .query_map([], |r| {
                    (0..n)
                        .map(|i| r.get_ref(i).map(|v| format!("{v:?}")))
                        .collect::<Result<Vec<_>, _>>()
                })
                .unwrap();
            for row in rows {
                let mut row = row.unwrap();
                if pragma == "index_list" {
                    row.remove(1); // the automatic index's name
                }
                out.push(format!("{table} {pragma} {}", row.join(" ")));
            }
        }
    }
    out
}

#[test]
fn drover_answers_from_rows_nix_wrote() {
    require_nix!();
    let f = Fixture::new();

    // Nix substitutes `b` (and `a`) and learns that `missing` is nowhere.
    let out = f.nix("nix", "nix-store", &["--realise", &f.b]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = f.nix(
        "nix",
        "nix",
        &["path-info", "--store", &f.server.url(), &f.missing],
    );
    assert!(!out.status.success());
    let asked = f.server.take_requests();
    assert!(
        asked.iter().any(|r| r.ends_with("nix-cache-info")),
        "{asked:?}"
    );

    // drover, with the server failing everything: every answer comes from the file.
    f.server.set_policy(fail_all);
    let cache = f.drover("nix");
    assert_eq!(
        cache.cache_info().store_dir.as_deref(),
        Some(f.root.store_dir.as_str())
    );
    for p in [&f.a, &f.b] {
        let got = cache.query_narinfo(&f.path(p)).unwrap().unwrap();
        assert_eq!(*got, f.narinfo(p), "{p}");
    }
    assert!(cache.query_narinfo(&f.path(&f.missing)).unwrap().is_none());
    assert_eq!(
        f.server.take_requests(),
        Vec::<String>::new(),
        "drover asked the cache"
    );

    // And substitutes with them: only the NARs are downloaded.
    f.wipe();
    f.server.set_policy(fail_metadata);
    let store = f.store();
    for p in [&f.a, &f.b] {
        cache
            .copy_into(&f.path(p), &store, &TrustPolicy::default())
            .unwrap();
    }
    drop(store);
    let asked = f.server.take_requests();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(
        asked.iter().all(|r| r.starts_with("GET /nar/")),
        "{asked:?}"
    );
    f.root.verify_store();

    // drover, asking for itself into another file, writes the same rows as Nix.
    f.server.set_policy(serve);
    let own = f.drover("drover");
    for p in [&f.a, &f.b, &f.missing] {
        own.query_narinfo(&f.path(p)).unwrap();
    }
    let (nix_caches, nix_nars) = rows(&f.db("nix"));
    let (our_caches, our_nars) = rows(&f.db("drover"));
    assert_eq!(our_caches, nix_caches);
    assert_eq!(
        nix_caches,
        vec![format!("{}|{}|0|0", f.server.url(), f.root.store_dir)]
    );
    assert_eq!(our_nars, nix_nars);
    assert_eq!(schema(&f.db("drover")), schema(&f.db("nix")));
    assert_eq!(nix_nars.len(), 3, "{nix_nars:?}");
}

#[test]
fn nix_answers_from_rows_drover_wrote() {
    require_nix!();
    let f = Fixture::new();

    let cache = f.drover("x");
    for p in [&f.a, &f.b] {
        assert!(cache.query_narinfo(&f.path(p)).unwrap().is_some());
    }
    assert!(cache.query_narinfo(&f.path(&f.missing)).unwrap().is_none());
    let asked = f.server.take_requests();
    assert_eq!(
        asked.len(),
        4,
        "nix-cache-info and three narinfos: {asked:?}"
    );

    // Nix's metadata queries, with the server failing everything.
    f.server.set_policy(fail_all);
    let url = f.server.url();
    let out = f.nix(
        "x",
        "nix",
        &["path-info", "--json", "--store", &url, &f.a, &f.b],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let infos = json.as_array().unwrap();
    assert_eq!(infos.len(), 2);
    for info in infos {
        let p = info["path"].as_str().unwrap();
        let want = f.narinfo(p);
        assert_eq!(info["narSize"].as_u64(), Some(want.nar_size), "{info}");
        assert_eq!(info["url"].as_str(), Some(want.url.as_str()), "{info}");
        assert_eq!(
            info["narHash"].as_str().map(str::to_owned),
            Some(want.nar_hash.to_sri()),
            "{info}"
        );
    }
    let out = f.nix("x", "nix", &["path-info", "--store", &url, &f.missing]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not valid"), "{stderr}");
    assert_eq!(
        f.server.take_requests(),
        Vec::<String>::new(),
        "Nix asked the cache"
    );

    // Nix substitutes with drover's rows: only the NARs are downloaded.
    f.server.set_policy(fail_metadata);
    let out = f.nix("x", "nix-store", &["--realise", &f.b]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asked = f.server.take_requests();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(
        asked.iter().all(|r| r.starts_with("GET /nar/")),
        "{asked:?}"
    );
    f.root.verify_store();
}

#[test]
fn expired_negative_entries_are_asked_again() {
    require_nix!();
    let f = Fixture::new();
    // Nix asks for `a` while the cache does not have it.
    let narinfo = f
        .root
        .path()
        .join(format!("cache/{}.narinfo", f.path(&f.a).hash_part()));
    let hidden = narinfo.with_extension("hidden");
    std::fs::rename(&narinfo, &hidden).unwrap();
    let url = f.server.url();
    let out = f.nix("n", "nix", &["path-info", "--store", &url, &f.a]);
    assert!(!out.status.success());
    std::fs::rename(&hidden, &narinfo).unwrap();
    f.server.take_requests();

    // Fresh: drover believes it.
    assert!(f
        .drover("n")
        .query_narinfo(&f.path(&f.a))
        .unwrap()
        .is_none());
    assert_eq!(f.server.take_requests(), Vec::<String>::new());

    // An hour and a second old: asked again, and now found (and recorded).
    let conn = rusqlite::Connection::open(f.db("n")).unwrap();
    let aged = conn
        .execute(
            "update NARs set timestamp = timestamp - 3601 where present = 0",
            [],
        )
        .unwrap();
    assert_eq!(aged, 1);
    let cache = f.drover("n");
    assert!(cache.query_narinfo(&f.path(&f.a)).unwrap().is_some());
    let hash_part = f.path(&f.a).hash_part().to_owned();
    assert_eq!(
        f.server.take_requests(),
        vec![format!("GET /{hash_part}.narinfo")]
    );
    let present: i64 = conn
        .query_row(
            "select present from NARs where hashPart = ?1",
            [&hash_part],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(present, 1);

    // Nix, too, asks again for an expired negative entry.
    conn.execute(
        "update NARs set present = 0, timestamp = timestamp - 3601",
        [],
    )
    .unwrap();
    let out = f.nix("n", "nix", &["path-info", "--store", &url, &f.a]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (`nix path-info` checks validity with a HEAD before it GETs the narinfo.)
    let asked = f.server.take_requests();
    assert!(!asked.is_empty());
    assert!(
        asked
            .iter()
            .all(|r| r.ends_with(&format!(" /{hash_part}.narinfo"))),
        "{asked:?}"
    );
}

impl Fixture {
    /// `c`'s derivation, written again into the (wiped) store.
    fn c_drv(&self) -> String {
        self.root.instantiate(&self.expr, Some("c")).remove(0)
    }

    /// The realisations in the cache (`b`'s and `c`'s).
    fn realisations(&self) -> Vec<Realisation> {
        std::fs::read_dir(self.root.path().join("cache/realisations"))
            .unwrap()
            .map(|e| Realisation::from_json(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
            .collect()
    }
}

/// The `content` of the `Realisations` row of `id`.
fn realisation_row(db: &Path, id: &DrvOutput) -> String {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "select content from Realisations where outputId = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn realisations_are_shared_both_ways() {
    require_nix!();
    let f = Fixture::new();
    let all = f.realisations();
    assert_eq!(all.len(), 2, "{all:?}");
    let c = all.iter().find(|r| r.out_path == f.path(&f.c)).unwrap();
    assert!(!c.dependent_realisations.is_empty(), "c's depends on b's");

    // Nix substitutes `c` from its derivation: it asks for the realisations first
    // (`c`'s, then `b`'s, on which it depends).
    let drv = f.c_drv();
    let out = f.nix("nix", "nix-store", &["--realise", &drv]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), f.c);
    let asked = f.server.take_requests();
    assert!(
        asked.iter().any(|r| r.contains("/realisations/")),
        "{asked:?}"
    );

    // drover answers from Nix's row, asking nothing.
    f.server.set_policy(fail_all);
    let from_nix = f.drover("nix");
    for r in &all {
        assert_eq!(from_nix.query_realisation(&r.id).unwrap().as_ref(), Some(r));
    }
    assert_eq!(f.server.take_requests(), Vec::<String>::new());

    // drover's own rows hold the same JSON.
    f.server.set_policy(serve);
    let own = f.drover("drover");
    for r in &all {
        assert_eq!(own.query_realisation(&r.id).unwrap().as_ref(), Some(r));
        assert_eq!(
            realisation_row(&f.db("drover"), &r.id),
            realisation_row(&f.db("nix"), &r.id)
        );
    }
    for p in [&f.a, &f.b, &f.c] {
        own.query_narinfo(&f.path(p)).unwrap().unwrap();
    }
    f.server.take_requests();

    // Nix substitutes `c` again, with drover's rows: only NARs are downloaded.
    f.wipe();
    let drv = f.c_drv();
    f.server.set_policy(fail_metadata);
    let out = f.nix("drover", "nix-store", &["--realise", &drv]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), f.c);
    let asked = f.server.take_requests();
    assert!(!asked.is_empty());
    assert!(
        asked.iter().all(|r| r.starts_with("GET /nar/")),
        "{asked:?}"
    );
    f.root.verify_store();
}
