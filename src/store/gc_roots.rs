//! Temporary GC roots, recorded as Nix 2.8 records them so that Nix's garbage
//! collector keeps what drover is working on.
//!
//! Each process has `<state dir>/temproots/<pid>`: created fresh (a leftover file
//! with our pid is stale and removed), `flock`ed exclusively for the life of the
//! process (the collector treats a file it *can* lock as belonging to a dead process
//! and deletes it, writing `d` into it; so after locking we check the file is still
//! empty, else start over), holding full store paths each followed by a NUL byte.
//!
//! Before appending a root, a shared lock on `<state dir>/gc.lock` is tried: when
//! the collector holds it exclusively, the root is sent to the collector over
//! `<state dir>/gc-socket/socket` (`<path>\n`, answered by `1`) as well.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::locks::{lock_fd, open_lock_file, LockType};
use super::StoreError;
use crate::store_path::{StoreDir, StorePath};

/// The temporary-roots file of this process for one state directory.
#[derive(Debug)]
pub struct TempRoots {
    state_dir: PathBuf,
    file: File,
}

type Registry = Mutex<HashMap<PathBuf, Arc<Mutex<TempRoots>>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

impl TempRoots {
    /// The shared temporary-roots file of this process for `state_dir` (one file per
    /// process, as Nix keys it by pid), created on first use.
    pub fn for_state_dir(state_dir: &Path) -> Result<Arc<Mutex<TempRoots>>, StoreError> {
        let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = reg.get(state_dir) {
            return Ok(t.clone());
        }
        let t = Arc::new(Mutex::new(TempRoots::create(state_dir)?));
        reg.insert(state_dir.to_owned(), t.clone());
        Ok(t)
    }

    fn create(state_dir: &Path) -> Result<TempRoots, StoreError> {
        let dir = state_dir.join("temproots");
        std::fs::create_dir_all(&dir).map_err(StoreError::io("creating", &dir))?;
        let path = dir.join(std::process::id().to_string());
        loop {
            if path.exists() {
                let _ = std::fs::remove_file(&path);
            }
            let file = open_lock_file(&path, true)?.ok_or_else(|| {
                StoreError::io("opening", &path)(std::io::ErrorKind::NotFound.into())
            })?;
            while !lock_fd(&file, LockType::Write, true)
                .map_err(|e| StoreError::io("locking", &path)(e))?
            {}
            let size = file
                .metadata()
                .map_err(StoreError::io("statting", &path))?
                .size();
            if size == 0 {
                return Ok(TempRoots {
                    state_dir: state_dir.to_owned(),
                    file,
                });
            }
        }
    }

    /// Records `path` as a temporary root.
    pub fn add(&mut self, store_dir: &StoreDir, path: &StorePath) -> Result<(), StoreError> {
        let printed = store_dir.print(path);
        let gc_lock_path = self.state_dir.join("gc.lock");
        let gc_lock = open_lock_file(&gc_lock_path, true)?.ok_or_else(|| {
            StoreError::io("opening", &gc_lock_path)(std::io::ErrorKind::NotFound.into())
        })?;
        loop {
            if lock_fd(&gc_lock, LockType::Read, false)
                .map_err(StoreError::io("locking", &gc_lock_path))?
            {
                break;
            }
            // The collector is running: tell it directly.
            let socket = self.state_dir.join("gc-socket/socket");
            match UnixStream::connect(&socket) {
                Ok(mut s) => {
                    let sent = s
                        .write_all(format!("{printed}\n").as_bytes())
                        .and_then(|_| {
                            let mut c = [0u8; 1];
                            s.read_exact(&mut c)
                        });
                    if sent.is_ok() {
                        break;
                    }
                }
                Err(e) => log::debug!("GC socket '{}': {e}", socket.display()),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut bytes = printed.into_bytes();
        bytes.push(0);
        let r = self.file.write_all(&bytes);
        // the shared GC lock is released when `gc_lock` is closed
        drop(gc_lock);
        r.map_err(StoreError::io("writing temporary roots", &self.state_dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_nul_terminated_and_file_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello").unwrap();
        let t = TempRoots::for_state_dir(dir.path()).unwrap();
        t.lock().unwrap().add(&sd, &p).unwrap();
        t.lock().unwrap().add(&sd, &p).unwrap();
        let file = dir.path().join(format!("temproots/{}", std::process::id()));
        let contents = std::fs::read(&file).unwrap();
        let one = b"/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello\0";
        assert_eq!(contents, [&one[..], &one[..]].concat());
        // the collector's non-blocking exclusive lock must fail while we live
        let other = open_lock_file(&file, false).unwrap().unwrap();
        assert!(!lock_fd(&other, LockType::Write, false).unwrap());
    }
}
