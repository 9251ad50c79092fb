use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

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
