//! Reading a builder's pty on the arbiter, without a thread per build.
//!
//! The pty master is made non-blocking and registered with the runtime's reactor
//! ([`tokio::io::unix::AsyncFd`]); [`pump`] reads what is there (at most
//! [`READ_CHUNK`] bytes a read, as Nix reads), joins what is available into one
//! batch of at most [`BATCH_BYTES`], and hands it to the build's collector with
//! `send(..).await`. It reads nothing more until the collector has handled the batch,
//! so a flooding builder blocks on its full pty as under Nix, and memory per build
//! stays bounded by one batch. The build is over at EOF: a read of 0 or `EIO` once
//! every holder of the slave has closed it (background children included).
//!
//! Before, a thread per build read the pty and passed chunks through a bounded
//! channel to a forwarding future: a thread creation and two cross-thread wake-ups
//! per build, each waiting for a core on a loaded machine.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use actix::Recipient;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::log_collector::forward::{BATCH_BYTES, READ_CHUNK};
use crate::messages::LogBytes;

/// What [`pump`] moved: bytes read and batches delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpStats {
    pub bytes: u64,
    pub batches: u64,
}

/// Why the pty could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("making the builder's pseudoterminal non-blocking: {0}")]
    NonBlocking(nix::Error),
    #[error("registering the builder's pseudoterminal with the reactor: {0}")]
    Register(io::Error),
    #[error("reading the builder's pseudoterminal: {0}")]
    Read(io::Error),
}

/// One non-blocking read of the master: `Ok(0)` is EOF (`EIO` included).
fn read_once(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is open.
    let r = unsafe { nix::libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if r >= 0 {
        return Ok(r as usize);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(nix::libc::EIO) {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Reads `master` until EOF, delivering its bytes to `to` in batches (see the
/// module doc). A collector that is gone makes the rest be read and dropped, so the
/// builder is never blocked on a pty nobody reads. Must run inside a tokio runtime
/// with I/O enabled (an actix arbiter).
pub async fn pump(master: OwnedFd, to: Recipient<LogBytes>) -> Result<PumpStats, PtyError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(master.as_raw_fd(), FcntlArg::F_GETFL).map_err(PtyError::NonBlocking)?;
    fcntl(
        master.as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(PtyError::NonBlocking)?;
    // SAFETY: an `OwnedFd` keeps its descriptor open, and the same, for its lifetime,
    // which the `AsyncFd` owning it does not outlive.
    let fd = unsafe { AsyncFd::register_with_interest(master, Interest::READABLE) }
        .map_err(|e| PtyError::Register(e.into_parts().1))?;
    let mut stats = PumpStats::default();
    let mut open = true;
    loop {
        // Reads go straight into the batch, allocated once at its full size.
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
        let mut eof = false;
        // Wait until readable, then read what is there, up to one batch.
        let mut guard = fd.readable().await.map_err(PtyError::Read)?;
        while batch.len() + READ_CHUNK <= BATCH_BYTES {
            let filled = batch.len();
            batch.resize(filled + READ_CHUNK, 0);
            let r = read_once(guard.get_inner(), &mut batch[filled..]);
            batch.truncate(filled + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(PtyError::Read(e)),
            }
        }
        drop(guard);
        if !batch.is_empty() {
            if batch.len() < BATCH_BYTES / 2 {
                // A small batch does not hold a whole batch's memory while queued.
                batch.shrink_to_fit();
            }
            stats.bytes += batch.len() as u64;
            if open {
                stats.batches += 1;
                open = to.send(LogBytes(batch)).await.is_ok();
            }
        }
        if eof {
            return Ok(stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::prelude::*;
    use std::io::Write;

    /// Collects what it is sent.
    struct Sink(Vec<u8>, usize);
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<LogBytes> for Sink {
        type Result = ();
        fn handle(&mut self, m: LogBytes, _: &mut Context<Self>) {
            assert!(m.0.len() <= BATCH_BYTES);
            self.0.extend_from_slice(&m.0);
            self.1 += 1;
        }
    }
    #[derive(Message)]
    #[rtype(result = "(Vec<u8>, usize)")]
    struct Take;
    impl Handler<Take> for Sink {
        type Result = MessageResult<Take>;
        fn handle(&mut self, _: Take, _: &mut Context<Self>) -> Self::Result {
            MessageResult((std::mem::take(&mut self.0), self.1))
        }
    }

    fn pty() -> (OwnedFd, std::fs::File) {
        let p = nix::pty::openpty(None, None).unwrap();
        // Raw mode: bytes pass unchanged (no `\n` → `\r\n`), as the builder's pty.
        let mut t = nix::sys::termios::tcgetattr(&p.slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&p.slave, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();
        (p.master, std::fs::File::from(p.slave))
    }

    #[actix::test]
    async fn delivers_everything_in_bounded_batches_until_eof() {
        let sink = Sink(Vec::new(), 0).start();
        let (master, mut slave) = pty();
        // More than a pty buffer holds: the writer blocks until the pump reads.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            slave.write_all(&data).unwrap();
            // dropping the slave closes it: EOF (EIO) on the master
        });
        let stats = pump(master, sink.clone().recipient()).await.unwrap();
        writer.join().unwrap();
        let (got, batches) = sink.send(Take).await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ or are out of order");
        assert_eq!(stats.bytes, expected.len() as u64);
        assert_eq!(stats.batches as usize, batches);
        assert!(batches >= expected.len() / BATCH_BYTES);
    }

    #[actix::test]
    async fn eof_without_output_and_a_gone_collector_drains() {
        let sink = Sink(Vec::new(), 0).start();
        let (master, slave) = pty();
        drop(slave);
        let stats = pump(master, sink.recipient()).await.unwrap();
        assert_eq!(stats, PumpStats::default());

        // A collector that has stopped: the pump still reads to EOF.
        let gone = Sink(Vec::new(), 0).start();
        let r = gone.clone().recipient::<LogBytes>();
        gone.send(StopSink).await.unwrap();
        let (master, mut slave) = pty();
        let writer = std::thread::spawn(move || {
            slave.write_all(&vec![b'x'; 100_000]).unwrap();
        });
        let stats = pump(master, r).await.unwrap();
        writer.join().unwrap();
        assert_eq!(stats.bytes, 100_000);
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct StopSink;
    impl Handler<StopSink> for Sink {
        type Result = ();
        fn handle(&mut self, _: StopSink, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }
}
