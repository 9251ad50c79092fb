//! The log file of a build, named and written as Nix 2.8 does.
//!
//! The log of derivation `<store>/<hash>-<name>.drv` is stored at
//! `<log dir>/drvs/<first 2 chars of the base name>/<rest of the base name>`, plus
//! `.bz2` when `compress-build-log` is on (the default), in which case it is a run of
//! independent bzip2 streams, one per [`BLOCK_BYTES`] of log
//! ([`blocks`](super::blocks): Nix 2.8 reads them all). The directories are created as
//! needed (`mkdir -p`, mode 0777 before umask) and the file is created or truncated
//! with mode 0666 before umask. The file holds the builder's output **verbatim**
//! (`\r`, `@nix` lines and a partial last line included).
//!
//! [`LogFile`] writes synchronously. [`LogFileWriter`] moves a [`LogFile`] to its own
//! thread when the first chunk comes (a log that stays empty needs none), fed by a
//! bounded channel of chunks: a full channel makes the sender wait
//! (never dropping bytes), so memory stays bounded whatever the log size and the
//! compression never runs on the sender's thread. There the blocks of a compressed log
//! are compressed on several threads ([`ParallelBzip2`]) and appended in order, each as
//! soon as it is done; a plain (uncompressed) log is written chunk by chunk as it
//! arrives. Either way the file can be read while the build runs (a compressed one up to
//! its last complete block). Both writers give the same file for the same log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::blocks::{self, BlockCutter, ParallelBzip2, BLOCK_BYTES};
use crate::store_path::StorePath;

/// The directory under the log dir holding derivation logs.
pub const DRVS_LOG_DIR: &str = "drvs";

/// How many chunks a [`LogFileWriter`] queues before senders wait.
pub const DEFAULT_QUEUE_CHUNKS: usize = 64;

/// An OS error in `strerror`'s words, as Nix prints it (without Rust's
/// ` (os error N)`).
fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_owned(),
        _ => s,
    }
}

/// Errors writing a log file.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("creating log file '{}': {}", path.display(), strerror(source))]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing log file '{}': {}", path.display(), strerror(source))]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the writer thread of log file '{}' stopped", path.display())]
    WriterGone { path: PathBuf },
    #[error("cannot start the writer thread of log file '{}': {}", path.display(), strerror(source))]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `<log dir>/drvs/<xx>/<rest>[.bz2]` for a derivation's base name.
pub fn log_file_path(log_dir: &Path, drv_path: &StorePath, compress: bool) -> PathBuf {
    let base = drv_path.base_name();
    // Base names are ASCII (nixbase32 hash part), so splitting at 2 is safe.
    let (dir, rest) = base.split_at(2);
    let file = if compress {
        format!("{rest}.bz2")
    } else {
        rest.to_owned()
    };
    log_dir.join(DRVS_LOG_DIR).join(dir).join(file)
}

enum Sink {
    Plain(File),
    Bzip2 { file: File, cutter: BlockCutter },
}

/// A log file being written synchronously.
pub struct LogFile {
    path: PathBuf,
    sink: Sink,
}

impl LogFile {
    /// Creates (or truncates) the log file of `drv_path` under `log_dir`.
    pub fn create(
        log_dir: &Path,
        drv_path: &StorePath,
        compress: bool,
    ) -> Result<LogFile, LogFileError> {
        let path = log_file_path(log_dir, drv_path, compress);
        let create = |source| LogFileError::Create {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(create)?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&path)
            .map_err(create)?;
        let sink = if compress {
            Sink::Bzip2 {
                file,
                cutter: BlockCutter::new(BLOCK_BYTES),
            }
        } else {
            Sink::Plain(file)
        };
        Ok(LogFile { path, sink })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends raw builder output.
    pub fn write(&mut self, data: &[u8]) -> Result<(), LogFileError> {
        let r = match &mut self.sink {
            Sink::Plain(f) => f.write_all(data),
            Sink::Bzip2 { file, cutter } => {
                cutter.push(data, |b| file.write_all(&blocks::compress_block(&b)?))
            }
        };
        r.map_err(|source| LogFileError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes the last bzip2 stream (if any) and flushes; returns the file's path.
    pub fn finish(self) -> Result<PathBuf, LogFileError> {
        let path = self.path;
        let r = match self.sink {
            Sink::Plain(mut f) => f.flush(),
            Sink::Bzip2 { mut file, cutter } => match cutter.finish() {
                Some(b) => blocks::compress_block(&b).and_then(|z| file.write_all(&z)),
                None => Ok(()),
            }
            .and_then(|()| file.flush()),
        };
        r.map_err(|source| LogFileError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

/// Bytes queued between senders and the writer thread.
#[derive(Debug, Default)]
struct Queued {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Queued {
    fn add(&self, n: usize) {
        let now = self.now.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn sub(&self, n: usize) {
        self.now.fetch_sub(n as u64, Ordering::SeqCst);
    }
}

/// Why [`LogFileWriter::try_write`] did not take a chunk; the chunk is handed back.
#[derive(Debug)]
pub enum TryWriteError {
    /// The queue is full: wait with [`ChunkSender::send`] (e.g. on a blocking pool).
    Full(Vec<u8>),
    /// The writer thread has stopped (a write failed); [`LogFileWriter::finish`] says why.
    Closed(Vec<u8>),
}

/// A cloneable handle that queues chunks for a [`LogFileWriter`], waiting while the
/// queue is full.
#[derive(Clone)]
pub struct ChunkSender {
    tx: SyncSender<Vec<u8>>,
    queued: Arc<Queued>,
    path: PathBuf,
}

impl ChunkSender {
    /// Queues a chunk, blocking while the queue is full.
    pub fn send(&self, chunk: Vec<u8>) -> Result<(), LogFileError> {
        let n = chunk.len();
        self.queued.add(n);
        self.tx.send(chunk).map_err(|_| {
            self.queued.sub(n);
            LogFileError::WriterGone {
                path: self.path.clone(),
            }
        })
    }
}

/// A [`LogFile`] written on its own thread, fed by a bounded queue of chunks. The
/// thread starts with the first chunk: a build that logs nothing (most trivial
/// builds) costs no thread, and its file is finished where
/// [`finish`](Self::finish) is called, without compressing anything
/// ([`is_idle`](Self::is_idle)).
pub struct LogFileWriter {
    sender: ChunkSender,
    thread: WriterThread,
}

enum WriterThread {
    /// No chunk yet: what the thread is to get.
    Idle {
        file: LogFile,
        rx: Receiver<Vec<u8>>,
        threads: usize,
    },
    Running(JoinHandle<Result<PathBuf, LogFileError>>),
    /// The thread could not be started.
    Failed(LogFileError),
}

impl LogFileWriter {
    /// A writer of `file` accepting up to `queue_chunks` queued chunks, compressing on
    /// [`blocks::default_threads`] threads once it has something to write.
    pub fn spawn(file: LogFile, queue_chunks: usize) -> Result<LogFileWriter, LogFileError> {
        LogFileWriter::spawn_with_threads(file, queue_chunks, blocks::default_threads())
    }

    /// [`spawn`](Self::spawn) with `threads` compression threads (1: compress on the
    /// writer thread itself).
    pub fn spawn_with_threads(
        file: LogFile,
        queue_chunks: usize,
        threads: usize,
    ) -> Result<LogFileWriter, LogFileError> {
        let (tx, rx) = mpsc::sync_channel(queue_chunks.max(1));
        let queued = Arc::new(Queued::default());
        let path = file.path().to_owned();
        Ok(LogFileWriter {
            sender: ChunkSender { tx, queued, path },
            thread: WriterThread::Idle { file, rx, threads },
        })
    }

    /// Creates the log file and its writer.
    pub fn create(
        log_dir: &Path,
        drv_path: &StorePath,
        compress: bool,
    ) -> Result<LogFileWriter, LogFileError> {
        LogFileWriter::spawn(
            LogFile::create(log_dir, drv_path, compress)?,
            DEFAULT_QUEUE_CHUNKS,
        )
    }

    pub fn path(&self) -> &Path {
        &self.sender.path
    }

    /// Whether nothing was written yet (no thread runs): [`finish`](Self::finish)
    /// then only ends an empty file, which does not block.
    pub fn is_idle(&self) -> bool {
        matches!(self.thread, WriterThread::Idle { .. })
    }

    /// Starts the writer thread if it has not started; false if it cannot run.
    fn start(&mut self) -> bool {
        let placeholder = WriterThread::Failed(LogFileError::WriterGone {
            path: self.sender.path.clone(),
        });
        self.thread = match std::mem::replace(&mut self.thread, placeholder) {
            WriterThread::Idle { file, rx, threads } => {
                let q = self.sender.queued.clone();
                let spawned = std::thread::Builder::new()
                    .name("build-log-writer".into())
                    .spawn(move || write_chunks(file, rx, &q, threads));
                match spawned {
                    Ok(t) => WriterThread::Running(t),
                    Err(source) => WriterThread::Failed(LogFileError::Spawn {
                        path: self.sender.path.clone(),
                        source,
                    }),
                }
            }
            other => other,
        };
        matches!(self.thread, WriterThread::Running(_))
    }

    /// Queues a chunk if there is room, without waiting.
    pub fn try_write(&mut self, chunk: Vec<u8>) -> Result<(), TryWriteError> {
        if !self.start() {
            return Err(TryWriteError::Closed(chunk));
        }
        let n = chunk.len();
        self.sender.queued.add(n);
        self.sender.tx.try_send(chunk).map_err(|e| {
            self.sender.queued.sub(n);
            match e {
                TrySendError::Full(c) => TryWriteError::Full(c),
                TrySendError::Disconnected(c) => TryWriteError::Closed(c),
            }
        })
    }

    /// Queues a chunk, blocking while the queue is full.
    pub fn write(&mut self, chunk: Vec<u8>) -> Result<(), LogFileError> {
        if !self.start() {
            return Err(LogFileError::WriterGone {
                path: self.sender.path.clone(),
            });
        }
        self.sender.send(chunk)
    }

    /// A handle for queueing from elsewhere (e.g. a blocking task); the writer
    /// thread is started, so that what it queues is written.
    pub fn sender(&mut self) -> ChunkSender {
        self.start();
        self.sender.clone()
    }

    /// Bytes queued now (sent, not yet written).
    pub fn queued_bytes(&self) -> u64 {
        self.sender.queued.now.load(Ordering::SeqCst)
    }

    /// The most bytes ever queued at once: the writer's memory bound, for tests.
    pub fn peak_queued_bytes(&self) -> u64 {
        self.sender.queued.peak.load(Ordering::SeqCst)
    }

    /// Waits until every queued chunk is written, ends the file and returns its path.
    /// Blocks unless [`is_idle`](Self::is_idle): call it off any event-loop thread.
    /// Chunks sent afterwards through other [`ChunkSender`] clones must have been
    /// sent before this is called.
    pub fn finish(self) -> Result<PathBuf, LogFileError> {
        let LogFileWriter { sender, thread } = self;
        let path = sender.path.clone();
        drop(sender);
        match thread {
            WriterThread::Idle { file, .. } => file.finish(),
            WriterThread::Running(t) => match t.join() {
                Ok(r) => r,
                Err(_) => Err(LogFileError::WriterGone { path }),
            },
            WriterThread::Failed(e) => Err(e),
        }
    }
}

fn write_chunks(
    mut file: LogFile,
    rx: Receiver<Vec<u8>>,
    queued: &Queued,
    threads: usize,
) -> Result<PathBuf, LogFileError> {
    if threads > 1 {
        if let Sink::Bzip2 { .. } = file.sink {
            return compress_chunks(file, rx, queued, threads);
        }
    }
    // Ends when every sender is gone (the writer was finished or dropped).
    for chunk in rx {
        let r = file.write(&chunk);
        queued.sub(chunk.len());
        r?;
    }
    file.finish()
}

/// The writer loop of a compressed log: blocks go to a [`ParallelBzip2`], started at
/// the first complete block (a log shorter than a block is compressed here, at the end,
/// without starting any thread).
fn compress_chunks(
    file: LogFile,
    rx: Receiver<Vec<u8>>,
    queued: &Queued,
    threads: usize,
) -> Result<PathBuf, LogFileError> {
    let LogFile { path, sink } = file;
    let Sink::Bzip2 {
        mut file,
        mut cutter,
    } = sink
    else {
        unreachable!("compress_chunks is only called for a compressed log")
    };
    let write_error = |source| LogFileError::Write {
        path: path.clone(),
        source,
    };
    let spawn_error = |source| LogFileError::Spawn {
        path: path.clone(),
        source,
    };
    let mut pool: Option<ParallelBzip2<File>> = None;
    let mut spawn_failure = None;
    let mut stopped = false;
    for chunk in rx.iter() {
        stopped = cutter
            .push(&chunk, |b| {
                if pool.is_none() {
                    let out = file.try_clone().map_err(|e| spawn_failure = Some(e))?;
                    let p =
                        ParallelBzip2::new(out, threads).map_err(|e| spawn_failure = Some(e))?;
                    pool = Some(p);
                }
                pool.as_mut()
                    .map_or(Ok(()), |p| p.submit(b).map_err(|_| ()))
            })
            .is_err();
        queued.sub(chunk.len());
        if stopped {
            // Dropping the channel tells the senders; the pool says why.
            break;
        }
    }
    drop(rx);
    if let Some(e) = spawn_failure {
        return Err(spawn_error(e));
    }
    match pool {
        None => {
            if let Some(b) = cutter.finish() {
                let z = blocks::compress_block(&b).map_err(write_error)?;
                file.write_all(&z).map_err(write_error)?;
            }
        }
        Some(mut p) => {
            if !stopped {
                if let Some(b) = cutter.finish() {
                    stopped = p.submit(b).is_err();
                }
            }
            p.finish().map_err(write_error)?;
            if stopped {
                // Only a worker that could not start stops a pool whose writes all
                // succeeded.
                return Err(spawn_error(std::io::Error::other(
                    "no compression thread could be started",
                )));
            }
        }
    }
    file.flush().map_err(write_error)?;
    Ok(path)
}

#[cfg(test)]
mod tests {

    #[test]
    fn os_errors_read_as_strerror() {
        let e = LogFileError::Write {
            path: "/l/x.bz2".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(
            e.to_string(),
            "writing log file '/l/x.bz2': No space left on device"
        );
    }
    use super::*;
    use std::io::Read;

    fn drv() -> StorePath {
        StorePath::from_base_name("n1hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv").unwrap()
    }

    fn bunzip(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        bzip2::read::MultiBzDecoder::new(File::open(path).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn file_names_follow_nix() {
        let dir = Path::new("/var/log/nix");
        assert_eq!(
            log_file_path(dir, &drv(), true),
            Path::new("/var/log/nix/drvs/n1/hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv.bz2")
        );
        assert_eq!(
            log_file_path(dir, &drv(), false),
            Path::new("/var/log/nix/drvs/n1/hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv")
        );
    }

    #[test]
    fn compressed_file_holds_the_raw_bytes() {
        let t = tempfile::tempdir().unwrap();
        let mut f = LogFile::create(t.path(), &drv(), true).unwrap();
        f.write(b"abc\rX\n@nix {\"action\":\"msg\"}\n").unwrap();
        f.write(b"partial").unwrap();
        let p = f.finish().unwrap();
        assert!(p.starts_with(t.path().join("drvs/n1")));
        assert_eq!(bunzip(&p), b"abc\rX\n@nix {\"action\":\"msg\"}\npartial");
    }

    #[test]
    fn empty_log_is_a_valid_bzip2_file() {
        let t = tempfile::tempdir().unwrap();
        let p = LogFile::create(t.path(), &drv(), true)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(bunzip(&p), b"");
    }

    #[test]
    fn a_writer_starts_its_thread_with_the_first_chunk() {
        let t = tempfile::tempdir().unwrap();
        for compress in [true, false] {
            let w = LogFileWriter::create(t.path(), &drv(), compress).unwrap();
            assert!(w.is_idle());
            let empty = w.finish().unwrap();
            let mut w = LogFileWriter::create(t.path(), &drv(), compress).unwrap();
            w.try_write(b"x\n".to_vec()).unwrap();
            assert!(!w.is_idle());
            let p = w.finish().unwrap();
            assert_eq!(p, empty);
            let got = if compress {
                bunzip(&p)
            } else {
                std::fs::read(&p).unwrap()
            };
            assert_eq!(got, b"x\n");
        }
        // An idle writer's file is the empty log a thread would have written.
        let w = LogFileWriter::create(t.path(), &drv(), true).unwrap();
        let p = w.finish().unwrap();
        assert_eq!(
            std::fs::read(&p).unwrap(),
            blocks::compress_block(&[]).unwrap()
        );
        assert_eq!(bunzip(&p), b"");
    }

    #[test]
    fn plain_file_is_readable_while_written_and_truncated_on_create() {
        let t = tempfile::tempdir().unwrap();
        let p = log_file_path(t.path(), &drv(), false);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"old content that is longer").unwrap();
        let mut w = LogFileWriter::create(t.path(), &drv(), false).unwrap();
        w.write(b"first\n".to_vec()).unwrap();
        // The plain variant writes each chunk as it comes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read(&p).unwrap() != b"first\n" {
            assert!(std::time::Instant::now() < deadline, "chunk not written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        w.write(b"second".to_vec()).unwrap();
        assert_eq!(w.finish().unwrap(), p);
        assert_eq!(std::fs::read(&p).unwrap(), b"first\nsecond");
    }

    #[test]
    fn threaded_writer_keeps_order_and_bounds_its_queue() {
        let t = tempfile::tempdir().unwrap();
        let mut w =
            LogFileWriter::spawn(LogFile::create(t.path(), &drv(), true).unwrap(), 4).unwrap();
        let mut expected: Vec<u8> = Vec::new();
        for i in 0..2000u32 {
            let chunk = format!("line {i}\n").repeat(50).into_bytes();
            expected.extend(&chunk);
            match w.try_write(chunk) {
                Ok(()) => {}
                Err(TryWriteError::Full(c)) => w.sender().send(c).unwrap(),
                Err(TryWriteError::Closed(_)) => panic!("writer closed"),
            }
        }
        // 4 queued chunks plus one being sent and one being written at most.
        assert!(
            w.peak_queued_bytes() <= 6 * 600,
            "{}",
            w.peak_queued_bytes()
        );
        let p = w.finish().unwrap();
        assert_eq!(bunzip(&p), expected);
    }

    /// A log of `n` bytes of numbered lines.
    fn lines(n: usize) -> Vec<u8> {
        (0u64..)
            .flat_map(|i| format!("building object {i} of {}\n", i * 31 % 977).into_bytes())
            .take(n)
            .collect()
    }

    #[test]
    fn parallel_writer_writes_what_the_sequential_one_does() {
        let data = lines(2 * BLOCK_BYTES + 12_345);
        let t = tempfile::tempdir().unwrap();
        let mut f = LogFile::create(t.path(), &drv(), true).unwrap();
        f.write(&data).unwrap();
        let want = std::fs::read(f.finish().unwrap()).unwrap();
        for threads in [1, 3] {
            let mut w = LogFileWriter::spawn_with_threads(
                LogFile::create(t.path(), &drv(), true).unwrap(),
                8,
                threads,
            )
            .unwrap();
            for c in data.chunks(64 * 1024) {
                w.write(c.to_vec()).unwrap();
            }
            let got = std::fs::read(w.finish().unwrap()).unwrap();
            assert!(got == want, "{threads} threads: a different file");
        }
        // Three streams, holding the whole log.
        assert_eq!(
            want.windows(4)
                .filter(|w| *w == blocks::STREAM_MAGIC)
                .count(),
            3
        );
        assert_eq!(bunzip(&log_file_path(t.path(), &drv(), true)), data);
    }

    #[test]
    fn compressed_log_is_readable_up_to_its_last_block_while_written() {
        use crate::build_log::read::{read_build_log, LogEnd};
        use crate::store_path::StoreDir;
        let data = lines(2 * BLOCK_BYTES + 1000);
        let t = tempfile::tempdir().unwrap();
        let mut w = LogFileWriter::spawn_with_threads(
            LogFile::create(t.path(), &drv(), true).unwrap(),
            8,
            2,
        )
        .unwrap();
        let read = || {
            let mut out = Vec::new();
            let end = read_build_log(
                t.path(),
                &StoreDir::new("/nix/store").unwrap(),
                &drv(),
                |_| None,
                &mut out,
            );
            (end, out)
        };
        // Two blocks and a bit: the two blocks become readable, the rest waits.
        w.write(data[..2 * BLOCK_BYTES + 500].to_vec()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let (end, out) = read();
            if out.len() == 2 * BLOCK_BYTES {
                assert!(matches!(
                    end,
                    Ok(LogEnd::Complete | LogEnd::Truncated { .. })
                ));
                assert!(out[..] == data[..2 * BLOCK_BYTES]);
                break;
            }
            // Before that, nothing or the first block.
            assert!(
                out.is_empty() || out[..] == data[..BLOCK_BYTES],
                "{}",
                out.len()
            );
            assert!(std::time::Instant::now() < deadline, "blocks not written");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        w.write(data[2 * BLOCK_BYTES + 500..].to_vec()).unwrap();
        w.finish().unwrap();
        let (end, out) = read();
        assert_eq!(end.unwrap(), LogEnd::Complete);
        assert!(out == data);
    }

    fn write_in_chunks(dir: &Path, data: &[u8], cuts: &[usize], compress: bool) -> Vec<u8> {
        let mut f = LogFile::create(dir, &drv(), compress).unwrap();
        let mut start = 0;
        for &c in cuts.iter().chain([&data.len()]) {
            f.write(&data[start..c]).unwrap();
            start = c;
        }
        std::fs::read(f.finish().unwrap()).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn chunking_does_not_change_the_file(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(0usize..3000, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let t = tempfile::tempdir().unwrap();
            for compress in [true, false] {
                let whole = write_in_chunks(t.path(), &data, &[], compress);
                let chunked = write_in_chunks(t.path(), &data, &cuts, compress);
                proptest::prop_assert_eq!(&whole, &chunked);
                if !compress {
                    proptest::prop_assert_eq!(&whole, &data);
                }
            }
        }
    }

    #[test]
    fn unwritable_log_dir_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let blocker = t.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let e = LogFile::create(&blocker, &drv(), true).err().unwrap();
        assert!(e.to_string().starts_with("creating log file '"), "{e}");
    }
}
