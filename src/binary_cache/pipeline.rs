//! Unpacking a big NAR file on three threads instead of one.
//!
//! A copy from a binary cache does four things to every byte: read the file
//! (hashing it for `FileHash`), decompress it, hash the NAR (`NarHash`) and parse it
//! into files. On one thread they add up; here they overlap:
//!
//! * the *fetch* thread reads the compressed file and hashes it;
//! * the *decompress* thread decompresses it and hashes the NAR;
//! * the calling thread parses the NAR and writes the files
//!   ([`crate::nar::reader::parse_counted`], which does not hash again).
//!
//! Chunks go from one stage to the next through bounded channels (at most
//! [`DEPTH`] chunks of [`CHUNK`] bytes wait between two stages, and the buffers are
//! recycled), so memory stays bounded whatever the file's size.
//!
//! Every check and every error is the one of the single-threaded unpacking: a read
//! error of the file or a decompression error reaches the parser as the same
//! `io::Error`, at the same offset of the NAR; the parser refuses what it refuses
//! there; the NAR hash and size are checked, then the file's size and hash. A read
//! error after the NAR ended is a [`BinaryCacheError::Read`], as when the
//! single-threaded copy reads the rest of the file to hash it. Only when the NAR
//! fails do the helper threads stop early (nothing more of the file is read).

use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

use super::compression;
use super::transport::CacheFile;
use super::BinaryCacheError;
use crate::hash::{Hash, HashAlgo, HashSink};
use crate::nar::reader::NarSummary;

/// Bytes per chunk handed from one stage to the next.
pub const CHUNK: usize = 256 * 1024;
/// Chunks waiting between two stages at most.
pub const DEPTH: usize = 4;

/// What passes between two stages.
enum Msg {
    /// A buffer and how much of it is data.
    Data(Vec<u8>, usize),
    /// The stage before failed with this error (its last message).
    Failed(io::Error),
    /// The stream ended (its last message).
    End,
}

/// The receiving end of a stage: a [`BufRead`] over the chunks, which gives the
/// buffers back to the sender when it is done with them.
struct ChunkReader {
    rx: Receiver<Msg>,
    back: Sender<Vec<u8>>,
    chunk: Vec<u8>,
    len: usize,
    pos: usize,
    /// End or error seen: nothing more comes.
    finished: bool,
}

impl ChunkReader {
    fn new(rx: Receiver<Msg>, back: Sender<Vec<u8>>) -> ChunkReader {
        ChunkReader {
            rx,
            back,
            chunk: Vec::new(),
            len: 0,
            pos: 0,
            finished: false,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.len && !self.finished {
            let done = std::mem::take(&mut self.chunk);
            if done.capacity() > 0 {
                // The sender may be gone; then the buffer is simply freed.
                let _ = self.back.send(done);
            }
            self.pos = 0;
            self.len = 0;
            match self.rx.recv() {
                Ok(Msg::Data(chunk, len)) => {
                    self.chunk = chunk;
                    self.len = len;
                }
                Ok(Msg::End) => self.finished = true,
                Ok(Msg::Failed(e)) => {
                    self.finished = true;
                    return Err(e);
                }
                Err(_) => {
                    self.finished = true;
                    return Err(io::Error::other("the stage before stopped without a word"));
                }
            }
        }
        Ok(&self.chunk[self.pos..self.len])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.len);
    }
}

/// The sending end of a stage, with the buffers coming back.
struct ChunkWriter {
    tx: SyncSender<Msg>,
    back: Receiver<Vec<u8>>,
}

impl ChunkWriter {
    /// A buffer of [`CHUNK`] bytes, recycled when one came back.
    fn buffer(&self) -> Vec<u8> {
        match self.back.try_recv() {
            Ok(b) if b.len() == CHUNK => b,
            _ => vec![0; CHUNK],
        }
    }

    /// Sends; false when the next stage is gone.
    fn send(&self, m: Msg) -> bool {
        self.tx.send(m).is_ok()
    }
}

/// A stage pair: the writer for the stage before, the reader for the one after.
fn stage() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = sync_channel(DEPTH);
    let (back_tx, back_rx) = channel();
    (
        ChunkWriter { tx, back: back_rx },
        ChunkReader::new(rx, back_tx),
    )
}

/// Reads until `buf` is full or the input ends (retrying interrupted reads): how
/// much was read, and the error that stopped it early, if any.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> (usize, Option<io::Error>) {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Some(e)),
        }
    }
    (filled, None)
}

/// The same error again (an `io::Error` cannot be cloned).
fn copy_error(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

/// The fetch stage: reads `file` to its end, hashing it when `hash` is given and
/// counting it into `downloaded`, and sends it on while the next stage takes it.
/// With `drain`, it reads on to the end once the next stage is gone (to hash and
/// count the whole file); it stops when `stop` is set. Returns the file's hash and
/// size, or the read error (which the next stage also got, if it was still there).
fn fetch(
    mut file: CacheFile,
    mut hash: Option<HashSink>,
    out: ChunkWriter,
    drain: bool,
    downloaded: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<(Option<Hash>, u64)> {
    let mut size = 0u64;
    let mut open = true;
    let mut spare = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) || (!open && !drain) {
            return Err(io::Error::other("stopped"));
        }
        let mut buf = if open {
            out.buffer()
        } else {
            std::mem::take(&mut spare)
        };
        if buf.len() != CHUNK {
            buf = vec![0; CHUNK];
        }
        // One read per chunk, not a full chunk: what the transport has is passed
        // on at once (a slow download still streams).
        let n = loop {
            match file.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if open {
                        out.send(Msg::Failed(copy_error(&e)));
                    }
                    return Err(e);
                }
            }
        };
        if n == 0 {
            if open {
                out.send(Msg::End);
            }
            return Ok((hash.map(|h| h.finish().0), size));
        }
        if let Some(h) = &mut hash {
            h.update(&buf[..n]);
        }
        size += n as u64;
        downloaded.fetch_add(n as u64, Ordering::Relaxed);
        if open {
            open = out.send(Msg::Data(buf, n));
        } else {
            spare = buf;
        }
    }
}

/// The decompress stage: decompresses what the fetch stage sends and hashes the
/// NAR, sending it on in full chunks. Returns the NAR hash and size of everything
/// it sent, `None` when it stopped before the end (an error, sent on, or the next
/// stage gone), or the error making the decoder. The decoder is made here, not by
/// the caller: some read their input at once (gzip's header), which only comes once
/// the fetch stage runs.
fn decompress(
    method: &str,
    input: ChunkReader,
    out: ChunkWriter,
    stop: &AtomicBool,
) -> Result<Option<(Hash, u64)>, BinaryCacheError> {
    let mut decoder = match compression::decoder(method, input) {
        Ok(d) => d,
        Err(e) => {
            out.send(Msg::Failed(io::Error::other(e.to_string())));
            return Err(e);
        }
    };
    Ok(decode(&mut decoder, out, stop))
}

/// [`decompress`] once the decoder is made.
fn decode(
    decoder: &mut compression::Decoder<ChunkReader>,
    out: ChunkWriter,
    stop: &AtomicBool,
) -> Option<(Hash, u64)> {
    let mut hash = HashSink::new(HashAlgo::Sha256);
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let mut buf = out.buffer();
        let (n, error) = read_full(decoder, &mut buf);
        // What came before an error goes first, so the parser fails where it would
        // reading the decoder itself.
        if n > 0 {
            hash.update(&buf[..n]);
            if !out.send(Msg::Data(buf, n)) {
                return None;
            }
        }
        match error {
            Some(e) => {
                out.send(Msg::Failed(e));
                return None;
            }
            None if n == 0 => {
                out.send(Msg::End);
                return Some(hash.finish());
            }
            None => {}
        }
    }
}

/// Counts what passes through it.
struct Counting<'a, R> {
    inner: R,
    count: &'a AtomicU64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// What [`unpack`] found: the NAR's hash and size, and, when the file was wanted,
/// its hash (`None` without `file_algo`) and size, or the error reading its rest.
pub(crate) struct Unpacked {
    pub summary: NarSummary,
    pub file: Option<io::Result<(Option<Hash>, u64)>>,
}

/// Why [`unpack`] failed.
#[derive(Debug)]
pub(crate) enum UnpackError {
    /// No decoder for the method (before anything is read).
    Decoder(BinaryCacheError),
    /// The NAR did not parse (including read and decompression errors on the way).
    Nar(crate::nar::reader::NarReadError),
}

/// Unpacks the NAR file `file` compressed with `method` to `target` on three
/// threads. `file_algo` is the hash of the file to compute (`None`: none, the file
/// being the NAR itself); `want_file` says whether the file's size and hash are
/// wanted (then it is read to its end).
pub(crate) fn unpack(
    method: &str,
    file: CacheFile,
    file_algo: Option<HashAlgo>,
    want_file: bool,
    target: &std::path::Path,
    downloaded: &AtomicU64,
    unpacked: &AtomicU64,
) -> Result<Unpacked, UnpackError> {
    let stop = AtomicBool::new(false);
    let (to_decompress, compressed) = stage();
    let (to_parse, nar) = stage();
    if !method.is_empty() && !compression::METHODS.contains(&method) {
        return Err(UnpackError::Decoder(BinaryCacheError::UnknownCompression(
            method.to_owned(),
        )));
    }
    std::thread::scope(|s| {
        let stop = &stop;
        let fetcher = s.spawn(move || {
            fetch(
                file,
                file_algo.map(HashSink::new),
                to_decompress,
                want_file,
                downloaded,
                stop,
            )
        });
        let decompressor = s.spawn(move || decompress(method, compressed, to_parse, stop));
        let parsed = crate::nar::reader::parse_counted(
            Counting {
                inner: nar,
                count: unpacked,
            },
            &mut crate::nar::restore::RestoreSink::new(target),
        );
        let nar_size = match parsed {
            Ok(n) => n,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                // A decoder that could not be made is what the single-threaded
                // copy reports, before any NAR error.
                return Err(match decompressor.join() {
                    Ok(Err(d)) => UnpackError::Decoder(d),
                    _ => UnpackError::Nar(e),
                });
            }
        };
        // The parser read the stream to its end (an end the decompressor sends only
        // after everything it hashed), so the decompressor ended well.
        let Ok(Ok(Some((nar_hash, hashed)))) = decompressor.join() else {
            stop.store(true, Ordering::Relaxed);
            let e = io::Error::other("the decompressing thread failed after the NAR ended");
            return Err(UnpackError::Nar(crate::nar::reader::NarReadError::Io {
                offset: nar_size,
                path: "/".into(),
                source: e,
            }));
        };
        debug_assert_eq!(hashed, nar_size);
        let summary = NarSummary {
            nar_hash,
            nar_size: hashed,
        };
        let file = match fetcher.join() {
            Ok(r) => want_file.then_some(r),
            Err(_) => Some(Err(io::Error::other("the fetching thread panicked"))),
        };
        Ok(Unpacked { summary, file })
    })
}
