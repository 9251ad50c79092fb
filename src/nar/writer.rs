//! Serialising a file system tree to a NAR, streaming: memory use does not grow with
//! file sizes (file contents are copied in chunks).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::hash::{Hash, HashAlgo, HashSink};

/// Why a tree could not be serialised.
#[derive(Debug, Error)]
pub enum NarWriteError {
    #[error("cannot read '{path}' while writing a NAR: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("file '{0}' has an unsupported type (not a regular file, directory or symlink)")]
    UnsupportedType(PathBuf),
    #[error("writing NAR: {0}")]
    Write(#[from] io::Error),
}

fn write_padding(w: &mut impl Write, len: u64) -> io::Result<()> {
    let pad = (8 - (len % 8)) % 8;
    w.write_all(&[0u8; 8][..pad as usize])
}

/// Writes one NAR string token.
pub(crate) fn write_str(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    write_padding(w, s.len() as u64)
}

/// Serialises the tree at `path` (not following a top-level symlink) into `w`.
pub fn dump_path(path: &Path, w: &mut impl Write) -> Result<(), NarWriteError> {
    write_str(w, b"nix-archive-1")?;
    dump_node(path, w)
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> NarWriteError + '_ {
    move |source| NarWriteError::Read {
        path: path.to_owned(),
        source,
    }
}

fn dump_node(path: &Path, w: &mut impl Write) -> Result<(), NarWriteError> {
    let meta = fs::symlink_metadata(path).map_err(read_err(path))?;
    write_str(w, b"(")?;
    write_str(w, b"type")?;
    let ft = meta.file_type();
    if ft.is_file() {
        write_str(w, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_str(w, b"executable")?;
            write_str(w, b"")?;
        }
        write_str(w, b"contents")?;
        let mut f = fs::File::open(path).map_err(read_err(path))?;
        let len = meta.len();
        w.write_all(&len.to_le_bytes())?;
        let copied = copy_exact(&mut f, w, len).map_err(read_err(path))?;
        if copied != len {
            return Err(NarWriteError::Read {
                path: path.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file changed size while being read",
                ),
            });
        }
        write_padding(w, len)?;
    } else if ft.is_symlink() {
        write_str(w, b"symlink")?;
        write_str(w, b"target")?;
        let target = fs::read_link(path).map_err(read_err(path))?;
        write_str(w, target.as_os_str().as_bytes())?;
    } else if ft.is_dir() {
        write_str(w, b"directory")?;
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(read_err(path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_err(path))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_str(w, b"entry")?;
            write_str(w, b"(")?;
            write_str(w, b"name")?;
            write_str(w, name.as_bytes())?;
            write_str(w, b"node")?;
            dump_node(&path.join(&name), w)?;
            write_str(w, b")")?;
        }
    } else {
        return Err(NarWriteError::UnsupportedType(path.to_owned()));
    }
    write_str(w, b")")?;
    Ok(())
}

/// Copies at most `len` bytes; returns how many were copied.
fn copy_exact(r: &mut impl Read, w: &mut impl Write, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(len - left)
}

/// Writes the NAR of a regular, non-executable file with `contents`.
pub fn dump_bytes(contents: &[u8], w: &mut impl Write) -> io::Result<()> {
    for t in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        write_str(w, t)?;
    }
    write_str(w, contents)?;
    write_str(w, b")")
}

/// The sha256 NAR hash and NAR size of the tree at `path`.
pub fn nar_hash_of_path(path: &Path) -> Result<(Hash, u64), NarWriteError> {
    let mut sink = HashSink::new(HashAlgo::Sha256);
    dump_path(path, &mut sink)?;
    Ok(sink.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_file_agree() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"hello").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        let mut a = Vec::new();
        dump_path(&f, &mut a).unwrap();
        let mut b = Vec::new();
        dump_bytes(b"hello", &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len() % 8, 0);
    }

    #[test]
    fn directory_entries_are_sorted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b"), b"").unwrap();
        fs::write(dir.path().join("a"), b"").unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("c")).unwrap();
        let mut out = Vec::new();
        dump_path(dir.path(), &mut out).unwrap();
        let s = String::from_utf8_lossy(&out);
        let a = s.find("\u{1}\0\0\0\0\0\0\0a").unwrap();
        let b = s.find("\u{1}\0\0\0\0\0\0\0b").unwrap();
        assert!(a < b);
        assert!(s.contains("symlink"));
    }
}
