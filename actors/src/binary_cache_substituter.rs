//! Real substituters for the goals: binary caches (`file://`, `http(s)://`) through
//! [`drover::binary_cache::BinaryCache`], and another local store, built from the
//! `substituters` setting.
//!
//! A local store is named as in Nix 2.8: `local?root=/r` or just the path `/r`. It
//! is a "chroot" store: the same logical store directory as ours, its files under
//! `/r/nix/store` and its database under `/r/nix/var/nix`. Its URI is `local`
//! (Nix prints `copying path '…' to 'local'...` for it), its priority 0 unless
//! `?priority=` says otherwise; paths are copied as a NAR streamed through a pipe
//! and checked against the source's NAR hash, and need signatures like any
//! substitute (Nix 2.8's `cannot add path '…' because it lacks a valid signature`).
//!
//! [`substituters_from_settings`] opens every URL of `substituters` (which already
//! includes `extra-substituters`), as Nix's `getDefaultSubstituters` does: a URL that
//! cannot be opened (unknown scheme, unreachable, a cache for another store
//! directory) is skipped with a warning, and the rest are sorted by priority
//! (stable, so equal priorities keep the order of the setting). Signatures are
//! checked twice, as in Nix: the goal ignores an untrusted narinfo before
//! downloading, and [`BinaryCache::copy_into`] refuses it again before registering.
//!
//! Both count a copy's bytes into its [`Transfer`]: a binary cache the compressed
//! bytes downloaded and the NAR bytes unpacked (`FileSize` and `NarSize` once
//! done); a local store only the NAR bytes unpacked, as it has nothing to download
//! (its paths have no `FileSize`, as in Nix, where such a copy has no file transfer).

use std::sync::Arc;

use std::path::{Path, PathBuf};

use drover::binary_cache::{
    check_nar, check_trust, BinaryCache, BinaryCacheError, CacheOptions, HttpOptions,
    NarInfoCacheTtl, NarInfoDiskCache, StoreUrl, TrustPolicy,
};
use drover::config::Settings;
use drover::narinfo::NarInfo;
use drover::realisation::{DrvOutput, Realisation};
use drover::signature::{PublicKey, PublicKeys};
use drover::store::{LocalStore, RepairFlag};
use drover::store_path::{StoreDir, StorePath};

use crate::progress::{CountingReader, Transfer};
use crate::substituter::{
    Fetched, SubstitutablePathInfo, Substituter, SubstituterError, UnregisteredPlace,
};

/// A binary cache as a [`Substituter`].
#[derive(Debug)]
pub struct BinaryCacheSubstituter {
    cache: BinaryCache,
    policy: TrustPolicy,
}

impl BinaryCacheSubstituter {
    pub fn new(cache: BinaryCache, policy: TrustPolicy) -> BinaryCacheSubstituter {
        BinaryCacheSubstituter { cache, policy }
    }

    /// Opens the cache at `url` for a store in `store_dir`.
    pub fn open(
        url: &str,
        store_dir: &StoreDir,
        http: &HttpOptions,
        policy: TrustPolicy,
    ) -> Result<BinaryCacheSubstituter, BinaryCacheError> {
        Ok(BinaryCacheSubstituter::new(
            BinaryCache::open(url, store_dir, http)?,
            policy,
        ))
    }

    pub fn cache(&self) -> &BinaryCache {
        &self.cache
    }
}

fn failed(e: BinaryCacheError) -> SubstituterError {
    let message = e.to_string();
    match e {
        BinaryCacheError::Gone { path, .. } => SubstituterError::Gone { path, message },
        BinaryCacheError::Disabled(uri) => SubstituterError::Disabled(uri),
        _ => SubstituterError::Failed(message),
    }
}

impl Substituter for BinaryCacheSubstituter {
    fn uri(&self) -> String {
        self.cache.uri().to_owned()
    }

    fn priority(&self) -> u64 {
        self.cache.priority()
    }

    fn is_trusted(&self) -> bool {
        self.cache.is_trusted()
    }

    fn query_path_info(
        &self,
        path: &StorePath,
    ) -> Result<Option<SubstitutablePathInfo>, SubstituterError> {
        Ok(self
            .cache
            .query_narinfo(path)
            .map_err(failed)?
            .map(|n| SubstitutablePathInfo {
                path: n.store_path.clone(),
                references: n.references.clone(),
                deriver: n.deriver.clone(),
                nar_hash: n.nar_hash.clone(),
                nar_size: n.nar_size,
                download_size: n.file_size,
                ca: n.ca.clone(),
                sigs: n.signatures.clone(),
            }))
    }

    fn copy_into(
        &self,
        path: &StorePath,
        store: &LocalStore,
        repair: RepairFlag,
        progress: &Transfer,
    ) -> Result<(), SubstituterError> {
        self.cache
            .copy_into_observed(path, store, &self.policy, repair, progress.binary_cache())
            .map(|_| ())
            .map_err(failed)
    }

    fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, SubstituterError> {
        self.cache.query_realisation(id).map_err(failed)
    }

    fn fetches_early(&self) -> bool {
        true
    }

    fn fetch_unregistered(
        &self,
        path: &StorePath,
        store: &LocalStore,
        progress: &Transfer,
    ) -> Result<Fetched, SubstituterError> {
        let Some(place) = UnregisteredPlace::take() else {
            return Ok(Fetched::Deferred);
        };
        Ok(
            match self
                .cache
                .fetch_unregistered(path, store, &self.policy, progress.binary_cache())
                .map_err(failed)?
            {
                None => Fetched::AlreadyValid,
                Some(object) => Fetched::Unpacked {
                    object: Box::new(object),
                    place,
                },
            },
        )
    }
}

/// Another local store (a chroot store rooted at `root`) as a [`Substituter`].
#[derive(Debug)]
pub struct LocalStoreSubstituter {
    root: PathBuf,
    store: LocalStore,
    priority: u64,
    trusted: bool,
    policy: TrustPolicy,
}

impl LocalStoreSubstituter {
    /// Opens the store rooted at `root` for our store directory (`url` gives the
    /// `priority` and `trusted` parameters).
    pub fn open(
        root: &Path,
        url: &StoreUrl,
        settings: &Settings,
        policy: TrustPolicy,
    ) -> Result<LocalStoreSubstituter, drover::store::StoreError> {
        let state = root.join("nix/var/nix");
        let mut env = drover::config::Env::new();
        env.insert("NIX_STORE_DIR".into(), settings.store_dir().as_str().into());
        env.insert("NIX_STATE_DIR".into(), state.display().to_string());
        env.insert(
            "NIX_LOG_DIR".into(),
            root.join("nix/var/log/nix").display().to_string(),
        );
        env.insert(
            "NIX_CONF_DIR".into(),
            root.join("nix/etc").display().to_string(),
        );
        env.insert("NIX_USER_CONF_FILES".into(), String::new());
        env.insert(
            "NIX_CONFIG".into(),
            "sandbox = false\nbuild-users-group =\nexperimental-features = ca-derivations\n".into(),
        );
        let other = Settings::load(&env, &[]).map_err(|e| {
            drover::store::StoreError::InvalidPath(format!("{}: {e}", root.display()))
        })?;
        Ok(LocalStoreSubstituter {
            root: root.to_owned(),
            store: LocalStore::open(&other)?,
            priority: url
                .params
                .get("priority")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            trusted: matches!(
                url.params.get("trusted").map(String::as_str),
                Some("1" | "true")
            ),
            policy,
        })
    }

    /// Where the files of `path` are.
    fn source(&self, path: &StorePath) -> PathBuf {
        self.root.join("nix/store").join(path.to_string())
    }
}

impl Substituter for LocalStoreSubstituter {
    fn uri(&self) -> String {
        "local".into()
    }

    fn priority(&self) -> u64 {
        self.priority
    }

    fn is_trusted(&self) -> bool {
        self.trusted
    }

    fn query_path_info(
        &self,
        path: &StorePath,
    ) -> Result<Option<SubstitutablePathInfo>, SubstituterError> {
        let info = self
            .store
            .query_path_info(path)
            .map_err(|e| SubstituterError::Failed(e.to_string()))?;
        Ok(info.map(|i| SubstitutablePathInfo {
            path: i.path,
            references: i.references,
            deriver: i.deriver,
            nar_hash: i.nar_hash,
            nar_size: i.nar_size,
            download_size: None,
            ca: i.ca,
            sigs: i.sigs,
        }))
    }

    fn copy_into(
        &self,
        path: &StorePath,
        store: &LocalStore,
        repair: RepairFlag,
        progress: &Transfer,
    ) -> Result<(), SubstituterError> {
        let sd = store.store_dir();
        let fail = |e: String| SubstituterError::Failed(e);
        let mut info = self
            .store
            .query_path_info(path)
            .map_err(|e| fail(e.to_string()))?
            .ok_or_else(|| SubstituterError::Gone {
                path: sd.print(path),
                // What Nix's `queryPathInfo` says of a path the other store lacks.
                message: format!("path '{}' is not valid", sd.print(path)),
            })?;
        let as_narinfo = NarInfo {
            store_path: info.path.clone(),
            url: String::new(),
            compression: "none".into(),
            file_hash: None,
            file_size: None,
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            signatures: info.sigs.clone(),
            ca: info.ca.clone(),
        };
        check_trust(sd, &as_narinfo, self.trusted, &self.policy)
            .map_err(|e| fail(e.to_string()))?;
        if repair == RepairFlag::NoRepair
            && store.is_valid_path(path).map_err(|e| fail(e.to_string()))?
        {
            return Ok(());
        }
        info.registration_time = 0;
        info.ultimate = false;
        // The NAR flows through a pipe from a dumping thread into the restore.
        let (r, w) = nix::unistd::pipe().map_err(|e| fail(format!("creating a pipe: {e}")))?;
        let src = self.source(path);
        let dumper = std::thread::spawn(move || {
            let mut out = std::io::BufWriter::new(std::fs::File::from(w));
            drover::nar::dump_path(&src, &mut out)
                .map_err(|e| e.to_string())
                .and_then(|()| std::io::Write::flush(&mut out).map_err(|e| e.to_string()))
        });
        let mut failure: Option<String> = None;
        let printed = sd.print(path);
        let r = store.add_object_with(&info, repair, |tmp| {
            let check = (|| {
                let nar = CountingReader {
                    inner: std::fs::File::from(r),
                    transfer: progress,
                    downloaded: false,
                    unpacked: true,
                };
                let summary = drover::nar::restore(nar, tmp)
                    .map_err(|e| format!("copying '{printed}' from 'local': {e}"))?;
                check_nar(&printed, &info.nar_hash, info.nar_size, &summary)
                    .map_err(|e| e.to_string())
            })();
            check.map_err(|e| {
                failure = Some(e);
                drover::store::StoreError::InvalidPath(printed.clone())
            })
        });
        let dumped = dumper
            .join()
            .unwrap_or_else(|_| Err("the NAR dumper panicked".into()));
        if let Some(e) = failure {
            return Err(match dumped {
                Err(d) => fail(format!("{e} (reading the source: {d})")),
                Ok(()) => fail(e),
            });
        }
        // Once the restored NAR matched the source's hash, the dumper's fate (it
        // may not even have been read when the path became valid meanwhile) does not
        // matter.
        r.map_err(|e| fail(e.to_string()))
    }

    fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, SubstituterError> {
        self.store
            .query_realisation(id)
            .map_err(|e| SubstituterError::Failed(e.to_string()))
    }
}

/// `require-sigs` and `trusted-public-keys` (keys that do not parse are skipped with
/// a warning).
pub fn trust_policy_from_settings(settings: &Settings) -> TrustPolicy {
    let mut keys = PublicKeys::new();
    for k in settings.trusted_public_keys() {
        match PublicKey::parse(&k) {
            Ok(k) => keys.insert(k),
            Err(e) => log::warn!("ignoring trusted public key '{k}': {e}"),
        }
    }
    TrustPolicy {
        require_sigs: settings.require_sigs(),
        keys,
    }
}

/// The CA bundle Nix 2.8 hands curl: `NIX_SSL_CERT_FILE` if set, else
/// `SSL_CERT_FILE`; when that is unset or empty, the first of
/// `/etc/ssl/certs/ca-certificates.crt` and
/// `/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt` that exists; else
/// none. (A set but empty `NIX_SSL_CERT_FILE` hides `SSL_CERT_FILE`, as in Nix.)
pub fn ca_file_from_env(
    var: impl Fn(&str) -> Option<String>,
    exists: impl Fn(&std::path::Path) -> bool,
) -> Option<std::path::PathBuf> {
    let named = var("NIX_SSL_CERT_FILE")
        .or_else(|| var("SSL_CERT_FILE"))
        .unwrap_or_default();
    if !named.is_empty() {
        return Some(named.into());
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
    ]
    .iter()
    .map(std::path::Path::new)
    .find(|p| exists(p))
    .map(std::path::Path::to_path_buf)
}

/// `connect-timeout` (0: the 300 s default), `stalled-download-timeout`,
/// `download-attempts`, `netrc-file`, and the CA bundle of [`ca_file_from_env`]
/// (read from the process environment: this is the command's side, not the
/// library's).
pub fn http_options_from_settings(settings: &Settings) -> HttpOptions {
    let uint = |name: &str| settings.get(name).and_then(|v| v.parse::<u64>().ok());
    let mut o = HttpOptions::default();
    if let Some(s) = uint("connect-timeout").filter(|s| *s > 0) {
        o.connect_timeout = std::time::Duration::from_secs(s);
    }
    if let Some(s) = uint("stalled-download-timeout").filter(|s| *s > 0) {
        o.stalled_timeout = std::time::Duration::from_secs(s);
    }
    if let Some(n) = uint("download-attempts") {
        o.attempts = n.clamp(1, u32::MAX as u64) as u32;
    }
    // Nix leaves a failing cache alone for a minute only when it may build instead.
    o.disable_on_failure = settings.fallback();
    o.netrc_file = settings
        .get("netrc-file")
        .filter(|f| !f.is_empty())
        .map(Into::into);
    o.ca_file = ca_file_from_env(|v| std::env::var(v).ok(), std::path::Path::exists);
    o
}

/// The substituters of `substituters`/`extra-substituters`, sorted by priority
/// (stable), and a warning for each one that could not be opened. Empty when
/// `substitute = false`.
///
/// HTTP(S) caches share Nix's on-disk narinfo cache
/// (`$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite`, with `narinfo-cache-positive-ttl`
/// and `narinfo-cache-negative-ttl`), opened once, when the first such cache is;
/// if it cannot be opened, a warning says so and the caches work without it.
pub fn substituters_from_settings(settings: &Settings) -> (Vec<Arc<dyn Substituter>>, Vec<String>) {
    let mut subs: Vec<Arc<dyn Substituter>> = Vec::new();
    let mut warnings = Vec::new();
    if settings.get("substitute").as_deref() == Some("false") {
        return (subs, warnings);
    }
    let policy = trust_policy_from_settings(settings);
    let mut options = CacheOptions {
        http: http_options_from_settings(settings),
        disk_cache: None,
    };
    let mut disk_tried = false;
    let mut seen = std::collections::BTreeSet::new();
    for url in settings.substituters() {
        if !seen.insert(url.clone()) {
            continue;
        }
        let parsed = StoreUrl::parse(&url);
        let local_root = if parsed.base == "local" {
            parsed.params.get("root").map(PathBuf::from)
        } else if parsed.base.starts_with('/') {
            Some(PathBuf::from(&parsed.base))
        } else {
            None
        };
        let opened: Result<Arc<dyn Substituter>, String> = match local_root {
            Some(root) => LocalStoreSubstituter::open(&root, &parsed, settings, policy.clone())
                .map(|s| Arc::new(s) as Arc<dyn Substituter>)
                .map_err(|e| e.to_string()),
            None => {
                if !disk_tried
                    && (parsed.base.starts_with("http://") || parsed.base.starts_with("https://"))
                {
                    disk_tried = true;
                    let env: drover::config::Env = std::env::vars().collect();
                    match NarInfoDiskCache::open_default(
                        &env,
                        NarInfoCacheTtl::from_settings(settings),
                    ) {
                        Ok(d) => options.disk_cache = Some(Arc::new(d)),
                        Err(e) => warnings.push(format!("not using the narinfo disk cache: {e}")),
                    }
                }
                BinaryCache::open_with(&url, settings.store_dir(), &options)
                    .map(|c| {
                        Arc::new(BinaryCacheSubstituter::new(c, policy.clone()))
                            as Arc<dyn Substituter>
                    })
                    .map_err(|e| e.to_string())
            }
        };
        match opened {
            Ok(s) => subs.push(s),
            Err(e) => warnings.push(e),
        }
    }
    subs.sort_by_key(|s| s.priority());
    (subs, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path, conf: &str) -> Settings {
        Settings::for_root(dir, conf).unwrap()
    }

    fn cache(dir: &std::path::Path, store_dir: &str, priority: u64) -> String {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("nix-cache-info"),
            format!("StoreDir: {store_dir}\nPriority: {priority}\n"),
        )
        .unwrap();
        format!("file://{}", dir.display())
    }

    #[test]
    fn opened_sorted_by_priority_and_bad_ones_skipped() {
        let t = tempfile::tempdir().unwrap();
        let store_dir = t.path().join("store").display().to_string();
        let a = cache(&t.path().join("a"), &store_dir, 60);
        let b = cache(&t.path().join("b"), &store_dir, 20);
        let c = cache(&t.path().join("c"), "/other/store", 10);
        let s = settings(
            t.path(),
            &format!("substituters = {a} {b}?priority=70 {c}\nextra-substituters = s3://x {b}\n"),
        );
        let (subs, warnings) = substituters_from_settings(&s);
        let uris: Vec<String> = subs.iter().map(|s| s.uri()).collect();
        assert_eq!(uris, vec![b.clone(), a.clone(), format!("{b}?priority=70")]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("is for Nix stores with prefix '/other/store'"));
        assert!(warnings[1].contains("s3://x"));
    }

    #[test]
    fn substitute_false_means_none() {
        let t = tempfile::tempdir().unwrap();
        let store_dir = t.path().join("store").display().to_string();
        let a = cache(&t.path().join("a"), &store_dir, 60);
        let s = settings(
            t.path(),
            &format!("substituters = {a}\nsubstitute = false\n"),
        );
        assert!(substituters_from_settings(&s).0.is_empty());
    }

    #[test]
    fn http_options() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(
            t.path(),
            "connect-timeout = 7\nstalled-download-timeout = 9\ndownload-attempts = 2\n",
        );
        let o = http_options_from_settings(&s);
        assert_eq!(o.connect_timeout.as_secs(), 7);
        assert_eq!(o.stalled_timeout.as_secs(), 9);
        assert_eq!(o.attempts, 2);

        let s = settings(t.path(), "netrc-file = /etc/my-netrc\n");
        let o = http_options_from_settings(&s);
        assert_eq!(
            o.netrc_file.as_deref(),
            Some(std::path::Path::new("/etc/my-netrc"))
        );
    }

    #[test]
    fn ca_file_order_is_nix_2_8s() {
        use std::path::{Path, PathBuf};
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |v: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, x)| x.to_string())
            }
        };
        let system = |p: &Path| p == Path::new("/etc/ssl/certs/ca-certificates.crt");
        let none = |_: &Path| false;
        let both: &[(&str, &str)] = &[("NIX_SSL_CERT_FILE", "/a.pem"), ("SSL_CERT_FILE", "/b.pem")];
        assert_eq!(
            ca_file_from_env(env(both), system),
            Some(PathBuf::from("/a.pem"))
        );
        assert_eq!(
            ca_file_from_env(env(&[("SSL_CERT_FILE", "/b.pem")]), system),
            Some(PathBuf::from("/b.pem"))
        );
        assert_eq!(
            ca_file_from_env(env(&[]), system),
            Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt"))
        );
        // A set but empty NIX_SSL_CERT_FILE hides SSL_CERT_FILE.
        let empty: &[(&str, &str)] = &[("NIX_SSL_CERT_FILE", ""), ("SSL_CERT_FILE", "/b.pem")];
        assert_eq!(ca_file_from_env(env(empty), none), None);
    }

    /// A local store rooted at `dir/other` holding one regular file with `contents`.
    fn other_store(
        dir: &std::path::Path,
        s: &Settings,
        contents: &[u8],
    ) -> (LocalStoreSubstituter, StorePath) {
        let root = dir.join("other");
        let url = StoreUrl::parse(&format!("local?root={}", root.display()));
        let sub = LocalStoreSubstituter::open(&root, &url, s, TrustPolicy::default()).unwrap();
        let path = s
            .store_dir()
            .text_path_of("f", contents, &Default::default())
            .unwrap();
        std::fs::create_dir_all(root.join("nix/store")).unwrap();
        std::fs::write(sub.source(&path), contents).unwrap();
        let mut sink = drover::hash::HashSink::new(drover::hash::HashAlgo::Sha256);
        drover::nar::dump_bytes(contents, &mut sink).unwrap();
        let (h, n) = sink.finish();
        sub.store
            .register_valid_paths(&[drover::store::ValidPathInfo::new(path.clone(), h, n)])
            .unwrap();
        (sub, path)
    }

    #[test]
    fn local_store_copies_and_checks_the_nar_hash() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(t.path(), "");
        let ours = LocalStore::open(&s).unwrap();
        let (sub, path) = other_store(t.path(), &s, b"hello");
        assert_eq!(sub.uri(), "local");
        assert_eq!(sub.priority(), 0);
        assert!(sub.query_path_info(&path).unwrap().is_some());
        // Corrupted at the source: refused, nothing registered.
        std::fs::write(sub.source(&path), b"HELLO").unwrap();
        let e = sub
            .copy_into(&path, &ours, RepairFlag::NoRepair, &Transfer::default())
            .unwrap_err();
        assert!(
            e.to_string().starts_with("hash mismatch importing path"),
            "{e}"
        );
        assert!(!ours.is_valid_path(&path).unwrap());
        assert!(!ours.real_path(&path).exists());
        // Intact: copied.
        std::fs::write(sub.source(&path), b"hello").unwrap();
        let progress = Transfer::default();
        sub.copy_into(&path, &ours, RepairFlag::NoRepair, &progress)
            .unwrap();
        assert_eq!(std::fs::read(ours.real_path(&path)).unwrap(), b"hello");
        // Every NAR byte counted as unpacked; nothing downloaded (no FileSize).
        let info = sub.query_path_info(&path).unwrap().unwrap();
        assert_eq!(progress.unpacked(), info.nar_size);
        assert_eq!(progress.downloaded(), info.download_size.unwrap_or(0));
        // Missing from the source store: gone.
        let other = s
            .store_dir()
            .text_path_of("g", b"x", &Default::default())
            .unwrap();
        assert!(matches!(
            sub.copy_into(&other, &ours, RepairFlag::NoRepair, &Transfer::default()),
            Err(SubstituterError::Gone { .. })
        ));
    }

    #[test]
    fn local_store_requires_signatures() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(t.path(), "");
        let ours = LocalStore::open(&s).unwrap();
        let (mut sub, path) = other_store(t.path(), &s, b"unsigned");
        sub.policy.require_sigs = true;
        let e = sub
            .copy_into(&path, &ours, RepairFlag::NoRepair, &Transfer::default())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot add path '{}' because it lacks a valid signature",
                s.store_dir().print(&path)
            )
        );
        assert!(!ours.is_valid_path(&path).unwrap());
    }

    /// A `file://` cache in `dir/cache` serving one bzip2-compressed regular file.
    fn bzip2_cache(dir: &std::path::Path, s: &Settings, contents: &[u8]) -> (String, NarInfo) {
        use drover::hash::{Encoding, HashAlgo};
        let sd = s.store_dir();
        let url = cache(&dir.join("cache"), sd.as_str(), 30);
        let mut nar = Vec::new();
        drover::nar::dump_bytes(contents, &mut nar).unwrap();
        let mut file = Vec::new();
        {
            let mut enc = bzip2::write::BzEncoder::new(&mut file, bzip2::Compression::best());
            std::io::Write::write_all(&mut enc, &nar).unwrap();
            enc.finish().unwrap();
        }
        let file_hash = HashAlgo::Sha256.digest(&file);
        let nar_url = format!("nar/{}.nar.bz2", file_hash.encode(Encoding::Base32));
        std::fs::create_dir_all(dir.join("cache/nar")).unwrap();
        std::fs::write(dir.join("cache").join(&nar_url), &file).unwrap();
        let info = NarInfo {
            store_path: sd.text_path_of("f", contents, &Default::default()).unwrap(),
            url: nar_url,
            compression: "bzip2".into(),
            file_hash: Some(file_hash),
            file_size: Some(file.len() as u64),
            nar_hash: HashAlgo::Sha256.digest(&nar),
            nar_size: nar.len() as u64,
            references: Default::default(),
            deriver: None,
            system: None,
            signatures: Default::default(),
            ca: None,
        };
        std::fs::write(
            dir.join("cache")
                .join(format!("{}.narinfo", info.store_path.hash_part())),
            info.to_string(sd),
        )
        .unwrap();
        (url, info)
    }

    #[test]
    fn binary_cache_copy_counts_file_size_downloaded_and_nar_size_unpacked() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(t.path(), "");
        let ours = LocalStore::open(&s).unwrap();
        // Compressible but not trivially: the file and the NAR differ in size.
        let contents: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (url, narinfo) = bzip2_cache(t.path(), &s, &contents);
        let sub = BinaryCacheSubstituter::open(
            &url,
            s.store_dir(),
            &HttpOptions::default(),
            TrustPolicy::default(),
        )
        .unwrap();
        let info = sub.query_path_info(&narinfo.store_path).unwrap().unwrap();
        assert_eq!(info.download_size, narinfo.file_size);
        let progress = Transfer::default();
        sub.copy_into(&narinfo.store_path, &ours, RepairFlag::NoRepair, &progress)
            .unwrap();
        assert!(ours.is_valid_path(&narinfo.store_path).unwrap());
        assert_eq!(Some(progress.downloaded()), narinfo.file_size);
        assert_eq!(progress.unpacked(), narinfo.nar_size);
        assert_ne!(progress.downloaded(), progress.unpacked());
    }
}
