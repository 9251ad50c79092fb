//! drover's build history: one row per finished build in
//! `$NIX_STATE_DIR/drover/build-history.sqlite`, a database of drover's own (never
//! Nix's `db.sqlite`), read back as estimates of how long a derivation takes.
//!
//! * Sharing: WAL journal and a busy timeout, so several drover processes write and
//!   read it at once; rows are only ever inserted.
//! * Schema: versioned by `PRAGMA user_version` ([`SCHEMA_VERSION`]); a database of
//!   a newer version is refused (an error, not a guess), an empty one is created.
//! * Keys: the `.drv` path, and the derivation's *pname* ([`pname`]) with its system
//!   and the machine it ran on (`local` for local builds, the hook's machine
//!   otherwise), so a new version of a package inherits the old one's estimate.
//! * Estimates ([`HistorySnapshot::estimate`]): the most recent successful build of
//!   the same `.drv`; else the most recent successful build of the same pname and
//!   system on the same machine; else on any machine; else `None` (the caller's
//!   documented default). A snapshot is read once and then brought up to date
//!   ([`BuildHistory::update_snapshot`]: only the rows recorded since), so a
//!   long-running process sees every build, its own and other processes'.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

/// The schema this version of drover writes.
pub const SCHEMA_VERSION: i64 = 1;

/// The machine name of local builds.
pub const LOCAL_MACHINE: &str = "local";

/// How many of the most recent rows a snapshot reads (older ones no longer count).
pub const SNAPSHOT_ROWS: i64 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot create the directory '{}' of the build history: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("build history '{}': {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("build history '{}' has schema version {found}, newer than this drover's {SCHEMA_VERSION}", path.display())]
    NewerSchema { path: PathBuf, found: i64 },
}

/// One finished build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    /// The `.drv` path as printed (`/nix/store/…-hello-2.12.drv`).
    pub drv_path: String,
    /// The derivation's name without its version ([`pname`]).
    pub pname: String,
    pub system: String,
    /// [`LOCAL_MACHINE`] or the remote machine's name.
    pub machine: String,
    pub wall: Duration,
    /// CPU time (user + system) of the builder's process tree, when known.
    pub cpu: Option<Duration>,
    /// Peak resident set size of the builder's process tree in bytes, when known.
    pub peak_rss: Option<u64>,
    /// When the build started (seconds since the epoch).
    pub start_time: i64,
    /// The build's status as Nix names it (`Built`, `PermanentFailure`, …).
    pub status: String,
}

/// The part of a derivation name that stays across versions, by Nix's `DrvName`
/// rule: the name up to the first `-` that is followed by something other than a
/// letter (`hello-2.12.1` → `hello`, `python3.10-requests-2.28` →
/// `python3.10-requests`, `foo-bar` → `foo-bar`). A trailing `.drv` is dropped.
pub fn pname(name: &str) -> &str {
    let name = name.strip_suffix(".drv").unwrap_or(name);
    let b = name.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'-' && b.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()) {
            return &name[..i];
        }
    }
    name
}

/// The history database.
pub struct BuildHistory {
    conn: Connection,
    path: PathBuf,
}

impl BuildHistory {
    /// The database's path under a Nix state directory.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("drover").join("build-history.sqlite")
    }

    /// Opens (creating if needed) the history under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<BuildHistory, HistoryError> {
        let path = Self::path_in(state_dir);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| HistoryError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        Self::open_file(&path)
    }

    /// Opens (creating if needed) the history at this file.
    pub fn open_file(path: &Path) -> Result<BuildHistory, HistoryError> {
        let err = |source| HistoryError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(err)?;
        conn.query_row("pragma journal_mode = wal", [], |_| Ok(()))
            .map_err(err)?;
        conn.execute_batch("pragma synchronous = normal")
            .map_err(err)?;
        let mut h = BuildHistory {
            conn,
            path: path.to_owned(),
        };
        h.migrate()?;
        Ok(h)
    }

    fn err(&self, source: rusqlite::Error) -> HistoryError {
        HistoryError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), HistoryError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| HistoryError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
        let version: i64 = tx
            .query_row("pragma user_version", [], |r| r.get(0))
            .map_err(|e| HistoryError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
        if version > SCHEMA_VERSION {
            return Err(HistoryError::NewerSchema {
                path: self.path.clone(),
                found: version,
            });
        }
        if version < 1 {
            tx.execute_batch(
                "create table if not exists Builds (
                    id integer primary key autoincrement not null,
                    drvPath text not null,
                    pname text not null,
                    system text not null,
                    machine text not null,
                    wallMs integer not null,
                    cpuMs integer,
                    peakRss integer,
                    startTime integer not null,
                    status text not null
                );
                create index if not exists IndexBuildsDrv on Builds(drvPath);
                create index if not exists IndexBuildsName on Builds(pname, system, machine);
                pragma user_version = 1;",
            )
            .map_err(|e| HistoryError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
        }
        tx.commit().map_err(|e| HistoryError::Sqlite {
            path: self.path.clone(),
            source: e,
        })
    }

    /// Adds one finished build.
    pub fn record(&self, r: &BuildRecord) -> Result<(), HistoryError> {
        self.conn
            .prepare_cached(
                "insert into Builds (drvPath, pname, system, machine, wallMs, cpuMs, peakRss, startTime, status)
                 values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    r.drv_path,
                    r.pname,
                    r.system,
                    r.machine,
                    r.wall.as_millis() as i64,
                    r.cpu.map(|c| c.as_millis() as i64),
                    r.peak_rss.map(|b| b as i64),
                    r.start_time,
                    r.status,
                ])
            })
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Adds finished builds in one transaction (one commit for a batch, not one per
    /// build).
    pub fn record_all(&self, records: &[BuildRecord]) -> Result<(), HistoryError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.err(e))?;
        for r in records {
            self.record(r)?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The rows of one `.drv`, oldest first.
    pub fn builds_of(&self, drv_path: &str) -> Result<Vec<BuildRecord>, HistoryError> {
        let mut st = self
            .conn
            .prepare_cached(
                "select drvPath, pname, system, machine, wallMs, cpuMs, peakRss, startTime, status
                 from Builds where drvPath = ? order by id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([drv_path], |r| {
                Ok(BuildRecord {
                    drv_path: r.get(0)?,
                    pname: r.get(1)?,
                    system: r.get(2)?,
                    machine: r.get(3)?,
                    wall: Duration::from_millis(r.get::<_, i64>(4)?.max(0) as u64),
                    cpu: r
                        .get::<_, Option<i64>>(5)?
                        .map(|v| Duration::from_millis(v.max(0) as u64)),
                    peak_rss: r.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
                    start_time: r.get(7)?,
                    status: r.get(8)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// What the successful builds of the history say, in memory (the newest
    /// [`SNAPSHOT_ROWS`] rows).
    pub fn snapshot(&self) -> Result<HistorySnapshot, HistoryError> {
        let mut snap = HistorySnapshot::default();
        self.update_snapshot(&mut snap)?;
        Ok(snap)
    }

    /// Adds to `snap` the successful builds recorded since it was read (by any
    /// process: rows are only inserted, so the rows after the newest one it saw),
    /// at most the newest [`SNAPSHOT_ROWS`]. Returns how many rows were new.
    pub fn update_snapshot(&self, snap: &mut HistorySnapshot) -> Result<usize, HistoryError> {
        let mut st = self
            .conn
            .prepare_cached(
                "select id, drvPath, pname, system, machine, wallMs from
                   (select * from Builds where status = 'Built' and id > ? order by id desc limit ?)
                 order by id",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = st
            .query(params![snap.last_id, SNAPSHOT_ROWS])
            .map_err(|e| self.err(e))?;
        let mut n = 0;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let get = |i| r.get::<_, String>(i);
            let id: i64 = r.get(0).map_err(|e| self.err(e))?;
            let (drv, pname, system, machine) = (
                get(1).map_err(|e| self.err(e))?,
                get(2).map_err(|e| self.err(e))?,
                get(3).map_err(|e| self.err(e))?,
                get(4).map_err(|e| self.err(e))?,
            );
            let wall: i64 = r.get(5).map_err(|e| self.err(e))?;
            snap.add(
                drv,
                pname,
                system,
                machine,
                Duration::from_millis(wall.max(0) as u64),
            );
            snap.last_id = snap.last_id.max(id);
            n += 1;
        }
        Ok(n)
    }
}

/// Where an estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateSource {
    /// A build of the same `.drv`.
    DrvPath,
    /// A build of the same pname and system on the same machine.
    NameOnMachine,
    /// A build of the same pname and system on another machine.
    Name,
}

/// The successful builds of the history, latest per key.
#[derive(Debug, Default, Clone)]
pub struct HistorySnapshot {
    /// The newest row read ([`BuildHistory::update_snapshot`] reads after it).
    last_id: i64,
    by_drv: HashMap<String, Duration>,
    by_name_machine: HashMap<(String, String, String), Duration>,
    by_name: HashMap<(String, String), Duration>,
}

impl HistorySnapshot {
    /// Adds a successful build (later calls win: call oldest first).
    pub fn add(
        &mut self,
        drv: String,
        pname: String,
        system: String,
        machine: String,
        wall: Duration,
    ) {
        self.by_drv.insert(drv, wall);
        self.by_name.insert((pname.clone(), system.clone()), wall);
        self.by_name_machine.insert((pname, system, machine), wall);
    }

    /// The estimate of a derivation (printed `.drv` path, its name, system, and the
    /// machine it would run on); `None` when the history knows nothing like it.
    pub fn estimate(
        &self,
        drv_path: &str,
        name: &str,
        system: &str,
        machine: &str,
    ) -> Option<(Duration, EstimateSource)> {
        if let Some(&d) = self.by_drv.get(drv_path) {
            return Some((d, EstimateSource::DrvPath));
        }
        let p = pname(name).to_owned();
        if let Some(&d) =
            self.by_name_machine
                .get(&(p.clone(), system.to_owned(), machine.to_owned()))
        {
            return Some((d, EstimateSource::NameOnMachine));
        }
        self.by_name
            .get(&(p, system.to_owned()))
            .map(|&d| (d, EstimateSource::Name))
    }

    pub fn is_empty(&self) -> bool {
        self.by_drv.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(drv: &str, name: &str, machine: &str, ms: u64, status: &str) -> BuildRecord {
        BuildRecord {
            drv_path: drv.into(),
            pname: pname(name).into(),
            system: "x86_64-linux".into(),
            machine: machine.into(),
            wall: Duration::from_millis(ms),
            cpu: Some(Duration::from_millis(ms / 2)),
            peak_rss: Some(1 << 20),
            start_time: 1_700_000_000,
            status: status.into(),
        }
    }

    #[test]
    fn pname_drops_the_version_as_nix_drvname_does() {
        assert_eq!(pname("hello-2.12.1"), "hello");
        assert_eq!(pname("hello-2.12.1.drv"), "hello");
        assert_eq!(pname("python3.10-requests-2.28.1"), "python3.10-requests");
        assert_eq!(pname("foo-bar"), "foo-bar");
        assert_eq!(pname("chain-3"), "chain");
        assert_eq!(pname("x-"), "x-");
        assert_eq!(pname(""), "");
    }

    #[test]
    fn records_round_trip_and_estimates_fall_back_by_key() {
        let d = tempfile::tempdir().unwrap();
        let h = BuildHistory::open(d.path()).unwrap();
        assert!(BuildHistory::path_in(d.path()).exists());
        h.record(&rec(
            "/s/a-hello-1.0.drv",
            "hello-1.0",
            "local",
            3000,
            "Built",
        ))
        .unwrap();
        h.record(&rec(
            "/s/a-hello-1.0.drv",
            "hello-1.0",
            "local",
            2000,
            "Built",
        ))
        .unwrap();
        h.record(&rec(
            "/s/a-hello-1.0.drv",
            "hello-1.0",
            "local",
            9000,
            "PermanentFailure",
        ))
        .unwrap();
        h.record(&rec("/s/b-gcc-12.drv", "gcc-12", "big", 60_000, "Built"))
            .unwrap();
        let rows = h.builds_of("/s/a-hello-1.0.drv").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[2],
            rec(
                "/s/a-hello-1.0.drv",
                "hello-1.0",
                "local",
                9000,
                "PermanentFailure"
            )
        );
        let s = h.snapshot().unwrap();
        let sys = "x86_64-linux";
        // The latest success of the same drv; failures do not count.
        assert_eq!(
            s.estimate("/s/a-hello-1.0.drv", "hello-1.0", sys, "local"),
            Some((Duration::from_millis(2000), EstimateSource::DrvPath))
        );
        // A new version inherits the old one's estimate.
        assert_eq!(
            s.estimate("/s/c-hello-1.1.drv", "hello-1.1", sys, "local"),
            Some((Duration::from_millis(2000), EstimateSource::NameOnMachine))
        );
        assert_eq!(
            s.estimate("/s/d-gcc-13.drv", "gcc-13", sys, "local"),
            Some((Duration::from_secs(60), EstimateSource::Name))
        );
        assert_eq!(
            s.estimate("/s/d-gcc-13.drv", "gcc-13", "aarch64-linux", "local"),
            None
        );
        assert_eq!(s.estimate("/s/e-new-1.drv", "new-1", sys, "local"), None);
    }

    #[test]
    fn a_snapshot_takes_in_what_other_connections_recorded_since() {
        let d = tempfile::tempdir().unwrap();
        let reader = BuildHistory::open(d.path()).unwrap();
        let writer = BuildHistory::open(d.path()).unwrap();
        writer
            .record(&rec("/s/a-x-1.drv", "x-1", "local", 1000, "Built"))
            .unwrap();
        let mut s = reader.snapshot().unwrap();
        let sys = "x86_64-linux";
        let est = |s: &HistorySnapshot, drv| s.estimate(drv, "x-1", sys, "local").map(|e| e.0);
        assert_eq!(est(&s, "/s/a-x-1.drv"), Some(Duration::from_secs(1)));
        assert_eq!(reader.update_snapshot(&mut s).unwrap(), 0);
        writer
            .record(&rec("/s/a-x-1.drv", "x-1", "local", 4000, "Built"))
            .unwrap();
        writer
            .record(&rec("/s/b-y-1.drv", "y-1", "local", 9000, "MiscFailure"))
            .unwrap();
        writer
            .record(&rec("/s/c-x-2.drv", "x-2", "local", 2000, "Built"))
            .unwrap();
        // Only the two new successes are read; the newest wins per key.
        assert_eq!(reader.update_snapshot(&mut s).unwrap(), 2);
        assert_eq!(est(&s, "/s/a-x-1.drv"), Some(Duration::from_secs(4)));
        assert_eq!(est(&s, "/s/new-x-3.drv"), Some(Duration::from_secs(2)));
        assert_eq!(s.estimate("/s/b-y-1.drv", "y-1", sys, "local"), None);
        assert_eq!(reader.update_snapshot(&mut s).unwrap(), 0);
    }

    #[test]
    fn two_connections_share_the_database_and_newer_schemas_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = BuildHistory::open(d.path()).unwrap();
        let b = BuildHistory::open(d.path()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = d.path().to_owned();
                std::thread::spawn(move || {
                    let h = BuildHistory::open(&p).unwrap();
                    for i in 0..25 {
                        h.record(&rec(&format!("/s/{t}-{i}.drv"), "x-1", "local", 1, "Built"))
                            .unwrap();
                    }
                })
            })
            .collect();
        a.record(&rec("/s/a.drv", "a", "local", 1, "Built"))
            .unwrap();
        b.record(&rec("/s/b.drv", "b", "local", 1, "Built"))
            .unwrap();
        for t in threads {
            t.join().unwrap();
        }
        let n: i64 = a
            .conn
            .query_row("select count(*) from Builds", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 102);
        b.conn.execute_batch("pragma user_version = 7").unwrap();
        drop((a, b));
        match BuildHistory::open(d.path()) {
            Err(HistoryError::NewerSchema { found: 7, .. }) => {}
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn an_unwritable_location_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = BuildHistory::open(&file).err().unwrap().to_string();
        assert!(e.contains("file/drover"), "{e}");
    }
}
