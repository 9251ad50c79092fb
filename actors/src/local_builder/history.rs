//! Recording finished builds in drover's build history
//! ([`drover::build_history`]), and what local builds cost.
//!
//! [`HistoryLog`] opens the database lazily, on the first record or snapshot; if it
//! cannot be opened or written, the build goes on and a warning is printed once
//! per process — the history only informs the scheduler.
//!
//! Resource use of a local build ([`wait_with_usage`]): `wait4` on the builder's
//! pid, whose `rusage` covers the builder and every descendant it waited for (CPU
//! time summed, `ru_maxrss` the largest of them). `getrusage(RUSAGE_CHILDREN)`
//! would mix concurrent builds, and cgroup accounting needs a cgroup per build that
//! unprivileged runs do not have; descendants the builder left running are killed
//! with its process group and their use is lost, as it is to Nix's own
//! `buildTimeMs`/`cpu` accounting.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover::build_history::{BuildHistory, BuildRecord, HistoryError, HistorySnapshot};

/// The build history of one state directory, shared by the builders of a process.
pub struct HistoryLog {
    state_dir: PathBuf,
    db: Mutex<Option<BuildHistory>>,
    failed: AtomicBool,
    /// Records waiting for [`record_soon`](Self::record_soon)'s writer.
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    records: Vec<BuildRecord>,
    /// A blocking task is writing: it takes what is added meanwhile too.
    writing: bool,
}

impl std::fmt::Debug for HistoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryLog")
            .field("state_dir", &self.state_dir)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl HistoryLog {
    /// The history under a Nix state directory (`$NIX_STATE_DIR/drover/`).
    pub fn new(state_dir: &Path) -> HistoryLog {
        HistoryLog {
            state_dir: state_dir.to_owned(),
            db: Mutex::new(None),
            failed: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&BuildHistory) -> Result<T, HistoryError>) -> Option<T> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let r = match db.as_ref() {
            Some(h) => f(h),
            None => BuildHistory::open(&self.state_dir).and_then(|h| {
                let r = f(&h);
                *db = Some(h);
                r
            }),
        };
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    log::warn!("warning: the build history is not used: {e}");
                }
                None
            }
        }
    }

    /// Adds a finished build (blocking; a failure only warns, once).
    pub fn record(&self, r: &BuildRecord) {
        self.with(|h| h.record(r));
    }

    /// Adds a finished build off the caller's thread, without waiting: the records
    /// that arrive while one task writes are written by it, in one transaction per
    /// batch, so a run of many short builds costs neither a blocking task nor a
    /// commit per build. Must be called within a tokio runtime.
    pub fn record_soon(self: &Arc<Self>, r: BuildRecord) {
        let start = {
            let mut p = self.lock_pending();
            p.records.push(r);
            !std::mem::replace(&mut p.writing, true)
        };
        if start {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.write_pending());
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes batches until none is left.
    fn write_pending(&self) {
        loop {
            let batch = {
                let mut p = self.lock_pending();
                if p.records.is_empty() {
                    p.writing = false;
                    return;
                }
                std::mem::take(&mut p.records)
            };
            self.with(|h| h.record_all(&batch));
        }
    }

    /// Waits until the records of [`record_soon`](Self::record_soon) are written
    /// (or failed), for a caller that reads the history next.
    pub fn flush(&self) {
        while self.lock_pending().writing {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The successful builds so far (empty when the history cannot be read).
    pub fn snapshot(&self) -> HistorySnapshot {
        self.with(|h| h.snapshot()).unwrap_or_default()
    }

    /// Brings `snap` up to date with the builds recorded since it was read
    /// (blocking; unchanged when the history cannot be read).
    pub fn update(&self, snap: &mut HistorySnapshot) {
        self.with(|h| h.update_snapshot(snap));
    }

    /// Whether opening or writing the history failed (and was warned about).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// CPU time and peak memory of a builder's process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu: Duration,
    /// Bytes.
    pub peak_rss: u64,
}

/// Waits for `pid` (blocking) with `wait4`: its exit status and what it used.
pub fn wait_with_usage(pid: u32) -> std::io::Result<(std::process::ExitStatus, Usage)> {
    loop {
        if let Some(r) = wait4(pid, 0)? {
            return Ok(r);
        }
    }
}

/// `wait4(pid, flags)`: the exit status and usage once `pid` was reaped, `None`
/// when `WNOHANG` is in `flags` and it has not exited yet.
pub fn wait4(
    pid: u32,
    flags: libc::c_int,
) -> std::io::Result<Option<(std::process::ExitStatus, Usage)>> {
    use std::os::unix::process::ExitStatusExt;
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: a zeroed rusage is a valid value; wait4 writes status and rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, flags, &mut ru) };
        if r == pid as libc::pid_t {
            let tv = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec.max(0) as u64)
                    + Duration::from_micros(t.tv_usec.max(0) as u64)
            };
            let usage = Usage {
                cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
                // Linux reports ru_maxrss in KiB.
                peak_rss: (ru.ru_maxrss.max(0) as u64) * 1024,
            };
            return Ok(Some((std::process::ExitStatus::from_raw(status), usage)));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> BuildRecord {
        BuildRecord {
            drv_path: format!("/s/{name}.drv"),
            pname: name.into(),
            system: "x86_64-linux".into(),
            machine: "local".into(),
            wall: Duration::from_millis(1500),
            cpu: None,
            peak_rss: None,
            start_time: 0,
            status: "Built".into(),
        }
    }

    #[test]
    fn records_are_read_back_and_an_unusable_history_only_warns() {
        let d = tempfile::tempdir().unwrap();
        let h = HistoryLog::new(d.path());
        assert!(h.snapshot().is_empty());
        h.record(&rec("a"));
        let s = h.snapshot();
        assert_eq!(
            s.estimate("/s/a.drv", "a", "x86_64-linux", "local")
                .map(|e| e.0),
            Some(Duration::from_millis(1500))
        );
        let file = d.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let bad = HistoryLog::new(&file);
        bad.record(&rec("b"));
        assert!(bad.has_failed());
        assert!(bad.snapshot().is_empty());
    }

    #[test]
    fn records_made_soon_are_written_in_batches_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let h = Arc::new(HistoryLog::new(d.path()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..50 {
                h.record_soon(rec(&format!("p{i}")));
            }
            // One writer for all of them, however they were batched.
            assert!(h.lock_pending().writing);
            tokio::task::spawn_blocking({
                let h = h.clone();
                move || h.flush()
            })
            .await
            .unwrap();
        });
        assert!(!h.lock_pending().writing && h.lock_pending().records.is_empty());
        let s = h.snapshot();
        for i in 0..50 {
            let name = format!("p{i}");
            assert!(
                s.estimate(&format!("/s/{name}.drv"), &name, "x86_64-linux", "local")
                    .is_some(),
                "{name}"
            );
        }
    }

    #[test]
    fn wait4_reports_the_cpu_and_memory_of_the_process_tree() {
        // A child that allocates ~64 MiB in a grandchild it waits for and burns CPU.
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg("sh -c 'x=$(head -c 67108864 /dev/zero | tr \"\\\\0\" a); echo ${#x}' >/dev/null; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
            .spawn()
            .unwrap();
        let pid = child.id();
        let (status, usage) = wait_with_usage(pid).unwrap();
        std::mem::forget(child);
        assert!(status.success());
        assert!(usage.cpu > Duration::from_millis(5), "{usage:?}");
        assert!(usage.peak_rss > 60 << 20, "{usage:?}");
    }
}
