//! Canonical metadata of store objects (Nix's `canonicalisePathMetaData`).
//!
//! Every file, directory and symlink of a store object gets: mtime 1 (one second
//! after the epoch; symlinks via `lutimes`), mode 0444 or 0555 (0555 when the owner
//! could execute; directories are executable, so 0555) with no setuid/setgid/sticky
//! bits (symlink modes are left alone), and owner = the current user (when
//! `from_uid` is given, files must be owned by that user, except hard links to
//! inodes already seen). Symlinks are never followed. Extended attributes are
//! removed except `security.selinux` and `system.nfs4_acl`.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use thiserror::Error;

/// The modification time of every store file.
pub const MTIME_STORE: i64 = 1;

/// Why a path could not be canonicalised.
#[derive(Debug, Error)]
pub enum CanonicaliseError {
    #[error("getting attributes of '{path}': {source}")]
    Stat { path: PathBuf, source: io::Error },
    #[error("file '{0}' has an unsupported type")]
    UnsupportedType(PathBuf),
    #[error("changing metadata of '{path}': {source}")]
    Change { path: PathBuf, source: io::Error },
    #[error("invalid ownership on file '{0}'")]
    InvalidOwnership(PathBuf),
    #[error("wrong ownership of top-level store path '{0}'")]
    WrongTopLevelOwnership(PathBuf),
}

const IGNORED_ACLS: &[&str] = &["security.selinux", "system.nfs4_acl"];

fn change_err(path: &Path) -> impl FnOnce(io::Error) -> CanonicaliseError + '_ {
    move |source| CanonicaliseError::Change {
        path: path.to_owned(),
        source,
    }
}

/// Sets mode and mtime of one file as Nix does (`canonicaliseTimestampAndPermissions`).
pub fn canonicalise_timestamp_and_permissions(path: &Path) -> Result<(), CanonicaliseError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| CanonicaliseError::Stat {
        path: path.to_owned(),
        source,
    })?;
    fix_mode_and_time(path, &meta)
}

fn fix_mode_and_time(path: &Path, meta: &std::fs::Metadata) -> Result<(), CanonicaliseError> {
    if !meta.file_type().is_symlink() {
        let mode = meta.mode() & 0o7777;
        if mode != 0o444 && mode != 0o555 {
            let new = 0o444 | if mode & 0o100 != 0 { 0o111 } else { 0 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(new))
                .map_err(change_err(path))?;
        }
    }
    if meta.mtime() != MTIME_STORE {
        let atime = TimeSpec::new(meta.atime(), 0);
        let mtime = TimeSpec::new(MTIME_STORE, 0);
        utimensat(None, path, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| change_err(path)(e.into()))?;
    }
    Ok(())
}

fn remove_xattrs(path: &Path) -> Result<(), CanonicaliseError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CanonicaliseError::UnsupportedType(path.to_owned()))?;
    // SAFETY: a NUL-terminated path and a null buffer of size 0 (size query).
    let size = unsafe { nix::libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if size <= 0 {
        return Ok(()); // none, or not supported (ENOTSUP/ENODATA)
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: the buffer has the length we pass.
    let size = unsafe { nix::libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if size < 0 {
        return Ok(());
    }
    for name in buf[..size as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        if IGNORED_ACLS.iter().any(|a| a.as_bytes() == name) {
            continue;
        }
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: both arguments are NUL-terminated strings.
        if unsafe { nix::libc::lremovexattr(c.as_ptr(), cname.as_ptr()) } == -1 {
            return Err(change_err(path)(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn canonicalise_rec(
    path: &Path,
    from_uid: Option<u32>,
    inodes_seen: &mut BTreeSet<(u64, u64)>,
) -> Result<(), CanonicaliseError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| CanonicaliseError::Stat {
        path: path.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
        return Err(CanonicaliseError::UnsupportedType(path.to_owned()));
    }
    remove_xattrs(path)?;
    if let Some(uid) = from_uid {
        if meta.uid() != uid {
            if ft.is_dir() || !inodes_seen.contains(&(meta.dev(), meta.ino())) {
                return Err(CanonicaliseError::InvalidOwnership(path.to_owned()));
            }
            return Ok(());
        }
    }
    inodes_seen.insert((meta.dev(), meta.ino()));
    fix_mode_and_time(path, &meta)?;
    let euid = nix::unistd::geteuid();
    if meta.uid() != euid.as_raw() {
        nix::unistd::fchownat(
            None,
            path,
            Some(euid),
            Some(nix::unistd::getegid()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| change_err(path)(e.into()))?;
    }
    if ft.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| CanonicaliseError::Stat {
            path: path.to_owned(),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| CanonicaliseError::Stat {
                path: path.to_owned(),
                source,
            })?;
            canonicalise_rec(&e.path(), from_uid, inodes_seen)?;
        }
    }
    Ok(())
}

/// Canonicalises the tree at `path` (`canonicalisePathMetaData`). With `from_uid`,
/// every file must be owned by that user (a build user).
pub fn canonicalise_path_meta_data(
    path: &Path,
    from_uid: Option<u32>,
) -> Result<(), CanonicaliseError> {
    let mut seen = BTreeSet::new();
    canonicalise_rec(path, from_uid, &mut seen)?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| CanonicaliseError::Stat {
        path: path.to_owned(),
        source,
    })?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(CanonicaliseError::WrongTopLevelOwnership(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn canonicalises_recursively_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("obj");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("f"), b"x").unwrap();
        fs::set_permissions(root.join("f"), fs::Permissions::from_mode(0o6755)).unwrap();
        fs::write(root.join("g"), b"y").unwrap();
        fs::set_permissions(root.join("g"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir(root.join("d")).unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"z").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d/link")).unwrap();

        canonicalise_path_meta_data(&root, None).unwrap();

        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        let mtime = |p: &Path| fs::symlink_metadata(p).unwrap().mtime();
        assert_eq!(mode(&root), 0o555);
        assert_eq!(mode(&root.join("f")), 0o555);
        assert_eq!(mode(&root.join("g")), 0o444);
        assert_eq!(mode(&root.join("d")), 0o555);
        for p in [
            &root,
            &root.join("f"),
            &root.join("g"),
            &root.join("d/link"),
        ] {
            assert_eq!(mtime(p), 1, "{}", p.display());
        }
        // the symlink target is untouched
        assert_eq!(mode(&outside), 0o644);
        assert_ne!(mtime(&outside), 1);
        // make it removable again
        for p in [&root, &root.join("d")] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn wrong_owner_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert!(matches!(
            canonicalise_path_meta_data(&f, Some(me.wrapping_add(1))),
            Err(CanonicaliseError::InvalidOwnership(_))
        ));
        canonicalise_path_meta_data(&f, Some(me)).unwrap();
    }
}
