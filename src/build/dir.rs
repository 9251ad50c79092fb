//! The build directory: `<root>/nix-build-<drv file name>-<n>` (Nix 2.8's
//! `createTempDir`), `n` counting from 0 past existing directories, mode 0700. After
//! the build it is removed, or on failure with `keep-failed` kept (made 0755) and
//! reported as `note: keeping build directory '…'`.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A build directory that is removed on drop unless [`BuildDir::finish`] keeps it.
#[derive(Debug)]
pub struct BuildDir {
    path: Option<PathBuf>,
}

/// The name of the `n`th candidate build directory for `drv_file` (`x.drv`).
pub fn build_dir_name(drv_file: &str, n: u32) -> String {
    format!("nix-build-{drv_file}-{n}")
}

impl BuildDir {
    /// Creates the first free `<root>/nix-build-<drv_file>-<n>`, mode 0700.
    pub fn create(root: &Path, drv_file: &str) -> io::Result<BuildDir> {
        std::fs::create_dir_all(root)?;
        for n in 0u32.. {
            let p = root.join(build_dir_name(drv_file, n));
            match std::fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => {
                    // The mode passed to mkdir is reduced by the umask.
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))?;
                    return Ok(BuildDir { path: Some(p) });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::ErrorKind::AlreadyExists.into())
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Removes the directory, or with `keep` leaves it (mode 0755) and returns its
    /// path for the `note: keeping build directory` message.
    pub fn finish(mut self, keep: bool) -> Option<PathBuf> {
        let p = self.path.take()?;
        if keep {
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
            Some(p)
        } else {
            let _ = remove_dir_all_writable(&p);
            None
        }
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = remove_dir_all_writable(&p);
        }
    }
}

/// Removes a tree, making directories writable first (builders may remove write bits).
fn remove_dir_all_writable(p: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(p)?;
    if meta.is_dir() {
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
        for e in std::fs::read_dir(p)? {
            remove_dir_all_writable(&e?.path())?;
        }
        std::fs::remove_dir(p)
    } else {
        std::fs::remove_file(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn naming_counts_past_existing_dirs() {
        let root = tempfile::tempdir().unwrap();
        let a = BuildDir::create(root.path(), "hello.drv").unwrap();
        assert_eq!(a.path(), root.path().join("nix-build-hello.drv-0"));
        assert_eq!(std::fs::metadata(a.path()).unwrap().mode() & 0o777, 0o700);
        let b = BuildDir::create(root.path(), "hello.drv").unwrap();
        assert_eq!(b.path(), root.path().join("nix-build-hello.drv-1"));
        std::fs::write(a.path().join("f"), b"x").unwrap();
        let pa = a.path().to_owned();
        assert_eq!(a.finish(false), None);
        assert!(!pa.exists());
        let pb = b.path().to_owned();
        assert_eq!(b.finish(true), Some(pb.clone()));
        assert_eq!(std::fs::metadata(&pb).unwrap().mode() & 0o777, 0o755);
        // 0 is free again
        let c = BuildDir::create(root.path(), "hello.drv").unwrap();
        assert_eq!(c.path(), root.path().join("nix-build-hello.drv-0"));
        let pc = c.path().to_owned();
        drop(c);
        assert!(!pc.exists());
    }
}
