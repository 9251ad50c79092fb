use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::compression::tests::compress;
use super::compression::METHODS;
use super::*;
use crate::config::Settings;
use crate::signature::SecretKey;
use crate::store_path::StorePathSet;

const SEC: &str = "test-1:Nvn6NRB7SAHVjEvqBqkeFyPFatKtlwQ4gSHv4gtbDZ0uM+PLlZ3Nz2SoWC20BCAHiyjXOUmXx2l8sz/WUZoNtQ==";

fn store(dir: &Path) -> LocalStore {
    let settings = Settings::for_root(dir, "experimental-features = ca-derivations\n").unwrap();
    LocalStore::open(&settings).unwrap()
}

fn ext(method: &str) -> &'static str {
    match method {
        "xz" => ".xz",
        "zstd" => ".zst",
        "bzip2" => ".bz2",
        "br" => ".br",
        _ => "",
    }
}

/// A file cache in `dir/cache` for `store_dir`, holding one regular file per call
/// of [`add`].
struct FakeCache {
    dir: PathBuf,
    store_dir: StoreDir,
}

impl FakeCache {
    fn new(root: &Path, store_dir: &StoreDir) -> FakeCache {
        let dir = root.join("cache");
        std::fs::create_dir_all(dir.join("nar")).unwrap();
        std::fs::write(
            dir.join("nix-cache-info"),
            format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: 30\n",
                store_dir.as_str()
            ),
        )
        .unwrap();
        FakeCache {
            dir,
            store_dir: store_dir.clone(),
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// Adds a file with `contents` compressed with `method`; returns its narinfo.
    fn add(&self, name: &str, contents: &[u8], method: &str) -> NarInfo {
        let mut nar = Vec::new();
        crate::nar::dump_bytes(contents, &mut nar).unwrap();
        let nar_hash = HashAlgo::Sha256.digest(&nar);
        let path = self
            .store_dir
            .make_store_path("output:out", &HashAlgo::Sha256.digest(name), name)
            .unwrap();
        let file = compress(method, &nar);
        let file_hash = HashAlgo::Sha256.digest(&file);
        let url = format!(
            "nar/{}.nar{}",
            file_hash.encode(Encoding::Base32),
            ext(method)
        );
        std::fs::write(self.dir.join(&url), &file).unwrap();
        let mut info = NarInfo {
            store_path: path,
            url,
            compression: method.to_owned(),
            file_hash: Some(file_hash),
            file_size: Some(file.len() as u64),
            nar_hash,
            nar_size: nar.len() as u64,
            references: StorePathSet::new(),
            deriver: None,
            system: None,
            signatures: Default::default(),
            ca: None,
        };
        info.sign(&self.store_dir, &SecretKey::parse(SEC).unwrap())
            .unwrap();
        self.write_narinfo(&info);
        info
    }

    fn write_narinfo(&self, info: &NarInfo) {
        std::fs::write(
            self.dir
                .join(format!("{}.narinfo", info.store_path.hash_part())),
            info.to_string(&self.store_dir),
        )
        .unwrap();
    }
}

fn policy() -> TrustPolicy {
    TrustPolicy {
        require_sigs: true,
        keys: [SecretKey::parse(SEC).unwrap().to_public_key()]
            .into_iter()
            .collect(),
    }
}

fn no_temp_left(store: &LocalStore) {
    for e in std::fs::read_dir(store.store_dir().as_path()).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            !name.to_string_lossy().contains("drover-tmp"),
            "temporary path left behind: {name:?}"
        );
    }
}

#[test]
fn copies_every_compression_method() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let contents: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let infos: Vec<NarInfo> = METHODS
        .iter()
        .map(|m| fc.add(&format!("file-{m}"), &contents, m))
        .collect();
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    assert_eq!(cache.priority(), 30);
    assert!(cache.want_mass_query());
    for info in &infos {
        let progress = TransferProgress::default();
        let got = cache
            .copy_into_observed(
                &info.store_path,
                &s,
                &policy(),
                RepairFlag::NoRepair,
                &progress,
            )
            .unwrap();
        assert_eq!(got.nar_hash, info.nar_hash);
        assert_eq!(progress.unpacked(), info.nar_size, "{}", info.compression);
        assert_eq!(
            Some(progress.downloaded()),
            info.file_size,
            "{}",
            info.compression
        );
        let real = s.real_path(&info.store_path);
        assert_eq!(
            std::fs::read(&real).unwrap(),
            contents,
            "{}",
            info.compression
        );
        let registered = s.query_path_info(&info.store_path).unwrap().unwrap();
        assert_eq!(registered.nar_hash, info.nar_hash);
        assert_eq!(registered.sigs, info.signatures);
    }
    no_temp_left(&s);
}

#[test]
fn repair_fetches_a_valid_but_corrupted_path_again() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let info = fc.add("repaired", b"the real contents", "xz");
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    cache.copy_into(&info.store_path, &s, &policy()).unwrap();
    let real = s.real_path(&info.store_path);
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&real, b"corrupted").unwrap();
    // Without repair a valid path is not fetched again.
    cache.copy_into(&info.store_path, &s, &policy()).unwrap();
    assert_eq!(std::fs::read(&real).unwrap(), b"corrupted");
    let progress = TransferProgress::default();
    cache
        .copy_into_observed(
            &info.store_path,
            &s,
            &policy(),
            RepairFlag::Repair,
            &progress,
        )
        .unwrap();
    assert_eq!(std::fs::read(&real).unwrap(), b"the real contents");
    assert_eq!(progress.unpacked(), info.nar_size);
    assert!(s.is_valid_path(&info.store_path).unwrap());
    no_temp_left(&s);
}

#[test]
fn hash_mismatch_registers_nothing() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let mut info = fc.add("x", b"hello", "xz");
    info.nar_hash = HashAlgo::Sha256.digest(b"something else");
    info.signatures.clear();
    info.sign(s.store_dir(), &SecretKey::parse(SEC).unwrap())
        .unwrap();
    fc.write_narinfo(&info);
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    let e = cache
        .copy_into(&info.store_path, &s, &policy())
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "hash mismatch importing path '{}';\n  specified: sha256:",
            s.store_dir().print(&info.store_path)
        )),
        "{msg}"
    );
    assert!(!s.is_valid_path(&info.store_path).unwrap());
    assert!(!s.real_path(&info.store_path).exists());
    no_temp_left(&s);
}

#[test]
fn truncated_nar_registers_nothing() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let contents: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 256) as u8).collect();
    for m in METHODS {
        let info = fc.add(&format!("t-{m}"), &contents, m);
        let f = fc.dir.join(&info.url);
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
        let e = cache
            .copy_into(&info.store_path, &s, &policy())
            .unwrap_err();
        assert!(
            matches!(e, BinaryCacheError::Nar { .. }),
            "{m}: unexpected error {e}"
        );
        assert!(!s.is_valid_path(&info.store_path).unwrap());
        assert!(!s.real_path(&info.store_path).exists());
    }
    no_temp_left(&s);
}

#[test]
fn file_size_mismatch_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let mut info = fc.add("fs", b"data", "none");
    info.file_size = Some(3);
    fc.write_narinfo(&info);
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    let e = cache
        .copy_into(&info.store_path, &s, &policy())
        .unwrap_err();
    assert!(
        matches!(e, BinaryCacheError::FileSizeMismatch { .. }),
        "{e}"
    );
    assert!(!s.is_valid_path(&info.store_path).unwrap());
}

/// A `FileHash` that does not match the file is refused, compressed or not (an
/// uncompressed file is checked against the NAR hash computed while unpacking).
#[test]
fn file_hash_mismatch_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    for method in ["none", "xz"] {
        let mut info = fc.add(&format!("fh-{method}"), b"data", method);
        let good = info.file_hash.clone().unwrap();
        info.file_hash = Some(HashAlgo::Sha256.digest(b"another file"));
        info.signatures.clear();
        fc.write_narinfo(&info);
        let e = cache
            .copy_into(&info.store_path, &s, &TrustPolicy::default())
            .unwrap_err();
        assert!(
            matches!(e, BinaryCacheError::FileHashMismatch { .. }),
            "{method}: {e}"
        );
        assert!(!s.is_valid_path(&info.store_path).unwrap());
        // The right one passes.
        info.file_hash = Some(good);
        fc.write_narinfo(&info);
        let fresh = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
        fresh
            .copy_into(&info.store_path, &s, &TrustPolicy::default())
            .unwrap();
    }
    no_temp_left(&s);
}

#[test]
fn wrong_store_dir_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let other = StoreDir::new("/somewhere/else").unwrap();
    let fc = FakeCache::new(t.path(), &other);
    let e = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "binary cache '{}' is for Nix stores with prefix '/somewhere/else', not '{}'",
            fc.url(),
            s.store_dir().as_str()
        )
    );
}

#[test]
fn unsigned_and_untrusted_paths_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let mut info = fc.add("unsigned", b"u", "none");
    info.signatures.clear();
    fc.write_narinfo(&info);
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    let e = cache
        .copy_into(&info.store_path, &s, &policy())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot add path '{}' because it lacks a valid signature",
            s.store_dir().print(&info.store_path)
        )
    );
    // Signed, but by a key that is not trusted.
    let signed = fc.add("signed", b"s", "none");
    let other = TrustPolicy {
        require_sigs: true,
        keys: [SecretKey::generate("other-1").unwrap().to_public_key()]
            .into_iter()
            .collect(),
    };
    assert!(matches!(
        cache.copy_into(&signed.store_path, &s, &other),
        Err(BinaryCacheError::Untrusted(_))
    ));
    assert!(!s.is_valid_path(&signed.store_path).unwrap());
    // Without require-sigs, or from a trusted cache, both are accepted.
    let lax = TrustPolicy::default();
    cache.copy_into(&info.store_path, &s, &lax).unwrap();
    let trusted = BinaryCache::open(
        &format!("{}?trusted=1", fc.url()),
        s.store_dir(),
        &HttpOptions::default(),
    )
    .unwrap();
    trusted.copy_into(&signed.store_path, &s, &other).unwrap();
    assert!(s.is_valid_path(&signed.store_path).unwrap());
}

struct CountingTransport {
    inner: FileTransport,
    gets: Arc<AtomicUsize>,
}

impl Transport for CountingTransport {
    fn uri(&self) -> &str {
        self.inner.uri()
    }
    fn get(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(rel)
    }
}

#[test]
fn narinfos_are_cached_positive_and_negative() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let info = fc.add("cached", b"c", "none");
    let missing = s
        .store_dir()
        .make_store_path("output:out", &HashAlgo::Sha256.digest("m"), "missing")
        .unwrap();
    let gets = Arc::new(AtomicUsize::new(0));
    let cache = BinaryCache::with_transport(
        Box::new(CountingTransport {
            inner: FileTransport::new(fc.url(), &fc.dir),
            gets: gets.clone(),
        }),
        s.store_dir(),
    )
    .unwrap();
    let base = gets.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert!(cache.query_narinfo(&info.store_path).unwrap().is_some());
        assert!(cache.query_narinfo(&missing).unwrap().is_none());
    }
    assert_eq!(gets.load(Ordering::SeqCst) - base, 2);
}

#[test]
fn missing_nar_is_gone() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let info = fc.add("gone", b"g", "xz");
    std::fs::remove_file(fc.dir.join(&info.url)).unwrap();
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    let err = cache
        .copy_into(&info.store_path, &s, &policy())
        .unwrap_err();
    assert!(matches!(err, BinaryCacheError::Gone { .. }), "{err}");
    // Nix 2.8's words for a local binary cache (no URI).
    assert_eq!(
        err.to_string(),
        format!("file '{}' does not exist in binary cache", info.url)
    );
}

#[test]
fn gone_over_http_names_the_cache() {
    let e = BinaryCacheError::Gone {
        path: "/nix/store/x".into(),
        file: "nar/abc.nar.xz".into(),
        uri: "http://127.0.0.1:1".into(),
    };
    assert_eq!(
        e.to_string(),
        "file 'nar/abc.nar.xz' does not exist in binary cache 'http://127.0.0.1:1'"
    );
}

#[test]
fn narinfo_for_another_path_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let a = fc.add("a", b"a", "none");
    let b = fc.add("b", b"b", "none");
    std::fs::copy(
        fc.dir.join(format!("{}.narinfo", a.store_path.hash_part())),
        fc.dir.join(format!("{}.narinfo", b.store_path.hash_part())),
    )
    .unwrap();
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    assert!(matches!(
        cache.query_narinfo(&b.store_path),
        Err(BinaryCacheError::WrongPath { .. })
    ));
}

#[test]
fn store_url_parameters() {
    let u = StoreUrl::parse("https://c.example/x?priority=10&trusted=1&flag");
    assert_eq!(u.base, "https://c.example/x");
    assert_eq!(u.params["priority"], "10");
    assert_eq!(u.params["flag"], "");
    assert!(matches!(
        BinaryCache::open("s3://bucket", &StoreDir::default(), &HttpOptions::default()),
        Err(BinaryCacheError::UnsupportedUrl(_))
    ));
}

#[test]
fn cache_info_parsing() {
    let i = CacheInfo::parse(
        "u",
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\nOther: x\n",
    )
    .unwrap();
    assert_eq!(i.store_dir.as_deref(), Some("/nix/store"));
    assert_eq!(i.priority, Some(40));
    assert_eq!(i.want_mass_query, Some(true));
    assert!(CacheInfo::parse("u", "Priority: many\n").is_err());
    assert!(CacheInfo::parse("u", "no colon\n").is_err());
}

#[test]
fn realisations_are_read_unsigned() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let out = fc.add("ca-out", b"x", "none").store_path;
    let id: DrvOutput = format!("sha256:{}!out", "ab".repeat(32)).parse().unwrap();
    std::fs::create_dir_all(fc.dir.join("realisations")).unwrap();
    std::fs::write(
        fc.dir.join(format!("realisations/{id}.doi")),
        format!(
            "{{\"dependentRealisations\":{{}},\"id\":\"{id}\",\"outPath\":\"{}\",\"signatures\":[]}}",
            out
        ),
    )
    .unwrap();
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    let r = cache.query_realisation(&id).unwrap().unwrap();
    assert_eq!(r.out_path, out);
    let other: DrvOutput = format!("sha256:{}!out", "cd".repeat(32)).parse().unwrap();
    assert!(cache.query_realisation(&other).unwrap().is_none());
}

/// A cache served from a directory under an `http://` URI, logging every request.
struct LoggingTransport {
    inner: FileTransport,
    log: Arc<Mutex<Vec<String>>>,
    /// When set, every request fails (a server that is down).
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Transport for LoggingTransport {
    fn uri(&self) -> &str {
        self.inner.uri()
    }
    fn get(&self, rel: &str) -> Result<Option<CacheFile>, BinaryCacheError> {
        self.log.lock().unwrap().push(rel.to_owned());
        if self.down.load(Ordering::SeqCst) {
            return Err(BinaryCacheError::Http {
                url: format!("{}/{rel}", self.uri()),
                message: "server down".into(),
            });
        }
        self.inner.get(rel)
    }
}

struct DiskFixture {
    _t: tempfile::TempDir,
    s: LocalStore,
    fc: FakeCache,
    disk_path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    now: Arc<std::sync::atomic::AtomicI64>,
}

const HTTP_URI: &str = "http://cache.test/sub/";

impl DiskFixture {
    fn new() -> DiskFixture {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let fc = FakeCache::new(t.path(), s.store_dir());
        DiskFixture {
            disk_path: t.path().join("binary-cache-v6.sqlite"),
            _t: t,
            s,
            fc,
            log: Default::default(),
            down: Default::default(),
            now: Arc::new(std::sync::atomic::AtomicI64::new(1_700_000_000)),
        }
    }

    fn disk(&self) -> Arc<NarInfoDiskCache> {
        let now = self.now.clone();
        Arc::new(
            NarInfoDiskCache::open_with_clock(
                &self.disk_path,
                NarInfoCacheTtl::default(),
                Arc::new(move || now.load(Ordering::SeqCst)),
            )
            .unwrap(),
        )
    }

    fn open_as(
        &self,
        uri: &str,
        disk: Option<Arc<NarInfoDiskCache>>,
    ) -> Result<BinaryCache, BinaryCacheError> {
        BinaryCache::with_transport_and_disk_cache(
            Box::new(LoggingTransport {
                inner: FileTransport::new(uri, &self.fc.dir),
                log: self.log.clone(),
                down: self.down.clone(),
            }),
            self.s.store_dir(),
            disk,
        )
    }

    fn open(&self) -> BinaryCache {
        self.open_as(HTTP_URI, Some(self.disk())).unwrap()
    }

    fn requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn missing(&self) -> StorePath {
        self.s
            .store_dir()
            .make_store_path("output:out", &HashAlgo::Sha256.digest("missing"), "missing")
            .unwrap()
    }

    fn realisation(&self, out: &StorePath) -> DrvOutput {
        let id: DrvOutput = format!("sha256:{}!out", "ab".repeat(32)).parse().unwrap();
        std::fs::create_dir_all(self.fc.dir.join("realisations")).unwrap();
        std::fs::write(
            self.fc.dir.join(format!("realisations/{id}.doi")),
            format!("{{\"dependentRealisations\":{{}},\"id\":\"{id}\",\"outPath\":\"{out}\",\"signatures\":[]}}"),
        )
        .unwrap();
        id
    }
}

#[test]
fn disk_cache_answers_a_later_run_without_requests() {
    let f = DiskFixture::new();
    let info = f.fc.add("cached", b"c", "xz");
    let missing = f.missing();
    let id = f.realisation(&info.store_path);
    let no_id: DrvOutput = format!("sha256:{}!out", "cd".repeat(32)).parse().unwrap();

    let first = f.open();
    assert!(first.uses_disk_cache());
    assert_eq!(
        first.query_narinfo(&info.store_path).unwrap().as_deref(),
        Some(&info)
    );
    assert!(first.query_narinfo(&missing).unwrap().is_none());
    assert!(first.query_realisation(&id).unwrap().is_some());
    assert!(first.query_realisation(&no_id).unwrap().is_none());
    assert_eq!(f.requests().len(), 5);
    drop(first);

    // A new run: nothing is asked but the NAR itself.
    f.down.store(true, Ordering::SeqCst);
    let second = f.open();
    assert_eq!(second.priority(), 30);
    assert!(second.want_mass_query());
    assert_eq!(
        second.cache_info().store_dir.as_deref(),
        Some(f.s.store_dir().as_str())
    );
    let got = second.query_narinfo(&info.store_path).unwrap().unwrap();
    assert_eq!(*got, info);
    assert!(second.query_narinfo(&missing).unwrap().is_none());
    assert_eq!(
        second.query_realisation(&id).unwrap().unwrap().out_path,
        info.store_path
    );
    assert!(second.query_realisation(&no_id).unwrap().is_none());
    assert_eq!(f.requests(), Vec::<String>::new());
    f.down.store(false, Ordering::SeqCst);
    second.copy_into(&info.store_path, &f.s, &policy()).unwrap();
    assert_eq!(f.requests(), vec![info.url.clone()]);

    // The parameters of the URL are not part of the key; they still override.
    let third = f
        .open_as("http://cache.test/sub?priority=7", Some(f.disk()))
        .unwrap();
    assert_eq!(third.priority(), 7);
    assert!(third.query_narinfo(&info.store_path).unwrap().is_some());
    assert_eq!(f.requests(), Vec::<String>::new());
}

#[test]
fn expired_negative_entries_are_asked_again() {
    let f = DiskFixture::new();
    let missing = f.missing();
    assert!(f.open().query_narinfo(&missing).unwrap().is_none());
    f.requests();
    f.now.fetch_add(3599, Ordering::SeqCst);
    assert!(f.open().query_narinfo(&missing).unwrap().is_none());
    assert_eq!(f.requests(), Vec::<String>::new(), "still fresh");
    f.now.fetch_add(1, Ordering::SeqCst);
    // Meanwhile the path was pushed to the cache.
    let info = f.fc.add("missing", b"m", "none");
    assert_eq!(info.store_path, missing);
    assert!(f.open().query_narinfo(&missing).unwrap().is_some());
    assert_eq!(
        f.requests(),
        vec![format!("{}.narinfo", missing.hash_part())]
    );
}

#[test]
fn file_caches_do_not_use_the_disk_cache() {
    let f = DiskFixture::new();
    let info = f.fc.add("cached", b"c", "none");
    let disk = f.disk();
    let cache = f.open_as(&f.fc.url(), Some(disk.clone())).unwrap();
    assert!(!cache.uses_disk_cache());
    assert!(cache.query_narinfo(&info.store_path).unwrap().is_some());
    assert_eq!(disk.cache_info(&f.fc.url()).unwrap(), None);
}

#[test]
fn a_row_for_another_store_dir_is_not_used() {
    let f = DiskFixture::new();
    let disk = f.disk();
    disk.upsert_cache(HTTP_URI, "/other/store", true, 5)
        .unwrap();
    let cache = f.open_as(HTTP_URI, Some(disk.clone())).unwrap();
    assert_eq!(f.requests(), vec!["nix-cache-info".to_owned()]);
    assert_eq!(cache.priority(), 30);
    let row = disk.cache_info(HTTP_URI).unwrap().unwrap();
    assert_eq!(row.store_dir, f.s.store_dir().as_str());
    assert_eq!((row.want_mass_query, row.priority), (true, 30));
    // A cache for another store dir is still refused (the row is not consulted).
    std::fs::write(f.fc.dir.join("nix-cache-info"), "StoreDir: /elsewhere\n").unwrap();
    disk.upsert_cache(HTTP_URI, "/elsewhere", false, 0).unwrap();
    assert!(matches!(
        f.open_as(HTTP_URI, Some(disk)),
        Err(BinaryCacheError::WrongStoreDir { .. })
    ));
}

#[test]
fn a_broken_disk_cache_is_left_alone() {
    let f = DiskFixture::new();
    let info = f.fc.add("cached", b"c", "none");
    let disk = f.disk();
    let cache = f.open_as(HTTP_URI, Some(disk.clone())).unwrap();
    // Someone breaks the file under us.
    rusqlite::Connection::open(&f.disk_path)
        .unwrap()
        .execute_batch("drop table NARs")
        .unwrap();
    assert!(cache.query_narinfo(&info.store_path).unwrap().is_some());
    assert!(disk.is_disabled());
    assert!(!cache.uses_disk_cache());
    cache.copy_into(&info.store_path, &f.s, &policy()).unwrap();
    // Later caches do not touch it either.
    let later = f.open_as(HTTP_URI, Some(disk)).unwrap();
    assert!(!later.uses_disk_cache());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn cache_info_never_panics(s in ".*") {
            let _ = CacheInfo::parse("u", &s);
        }

        #[test]
        fn cache_info_round_trips(dir in "/[a-z]{1,10}(/[a-z]{1,10}){0,3}", prio in any::<u64>(), mass in any::<bool>()) {
            let text = format!("StoreDir: {dir}\nWantMassQuery: {}\nPriority: {prio}\n", u8::from(mass));
            let i = CacheInfo::parse("u", &text).unwrap();
            prop_assert_eq!(i.store_dir.as_deref(), Some(dir.as_str()));
            prop_assert_eq!(i.priority, Some(prio));
            prop_assert_eq!(i.want_mass_query, Some(mass));
        }

        #[test]
        fn store_url_never_panics(s in ".*") {
            let u = StoreUrl::parse(&s);
            prop_assert!(s.starts_with(&u.base));
        }
    }
}

/// The NAR of a tree with a file of several pipeline chunks, an executable, an
/// empty file and a symlink.
fn tree_nar(root: &Path) -> Vec<u8> {
    let src = root.join("tree-src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    // Not compressible, so compressed files are big too.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..(3 * pipeline::CHUNK + 12_345))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("sub/run"), b"#!/bin/sh\necho hi\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("sub/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("../big", src.join("sub/link")).unwrap();
    let mut nar = Vec::new();
    crate::nar::dump_path(&src, &mut nar).unwrap();
    nar
}

/// A narinfo for `nar` stored as `file` compressed with `method`.
fn narinfo_for(store_dir: &StoreDir, nar: &[u8], file: &[u8], method: &str) -> NarInfo {
    NarInfo {
        store_path: store_dir
            .make_store_path("output:out", &HashAlgo::Sha256.digest("tree"), "tree")
            .unwrap(),
        url: format!("nar/tree.nar{}", ext(method)),
        compression: method.to_owned(),
        file_hash: Some(HashAlgo::Sha256.digest(file)),
        file_size: Some(file.len() as u64),
        nar_hash: HashAlgo::Sha256.digest(nar),
        nar_size: nar.len() as u64,
        references: StorePathSet::new(),
        deriver: None,
        system: None,
        signatures: Default::default(),
        ca: None,
    }
}

/// Gives `data`, then fails with `error` instead of ending (`None`: ends).
struct Failing {
    data: std::io::Cursor<Vec<u8>>,
    error: Option<&'static str>,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Small reads, so a failure can come in the middle of the NAR.
        let len = buf.len().min(10_000);
        let n = self.data.read(&mut buf[..len])?;
        match (n, self.error) {
            (0, Some(e)) => Err(io::Error::other(e)),
            _ => Ok(n),
        }
    }
}

/// One way's result, and the restored tree (as a NAR) when it succeeded.
type Unpacking = (Result<(), String>, Option<Vec<u8>>);

/// Unpacks `file` with `narinfo` both ways (inline, pipelined), into fresh targets.
fn unpack_both_ways(
    root: &Path,
    cache: &BinaryCache,
    narinfo: &NarInfo,
    file: &[u8],
    fail: Option<&'static str>,
) -> [Unpacking; 2] {
    let open = || -> CacheFile {
        Box::new(Failing {
            data: std::io::Cursor::new(file.to_vec()),
            error: fail,
        })
    };
    let run = |name: &str, pipelined: bool| {
        let target = root.join(name);
        let _ = std::fs::remove_dir_all(&target);
        let _ = std::fs::remove_file(&target);
        let progress = TransferProgress::default();
        let r = if pipelined {
            cache.unpack_pipelined(narinfo, open(), &target, &progress)
        } else {
            cache.unpack_inline(narinfo, open(), &target, &progress)
        };
        let tree = r.is_ok().then(|| {
            let mut nar = Vec::new();
            crate::nar::dump_path(&target, &mut nar).unwrap();
            nar
        });
        if r.is_ok() {
            assert_eq!(progress.downloaded(), file.len() as u64, "{name}");
            assert_eq!(progress.unpacked(), narinfo.nar_size, "{name}");
        }
        (r.map_err(|e| e.to_string()), tree)
    };
    [run("inline", false), run("pipelined", true)]
}

#[test]
fn pipelined_unpacking_restores_what_inline_unpacking_restores() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    let nar = tree_nar(t.path());
    for m in METHODS {
        let file = compress(m, &nar);
        let info = narinfo_for(s.store_dir(), &nar, &file, m);
        let [inline, pipelined] = unpack_both_ways(t.path(), &cache, &info, &file, None);
        assert_eq!(inline.0, Ok(()), "{m}");
        assert_eq!(pipelined.0, Ok(()), "{m}");
        assert_eq!(inline.1.as_deref(), Some(&nar[..]), "{m}");
        assert_eq!(pipelined.1.as_deref(), Some(&nar[..]), "{m}");
        assert_eq!(
            std::fs::metadata(t.path().join("pipelined/sub/run"))
                .unwrap()
                .permissions()
                .mode()
                & 0o111,
            0o111,
            "{m}"
        );
    }
}

#[test]
fn pipelined_unpacking_fails_as_inline_unpacking_fails() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let fc = FakeCache::new(t.path(), s.store_dir());
    let cache = BinaryCache::open(&fc.url(), s.store_dir(), &HttpOptions::default()).unwrap();
    let nar = tree_nar(t.path());
    let mut cases: Vec<(String, NarInfo, Vec<u8>, Option<&'static str>)> = Vec::new();
    for m in METHODS {
        let file = compress(m, &nar);
        let good = narinfo_for(s.store_dir(), &nar, &file, m);
        let mut bad_nar_hash = good.clone();
        bad_nar_hash.nar_hash = HashAlgo::Sha256.digest(b"other");
        cases.push((format!("{m}: NarHash"), bad_nar_hash, file.clone(), None));
        let mut bad_nar_size = good.clone();
        bad_nar_size.nar_size += 8;
        cases.push((format!("{m}: NarSize"), bad_nar_size, file.clone(), None));
        let mut bad_file_hash = good.clone();
        bad_file_hash.file_hash = Some(HashAlgo::Sha256.digest(b"other"));
        cases.push((format!("{m}: FileHash"), bad_file_hash, file.clone(), None));
        let mut bad_file_size = good.clone();
        bad_file_size.file_size = Some(file.len() as u64 + 1);
        cases.push((format!("{m}: FileSize"), bad_file_size, file.clone(), None));
        // Truncated inside the big file.
        let cut = file[..file.len() / 2].to_vec();
        cases.push((format!("{m}: truncated"), good.clone(), cut.clone(), None));
        // A read error in the middle of the file and at its end.
        cases.push((
            format!("{m}: read error"),
            good.clone(),
            cut,
            Some("cable cut"),
        ));
        cases.push((
            format!("{m}: late read error"),
            good.clone(),
            file,
            Some("late"),
        ));
        // A corrupt NAR inside a good compressed file: bad padding, then trailing
        // data after the NAR.
        let mut corrupt = nar.clone();
        let at = corrupt.len() - 9;
        corrupt[at] ^= 0x55;
        let cfile = compress(m, &corrupt);
        let info = narinfo_for(s.store_dir(), &corrupt, &cfile, m);
        cases.push((format!("{m}: corrupt NAR"), info, cfile, None));
        let mut trailing = nar.clone();
        trailing.extend_from_slice(b"trailing bytes");
        let tfile = compress(m, &trailing);
        let info = narinfo_for(s.store_dir(), &trailing, &tfile, m);
        cases.push((format!("{m}: trailing data"), info, tfile, None));
    }
    let mut unknown = narinfo_for(s.store_dir(), &nar, &nar, "none");
    unknown.compression = "lz4".into();
    cases.push(("unknown method".into(), unknown, nar.clone(), None));
    for (what, info, file, fail) in cases {
        let [inline, pipelined] = unpack_both_ways(t.path(), &cache, &info, &file, fail);
        assert!(inline.0.is_err(), "{what}: inline unpacking succeeded");
        assert_eq!(pipelined.0, inline.0, "{what}");
    }
}
