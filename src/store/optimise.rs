//! Store optimisation as Nix 2.8 does it (`optimisePath`, run for every new path
//! when `auto-optimise-store` is set): every regular file and symlink of a path is
//! hashed (the sha256 of its NAR serialisation, so the executable bit counts) and
//! hard-linked to `<store>/.links/<base32 hash>`; a file whose contents are already
//! there is atomically replaced by a hard link to that entry. The directory that
//! held a replaced file gets its canonical mode and timestamp back.
//!
//! Nix's collector deletes `.links` entries whose link count fell to 1, so the
//! layout must be Nix's exactly: the entry name is the hash in nix base 32 without
//! the `sha256:` prefix.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use thiserror::Error;

use super::canonicalise::{canonicalise_timestamp_and_permissions, CanonicaliseError};
use crate::binary_cache::NOTICE;
use crate::hash::Encoding;
use crate::nar::{nar_hash_of_path, NarWriteError};

/// Optimising a path failed.
#[derive(Debug, Error)]
pub enum OptimiseError {
    #[error("{context} '{path}': {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot link '{link}' to '{path}': {source}")]
    Link {
        link: PathBuf,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Nar(#[from] NarWriteError),
    #[error(transparent)]
    Canonicalise(#[from] CanonicaliseError),
}

fn io_err<'a>(
    context: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> OptimiseError + 'a {
    move |source| OptimiseError::Io {
        context,
        path: path.to_owned(),
        source,
    }
}

/// What an optimisation did (Nix's `OptimiseStats`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OptimiseStats {
    pub files_linked: u64,
    pub bytes_freed: u64,
    pub blocks_freed: u64,
}

/// Hard-links the files of the tree at `path` (inside the store directory
/// `store_real`) through `<store_real>/.links`. With `repair`, an existing entry
/// whose contents do not match its name is replaced.
pub fn optimise_path(
    store_real: &Path,
    path: &Path,
    repair: bool,
) -> Result<OptimiseStats, OptimiseError> {
    let mut o = Optimiser {
        store_real,
        links: store_real.join(".links"),
        inodes: HashSet::new(),
        stats: OptimiseStats::default(),
        repair,
    };
    o.path(path)?;
    Ok(o.stats)
}

struct Optimiser<'a> {
    store_real: &'a Path,
    links: PathBuf,
    /// Inodes linked during this run (Nix's `InodeHash`).
    inodes: HashSet<u64>,
    stats: OptimiseStats,
    repair: bool,
}

/// Restores a directory's canonical mode and timestamp when dropped (Nix's
/// `MakeReadOnly`).
struct MakeReadOnly(Option<PathBuf>);

impl Drop for MakeReadOnly {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            if let Err(e) = canonicalise_timestamp_and_permissions(p) {
                log::warn!(target: NOTICE, "warning: {e}");
            }
        }
    }
}

fn temp_link_name(store_real: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    store_real.join(format!(
        ".tmp-link-{}-{}{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Optimiser<'_> {
    fn path(&mut self, path: &Path) -> Result<(), OptimiseError> {
        let st = std::fs::symlink_metadata(path).map_err(io_err("getting status of", path))?;
        let ft = st.file_type();
        if ft.is_dir() {
            let mut names = Vec::new();
            for e in std::fs::read_dir(path).map_err(io_err("opening directory", path))? {
                let e = e.map_err(io_err("reading directory", path))?;
                use std::os::unix::fs::DirEntryExt;
                if self.inodes.contains(&e.ino()) {
                    continue;
                }
                names.push(e.file_name());
            }
            for n in names {
                self.path(&path.join(n))?;
            }
            return Ok(());
        }
        // Linux can hard-link symlinks, so Nix links them too.
        if !ft.is_file() && !ft.is_symlink() {
            return Ok(());
        }
        if ft.is_file() && st.mode() & 0o200 != 0 {
            log::warn!(
                target: NOTICE,
                "warning: skipping suspicious writable file '{}'",
                path.display()
            );
            return Ok(());
        }
        if st.nlink() > 1 && self.inodes.contains(&st.ino()) {
            return Ok(());
        }
        let (hash, _) = nar_hash_of_path(path)?;
        let link = self.links.join(hash.encode(Encoding::Base32));
        if let Ok(ls) = std::fs::symlink_metadata(&link) {
            let corrupt =
                ls.size() != st.size() || (self.repair && nar_hash_of_path(&link)?.0 != hash);
            if corrupt {
                log::warn!(
                    target: NOTICE,
                    "warning: removing corrupted link '{}'",
                    link.display()
                );
                log::warn!(target: NOTICE, "warning: There may be more corrupted paths.\nYou should run `nix-store --verify --check-contents --repair` to fix them all");
                std::fs::remove_file(&link).map_err(io_err("removing", &link))?;
            }
        }
        if std::fs::symlink_metadata(&link).is_err() {
            match std::fs::hard_link(path, &link) {
                Ok(()) => {
                    self.inodes.insert(st.ino());
                    return Ok(());
                }
                // another process made the entry first: link to it below
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) if e.raw_os_error() == Some(Errno::ENOSPC as i32) => {
                    // a full directory index (ext4): this file is just not shared
                    log::info!(
                        "cannot link '{}' to '{}': {e}",
                        link.display(),
                        path.display()
                    );
                    return Ok(());
                }
                Err(source) => {
                    return Err(OptimiseError::Link {
                        link,
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        }
        let ls = std::fs::symlink_metadata(&link).map_err(io_err("getting status of", &link))?;
        if ls.ino() == st.ino() {
            return Ok(());
        }
        log::debug!("linking '{}' to '{}'", path.display(), link.display());
        let dir = path.parent().unwrap_or(self.store_real);
        let toggle = dir != self.store_real;
        if toggle {
            let dm = std::fs::symlink_metadata(dir).map_err(io_err("getting status of", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dm.mode() | 0o200))
                .map_err(io_err("changing writability of", dir))?;
        }
        let _read_only = MakeReadOnly(toggle.then(|| dir.to_owned()));
        let tmp = temp_link_name(self.store_real);
        if let Err(e) = std::fs::hard_link(&link, &tmp) {
            if e.raw_os_error() == Some(Errno::EMLINK as i32) {
                // too many links to one inode (likely an empty file): keep the copy
                if st.size() > 0 {
                    log::info!("'{}' has maximum number of links", link.display());
                }
                return Ok(());
            }
            return Err(OptimiseError::Link {
                link: tmp,
                path: link,
                source: e,
            });
        }
        if let Err(e) = std::fs::rename(&tmp, path) {
            if std::fs::remove_file(&tmp).is_err() {
                log::warn!(target: NOTICE, "error: unable to unlink '{}'", tmp.display());
            }
            if e.raw_os_error() == Some(Errno::EMLINK as i32) {
                return Ok(());
            }
            return Err(OptimiseError::Io {
                context: "renaming a link over",
                path: path.to_owned(),
                source: e,
            });
        }
        self.stats.files_linked += 1;
        self.stats.bytes_freed += st.size();
        self.stats.blocks_freed += st.blocks();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::canonicalise_path_meta_data;

    fn tree(store: &Path, name: &str, files: &[(&str, &str, bool)]) -> PathBuf {
        let p = store.join(name);
        std::fs::create_dir_all(&p).unwrap();
        for (f, contents, exec) in files {
            let fp = p.join(f);
            std::fs::create_dir_all(fp.parent().unwrap()).unwrap();
            std::fs::write(&fp, contents).unwrap();
            if *exec {
                std::fs::set_permissions(&fp, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        std::os::unix::fs::symlink("target", p.join("link")).unwrap();
        canonicalise_path_meta_data(&p, None).unwrap();
        p
    }

    fn ino(p: &Path) -> u64 {
        std::fs::symlink_metadata(p).unwrap().ino()
    }

    #[test]
    fn identical_files_share_one_inode_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        std::fs::create_dir(store.join(".links")).unwrap();
        let a = tree(
            store,
            "a",
            &[("foo", "hello\n", false), ("sub/bar", "x", false)],
        );
        let b = tree(
            store,
            "b",
            &[("foo", "hello\n", false), ("exe", "hello\n", true)],
        );
        let s1 = optimise_path(store, &a, false).unwrap();
        assert_eq!(s1.files_linked, 0, "the first copy only enters .links");
        let s2 = optimise_path(store, &b, false).unwrap();
        // foo and the symlink are replaced; the executable differs in its NAR
        assert_eq!(s2.files_linked, 2);
        assert_eq!(ino(&a.join("foo")), ino(&b.join("foo")));
        assert_eq!(ino(&a.join("link")), ino(&b.join("link")));
        assert_ne!(ino(&a.join("foo")), ino(&b.join("exe")));
        assert_eq!(std::fs::symlink_metadata(a.join("foo")).unwrap().nlink(), 3);
        let (h, _) = nar_hash_of_path(&a.join("foo")).unwrap();
        let entry = store.join(".links").join(h.encode(Encoding::Base32));
        assert_eq!(ino(&entry), ino(&a.join("foo")));
        // the directory that changed is canonical again
        let m = std::fs::metadata(&b).unwrap();
        assert_eq!((m.mode() & 0o7777, m.mtime()), (0o555, 1));
        // nothing temporary is left, and a second run changes nothing
        assert!(std::fs::read_dir(store).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp-link")));
        assert_eq!(optimise_path(store, &b, false).unwrap().files_linked, 0);
    }

    #[test]
    fn a_corrupted_entry_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path();
        std::fs::create_dir(store.join(".links")).unwrap();
        let a = tree(store, "a", &[("foo", "hello\n", false)]);
        let (h, _) = nar_hash_of_path(&a.join("foo")).unwrap();
        let entry = store.join(".links").join(h.encode(Encoding::Base32));
        std::fs::write(&entry, "other contents").unwrap();
        optimise_path(store, &a, false).unwrap();
        assert_eq!(ino(&entry), ino(&a.join("foo")));
        assert_eq!(std::fs::read_to_string(&entry).unwrap(), "hello\n");
    }

    #[test]
    fn a_missing_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = optimise_path(dir.path(), &dir.path().join("nope"), false).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
