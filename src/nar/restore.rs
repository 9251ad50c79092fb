//! Unpacking a NAR into the file system, as `nix-store --restore` does.
//!
//! [`restore`] parses a NAR ([`super::reader`], so every refusal listed there applies)
//! and recreates its tree at a target path that must not exist yet (its parent must).
//! Nothing is ever written outside the target: entry names cannot contain `/` or be
//! `.`/`..`, entries are unique (strictly sorted), a symlink is a leaf so nothing is
//! created through it, and every object is created fresh (`mkdir`, `O_CREAT|O_EXCL`,
//! `symlink`), never opened if it already exists.
//!
//! Permissions follow Nix 2.8's `RestoreSink`: directories are created with mode
//! `0777` and regular files with `0666`, both reduced by the process umask; an
//! executable file then gets `u+x,g+x,o+x` added to the mode it was created with. No
//! timestamps or owners are set (the store canonicalises those afterwards).
//!
//! On error the partially restored tree is left in place, as Nix does; the caller
//! (which restores into a temporary path) removes it.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::reader::{parse, NarReadError, NarSink, NarSummary, BUF_SIZE};

/// A [`NarSink`] that creates the objects below a root path.
#[derive(Debug)]
pub struct RestoreSink {
    root: PathBuf,
    buf: Vec<u8>,
}

impl RestoreSink {
    /// A sink restoring to `root`, which must not exist yet.
    pub fn new(root: impl Into<PathBuf>) -> RestoreSink {
        RestoreSink {
            root: root.into(),
            buf: Vec::new(),
        }
    }

    fn full(&self, path: &Path) -> PathBuf {
        if path.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(path)
        }
    }
}

fn annotate<'a>(what: &str, p: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    let what = what.to_owned();
    move |e| io::Error::new(e.kind(), format!("{what} '{}': {e}", p.display()))
}

impl NarSink for RestoreSink {
    fn create_directory(&mut self, path: &Path) -> io::Result<()> {
        let p = self.full(path);
        DirBuilder::new()
            .mode(0o777)
            .create(&p)
            .map_err(annotate("creating directory", &p))
    }

    fn create_file(
        &mut self,
        path: &Path,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()> {
        let p = self.full(path);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&p)
            .map_err(annotate("creating file", &p))?;
        if executable {
            let mode = f
                .metadata()
                .map_err(annotate("stat of", &p))?
                .permissions()
                .mode();
            f.set_permissions(fs::Permissions::from_mode((mode | 0o111) & 0o7777))
                .map_err(annotate("making executable", &p))?;
        }
        if self.buf.len() < BUF_SIZE {
            self.buf.resize(BUF_SIZE, 0);
        }
        // Whole buffers are written (a decompressor hands out a few KiB per read):
        // fewer, larger writes.
        let mut written = 0u64;
        loop {
            let mut filled = 0;
            while filled < self.buf.len() {
                let n = contents.read(&mut self.buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            io::Write::write_all(&mut f, &self.buf[..filled]).map_err(annotate("writing", &p))?;
            written += filled as u64;
        }
        debug_assert_eq!(written, size);
        Ok(())
    }

    fn create_symlink(&mut self, path: &Path, target: &[u8]) -> io::Result<()> {
        let p = self.full(path);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
            .map_err(annotate("creating symlink", &p))
    }
}

/// Unpacks the NAR read from `reader` (which must hold exactly one NAR) to `target`,
/// which must not exist yet. Returns the NAR's hash and size.
pub fn restore<R: Read>(reader: R, target: &Path) -> Result<NarSummary, NarReadError> {
    parse(reader, &mut RestoreSink::new(target))
}
