//! The on-disk narinfo cache shared with Nix 2.8: `binary-cache-v6.sqlite`.
//!
//! Nix remembers what HTTP(S) binary caches answered in
//! `$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite` (`$HOME/.cache/nix/…` when
//! `XDG_CACHE_HOME` is unset), so a later run does not ask again. drover reads and
//! writes the same file with the same schema and the same column formats, so either
//! tool uses what the other wrote.
//!
//! Tables:
//!
//! * `BinaryCaches(id, url, timestamp, storeDir, wantMassQuery, priority)`: one row per
//!   cache URL (scheme and path, no `?` parameters, no trailing `/`), written once its
//!   `nix-cache-info` was read. `wantMassQuery` and `priority` are the effective values
//!   (URL parameters included). Nix 2.8 never expires this row: while it exists,
//!   `nix-cache-info` is not fetched again (the `timestamp` is written, never read).
//! * `NARs(cache, hashPart, …, timestamp, present)`: a narinfo (`present = 1`) or the
//!   knowledge that there is none (`present = 0`, every other column `NULL`). Hashes
//!   are `<algo>:<nix base 32>`; `refs` are the references' base names separated by
//!   single spaces (`''` when none); `deriver` is a base name or `NULL`; `sigs` are
//!   separated by single spaces (`''` when none); `ca` is the rendered content address
//!   or `''`; `fileHash` and `fileSize` are `NULL` when unknown (a `FileSize` of 0 is
//!   stored as `NULL`). `System` is not kept.
//! * `Realisations(cache, outputId, content, timestamp)`: `content` is the
//!   realisation's JSON (as in a `.doi` file), `NULL` when the cache has none.
//! * `LastPurge(dummy, value)`: one row (`dummy = ''`) with the time of the last purge.
//!
//! Timestamps are seconds since the epoch. An entry is fresh while
//! `timestamp > now - ttl`, with `narinfo-cache-positive-ttl` (default 30 days) for
//! present entries and `narinfo-cache-negative-ttl` (default 3600 s) for absent
//! ones; realisations use the same two TTLs. Older entries are "unknown" and the
//! cache is asked again.
//!
//! When the file is opened and the last purge is more than a day old (or never
//! happened), expired `NARs` rows are deleted — with TTLs of at least 3600 s and 30
//! days, so a short TTL (`--refresh`) does not empty the file — and `LastPurge` is set
//! to now. `Realisations` and `BinaryCaches` are never purged.
//!
//! The connection runs with `foreign_keys = 1`, `synchronous = off` and
//! `journal_mode = truncate` (it is a cache: losing it costs only downloads).
//! Writes use `insert or replace`, as Nix does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use crate::config::Env;
use crate::content_address::ContentAddress;
use crate::hash::{Encoding, Hash};
use crate::narinfo::NarInfo;
use crate::realisation::{DrvOutput, Realisation};
use crate::store_path::StorePath;

/// The file's name under `<cache dir>/nix/`.
pub const FILE_NAME: &str = "binary-cache-v6.sqlite";

/// Default of `narinfo-cache-positive-ttl` (30 days).
pub const DEFAULT_POSITIVE_TTL: u64 = 30 * 24 * 3600;
/// Default of `narinfo-cache-negative-ttl` (one hour).
pub const DEFAULT_NEGATIVE_TTL: u64 = 3600;
/// How often expired rows are purged (one day).
pub const PURGE_INTERVAL: i64 = 24 * 3600;

/// How long busy waits on a lock held by another process last before an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
create table if not exists BinaryCaches (
    id            integer primary key autoincrement not null,
    url           text unique not null,
    timestamp     integer not null,
    storeDir      text not null,
    wantMassQuery integer not null,
    priority      integer not null
);
create table if not exists NARs (
    cache       integer not null,
    hashPart    text not null,
    namePart    text,
    url         text,
    compression text,
    fileHash    text,
    fileSize    integer,
    narHash     text,
    narSize     integer,
    refs        text,
    deriver     text,
    sigs        text,
    ca          text,
    timestamp   integer not null,
    present     integer not null,
    primary key (cache, hashPart),
    foreign key (cache) references BinaryCaches(id) on delete cascade
);
create table if not exists Realisations (
    cache     integer not null,
    outputId  text not null,
    content   blob,
    timestamp integer not null,
    primary key (cache, outputId),
    foreign key (cache) references BinaryCaches(id) on delete cascade
);
create table if not exists LastPurge (
    dummy text primary key,
    value integer
);
";

/// Why the disk cache could not be opened, read or written.
#[derive(Debug, Error)]
pub enum DiskCacheError {
    #[error("neither XDG_CACHE_HOME nor HOME is set: no place for the narinfo disk cache")]
    NoCacheDir,
    #[error("creating directory '{path}': {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("narinfo disk cache '{path}': {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("narinfo disk cache has no binary cache '{0}'")]
    UnknownCache(String),
    #[error("narinfo disk cache: invalid {column} '{value}' of '{key}' in cache '{uri}'")]
    BadRow {
        uri: String,
        key: String,
        column: &'static str,
        value: String,
    },
}

/// The TTLs of entries, in seconds (`narinfo-cache-positive-ttl`,
/// `narinfo-cache-negative-ttl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarInfoCacheTtl {
    pub positive: u64,
    pub negative: u64,
}

impl Default for NarInfoCacheTtl {
    fn default() -> Self {
        NarInfoCacheTtl {
            positive: DEFAULT_POSITIVE_TTL,
            negative: DEFAULT_NEGATIVE_TTL,
        }
    }
}

impl NarInfoCacheTtl {
    /// `narinfo-cache-positive-ttl` and `narinfo-cache-negative-ttl` of `settings`
    /// (a value that is not a number keeps the default).
    pub fn from_settings(settings: &crate::config::Settings) -> NarInfoCacheTtl {
        let get = |name: &str, default: u64| {
            settings
                .get(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(default)
        };
        NarInfoCacheTtl {
            positive: get("narinfo-cache-positive-ttl", DEFAULT_POSITIVE_TTL),
            negative: get("narinfo-cache-negative-ttl", DEFAULT_NEGATIVE_TTL),
        }
    }
}

/// What the disk cache knows of something (Nix's `oValid`, `oInvalid`, `oUnknown`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    /// The binary cache has it.
    Present(T),
    /// The binary cache was asked and does not have it (and that is still fresh).
    Absent,
    /// Never asked, or the answer expired: ask the binary cache.
    Unknown,
}

/// The `BinaryCaches` row of a binary cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCacheInfo {
    pub id: i64,
    pub store_dir: String,
    pub want_mass_query: bool,
    pub priority: i64,
}

/// The current time in seconds since the epoch (injectable for tests).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

fn system_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

struct State {
    conn: Connection,
    /// `BinaryCaches` rows by URL, as read or written by this value.
    caches: HashMap<String, DiskCacheInfo>,
}

/// An open `binary-cache-v6.sqlite` (Nix's `NarInfoDiskCache`); shareable between
/// threads and binary caches.
pub struct NarInfoDiskCache {
    path: PathBuf,
    ttl: NarInfoCacheTtl,
    clock: Clock,
    state: Mutex<State>,
    disabled: AtomicBool,
}

impl std::fmt::Debug for NarInfoDiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NarInfoDiskCache")
            .field("path", &self.path)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The key of a cache URL in the disk cache: without `?` parameters and trailing
/// `/` (Nix's `getUri()` of an HTTP binary cache).
pub fn cache_key(url: &str) -> String {
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    base.strip_suffix('/').unwrap_or(base).to_owned()
}

/// Where Nix keeps the file: `$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite`, else
/// `$HOME/.cache/nix/binary-cache-v6.sqlite`.
pub fn default_path(env: &Env) -> Result<PathBuf, DiskCacheError> {
    let dir = match env.get("XDG_CACHE_HOME") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env.get("HOME").ok_or(DiskCacheError::NoCacheDir)?).join(".cache"),
    };
    Ok(dir.join("nix").join(FILE_NAME))
}

impl NarInfoDiskCache {
    /// Opens (creating it if needed) the file at [`default_path`], creating its
    /// directories.
    pub fn open_default(
        env: &Env,
        ttl: NarInfoCacheTtl,
    ) -> Result<NarInfoDiskCache, DiskCacheError> {
        let path = default_path(env)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DiskCacheError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        NarInfoDiskCache::open(&path, ttl)
    }

    /// Opens (creating it if needed) the file at `path`; purges expired rows when
    /// the last purge is more than a day old.
    pub fn open(path: &Path, ttl: NarInfoCacheTtl) -> Result<NarInfoDiskCache, DiskCacheError> {
        NarInfoDiskCache::open_with_clock(path, ttl, Arc::new(system_clock))
    }

    /// [`open`](Self::open) with a clock of one's own (seconds since the epoch).
    pub fn open_with_clock(
        path: &Path,
        ttl: NarInfoCacheTtl,
        clock: Clock,
    ) -> Result<NarInfoDiskCache, DiskCacheError> {
        let err = |source| DiskCacheError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        conn.execute_batch(
            "pragma foreign_keys = 1; pragma synchronous = off; pragma main.journal_mode = truncate;",
        )
        .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let cache = NarInfoDiskCache {
            path: path.to_owned(),
            ttl,
            clock,
            state: Mutex::new(State {
                conn,
                caches: HashMap::new(),
            }),
            disabled: AtomicBool::new(false),
        };
        cache.purge_if_due()?;
        Ok(cache)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ttl(&self) -> NarInfoCacheTtl {
        self.ttl
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sql_err(&self, source: rusqlite::Error) -> DiskCacheError {
        DiskCacheError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Marks the cache unusable; true the first time (so the caller warns once).
    pub fn disable(&self) -> bool {
        !self.disabled.swap(true, Ordering::Relaxed)
    }

    /// Whether [`disable`](Self::disable) was called.
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    /// Deletes expired `NARs` rows if the last purge was more than a day ago (or
    /// never), as Nix does when it opens the file. Returns how many rows went, or
    /// `None` when no purge was due.
    pub fn purge_if_due(&self) -> Result<Option<usize>, DiskCacheError> {
        let now = self.now();
        let state = self.lock();
        let last: Option<Option<i64>> = state
            .conn
            .query_row("select value from LastPurge", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql_err(e))?;
        if matches!(last, Some(Some(v)) if v >= now - PURGE_INTERVAL) {
            return Ok(None);
        }
        let negative = self.ttl.negative.max(DEFAULT_NEGATIVE_TTL) as i64;
        let positive = self.ttl.positive.max(DEFAULT_POSITIVE_TTL) as i64;
        let deleted = state
            .conn
            .execute(
                "delete from NARs where (present = 0 and timestamp < ?1) or (present = 1 and timestamp < ?2)",
                params![now.saturating_sub(negative), now.saturating_sub(positive)],
            )
            .map_err(|e| self.sql_err(e))?;
        log::debug!("deleted {deleted} entries from the NAR info disk cache");
        state
            .conn
            .execute(
                "insert or replace into LastPurge(dummy, value) values ('', ?1)",
                params![now],
            )
            .map_err(|e| self.sql_err(e))?;
        Ok(Some(deleted))
    }

    /// The `BinaryCaches` row of `uri` (see [`cache_key`]), if any. Nix 2.8 gives
    /// it no TTL: while it exists, `nix-cache-info` need not be fetched.
    pub fn cache_info(&self, uri: &str) -> Result<Option<DiskCacheInfo>, DiskCacheError> {
        let mut state = self.lock();
        self.cache_info_locked(&mut state, uri)
    }

    fn cache_info_locked(
        &self,
        state: &mut State,
        uri: &str,
    ) -> Result<Option<DiskCacheInfo>, DiskCacheError> {
        let key = cache_key(uri);
        if let Some(c) = state.caches.get(&key) {
            return Ok(Some(c.clone()));
        }
        let row = state
            .conn
            .query_row(
                "select id, storeDir, wantMassQuery, priority from BinaryCaches where url = ?1",
                params![key],
                |r| {
                    Ok(DiskCacheInfo {
                        id: r.get(0)?,
                        store_dir: r.get(1)?,
                        want_mass_query: r.get::<_, i64>(2)? != 0,
                        priority: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql_err(e))?;
        if let Some(c) = &row {
            state.caches.insert(key, c.clone());
        }
        Ok(row)
    }

    /// Records `uri`'s `nix-cache-info` (replacing an older row, as Nix does).
    pub fn upsert_cache(
        &self,
        uri: &str,
        store_dir: &str,
        want_mass_query: bool,
        priority: i64,
    ) -> Result<DiskCacheInfo, DiskCacheError> {
        let key = cache_key(uri);
        let now = self.now();
        let mut state = self.lock();
        state
            .conn
            .execute(
                "insert or replace into BinaryCaches(url, timestamp, storeDir, wantMassQuery, priority) values (?1, ?2, ?3, ?4, ?5)",
                params![key, now, store_dir, want_mass_query as i64, priority],
            )
            .map_err(|e| self.sql_err(e))?;
        let info = DiskCacheInfo {
            id: state.conn.last_insert_rowid(),
            store_dir: store_dir.to_owned(),
            want_mass_query,
            priority,
        };
        state.caches.insert(key, info.clone());
        Ok(info)
    }

    fn cache_id(&self, state: &mut State, uri: &str) -> Result<i64, DiskCacheError> {
        self.cache_info_locked(state, uri)?
            .map(|c| c.id)
            .ok_or_else(|| DiskCacheError::UnknownCache(cache_key(uri)))
    }

    /// The narinfo of the path with hash part `hash_part` in cache `uri`, as far as
    /// fresh entries tell.
    pub fn lookup_narinfo(
        &self,
        uri: &str,
        hash_part: &str,
    ) -> Result<Lookup<NarInfo>, DiskCacheError> {
        let now = self.now();
        let mut state = self.lock();
        let id = self.cache_id(&mut state, uri)?;
        let row = state
            .conn
            .query_row(
                "select present, namePart, url, compression, fileHash, fileSize, narHash, narSize, refs, deriver, sigs, ca \
                 from NARs where cache = ?1 and hashPart = ?2 and \
                 ((present = 0 and timestamp > ?3) or (present = 1 and timestamp > ?4))",
                params![
                    id,
                    hash_part,
                    now.saturating_sub(self.ttl.negative as i64),
                    now.saturating_sub(self.ttl.positive as i64)
                ],
                |r| {
                    Ok(NarRow {
                        present: r.get::<_, i64>(0)? != 0,
                        name_part: r.get(1)?,
                        url: r.get(2)?,
                        compression: r.get(3)?,
                        file_hash: r.get(4)?,
                        file_size: r.get(5)?,
                        nar_hash: r.get(6)?,
                        nar_size: r.get(7)?,
                        refs: r.get(8)?,
                        deriver: r.get(9)?,
                        sigs: r.get(10)?,
                        ca: r.get(11)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql_err(e))?;
        drop(state);
        match row {
            None => Ok(Lookup::Unknown),
            Some(r) if !r.present => Ok(Lookup::Absent),
            Some(r) => r
                .into_narinfo(&cache_key(uri), hash_part)
                .map(Lookup::Present),
        }
    }

    /// Records the answer of cache `uri` for `hash_part`: its narinfo, or `None`
    /// when it has none.
    pub fn upsert_narinfo(
        &self,
        uri: &str,
        hash_part: &str,
        info: Option<&NarInfo>,
    ) -> Result<(), DiskCacheError> {
        let now = self.now();
        let mut state = self.lock();
        let id = self.cache_id(&mut state, uri)?;
        let r = match info {
            None => state.conn.execute(
                "insert or replace into NARs(cache, hashPart, timestamp, present) values (?1, ?2, ?3, 0)",
                params![id, hash_part, now],
            ),
            Some(i) => {
                let refs: Vec<&str> = i.references.iter().map(StorePath::base_name).collect();
                let sigs: Vec<&str> = i.signatures.iter().map(String::as_str).collect();
                state.conn.execute(
                    "insert or replace into NARs(cache, hashPart, namePart, url, compression, fileHash, fileSize, \
                     narHash, narSize, refs, deriver, sigs, ca, timestamp, present) \
                     values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 1)",
                    params![
                        id,
                        hash_part,
                        i.store_path.name(),
                        i.url,
                        i.compression,
                        i.file_hash.as_ref().map(|h| h.to_typed_string(Encoding::Base32)),
                        i.file_size.filter(|s| *s != 0).map(|s| s as i64),
                        i.nar_hash.to_typed_string(Encoding::Base32),
                        i.nar_size as i64,
                        refs.join(" "),
                        i.deriver.as_ref().map(StorePath::base_name),
                        sigs.join(" "),
                        i.ca.as_ref().map_or(String::new(), ToString::to_string),
                        now,
                    ],
                )
            }
        };
        r.map(|_| ()).map_err(|e| self.sql_err(e))
    }

    /// The realisation `id` in cache `uri`, as far as fresh entries tell.
    pub fn lookup_realisation(
        &self,
        uri: &str,
        id: &DrvOutput,
    ) -> Result<Lookup<Realisation>, DiskCacheError> {
        let now = self.now();
        let mut state = self.lock();
        let cache = self.cache_id(&mut state, uri)?;
        let row: Option<Option<Vec<u8>>> = state
            .conn
            .query_row(
                "select content from Realisations where cache = ?1 and outputId = ?2 and \
                 ((content is null and timestamp > ?3) or (content is not null and timestamp > ?4))",
                params![
                    cache,
                    id.to_string(),
                    now.saturating_sub(self.ttl.negative as i64),
                    now.saturating_sub(self.ttl.positive as i64)
                ],
                |r| {
                    // Nix binds the JSON as text; accept a blob too.
                    let v = r.get_ref(0)?;
                    Ok(match v {
                        rusqlite::types::ValueRef::Null => None,
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            Some(t.to_vec())
                        }
                        other => Some(format!("{other:?}").into_bytes()),
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql_err(e))?;
        drop(state);
        match row {
            None => Ok(Lookup::Unknown),
            Some(None) => Ok(Lookup::Absent),
            Some(Some(json)) => Realisation::from_json(&json)
                .map(Lookup::Present)
                .map_err(|_| DiskCacheError::BadRow {
                    uri: cache_key(uri),
                    key: id.to_string(),
                    column: "content",
                    value: String::from_utf8_lossy(&json).into_owned(),
                }),
        }
    }

    /// Records the answer of cache `uri` for realisation `id`: the realisation, or
    /// `None` when it has none.
    pub fn upsert_realisation(
        &self,
        uri: &str,
        id: &DrvOutput,
        realisation: Option<&Realisation>,
    ) -> Result<(), DiskCacheError> {
        let now = self.now();
        let mut state = self.lock();
        let cache = self.cache_id(&mut state, uri)?;
        let r = match realisation {
            Some(r) => state.conn.execute(
                "insert or replace into Realisations(cache, outputId, content, timestamp) values (?1, ?2, ?3, ?4)",
                params![cache, id.to_string(), r.to_json(), now],
            ),
            None => state.conn.execute(
                "insert or replace into Realisations(cache, outputId, timestamp) values (?1, ?2, ?3)",
                params![cache, id.to_string(), now],
            ),
        };
        r.map(|_| ()).map_err(|e| self.sql_err(e))
    }
}

/// A `NARs` row with `present = 1`, as read.
struct NarRow {
    present: bool,
    name_part: Option<String>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<String>,
    file_size: Option<i64>,
    nar_hash: Option<String>,
    nar_size: Option<i64>,
    refs: Option<String>,
    deriver: Option<String>,
    sigs: Option<String>,
    ca: Option<String>,
}

impl NarRow {
    fn into_narinfo(self, uri: &str, hash_part: &str) -> Result<NarInfo, DiskCacheError> {
        let bad = |column: &'static str, value: &str| DiskCacheError::BadRow {
            uri: uri.to_owned(),
            key: hash_part.to_owned(),
            column,
            value: value.to_owned(),
        };
        let name = self.name_part.unwrap_or_default();
        let base = format!("{hash_part}-{name}");
        let store_path = StorePath::from_base_name(&base).map_err(|_| bad("namePart", &base))?;
        let nar_hash_s = self.nar_hash.unwrap_or_default();
        let nar_hash =
            Hash::parse_any_prefixed(&nar_hash_s).map_err(|_| bad("narHash", &nar_hash_s))?;
        let file_hash = match self.file_hash {
            None => None,
            Some(s) => Some(Hash::parse_any_prefixed(&s).map_err(|_| bad("fileHash", &s))?),
        };
        let nonneg =
            |column: &'static str, v: Option<i64>| -> Result<Option<u64>, DiskCacheError> {
                v.map(|n| u64::try_from(n).map_err(|_| bad(column, &n.to_string())))
                    .transpose()
            };
        let file_size = nonneg("fileSize", self.file_size)?.filter(|s| *s != 0);
        let nar_size = nonneg("narSize", self.nar_size)?.unwrap_or(0);
        let mut references = crate::store_path::StorePathSet::new();
        for r in self
            .refs
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .filter(|s| !s.is_empty())
        {
            references.insert(StorePath::from_base_name(r).map_err(|_| bad("refs", r))?);
        }
        let deriver = match self.deriver {
            None => None,
            Some(d) => Some(StorePath::from_base_name(&d).map_err(|_| bad("deriver", &d))?),
        };
        let signatures = self
            .sigs
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let ca = match self.ca.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse::<ContentAddress>().map_err(|_| bad("ca", s))?),
        };
        Ok(NarInfo {
            store_path,
            url: self.url.unwrap_or_default(),
            compression: self.compression.unwrap_or_default(),
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            system: None,
            signatures,
            ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;

    use super::*;
    use crate::hash::HashAlgo;

    const T0: i64 = 1_700_000_000;
    const URI: &str = "http://cache.example.org";

    fn clock() -> (Clock, Arc<AtomicI64>) {
        let t = Arc::new(AtomicI64::new(T0));
        let t2 = t.clone();
        (Arc::new(move || t2.load(Ordering::SeqCst)), t)
    }

    fn open(dir: &Path, ttl: NarInfoCacheTtl) -> (NarInfoDiskCache, Arc<AtomicI64>) {
        let (c, t) = clock();
        let cache = NarInfoDiskCache::open_with_clock(&dir.join(FILE_NAME), ttl, c).unwrap();
        (cache, t)
    }

    fn path(name: &str, seed: &str) -> StorePath {
        let d = HashAlgo::Sha256.digest(seed.as_bytes());
        let mut h = [0u8; 20];
        h.copy_from_slice(&crate::hash::compress(d.digest(), 20));
        StorePath::from_digest(&h, name).unwrap()
    }

    fn full_narinfo() -> NarInfo {
        let p = path("hello-2.12", "p");
        NarInfo {
            store_path: p.clone(),
            url: "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz".into(),
            compression: "xz".into(),
            file_hash: Some(HashAlgo::Sha256.digest(b"file")),
            file_size: Some(1234),
            nar_hash: HashAlgo::Sha256.digest(b"nar"),
            nar_size: 5678,
            references: [p.clone(), path("glibc-2.35", "g"), path("zlib", "z")]
                .into_iter()
                .collect(),
            deriver: Some(path("hello-2.12.drv", "d")),
            system: None,
            signatures: ["a-1:c2lnMQ==".to_owned(), "b-1:c2lnMg==".to_owned()]
                .into_iter()
                .collect(),
            ca: Some(
                "fixed:r:sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0"
                    .parse()
                    .unwrap(),
            ),
        }
    }

    fn raw_row(cache: &NarInfoDiskCache, hash_part: &str) -> Vec<Option<String>> {
        let state = cache.lock();
        state
            .conn
            .query_row(
                "select namePart, url, compression, fileHash, fileSize, narHash, narSize, refs, deriver, sigs, ca, timestamp, present \
                 from NARs where hashPart = ?1",
                params![hash_part],
                |r| {
                    (0..13)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => None,
                                rusqlite::types::ValueRef::Integer(n) => Some(format!("int {n}")),
                                rusqlite::types::ValueRef::Text(t) => {
                                    Some(String::from_utf8_lossy(t).into_owned())
                                }
                                v => Some(format!("{v:?}")),
                            })
                        })
                        .collect()
                },
            )
            .unwrap()
    }

    #[test]
    fn every_column_round_trips_in_nix_formats() {
        let t = tempfile::tempdir().unwrap();
        let (cache, _) = open(t.path(), NarInfoCacheTtl::default());
        assert_eq!(cache.cache_info(URI).unwrap(), None);
        let info = cache.upsert_cache(URI, "/nix/store", true, 40).unwrap();
        assert_eq!(
            cache.cache_info(&format!("{URI}/?priority=3")).unwrap(),
            Some(info)
        );

        let ni = full_narinfo();
        let hp = ni.store_path.hash_part().to_owned();
        cache.upsert_narinfo(URI, &hp, Some(&ni)).unwrap();
        assert_eq!(
            cache.lookup_narinfo(URI, &hp).unwrap(),
            Lookup::Present(ni.clone())
        );

        let row = raw_row(&cache, &hp);
        let s = |v: &str| Some(v.to_owned());
        let mut refs: Vec<&str> = ni.references.iter().map(StorePath::base_name).collect();
        refs.sort();
        assert_eq!(
            row,
            vec![
                s("hello-2.12"),
                s(&ni.url),
                s("xz"),
                s(&ni
                    .file_hash
                    .as_ref()
                    .unwrap()
                    .to_typed_string(Encoding::Base32)),
                s("int 1234"),
                s(&ni.nar_hash.to_typed_string(Encoding::Base32)),
                s("int 5678"),
                s(&refs.join(" ")),
                s(ni.deriver.as_ref().unwrap().base_name()),
                s("a-1:c2lnMQ== b-1:c2lnMg=="),
                s("fixed:r:sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0"),
                s(&format!("int {T0}")),
                s("int 1"),
            ]
        );
        assert!(row[5].as_ref().unwrap().starts_with("sha256:"));

        // A minimal narinfo: empty strings and NULLs as Nix writes them.
        let mut min = full_narinfo();
        min.store_path = path("min", "m");
        min.file_hash = None;
        min.file_size = Some(0);
        min.references.clear();
        min.deriver = None;
        min.signatures.clear();
        min.ca = None;
        let hp2 = min.store_path.hash_part().to_owned();
        cache.upsert_narinfo(URI, &hp2, Some(&min)).unwrap();
        let row = raw_row(&cache, &hp2);
        assert_eq!(row[3], None, "fileHash");
        assert_eq!(row[4], None, "a FileSize of 0 is NULL");
        assert_eq!(row[7], s(""), "refs");
        assert_eq!(row[8], None, "deriver");
        assert_eq!(row[9], s(""), "sigs");
        assert_eq!(row[10], s(""), "ca");
        min.file_size = None;
        assert_eq!(
            cache.lookup_narinfo(URI, &hp2).unwrap(),
            Lookup::Present(min)
        );
    }

    #[test]
    fn negative_entries_and_ttls() {
        let t = tempfile::tempdir().unwrap();
        let ttl = NarInfoCacheTtl {
            positive: 100,
            negative: 10,
        };
        let (cache, now) = open(t.path(), ttl);
        cache.upsert_cache(URI, "/nix/store", false, 0).unwrap();
        let ni = full_narinfo();
        let hp = ni.store_path.hash_part().to_owned();
        assert_eq!(cache.lookup_narinfo(URI, "0000").unwrap(), Lookup::Unknown);
        cache.upsert_narinfo(URI, "0000", None).unwrap();
        cache.upsert_narinfo(URI, &hp, Some(&ni)).unwrap();
        let row = raw_row(&cache, "0000");
        assert_eq!(row[12].as_deref(), Some("int 0"));
        assert!(row[..11].iter().all(Option::is_none), "{row:?}");

        now.store(T0 + 9, Ordering::SeqCst);
        assert_eq!(cache.lookup_narinfo(URI, "0000").unwrap(), Lookup::Absent);
        now.store(T0 + 10, Ordering::SeqCst);
        assert_eq!(
            cache.lookup_narinfo(URI, "0000").unwrap(),
            Lookup::Unknown,
            "expired"
        );
        assert!(matches!(
            cache.lookup_narinfo(URI, &hp).unwrap(),
            Lookup::Present(_)
        ));
        now.store(T0 + 100, Ordering::SeqCst);
        assert_eq!(
            cache.lookup_narinfo(URI, &hp).unwrap(),
            Lookup::Unknown,
            "expired"
        );
        // Asked again: fresh again.
        cache.upsert_narinfo(URI, &hp, Some(&ni)).unwrap();
        assert!(matches!(
            cache.lookup_narinfo(URI, &hp).unwrap(),
            Lookup::Present(_)
        ));
        // A path that appeared replaces its negative entry.
        cache.upsert_narinfo(URI, "0000", None).unwrap();
        assert_eq!(cache.lookup_narinfo(URI, "0000").unwrap(), Lookup::Absent);
        // Another cache knows nothing of it.
        cache
            .upsert_cache("https://other", "/nix/store", false, 0)
            .unwrap();
        assert_eq!(
            cache.lookup_narinfo("https://other", &hp).unwrap(),
            Lookup::Unknown
        );
        // An unknown cache is an error, not a silent miss.
        assert!(matches!(
            cache.lookup_narinfo("http://nowhere", &hp),
            Err(DiskCacheError::UnknownCache(u)) if u == "http://nowhere"
        ));
    }

    #[test]
    fn realisations_present_absent_and_expired() {
        let t = tempfile::tempdir().unwrap();
        let ttl = NarInfoCacheTtl {
            positive: 100,
            negative: 10,
        };
        let (cache, now) = open(t.path(), ttl);
        cache.upsert_cache(URI, "/nix/store", false, 0).unwrap();
        let id: DrvOutput =
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad!out"
                .parse()
                .unwrap();
        let other = DrvOutput {
            output: "dev".into(),
            ..id.clone()
        };
        let r = Realisation {
            id: id.clone(),
            out_path: path("x", "x"),
            signatures: ["k:c2ln".to_owned()].into_iter().collect(),
            dependent_realisations: [(other.clone(), path("y", "y"))].into_iter().collect(),
        };
        assert_eq!(cache.lookup_realisation(URI, &id).unwrap(), Lookup::Unknown);
        cache.upsert_realisation(URI, &id, Some(&r)).unwrap();
        cache.upsert_realisation(URI, &other, None).unwrap();
        assert_eq!(
            cache.lookup_realisation(URI, &id).unwrap(),
            Lookup::Present(r.clone())
        );
        assert_eq!(
            cache.lookup_realisation(URI, &other).unwrap(),
            Lookup::Absent
        );
        let content: String = cache
            .lock()
            .conn
            .query_row(
                "select content from Realisations where outputId = ?1",
                params![id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(content, r.to_json());
        now.store(T0 + 10, Ordering::SeqCst);
        assert_eq!(
            cache.lookup_realisation(URI, &other).unwrap(),
            Lookup::Unknown
        );
        assert_eq!(
            cache.lookup_realisation(URI, &id).unwrap(),
            Lookup::Present(r)
        );
        now.store(T0 + 100, Ordering::SeqCst);
        assert_eq!(cache.lookup_realisation(URI, &id).unwrap(), Lookup::Unknown);
    }

    #[test]
    fn purge_once_a_day_with_minimum_ttls() {
        let t = tempfile::tempdir().unwrap();
        let short = NarInfoCacheTtl {
            positive: 1,
            negative: 1,
        };
        let (cache, now) = open(t.path(), short);
        cache.upsert_cache(URI, "/nix/store", false, 0).unwrap();
        let ni = full_narinfo();
        let hp = ni.store_path.hash_part().to_owned();
        cache.upsert_narinfo(URI, &hp, Some(&ni)).unwrap();
        cache.upsert_narinfo(URI, "0000", None).unwrap();
        assert_eq!(cache.purge_if_due().unwrap(), None, "purged at open");
        drop(cache);
        let count = |c: &NarInfoDiskCache| -> i64 {
            c.lock()
                .conn
                .query_row("select count(*) from NARs", [], |r| r.get(0))
                .unwrap()
        };
        // Two hours later: the purge is not due yet (and the 1 s TTL is raised to an hour).
        let reopen = |at: i64| {
            now.store(at, Ordering::SeqCst);
            let n = now.clone();
            NarInfoDiskCache::open_with_clock(
                &t.path().join(FILE_NAME),
                short,
                Arc::new(move || n.load(Ordering::SeqCst)),
            )
            .unwrap()
        };
        let c = reopen(T0 + 7200);
        assert_eq!(count(&c), 2);
        drop(c);
        // A day and a bit later: the negative entry goes, the positive one stays
        // (30 days at least).
        let c = reopen(T0 + PURGE_INTERVAL + 1);
        assert_eq!(count(&c), 1);
        let last: i64 = c
            .lock()
            .conn
            .query_row("select value from LastPurge where dummy = ''", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(last, T0 + PURGE_INTERVAL + 1);
        drop(c);
        let c = reopen(T0 + DEFAULT_POSITIVE_TTL as i64 + 1);
        assert_eq!(count(&c), 0);
    }

    #[test]
    fn pragmas_and_default_path() {
        let t = tempfile::tempdir().unwrap();
        let mut env = Env::new();
        env.insert("HOME".into(), t.path().join("home").display().to_string());
        assert_eq!(
            default_path(&env).unwrap(),
            t.path().join("home/.cache/nix/binary-cache-v6.sqlite")
        );
        env.insert(
            "XDG_CACHE_HOME".into(),
            t.path().join("xdg").display().to_string(),
        );
        let cache = NarInfoDiskCache::open_default(&env, NarInfoCacheTtl::default()).unwrap();
        assert_eq!(
            cache.path(),
            t.path().join("xdg/nix/binary-cache-v6.sqlite")
        );
        let mode: String = cache
            .lock()
            .conn
            .query_row("pragma journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "truncate");
        assert!(matches!(
            default_path(&Env::new()),
            Err(DiskCacheError::NoCacheDir)
        ));
        assert!(cache.disable());
        assert!(!cache.disable());
        assert!(cache.is_disabled());
    }

    #[test]
    fn bad_rows_are_errors_not_panics() {
        let t = tempfile::tempdir().unwrap();
        let (cache, _) = open(t.path(), NarInfoCacheTtl::default());
        cache.upsert_cache(URI, "/nix/store", false, 0).unwrap();
        let ni = full_narinfo();
        let hp = ni.store_path.hash_part().to_owned();
        cache.upsert_narinfo(URI, &hp, Some(&ni)).unwrap();
        cache
            .lock()
            .conn
            .execute("update NARs set narHash = 'sha256:xyz'", [])
            .unwrap();
        assert!(matches!(
            cache.lookup_narinfo(URI, &hp),
            Err(DiskCacheError::BadRow {
                column: "narHash",
                ..
            })
        ));
    }

    #[test]
    fn ttls_from_settings() {
        let t = tempfile::tempdir().unwrap();
        let s = crate::config::Settings::for_root(t.path(), "").unwrap();
        assert_eq!(
            NarInfoCacheTtl::from_settings(&s),
            NarInfoCacheTtl::default()
        );
        let s = crate::config::Settings::for_root(
            t.path(),
            "narinfo-cache-positive-ttl = 60\nnarinfo-cache-negative-ttl = 0\n",
        )
        .unwrap();
        assert_eq!(
            NarInfoCacheTtl::from_settings(&s),
            NarInfoCacheTtl {
                positive: 60,
                negative: 0
            }
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn column() -> impl Strategy<Value = Option<String>> {
            prop_oneof![
                Just(None),
                ".{0,40}".prop_map(Some),
                "[0-9a-z:-]{0,60}".prop_map(Some),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Rows written by anyone: a lookup answers or fails, never panics.
            #[test]
            fn arbitrary_rows_never_panic(
                cols in proptest::collection::vec(column(), 9),
                sizes in proptest::collection::vec(proptest::option::of(any::<i64>()), 2),
                content in column(),
            ) {
                let t = tempfile::tempdir().unwrap();
                let (cache, _) = open(t.path(), NarInfoCacheTtl::default());
                let id = cache.upsert_cache(URI, "/nix/store", false, 0).unwrap().id;
                cache.lock().conn.execute(
                    "insert into NARs(cache, hashPart, namePart, url, compression, fileHash, fileSize, narHash, \
                     narSize, refs, deriver, sigs, ca, timestamp, present) \
                     values (?1, 'h', ?2, ?3, ?4, ?5, ?11, ?6, ?12, ?7, ?8, ?9, ?10, ?13, 1)",
                    params![id, cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], cols[8],
                            sizes[0], sizes[1], T0],
                ).unwrap();
                let _ = cache.lookup_narinfo(URI, "h");
                let out: DrvOutput = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad!out"
                    .parse()
                    .unwrap();
                cache.lock().conn.execute(
                    "insert into Realisations(cache, outputId, content, timestamp) values (?1, ?2, ?3, ?4)",
                    params![id, out.to_string(), content, T0],
                ).unwrap();
                let _ = cache.lookup_realisation(URI, &out);
            }
        }
    }

    #[test]
    fn cache_key_strips_parameters_and_slash() {
        assert_eq!(cache_key("https://c.org/x/?priority=1"), "https://c.org/x");
        assert_eq!(cache_key("https://c.org"), "https://c.org");
    }
}
