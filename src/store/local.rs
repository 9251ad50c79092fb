//! The local store (`LocalStore`): a store directory plus Nix 2.8's database.
//!
//! Opening creates what Nix creates: the store dir (with `.links`; when running as
//! root and `build-users-group` exists, owned `root:<group>` mode 1775), and in the
//! state dir `profiles/per-user/<user>`, `gcroots/per-user/<user>` (with
//! `gcroots/profiles -> ../profiles` when `gcroots` is new), `temproots`, `db`.
//!
//! Registration follows `registerValidPaths`: one transaction inserts (or, for a
//! valid path, updates) every `ValidPaths` row, then `Refs`, then checks that the
//! references have no cycle (self-references aside). NAR hashes are stored as
//! `sha256:<base16>`, `narSize`/`ultimate`/`sigs`/`deriver`/`ca` as NULL when
//! zero/false/empty/absent.
//!
//! Adding objects ([`LocalStore::add_text_to_store`], [`LocalStore::add_path_to_store`])
//! is atomic: temp root, `<path>.lock`, write under a temporary store-path-like name,
//! canonicalise, rename into place, register; a crash leaves no valid path with
//! wrong contents.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::canonicalise::canonicalise_path_meta_data;
use super::db::StoreDb;
use super::gc_roots::TempRoots;
use super::locks::PathLocks;
use super::path_info::ValidPathInfo;
use super::StoreError;
use crate::config::Settings;
use crate::content_address::{ContentAddress, FileIngestionMethod};
use crate::derivation::{name_from_drv_path, Derivation, DrvHashCache};
use crate::hash::{Encoding, Hash, HashAlgo};
use crate::nar;
use crate::narinfo::fingerprint_path;
use crate::realisation::{DrvOutput, Realisation};
use crate::signature::{sign_realisation, SecretKey};
use crate::store_path::{StoreDir, StorePath, StorePathSet};

mod unregistered;
pub use unregistered::UnregisteredObject;

/// Most parameters bound in one `in (…)` query.
const BATCH: usize = 10_000;

/// A row of `DerivationOutputs`: (derivation, output name, output path).
pub type DerivationOutputRow = (StorePath, String, StorePath);

/// Whether a write may replace a path that is already valid (Nix's `RepairFlag`):
/// `--repair` re-substitutes or rebuilds corrupted paths over their old copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepairFlag {
    #[default]
    NoRepair,
    Repair,
}

/// The local Nix store. Methods are blocking; the value can be shared between threads.
#[derive(Debug)]
pub struct LocalStore {
    store_dir: StoreDir,
    state_dir: PathBuf,
    db: Mutex<StoreDb>,
    /// `secret-key-files`, read each time a path is signed (as Nix does).
    secret_key_files: Vec<PathBuf>,
    /// `auto-optimise-store`.
    auto_optimise: bool,
    /// `keep-outputs` and `keep-derivations`, for the collector ([`super::gc`]).
    gc_keep_outputs: bool,
    gc_keep_derivations: bool,
    /// The `ca-derivations` experimental feature: derivation outputs are also
    /// looked up in `Realisations` (Nix's `queryPartialDerivationOutputMap`).
    ca_derivations: bool,
    /// Hashes modulo of the derivations read so far, by `.drv` path (Nix's global
    /// `drvHashes`): a `.drv`'s contents are fixed by its path, so each is read and
    /// hashed once per process, not once per build of every derivation above it.
    drv_hashes: Mutex<DrvHashCache>,
    /// `sync-before-registering`, and how many times registration synced for it.
    sync_before_registering: bool,
    syncs: std::sync::atomic::AtomicU64,
}

fn create_dirs(p: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(p).map_err(StoreError::io("creating directory", p))
}

fn chmod(p: &Path, mode: u32) -> Result<(), StoreError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(StoreError::io("changing permissions of", p))
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

impl LocalStore {
    /// Opens the store that `settings` describe, creating directories and the
    /// database as Nix does.
    pub fn open(settings: &Settings) -> Result<LocalStore, StoreError> {
        let store_dir = settings.store_dir().clone();
        let state_dir = settings.state_dir().to_owned();
        Self::create_store_dirs(settings)?;
        let db = StoreDb::open(&state_dir.join("db"), settings)?;
        Ok(LocalStore {
            store_dir,
            state_dir,
            db: Mutex::new(db),
            secret_key_files: settings.secret_key_files(),
            auto_optimise: settings.auto_optimise_store(),
            gc_keep_outputs: settings.gc_keep_outputs(),
            gc_keep_derivations: settings.gc_keep_derivations(),
            ca_derivations: settings.is_experimental_feature_enabled("ca-derivations"),
            drv_hashes: Mutex::new(DrvHashCache::new()),
            sync_before_registering: settings.sync_before_registering(),
            syncs: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// What each short-lived Nix opener of the store (such as every
    /// `nix-daemon` connection's process) does, for a long-lived one: the
    /// store and state directories (the user's `per-user` ones included) are
    /// made again if something removed them, and if `db.sqlite` is not the
    /// file this store opened (deleted or replaced), the database is reopened
    /// (created if gone) and the memoised derivation hashes are forgotten.
    /// Returns whether it reopened the database.
    pub fn reopen_if_replaced(&self, settings: &Settings) -> Result<bool, StoreError> {
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        Self::create_store_dirs(settings)?;
        if !db.replaced() {
            return Ok(false);
        }
        *db = StoreDb::open(&self.state_dir.join("db"), settings)?;
        *self.drv_hashes.lock().unwrap_or_else(|e| e.into_inner()) = DrvHashCache::new();
        Ok(true)
    }

    /// The store and state directories Nix makes when it opens a local store.
    fn create_store_dirs(settings: &Settings) -> Result<(), StoreError> {
        let real = settings.store_dir().as_path();
        let state_dir = settings.state_dir();
        create_dirs(real)?;
        create_dirs(&real.join(".links"))?;
        let profiles = state_dir.join("profiles");
        create_dirs(&profiles)?;
        create_dirs(&state_dir.join("temproots"))?;
        let gcroots = state_dir.join("gcroots");
        if !gcroots.exists() {
            create_dirs(&gcroots)?;
            let link = gcroots.join("profiles");
            std::os::unix::fs::symlink(&profiles, &link)
                .map_err(StoreError::io("creating symlink", &link))?;
        }
        for d in [profiles.join("per-user"), gcroots.join("per-user")] {
            create_dirs(&d)?;
            chmod(&d, 0o755)?;
        }
        let uid = nix::unistd::getuid();
        if let Ok(Some(user)) = nix::unistd::User::from_uid(uid) {
            for d in [
                profiles.join("per-user").join(&user.name),
                gcroots.join("per-user").join(&user.name),
            ] {
                create_dirs(&d)?;
                chmod(&d, 0o755)?;
            }
        }
        if uid.is_root() {
            if let Some(group) = settings.build_users_group() {
                Self::set_store_group(real, &group)?;
            }
        }
        Ok(())
    }

    /// The unmasked hash modulo of the derivation at `drv_path` (Nix's
    /// `hashDerivationModulo`), memoised for the store's lifetime together with those
    /// of its input derivations, which are read from the store directory when not
    /// yet known.
    pub fn drv_hash(&self, drv_path: &StorePath) -> Result<crate::derivation::DrvHash, StoreError> {
        let mut cache = self.drv_hashes.lock().unwrap_or_else(|e| e.into_inner());
        cache.hash_of(&self.store_dir, drv_path, |q: &StorePath| {
            self.read_derivation(q).map(Arc::new)
        })
    }

    fn set_store_group(real: &Path, group: &str) -> Result<(), StoreError> {
        use std::os::unix::fs::MetadataExt;
        let Ok(Some(gr)) = nix::unistd::Group::from_name(group) else {
            log::warn!("the group '{group}' specified in 'build-users-group' does not exist");
            return Ok(());
        };
        let st = std::fs::metadata(real).map_err(StoreError::io("getting attributes of", real))?;
        if st.uid() != 0 || st.gid() != gr.gid.as_raw() || st.mode() & 0o7777 != 0o1775 {
            nix::unistd::chown(real, Some(nix::unistd::Uid::from_raw(0)), Some(gr.gid))
                .map_err(|e| StoreError::io("changing ownership of", real)(e.into()))?;
            chmod(real, 0o1775)?;
        }
        Ok(())
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `keep-outputs`: the collector keeps the outputs of live derivations.
    pub fn gc_keep_outputs(&self) -> bool {
        self.gc_keep_outputs
    }

    /// `keep-derivations`: the collector keeps the derivers of live paths.
    pub fn gc_keep_derivations(&self) -> bool {
        self.gc_keep_derivations
    }

    /// Whether the `ca-derivations` experimental feature is enabled.
    pub fn ca_derivations_enabled(&self) -> bool {
        self.ca_derivations
    }

    /// Nix's `invalidatePathChecked`: in one transaction, refuses when another
    /// valid path refers to `path` (self-references aside), else removes its
    /// `ValidPaths` row (its `Refs`, `DerivationOutputs` and `Realisations` rows go
    /// with it). An invalid path is left alone.
    pub fn invalidate_path_checked(&self, path: &StorePath) -> Result<(), StoreError> {
        let p = self.print(path);
        let mut db = self.db();
        db.retry("invalidating a path", |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(StoreError::sql("starting a transaction"))?;
            if let Some(id) = Self::path_id(&tx, &p)? {
                let mut referrers = Vec::new();
                {
                    let mut stmt = tx
                        .prepare_cached("select path from Refs join ValidPaths on referrer = id where reference = ? and referrer != ?")
                        .map_err(StoreError::sql("querying referrers"))?;
                    let rows = stmt
                        .query_map([id, id], |r| r.get::<_, String>(0))
                        .map_err(StoreError::sql("querying referrers"))?;
                    for r in rows {
                        referrers.push(format!("'{}'", r.map_err(StoreError::sql("querying referrers"))?));
                    }
                }
                if !referrers.is_empty() {
                    referrers.sort();
                    return Err(StoreError::PathInUse {
                        path: p.clone(),
                        referrers: referrers.join(", "),
                    });
                }
                tx.prepare_cached("delete from ValidPaths where id = ?")
                    .and_then(|mut st| st.execute([id]))
                    .map_err(StoreError::sql("invalidating a path"))?;
            }
            tx.commit().map_err(StoreError::sql("committing"))
        })
    }

    /// The file system path of a store path.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.store_dir.to_path_buf(path)
    }

    fn db(&self) -> MutexGuard<'_, StoreDb> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn print(&self, p: &StorePath) -> String {
        self.store_dir.print(p)
    }

    fn parse_db_path(
        &self,
        s: &str,
        field: &'static str,
        of: &str,
    ) -> Result<StorePath, StoreError> {
        self.store_dir.parse(s).map_err(|_| StoreError::BadDbEntry {
            path: of.to_owned(),
            field,
            value: s.to_owned(),
        })
    }

    /// Records `path` as a temporary GC root of this process: Nix's collector, running
    /// or not, keeps it (and entries sharing its hash part, such as `<path>.lock`)
    /// until this process exits, or as long as the connection or the holds it
    /// belongs to last ([`super::gc_roots`]). Call it before creating or relying on
    /// the path.
    pub fn add_temp_root(&self, path: &StorePath) -> Result<(), StoreError> {
        self.add_temp_roots(std::slice::from_ref(path))
    }

    /// [`add_temp_root`](Self::add_temp_root) for many paths at once (one lock of
    /// `gc.lock`, one write).
    pub fn add_temp_roots(&self, paths: &[StorePath]) -> Result<(), StoreError> {
        let add = || {
            let roots = self.temp_roots_file()?;
            let mut roots = roots.lock().unwrap_or_else(|e| e.into_inner());
            roots.add_all(&self.store_dir, paths)
        };
        match add() {
            // Released meanwhile: the next file is a fresh one.
            Err(StoreError::TempRootsReleased(_)) => add(),
            r => r,
        }
    }

    /// Gives up the temporary roots this process holds in this store (its
    /// `temproots/<pid>` file is removed); later roots start a new file. For a
    /// caller done with everything it used; the CLI drops all roots at exit with
    /// [`gc_roots::release_temp_roots`](super::gc_roots::release_temp_roots).
    pub fn release_temp_roots(&self) {
        super::gc_roots::release_temp_roots_of(&self.state_dir);
    }

    /// The file this thread's roots go to ([`TempRoots::current`]).
    fn temp_roots_file(&self) -> Result<Arc<Mutex<TempRoots>>, StoreError> {
        TempRoots::current(&self.state_dir)
    }

    /// `nix-store --add-root`: `gc_root` becomes a symlink to `path` and an indirect
    /// GC root (see [`gc_roots::add_perm_root`](super::gc_roots::add_perm_root)).
    pub fn add_perm_root(&self, path: &StorePath, gc_root: &Path) -> Result<PathBuf, StoreError> {
        let roots = self.temp_roots_file()?;
        let mut roots = roots.lock().unwrap_or_else(|e| e.into_inner());
        super::gc_roots::add_perm_root(&mut roots, &self.store_dir, path, gc_root)
    }

    /// The subset of `paths` that is valid, in one query per 10 000 paths, all in one
    /// read transaction.
    pub fn query_valid_paths(&self, paths: &[StorePath]) -> Result<StorePathSet, StoreError> {
        let printed: Vec<String> = paths.iter().map(|p| self.print(p)).collect();
        let mut db = self.db();
        db.retry("querying valid paths", |conn| {
            let tx = conn
                .transaction()
                .map_err(StoreError::sql("starting a transaction"))?;
            let mut res = StorePathSet::new();
            for chunk in printed.chunks(BATCH) {
                let sql = format!(
                    "select path from ValidPaths where path in ({})",
                    placeholders(chunk.len())
                );
                let mut stmt = tx
                    .prepare(&sql)
                    .map_err(StoreError::sql("querying valid paths"))?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(chunk.iter()), |r| {
                        r.get::<_, String>(0)
                    })
                    .map_err(StoreError::sql("querying valid paths"))?;
                for r in rows {
                    let s = r.map_err(StoreError::sql("querying valid paths"))?;
                    res.insert(self.parse_db_path(&s, "path", &s)?);
                }
            }
            Ok(res)
        })
    }

    pub fn is_valid_path(&self, path: &StorePath) -> Result<bool, StoreError> {
        let p = self.print(path);
        let mut db = self.db();
        db.retry("querying path validity", |conn| {
            conn.prepare_cached("select 1 from ValidPaths where path = ?")
                .and_then(|mut st| st.query_row([&p], |_| Ok(())).optional())
                .map(|o| o.is_some())
                .map_err(StoreError::sql("querying path validity"))
        })
    }

    fn path_id(conn: &Connection, p: &str) -> Result<Option<i64>, StoreError> {
        // Cached statements: registration asks this for every path and reference.
        conn.prepare_cached("select id from ValidPaths where path = ?")
            .and_then(|mut s| s.query_row([p], |r| r.get(0)).optional())
            .map_err(StoreError::sql(format!("querying the id of '{p}'")))
    }

    /// The path's metadata, or `None` when it is not valid.
    pub fn query_path_info(&self, path: &StorePath) -> Result<Option<ValidPathInfo>, StoreError> {
        let p = self.print(path);
        let mut db = self.db();
        db.retry("querying path info", |conn| {
            self.path_info_in(conn, path, &p)
        })
    }

    fn path_info_in(
        &self,
        conn: &Connection,
        path: &StorePath,
        p: &str,
    ) -> Result<Option<ValidPathInfo>, StoreError> {
        type Row = (
            i64,
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = conn
            .query_row(
                "select id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca from ValidPaths where path = ?",
                [p],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                },
            )
            .optional()
            .map_err(StoreError::sql(format!("querying path info of '{p}'")))?;
        let Some((id, hash, reg, deriver, nar_size, ultimate, sigs, ca)) = row else {
            return Ok(None);
        };
        let bad = |field, value: &str| StoreError::BadDbEntry {
            path: p.to_owned(),
            field,
            value: value.to_owned(),
        };
        let nar_hash = Hash::parse_any_prefixed(&hash).map_err(|_| bad("hash", &hash))?;
        let mut info =
            ValidPathInfo::new(path.clone(), nar_hash, nar_size.unwrap_or(0).max(0) as u64);
        info.registration_time = reg;
        info.deriver = match deriver.as_deref() {
            Some(d) if !d.is_empty() => Some(self.parse_db_path(d, "deriver", p)?),
            _ => None,
        };
        info.ultimate = ultimate == Some(1);
        if let Some(s) = sigs {
            info.sigs = s
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        info.ca = match ca.as_deref() {
            Some(c) if !c.is_empty() => Some(c.parse().map_err(|_| bad("ca", c))?),
            _ => None,
        };
        let mut stmt = conn
            .prepare_cached(
                "select path from Refs join ValidPaths on reference = id where referrer = ?",
            )
            .map_err(StoreError::sql("querying references"))?;
        let rows = stmt
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(StoreError::sql("querying references"))?;
        for r in rows {
            let s = r.map_err(StoreError::sql("querying references"))?;
            info.references
                .insert(self.parse_db_path(&s, "reference", p)?);
        }
        Ok(Some(info))
    }

    /// The references of a valid path.
    pub fn query_references(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        self.query_path_info(path)?
            .map(|i| i.references)
            .ok_or_else(|| StoreError::InvalidPath(self.print(path)))
    }

    /// The valid paths that refer to `path`.
    pub fn query_referrers(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        let p = self.print(path);
        let mut db = self.db();
        db.retry("querying referrers", |conn| {
            let mut stmt = conn
                .prepare_cached("select path from Refs join ValidPaths on referrer = id where reference = (select id from ValidPaths where path = ?)")
                .map_err(StoreError::sql("querying referrers"))?;
            let rows = stmt
                .query_map([&p], |r| r.get::<_, String>(0))
                .map_err(StoreError::sql("querying referrers"))?;
            let mut res = StorePathSet::new();
            for r in rows {
                let s = r.map_err(StoreError::sql("querying referrers"))?;
                res.insert(self.parse_db_path(&s, "referrer", &p)?);
            }
            Ok(res)
        })
    }

    /// The closure of `paths` under references (`computeFSClosure`), one recursive
    /// query per 10 000 seeds (`closure_sql`). Every path must be valid.
    pub fn compute_closure(&self, paths: &[StorePath]) -> Result<StorePathSet, StoreError> {
        let valid = self.query_valid_paths(paths)?;
        if let Some(bad) = paths.iter().find(|p| !valid.contains(*p)) {
            return Err(StoreError::InvalidPath(self.print(bad)));
        }
        // One recursive query per chunk of seeds (closure(A ∪ B) = closure(A) ∪
        // closure(B)), walking `Refs` inside SQLite instead of one round trip and
        // one statement preparation per level of the graph; `union` drops rows seen
        // before, so self-references and shared inputs end the walk.
        let printed: Vec<String> = valid.iter().map(|p| self.print(p)).collect();
        let mut closure: StorePathSet = valid;
        let mut db = self.db();
        let found = db.retry("computing a closure", |conn| {
            let mut found = Vec::new();
            for chunk in printed.chunks(BATCH) {
                let sql = closure_sql(chunk.len());
                // Few seeds (a build's inputs) are the common case: those statements
                // are kept; a huge one is not worth the cache's memory.
                let (mut cached, mut plain);
                let stmt: &mut rusqlite::Statement = if chunk.len() <= 16 {
                    cached = conn
                        .prepare_cached(&sql)
                        .map_err(StoreError::sql("computing a closure"))?;
                    &mut cached
                } else {
                    plain = conn
                        .prepare(&sql)
                        .map_err(StoreError::sql("computing a closure"))?;
                    &mut plain
                };
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(chunk.iter()), |r| {
                        r.get::<_, String>(0)
                    })
                    .map_err(StoreError::sql("computing a closure"))?;
                for r in rows {
                    found.push(r.map_err(StoreError::sql("computing a closure"))?);
                }
            }
            Ok(found)
        })?;
        for s in found {
            closure.insert(self.parse_db_path(&s, "reference", &s)?);
        }
        Ok(closure)
    }

    /// The `DerivationOutputs` rows of a valid derivation: output name → path.
    pub fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        let p = self.print(drv);
        let mut db = self.db();
        db.retry("querying derivation outputs", |conn| {
            let id = Self::path_id(conn, &p)?.ok_or_else(|| StoreError::InvalidPath(p.clone()))?;
            let mut stmt = conn
                .prepare_cached("select id, path from DerivationOutputs where drv = ?")
                .map_err(StoreError::sql("querying derivation outputs"))?;
            let rows = stmt
                .query_map([id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(StoreError::sql("querying derivation outputs"))?;
            let mut res = BTreeMap::new();
            for r in rows {
                let (name, path) = r.map_err(StoreError::sql("querying derivation outputs"))?;
                res.insert(name, self.parse_db_path(&path, "output path", &p)?);
            }
            Ok(res)
        })
    }

    /// Nix's `queryPartialDerivationOutputMap`: the `DerivationOutputs` rows of
    /// the valid derivation `drv`, and with `ca-derivations` every output named
    /// by its static output hashes, mapped to its realisation's path (or to
    /// nothing when it has none yet).
    pub fn query_partial_derivation_output_map(
        &self,
        drv_path: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, StoreError> {
        let mut map: BTreeMap<String, Option<StorePath>> = self
            .query_derivation_outputs(drv_path)?
            .into_iter()
            .map(|(name, path)| (name, Some(path)))
            .collect();
        if !self.ca_derivations {
            return Ok(map);
        }
        let drv = self.read_derivation(drv_path)?;
        let hashes = drv.static_output_hashes(&self.store_dir, |q| self.drv_hash(q))?;
        for (name, drv_hash) in hashes {
            let id = DrvOutput {
                drv_hash,
                output: name.clone(),
            };
            match self.query_realisation(&id)? {
                Some(r) => {
                    map.insert(name, Some(r.out_path));
                }
                None => {
                    map.entry(name).or_insert(None);
                }
            }
        }
        Ok(map)
    }

    /// The valid derivations that have `path` as an output.
    pub fn query_valid_derivers(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        let p = self.print(path);
        let mut db = self.db();
        db.retry("querying valid derivers", |conn| {
            let mut stmt = conn
                .prepare_cached("select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where d.path = ?")
                .map_err(StoreError::sql("querying valid derivers"))?;
            let rows = stmt
                .query_map([&p], |r| r.get::<_, String>(0))
                .map_err(StoreError::sql("querying valid derivers"))?;
            let mut res = StorePathSet::new();
            for r in rows {
                let s = r.map_err(StoreError::sql("querying valid derivers"))?;
                res.insert(self.parse_db_path(&s, "deriver", &p)?);
            }
            Ok(res)
        })
    }

    /// Every valid path (Nix's `queryAllValidPaths`).
    pub fn query_all_valid_paths(&self) -> Result<StorePathSet, StoreError> {
        let mut db = self.db();
        db.retry("querying all valid paths", |conn| {
            let mut stmt = conn
                .prepare_cached("select path from ValidPaths")
                .map_err(StoreError::sql("querying all valid paths"))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(StoreError::sql("querying all valid paths"))?;
            let mut res = StorePathSet::new();
            for r in rows {
                let s = r.map_err(StoreError::sql("querying all valid paths"))?;
                res.insert(self.parse_db_path(&s, "path", "ValidPaths")?);
            }
            Ok(res)
        })
    }

    /// The valid path whose hash part is `hash_part` (Nix's
    /// `queryPathFromHashPart`: the first path at or after `<store>/<hash>` in
    /// the index, if it has that prefix).
    pub fn query_path_from_hash_part(
        &self,
        hash_part: &str,
    ) -> Result<Option<StorePath>, StoreError> {
        if hash_part.len() != 32 {
            return Ok(None);
        }
        let prefix = format!("{}/{}", self.store_dir.as_str(), hash_part);
        let mut db = self.db();
        let found: Option<String> = db.retry("querying path from hash part", |conn| {
            conn.query_row(
                "select path from ValidPaths where path >= ? limit 1",
                [&prefix],
                |r| r.get(0),
            )
            .optional()
            .map_err(StoreError::sql("querying path from hash part"))
        })?;
        match found {
            Some(s) if s.starts_with(&prefix) => {
                Ok(Some(self.parse_db_path(&s, "path", "ValidPaths")?))
            }
            _ => Ok(None),
        }
    }

    /// Adds signatures to a valid path's `sigs` (Nix's `addSignatures`): the
    /// union of the old and the new, in one transaction.
    pub fn add_signatures(
        &self,
        path: &StorePath,
        sigs: &BTreeSet<String>,
    ) -> Result<(), StoreError> {
        let p = self.print(path);
        let mut db = self.db();
        db.retry("adding signatures", |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(StoreError::sql("adding signatures"))?;
            let old: Option<Option<String>> = tx
                .query_row("select sigs from ValidPaths where path = ?", [&p], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(StoreError::sql("adding signatures"))?;
            let Some(old) = old else {
                return Err(StoreError::InvalidPath(p.clone()));
            };
            let all: BTreeSet<&str> = old
                .as_deref()
                .unwrap_or("")
                .split(' ')
                .filter(|s| !s.is_empty())
                .chain(sigs.iter().map(String::as_str))
                .collect();
            let joined = all.into_iter().collect::<Vec<_>>().join(" ");
            tx.execute(
                "update ValidPaths set sigs = ? where path = ?",
                params![(!joined.is_empty()).then_some(joined), p],
            )
            .map_err(StoreError::sql("adding signatures"))?;
            tx.commit().map_err(StoreError::sql("adding signatures"))
        })
    }

    fn realisation_core(
        &self,
        conn: &Connection,
        id: &DrvOutput,
    ) -> Result<Option<(i64, StorePath, BTreeSet<String>)>, StoreError> {
        let hash = id.drv_hash.to_typed_string(Encoding::Base16);
        let row: Option<(i64, String, Option<String>)> = conn
            .query_row(
                "select Realisations.id, Output.path, Realisations.signatures from Realisations \
                 inner join ValidPaths as Output on Output.id = Realisations.outputPath \
                 where drvPath = ? and outputName = ?",
                params![hash, id.output],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(StoreError::sql(format!("querying realisation '{id}'")))?;
        let Some((rid, path, sigs)) = row else {
            return Ok(None);
        };
        let out = self.parse_db_path(&path, "realisation output", &id.to_string())?;
        let sigs = sigs
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Some((rid, out, sigs)))
    }

    /// The realisation of a CA derivation output, with its dependent realisations.
    pub fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, StoreError> {
        let mut db = self.db();
        if !db.has_ca_schema() {
            return Ok(None);
        }
        db.retry("querying a realisation", |conn| {
            let Some((rid, out_path, signatures)) = self.realisation_core(conn, id)? else {
                return Ok(None);
            };
            let mut deps = Vec::new();
            {
                let mut stmt = conn
                    .prepare_cached(
                        "select drvPath, outputName from Realisations \
                         join RealisationsRefs on realisationReference = Realisations.id where referrer = ?",
                    )
                    .map_err(StoreError::sql("querying realisation references"))?;
                let rows = stmt
                    .query_map([rid], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                    .map_err(StoreError::sql("querying realisation references"))?;
                for r in rows {
                    deps.push(r.map_err(StoreError::sql("querying realisation references"))?);
                }
            }
            let mut dependent_realisations = BTreeMap::new();
            for (h, o) in deps {
                let bad = || StoreError::BadDbEntry {
                    path: id.to_string(),
                    field: "realisation reference",
                    value: format!("{h}!{o}"),
                };
                let drv_hash = Hash::parse_any_prefixed(&h).map_err(|_| bad())?;
                let dep = DrvOutput { drv_hash, output: o.clone() };
                let (_, p, _) = self.realisation_core(conn, &dep)?.ok_or_else(bad)?;
                dependent_realisations.insert(dep, p);
            }
            Ok(Some(Realisation {
                id: id.clone(),
                out_path,
                signatures,
                dependent_realisations,
            }))
        })
    }

    /// Registers a realisation (`registerDrvOutput`): a compatible existing one gets
    /// the union of signatures; a different output path is an error. The output path
    /// and every dependent realisation must already be registered.
    pub fn register_realisation(&self, r: &Realisation) -> Result<(), StoreError> {
        let mut db = self.db();
        if !db.has_ca_schema() {
            return Err(StoreError::NoCaSchema);
        }
        let hash = r.id.drv_hash.to_typed_string(Encoding::Base16);
        let out = self.print(&r.out_path);
        db.retry("registering a realisation", |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(StoreError::sql("starting a transaction"))?;
            if Self::path_id(&tx, &out)?.is_none() {
                return Err(StoreError::InvalidPath(out.clone()));
            }
            match self.realisation_core(&tx, &r.id)? {
                Some((_, old, old_sigs)) => {
                    if old != r.out_path {
                        return Err(StoreError::RealisationConflict {
                            id: r.id.to_string(),
                            local: self.print(&old),
                            new: out.clone(),
                        });
                    }
                    let sigs: BTreeSet<&String> = old_sigs.iter().chain(r.signatures.iter()).collect();
                    let sigs: Vec<&str> = sigs.into_iter().map(String::as_str).collect();
                    tx.execute(
                        "update Realisations set signatures = ? where drvPath = ? and outputName = ?",
                        params![sigs.join(" "), hash, r.id.output],
                    )
                    .map_err(StoreError::sql("updating a realisation"))?;
                }
                None => {
                    let sigs: Vec<&str> = r.signatures.iter().map(String::as_str).collect();
                    tx.execute(
                        "insert into Realisations (drvPath, outputName, outputPath, signatures) \
                         values (?, ?, (select id from ValidPaths where path = ?), ?)",
                        params![hash, r.id.output, out, sigs.join(" ")],
                    )
                    .map_err(StoreError::sql("registering a realisation"))?;
                }
            }
            for (dep, dep_path) in &r.dependent_realisations {
                let ok = self
                    .realisation_core(&tx, dep)?
                    .is_some_and(|(_, p, _)| &p == dep_path);
                if !ok {
                    return Err(StoreError::BadDependentRealisation {
                        id: r.id.to_string(),
                        dependency: dep.to_string(),
                    });
                }
                tx.execute(
                    "insert or replace into RealisationsRefs (referrer, realisationReference) values (\
                     (select id from Realisations where drvPath = ? and outputName = ?), \
                     (select id from Realisations where drvPath = ? and outputName = ?))",
                    params![
                        hash,
                        r.id.output,
                        dep.drv_hash.to_typed_string(Encoding::Base16),
                        dep.output
                    ],
                )
                .map_err(StoreError::sql("registering a realisation reference"))?;
            }
            tx.commit().map_err(StoreError::sql("committing a realisation"))
        })
    }

    /// Nix's `optimisePath`: with `auto-optimise-store`, hard-links the files of the
    /// tree at `real` (a new path, before it is registered) through `.links`.
    pub fn optimise_path(&self, real: &Path, repair: RepairFlag) -> Result<(), StoreError> {
        self.optimise_path_if(self.auto_optimise, real, repair)
    }

    /// [`LocalStore::optimise_path`] with `auto-optimise-store` given (a build's
    /// own settings, e.g. a daemon client's).
    pub fn optimise_path_if(
        &self,
        auto_optimise: bool,
        real: &Path,
        repair: RepairFlag,
    ) -> Result<(), StoreError> {
        if auto_optimise {
            super::optimise::optimise_path(
                self.store_dir.as_path(),
                real,
                repair == RepairFlag::Repair,
            )?;
        }
        Ok(())
    }

    /// The keys of these `secret-key-files`, read now.
    fn secret_keys(files: &[PathBuf]) -> Result<Vec<SecretKey>, StoreError> {
        files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).map_err(StoreError::io("opening file", f))?;
                SecretKey::parse(&text).map_err(|source| StoreError::BadSecretKey {
                    path: f.clone(),
                    source,
                })
            })
            .collect()
    }

    /// Nix's `signPathInfo`: adds a signature of the path's fingerprint by every key
    /// of `secret-key-files` (none when the setting is empty).
    pub fn sign_path_info(&self, info: &mut ValidPathInfo) -> Result<(), StoreError> {
        self.sign_path_info_with(&self.secret_key_files, info)
    }

    /// [`LocalStore::sign_path_info`] with the keys of these files (a build's own
    /// `secret-key-files`, e.g. a daemon client's).
    pub fn sign_path_info_with(
        &self,
        key_files: &[PathBuf],
        info: &mut ValidPathInfo,
    ) -> Result<(), StoreError> {
        for key in Self::secret_keys(key_files)? {
            let fp = fingerprint_path(
                &self.store_dir,
                &info.path,
                &info.nar_hash,
                info.nar_size,
                &info.references,
            );
            info.sigs.insert(key.sign(fp.as_bytes()));
        }
        Ok(())
    }

    /// Nix's `signRealisation`: signs `r` with every key of `secret-key-files`.
    pub fn sign_realisation(&self, r: &mut Realisation) -> Result<(), StoreError> {
        Self::sign_realisation_with(&self.secret_key_files, r)
    }

    /// [`LocalStore::sign_realisation`] with the keys of these files.
    pub fn sign_realisation_with(
        key_files: &[PathBuf],
        r: &mut Realisation,
    ) -> Result<(), StoreError> {
        for key in Self::secret_keys(key_files)? {
            sign_realisation(r, &key);
        }
        Ok(())
    }

    /// The dependent realisations of an output of `drv` at `out_path` (Nix's
    /// `drvOutputReferences`): of the realisations of `drv`'s input derivation
    /// outputs and everything they depend on, those whose output path `out_path`
    /// refers to directly. An input output without a realisation is an error.
    pub fn drv_output_references(
        &self,
        drv: &Derivation,
        out_path: &StorePath,
    ) -> Result<BTreeMap<DrvOutput, StorePath>, StoreError> {
        let mut cache = DrvHashCache::new();
        let sd = self.store_dir.clone();
        let mut todo: Vec<Realisation> = Vec::new();
        for (input, outputs) in &drv.input_drvs {
            let input_drv = self.read_derivation(input)?;
            let hashes = input_drv.static_output_hashes(&sd, |p: &StorePath| {
                cache.hash_of(&sd, p, |q: &StorePath| {
                    self.read_derivation(q).map(Arc::new)
                })
            })?;
            for name in outputs {
                let unbuilt = || StoreError::UnbuiltInputOutput {
                    drv: self.print(input),
                    output: name.clone(),
                };
                let id = DrvOutput {
                    drv_hash: hashes.get(name).ok_or_else(unbuilt)?.clone(),
                    output: name.clone(),
                };
                todo.push(self.query_realisation(&id)?.ok_or_else(unbuilt)?);
            }
        }
        // `Realisation::closure`: follow dependent realisations transitively.
        let mut closure: BTreeMap<DrvOutput, StorePath> = BTreeMap::new();
        while let Some(r) = todo.pop() {
            if closure.insert(r.id.clone(), r.out_path.clone()).is_some() {
                continue;
            }
            for dep in r.dependent_realisations.keys() {
                if !closure.contains_key(dep) {
                    let missing = || StoreError::BadDependentRealisation {
                        id: r.id.to_string(),
                        dependency: dep.to_string(),
                    };
                    todo.push(self.query_realisation(dep)?.ok_or_else(missing)?);
                }
            }
        }
        let refs = self.query_references(out_path)?;
        closure.retain(|_, p| refs.contains(p));
        Ok(closure)
    }

    /// Checks that a claimed content address gives the path (`isContentAddressed`).
    fn check_ca(&self, info: &ValidPathInfo) -> Result<(), StoreError> {
        let Some(ca) = &info.ca else { return Ok(()) };
        let self_ref = info.references.contains(&info.path);
        let mut refs = info.references.clone();
        refs.remove(&info.path);
        let ok = match ca {
            ContentAddress::Text(_) if self_ref => false,
            _ => self
                .store_dir
                .make_path_from_ca(info.path.name(), ca, &refs, self_ref)
                .is_ok_and(|p| p == info.path),
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::CaMismatch(self.print(&info.path)))
        }
    }

    /// Registers `infos` as valid in one transaction (`registerValidPaths`); their
    /// references must be among `infos` or already valid, without cycles.
    pub fn register_valid_paths(&self, infos: &[ValidPathInfo]) -> Result<(), StoreError> {
        self.register_valid_paths_with_outputs(infos, &[])
    }

    /// Reads and parses the derivation at `path` (valid or not: it is read from the
    /// store directory).
    pub fn read_derivation(&self, path: &StorePath) -> Result<Derivation, StoreError> {
        let real = self.real_path(path);
        let bytes = std::fs::read(&real).map_err(StoreError::io("reading derivation", &real))?;
        Derivation::from_aterm_bytes(&bytes, &self.store_dir).map_err(|source| {
            StoreError::BadDerivation {
                path: self.print(path),
                source,
            }
        })
    }

    /// The `DerivationOutputs` rows Nix records when a `.drv` becomes valid: one per
    /// output whose path is known statically (input-addressed and fixed outputs),
    /// after checking those paths are the ones the derivation implies
    /// (`checkDerivationOutputs`).
    fn derivation_output_rows(
        &self,
        drv_path: &StorePath,
    ) -> Result<Vec<DerivationOutputRow>, StoreError> {
        let drv = self.read_derivation(drv_path)?;
        let name = name_from_drv_path(drv_path)?;
        drv.verify_output_paths(&self.store_dir, name, |p: &StorePath| self.drv_hash(p))
            .map_err(|e| match e {
                StoreError::Derivation(source) => StoreError::BadDerivation {
                    path: self.print(drv_path),
                    source,
                },
                e => e,
            })?;
        Ok(drv
            .outputs
            .iter()
            .filter_map(|(out, o)| Some((drv_path.clone(), out.clone(), o.path()?.clone())))
            .collect())
    }

    /// How many registrations synced the file systems first
    /// (`sync-before-registering`).
    pub fn syncs_before_registering(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`LocalStore::register_valid_paths`], also recording `DerivationOutputs` rows
    /// (derivation, output name, output path) in the same transaction: the rows given
    /// here, and those of every `.drv` among `infos` (which must already be in
    /// place in the store directory).
    pub fn register_valid_paths_with_outputs(
        &self,
        infos: &[ValidPathInfo],
        drv_outputs: &[DerivationOutputRow],
    ) -> Result<(), StoreError> {
        for i in infos {
            if i.nar_hash.algo() != HashAlgo::Sha256 {
                return Err(StoreError::NarHashNotSha256(self.print(&i.path)));
            }
            self.check_ca(i)?;
        }
        self.check_acyclic(infos)?;
        if self.sync_before_registering {
            // As Nix's `registerValidPaths`: the database is synced by SQLite, but
            // the new paths' contents may not be on disk yet.
            nix::unistd::sync();
            self.syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut drv_outputs = drv_outputs.to_vec();
        for i in infos.iter().filter(|i| i.path.is_derivation()) {
            drv_outputs.extend(self.derivation_output_rows(&i.path)?);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut db = self.db();
        db.retry("registering valid paths", |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(StoreError::sql("starting a transaction"))?;
            for i in infos {
                let p = self.print(&i.path);
                let hash = i.nar_hash.to_typed_string(Encoding::Base16);
                let size = (i.nar_size != 0).then_some(i.nar_size as i64);
                let ultimate = i.ultimate.then_some(1i64);
                let sigs = (!i.sigs.is_empty())
                    .then(|| i.sigs.iter().map(String::as_str).collect::<Vec<_>>().join(" "));
                let ca = i.ca.as_ref().map(ToString::to_string);
                if Self::path_id(&tx, &p)?.is_some() {
                    tx.prepare_cached(
                        "update ValidPaths set narSize = ?, hash = ?, ultimate = ?, sigs = ?, ca = ? where path = ?",
                    )
                    .and_then(|mut s| s.execute(params![size, hash, ultimate, sigs, ca, p]))
                    .map_err(StoreError::sql(format!("updating path info of '{p}'")))?;
                } else {
                    let reg = if i.registration_time == 0 { now } else { i.registration_time };
                    let deriver = i.deriver.as_ref().map(|d| self.print(d));
                    tx.prepare_cached(
                        "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .and_then(|mut s| s.execute(params![p, hash, reg, deriver, size, ultimate, sigs, ca]))
                    .map_err(StoreError::sql(format!("registering '{p}'")))?;
                }
            }
            for i in infos {
                let p = self.print(&i.path);
                let referrer = Self::path_id(&tx, &p)?.ok_or_else(|| StoreError::InvalidPath(p.clone()))?;
                for r in &i.references {
                    let rp = self.print(r);
                    let reference = Self::path_id(&tx, &rp)?.ok_or_else(|| StoreError::MissingReference {
                        path: p.clone(),
                        reference: rp.clone(),
                    })?;
                    tx.prepare_cached("insert or replace into Refs (referrer, reference) values (?, ?)")
                        .and_then(|mut s| s.execute(params![referrer, reference]))
                    .map_err(StoreError::sql(format!("adding references of '{p}'")))?;
                }
            }
            for (drv, name, out) in &drv_outputs {
                let dp = self.print(drv);
                let id = Self::path_id(&tx, &dp)?.ok_or_else(|| StoreError::DrvNotValid {
                    drv: dp.clone(),
                    output: name.clone(),
                })?;
                tx.prepare_cached("insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)")
                    .and_then(|mut s| s.execute(params![id, name, self.print(out)]))
                .map_err(StoreError::sql(format!("registering outputs of '{dp}'")))?;
            }
            tx.commit().map_err(StoreError::sql("committing registration"))
        })
    }

    /// Fails on a reference cycle among `infos` (self-references are allowed).
    fn check_acyclic(&self, infos: &[ValidPathInfo]) -> Result<(), StoreError> {
        let by_path: BTreeMap<&StorePath, &ValidPathInfo> =
            infos.iter().map(|i| (&i.path, i)).collect();
        // 0 = unvisited, 1 = on stack, 2 = done
        let mut state: BTreeMap<&StorePath, u8> = BTreeMap::new();
        for start in by_path.keys() {
            if state.get(start).copied().unwrap_or(0) != 0 {
                continue;
            }
            let mut stack: Vec<(&StorePath, Vec<&StorePath>)> = vec![(start, Vec::new())];
            state.insert(start, 1);
            if let Some(i) = by_path.get(start) {
                stack[0].1 = i
                    .references
                    .iter()
                    .filter(|r| *r != *start && by_path.contains_key(r))
                    .collect();
            }
            while let Some((node, children)) = stack.last_mut() {
                let node = *node;
                match children.pop() {
                    Some(c) => match state.get(c).copied().unwrap_or(0) {
                        0 => {
                            state.insert(c, 1);
                            let kids = by_path
                                .get(c)
                                .map(|i| {
                                    i.references
                                        .iter()
                                        .filter(|r| *r != c && by_path.contains_key(r))
                                        .collect()
                                })
                                .unwrap_or_default();
                            stack.push((c, kids));
                        }
                        1 => {
                            return Err(StoreError::Cycle {
                                path: self.print(c),
                                parent: self.print(node),
                            })
                        }
                        _ => {}
                    },
                    None => {
                        state.insert(node, 2);
                        stack.pop();
                    }
                }
            }
        }
        Ok(())
    }

    /// The temporary name a new copy of `path` is written under before the rename
    /// into place, `<path>.drover-tmp`, and the name the old copy is moved aside to
    /// during a repair, `<path>.drover-old`. They are fixed, like Nix's `<path>.lock`
    /// and `<path>.check`, and share `path`'s hash part: only the holder of the
    /// path's lock touches them, the temporary root of `path` keeps Nix's collector
    /// off them while it works, and what a killed process left there is removed by
    /// the next one to take the lock (or by the collector, once the temporary roots
    /// of the dead process are stale).
    fn temp_names_for(&self, path: &StorePath) -> (PathBuf, PathBuf) {
        let real = self.real_path(path);
        let with = |suffix: &str| {
            let mut s = real.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        (with(".drover-tmp"), with(".drover-old"))
    }

    /// Writes a store object atomically: `write` fills a temporary path, which is
    /// canonicalised, renamed to `info.path` and registered. Does nothing when the
    /// path is already valid.
    pub fn add_object(
        &self,
        info: &ValidPathInfo,
        write: impl FnOnce(&Path) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.add_object_with(info, RepairFlag::NoRepair, write)
    }

    /// [`add_object`](Self::add_object), and with [`RepairFlag::Repair`] also when
    /// the path is already valid (Nix's `addToStore` with `repair`): the new copy is
    /// written and checked beside the old one, which is then swapped out and
    /// deleted, so a failed repair leaves the old copy as it was.
    pub fn add_object_with(
        &self,
        info: &ValidPathInfo,
        repair: RepairFlag,
        write: impl FnOnce(&Path) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let repair = repair == RepairFlag::Repair;
        self.add_temp_root(&info.path)?;
        let (tmp_real, old) = self.temp_names_for(&info.path);
        let leftovers = || tmp_real.symlink_metadata().is_ok() || old.symlink_metadata().is_ok();
        if !repair && self.is_valid_path(&info.path)? && !leftovers() {
            return Ok(());
        }
        let real = self.real_path(&info.path);
        let mut locks = PathLocks::lock(&BTreeSet::from([real.clone()]))?;
        let valid = self.is_valid_path(&info.path)?;
        // Leftovers of a process killed while it held this lock: a partial new
        // copy goes; an old copy moved aside by a repair goes back if it is all
        // there is (killed between the two renames), else goes too.
        remove_tree(&tmp_real)?;
        if std::fs::symlink_metadata(&old).is_ok() {
            if valid && std::fs::symlink_metadata(&real).is_err() {
                std::fs::rename(&old, &real).map_err(StoreError::io("moving back", &old))?;
            } else {
                remove_tree(&old)?;
            }
        }
        if valid && !repair {
            return Ok(());
        }
        if !valid {
            remove_tree(&real)?;
        }
        let r = (|| {
            write(&tmp_real)?;
            canonicalise_path_meta_data(&tmp_real, None)?;
            if valid {
                // Move the old copy aside first: a directory cannot be renamed
                // over a non-empty one.
                match std::fs::rename(&real, &old) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io("moving aside", &real)(e)),
                }
                if let Err(e) = std::fs::rename(&tmp_real, &real) {
                    let _ = std::fs::rename(&old, &real);
                    return Err(StoreError::io("renaming into place", &real)(e));
                }
                remove_tree(&old)
            } else {
                std::fs::rename(&tmp_real, &real)
                    .map_err(StoreError::io("renaming into place", &real))
            }
        })();
        if let Err(e) = r {
            let _ = remove_tree(&tmp_real);
            return Err(e);
        }
        self.optimise_path(
            &real,
            if repair {
                RepairFlag::Repair
            } else {
                RepairFlag::NoRepair
            },
        )?;
        self.register_valid_paths(std::slice::from_ref(info))?;
        locks.set_deletion(true);
        Ok(())
    }

    /// Adds a text file (`builtins.toFile`, `.drv` files): ca `text:sha256:…`.
    pub fn add_text_to_store(
        &self,
        name: &str,
        contents: &[u8],
        references: &StorePathSet,
    ) -> Result<StorePath, StoreError> {
        let path = self.store_dir.text_path_of(name, contents, references)?;
        let mut sink = crate::hash::HashSink::new(HashAlgo::Sha256);
        nar::dump_bytes(contents, &mut sink)
            .map_err(StoreError::io("hashing", self.real_path(&path)))?;
        let (nar_hash, nar_size) = sink.finish();
        let mut info = ValidPathInfo::new(path.clone(), nar_hash, nar_size);
        info.references = references.clone();
        info.ca = Some(ContentAddress::Text(HashAlgo::Sha256.digest(contents)));
        self.add_object(&info, |tmp| {
            std::fs::write(tmp, contents).map_err(StoreError::io("writing", tmp))
        })?;
        Ok(path)
    }

    /// Adds a file or tree recursively (`nix-store --add`): ca `fixed:r:sha256:…`.
    pub fn add_path_to_store(&self, src: &Path, name: &str) -> Result<StorePath, StoreError> {
        let (nar_hash, nar_size) = nar::nar_hash_of_path(src)?;
        let path = self.store_dir.make_fixed_output_path(
            FileIngestionMethod::Recursive,
            &nar_hash,
            name,
            &StorePathSet::new(),
            false,
        )?;
        let mut info = ValidPathInfo::new(path.clone(), nar_hash.clone(), nar_size);
        info.ca = Some(ContentAddress::Fixed(
            FileIngestionMethod::Recursive,
            nar_hash.clone(),
        ));
        self.add_object(&info, |tmp| {
            copy_tree(src, tmp)?;
            let (h, _) = nar::nar_hash_of_path(tmp)?;
            if h != nar_hash {
                return Err(StoreError::Io {
                    context: "source changed while being added",
                    path: src.to_owned(),
                    source: std::io::ErrorKind::InvalidData.into(),
                });
            }
            Ok(())
        })?;
        Ok(path)
    }
}

/// Deletes a tree, making directories writable first; a missing path is fine.
fn remove_tree(p: &Path) -> Result<(), StoreError> {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("getting attributes of", p)(e)),
    };
    if meta.is_dir() {
        chmod(p, 0o755)?;
        for e in std::fs::read_dir(p).map_err(StoreError::io("reading directory", p))? {
            let e = e.map_err(StoreError::io("reading directory", p))?;
            remove_tree(&e.path())?;
        }
        std::fs::remove_dir(p).map_err(StoreError::io("removing", p))
    } else {
        std::fs::remove_file(p).map_err(StoreError::io("removing", p))
    }
}

/// Copies a tree: regular files (keeping the owner-executable bit), directories and
/// symlinks (not followed).
fn copy_tree(src: &Path, dst: &Path) -> Result<(), StoreError> {
    let meta =
        std::fs::symlink_metadata(src).map_err(StoreError::io("getting attributes of", src))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(src).map_err(StoreError::io("reading symlink", src))?;
        std::os::unix::fs::symlink(target, dst).map_err(StoreError::io("creating symlink", dst))
    } else if ft.is_file() {
        std::fs::copy(src, dst).map_err(StoreError::io("copying", src))?;
        let mode = if meta.permissions().mode() & 0o100 != 0 {
            0o755
        } else {
            0o644
        };
        chmod(dst, mode)
    } else if ft.is_dir() {
        std::fs::create_dir(dst).map_err(StoreError::io("creating directory", dst))?;
        for e in std::fs::read_dir(src).map_err(StoreError::io("reading directory", src))? {
            let e = e.map_err(StoreError::io("reading directory", src))?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        Ok(())
    } else {
        Err(StoreError::UnsupportedFile(src.to_owned()))
    }
}

/// The recursive query of [`LocalStore::compute_closure`] for `seeds` seed paths.
///
/// Both joins are `cross join`s, which SQLite never reorders: the rows found so far
/// drive lookups by key in `Refs` and `ValidPaths`. With a plain `join` (and no
/// `analyze` statistics, as in every Nix store) SQLite 3.46 chose to scan the whole
/// `ValidPaths` index against an automatic index on the closure, so each build's
/// closure cost grew with the size of the store.
fn closure_sql(seeds: usize) -> String {
    format!(
        "with recursive closure(id) as (\
         select id from ValidPaths where path in ({}) \
         union select Refs.reference from closure cross join Refs on Refs.referrer = closure.id) \
         select ValidPaths.path from closure cross join ValidPaths on ValidPaths.id = closure.id",
        placeholders(seeds)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> LocalStore {
        let settings = Settings::for_root(dir, "experimental-features = ca-derivations\n").unwrap();
        LocalStore::open(&settings).unwrap()
    }

    fn info(s: &LocalStore, name: &str, refs: &[&StorePath]) -> ValidPathInfo {
        let p = s
            .store_dir()
            .make_store_path("output:out", &HashAlgo::Sha256.digest(name), name)
            .unwrap();
        let mut i = ValidPathInfo::new(p, HashAlgo::Sha256.digest(name), 8);
        i.references = refs.iter().map(|r| (*r).clone()).collect();
        i
    }

    /// What a process killed while holding a path's lock left (a partial new copy,
    /// an old copy moved aside by a repair) is cleaned up by the next process to
    /// take the lock, whether it then writes the path or finds it valid.
    #[test]
    fn leftovers_of_a_killed_writer_are_removed_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let write = |text: &'static str| {
            move |tmp: &Path| std::fs::write(tmp, text).map_err(StoreError::io("writing", tmp))
        };
        let i = info(&s, "fresh", &[]);
        let (tmp, old) = s.temp_names_for(&i.path);
        assert_eq!(
            tmp.file_name().unwrap().to_str().unwrap(),
            format!("{}.drover-tmp", i.path)
        );
        // killed while unpacking: a partial tree at the temporary name
        std::fs::create_dir_all(tmp.join("half/way")).unwrap();
        std::fs::write(tmp.join("half/way/f"), "x").unwrap();
        s.add_object(&i, write("whole")).unwrap();
        assert!(!tmp.exists());
        assert_eq!(
            std::fs::read_to_string(s.real_path(&i.path)).unwrap(),
            "whole"
        );
        // killed during a repair, between moving the old copy aside and the rename:
        // the old copy is all there is, and it goes back
        let real = s.real_path(&i.path);
        std::fs::rename(&real, &old).unwrap();
        std::fs::write(&tmp, "partial").unwrap();
        s.add_object(&i, write("unused")).unwrap();
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "whole");
        assert!(!tmp.exists() && !old.exists());
        // a stale old copy beside a present one just goes
        std::fs::write(&old, "stale").unwrap();
        s.add_object(&i, write("unused")).unwrap();
        assert!(!old.exists());
    }

    #[test]
    fn repair_replaces_a_valid_object_and_a_failed_repair_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let i = info(&s, "repaired", &[]);
        let real = s.real_path(&i.path);
        let write = |text: &'static str| {
            move |tmp: &Path| std::fs::write(tmp, text).map_err(StoreError::io("writing", tmp))
        };
        s.add_object(&i, write("good")).unwrap();
        // Without repair a valid path is left alone.
        s.add_object(&i, write("other")).unwrap();
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "good");
        // A failed repair leaves the old copy in place.
        let fail = |tmp: &Path| -> Result<(), StoreError> {
            std::fs::write(tmp, "half").unwrap();
            Err(StoreError::InvalidPath("broken".into()))
        };
        assert!(s.add_object_with(&i, RepairFlag::Repair, fail).is_err());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "good");
        // A repair replaces it.
        s.add_object_with(&i, RepairFlag::Repair, write("fixed"))
            .unwrap();
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "fixed");
        assert!(s.is_valid_path(&i.path).unwrap());
        let left: Vec<_> = std::fs::read_dir(s.store_dir().as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("drover-tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn paths_and_realisations_are_signed_with_every_secret_key_file() {
        use crate::signature::PublicKeys;
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = (
            SecretKey::from_seed("k1", &[1; 32]).unwrap(),
            SecretKey::from_seed("k2", &[2; 32]).unwrap(),
        );
        let (f1, f2) = (dir.path().join("k1"), dir.path().join("k2"));
        std::fs::write(&f1, k1.to_key_file()).unwrap();
        std::fs::write(&f2, k2.to_key_file()).unwrap();
        let conf = format!(
            "experimental-features = ca-derivations\nsecret-key-files = {} {}\n",
            f1.display(),
            f2.display()
        );
        let s = LocalStore::open(&Settings::for_root(dir.path(), &conf).unwrap()).unwrap();
        let mut i = info(&s, "a", &[]);
        s.sign_path_info(&mut i).unwrap();
        assert_eq!(i.sigs.len(), 2);
        let fp = fingerprint_path(
            s.store_dir(),
            &i.path,
            &i.nar_hash,
            i.nar_size,
            &i.references,
        );
        let mut keys = PublicKeys::new();
        keys.insert(k1.to_public_key());
        keys.insert(k2.to_public_key());
        for sig in &i.sigs {
            assert!(keys.verify(fp.as_bytes(), sig).unwrap(), "{sig}");
        }
        let mut r = Realisation {
            id: DrvOutput {
                drv_hash: HashAlgo::Sha256.digest("drv"),
                output: "out".into(),
            },
            out_path: i.path.clone(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        };
        s.sign_realisation(&mut r).unwrap();
        assert_eq!(r.signatures.len(), 2);
        // a key file that is missing or corrupt is an error naming the file
        std::fs::write(&f2, "k2:not base64!").unwrap();
        let err = s.sign_path_info(&mut i).unwrap_err().to_string();
        assert!(err.contains(&f2.display().to_string()), "{err}");
        std::fs::remove_file(&f1).unwrap();
        let err = s.sign_realisation(&mut r).unwrap_err().to_string();
        assert!(err.contains("opening file"), "{err}");
    }

    #[test]
    fn registering_a_drv_records_its_outputs() {
        use crate::derivation::{json, DerivationError, DrvHash};
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let sd = s.store_dir().clone();
        let v: serde_json::Value = serde_json::from_str(
            r#"{"outputs":{"out":{},"dev":{}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux",
                "builder":"/bin/sh","args":[],"env":{"name":"t","out":"","dev":""}}"#,
        )
        .unwrap();
        let no_inputs = |_: &StorePath| -> Result<DrvHash, DerivationError> {
            Err(DerivationError::Cycle("no inputs".into()))
        };
        let (drv_path, drv) = json::from_json_with_paths(&v, &sd, no_inputs).unwrap();
        let aterm = drv.to_aterm_bytes(&sd);
        let added = s
            .add_text_to_store("t.drv", &aterm, &drv.drv_references())
            .unwrap();
        assert_eq!(added, drv_path);
        let outputs = s.query_derivation_outputs(&drv_path).unwrap();
        assert_eq!(outputs.len(), 2);
        assert_eq!(Some(&outputs["dev"]), drv.outputs["dev"].path());

        // A `.drv` whose output path is not the one it implies is refused.
        let good = sd.print(drv.outputs["out"].path().unwrap());
        let wrong = good.replacen(&good[good.len() - 34..good.len() - 2], &"0".repeat(32), 1);
        let tampered = String::from_utf8(aterm).unwrap().replace(&good, &wrong);
        let e = s
            .add_text_to_store("t.drv", tampered.as_bytes(), &drv.drv_references())
            .unwrap_err();
        assert!(matches!(e, StoreError::BadDerivation { .. }), "{e}");
    }

    #[test]
    fn closures_of_deep_chains_diamonds_and_several_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        // chain0 <- chain1 <- ... <- chain59, each also referring to itself; a
        // diamond top -> {left, right} -> chain59; and an unrelated path.
        let mut infos: Vec<ValidPathInfo> = Vec::new();
        for i in 0..60 {
            let prev: Vec<StorePath> = infos.last().map(|p| p.path.clone()).into_iter().collect();
            let mut inf = info(&s, &format!("chain{i}"), &prev.iter().collect::<Vec<_>>());
            inf.references.insert(inf.path.clone());
            infos.push(inf);
        }
        let bottom = infos[59].path.clone();
        let left = info(&s, "left", &[&bottom]);
        let right = info(&s, "right", &[&bottom]);
        let top = info(&s, "top", &[&left.path, &right.path]);
        let alone = info(&s, "alone", &[]);
        infos.extend([left.clone(), right.clone(), top.clone(), alone.clone()]);
        s.register_valid_paths(&infos).unwrap();
        let chain: StorePathSet = infos[..60].iter().map(|i| i.path.clone()).collect();
        let mut want = chain.clone();
        want.extend([left.path.clone(), right.path.clone(), top.path.clone()]);
        assert_eq!(
            s.compute_closure(std::slice::from_ref(&top.path)).unwrap(),
            want
        );
        assert_eq!(
            s.compute_closure(std::slice::from_ref(&bottom)).unwrap(),
            chain
        );
        want.insert(alone.path.clone());
        assert_eq!(
            s.compute_closure(&[alone.path.clone(), top.path.clone(), bottom.clone()])
                .unwrap(),
            want
        );
        assert!(s.compute_closure(&[]).unwrap().is_empty());
        // an invalid seed is an error naming it
        let bad = info(&s, "not-registered", &[]);
        assert!(matches!(
            s.compute_closure(&[top.path.clone(), bad.path.clone()]),
            Err(StoreError::InvalidPath(p)) if p.ends_with("not-registered")
        ));
    }

    /// The closure query walks indices only: no step of its plan scans `ValidPaths`
    /// or `Refs`, whose size is the store's (a scan per build made a run's cost
    /// grow with the square of its builds).
    #[test]
    fn closure_query_plan_scans_no_table() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut infos: Vec<ValidPathInfo> = Vec::new();
        for i in 0..200 {
            let prev: Vec<StorePath> = infos.iter().rev().take(3).map(|p| p.path.clone()).collect();
            infos.push(info(&s, &format!("p{i}"), &prev.iter().collect::<Vec<_>>()));
        }
        s.register_valid_paths(&infos).unwrap();
        for seeds in [1, 3, 16] {
            let sql = closure_sql(seeds);
            let mut db = s.db();
            let mut st = db
                .conn()
                .prepare(&format!("explain query plan {sql}"))
                .unwrap();
            let args: Vec<String> = infos.iter().take(seeds).map(|i| s.print(&i.path)).collect();
            let plan: Vec<String> = st
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    r.get::<_, String>(3)
                })
                .unwrap()
                .map(Result::unwrap)
                .collect();
            for step in &plan {
                assert!(
                    !step.starts_with("SCAN ValidPaths") && !step.starts_with("SCAN Refs"),
                    "{seeds} seeds: a table scan in the closure query: {plan:?}"
                );
            }
        }
    }

    #[test]
    fn a_wiped_store_is_reopened_empty_as_a_new_opener_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::for_root(dir.path(), "").unwrap();
        let s = LocalStore::open(&settings).unwrap();
        let p = s
            .add_text_to_store("t", b"text", &Default::default())
            .unwrap();
        assert!(s.is_valid_path(&p).unwrap());
        assert!(!s.reopen_if_replaced(&settings).unwrap(), "nothing changed");
        // A removed profiles directory is made again (the tests' `clearProfiles`).
        std::fs::remove_dir_all(s.state_dir().join("profiles")).unwrap();
        assert!(!s.reopen_if_replaced(&settings).unwrap());
        assert!(s.state_dir().join("profiles/per-user").is_dir());
        // As Nix's tests' `clearStore` does while a daemon runs.
        let real = s.store_dir().as_path().to_owned();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(s.real_path(&p), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::remove_dir_all(&real).unwrap();
        std::fs::remove_dir_all(s.state_dir()).unwrap();
        std::fs::create_dir(&real).unwrap();
        std::fs::create_dir(s.state_dir()).unwrap();
        assert!(s.reopen_if_replaced(&settings).unwrap());
        // What a fresh opener (a nix-daemon connection) sees: an empty store.
        assert!(!s.is_valid_path(&p).unwrap());
        assert!(s.state_dir().join("db/db.sqlite").exists());
        assert!(real.join(".links").is_dir());
        let again = s
            .add_text_to_store("t", b"text", &Default::default())
            .unwrap();
        assert_eq!(again, p);
        let fresh = LocalStore::open(&settings).unwrap();
        assert!(fresh.is_valid_path(&p).unwrap());
        assert!(!s.reopen_if_replaced(&settings).unwrap());
    }

    #[test]
    fn drv_hashes_are_memoised_for_the_store() {
        use crate::derivation::{json, DerivationError, DrvHash};
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let sd = s.store_dir().clone();
        let v: serde_json::Value = serde_json::from_str(
            r#"{"outputs":{"out":{}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux",
                "builder":"/bin/sh","args":[],"env":{"name":"m","out":""}}"#,
        )
        .unwrap();
        let no_inputs = |_: &StorePath| -> Result<DrvHash, DerivationError> {
            Err(DerivationError::Cycle("no inputs".into()))
        };
        let (drv_path, drv) = json::from_json_with_paths(&v, &sd, no_inputs).unwrap();
        let added = s
            .add_text_to_store("m.drv", &drv.to_aterm_bytes(&sd), &drv.drv_references())
            .unwrap();
        assert_eq!(added, drv_path);
        let first = s.drv_hash(&drv_path).unwrap();
        assert_eq!(
            first,
            drv.hash_derivation_modulo(&sd, false, no_inputs).unwrap()
        );
        // Memoised: answered without reading the file again (now unreadable).
        let real = s.real_path(&drv_path);
        std::fs::set_permissions(
            real.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::remove_file(&real).unwrap();
        assert_eq!(s.drv_hash(&drv_path).unwrap(), first);
        // A derivation never read is an error naming the file.
        let other = sd
            .make_store_path("text", &HashAlgo::Sha256.digest("x"), "x.drv")
            .unwrap();
        assert!(s.drv_hash(&other).is_err());
    }

    #[test]
    fn sync_before_registering_syncs_once_per_registration() {
        for (conf, syncs) in [("", 0), ("sync-before-registering = true\n", 1)] {
            let dir = tempfile::tempdir().unwrap();
            let settings = Settings::for_root(dir.path(), conf).unwrap();
            let s = LocalStore::open(&settings).unwrap();
            let a = info(&s, "a", &[]);
            s.register_valid_paths(std::slice::from_ref(&a)).unwrap();
            assert!(s.is_valid_path(&a.path).unwrap());
            assert_eq!(s.syncs_before_registering(), syncs, "{conf:?}");
        }
    }

    #[test]
    fn drv_output_references_are_the_referenced_input_realisations() {
        use crate::derivation::json;
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let sd = s.store_dir().clone();
        let mut cache = DrvHashCache::new();
        let mut add = |v: serde_json::Value| {
            let read = |q: &StorePath| s.read_derivation(q).map(Arc::new);
            let (p, d) = json::from_json_with_paths(&v, &sd, |q: &StorePath| {
                cache.hash_of::<_, StoreError>(&sd, q, read)
            })
            .unwrap();
            s.add_text_to_store(p.name(), &d.to_aterm_bytes(&sd), &d.drv_references())
                .unwrap();
            (p, d)
        };
        let (a_path, a) = add(
            serde_json::json!({"outputs":{"out":{}},"inputSrcs":[],"inputDrvs":{},
            "system":"x86_64-linux","builder":"/bin/sh","args":[],"env":{"name":"a","out":""}}),
        );
        let (_, b) = add(serde_json::json!({"outputs":{"out":{}},"inputSrcs":[],
            "inputDrvs":{sd.print(&a_path): ["out"]},
            "system":"x86_64-linux","builder":"/bin/sh","args":[],"env":{"name":"b","out":""}}));
        let a_out = a.outputs["out"].path().unwrap().clone();
        let mut a_info = info(&s, "a", &[]);
        a_info.path = a_out.clone();
        s.register_valid_paths(&[a_info]).unwrap();
        let uses_a = info(&s, "uses-a", &[&a_out]);
        let alone = info(&s, "alone", &[]);
        s.register_valid_paths(&[uses_a.clone(), alone.clone()])
            .unwrap();
        // the input's output has no realisation yet
        let e = s.drv_output_references(&b, &uses_a.path).unwrap_err();
        assert!(matches!(e, StoreError::UnbuiltInputOutput { .. }), "{e}");
        let a_id = crate::build::drv_output_ids(&s, &a).unwrap()["out"].clone();
        s.register_realisation(&Realisation {
            id: a_id.clone(),
            out_path: a_out.clone(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(
            s.drv_output_references(&b, &uses_a.path).unwrap(),
            BTreeMap::from([(a_id, a_out)])
        );
        // an output that does not refer to the input depends on no realisation
        assert!(s.drv_output_references(&b, &alone.path).unwrap().is_empty());
    }

    #[test]
    fn all_valid_paths_hash_parts_and_added_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = info(&s, "a", &[]);
        let b = info(&s, "b", &[]);
        s.register_valid_paths(&[a.clone(), b.clone()]).unwrap();
        let all = s.query_all_valid_paths().unwrap();
        assert_eq!(all, StorePathSet::from([a.path.clone(), b.path.clone()]));
        assert_eq!(
            s.query_path_from_hash_part(a.path.hash_part()).unwrap(),
            Some(a.path.clone())
        );
        assert_eq!(
            s.query_path_from_hash_part("00000000000000000000000000000000")
                .unwrap(),
            None
        );
        assert_eq!(s.query_path_from_hash_part("short").unwrap(), None);
        s.add_signatures(&a.path, &BTreeSet::from(["k:x".to_owned()]))
            .unwrap();
        s.add_signatures(
            &a.path,
            &BTreeSet::from(["j:y".to_owned(), "k:x".to_owned()]),
        )
        .unwrap();
        let got = s.query_path_info(&a.path).unwrap().unwrap().sigs;
        assert_eq!(got, BTreeSet::from(["j:y".to_owned(), "k:x".to_owned()]));
        let missing = StorePath::from_base_name("00000000000000000000000000000000-x").unwrap();
        assert!(matches!(
            s.add_signatures(&missing, &BTreeSet::new()),
            Err(StoreError::InvalidPath(_))
        ));
    }

    #[test]
    fn register_query_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("var/nix/db/schema")).unwrap(),
            "10"
        );
        let a = info(&s, "a", &[]);
        let mut b = info(&s, "b", &[&a.path]);
        b.references.insert(b.path.clone()); // self-reference is fine
        let c = info(&s, "c", &[&b.path]);
        // Explicit rows for a deriver that is not a `.drv` (a real `.drv` would be
        // read and checked; see `registering_a_drv_records_its_outputs`).
        let drv = info(&s, "c-deriver", &[]);
        s.register_valid_paths_with_outputs(
            &[c.clone(), b.clone(), a.clone(), drv.clone()],
            &[(drv.path.clone(), "out".into(), c.path.clone())],
        )
        .unwrap();
        let got = s.query_path_info(&b.path).unwrap().unwrap();
        assert_eq!(got.references, b.references);
        assert_eq!(got.nar_size, 8);
        assert!(got.registration_time > 0);
        assert_eq!(
            s.compute_closure(std::slice::from_ref(&c.path)).unwrap(),
            [a.path.clone(), b.path.clone(), c.path.clone()]
                .into_iter()
                .collect()
        );
        assert_eq!(
            s.query_referrers(&a.path).unwrap(),
            [b.path.clone()].into_iter().collect()
        );
        assert_eq!(
            s.query_derivation_outputs(&drv.path).unwrap()["out"],
            c.path
        );
        assert_eq!(
            s.query_valid_derivers(&c.path).unwrap(),
            [drv.path.clone()].into_iter().collect()
        );
        let missing = info(&s, "missing", &[]);
        let valid = s
            .query_valid_paths(&[a.path.clone(), missing.path.clone(), c.path.clone()])
            .unwrap();
        assert_eq!(
            valid,
            [a.path.clone(), c.path.clone()].into_iter().collect()
        );
        assert!(matches!(
            s.compute_closure(std::slice::from_ref(&missing.path)),
            Err(StoreError::InvalidPath(_))
        ));
        // a reference to an invalid path rolls the whole registration back
        let d = info(&s, "d", &[&missing.path]);
        let e = info(&s, "e", &[]);
        assert!(matches!(
            s.register_valid_paths(&[e.clone(), d]),
            Err(StoreError::MissingReference { .. })
        ));
        assert!(!s.is_valid_path(&e.path).unwrap());
    }

    #[test]
    fn cycles_and_false_ca_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut x = info(&s, "x", &[]);
        let y = info(&s, "y", &[&x.path]);
        x.references.insert(y.path.clone());
        assert!(matches!(
            s.register_valid_paths(&[x, y]),
            Err(StoreError::Cycle { .. })
        ));
        let mut z = info(&s, "z", &[]);
        z.ca = Some(ContentAddress::Text(HashAlgo::Sha256.digest(b"z")));
        assert!(matches!(
            s.register_valid_paths(&[z]),
            Err(StoreError::CaMismatch(_))
        ));
    }

    #[test]
    fn realisations_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = info(&s, "a", &[]);
        let b = info(&s, "b", &[&a.path]);
        s.register_valid_paths(&[a.clone(), b.clone()]).unwrap();
        let ida = DrvOutput {
            drv_hash: HashAlgo::Sha256.digest(b"drv a"),
            output: "out".into(),
        };
        let idb = DrvOutput {
            drv_hash: HashAlgo::Sha256.digest(b"drv b"),
            output: "out".into(),
        };
        let ra = Realisation {
            id: ida.clone(),
            out_path: a.path.clone(),
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        };
        let mut rb = Realisation {
            id: idb.clone(),
            out_path: b.path.clone(),
            signatures: ["k:1".to_string()].into_iter().collect(),
            dependent_realisations: [(ida.clone(), a.path.clone())].into_iter().collect(),
        };
        assert!(matches!(
            s.register_realisation(&rb),
            Err(StoreError::BadDependentRealisation { .. })
        ));
        s.register_realisation(&ra).unwrap();
        s.register_realisation(&rb).unwrap();
        rb.signatures = ["k:2".to_string()].into_iter().collect();
        s.register_realisation(&rb).unwrap();
        let got = s.query_realisation(&idb).unwrap().unwrap();
        assert_eq!(got.out_path, b.path);
        assert_eq!(got.signatures.len(), 2);
        assert_eq!(got.dependent_realisations, rb.dependent_realisations);
        assert_eq!(s.query_realisation(&ida).unwrap().unwrap(), ra);
        let conflict = Realisation {
            out_path: b.path.clone(),
            ..ra.clone()
        };
        assert!(matches!(
            s.register_realisation(&conflict),
            Err(StoreError::RealisationConflict { .. })
        ));
    }

    #[test]
    fn add_text_and_tree() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let t = s
            .add_text_to_store("foo", b"bar", &StorePathSet::new())
            .unwrap();
        assert_eq!(
            t,
            s.store_dir()
                .text_path_of("foo", b"bar", &StorePathSet::new())
                .unwrap()
        );
        assert_eq!(std::fs::read(s.real_path(&t)).unwrap(), b"bar");
        let info = s.query_path_info(&t).unwrap().unwrap();
        assert!(info.ca.unwrap().to_string().starts_with("text:sha256:"));
        // again: no-op
        assert_eq!(
            s.add_text_to_store("foo", b"bar", &StorePathSet::new())
                .unwrap(),
            t
        );
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"x").unwrap();
        let p = s.add_path_to_store(&src, "src").unwrap();
        let real = s.real_path(&p);
        assert_eq!(std::fs::read(real.join("f")).unwrap(), b"x");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o7777, 0o555);
        assert_eq!(std::fs::metadata(real.join("f")).unwrap().mtime(), 1);
        // no temporary leftovers, lock file deleted
        let names: Vec<String> = std::fs::read_dir(s.store_dir().as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.contains("drover-tmp") && !n.ends_with(".lock")),
            "{names:?}"
        );
        // make the test dir removable
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
