//! The per-build daemon of recursive Nix (Nix 2.8's `startDaemon`/`stopDaemon`):
//! while the builder of a `recursive-nix` derivation runs, its socket
//! (`<build dir>/.nix-socket`, made by `drover::build::recursive_nix`) is served
//! by drover's worker-protocol session with the restricted store's rules
//! ([`RestrictedPaths`]): one thread accepts, one thread per connection serves
//! it as an untrusted client.
//!
//! Builds asked for through the socket run in a system of their own, started
//! with the daemon and stopped with it, as Nix runs them in a fresh `Worker`:
//! they do not wait for the build slot the outer build holds (with
//! `max-jobs = 1` the outer build would otherwise wait for itself). It shares
//! the store, the settings and so the locks with the outer system.
//!
//! When the builder is gone, [`RecursiveDaemon::stop`] shuts the socket and the
//! connections down, joins their threads, stops the inner system and returns
//! the added paths: the outputs may refer to them.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use actix::Actor;
use drover::config::Settings;
use drover::store::LocalStore;
use drover::store_path::StorePathSet;
use thiserror::Error;

use crate::daemon::hangup::Hangup;
use crate::daemon::session::{Materialise, RestrictedPaths};
use crate::daemon::{EventHub, HubActor, Peer, Session, Shared, SystemBuilds};
use crate::substituter::Substituter;
use crate::SystemBuilder;

/// Why the daemon of a recursive-Nix build could not start.
#[derive(Debug, Error)]
pub enum RecursiveError {
    #[error("starting the recursive Nix daemon's thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("starting the actor system for recursive Nix builds: {0}")]
    System(String),
}

/// The read buffer of a connection, as the daemon's.
const READ_BUFFER: usize = 32 << 10;

/// The inner actor system, on a thread of its own.
struct InnerSystem {
    stop: actix::System,
    thread: JoinHandle<()>,
}

/// A running per-build daemon.
pub struct RecursiveDaemon {
    allowed: Arc<RestrictedPaths>,
    listener: RawFd,
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Connections>>,
    inner: Option<InnerSystem>,
}

#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, (UnixStream, JoinHandle<()>)>,
    finished: Vec<JoinHandle<()>>,
}

impl RecursiveDaemon {
    /// Serves `listener` for a build whose input closure is `inputs`.
    /// `materialise` makes an added path visible in the build's sandbox.
    pub fn start(
        listener: UnixListener,
        store: Arc<LocalStore>,
        settings: &Settings,
        substituters: Option<Vec<Arc<dyn Substituter>>>,
        inputs: StorePathSet,
        materialise: Option<Materialise>,
    ) -> Result<RecursiveDaemon, RecursiveError> {
        let (builds, inner) = start_inner(store.clone(), settings, substituters)?;
        let allowed = Arc::new(RestrictedPaths::new(inputs, materialise));
        let shared = Arc::new(Shared {
            store,
            settings: settings.clone(),
            builds: Arc::new(builds),
        });
        let connections = Arc::new(Mutex::new(Connections::default()));
        let fd = listener.as_raw_fd();
        let accept = {
            let (allowed, connections) = (allowed.clone(), connections.clone());
            std::thread::Builder::new()
                .name("drover-recursive-accept".into())
                .spawn(move || accept_loop(listener, shared, allowed, connections))
                .map_err(RecursiveError::Thread)?
        };
        Ok(RecursiveDaemon {
            allowed,
            listener: fd,
            accept: Some(accept),
            connections,
            inner: Some(inner),
        })
    }

    /// The paths the builder added so far.
    pub fn added(&self) -> StorePathSet {
        self.allowed.added()
    }

    /// Stops serving (Nix's `stopDaemon`): no new connections, the open ones
    /// shut down, their threads joined, the inner system stopped. Returns the
    /// added paths.
    pub fn stop(mut self) -> StorePathSet {
        self.shutdown();
        self.allowed.added()
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        // A listening socket shut down makes `accept` fail with EINVAL.
        // SAFETY: the fd is the listener's, owned by the accept thread until
        // it returns (joined below).
        unsafe { libc::shutdown(self.listener, libc::SHUT_RDWR) };
        let _ = accept.join();
        let (open, finished) = {
            let mut c = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut c.open), std::mem::take(&mut c.finished))
        };
        for (stream, thread) in open.into_values() {
            // What a builder left behind no longer gets answers.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        for t in finished {
            let _ = t.join();
        }
        if let Some(inner) = self.inner.take() {
            inner.stop.stop();
            let _ = inner.thread.join();
        }
    }
}

impl Drop for RecursiveDaemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Nix's `addDependency` for a sandboxed build: the added path appears in the
/// chroot's store. The chroot's store directory is a directory on the host
/// (the builder's root is bind-mounted from it), so a copy made there from the
/// host is visible inside: files are hard-linked (copied across file
/// systems), directories made again with the original's mode, symlinks
/// recreated.
pub fn sandbox_materialiser(
    store: &Arc<LocalStore>,
    chroot: &drover::build::sandbox::Chroot,
) -> Materialise {
    let store = store.clone();
    let mut in_root = chroot.root.as_os_str().to_owned();
    in_root.push(&chroot.store_dir);
    let in_root = std::path::PathBuf::from(in_root);
    Box::new(move |p| {
        let printed = store.store_dir().print(p);
        let target = in_root.join(p.base_name());
        if target.symlink_metadata().is_ok() {
            return Err(format!(
                "store path '{printed}' already exists in the sandbox"
            ));
        }
        log::debug!("materialising '{printed}' in the sandbox");
        link_tree(&store.real_path(p), &target)
            .map_err(|e| format!("could not add path '{printed}' to sandbox: {e}"))
    })
}

fn link_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let meta = from.symlink_metadata()?;
    let ty = meta.file_type();
    if ty.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else if ty.is_dir() {
        std::fs::create_dir(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            link_tree(&e.path(), &to.join(e.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions())
    } else {
        match std::fs::hard_link(from, to) {
            Ok(()) => Ok(()),
            Err(_) => std::fs::copy(from, to).map(|_| ()),
        }
    }
}

/// Starts the system the builder's builds run in.
fn start_inner(
    store: Arc<LocalStore>,
    settings: &Settings,
    substituters: Option<Vec<Arc<dyn Substituter>>>,
) -> Result<(SystemBuilds, InnerSystem), RecursiveError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let settings = settings.clone();
    let thread = std::thread::Builder::new()
        .name("drover-recursive-system".into())
        .spawn(move || {
            let runner = actix::System::new();
            let started = runner.block_on(async move {
                let hub = Arc::new(EventHub::default());
                let hub_actor = HubActor { hub: hub.clone() }.start();
                let mut builder = SystemBuilder::new(&settings);
                if let Some(s) = substituters {
                    builder = builder.substituters(s);
                }
                builder
                    .store(store)
                    .echo(false)
                    .print_build_lines(false)
                    .goal_events(false)
                    .progress(hub_actor.clone().recipient())
                    .log_events_to(hub_actor.clone().recipient())
                    .start()
                    .map(|(system, _events)| SystemBuilds::nested(system, hub, &hub_actor))
                    .map_err(|e| e.to_string())
            });
            let ok = started.is_ok();
            let _ = tx.send((started, actix::System::current()));
            if ok {
                let _ = runner.run();
            }
        })
        .map_err(RecursiveError::Thread)?;
    match rx.recv() {
        Ok((Ok(builds), stop)) => Ok((builds, InnerSystem { stop, thread })),
        Ok((Err(e), _)) => {
            let _ = thread.join();
            Err(RecursiveError::System(e))
        }
        Err(_) => {
            let _ = thread.join();
            Err(RecursiveError::System("its thread ended".into()))
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    allowed: Arc<RestrictedPaths>,
    connections: Arc<Mutex<Connections>>,
) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EINVAL once `stop` shut the socket down.
            Err(e) => {
                log::debug!("recursive Nix daemon shutting down: {e}");
                return;
            }
        };
        log::debug!("received daemon connection");
        let (Ok(write), Ok(watch)) = (stream.try_clone(), stream.try_clone()) else {
            log::error!("cannot duplicate a recursive Nix client socket");
            continue;
        };
        let mut c = connections.lock().unwrap_or_else(|e| e.into_inner());
        let id = c.next;
        c.next += 1;
        let (shared, allowed, conns) = (shared.clone(), allowed.clone(), connections.clone());
        let spawned = std::thread::Builder::new()
            .name("drover-recursive-conn".into())
            .spawn(move || {
                let hangup = Hangup::new(stream.as_raw_fd());
                let read = BufReader::with_capacity(READ_BUFFER, stream);
                let peer = Peer {
                    uid: None,
                    trusted: false,
                };
                match Session::new(&shared, peer, read, write)
                    .watch_hangup(Some(hangup))
                    .restricted(allowed)
                    .serve()
                {
                    Ok(ops) => log::debug!("terminated daemon connection ({ops} operations)"),
                    Err(e) => log::debug!("recursive Nix connection ended: {e}"),
                }
                let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, t)) = c.open.remove(&id) {
                    c.finished.push(t);
                }
            });
        match spawned {
            Ok(t) => {
                c.open.insert(id, (watch, t));
            }
            Err(e) => log::error!("starting a recursive Nix connection's thread: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Starts a daemon on a socket in a scratch root; the connection is
    /// served (the greeting is answered), and `stop` ends it, refuses new
    /// connections and returns what was added (nothing here).
    #[test]
    fn stop_ends_the_connections_and_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::for_root(dir.path(), "").unwrap();
        let store = Arc::new(LocalStore::open(&settings).unwrap());
        let path = dir.path().join(".nix-socket");
        let listener = drover::store::unix_socket::bind(&path).unwrap();
        let daemon = RecursiveDaemon::start(
            listener,
            store,
            &settings,
            Some(Vec::new()),
            StorePathSet::new(),
            None,
        )
        .unwrap();
        let mut client = drover::store::unix_socket::connect(&path).unwrap();
        // WORKER_MAGIC_1; the server answers WORKER_MAGIC_2 and its version.
        client.write_all(&0x6e697863u64.to_le_bytes()).unwrap();
        let mut answer = [0u8; 16];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(
            u64::from_le_bytes(answer[..8].try_into().unwrap()),
            0x6478696f
        );
        assert!(daemon.added().is_empty());
        assert!(daemon.stop().is_empty());
        // The session is gone: the client reads the end of the stream.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        // And nobody accepts any more.
        let refused = drover::store::unix_socket::connect(&path)
            .and_then(|mut c| c.write_all(&[0u8; 8]).and_then(|_| c.read(&mut [0u8; 8])));
        assert!(!matches!(refused, Ok(n) if n > 0), "{refused:?}");
    }
}
