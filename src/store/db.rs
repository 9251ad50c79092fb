//! The store database, `<state dir>/db/db.sqlite`, opened as Nix 2.8 opens it.
//!
//! * `db/reserved`: a file of `gc-reserved-space` bytes (8 MiB), mode 0600, that the
//!   garbage collector can free when the disk is full.
//! * `db/big-lock`: `flock`ed shared while the store is open; exclusive only while
//!   the schema is created or upgraded.
//! * `db/schema` holds `10`; absent means a new store, which gets [`SCHEMA`]. Older
//!   versions are not upgraded by drover (run Nix once); newer ones are refused.
//! * `db/ca-schema` holds `3` once the CA tables ([`CA_SCHEMA`]) exist; as in Nix,
//!   they are only created when `ca-derivations` is enabled.
//! * Connection: busy timeout of one hour, `foreign_keys = 1`, `synchronous = normal`
//!   (`off` when `fsync-metadata = false`), `journal_mode = wal` (only set when not
//!   already; `truncate` when `use-sqlite-wal = false`), `wal_autocheckpoint = 40000`.
//!
//! [`StoreDb::retry`] re-runs an operation that failed with `SQLITE_BUSY` (e.g. a
//! read transaction that could not be upgraded while Nix was writing).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::locks::{lock_fd, open_lock_file, LockType};
use super::schema::{CA_SCHEMA, NIX_CA_SCHEMA_VERSION, NIX_SCHEMA_VERSION, SCHEMA};
use super::StoreError;
use crate::config::Settings;

/// An open store database holding the shared `big-lock`.
pub struct StoreDb {
    conn: Connection,
    db_dir: PathBuf,
    _big_lock: File,
    has_ca: bool,
    /// The (device, inode) of `db.sqlite` as opened.
    file_id: Option<(u64, u64)>,
}

impl std::fmt::Debug for StoreDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreDb")
            .field("db_dir", &self.db_dir)
            .finish()
    }
}

/// Reads a `schema`/`ca-schema` file: 0 when absent.
pub fn read_schema_file(path: &Path) -> Result<u32, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim_end_matches('\n')
            .parse()
            .map_err(|_| StoreError::CorruptSchemaFile(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::io("reading", path)(e)),
    }
}

fn lock_big(file: &File, ty: LockType, path: &Path) -> Result<(), StoreError> {
    let err = |e| StoreError::io("locking", path)(e);
    if !lock_fd(file, ty, false).map_err(err)? {
        log::info!("waiting for the big Nix store lock...");
        while !lock_fd(file, ty, true).map_err(err)? {}
    }
    Ok(())
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    ) || matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == 15 /* SQLITE_PROTOCOL */)
}

impl StoreDb {
    /// Opens (creating when absent) the database in `db_dir`, following `settings`.
    pub fn open(db_dir: &Path, settings: &Settings) -> Result<StoreDb, StoreError> {
        std::fs::create_dir_all(db_dir).map_err(StoreError::io("creating", db_dir))?;
        Self::reserve_space(&db_dir.join("reserved"), settings.gc_reserved_space());

        let big_lock_path = db_dir.join("big-lock");
        let big_lock = open_lock_file(&big_lock_path, true)?.ok_or_else(|| {
            StoreError::io("opening", &big_lock_path)(std::io::ErrorKind::NotFound.into())
        })?;
        lock_big(&big_lock, LockType::Read, &big_lock_path)?;

        let schema_path = db_dir.join("schema");
        let mut cur = read_schema_file(&schema_path)?;
        if cur > NIX_SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: cur,
                supported: NIX_SCHEMA_VERSION,
            });
        }
        if cur != 0 && cur < NIX_SCHEMA_VERSION {
            return Err(StoreError::SchemaTooOld {
                found: cur,
                supported: NIX_SCHEMA_VERSION,
            });
        }
        let create = cur == 0;
        if create {
            // Creating the schema: exclude other openers as a schema upgrade would.
            lock_big(&big_lock, LockType::Write, &big_lock_path)?;
            cur = read_schema_file(&schema_path)?;
        }
        let conn = Self::connect(db_dir, settings, cur == 0)?;
        if cur == 0 {
            conn.execute_batch(SCHEMA)
                .map_err(StoreError::sql("creating the database schema"))?;
            std::fs::write(&schema_path, NIX_SCHEMA_VERSION.to_string())
                .map_err(StoreError::io("writing", &schema_path))?;
        }
        if create {
            lock_big(&big_lock, LockType::Read, &big_lock_path)?;
        }

        if settings.is_experimental_feature_enabled("ca-derivations") {
            Self::migrate_ca_schema(&conn, db_dir, &big_lock, &big_lock_path)?;
        }
        let has_ca = conn
            .query_row(
                "select count(*) from sqlite_master where type = 'table' and name = 'Realisations'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(StoreError::sql("checking for the CA schema"))?
            > 0;
        Ok(StoreDb {
            conn,
            db_dir: db_dir.to_owned(),
            _big_lock: big_lock,
            has_ca,
            file_id: Self::file_id_of(db_dir),
        })
    }

    fn file_id_of(db_dir: &Path) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(db_dir.join("db.sqlite")).ok()?;
        Some((m.dev(), m.ino()))
    }

    /// Whether `db.sqlite` is no longer the file this handle opened (deleted,
    /// or replaced by another database).
    pub fn replaced(&self) -> bool {
        Self::file_id_of(&self.db_dir) != self.file_id
    }

    fn reserve_space(path: &Path, size: u64) {
        let ok = std::fs::metadata(path).is_ok_and(|m| m.len() == size);
        if ok {
            return;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .and_then(|f| {
                let len = nix::libc::off_t::try_from(size).unwrap_or(nix::libc::off_t::MAX);
                nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, len)
                    .map_err(std::io::Error::from)
                    .or_else(|_| f.set_len(size))
            });
        if let Err(e) = r {
            log::debug!("cannot reserve space in '{}': {e}", path.display());
        }
    }

    fn connect(db_dir: &Path, settings: &Settings, create: bool) -> Result<Connection, StoreError> {
        nix::unistd::access(
            db_dir,
            nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
        )
        .map_err(|e| StoreError::io("Nix database directory is not writable", db_dir)(e.into()))?;
        let db_path = db_dir.join("db.sqlite");
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let ctx = |what: &str| format!("{what} '{}'", db_path.display());
        let conn = if settings.use_sqlite_wal() {
            Connection::open_with_flags(&db_path, flags)
        } else {
            Connection::open_with_flags_and_vfs(&db_path, flags, "unix-dotfile")
        }
        .map_err(StoreError::sql(ctx("opening")))?;
        conn.busy_timeout(Duration::from_secs(60 * 60))
            .map_err(StoreError::sql(ctx("setting the busy timeout of")))?;
        conn.execute_batch("pragma foreign_keys = 1")
            .map_err(StoreError::sql(ctx("enabling foreign keys in")))?;
        let sync = if settings.fsync_metadata() {
            "normal"
        } else {
            "off"
        };
        conn.execute_batch(&format!("pragma synchronous = {sync}"))
            .map_err(StoreError::sql(ctx("setting synchronous mode of")))?;
        let mode = if settings.use_sqlite_wal() {
            "wal"
        } else {
            "truncate"
        };
        let prev: String = conn
            .query_row("pragma main.journal_mode;", [], |r| r.get(0))
            .map_err(StoreError::sql(ctx("querying the journal mode of")))?;
        if prev != mode {
            conn.query_row(&format!("pragma main.journal_mode = {mode};"), [], |_| {
                Ok(())
            })
            .map_err(StoreError::sql(ctx("setting the journal mode of")))?;
        }
        if mode == "wal" {
            conn.query_row("pragma wal_autocheckpoint = 40000;", [], |_| Ok(()))
                .map_err(StoreError::sql(ctx(
                    "setting the autocheckpoint interval of",
                )))?;
        }
        Ok(conn)
    }

    fn migrate_ca_schema(
        conn: &Connection,
        db_dir: &Path,
        big_lock: &File,
        big_lock_path: &Path,
    ) -> Result<(), StoreError> {
        let path = db_dir.join("ca-schema");
        let cur = read_schema_file(&path)?;
        if cur == NIX_CA_SCHEMA_VERSION {
            return Ok(());
        }
        if cur > NIX_CA_SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: cur,
                supported: NIX_CA_SCHEMA_VERSION,
            });
        }
        lock_big(big_lock, LockType::Write, big_lock_path)?;
        let cur = read_schema_file(&path)?;
        if cur != NIX_CA_SCHEMA_VERSION {
            if cur != 0 {
                return Err(StoreError::SchemaTooOld {
                    found: cur,
                    supported: NIX_CA_SCHEMA_VERSION,
                });
            }
            conn.execute_batch(CA_SCHEMA)
                .map_err(StoreError::sql("creating the CA schema"))?;
            std::fs::write(&path, NIX_CA_SCHEMA_VERSION.to_string())
                .map_err(StoreError::io("writing", &path))?;
        }
        lock_big(big_lock, LockType::Read, big_lock_path)
    }

    /// Whether the Realisations tables exist.
    pub fn has_ca_schema(&self) -> bool {
        self.has_ca
    }

    /// The connection, for queries.
    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Runs `f`, re-running it while SQLite reports the database busy (as Nix's
    /// `retrySQLite`). Errors other than busy are returned.
    pub fn retry<T>(
        &mut self,
        context: &str,
        mut f: impl FnMut(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt: u32 = 0;
        loop {
            match f(&mut self.conn) {
                Err(StoreError::Sqlite { source, .. }) if is_busy(&source) => {
                    attempt += 1;
                    if attempt % 100 == 1 {
                        log::warn!("SQLite database is busy while {context}; retrying");
                    }
                    // a little jitter so that two retrying writers drift apart
                    let jitter = u64::from(std::process::id() % 7) + u64::from(attempt % 13);
                    std::thread::sleep(Duration::from_millis(5 + jitter));
                }
                r => return r,
            }
        }
    }
}
