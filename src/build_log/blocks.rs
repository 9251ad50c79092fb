//! A compressed build log as a sequence of independent bzip2 streams, one per block of
//! [`BLOCK_BYTES`] of log, compressed on several threads.
//!
//! Nix 2.8 reads a stored `.bz2` log (`nix-store -l`, `nix log`) with libarchive's
//! bzip2 filter, which goes on after the end of a stream when another bzip2 stream
//! follows, so concatenated streams (what pbzip2 writes) read back as the whole log.
//! Each stream is complete in itself, so blocks are compressed independently, on up
//! to `threads` workers, and appended in order by a writer thread as soon as each is
//! done: at any moment the file is a run of complete streams (plus, briefly, part of
//! the one being appended), which a reader decompresses up to the last complete block
//! while the build still runs.
//!
//! Where a log is cut into blocks depends only on byte offsets (every
//! [`BLOCK_BYTES`]), never on how the log arrived or on the thread count, so the same
//! log always gives the same file.
//!
//! Blocks are much smaller than Nix's (which compresses at level 9, 900 kB bzip2
//! blocks): [`BLOCK_BYTES`] of log fits one level-[`LEVEL`] bzip2 block (100 kB).
//! bzip2's level is nothing but its block size, and any reader takes any level.
//! Measured on compiler-like log lines (`actors/examples/bench_log.rs`'s, thread CPU
//! time, docs/benchmarks.md): 100 kB blocks compress 1.46 times as fast as 400 kB
//! ones and 1.9 times as fast as 900 kB ones, for a file 10 % (17 %) larger, and
//! the compressor's working memory (about 7 bytes per byte of block) is a ninth of
//! level 9's. The compression is nearly all of the log's CPU, so this is the cost
//! that decides how fast a heavily logging build can go.
//!
//! Memory is bounded whatever the log size: at most [`IN_FLIGHT_PER_THREAD`] ×
//! `threads` blocks are in flight (queued, being compressed, or compressed and
//! waiting for an earlier one); [`ParallelBzip2::submit`] waits while that many are,
//! which in turn holds the log writer, the collector and the builder's pty back.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bzip2::write::BzEncoder;
use bzip2::Compression;

/// Log bytes per bzip2 stream: under the 100 kB block of bzip2 level [`LEVEL`] even
/// after its initial run-length coding grows the data (at most by a quarter).
pub const BLOCK_BYTES: usize = 75 * 1024;

/// The bzip2 level (block size in units of 100 kB) of each stream.
pub const LEVEL: u32 = 1;

/// The first four bytes of each stream: `BZh` and the level's digit.
pub const STREAM_MAGIC: [u8; 4] = [b'B', b'Z', b'h', b'0' + LEVEL as u8];

/// Blocks in flight per compression thread: one being compressed, the others
/// queued for it or written, so a worker never waits for the next block.
pub const IN_FLIGHT_PER_THREAD: usize = 4;

/// The most compression threads one log uses, whatever the machine.
pub const MAX_THREADS: usize = 8;

/// Compression threads per log: the machine's cores, at most [`MAX_THREADS`].
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_THREADS)
}

/// `data` as one complete bzip2 stream, level [`LEVEL`]. The empty stream (the
/// whole file of a build that logs nothing) is compressed once per process: setting
/// up a compressor allocates its block buffers, which costs more than a trivial
/// build's other log work.
pub fn compress_block(data: &[u8]) -> io::Result<Vec<u8>> {
    static EMPTY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    if data.is_empty() {
        if let Some(z) = EMPTY.get() {
            return Ok(z.clone());
        }
        let z = compress(data)?;
        return Ok(EMPTY.get_or_init(|| z).clone());
    }
    compress(data)
}

fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut e = BzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        Compression::new(LEVEL),
    );
    e.write_all(data)?;
    e.finish()
}

/// Cuts a byte stream into blocks of exactly `size` bytes (the last one shorter).
#[derive(Debug)]
pub struct BlockCutter {
    size: usize,
    block: Vec<u8>,
    cut: u64,
}

impl BlockCutter {
    pub fn new(size: usize) -> BlockCutter {
        BlockCutter {
            size: size.max(1),
            block: Vec::new(),
            cut: 0,
        }
    }

    /// Appends `data`, handing every block it completes to `emit`, in order.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        mut emit: impl FnMut(Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            let take = (self.size - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == self.size {
                self.cut += 1;
                emit(std::mem::replace(
                    &mut self.block,
                    Vec::with_capacity(self.size),
                ))?;
            }
        }
        Ok(())
    }

    /// The last block: what is left, or an empty block when nothing was cut (an empty
    /// log is one empty stream, a valid bzip2 file). None when the log ended exactly
    /// at a block boundary.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.block.is_empty() || self.cut == 0).then_some(self.block)
    }
}

/// The writer thread stopped (a write failed); [`ParallelBzip2::finish`] says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

type Job = (u64, Vec<u8>);
type Done = (u64, io::Result<Vec<u8>>);

/// Compresses submitted blocks on a pool of threads and appends the streams, in
/// submission order, to `W` on a writer thread.
pub struct ParallelBzip2<W: Write + Send + 'static> {
    jobs: Option<SyncSender<Job>>,
    job_queue: Arc<Mutex<Receiver<Job>>>,
    done: Option<Sender<Done>>,
    /// A slot per block in flight: full means [`submit`](Self::submit) waits.
    slots: SyncSender<()>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    writer: JoinHandle<io::Result<W>>,
    next: u64,
}

impl<W: Write + Send + 'static> ParallelBzip2<W> {
    /// A compressor using up to `threads` workers (started as blocks arrive), writing
    /// to `out`.
    pub fn new(out: W, threads: usize) -> io::Result<ParallelBzip2<W>> {
        let threads = threads.max(1);
        let in_flight = IN_FLIGHT_PER_THREAD * threads;
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(in_flight);
        let (done, done_rx) = mpsc::channel::<Done>();
        let (slots, slots_rx) = mpsc::sync_channel::<()>(in_flight);
        let writer = std::thread::Builder::new()
            .name("build-log-bz2-out".into())
            .spawn(move || write_in_order(out, done_rx, slots_rx))?;
        Ok(ParallelBzip2 {
            jobs: Some(jobs),
            job_queue: Arc::new(Mutex::new(job_rx)),
            done: Some(done),
            slots,
            workers: Vec::new(),
            threads,
            writer,
            next: 0,
        })
    }

    /// Queues a block, waiting while [`IN_FLIGHT_PER_THREAD`] × `threads` blocks are in
    /// flight.
    pub fn submit(&mut self, block: Vec<u8>) -> Result<(), Stopped> {
        // The writer frees a slot per block written; it is gone only after a failure.
        self.slots.send(()).map_err(|_| Stopped)?;
        if self.workers.len() < self.threads {
            self.spawn_worker().map_err(|_| Stopped)?;
        }
        let jobs = self.jobs.as_ref().ok_or(Stopped)?;
        jobs.send((self.next, block)).map_err(|_| Stopped)?;
        self.next += 1;
        Ok(())
    }

    fn spawn_worker(&mut self) -> io::Result<()> {
        let queue = self.job_queue.clone();
        let Some(done) = self.done.clone() else {
            return Ok(());
        };
        let w = std::thread::Builder::new()
            .name("build-log-bz2".into())
            .spawn(move || loop {
                let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((seq, data)) = job else { break };
                let r = compress_block(&data);
                drop(data);
                if done.send((seq, r)).is_err() {
                    break;
                }
            });
        match w {
            Ok(w) => {
                self.workers.push(w);
                Ok(())
            }
            // With no worker at all nothing would ever be compressed.
            Err(e) if self.workers.is_empty() => Err(e),
            Err(_) => {
                self.threads = self.workers.len();
                Ok(())
            }
        }
    }

    /// Waits until every submitted block is written, then returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        drop(self.done.take());
        match self.writer.join() {
            Ok(r) => r,
            Err(_) => Err(io::Error::other("the bzip2 writer thread panicked")),
        }
    }
}

/// The writer thread: appends finished streams in order, freeing a slot for each.
fn write_in_order<W: Write>(
    mut out: W,
    done: Receiver<Done>,
    slots: Receiver<()>,
) -> io::Result<W> {
    let mut waiting = BTreeMap::new();
    let mut next = 0u64;
    for (seq, r) in done {
        waiting.insert(seq, r);
        while let Some(r) = waiting.remove(&next) {
            out.write_all(&r?)?;
            next += 1;
            let _ = slots.recv();
        }
    }
    out.flush()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn bunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        bzip2::read::MultiBzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Counts the streams of a concatenation (each starts with [`STREAM_MAGIC`]; the
    /// compressed test data does not contain it by chance).
    fn streams(data: &[u8]) -> usize {
        data.windows(4).filter(|w| *w == STREAM_MAGIC).count()
    }

    fn log(n: usize) -> Vec<u8> {
        (0..)
            .flat_map(|i: u64| format!("line {i} of a log {}\n", i * 7919 % 1013).into_bytes())
            .take(n)
            .collect()
    }

    fn sequential(data: &[u8], size: usize) -> Vec<u8> {
        let mut cutter = BlockCutter::new(size);
        let mut out = Vec::new();
        cutter
            .push(data, |b| {
                out.extend(compress_block(&b).unwrap());
                Ok::<(), ()>(())
            })
            .unwrap();
        if let Some(b) = cutter.finish() {
            out.extend(compress_block(&b).unwrap());
        }
        out
    }

    #[test]
    fn cutter_cuts_at_fixed_offsets() {
        let mut c = BlockCutter::new(4);
        let mut blocks = Vec::new();
        for piece in [&b"ab"[..], b"cdefghij", b"", b"k"] {
            c.push(piece, |b| {
                blocks.push(b);
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        assert_eq!(blocks, [b"abcd".to_vec(), b"efgh".to_vec()]);
        assert_eq!(c.finish(), Some(b"ijk".to_vec()));

        let mut c = BlockCutter::new(4);
        c.push(b"abcd", |_| Ok::<(), ()>(())).unwrap();
        assert_eq!(c.finish(), None);
        assert_eq!(BlockCutter::new(4).finish(), Some(Vec::new()));
    }

    #[test]
    fn parallel_output_is_the_sequential_output() {
        let data = log(300_000);
        let want = sequential(&data, 20_000);
        assert_eq!(streams(&want), 15);
        assert_eq!(bunzip(&want), data);
        for threads in [1, 2, 5] {
            let mut p = ParallelBzip2::new(Vec::new(), threads).unwrap();
            let mut cutter = BlockCutter::new(20_000);
            for piece in data.chunks(777) {
                cutter.push(piece, |b| p.submit(b)).unwrap();
            }
            if let Some(b) = cutter.finish() {
                p.submit(b).unwrap();
            }
            assert_eq!(p.finish().unwrap(), want, "{threads} threads");
        }
    }

    #[test]
    fn a_block_fits_one_bzip2_block() {
        // Runs of 4 to 255 equal bytes are what bzip2's first stage grows most
        // (4 bytes become 5): the worst case for a block's size.
        let data: Vec<u8> = (0..BLOCK_BYTES).map(|i| (i / 4 % 251) as u8).collect();
        let z = compress_block(&data).unwrap();
        // One block header: the 48-bit magic (pi's digits) at any bit offset.
        const MAGIC: u64 = 0x3141_5926_5359;
        let mut window = 0u64;
        let mut headers = 0;
        for bit in z
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        {
            window = ((window << 1) | bit as u64) & 0xffff_ffff_ffff;
            headers += (window == MAGIC) as usize;
        }
        assert_eq!(headers, 1);
        assert_eq!(bunzip(&z), data);
    }

    /// A sink whose writes wait until its gate is dropped.
    struct Gated(Receiver<()>, Vec<u8>);

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            self.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_holds_submissions_back() {
        let (gate, gated) = mpsc::channel::<()>();
        let threads = 2;
        let data = log(100 * 1000);
        let blocks: Vec<Vec<u8>> = data.chunks(1000).map(<[u8]>::to_vec).collect();
        let submitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = submitted.clone();
        let submitter = std::thread::spawn(move || {
            let mut p = ParallelBzip2::new(Gated(gated, Vec::new()), threads).unwrap();
            for b in blocks {
                p.submit(b).unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            p.finish().unwrap().1
        });
        // Long enough for every worker to have compressed what it was given.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let held = submitted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            held <= IN_FLIGHT_PER_THREAD * threads,
            "{held} blocks taken while nothing could be written"
        );
        drop(gate);
        let out = submitter.join().unwrap();
        assert_eq!(submitted.load(std::sync::atomic::Ordering::SeqCst), 100);
        assert_eq!(bunzip(&out), data);
    }

    /// A sink that fails after `ok` writes.
    struct Failing {
        ok: usize,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::from_raw_os_error(28));
            }
            self.ok -= 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_stops_submissions_and_is_reported() {
        let mut p = ParallelBzip2::new(Failing { ok: 1 }, 2).unwrap();
        let data = log(50_000);
        let mut stopped = false;
        for b in data.chunks(1000) {
            if p.submit(b.to_vec()).is_err() {
                stopped = true;
                break;
            }
        }
        let e = p.finish().err().expect("the write error");
        assert_eq!(e.raw_os_error(), Some(28));
        // 50 blocks with 8 in flight: submissions must have noticed the failure.
        assert!(stopped);
    }
}
