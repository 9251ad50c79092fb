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
//!
//! A `.bz2` log is one or more concatenated bzip2 streams (Nix writes one, drover one
//! per block, see [`blocks`](super::blocks)); all are read, and what follows the last
//! stream if it is not a bzip2 stream is ignored, as libarchive (Nix 2.8's reader)
//! does. A log still being written ends inside a stream: everything up to its last
//! complete block is written out and the result says [`LogEnd::Truncated`] (Nix 2.8
//! prints nothing then and says the log is not available; a file that holds no
//! complete block at all is treated so here too).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use std::io::BufRead;

use bzip2::bufread::BzDecoder;

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

/// How much of a stored log [`read_build_log`] wrote out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd {
    /// The whole log.
    Complete,
    /// The compressed `file` ends inside a bzip2 stream (its build is still writing it,
    /// or it was cut short): the log up to its last complete block was written.
    Truncated { file: PathBuf },
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
) -> Result<LogEnd, ReadLogError> {
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
            return copy(file, out, &log.file, output_error).map(|()| LogEnd::Complete);
        }
        let mut counting = CountingWriter {
            inner: out,
            written: 0,
        };
        match copy_bzip2(file, &mut counting, &log.file, output_error) {
            Ok(end) => return Ok(end),
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

/// Decompresses the concatenated bzip2 streams of `file` into `to`, stream by stream.
fn copy_bzip2(
    file: File,
    to: &mut CountingWriter<'_>,
    path: &Path,
    output_error: impl Fn(io::Error) -> ReadLogError,
) -> Result<LogEnd, ReadLogError> {
    let read_error = |source| ReadLogError::Read {
        file: path.to_owned(),
        source,
    };
    let mut input = io::BufReader::with_capacity(64 * 1024, file);
    let mut streams = 0u64;
    loop {
        if streams > 0 {
            // After a stream: the end, another stream, or trailing bytes to ignore.
            let rest = input.fill_buf().map_err(read_error)?;
            if rest.is_empty() || !rest.starts_with(b"BZh") {
                break;
            }
        }
        match copy(BzDecoder::new(&mut input), to, path, &output_error) {
            Ok(()) => streams += 1,
            Err(ReadLogError::Read { source, .. })
                if source.kind() == io::ErrorKind::UnexpectedEof && to.written > 0 =>
            {
                return Ok(LogEnd::Truncated {
                    file: path.to_owned(),
                })
            }
            Err(e) => return Err(e),
        }
    }
    to.flush().map_err(output_error)?;
    Ok(LogEnd::Complete)
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

    fn bz2_path(dir: &Path) -> PathBuf {
        dir.join("drvs/n1/hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv.bz2")
    }

    fn write_streams(dir: &Path, parts: &[&[u8]], tail: &[u8]) {
        let mut file = Vec::new();
        for p in parts {
            file.extend(crate::build_log::blocks::compress_block(p).unwrap());
        }
        file.extend(tail);
        std::fs::create_dir_all(dir.join("drvs/n1")).unwrap();
        std::fs::write(bz2_path(dir), file).unwrap();
    }

    #[test]
    fn concatenated_streams_are_all_read_and_trailing_bytes_ignored() {
        let t = tempfile::tempdir().unwrap();
        write_streams(t.path(), &[b"one\n", b"", b"two\n"], b"");
        assert_eq!(read(t.path(), &sp(DRV), None).unwrap(), b"one\ntwo\n");
        // What follows the last stream is not bzip2: ignored, as libarchive does.
        write_streams(t.path(), &[b"one\n"], b"garbage\n");
        assert_eq!(read(t.path(), &sp(DRV), None).unwrap(), b"one\n");
    }

    #[test]
    fn a_log_ending_inside_a_stream_is_read_up_to_its_last_complete_block() {
        let t = tempfile::tempdir().unwrap();
        let partial = crate::build_log::blocks::compress_block(b"three\n").unwrap();
        write_streams(t.path(), &[b"one\n", b"two\n"], &partial[..20]);
        let mut out = Vec::new();
        let end = read_build_log(
            t.path(),
            &StoreDir::new("/nix/store").unwrap(),
            &sp(DRV),
            |_| None,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"one\ntwo\n");
        assert_eq!(
            end,
            LogEnd::Truncated {
                file: bz2_path(t.path())
            }
        );
        // Without one complete block there is nothing to show: not available, as in Nix.
        write_streams(t.path(), &[], &partial[..20]);
        let e = read(t.path(), &sp(DRV), None).unwrap_err();
        assert!(matches!(e, ReadLogError::NotAvailable { .. }), "{e}");
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
