//! The actor per client connection. A session blocks on its socket, so each
//! connection actor lives on a thread of its own (a one-thread `SyncArbiter`):
//! [`Serve`] runs the [`Session`] to the end, with the thread inside the
//! connection's temporary-roots scope ([`super::roots`]). A panic while serving is caught
//! and ends only that connection. When the connection is over, the actor's
//! last address is gone and its thread ends.
//!
//! Requests are read through a buffer (as Nix's `FdSource`): a request is many
//! small fields, and reading each straight from the socket costs a system call
//! per field.

use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::prelude::*;

use super::hangup::Hangup;
use super::{Peer, Session, Shared};

/// The read buffer of a connection (Nix's `FdSource` uses 32 KiB too).
const READ_BUFFER: usize = 32 << 10;

/// One client connection.
pub struct Connection {
    shared: Arc<Shared>,
}

impl Connection {
    pub fn new(shared: Arc<Shared>) -> Connection {
        Connection { shared }
    }
}

impl Actor for Connection {
    type Context = SyncContext<Self>;
}

/// Serve this stream until the client hangs up.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Serve {
    pub stream: UnixStream,
    pub peer: Peer,
}

impl Handler<Serve> for Connection {
    type Result = ();

    fn handle(&mut self, msg: Serve, _: &mut SyncContext<Self>) {
        let Ok(write) = msg.stream.try_clone() else {
            log::error!("cannot duplicate a client socket");
            return;
        };
        // Watching for a hang-up only polls the descriptor: the buffer loses nothing.
        let hangup = Hangup::new(msg.stream.as_raw_fd());
        let read = BufReader::with_capacity(READ_BUFFER, msg.stream);
        serve_connection(&self.shared, msg.peer, read, write, Some(hangup));
    }
}

/// Runs one session on `read`/`write`, containing a panic to it; `hangup`
/// watches the client's side while its builds run.
pub fn serve_connection(
    shared: &Shared,
    peer: Peer,
    read: impl Read,
    write: impl Write,
    hangup: Option<Hangup>,
) {
    // Each of nix-daemon's connections opens the store afresh: one whose
    // database was deleted or replaced since (a wiped test root) is reopened.
    match shared.store.reopen_if_replaced(&shared.settings) {
        Ok(true) => log::info!("the store database was replaced: reopened it"),
        Ok(false) => {}
        Err(e) => log::error!("reopening the replaced store database: {e}"),
    }
    // The connection's temporary roots, in a file of their own until it ends.
    let (_roots, _scope) = super::roots::enter_connection(&shared.store);
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        Session::new(shared, peer, read, write)
            .watch_hangup(hangup)
            .serve()
    }));
    match r {
        Ok(Ok(ops)) => log::debug!("{ops} operations"),
        Ok(Err(e)) => log::debug!("connection ended: {e}"),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            log::error!("a connection panicked: {msg}");
        }
    }
}

/// Starts a connection actor on its own thread and hands it `stream`.
pub fn spawn_connection(shared: Arc<Shared>, stream: UnixStream, peer: Peer) {
    let addr = SyncArbiter::start(1, move || Connection::new(shared.clone()));
    addr.do_send(Serve { stream, peer });
}
