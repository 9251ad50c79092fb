//! `drover daemon`: Nix 2.8's worker protocol served over a Unix socket (or one
//! connection on stdin/stdout), so unmodified Nix clients (`nix-build`,
//! `nix build`, `nix-store`, `nix copy`, …) use drover as they use
//! `nix-daemon`.
//!
//! * [`session`]: one connection as plain blocking code — the greeting, then
//!   decode request → operation on the store or the build service → encode
//!   reply (the wire format is `drover::worker_protocol`);
//! * [`options`]: what a client's `SetOptions` changes, and the warnings for
//!   what one shared Worker cannot change per client;
//! * [`activities`]: the actor system's events as Nix's activities;
//! * [`connection`]: the thin actor per client connection (on its own thread:
//!   the session blocks on the socket), with a panic contained to its
//!   connection;
//! * this module: the [`BuildService`] the sessions build through — the one
//!   shared [`crate::System`], whose event stream [`EventHub`] fans out to the
//!   clients whose requests each event serves — and the listener (the socket,
//!   systemd socket activation, `--stdio`), with `SO_PEERCRED` and
//!   `trusted-users`/`allowed-users`.

pub mod activities;
pub mod connection;
pub mod hangup;
pub mod options;
pub mod roots;
pub mod session;
pub mod store_uri;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use drover::config::Settings;
use drover::derived_path::DerivedPath;
use drover::store_path::StorePath;
use drover::worker_protocol::{LoggerMessage, ProtocolError};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::messages::BuildMode;
use crate::plan::Plan;
use crate::substituter::Substituter;
use crate::{RealiseOutcome, System, SystemEvent};

pub use connection::{serve_connection, Connection, Serve};
pub use session::{Peer, Session, Shared};

/// Why the daemon or a connection stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("I/O error on the connection: {0}")]
    Io(#[from] io::Error),
    /// An operation failed before work started, which ends the connection.
    #[error("{0}")]
    Op(String),
    #[error("creating the daemon socket '{path}': {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Nix's words for a socket-activation environment it cannot use.
    #[error("unexpected systemd environment variables")]
    SocketActivation,
    #[error("user '{0}' is not allowed to connect to the Nix daemon")]
    NotAllowed(String),
}

/// What a session builds and plans through: in the daemon, the shared actor
/// system ([`SystemBuilds`]); in tests, anything.
pub trait BuildService: Send + Sync {
    /// Nix's `queryMissing`.
    fn plan(&self, paths: &[DerivedPath]) -> Result<Plan, String>;
    /// Realises `paths`, sending the activities and messages of the builds and
    /// substitutions that serve them to `log` as they happen. A client that
    /// hangs up meanwhile (`hangup`) cancels the builds only it wanted.
    fn realise(
        &self,
        paths: Vec<DerivedPath>,
        mode: BuildMode,
        settings: &Settings,
        hangup: Option<hangup::Hangup>,
        log: &mut dyn FnMut(LoggerMessage),
    ) -> RealiseOutcome;
    /// The substituters, for substitutable-path queries.
    fn substituters(&self) -> &[Arc<dyn Substituter>];
}

type Subscriber = (
    Option<BTreeSet<StorePath>>,
    mpsc::UnboundedSender<SystemEvent>,
);

/// Fans the System's one event stream out to the realisations of every client:
/// each subscriber gets the events about the store paths it is interested in
/// (and the ones about no path, such as counters and messages).
#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<BTreeMap<u64, Subscriber>>,
    next: std::sync::atomic::AtomicU64,
}

impl EventHub {
    /// Subscribes to the events about `interest` (`None`: all events).
    pub fn subscribe(
        &self,
        interest: Option<BTreeSet<StorePath>>,
    ) -> (u64, mpsc::UnboundedReceiver<SystemEvent>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(id, (interest, tx));
        (id, rx)
    }

    pub fn unsubscribe(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands one event to every subscriber it concerns.
    pub fn dispatch(&self, ev: SystemEvent) {
        let subject = activities::Activities::subject(&ev).cloned();
        let subs = self.lock();
        for (interest, tx) in subs.values() {
            let wanted = match (&subject, interest) {
                (None, _) | (_, None) => true,
                (Some(p), Some(set)) => set.contains(p),
            };
            if wanted {
                let _ = tx.send(ev.clone());
            }
        }
    }
}

/// The actor the System sends its progress and log events to (given to
/// [`crate::SystemBuilder::progress`] and [`crate::SystemBuilder::log_events_to`]):
/// it hands each to the [`EventHub`]. A [`Flush`] answered by it means every
/// event sent to it before has been dispatched.
pub struct HubActor {
    pub hub: Arc<EventHub>,
}

impl actix::Actor for HubActor {
    type Context = actix::Context<Self>;
}

impl actix::Handler<crate::progress::ProgressEvent> for HubActor {
    type Result = ();
    fn handle(&mut self, ev: crate::progress::ProgressEvent, _: &mut Self::Context) {
        self.hub.dispatch(SystemEvent::Progress(ev));
    }
}

impl actix::Handler<crate::messages::BuildLogEvent> for HubActor {
    type Result = ();
    fn handle(&mut self, ev: crate::messages::BuildLogEvent, _: &mut Self::Context) {
        self.hub.dispatch(SystemEvent::Log(ev));
    }
}

/// Answered once the events sent to the [`HubActor`] before it are dispatched.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Flush;

impl actix::Handler<Flush> for HubActor {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut Self::Context) {}
}

/// The shared actor system as a [`BuildService`].
pub struct SystemBuilds {
    system: System,
    hub: Arc<EventHub>,
    flush: actix::Recipient<Flush>,
}

impl SystemBuilds {
    /// Wraps a system started with `hub_actor` as its progress and log-event
    /// recipient.
    pub fn new(
        system: System,
        hub: Arc<EventHub>,
        hub_actor: &actix::Addr<HubActor>,
    ) -> SystemBuilds {
        // Many clients at once: the Worker's roots go when nothing relies on them.
        drover::store::gc_roots::release_temp_roots_when_idle(system.store().state_dir());
        SystemBuilds::nested(system, hub, hub_actor)
    }

    /// [`SystemBuilds::new`] for a system inside another process's run (the
    /// builds of a recursive-Nix builder): the process's temporary-roots
    /// policy is left as it is.
    pub fn nested(
        system: System,
        hub: Arc<EventHub>,
        hub_actor: &actix::Addr<HubActor>,
    ) -> SystemBuilds {
        SystemBuilds {
            system,
            hub,
            flush: hub_actor.clone().recipient(),
        }
    }
}

/// How often a running request checks whether its client hung up.
const HANGUP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Records the narinfo queries of a plan, for the `actQueryPathInfo`
/// activities Nix's `queryMissing` shows.
struct QueryRecorder {
    store_dir: drover::store_path::StoreDir,
    queries: Mutex<Vec<(String, String)>>,
}

impl crate::plan::QueryObserver for QueryRecorder {
    fn query(
        &self,
        path: &StorePath,
        uri: &str,
        ask: &mut dyn FnMut() -> crate::plan::QueryAnswer,
    ) -> crate::plan::QueryAnswer {
        self.queries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.store_dir.print(path), uri.to_owned()));
        ask()
    }
}

impl BuildService for SystemBuilds {
    fn plan(&self, paths: &[DerivedPath]) -> Result<Plan, String> {
        self.system.plan(paths).map_err(|e| e.to_string())
    }

    fn realise(
        &self,
        paths: Vec<DerivedPath>,
        mode: BuildMode,
        settings: &Settings,
        hangup: Option<hangup::Hangup>,
        log: &mut dyn FnMut(LoggerMessage),
    ) -> RealiseOutcome {
        // The events of the builds and substitutions this request needs, and
        // the narinfo queries of the Worker's `queryMissing`.
        let recorder = QueryRecorder {
            store_dir: self.system.store().store_dir().clone(),
            queries: Mutex::new(Vec::new()),
        };
        let interest = self
            .system
            .plan_observed(&paths, Some(&recorder))
            .ok()
            .map(|p| {
                let mut s: BTreeSet<StorePath> = p.will_build;
                s.extend(p.will_substitute);
                s.extend(paths.iter().map(|d| d.base_path().clone()));
                s
            });
        let run_roots = roots::RunRoots::start();
        let requests = paths.clone();
        let (sub, mut rx) = self.hub.subscribe(interest);
        let store_dir = self.system.store().store_dir().clone();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                self.hub.unsubscribe(sub);
                return RealiseOutcome {
                    results: Vec::new(),
                    exit_status: 1,
                    errors: vec![format!("starting the connection's runtime: {e}")],
                    fatal: true,
                };
            }
        };
        let outcome = rt.block_on(async {
            let use_subs = settings.get("substitute").is_none_or(|v| v == "true");
            let queries = recorder
                .queries
                .into_inner()
                .unwrap_or_else(|e| e.into_inner());
            let mut acts = activities::Activities::start(store_dir, use_subs, queries, log);
            // The client's settings (`SetOptions`, see `options`) are its run's.
            let (run, fut) = self.system.realise_run_with(paths, mode, settings);
            tokio::pin!(fut);
            let mut watch = tokio::time::interval(HANGUP_POLL);
            let mut watching = hangup;
            let outcome = loop {
                tokio::select! {
                    out = &mut fut => break out,
                    Some(ev) = rx.recv() => acts.event(ev, log),
                    _ = watch.tick(), if watching.is_some() => {
                        if watching.is_some_and(|h| h.hung_up()) {
                            log::debug!("the client hung up: cancelling its run {run}");
                            self.system.cancel_run(run);
                            watching = None;
                        }
                    }
                }
            };
            // Events the Worker sent before its outcome, still on their way.
            let _ = self.flush.send(Flush).await;
            while let Ok(ev) = rx.try_recv() {
                acts.event(ev, log);
            }
            acts.finish(log);
            outcome
        });
        self.hub.unsubscribe(sub);
        run_roots.finish(self.system.store(), &requests, &outcome);
        outcome
    }

    fn substituters(&self) -> &[Arc<dyn Substituter>] {
        self.system.substituters()
    }
}

/// Where the daemon listens: `NIX_DAEMON_SOCKET_PATH`, else
/// `<state dir>/daemon-socket/socket`, as Nix 2.8.
pub fn socket_path(settings: &Settings) -> PathBuf {
    match std::env::var_os("NIX_DAEMON_SOCKET_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => settings.state_dir().join("daemon-socket").join("socket"),
    }
}

/// Creates the listening socket as `nix-daemon` does: its directory, the old
/// socket removed, mode 0666 so every user can connect. With systemd socket
/// activation (`LISTEN_FDS=1` and `LISTEN_PID` ours), fd 3 is used instead.
pub fn listen(path: &Path) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::io::FromRawFd;
    if let Some(fds) = std::env::var_os("LISTEN_FDS") {
        let pid = std::env::var("LISTEN_PID").unwrap_or_default();
        if fds != "1" || pid != std::process::id().to_string() {
            return Err(DaemonError::SocketActivation);
        }
        // SAFETY: systemd passes the listening socket as fd 3 (SD_LISTEN_FDS_START).
        let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(3) };
        let _ = nix::fcntl::fcntl(
            3,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        return Ok(l);
    }
    let sock = |source| DaemonError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock(e)),
    }
    let l = drover::store::unix_socket::bind(path).map_err(sock)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(sock)?;
    Ok(l)
}

fn user_matches(entries: &[String], user: &str, gids: &[u32]) -> bool {
    entries.iter().any(|e| {
        if e == "*" || e == user {
            return true;
        }
        if let Some(g) = e.strip_prefix('@') {
            if let Ok(Some(group)) = nix::unistd::Group::from_name(g) {
                return gids.contains(&group.gid.as_raw()) || group.mem.iter().any(|m| m == user);
            }
        }
        false
    })
}

/// Nix 2.8's access check for a client of uid `uid`: trusted when in
/// `trusted-users`, allowed when trusted or in `allowed-users`.
pub fn authorise(settings: &Settings, uid: u32, gid: u32) -> Result<Peer, DaemonError> {
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let words = |n: &str| -> Vec<String> {
        settings
            .get(n)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let trusted = user_matches(&words("trusted-users"), &name, &[gid]);
    if !trusted && !user_matches(&words("allowed-users"), &name, &[gid]) {
        return Err(DaemonError::NotAllowed(name));
    }
    Ok(Peer {
        uid: Some(uid),
        trusted,
    })
}
