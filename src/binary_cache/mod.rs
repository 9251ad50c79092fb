//! Binary caches as substituters: reading `nix-cache-info`, narinfos and
//! realisations, and copying a path into the local store. Blocking; no async runtime.
//!
//! A binary cache (written by `nix copy --to file://…`) holds:
//!
//! * `nix-cache-info`: `Name: value` lines; `StoreDir` (must equal the local store
//!   directory, else Nix's `binary cache '…' is for Nix stores with prefix '…', not
//!   '…'`), `WantMassQuery` (`1`/`0`), `Priority` (lower is tried first; 0 when
//!   absent, Nix 2.8's store default). A local cache without the file is read with
//!   the defaults (Nix would write one); an HTTP(S) one is refused as Nix does: `'…'
//!   does not appear to be a binary cache`.
//! * `<hash part>.narinfo` per path ([`crate::narinfo`]); a missing narinfo means
//!   "no substitute". Answers, present or absent, are remembered for the life of the
//!   [`BinaryCache`] value, and, for HTTP(S) caches, in the on-disk narinfo cache
//!   shared with Nix ([`disk_cache`]) when one is given.
//! * `nar/<file hash>.nar<ext>`: the NAR, compressed as the narinfo's `Compression`
//!   says ([`compression`]).
//! * `realisations/<drv hash>!<output>.doi`: the JSON realisation of a
//!   content-addressed derivation output. Nix 2.8 writes them unsigned and accepts
//!   them so.
//!
//! [`BinaryCache::copy_into`] is one stream: transport → (hashing of the compressed
//! bytes) → decompression → NAR parse and restore into a temporary store path (the
//! NAR hash computed while parsing) → checks of `NarHash`, `NarSize` and, when the
//! narinfo has them, `FileHash`/`FileSize` → only then canonicalise, rename into place
//! and register ([`LocalStore::add_object`]). A mismatch or a truncated download
//! registers nothing and leaves nothing behind; memory use does not grow with the
//! NAR. Under `require-sigs` a path is accepted only with a valid signature by a
//! trusted key or a `CA` that really gives its store path
//! ([`NarInfo::check_signatures`]).
//!
//! With a [`NarInfoDiskCache`] (as Nix 2.8 does for HTTP(S) caches, never for
//! `file://`): `nix-cache-info` is not fetched while the disk cache has a row for the
//! URL (its store dir must be ours, else the row is ignored and replaced), narinfos and
//! realisations are looked up there (after the in-memory map) before the network, and
//! the network's answers, present or absent, are written there. A disk cache that
//! fails is reported once (a warning) and then left alone: it never fails a
//! substitution.
//!
//! URLs: `file:///dir` and `http(s)://host/path`, each with optional `?name=value&…`
//! parameters: `priority`, `want-mass-query` and `trusted` (`1`/`true`) override the
//! cache's own values, as in Nix.

pub mod compression;
pub mod disk_cache;
pub mod netrc;
mod pipeline;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::hash::{Encoding, Hash, HashAlgo, HashSink};
use crate::nar::{NarReadError, NarSummary};
use crate::narinfo::{NarInfo, NarInfoError};
use crate::realisation::{DrvOutput, Realisation, RealisationError};
use crate::signature::PublicKeys;
use crate::store::{LocalStore, RepairFlag, StoreError, UnregisteredObject, ValidPathInfo};
use crate::store_path::{StoreDir, StorePath};

pub use disk_cache::{Lookup, NarInfoCacheTtl, NarInfoDiskCache};
pub use netrc::{Credentials, Netrc, NetrcEntry, NetrcError};
pub use transport::{CacheFile, FileTransport, HttpOptions, HttpTransport, Transport, NOTICE};

/// Priority of a cache whose `nix-cache-info` does not give one: Nix 2.8's store
/// default, 0 (it is what Nix records in `binary-cache-v6.sqlite` for such a cache).
pub const DEFAULT_PRIORITY: u64 = 0;

/// Largest narinfo, `nix-cache-info` or `.doi` file read (they are small text files).
const MAX_TEXT_FILE: u64 = 16 * 1024 * 1024;

/// Why a binary cache could not be read or a path could not be copied from it.
#[derive(Debug, Error)]
pub enum BinaryCacheError {
    #[error("don't know how to open Nix store '{0}'")]
    UnsupportedUrl(String),
    #[error("unable to download '{url}': {message}")]
    Http { url: String, message: String },
    /// An HTTP(S) cache without `nix-cache-info` (or refusing to show it: 401/403).
    #[error("'{0}' does not appear to be a binary cache")]
    NotABinaryCache(String),
    /// The cache failed a moment ago and is left alone for a while (Nix's
    /// `SubstituterDisabled`).
    #[error("substituter '{0}' is disabled")]
    Disabled(String),
    #[error("{context} '{path}': {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("reading '{file}' from '{uri}': {source}")]
    Read {
        uri: String,
        file: String,
        source: io::Error,
    },
    #[error("invalid file name '{0}' in binary cache")]
    BadFileName(String),
    #[error("binary cache '{uri}' is for Nix stores with prefix '{theirs}', not '{ours}'")]
    WrongStoreDir {
        uri: String,
        theirs: String,
        ours: String,
    },
    #[error("invalid line '{line}' in 'nix-cache-info' of '{uri}'")]
    BadCacheInfo { uri: String, line: String },
    #[error("invalid narinfo '{file}' in '{uri}': {source}")]
    NarInfo {
        uri: String,
        file: String,
        source: Box<NarInfoError>,
    },
    #[error("narinfo '{file}' in '{uri}' is for '{got}', not '{wanted}'")]
    WrongPath {
        uri: String,
        file: String,
        wanted: String,
        got: String,
    },
    #[error("invalid realisation '{file}' in '{uri}': {source}")]
    Realisation {
        uri: String,
        file: String,
        source: RealisationError,
    },
    #[error("unknown compression method '{0}'")]
    UnknownCompression(String),
    #[error("decompressing with '{method}': {message}")]
    Decompression { method: String, message: String },
    /// A file the narinfo of `path` names (or the narinfo itself) is missing: Nix's
    /// `NoSuchBinaryCacheFile`, turned into `SubstituteGone` (as if there were no
    /// substitute). Nix 2.8 names the cache only when it is not a local directory.
    #[error(
        "file '{file}' does not exist in binary cache{}",
        gone_cache_suffix(uri)
    )]
    Gone {
        path: String,
        file: String,
        uri: String,
    },
    #[error("NAR for '{path}' fetched from '{uri}' is corrupt or incomplete: {source}")]
    Nar {
        path: String,
        uri: String,
        source: Box<NarReadError>,
    },
    #[error(
        "hash mismatch importing path '{path}';\n  specified: {specified}\n  got:       {got}"
    )]
    HashMismatch {
        path: String,
        specified: String,
        got: String,
    },
    #[error(
        "size mismatch importing path '{path}';\n  specified: {specified}\n  got:       {got}"
    )]
    SizeMismatch {
        path: String,
        specified: u64,
        got: u64,
    },
    #[error("file hash mismatch of the NAR of '{path}' from '{uri}';\n  specified: {specified}\n  got:       {got}")]
    FileHashMismatch {
        path: String,
        uri: String,
        specified: String,
        got: String,
    },
    #[error("file size mismatch of the NAR of '{path}' from '{uri}';\n  specified: {specified}\n  got:       {got}")]
    FileSizeMismatch {
        path: String,
        uri: String,
        specified: u64,
        got: u64,
    },
    #[error("cannot add path '{0}' because it lacks a valid signature")]
    Untrusted(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The contents of `nix-cache-info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: Option<String>,
    pub want_mass_query: Option<bool>,
    pub priority: Option<u64>,
}

impl CacheInfo {
    /// Parses `nix-cache-info` text; unknown fields are ignored, as in Nix.
    pub fn parse(uri: &str, text: &str) -> Result<CacheInfo, BinaryCacheError> {
        let mut info = CacheInfo::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = || BinaryCacheError::BadCacheInfo {
                uri: uri.to_owned(),
                line: line.to_owned(),
            };
            let (name, value) = line.split_once(':').ok_or_else(bad)?;
            let value = value.trim();
            match name.trim() {
                "StoreDir" => info.store_dir = Some(value.to_owned()),
                "WantMassQuery" => info.want_mass_query = Some(value == "1"),
                "Priority" => info.priority = Some(value.parse().map_err(|_| bad())?),
                _ => {}
            }
        }
        Ok(info)
    }
}

/// What a path must show to be accepted (`require-sigs`, `trusted-public-keys`).
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    pub require_sigs: bool,
    pub keys: PublicKeys,
}

/// A store URL split into scheme, rest and `?name=value&…` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The URL without parameters.
    pub base: String,
    pub params: BTreeMap<String, String>,
}

impl StoreUrl {
    pub fn parse(url: &str) -> StoreUrl {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let params = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (p.to_owned(), String::new()),
            })
            .collect();
        StoreUrl {
            base: base.to_owned(),
            params,
        }
    }

    fn bool_param(&self, name: &str) -> Option<bool> {
        self.params
            .get(name)
            .map(|v| matches!(v.as_str(), "1" | "true"))
    }
}

/// A binary cache (Nix's `BinaryCacheStore`) read through a [`Transport`].
pub struct BinaryCache {
    transport: Box<dyn Transport>,
    store_dir: StoreDir,
    info: CacheInfo,
    url: StoreUrl,
    /// Narinfos (and their absence) by hash part, for the life of this value.
    narinfos: Mutex<HashMap<String, Option<Arc<NarInfo>>>>,
    /// The shared on-disk cache (HTTP(S) caches only), keyed by `disk_key`.
    disk: Option<Arc<NarInfoDiskCache>>,
    disk_key: String,
}

/// How [`BinaryCache::open_with`] opens a cache.
#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    pub http: HttpOptions,
    /// The on-disk narinfo cache; used for HTTP(S) caches only, as in Nix 2.8.
    pub disk_cache: Option<Arc<NarInfoDiskCache>>,
}

impl std::fmt::Debug for BinaryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryCache")
            .field("uri", &self.uri())
            .field("info", &self.info)
            .finish()
    }
}

impl BinaryCache {
    /// Opens the cache at `url` (`file://…`, `http://…`, `https://…`) for a store
    /// in `store_dir`, reading its `nix-cache-info`.
    pub fn open(
        url: &str,
        store_dir: &StoreDir,
        http: &HttpOptions,
    ) -> Result<BinaryCache, BinaryCacheError> {
        BinaryCache::open_with(
            url,
            store_dir,
            &CacheOptions {
                http: http.clone(),
                disk_cache: None,
            },
        )
    }

    /// [`open`](Self::open) with options, among them the on-disk narinfo cache.
    pub fn open_with(
        url: &str,
        store_dir: &StoreDir,
        options: &CacheOptions,
    ) -> Result<BinaryCache, BinaryCacheError> {
        let http = &options.http;
        let parsed = StoreUrl::parse(url);
        let transport: Box<dyn Transport> = if let Some(dir) = parsed.base.strip_prefix("file://") {
            Box::new(FileTransport::new(url, dir))
        } else if parsed.base.starts_with("http://") || parsed.base.starts_with("https://") {
            Box::new(HttpTransport::new(url, &parsed.base, http.clone()))
        } else {
            return Err(BinaryCacheError::UnsupportedUrl(url.to_owned()));
        };
        BinaryCache::with_transport_and_disk_cache(transport, store_dir, options.disk_cache.clone())
    }

    /// Opens a cache over any transport (its URI's parameters still apply).
    pub fn with_transport(
        transport: Box<dyn Transport>,
        store_dir: &StoreDir,
    ) -> Result<BinaryCache, BinaryCacheError> {
        BinaryCache::with_transport_and_disk_cache(transport, store_dir, None)
    }

    /// [`with_transport`](Self::with_transport) with an on-disk narinfo cache, used
    /// when the transport's URI is `http://` or `https://`.
    pub fn with_transport_and_disk_cache(
        transport: Box<dyn Transport>,
        store_dir: &StoreDir,
        disk: Option<Arc<NarInfoDiskCache>>,
    ) -> Result<BinaryCache, BinaryCacheError> {
        let url = StoreUrl::parse(transport.uri());
        let is_http = url.base.starts_with("http://") || url.base.starts_with("https://");
        let mut cache = BinaryCache {
            disk_key: disk_cache::cache_key(&url.base),
            transport,
            store_dir: store_dir.clone(),
            info: CacheInfo::default(),
            url,
            narinfos: Mutex::new(HashMap::new()),
            disk: disk.filter(|d| is_http && !d.is_disabled()),
        };
        let remembered = cache
            .with_disk(|d, key| d.cache_info(key))
            .flatten()
            .filter(|row| row.store_dir == store_dir.as_str());
        if let Some(row) = remembered {
            cache.info = CacheInfo {
                store_dir: Some(row.store_dir),
                want_mass_query: Some(row.want_mass_query),
                priority: u64::try_from(row.priority).ok(),
            };
            return Ok(cache);
        }
        let transport = cache.transport.as_ref();
        let info = match read_text(transport, "nix-cache-info")? {
            Some(text) => CacheInfo::parse(transport.uri(), &text)?,
            // Nix would create it in a local cache; over HTTP it cannot.
            None if is_http => {
                return Err(BinaryCacheError::NotABinaryCache(
                    transport.uri().to_owned(),
                ))
            }
            None => CacheInfo::default(),
        };
        if let Some(theirs) = &info.store_dir {
            if theirs != store_dir.as_str() {
                return Err(BinaryCacheError::WrongStoreDir {
                    uri: transport.uri().to_owned(),
                    theirs: theirs.clone(),
                    ours: store_dir.as_str().to_owned(),
                });
            }
        }
        cache.info = info;
        // What Nix records: the effective values.
        let priority = i64::try_from(cache.priority()).unwrap_or(i64::MAX);
        let wmq = cache.want_mass_query();
        cache.with_disk(|d, key| d.upsert_cache(key, store_dir.as_str(), wmq, priority));
        Ok(cache)
    }

    /// Runs `f` on the disk cache, if there is one and it works; on its first
    /// failure warns once and stops using it.
    fn with_disk<T>(
        &self,
        f: impl FnOnce(&NarInfoDiskCache, &str) -> Result<T, disk_cache::DiskCacheError>,
    ) -> Option<T> {
        let disk = self.disk.as_ref().filter(|d| !d.is_disabled())?;
        match f(disk, &self.disk_key) {
            Ok(v) => Some(v),
            Err(e) => {
                if disk.disable() {
                    log::warn!("not using the narinfo disk cache any more: {e}");
                }
                None
            }
        }
    }

    /// The URL the cache was opened with.
    pub fn uri(&self) -> &str {
        self.transport.uri()
    }

    pub fn cache_info(&self) -> &CacheInfo {
        &self.info
    }

    /// `?priority=` if given, else `Priority` from `nix-cache-info`, else 50.
    pub fn priority(&self) -> u64 {
        self.url
            .params
            .get("priority")
            .and_then(|p| p.parse().ok())
            .or(self.info.priority)
            .unwrap_or(DEFAULT_PRIORITY)
    }

    /// `?want-mass-query=` if given, else `WantMassQuery` from `nix-cache-info`.
    pub fn want_mass_query(&self) -> bool {
        self.url
            .bool_param("want-mass-query")
            .or(self.info.want_mass_query)
            .unwrap_or(false)
    }

    /// `?trusted=1`: its paths need no signatures.
    pub fn is_trusted(&self) -> bool {
        self.url.bool_param("trusted").unwrap_or(false)
    }

    /// The narinfo of `path`, or `None` when the cache does not have it.
    pub fn query_narinfo(
        &self,
        path: &StorePath,
    ) -> Result<Option<Arc<NarInfo>>, BinaryCacheError> {
        let key = path.hash_part().to_owned();
        if let Some(cached) = self.lock_narinfos().get(&key) {
            return Ok(cached.clone());
        }
        match self.with_disk(|d, uri| d.lookup_narinfo(uri, &key)) {
            Some(Lookup::Present(info)) => {
                // As Nix: a narinfo for another name is no substitute.
                let info = (&info.store_path == path).then(|| Arc::new(info));
                self.lock_narinfos().insert(key, info.clone());
                return Ok(info);
            }
            Some(Lookup::Absent) => {
                self.lock_narinfos().insert(key, None);
                return Ok(None);
            }
            Some(Lookup::Unknown) | None => {}
        }
        let file = format!("{key}.narinfo");
        let info = match read_text(self.transport.as_ref(), &file)? {
            None => None,
            Some(text) => {
                let info = NarInfo::parse(&text, &self.store_dir).map_err(|source| {
                    BinaryCacheError::NarInfo {
                        uri: self.uri().to_owned(),
                        file: file.clone(),
                        source: Box::new(source),
                    }
                })?;
                if &info.store_path != path {
                    return Err(BinaryCacheError::WrongPath {
                        uri: self.uri().to_owned(),
                        file,
                        wanted: self.store_dir.print(path),
                        got: self.store_dir.print(&info.store_path),
                    });
                }
                Some(Arc::new(info))
            }
        };
        self.with_disk(|d, uri| d.upsert_narinfo(uri, &key, info.as_deref()));
        self.lock_narinfos().insert(key, info.clone());
        Ok(info)
    }

    fn lock_narinfos(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Arc<NarInfo>>>> {
        self.narinfos.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The realisation of a content-addressed derivation output (`.doi`), unsigned
    /// ones included.
    pub fn query_realisation(
        &self,
        id: &DrvOutput,
    ) -> Result<Option<Realisation>, BinaryCacheError> {
        match self.with_disk(|d, uri| d.lookup_realisation(uri, id)) {
            Some(Lookup::Present(r)) => return Ok(Some(r)),
            Some(Lookup::Absent) => return Ok(None),
            Some(Lookup::Unknown) | None => {}
        }
        let file = format!("realisations/{id}.doi");
        let realisation = match read_text(self.transport.as_ref(), &file)? {
            None => None,
            Some(text) => Some(Realisation::from_json(text.as_bytes()).map_err(|source| {
                BinaryCacheError::Realisation {
                    uri: self.uri().to_owned(),
                    file,
                    source,
                }
            })?),
        };
        self.with_disk(|d, uri| d.upsert_realisation(uri, id, realisation.as_ref()));
        Ok(realisation)
    }

    /// Whether answers are remembered in an on-disk narinfo cache (an HTTP(S) cache
    /// opened with a disk cache that still works).
    pub fn uses_disk_cache(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| !d.is_disabled())
    }

    /// Refuses `info` unless the cache is trusted, signatures are not required, or it
    /// has a valid signature by a trusted key or a correct `CA`.
    pub fn check_trust(
        &self,
        info: &NarInfo,
        policy: &TrustPolicy,
    ) -> Result<(), BinaryCacheError> {
        check_trust(&self.store_dir, info, self.is_trusted(), policy)
    }

    /// Downloads, unpacks, checks and registers `path` in `store` (its references
    /// must already be valid). Returns what was registered; does nothing but return
    /// the info when the path is already valid.
    pub fn copy_into(
        &self,
        path: &StorePath,
        store: &LocalStore,
        policy: &TrustPolicy,
    ) -> Result<ValidPathInfo, BinaryCacheError> {
        self.copy_into_observed(
            path,
            store,
            policy,
            RepairFlag::NoRepair,
            &TransferProgress::default(),
        )
    }

    /// [`copy_into`](Self::copy_into), counting the bytes downloaded and unpacked
    /// into `progress` as they pass (for a progress display). With
    /// [`RepairFlag::Repair`] a valid path is fetched again and replaces the old copy
    /// (`--repair`).
    pub fn copy_into_observed(
        &self,
        path: &StorePath,
        store: &LocalStore,
        policy: &TrustPolicy,
        repair: RepairFlag,
        progress: &TransferProgress,
    ) -> Result<ValidPathInfo, BinaryCacheError> {
        let (narinfo, info) = self.info_to_copy(path, policy)?;
        if repair == RepairFlag::NoRepair && store.is_valid_path(path)? {
            return Ok(info);
        }
        let nar_file = self.open_nar(&narinfo)?;
        let mut failure: Option<BinaryCacheError> = None;
        let r = store.add_object_with(&info, repair, |tmp| {
            self.unpack(&narinfo, nar_file, tmp, progress)
                .map_err(|e| Self::keep(&mut failure, e, &self.store_dir.print(path)))
        });
        if let Some(e) = failure {
            return Err(e);
        }
        r?;
        Ok(info)
    }

    /// Downloads, unpacks and checks `path` into its place in `store` without
    /// registering it (its references need not be valid yet): the object keeps the
    /// path locked until [`LocalStore::register_unregistered`] registers it, and
    /// deletes it when dropped unregistered. `None` when the path is valid already.
    /// The signature policy is applied before anything is downloaded. The NAR is
    /// asked for once, quietly ([`Transport::get_quietly`]): a caller that fails
    /// here copies again with [`copy_into_observed`](Self::copy_into_observed) in
    /// Nix's order, which retries and prints as Nix does.
    pub fn fetch_unregistered(
        &self,
        path: &StorePath,
        store: &LocalStore,
        policy: &TrustPolicy,
        progress: &TransferProgress,
    ) -> Result<Option<UnregisteredObject>, BinaryCacheError> {
        let (narinfo, info) = self.info_to_copy(path, policy)?;
        if store.is_valid_path(path)? {
            return Ok(None);
        }
        let nar_file =
            self.transport
                .get_quietly(&narinfo.url)?
                .ok_or_else(|| BinaryCacheError::Gone {
                    path: self.store_dir.print(path),
                    file: narinfo.url.clone(),
                    uri: self.uri().to_owned(),
                })?;
        let mut failure: Option<BinaryCacheError> = None;
        let r = store.write_unregistered(&info, |tmp| {
            self.unpack(&narinfo, nar_file, tmp, progress)
                .map_err(|e| Self::keep(&mut failure, e, &self.store_dir.print(path)))
        });
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(r?)
    }

    /// The narinfo of a path to copy, checked against the signature policy, and the
    /// path info it will be registered with.
    fn info_to_copy(
        &self,
        path: &StorePath,
        policy: &TrustPolicy,
    ) -> Result<(Arc<NarInfo>, ValidPathInfo), BinaryCacheError> {
        let narinfo = self
            .query_narinfo(path)?
            .ok_or_else(|| BinaryCacheError::Gone {
                path: self.store_dir.print(path),
                file: format!("{}.narinfo", path.hash_part()),
                uri: self.uri().to_owned(),
            })?;
        self.check_trust(&narinfo, policy)?;
        let mut info = ValidPathInfo::new(path.clone(), narinfo.nar_hash.clone(), narinfo.nar_size);
        info.references = narinfo.references.clone();
        info.deriver = narinfo.deriver.clone();
        info.sigs = narinfo.signatures.clone();
        info.ca = narinfo.ca.clone();
        Ok((narinfo, info))
    }

    /// The NAR file a narinfo names; a missing one is `Gone`.
    fn open_nar(&self, narinfo: &NarInfo) -> Result<CacheFile, BinaryCacheError> {
        self.transport
            .get(&narinfo.url)?
            .ok_or_else(|| BinaryCacheError::Gone {
                path: self.store_dir.print(&narinfo.store_path),
                file: narinfo.url.clone(),
                uri: self.uri().to_owned(),
            })
    }

    /// Keeps the unpacking error `e` for the caller and gives the store a
    /// placeholder to fail with.
    fn keep(
        failure: &mut Option<BinaryCacheError>,
        e: BinaryCacheError,
        printed: &str,
    ) -> StoreError {
        *failure = Some(e);
        StoreError::InvalidPath(printed.to_owned())
    }

    /// The streaming part of [`copy_into`](Self::copy_into): restores the NAR to
    /// `target` and checks it against the narinfo. A NAR of at least
    /// [`PIPELINE_MIN_NAR_SIZE`] bytes is read, decompressed and unpacked on three
    /// threads ([`pipeline`]), a smaller one on this thread (a thread costs more than
    /// it saves on a small path); both check the same things and fail the same way.
    fn unpack(
        &self,
        narinfo: &NarInfo,
        file: CacheFile,
        target: &std::path::Path,
        progress: &TransferProgress,
    ) -> Result<(), BinaryCacheError> {
        if narinfo.nar_size >= PIPELINE_MIN_NAR_SIZE {
            self.unpack_pipelined(narinfo, file, target, progress)
        } else {
            self.unpack_inline(narinfo, file, target, progress)
        }
    }

    /// The hash of the file to compute (`None`: the file is the NAR itself, whose
    /// hash is computed anyway, as the NAR reader refuses trailing bytes), and
    /// whether the narinfo says anything of the file.
    fn file_hash_to_compute(narinfo: &NarInfo) -> (Option<HashAlgo>, bool) {
        let file_algo = narinfo
            .file_hash
            .as_ref()
            .map_or(HashAlgo::Sha256, |h| h.algo());
        let file_is_nar = matches!(narinfo.compression.as_str(), "" | "none")
            && file_algo == narinfo.nar_hash.algo();
        (
            (!file_is_nar).then_some(file_algo),
            narinfo.file_hash.is_some() || narinfo.file_size.is_some(),
        )
    }

    fn nar_error(&self, narinfo: &NarInfo, source: crate::nar::NarReadError) -> BinaryCacheError {
        BinaryCacheError::Nar {
            path: self.store_dir.print(&narinfo.store_path),
            uri: self.uri().to_owned(),
            source: Box::new(source),
        }
    }

    fn read_error(&self, narinfo: &NarInfo, source: io::Error) -> BinaryCacheError {
        BinaryCacheError::Read {
            uri: self.uri().to_owned(),
            file: narinfo.url.clone(),
            source,
        }
    }

    /// [`unpack`](Self::unpack) on this thread.
    fn unpack_inline(
        &self,
        narinfo: &NarInfo,
        file: CacheFile,
        target: &std::path::Path,
        progress: &TransferProgress,
    ) -> Result<(), BinaryCacheError> {
        let (file_algo, want_file) = Self::file_hash_to_compute(narinfo);
        let mut raw = HashingReader {
            inner: file,
            sink: file_algo.map(HashSink::new),
            bytes: 0,
            count: &progress.downloaded,
        };
        let summary = {
            let decoder = compression::decompressor(&narinfo.compression, Box::new(&mut raw))?;
            let nar = CountingReader {
                inner: decoder,
                count: &progress.unpacked,
            };
            crate::nar::restore(nar, target).map_err(|e| self.nar_error(narinfo, e))?
        };
        let path = self.store_dir.print(&narinfo.store_path);
        check_nar(&path, &narinfo.nar_hash, narinfo.nar_size, &summary)?;
        if want_file {
            io::copy(&mut raw, &mut io::sink()).map_err(|e| self.read_error(narinfo, e))?;
            let file_hash = match raw.sink {
                Some(sink) => sink.finish().0,
                None => summary.nar_hash.clone(),
            };
            self.check_file(narinfo, raw.bytes, &file_hash)?;
        }
        Ok(())
    }

    /// [`unpack`](Self::unpack) on three threads.
    fn unpack_pipelined(
        &self,
        narinfo: &NarInfo,
        file: CacheFile,
        target: &std::path::Path,
        progress: &TransferProgress,
    ) -> Result<(), BinaryCacheError> {
        let (file_algo, want_file) = Self::file_hash_to_compute(narinfo);
        let unpacked = pipeline::unpack(
            &narinfo.compression,
            file,
            file_algo,
            want_file,
            target,
            &progress.downloaded,
            &progress.unpacked,
        )
        .map_err(|e| match e {
            pipeline::UnpackError::Decoder(e) => e,
            pipeline::UnpackError::Nar(e) => self.nar_error(narinfo, e),
        })?;
        let path = self.store_dir.print(&narinfo.store_path);
        check_nar(
            &path,
            &narinfo.nar_hash,
            narinfo.nar_size,
            &unpacked.summary,
        )?;
        if let Some(file) = unpacked.file {
            let (file_hash, file_size) = file.map_err(|e| self.read_error(narinfo, e))?;
            let file_hash = file_hash.unwrap_or_else(|| unpacked.summary.nar_hash.clone());
            self.check_file(narinfo, file_size, &file_hash)?;
        }
        Ok(())
    }

    /// The narinfo's `FileSize` and `FileHash` against the file read.
    fn check_file(
        &self,
        narinfo: &NarInfo,
        file_size: u64,
        file_hash: &Hash,
    ) -> Result<(), BinaryCacheError> {
        let path = || self.store_dir.print(&narinfo.store_path);
        if let Some(want) = narinfo.file_size.filter(|s| *s != file_size) {
            return Err(BinaryCacheError::FileSizeMismatch {
                path: path(),
                uri: self.uri().to_owned(),
                specified: want,
                got: file_size,
            });
        }
        if let Some(want) = narinfo.file_hash.as_ref().filter(|h| *h != file_hash) {
            return Err(BinaryCacheError::FileHashMismatch {
                path: path(),
                uri: self.uri().to_owned(),
                specified: want.to_typed_string(Encoding::Base32),
                got: file_hash.to_typed_string(Encoding::Base32),
            });
        }
        Ok(())
    }
}

/// NARs of at least this many bytes are unpacked on three threads.
pub const PIPELINE_MIN_NAR_SIZE: u64 = 1 << 20;

/// Nix's check of an imported NAR (`hash mismatch importing path …` / `size mismatch
/// importing path …`): what was unpacked of `path` against what its source said.
pub fn check_nar(
    path: &str,
    nar_hash: &Hash,
    nar_size: u64,
    got: &NarSummary,
) -> Result<(), BinaryCacheError> {
    if got.nar_hash != *nar_hash {
        return Err(BinaryCacheError::HashMismatch {
            path: path.to_owned(),
            specified: nar_hash.to_typed_string(Encoding::Base32),
            got: got.nar_hash.to_typed_string(Encoding::Base32),
        });
    }
    if got.nar_size != nar_size {
        return Err(BinaryCacheError::SizeMismatch {
            path: path.to_owned(),
            specified: nar_size,
            got: got.nar_size,
        });
    }
    Ok(())
}

/// Nix's check before adding a substitute: refuses `info` unless its source is
/// `trusted`, signatures are not required, or it has a valid signature by a key of
/// `policy` or a `CA` that really gives its store path.
pub fn check_trust(
    store_dir: &StoreDir,
    info: &NarInfo,
    trusted: bool,
    policy: &TrustPolicy,
) -> Result<(), BinaryCacheError> {
    if trusted || !policy.require_sigs {
        return Ok(());
    }
    match info.check_signatures(store_dir, &policy.keys) {
        Ok(0) | Err(_) => Err(BinaryCacheError::Untrusted(
            store_dir.print(&info.store_path),
        )),
        Ok(_) => Ok(()),
    }
}

/// Live byte counts of one [`BinaryCache::copy_into_observed`]: written by the
/// copying thread, readable from any other at any time.
#[derive(Debug, Default)]
pub struct TransferProgress {
    downloaded: AtomicU64,
    unpacked: AtomicU64,
}

impl TransferProgress {
    /// Bytes of the (compressed) NAR file read from the cache so far.
    pub fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Bytes of the NAR (decompressed) unpacked so far.
    pub fn unpacked(&self) -> u64 {
        self.unpacked.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes downloaded (for copies from sources other than a
    /// [`BinaryCache`]).
    pub fn add_downloaded(&self, n: u64) {
        self.downloaded.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` more NAR bytes unpacked.
    pub fn add_unpacked(&self, n: u64) {
        self.unpacked.fetch_add(n, Ordering::Relaxed);
    }
}

/// Hashes (when it has a sink) and counts what passes through it.
struct HashingReader<'a, R> {
    inner: R,
    sink: Option<HashSink>,
    bytes: u64,
    count: &'a AtomicU64,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(sink) = &mut self.sink {
            sink.update(&buf[..n]);
        }
        self.bytes += n as u64;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Counts what passes through it.
struct CountingReader<'a, R> {
    inner: R,
    count: &'a AtomicU64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads a small text file of the cache, `None` when absent.
/// How a gone file's message names the cache: Nix 2.8's local binary cache says only
/// "does not exist in binary cache", its HTTP (and S3) caches add `'<uri>'`.
fn gone_cache_suffix(uri: &str) -> String {
    if uri.starts_with("file://") {
        String::new()
    } else {
        format!(" '{uri}'")
    }
}

fn read_text(t: &dyn Transport, file: &str) -> Result<Option<String>, BinaryCacheError> {
    let Some(r) = t.get(file)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    r.take(MAX_TEXT_FILE)
        .read_to_end(&mut bytes)
        .map_err(|source| BinaryCacheError::Read {
            uri: t.uri().to_owned(),
            file: file.to_owned(),
            source,
        })?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| BinaryCacheError::Read {
            uri: t.uri().to_owned(),
            file: file.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"),
        })
}

#[cfg(test)]
mod tests;
