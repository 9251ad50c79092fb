//! Carrying raw output from a blocking reader thread (a builder's pty, a hook's fd 4)
//! to a LogCollector with back-pressure.
//!
//! `do_send` bypasses a mailbox's capacity: a builder that writes faster than its
//! log is compressed would otherwise pile its whole output up in the collector's
//! mailbox. Here the reader thread hands chunks to a channel of
//! [`FORWARD_CHUNKS`] chunks and blocks when it is full, so it stops reading and the
//! kernel's pty buffer blocks the builder's writes, as in Nix, whose single thread
//! reads no more than it has written. The [`Forwarder`] future, run on the arbiter,
//! delivers one chunk at a time with `send(..).await`, which returns only once the
//! collector has handled it (and the collector itself waits for its writer thread).
//! Nothing is dropped: every chunk read reaches the collector, in order.
//!
//! Memory held per build is thus at most [`FORWARD_CHUNKS`] chunks of at most
//! [`READ_CHUNK`] bytes and one batch of [`BATCH_BYTES`] here, plus the writer's own
//! bounded queue.

use std::future::Future;

use actix::Recipient;
use tokio::sync::mpsc;

use crate::messages::LogBytes;

/// Chunks a reader may have read ahead of the collector.
pub const FORWARD_CHUNKS: usize = 16;

/// The most a pty read gives (Nix reads 4096 bytes at a time); the collector
/// counts a batch against `max-build-log-size` in pieces of this size.
pub const READ_CHUNK: usize = 4096;

/// Queued chunks are joined into messages of up to this many bytes.
pub const BATCH_BYTES: usize = FORWARD_CHUNKS * READ_CHUNK;

/// The reader thread's end: [`send`](Self::send) blocks while the channel is full.
/// Dropping it ends the [`Forwarder`] once the chunks before are delivered.
pub struct ChunkSender {
    tx: mpsc::Sender<Vec<u8>>,
}

impl ChunkSender {
    /// Queues a copy of `chunk`, blocking while [`FORWARD_CHUNKS`] are queued.
    /// Returns false when the forwarder is gone (the caller should keep draining
    /// its source, so that the writer is not blocked for ever). Must not be called
    /// from inside an async runtime.
    pub fn send(&self, chunk: &[u8]) -> bool {
        if chunk.is_empty() {
            return true;
        }
        self.tx.blocking_send(chunk.to_vec()).is_ok()
    }
}

/// Delivers the chunks of a [`ChunkSender`] to a collector, one `send` at a time.
pub type Forwarder = std::pin::Pin<Box<dyn Future<Output = ForwardStats>>>;

/// What a [`Forwarder`] delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Chunks handed to the collector.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A sender for the reader thread and the future that forwards to `to`; the future
/// completes when the sender has been dropped and everything is delivered. A
/// collector that has stopped makes the remaining chunks be discarded (the build
/// is over then), never blocks the reader.
pub fn channel(to: Recipient<LogBytes>) -> (ChunkSender, Forwarder) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(FORWARD_CHUNKS);
    let fwd = async move {
        let mut stats = ForwardStats::default();
        let mut open = true;
        while let Some(mut chunk) = rx.recv().await {
            if !open {
                continue;
            }
            // What queued up meanwhile goes in the same message: one round trip
            // to the collector per batch, not per read (it handles the batch in
            // read-sized pieces, see `READ_CHUNK`).
            while chunk.len() < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(more) => chunk.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            stats.chunks += 1;
            stats.bytes += chunk.len() as u64;
            open = to.send(LogBytes(chunk)).await.is_ok();
        }
        stats
    };
    (ChunkSender { tx }, Box::pin(fwd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A collector that handles a chunk slowly, records what it got and counts
    /// down the chunks in flight (read by the thread, not yet handled).
    struct Slow {
        got: Vec<u8>,
        in_flight: Arc<AtomicUsize>,
    }
    impl Actor for Slow {
        type Context = Context<Self>;
    }
    impl Handler<LogBytes> for Slow {
        type Result = ();
        fn handle(&mut self, LogBytes(b): LogBytes, _: &mut Context<Self>) {
            std::thread::sleep(Duration::from_millis(1));
            self.got.extend_from_slice(&b);
            self.in_flight.fetch_sub(b.len(), Ordering::SeqCst);
        }
    }
    #[derive(Message)]
    #[rtype(result = "Vec<u8>")]
    struct Take;
    impl Handler<Take> for Slow {
        type Result = Vec<u8>;
        fn handle(&mut self, _: Take, _: &mut Context<Self>) -> Vec<u8> {
            std::mem::take(&mut self.got)
        }
    }

    #[actix_rt::test]
    async fn delivers_everything_in_order_with_a_bounded_backlog() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let slow = Slow {
            got: Vec::new(),
            in_flight: in_flight.clone(),
        }
        .start();
        let (tx, fwd) = channel(slow.clone().recipient());
        let (i2, p2) = (in_flight.clone(), peak.clone());
        let reader = std::thread::spawn(move || {
            let mut sent = Vec::new();
            for n in 0..400u32 {
                let chunk: Vec<u8> = (0..100).map(|k| (n as u8).wrapping_add(k)).collect();
                let now = i2.fetch_add(chunk.len(), Ordering::SeqCst) + chunk.len();
                p2.fetch_max(now, Ordering::SeqCst);
                assert!(tx.send(&chunk));
                sent.extend_from_slice(&chunk);
            }
            sent
        });
        let stats = fwd.await;
        let sent = reader.join().unwrap();
        assert!(stats.chunks <= 400, "{stats:?}");
        assert_eq!(stats.bytes, sent.len() as u64);
        assert_eq!(slow.send(Take).await.unwrap(), sent);
        // The reader never got further ahead of the collector (in bytes) than the
        // channel, a batch being handled and the chunk it is about to queue.
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            peak <= (FORWARD_CHUNKS + 2) * 100 + BATCH_BYTES,
            "peak backlog {peak} bytes"
        );
    }

    /// A collector that stops on its first chunk.
    struct Stopper;
    impl Actor for Stopper {
        type Context = Context<Self>;
    }
    impl Handler<LogBytes> for Stopper {
        type Result = ();
        fn handle(&mut self, _: LogBytes, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    #[actix_rt::test]
    async fn a_stopped_collector_does_not_block_the_reader() {
        let (tx, fwd) = channel(Stopper.start().recipient());
        let reader = std::thread::spawn(move || {
            for _ in 0..(FORWARD_CHUNKS * 8) {
                tx.send(b"x");
            }
        });
        let stats = fwd.await;
        reader.join().unwrap();
        // The first chunk stopped it; the rest were read and discarded.
        assert!(stats.chunks <= 2, "{stats:?}");
    }
}
