//! Finding and reading a stored build log, as `nix-store --read-log` (Nix 2.8's
//! `LocalFSStore::getBuildLog`) does.
//!
//! A path that is not a derivation is replaced by its deriver (unknown deriver or
//! invalid path: no log). For a derivation with base name `<xx><rest>`, Nix looks at,
//! in order:
//!
//! 1. `<log dir>/drvs/<xx>/<rest>`, then `<log dir>/drvs/<xx>/<rest>.bz2`;
//! 2. the old flat layout `<log dir>/drvs/<base name>`, then `….bz2`.
//!
//! A plain file wins over a compressed one of the same layout; a `.bz2` file that does
//! not decompress is skipped. When nothing is found the error is Nix's
//! `build log of derivation '<path>' is not available` (naming the path asked for).
//! Decompression streams into the given writer: memory stays bounded.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bzip2::read::MultiBzDecoder;

use super::file::DRVS_LOG_DIR;
use crate::store_path::{StoreDir, StorePath};

/// Errors reading a stored log.
#[derive(Debug, thiserror::Error)]
pub enum ReadLogError {
    #[error("build log of derivation '{path}' is not available")]
    NotAvailable { path: String },
    #[error("reading build log '{}': {source}", file.display())]
    Read { file: PathBuf, source: io::Error },
    #[error("writing build log of '{path}': {source}")]
    Output { path: String, source: io::Error },
}

/// A stored log file: its path and whether it is bzip2-compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLog {
    pub file: PathBuf,
    pub compressed: bool,
}

/// The candidate log files of a derivation, in Nix's lookup order.
pub fn candidates(log_dir: &Path, drv_path: &StorePath) -> Vec<StoredLog> {
    let base = drv_path.base_name();
    let drvs = log_dir.join(DRVS_LOG_DIR);
    let (xx, rest) = base.split_at(2);
    let mut out = Vec::new();
    for plain in [drvs.join(xx).join(rest), drvs.join(base)] {
        let mut bz2 = plain.clone().into_os_string();
        bz2.push(".bz2");
        out.push(StoredLog {
            file: plain,
            compressed: false,
        });
        out.push(StoredLog {
            file: bz2.into(),
            compressed: true,
        });
    }
    out
}

/// The existing log files of a derivation, in Nix's lookup order.
pub fn find_build_log(log_dir: &Path, drv_path: &StorePath) -> Vec<StoredLog> {
    candidates(log_dir, drv_path)
        .into_iter()
        .filter(|c| c.file.exists())
        .collect()
}

/// Writes the stored log of `path` to `out`. `deriver` maps a non-derivation path to
/// its deriver (None when the path is invalid or has none), e.g. from the store's path
/// info. `store_dir` only serves to name the path in the error.
pub fn read_build_log(
    log_dir: &Path,
    store_dir: &StoreDir,
    path: &StorePath,
    deriver: impl FnOnce(&StorePath) -> Option<StorePath>,
    out: &mut dyn Write,
) -> Result<(), ReadLogError> {
    let not_available = || ReadLogError::NotAvailable {
        path: store_dir.print(path),
    };
    let drv = if path.is_derivation() {
        path.clone()
    } else {
        deriver(path).ok_or_else(not_available)?
    };
    let output_error = |source| ReadLogError::Output {
        path: store_dir.print(path),
        source,
    };
    for log in find_build_log(log_dir, &drv) {
        let file = File::open(&log.file).map_err(|source| ReadLogError::Read {
            file: log.file.clone(),
            source,
        })?;
        if !log.compressed {
            return copy(file, out, &log.file, output_error);
        }
        let mut counting = CountingWriter {
            inner: out,
            written: 0,
        };
        match copy(
            MultiBzDecoder::new(file),
            &mut counting,
            &log.file,
            output_error,
        ) {
            Ok(()) => return Ok(()),
            // Nix skips a `.bz2` that does not decompress; once bytes went out we can
            // only report the error.
            Err(ReadLogError::Read { .. }) if counting.written == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(not_available())
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    written: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Copies with read and write errors kept apart.
fn copy(
    mut from: impl Read,
    to: &mut dyn Write,
    file: &Path,
    output_error: impl Fn(io::Error) -> ReadLogError,
) -> Result<(), ReadLogError> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ReadLogError::Read {
                    file: file.to_owned(),
                    source,
                })
            }
        };
        to.write_all(&buf[..n]).map_err(&output_error)?;
    }
    to.flush().map_err(output_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build_log::file::LogFile;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s).unwrap()
    }

    const DRV: &str = "n1hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv";
    const OUT: &str = "7xsbxkd9ssr0wdhh3gj5ykbi4a5m1i8h-logt";

    fn read(
        log_dir: &Path,
        path: &StorePath,
        deriver: Option<StorePath>,
    ) -> Result<Vec<u8>, ReadLogError> {
        let mut out = Vec::new();
        read_build_log(
            log_dir,
            &StoreDir::new("/nix/store").unwrap(),
            path,
            |_| deriver,
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn reads_compressed_and_plain_logs() {
        for compress in [true, false] {
            let t = tempfile::tempdir().unwrap();
            let mut f = LogFile::create(t.path(), &sp(DRV), compress).unwrap();
            f.write(b"hello\rX\npartial").unwrap();
            f.finish().unwrap();
            assert_eq!(
                read(t.path(), &sp(DRV), None).unwrap(),
                b"hello\rX\npartial"
            );
            // An output path is looked up through its deriver.
            assert_eq!(
                read(t.path(), &sp(OUT), Some(sp(DRV))).unwrap(),
                b"hello\rX\npartial"
            );
        }
    }

    #[test]
    fn plain_wins_and_old_flat_layout_is_found() {
        let t = tempfile::tempdir().unwrap();
        LogFile::create(t.path(), &sp(DRV), true)
            .unwrap()
            .finish()
            .unwrap();
        let plain = t
            .path()
            .join("drvs/n1/hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv");
        std::fs::write(&plain, b"plain").unwrap();
        assert_eq!(read(t.path(), &sp(DRV), None).unwrap(), b"plain");

        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("drvs")).unwrap();
        std::fs::write(t.path().join("drvs").join(DRV), b"flat").unwrap();
        assert_eq!(read(t.path(), &sp(DRV), None).unwrap(), b"flat");
    }

    #[test]
    fn corrupt_bz2_is_skipped() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("drvs/n1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv.bz2"),
            b"not bzip2",
        )
        .unwrap();
        let e = read(t.path(), &sp(DRV), None).unwrap_err();
        assert!(matches!(e, ReadLogError::NotAvailable { .. }));
    }

    #[test]
    fn missing_log_has_nix_message() {
        let t = tempfile::tempdir().unwrap();
        let e = read(t.path(), &sp(DRV), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("build log of derivation '/nix/store/{DRV}' is not available")
        );
        // An output without a known deriver names the output.
        let e = read(t.path(), &sp(OUT), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("build log of derivation '/nix/store/{OUT}' is not available")
        );
    }
}
