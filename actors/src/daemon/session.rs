//! One client connection as plain, blocking code: the greeting, then request →
//! operation → reply until the client hangs up (Nix's `processConnection` and
//! `performOp`). Nothing here knows about actix: the connection actor
//! ([`super::connection`]) runs a [`Session`] on its own thread, and tests run one
//! over a socket pair.
//!
//! The logger protocol follows Nix's `TunnelLogger`: messages produced before
//! an operation starts work are queued, `start_work` sends them, and every
//! operation ends with `STDERR_LAST` (then its reply) or `STDERR_ERROR`. An error
//! while reading a request (before work starts) is sent and ends the
//! connection, as in Nix (which sends the error twice, once from `performOp`'s
//! handler and once from `processConnection`'s); an error during work is sent
//! and the connection goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover::config::Settings;
use drover::content_address::{ContentAddress, ContentAddressMethod, FileIngestionMethod};
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::hash::{Hash, HashAlgo, HashSink};
use drover::nar;
use drover::narinfo::fingerprint_path;
use drover::signature::{PublicKeys, Signature};
use drover::store::{LocalStore, RepairFlag, StoreError, ValidPathInfo};
use drover::store_path::{StoreDir, StorePath, StorePathSet};
use drover::worker_protocol::framed::{io_to_protocol, FramedReader};
use drover::worker_protocol::reply::{
    write_build_derivation_result, write_build_result, write_opt_store_path, write_path_info,
    write_store_path, write_store_paths,
};
use drover::worker_protocol::request::{read_path_info_after_path, CaMethodAlgo};
use drover::worker_protocol::wire::{read_u64, write_bool, write_bytes, write_u64};
use drover::worker_protocol::{
    hl, server_handshake, ClientOptions, LoggerMessage, ProtocolError, Request, WireBuildMode,
};

mod restricted;
pub use restricted::{Materialise, RestrictedPaths};

use super::options::apply_client_options;
use super::{BuildService, DaemonError};
use crate::messages::BuildMode;

/// What every connection shares: the store, the daemon's settings and the
/// build service (the actor system).
pub struct Shared {
    pub store: Arc<LocalStore>,
    pub settings: Settings,
    pub builds: Arc<dyn BuildService>,
}

/// Who the client is, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: Option<u32>,
    /// Whether it may do what only trusted users may (Nix's `TrustedFlag`).
    pub trusted: bool,
}

/// Why an operation failed: its message goes to the client as `STDERR_ERROR`.
#[derive(Debug)]
pub struct OpError(pub String);

impl<E: std::error::Error> From<E> for OpError {
    fn from(e: E) -> OpError {
        OpError(e.to_string())
    }
}

fn err(msg: impl Into<String>) -> OpError {
    OpError(msg.into())
}

/// Runs a collector call, keeping its messages (the collector logs from its
/// root server's threads too) for the client.
fn with_gc_log<T>(
    f: impl FnOnce(drover::store::gc::GcLog) -> T,
) -> (T, Vec<(drover::store::gc::GcLevel, String)>) {
    let lines = std::sync::Mutex::new(Vec::new());
    let log = |level: drover::store::gc::GcLevel, msg: &str| {
        lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((level, msg.to_owned()));
    };
    let out = f(&log);
    (out, lines.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// One connection.
pub struct Session<'a, R: Read, W: Write> {
    shared: &'a Shared,
    peer: Peer,
    from: R,
    to: BufWriter<W>,
    minor: u64,
    can_send: bool,
    pending: Vec<LoggerMessage>,
    /// The client's verbosity (`SetOptions`): messages above it are not sent.
    verbosity: u64,
    /// The settings after the client's `SetOptions`.
    settings: Settings,
    /// Watches the client while its builds run.
    hangup: Option<super::hangup::Hangup>,
    /// A recursive-Nix build's connection: the restricted store's rules.
    restricted: Option<Arc<RestrictedPaths>>,
}

impl<'a, R: Read, W: Write> Session<'a, R, W> {
    pub fn new(shared: &'a Shared, peer: Peer, from: R, to: W) -> Session<'a, R, W> {
        Session {
            shared,
            peer,
            from,
            to: BufWriter::with_capacity(32 << 10, to),
            minor: 0,
            can_send: false,
            pending: Vec::new(),
            verbosity: 3,
            settings: shared.settings.clone(),
            hangup: None,
            restricted: None,
        }
    }

    /// Serves a recursive-Nix builder: only `allowed` is visible, and what it
    /// adds or builds is added to it ([`restricted`]).
    pub fn restricted(mut self, allowed: Arc<RestrictedPaths>) -> Self {
        self.restricted = Some(allowed);
        self
    }

    /// A client that hangs up while its builds run cancels them (those only it
    /// wanted).
    pub fn watch_hangup(mut self, hangup: Option<super::hangup::Hangup>) -> Self {
        self.hangup = hangup;
        self
    }

    fn sd(&self) -> &StoreDir {
        self.shared.store.store_dir()
    }

    /// Sends (or queues, outside work) a logger message.
    pub fn log(&mut self, m: LoggerMessage) -> io::Result<()> {
        if self.can_send {
            m.write(&mut self.to, self.minor)?;
            self.to.flush()
        } else {
            self.pending.push(m);
            Ok(())
        }
    }

    /// A warning line, as Nix's `warn` prints it.
    pub fn warn(&mut self, msg: &str) -> io::Result<()> {
        if self.verbosity >= 1 {
            // Nix's `Logger::warn`: the magenta `warning:` prefix (`ANSI_WARNING`),
            // which the client prints, or strips when its stderr is no terminal.
            self.log(LoggerMessage::Next(format!(
                "\x1b[35;1mwarning:\x1b[0m {msg}"
            )))
        } else {
            Ok(())
        }
    }

    fn start_work(&mut self) -> io::Result<()> {
        self.can_send = true;
        for m in std::mem::take(&mut self.pending) {
            m.write(&mut self.to, self.minor)?;
        }
        self.to.flush()
    }

    fn stop_work(&mut self, error: Option<&str>) -> io::Result<()> {
        self.can_send = false;
        match error {
            None => LoggerMessage::Last.write(&mut self.to, self.minor),
            Some(e) => LoggerMessage::Error {
                message: e.to_owned(),
                status: 1,
            }
            .write(&mut self.to, self.minor),
        }
    }

    /// Serves the connection until the client hangs up. An error is returned
    /// only for what ends the connection (a broken greeting, a bad request, an
    /// I/O error); the client has been told what it could be told.
    pub fn serve(mut self) -> Result<u64, DaemonError> {
        let hello = server_handshake(&mut self.from, &mut self.to)?;
        self.minor = hello.minor();
        self.start_work()?;
        self.stop_work(None)?;
        self.to.flush()?;
        let mut ops = 0;
        loop {
            let code = match read_u64(&mut self.from) {
                Ok(c) => c,
                Err(ProtocolError::UnexpectedEof(_)) => return Ok(ops),
                Err(e) => return Err(e.into()),
            };
            ops += 1;
            let sd = self.sd().clone();
            let req = match Request::read_op(&mut self.from, &sd, self.minor, code) {
                Ok(r) => r,
                Err(e) => {
                    // As Nix: the error from `performOp`'s handler, then again from
                    // `processConnection`'s, and the connection ends.
                    let msg = e.nix_message();
                    self.stop_work(Some(&msg))?;
                    self.stop_work(Some(&msg))?;
                    self.to.flush()?;
                    return Err(e.into());
                }
            };
            log::debug!("received daemon op {code}");
            match self.dispatch(req) {
                Ok(()) => {}
                Err(Failure::Op(OpError(msg))) => {
                    let allowed = self.can_send;
                    self.stop_work(Some(&msg))?;
                    if !allowed {
                        self.stop_work(Some(&msg))?;
                        self.to.flush()?;
                        return Err(DaemonError::Op(msg));
                    }
                }
                Err(Failure::Fatal(e)) => {
                    if self.can_send {
                        let msg = e.to_string();
                        let _ = self.stop_work(Some(&msg));
                        let _ = self.to.flush();
                    }
                    return Err(e);
                }
            }
            self.to.flush()?;
        }
    }

    fn reply(&mut self) -> &mut BufWriter<W> {
        &mut self.to
    }

    /// The operation, under the restricted store's rules when there are any.
    fn dispatch(&mut self, req: Request) -> Result<(), Failure> {
        let req = match self.restricted.clone() {
            Some(allowed) => match self.perform_restricted(&allowed, req)? {
                Some(req) => req,
                None => return Ok(()),
            },
            None => req,
        };
        self.perform(req)
    }

    fn perform(&mut self, req: Request) -> Result<(), Failure> {
        let store = self.shared.store.clone();
        let sd = store.store_dir().clone();
        match req {
            Request::IsValidPath(p) => {
                self.start_work()?;
                let v = store.is_valid_path(&p).map_err(OpError::from)?;
                self.stop_work(None)?;
                write_bool(self.reply(), v)?;
            }
            Request::QueryValidPaths { paths, substitute } => {
                self.start_work()?;
                if substitute && self.settings_use_substitutes() {
                    let v: Vec<StorePath> = paths.iter().cloned().collect();
                    let valid = store.query_valid_paths(&v).map_err(OpError::from)?;
                    let missing: Vec<DerivedPath> = paths
                        .iter()
                        .filter(|p| !valid.contains(*p))
                        .map(|p| DerivedPath::Opaque(p.clone()))
                        .collect();
                    if !missing.is_empty() {
                        // Nix's `substitutePaths`: failures are not errors here.
                        let _ = self.realise(missing, BuildMode::Normal)?;
                    }
                }
                let v: Vec<StorePath> = paths.into_iter().collect();
                let res = store.query_valid_paths(&v).map_err(OpError::from)?;
                self.stop_work(None)?;
                write_store_paths(self.reply(), &sd, &res)?;
            }
            Request::HasSubstitutes(p) => {
                self.start_work()?;
                let res = self.substitutable(&BTreeSet::from([p.clone()]))?;
                self.stop_work(None)?;
                write_bool(self.reply(), res.contains_key(&p))?;
            }
            Request::QuerySubstitutablePaths(paths) => {
                self.start_work()?;
                let res = self.substitutable(&paths)?;
                self.stop_work(None)?;
                let set: StorePathSet = res.into_keys().collect();
                write_store_paths(self.reply(), &sd, &set)?;
            }
            Request::QuerySubstitutablePathInfo(p) => {
                self.start_work()?;
                let res = self.substitutable(&BTreeSet::from([p.clone()]))?;
                self.stop_work(None)?;
                match res.get(&p) {
                    None => write_u64(self.reply(), 0)?,
                    Some(i) => {
                        let w = self.reply();
                        write_u64(w, 1)?;
                        write_opt_store_path(w, &sd, i.deriver.as_ref())?;
                        write_store_paths(w, &sd, &i.references)?;
                        write_u64(w, i.download_size.unwrap_or(0))?;
                        write_u64(w, i.nar_size)?;
                    }
                }
            }
            Request::QuerySubstitutablePathInfos(m) => {
                self.start_work()?;
                let paths: StorePathSet = m.into_keys().collect();
                let res = self.substitutable(&paths)?;
                self.stop_work(None)?;
                let w = self.reply();
                write_u64(w, res.len() as u64)?;
                for (p, i) in &res {
                    write_store_path(w, &sd, p)?;
                    write_opt_store_path(w, &sd, i.deriver.as_ref())?;
                    write_store_paths(w, &sd, &i.references)?;
                    write_u64(w, i.download_size.unwrap_or(0))?;
                    write_u64(w, i.nar_size)?;
                }
            }
            Request::QueryPathHash(p) => {
                self.start_work()?;
                let info = self.path_info(&p)?;
                self.stop_work(None)?;
                let h = info.nar_hash.encode(drover::hash::Encoding::Base16);
                write_bytes(self.reply(), h.as_bytes())?;
            }
            Request::QueryReferences(p) => {
                self.start_work()?;
                let info = self.path_info(&p)?;
                self.stop_work(None)?;
                write_store_paths(self.reply(), &sd, &info.references)?;
            }
            Request::QueryReferrers(p) => {
                self.start_work()?;
                let res = store.query_referrers(&p).map_err(OpError::from)?;
                self.stop_work(None)?;
                write_store_paths(self.reply(), &sd, &res)?;
            }
            Request::QueryValidDerivers(p) => {
                self.start_work()?;
                let res = store.query_valid_derivers(&p).map_err(OpError::from)?;
                self.stop_work(None)?;
                write_store_paths(self.reply(), &sd, &res)?;
            }
            Request::QueryDerivationOutputs(p) => {
                self.start_work()?;
                let map = self.output_map(&p)?;
                self.stop_work(None)?;
                let set: StorePathSet = map.into_values().flatten().collect();
                write_store_paths(self.reply(), &sd, &set)?;
            }
            Request::QueryDerivationOutputNames(p) => {
                self.start_work()?;
                let drv = store.read_derivation(&p).map_err(OpError::from)?;
                self.stop_work(None)?;
                let names = drv.output_names();
                drover::worker_protocol::wire::write_strings(self.reply(), names.iter())?;
            }
            Request::QueryDerivationOutputMap(p) => {
                self.start_work()?;
                let map = self.output_map(&p)?;
                self.stop_work(None)?;
                let w = self.reply();
                write_u64(w, map.len() as u64)?;
                for (name, path) in &map {
                    write_bytes(w, name.as_bytes())?;
                    write_opt_store_path(w, &sd, path.as_ref())?;
                }
            }
            Request::QueryDeriver(p) => {
                self.start_work()?;
                let info = self.path_info(&p)?;
                self.stop_work(None)?;
                write_opt_store_path(self.reply(), &sd, info.deriver.as_ref())?;
            }
            Request::QueryPathFromHashPart(h) => {
                self.start_work()?;
                let p = store.query_path_from_hash_part(&h).map_err(OpError::from)?;
                self.stop_work(None)?;
                write_opt_store_path(self.reply(), &sd, p.as_ref())?;
            }
            Request::QueryAllValidPaths => {
                self.start_work()?;
                let res = store.query_all_valid_paths().map_err(OpError::from)?;
                self.stop_work(None)?;
                write_store_paths(self.reply(), &sd, &res)?;
            }
            Request::QueryPathInfo(p) => {
                self.start_work()?;
                let info = store.query_path_info(&p).map_err(OpError::from)?;
                self.stop_work(None)?;
                let minor = self.minor;
                let w = self.reply();
                match info {
                    Some(i) => {
                        write_u64(w, 1)?;
                        write_path_info(w, &sd, &i, minor)?;
                    }
                    None => write_u64(w, 0)?,
                }
            }
            Request::AddToStore {
                name,
                method,
                references,
                repair,
            } => {
                self.start_work()?;
                let result = self.add_to_store(&name, method, &references, repair);
                let info = result?;
                self.stop_work(None)?;
                let minor = self.minor;
                let w = self.reply();
                write_store_path(w, &sd, &info.path)?;
                write_path_info(w, &sd, &info, minor)?;
            }
            Request::AddTextToStore {
                name,
                text,
                references,
            } => {
                self.start_work()?;
                let p = store
                    .add_text_to_store(&name, &text, &references)
                    .map_err(OpError::from)?;
                self.stop_work(None)?;
                write_store_path(self.reply(), &sd, &p)?;
            }
            Request::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                let mut info = *info;
                let check_sigs = !(dont_check_sigs && self.peer.trusted);
                if !self.peer.trusted {
                    info.ultimate = false;
                }
                self.start_work()?;
                let mut framed = FramedReader::new(&mut self.from);
                let r = add_nar(
                    &store,
                    &self.settings,
                    &info,
                    repair,
                    check_sigs,
                    &mut framed,
                    true,
                );
                framed.finish().map_err(Failure::from_protocol)?;
                r?;
                self.stop_work(None)?;
            }
            Request::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                let check_sigs = !(dont_check_sigs && self.peer.trusted);
                self.start_work()?;
                let mut framed = FramedReader::new(&mut self.from);
                let r = add_multiple(&store, &self.settings, repair, check_sigs, &mut framed);
                framed.finish().map_err(Failure::from_protocol)?;
                r?;
                self.stop_work(None)?;
            }
            Request::AddSignatures { path, sigs } => {
                self.start_work()?;
                if !self.peer.trusted {
                    return Err(err("you are not privileged to add signatures").into());
                }
                store.add_signatures(&path, &sigs).map_err(OpError::from)?;
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::AddBuildLog(drv) => {
                self.start_work()?;
                let mut framed = FramedReader::new(&mut self.from);
                let mut log = Vec::new();
                let r = (&mut framed)
                    .take(drover::worker_protocol::wire::MAX_STRING_LEN)
                    .read_to_end(&mut log)
                    .map_err(io_to_protocol);
                framed.finish().map_err(Failure::from_protocol)?;
                r.map_err(Failure::from_protocol)?;
                if !self.peer.trusted {
                    return Err(err("you are not privileged to add logs").into());
                }
                add_build_log(&self.settings, &drv, &log)?;
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::RegisterDrvOutput(r) => {
                self.start_work()?;
                store.register_realisation(&r).map_err(OpError::from)?;
                self.stop_work(None)?;
            }
            Request::QueryRealisation(id) => {
                self.start_work()?;
                let r = store.query_realisation(&id).map_err(OpError::from)?;
                self.stop_work(None)?;
                let w = self.reply();
                write_u64(w, r.is_some() as u64)?;
                if let Some(r) = r {
                    write_bytes(w, r.to_json().as_bytes())?;
                }
            }
            Request::AddTempRoot(p) => {
                self.start_work()?;
                store.add_temp_root(&p).map_err(OpError::from)?;
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::AddIndirectRoot(link) => {
                let link = absolute(&link);
                self.start_work()?;
                drover::store::gc_roots::add_indirect_root(store.state_dir(), &link)
                    .map_err(OpError::from)?;
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::SyncWithGC => {
                self.start_work()?;
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::FindRoots => {
                self.start_work()?;
                // Untrusted clients get the links of other users' roots censored.
                let (roots, lines) = with_gc_log(|log| {
                    drover::store::gc::find_roots(&store, !self.peer.trusted, log)
                });
                self.forward_gc_log(lines)?;
                let roots = roots.map_err(OpError::from)?;
                self.stop_work(None)?;
                let sd = store.store_dir().clone();
                let n: usize = roots.values().map(|links| links.len()).sum();
                write_u64(self.reply(), n as u64)?;
                for (target, links) in &roots {
                    for link in links {
                        write_bytes(self.reply(), link.as_bytes())?;
                        write_bytes(self.reply(), sd.print(target).as_bytes())?;
                    }
                }
            }
            Request::CollectGarbage {
                action,
                paths,
                ignore_liveness,
                max_freed,
            } => {
                self.start_work()?;
                if ignore_liveness {
                    return Err(err("you are not allowed to ignore liveness").into());
                }
                use drover::store::gc::{GcAction, GcOptions};
                let action = match action {
                    0 => GcAction::ReturnLive,
                    1 => GcAction::ReturnDead,
                    2 => GcAction::DeleteDead,
                    3 => GcAction::DeleteSpecific,
                    other => {
                        return Err(err(format!("invalid garbage collector action {other}")).into())
                    }
                };
                let options = GcOptions {
                    action,
                    ignore_liveness: false,
                    paths_to_delete: paths,
                    max_freed,
                };
                let mut results = drover::store::gc::GcResults::default();
                let (done, lines) = with_gc_log(|log| {
                    drover::store::gc::collect_garbage_into(&store, &options, &mut results, log)
                });
                self.forward_gc_log(lines)?;
                done.map_err(OpError::from)?;
                self.stop_work(None)?;
                drover::worker_protocol::wire::write_strings(self.reply(), results.paths.iter())?;
                write_u64(self.reply(), results.bytes_freed)?;
                write_u64(self.reply(), 0)?;
            }
            Request::SetOptions(o) => {
                self.start_work()?;
                self.set_options(o)?;
                self.stop_work(None)?;
            }
            Request::OptimiseStore => {
                self.start_work()?;
                optimise_store(&store)?;
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::VerifyStore {
                check_contents,
                repair,
            } => {
                self.start_work()?;
                if repair && !self.peer.trusted {
                    return Err(err("you are not privileged to repair paths").into());
                }
                if repair {
                    return Err(err(
                        "repairing the store through the daemon is not yet supported by drover",
                    )
                    .into());
                }
                let errors = self.verify_store(check_contents)?;
                self.stop_work(None)?;
                write_bool(self.reply(), errors)?;
            }
            Request::NarFromPath(p) => {
                self.start_work()?;
                if !store.is_valid_path(&p).map_err(OpError::from)? {
                    return Err(err(format!("path '{}' is not valid", hl(sd.print(&p)))).into());
                }
                self.stop_work(None)?;
                let real = store.real_path(&p);
                // An error in the middle of the NAR cannot be reported: the
                // client is reading a NAR; like Nix, the connection ends.
                nar::dump_path(&real, &mut self.to)
                    .map_err(|e| Failure::Fatal(DaemonError::Op(e.to_string())))?;
            }
            Request::QueryMissing(paths) => {
                self.start_work()?;
                let plan = self.shared.builds.plan(&paths).map_err(OpError)?;
                self.stop_work(None)?;
                let w = self.reply();
                write_store_paths(w, &sd, &plan.will_build)?;
                write_store_paths(w, &sd, &plan.will_substitute)?;
                write_store_paths(w, &sd, &plan.unknown)?;
                write_u64(w, plan.download_size)?;
                write_u64(w, plan.nar_size)?;
            }
            Request::EnsurePath(p) => {
                self.start_work()?;
                let outcome =
                    self.realise(vec![DerivedPath::Opaque(p.clone())], BuildMode::Normal)?;
                if outcome.exit_status != 0 {
                    // Nix's `ensurePath`: a substitution goal has no error of its own.
                    if outcome.fatal {
                        return Err(err(outcome.errors.join("\n")).into());
                    }
                    return Err(err(format!(
                        "path '{}' does not exist and cannot be created",
                        hl(sd.print(&p))
                    ))
                    .into());
                }
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::BuildPaths { paths, mode } => {
                let mode = self.build_mode(mode)?;
                self.start_work()?;
                let outcome = self.realise(paths, mode)?;
                if outcome.exit_status != 0 {
                    return Err(err(self.build_error(&outcome)?).into());
                }
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::BuildPathsWithResults { paths, mode } => {
                let mode = self.build_mode(mode)?;
                self.start_work()?;
                let outcome = self.realise(paths.clone(), mode)?;
                // Nix's `buildPathsWithResults` answers failed builds with their
                // results, and throws only what ends the run itself (a
                // derivation's fatal error such as an impure input).
                if outcome.fatal || outcome.results.len() != paths.len() {
                    return Err(err(self.build_error(&outcome)?).into());
                }
                self.stop_work(None)?;
                let w = self.reply();
                write_u64(w, outcome.results.len() as u64)?;
                for r in &outcome.results {
                    write_build_result(w, &sd, &r.path, &r.result)?;
                }
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                let mode = self.build_mode(mode)?;
                self.start_work()?;
                // As Nix's daemon: an untrusted client may build only
                // content-addressed (or impure) derivations, whose outputs prove
                // themselves; its derivation is written to the store and that one
                // built, as the path it named cannot be trusted.
                let drv_type = drv.derivation_type().map_err(|e| err(e.to_string()))?;
                if !(drv_type.is_ca() || self.peer.trusted) {
                    return Err(
                        err("you are not privileged to build input-addressed derivations").into(),
                    );
                }
                // The `.drv` a `BasicDerivation` makes (no input derivations:
                // they are resolved to sources), at its text path.
                let name = drover::derivation::name_from_drv_path(&drv_path)
                    .map_err(|e| err(e.to_string()))?;
                let drv_name = format!("{name}{}", drover::derivation::DRV_EXTENSION);
                let contents = drv.to_aterm_bytes(&sd);
                let references = drv.drv_references();
                let written = sd
                    .text_path_of(&drv_name, &contents, &references)
                    .map_err(|e| err(e.to_string()))?;
                let write = |store: &LocalStore| {
                    store
                        .add_text_to_store(&drv_name, &contents, &references)
                        .map_err(OpError::from)
                };
                let drv_path = if !self.peer.trusted {
                    write(&store)?
                } else if !store.is_valid_path(&drv_path).map_err(OpError::from)?
                    && written == drv_path
                {
                    // A trusted client's derivation without input derivations
                    // (a resolved one, as `build-remote` sends): the one it names.
                    write(&store)?
                } else {
                    drv_path
                };
                // drover builds from the `.drv` in the store (with its input
                // derivations); any other derivation only the client has is refused.
                if !store.is_valid_path(&drv_path).map_err(OpError::from)? {
                    return Err(err(format!(
                        "building derivation '{}' that is not in the store is not yet supported by drover",
                        sd.print(&drv_path)
                    ))
                    .into());
                }
                let outputs: BTreeSet<String> = drv.outputs.keys().cloned().collect();
                let req = DerivedPath::Built {
                    drv_path,
                    outputs: OutputsSpec::Names(outputs),
                };
                let outcome = self.realise(vec![req], mode)?;
                // Nix's `buildDerivation` turns an error out of the run into a
                // `MiscFailure` result carrying its message.
                let fatal = outcome.fatal;
                let res = outcome
                    .results
                    .into_iter()
                    .next()
                    .map(|r| r.result)
                    .filter(|_| !fatal)
                    .unwrap_or_else(|| {
                        drover::build_result::BuildResult::failure(
                            drover::build_result::BuildStatus::MiscFailure,
                            outcome.errors.join("\n"),
                        )
                    });
                self.stop_work(None)?;
                let minor = self.minor;
                write_build_derivation_result(self.reply(), &res, minor)?;
            }
        }
        Ok(())
    }

    /// The collector's messages at their Nix levels.
    fn forward_gc_log(
        &mut self,
        lines: Vec<(drover::store::gc::GcLevel, String)>,
    ) -> io::Result<()> {
        use drover::store::gc::GcLevel;
        for (level, msg) in lines {
            let level = match level {
                GcLevel::Error => 0,
                GcLevel::Info => 3,
                GcLevel::Talkative => 4,
                GcLevel::Debug => 6,
            };
            self.log_at(level, msg)?;
        }
        Ok(())
    }

    /// A line at Nix's level `level` (0 error … 7 vomit), if the client's
    /// verbosity shows it.
    fn log_at(&mut self, level: u64, msg: String) -> io::Result<()> {
        if level <= self.verbosity {
            self.log(LoggerMessage::Next(msg))
        } else {
            Ok(())
        }
    }

    /// Nix's `LocalStore::verifyStore` without repair: every valid path
    /// exists; with `check_contents`, every `.links` entry and every valid
    /// path has the NAR hash it should. Returns whether there were errors.
    fn verify_store(&mut self, check_contents: bool) -> Result<bool, Failure> {
        let store = self.shared.store.clone();
        let sd = store.store_dir().clone();
        self.log_at(3, "reading the Nix store...".into())?;
        let mut errors = false;
        let mut present = BTreeSet::new();
        for e in std::fs::read_dir(sd.as_path()).map_err(OpError::from)? {
            present.insert(e.map_err(OpError::from)?.file_name());
        }
        self.log_at(3, "checking path existence...".into())?;
        let all = store.query_all_valid_paths().map_err(OpError::from)?;
        let mut valid = Vec::new();
        for p in &all {
            if present.contains(std::ffi::OsStr::new(p.base_name())) {
                valid.push(p.clone());
            } else {
                // Nix removes a vanished path without valid referrers from the
                // database; drover has no invalidation yet, so it only reports.
                self.log_at(
                    0,
                    format!(
                        "path '{}' disappeared, but drover cannot remove it from the database yet",
                        sd.print(p)
                    ),
                )?;
                errors = true;
            }
        }
        if check_contents {
            self.log_at(3, "checking link hashes...".into())?;
            let links = sd.as_path().join(".links");
            if let Ok(rd) = std::fs::read_dir(&links) {
                for e in rd {
                    let e = e.map_err(OpError::from)?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    self.log_at(4, format!("checking contents of '{name}'"))?;
                    let (h, _) = nar::nar_hash_of_path(&e.path()).map_err(OpError::from)?;
                    let got = h.encode(drover::hash::Encoding::Base32);
                    if got != name {
                        self.log_at(
                            0,
                            format!(
                                "link '{}' was modified! expected hash '{name}', got '{got}'",
                                e.path().display()
                            ),
                        )?;
                        errors = true;
                    }
                }
            }
            self.log_at(3, "checking store hashes...".into())?;
            for p in &valid {
                let Some(info) = store.query_path_info(p).map_err(OpError::from)? else {
                    continue;
                };
                self.log_at(4, format!("checking contents of '{}'", sd.print(p)))?;
                match nar::nar_hash_of_path(&store.real_path(p)) {
                    Ok((h, _)) if h == info.nar_hash => {}
                    Ok((h, _)) => {
                        self.log_at(
                            0,
                            format!(
                                "path '{}' was modified! expected hash '{}', got '{}'",
                                sd.print(p),
                                info.nar_hash
                                    .to_typed_string(drover::hash::Encoding::Base32),
                                h.to_typed_string(drover::hash::Encoding::Base32)
                            ),
                        )?;
                        errors = true;
                    }
                    Err(e) => {
                        self.log_at(0, format!("error: {e}"))?;
                        errors = true;
                    }
                }
            }
        }
        Ok(errors)
    }

    fn settings_use_substitutes(&self) -> bool {
        self.settings
            .get("substitute")
            .map(|v| v == "true")
            .unwrap_or(true)
    }

    fn build_mode(&self, mode: WireBuildMode) -> Result<BuildMode, Failure> {
        Ok(match mode {
            WireBuildMode::Normal => BuildMode::Normal,
            WireBuildMode::Check => BuildMode::Check,
            WireBuildMode::Repair => {
                if !self.peer.trusted {
                    return Err(err(
                        "repairing is not allowed because you are not in 'trusted-users'",
                    )
                    .into());
                }
                BuildMode::Repair
            }
        })
    }

    fn path_info(&self, p: &StorePath) -> Result<ValidPathInfo, OpError> {
        self.shared
            .store
            .query_path_info(p)?
            .ok_or_else(|| err(format!("path '{}' is not valid", hl(self.sd().print(p)))))
    }

    /// Nix's `queryPartialDerivationOutputMap`: the outputs the derivation
    /// states, completed by what the database knows.
    fn output_map(&self, drv: &StorePath) -> Result<BTreeMap<String, Option<StorePath>>, OpError> {
        let store = &self.shared.store;
        let mut map: BTreeMap<String, Option<StorePath>> = match store.read_derivation(drv) {
            Ok(d) => d.output_paths(),
            Err(_) => BTreeMap::new(),
        };
        for (name, path) in store.query_partial_derivation_output_map(drv)? {
            if path.is_some() || !map.contains_key(&name) {
                map.insert(name, path);
            }
        }
        Ok(map)
    }

    fn substitutable(
        &self,
        paths: &StorePathSet,
    ) -> Result<BTreeMap<StorePath, crate::substituter::SubstitutablePathInfo>, OpError> {
        let mut res = BTreeMap::new();
        if !self.settings_use_substitutes() {
            return Ok(res);
        }
        for sub in self.shared.builds.substituters() {
            for p in paths {
                if res.contains_key(p) {
                    continue;
                }
                match sub.query_path_info(p) {
                    Ok(Some(info)) => {
                        res.insert(p.clone(), info);
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!("{e}"),
                }
            }
        }
        Ok(res)
    }

    /// The error of a failed `buildPaths`, as Nix's `Store::buildPaths` ends: the
    /// run's errors are the failed requests' errors and then, when more than one
    /// request failed, `build of … failed`; all but the last are logged to the
    /// client (`logError`) and the last is the operation's error.
    fn build_error(&mut self, outcome: &crate::RealiseOutcome) -> Result<String, Failure> {
        let Some((last, logged)) = outcome.errors.split_last() else {
            return Ok(format!(
                "build failed with exit status {}",
                outcome.exit_status
            ));
        };
        // At `lvlError`: shown at every verbosity.
        for e in logged {
            self.log(LoggerMessage::Next(logged_error(e)))?;
        }
        Ok(last.clone())
    }

    fn set_options(&mut self, o: ClientOptions) -> Result<(), Failure> {
        self.verbosity = o.verbosity;
        let (settings, warnings) =
            apply_client_options(&self.shared.settings, &o, self.peer.trusted);
        self.settings = settings;
        for w in warnings {
            self.warn(&w)?;
        }
        Ok(())
    }

    fn realise(
        &mut self,
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    ) -> Result<crate::RealiseOutcome, Failure> {
        let builds = self.shared.builds.clone();
        let minor = self.minor;
        let verbosity = self.verbosity;
        let to = &mut self.to;
        let mut io_error = None;
        let hangup = self.hangup;
        let outcome = builds.realise(paths, mode, &self.settings, hangup, &mut |m| {
            if io_error.is_some() || !message_shown(&m, verbosity) {
                return;
            }
            if let Err(e) = m.write(to, minor).and_then(|_| to.flush()) {
                io_error = Some(e);
            }
        });
        if let Some(e) = io_error {
            return Err(Failure::Fatal(e.into()));
        }
        Ok(outcome)
    }

    fn add_to_store(
        &mut self,
        name: &str,
        method: CaMethodAlgo,
        references: &StorePathSet,
        repair: bool,
    ) -> Result<ValidPathInfo, Failure> {
        let store = self.shared.store.clone();
        let mut framed = FramedReader::new(&mut self.from);
        let r = add_ca(&store, name, method, references, repair, &mut framed);
        framed.finish().map_err(Failure::from_protocol)?;
        Ok(r?)
    }
}

/// Whether a logger message is sent to a client at this verbosity (as Nix's
/// `TunnelLogger::log` drops lines above it; activities always go).
fn message_shown(m: &LoggerMessage, verbosity: u64) -> bool {
    match m {
        LoggerMessage::Next(_) => verbosity >= 3,
        _ => true,
    }
}

/// An error as Nix's daemon logs it to a client (`logError`: `TunnelLogger::logEI`
/// sends `showErrorInfo`'s text as `STDERR_NEXT`): the red `error:` prefix, and the
/// message's further lines (a log tail) indented to line up after it.
pub fn logged_error(msg: &str) -> String {
    format!(
        "\x1b[31;1merror:\x1b[0m {}",
        msg.trim_end_matches('\n').replace('\n', "\n       ")
    )
}

/// A failed operation: an error the client hears, or one that ends the
/// connection.
pub enum Failure {
    Op(OpError),
    Fatal(DaemonError),
}

impl Failure {
    fn from_protocol(e: ProtocolError) -> Failure {
        Failure::Fatal(e.into())
    }
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Failure {
        Failure::Op(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Fatal(e.into())
    }
}

fn store_io(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        context,
        path,
        source,
    }
}

fn absolute(p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

/// Writes `contents` as the NAR of a single regular file into `sink`, as
/// `dumpString` does, without holding the NAR.
fn nar_of_file_into(len: u64, sink: &mut impl Write, contents: &mut impl Read) -> io::Result<()> {
    for s in ["nix-archive-1", "(", "type", "regular", "contents"] {
        write_bytes(sink, s.as_bytes())?;
    }
    write_u64(sink, len)?;
    let copied = io::copy(&mut contents.take(len), sink)?;
    if copied != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let pad = (8 - len % 8) % 8;
    sink.write_all(&[0u8; 8][..pad as usize])?;
    write_bytes(sink, b")")
}

/// Spools a framed payload to a temporary file beside the store, hashing it.
fn spool(
    store: &LocalStore,
    framed: &mut impl Read,
    algo: HashAlgo,
) -> Result<(tempfile_like::TempFile, Hash, u64), OpError> {
    let mut tmp = tempfile_like::TempFile::new(store.state_dir())?;
    let mut h = HashSink::new(algo);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = framed.read(&mut buf).map_err(io_to_protocol)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        tmp.file.write_all(&buf[..n])?;
    }
    tmp.file.flush()?;
    let (hash, size) = h.finish();
    Ok((tmp, hash, size))
}

/// `AddToStore` (1.25+): the framed payload is the text, the file's contents
/// (flat) or a NAR (recursive).
fn add_ca(
    store: &LocalStore,
    name: &str,
    method: CaMethodAlgo,
    references: &StorePathSet,
    repair: bool,
    framed: &mut impl Read,
) -> Result<ValidPathInfo, OpError> {
    let sd = store.store_dir();
    let info_of = |p: &StorePath| {
        store
            .query_path_info(p)?
            .ok_or_else(|| err(format!("path '{}' is not valid", hl(sd.print(p)))))
    };
    match method.method {
        ContentAddressMethod::Text => {
            if method.algo != HashAlgo::Sha256 {
                return Err(err(format!(
                    "text content addresses must use sha256, not {}",
                    method.algo
                )));
            }
            let mut text = Vec::new();
            framed
                .take(drover::worker_protocol::wire::MAX_STRING_LEN)
                .read_to_end(&mut text)
                .map_err(io_to_protocol)?;
            let p = store.add_text_to_store(name, &text, references)?;
            info_of(&p)
        }
        ContentAddressMethod::Fixed(fim) => {
            let (mut tmp, ca_hash, size) = spool(store, framed, method.algo)?;
            let (nar_hash, nar_size) = match fim {
                FileIngestionMethod::Recursive => {
                    if method.algo == HashAlgo::Sha256 {
                        (ca_hash.clone(), size)
                    } else {
                        let mut h = HashSink::new(HashAlgo::Sha256);
                        io::copy(&mut tmp.reopen()?, &mut h)?;
                        h.finish()
                    }
                }
                FileIngestionMethod::Flat => {
                    let mut h = HashSink::new(HashAlgo::Sha256);
                    nar_of_file_into(size, &mut h, &mut tmp.reopen()?)?;
                    h.finish()
                }
            };
            let path = sd.make_fixed_output_path(fim, &ca_hash, name, references, false)?;
            let mut info = ValidPathInfo::new(path.clone(), nar_hash.clone(), nar_size);
            info.references = references.clone();
            info.ca = Some(ContentAddress::Fixed(fim, ca_hash));
            let repair = if repair {
                RepairFlag::Repair
            } else {
                RepairFlag::NoRepair
            };
            store.add_object_with(&info, repair, |target| {
                let mut src = tmp.reopen().map_err(store_io("reading", &tmp.path))?;
                match fim {
                    FileIngestionMethod::Recursive => {
                        nar::restore(&mut src, target).map_err(|e| StoreError::Io {
                            context: "unpacking the NAR",
                            path: target.to_owned(),
                            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                        })?;
                    }
                    FileIngestionMethod::Flat => {
                        let mut f =
                            std::fs::File::create(target).map_err(store_io("creating", target))?;
                        io::copy(&mut src, &mut f).map_err(store_io("writing", target))?;
                    }
                }
                Ok(())
            })?;
            info_of(&path)
        }
    }
}

/// Nix's signature check when a NAR is imported: content-addressed paths whose
/// address gives their path need none; otherwise, with `require-sigs`, one
/// valid signature by a key of `trusted-public-keys`.
fn check_signatures(
    store: &LocalStore,
    settings: &Settings,
    info: &ValidPathInfo,
) -> Result<(), OpError> {
    if !settings.require_sigs() {
        return Ok(());
    }
    let sd = store.store_dir();
    if let Some(ca) = &info.ca {
        if sd
            .make_path_from_ca(info.path.name(), ca, &info.references, false)
            .is_ok_and(|p| p == info.path)
        {
            return Ok(());
        }
    }
    let keys = PublicKeys::parse_list(&settings.trusted_public_keys().join(" "))?;
    let fp = fingerprint_path(
        sd,
        &info.path,
        &info.nar_hash,
        info.nar_size,
        &info.references,
    );
    let ok = info.sigs.iter().any(|s| {
        Signature::parse(s)
            .ok()
            .and_then(|sig| keys.get(sig.name()).map(|k| k.verify(fp.as_bytes(), &sig)))
            .unwrap_or(false)
    });
    if ok {
        Ok(())
    } else {
        Err(err(format!(
            "cannot add path '{}' because it lacks a valid signature",
            hl(sd.print(&info.path))
        )))
    }
}

/// `AddToStoreNar`: imports one NAR with its path info (Nix's
/// `LocalStore::addToStore`), checking hash, size and signatures. With
/// `whole`, the NAR is all of `src`; otherwise it is followed by more data.
fn add_nar(
    store: &LocalStore,
    settings: &Settings,
    info: &ValidPathInfo,
    repair: bool,
    check_sigs: bool,
    src: &mut impl Read,
    whole: bool,
) -> Result<(), OpError> {
    let sd = store.store_dir();
    if check_sigs {
        check_signatures(store, settings, info)?;
    }
    let valid = store.is_valid_path(&info.path)?;
    if valid && !repair {
        if !whole {
            // Skip this NAR to reach the next entry.
            nar::copy_nar(src, &mut io::sink()).map_err(|e| err(e.to_string()))?;
        }
        return Ok(());
    }
    let repair_flag = if repair {
        RepairFlag::Repair
    } else {
        RepairFlag::NoRepair
    };
    let printed = sd.print(&info.path);
    let mut mismatch: Option<String> = None;
    let res = store.add_object_with(info, repair_flag, |target| {
        let mut sink = nar::RestoreSink::new(target);
        let summary = if whole {
            nar::parse(&mut *src, &mut sink)
        } else {
            nar::parse_embedded(&mut *src, &mut sink)
        }
        .map_err(|e| StoreError::Io {
            context: "unpacking the NAR of",
            path: target.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })?;
        if summary.nar_hash != info.nar_hash {
            mismatch = Some(format!(
                "hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
                hl(&printed),
                hl(info
                    .nar_hash
                    .to_typed_string(drover::hash::Encoding::Base32)),
                hl(summary
                    .nar_hash
                    .to_typed_string(drover::hash::Encoding::Base32))
            ));
        } else if summary.nar_size != info.nar_size {
            mismatch = Some(format!(
                "size mismatch importing path '{printed}';\n  specified: {}\n  got:       {}",
                info.nar_size, summary.nar_size
            ));
        } else if let Some(ca) = &info.ca {
            mismatch = ca_hash_mismatch(target, &info.path, ca, &printed)?;
        }
        if mismatch.is_some() {
            return Err(StoreError::Io {
                context: "checking the NAR of",
                path: target.to_owned(),
                source: io::ErrorKind::InvalidData.into(),
            });
        }
        Ok(())
    });
    match (res, mismatch) {
        (_, Some(m)) => Err(err(m)),
        (Err(e), None) => Err(e.into()),
        (Ok(()), None) => Ok(()),
    }
}

/// Nix's check of a claimed content address against what was unpacked (in
/// `LocalStore::addToStore`, after the NAR hash and size): the hash of the
/// contents, as the address's method takes it (modulo the path's own hash part
/// for `fixed:`), must be the one claimed. A
/// narinfo whose `CA` was left while its NAR was swapped is refused.
fn ca_hash_mismatch(
    target: &Path,
    path: &StorePath,
    ca: &ContentAddress,
    printed: &str,
) -> Result<Option<String>, StoreError> {
    let claimed = ca.hash();
    let algo = claimed.algo();
    let io_error = |context: &'static str| {
        move |e: io::Error| StoreError::Io {
            context,
            path: target.to_owned(),
            source: e,
        }
    };
    let actual = match ca {
        // `text:`: the file's own sha256.
        ContentAddress::Text(_) => {
            let mut f = std::fs::File::open(target).map_err(io_error("reading"))?;
            let mut sink = HashSink::new(algo);
            io::copy(&mut f, &mut sink).map_err(io_error("hashing"))?;
            sink.finish().0
        }
        // `fixed:`: the contents hashed modulo the path's own hash part (Nix's
        // `hashCAPath`), as a self-referring output was addressed.
        ContentAddress::Fixed(method, _) => {
            drover::references::hash_path_modulo(target, *method, algo, path.hash_part())
                .map_err(|e| io_error("hashing")(io::Error::other(e.to_string())))?
        }
    };
    if actual == *claimed {
        return Ok(None);
    }
    Ok(Some(format!(
        "ca hash mismatch importing path '{}';\n  specified: {}\n  got:       {}",
        hl(printed),
        hl(claimed.to_typed_string(drover::hash::Encoding::Base32)),
        hl(actual.to_typed_string(drover::hash::Encoding::Base32))
    )))
}

/// `AddMultipleToStore`: a count, then each path's info and NAR.
fn add_multiple(
    store: &LocalStore,
    settings: &Settings,
    repair: bool,
    check_sigs: bool,
    src: &mut impl Read,
) -> Result<(), OpError> {
    let sd = store.store_dir().clone();
    let n = read_u64(src)?;
    for _ in 0..n {
        let p = drover::worker_protocol::request::read_store_path(src, &sd)?;
        let mut info = read_path_info_after_path(src, &sd, p)?;
        info.ultimate = false;
        add_nar(store, settings, &info, repair, check_sigs, src, false)?;
    }
    Ok(())
}

/// `AddBuildLog`: the log of `drv`, stored as Nix stores build logs.
fn add_build_log(settings: &Settings, drv: &StorePath, log: &[u8]) -> Result<(), OpError> {
    let mut f = drover::build_log::file::LogFile::create(
        settings.log_dir(),
        drv,
        settings.compress_build_log(),
    )?;
    f.write(log)?;
    f.finish()?;
    Ok(())
}

/// `OptimiseStore`: every valid path through `optimisePath`.
fn optimise_store(store: &LocalStore) -> Result<(), OpError> {
    for p in store.query_all_valid_paths()? {
        store.optimise_path(&store.real_path(&p), RepairFlag::NoRepair)?;
    }
    Ok(())
}

/// A temporary file removed when dropped (the spool of `AddToStore`).
mod tempfile_like {
    use std::fs::File;
    use std::io;
    use std::path::{Path, PathBuf};

    pub struct TempFile {
        pub path: PathBuf,
        pub file: io::BufWriter<File>,
    }

    impl TempFile {
        pub fn new(dir: &Path) -> io::Result<TempFile> {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let path = dir.join(format!(
                "drover-daemon-add-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            Ok(TempFile {
                path,
                file: io::BufWriter::new(file),
            })
        }

        pub fn reopen(&mut self) -> io::Result<File> {
            use std::io::Write;
            self.file.flush()?;
            File::open(&self.path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use drover::derivation::Derivation;
    use drover::worker_protocol::request::write_basic_derivation;

    use super::*;
    use crate::plan::Plan;
    use crate::substituter::Substituter;

    /// A build service that records what it is asked to realise and answers
    /// with a fatal outcome (nothing is built here).
    #[derive(Default)]
    struct Recorder {
        asked: Mutex<Vec<Vec<DerivedPath>>>,
    }

    impl BuildService for Recorder {
        fn plan(&self, _: &[DerivedPath]) -> Result<Plan, String> {
            Err("no plans here".into())
        }

        fn realise(
            &self,
            paths: Vec<DerivedPath>,
            _: BuildMode,
            _: &Settings,
            _: Option<super::super::hangup::Hangup>,
            _: &mut dyn FnMut(LoggerMessage),
        ) -> crate::RealiseOutcome {
            self.asked.lock().unwrap().push(paths);
            crate::RealiseOutcome {
                results: Vec::new(),
                exit_status: 1,
                errors: vec!["nothing is built here".into()],
                fatal: true,
            }
        }

        fn substituters(&self) -> &[Arc<dyn Substituter>] {
            &[]
        }
    }

    fn w64(v: &mut Vec<u8>, n: u64) {
        v.extend_from_slice(&n.to_le_bytes());
    }

    fn wstr(v: &mut Vec<u8>, s: &[u8]) {
        w64(v, s.len() as u64);
        v.extend_from_slice(s);
        v.extend(std::iter::repeat_n(0u8, (8 - s.len() % 8) % 8));
    }

    /// What a client (protocol 1.34) sending the requests `requests` makes of
    /// the store dir gets as the daemon's answer, what the daemon asked to
    /// realise, and the store.
    struct Served {
        reply: String,
        asked: Vec<Vec<DerivedPath>>,
        store: Arc<LocalStore>,
        _dir: tempfile::TempDir,
    }

    fn serve(trusted: bool, requests: impl FnOnce(&StoreDir) -> Vec<u8>) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let settings =
            Settings::for_root(dir.path(), "experimental-features = ca-derivations").unwrap();
        let store = Arc::new(LocalStore::open(&settings).unwrap());
        let recorder = Arc::new(Recorder::default());
        let shared = Shared {
            store: store.clone(),
            settings: settings.clone(),
            builds: recorder.clone(),
        };
        let mut input = Vec::new();
        for n in [0x6e697863u64, 0x122, 0, 0] {
            w64(&mut input, n);
        }
        input.extend(requests(settings.store_dir()));
        let mut out = Vec::new();
        let peer = Peer { uid: None, trusted };
        let _ = Session::new(&shared, peer, &input[..], &mut out).serve();
        let asked = std::mem::take(&mut *recorder.asked.lock().unwrap());
        Served {
            reply: String::from_utf8_lossy(&out).into_owned(),
            asked,
            store,
            _dir: dir,
        }
    }

    /// `BuildDerivation` of `output`'s derivation, claimed to be at a path made up.
    fn aterm(output: &str) -> Vec<u8> {
        format!(
            "Derive([{output}],[],[],\"x86_64-linux\",\"/bin/sh\",[\"-c\",\"echo x > $out\"],[(\"name\",\"x\"),(\"out\",\"\")])"
        )
        .into_bytes()
    }

    fn build_derivation(sd: &StoreDir, output: &str) -> Vec<u8> {
        let drv = Derivation::from_aterm_bytes(&aterm(output), sd).unwrap();
        let mut b = Vec::new();
        w64(&mut b, 36);
        wstr(
            &mut b,
            format!("{}/{}-x.drv", sd.as_str(), "0".repeat(32)).as_bytes(),
        );
        write_basic_derivation(&mut b, sd, &drv).unwrap();
        w64(&mut b, 0);
        b
    }

    const FLOATING: &str = "(\"out\",\"\",\"r:sha256\",\"\")";

    #[test]
    fn an_untrusted_client_builds_its_content_addressed_derivation_written_to_the_store() {
        let s = serve(false, |sd| build_derivation(sd, FLOATING));
        assert_eq!(s.asked.len(), 1, "{}", s.reply);
        let DerivedPath::Built { drv_path, .. } = &s.asked[0][0] else {
            panic!("{:?}", s.asked);
        };
        // Not the path the client claimed: the one its derivation has.
        assert_ne!(drv_path.hash_part(), "0".repeat(32));
        assert!(s.store.is_valid_path(drv_path).unwrap());
        // A fatal end of the run is a `MiscFailure` with its message.
        assert!(s.reply.contains("nothing is built here"), "{}", s.reply);
    }

    #[test]
    fn an_untrusted_client_may_not_build_an_input_addressed_derivation() {
        let s = serve(false, |sd| {
            let out = format!(
                "(\"out\",\"{}/{}-x\",\"\",\"\")",
                sd.as_str(),
                "1".repeat(32)
            );
            build_derivation(sd, &out)
        });
        assert!(s.asked.is_empty(), "{:?}", s.asked);
        assert!(
            s.reply
                .contains("you are not privileged to build input-addressed derivations"),
            "{}",
            s.reply
        );
    }

    #[test]
    fn a_trusted_client_s_derivation_is_built_at_its_own_path_only() {
        // The path it names is not its derivation's: not written for it, refused.
        let s = serve(true, |sd| build_derivation(sd, FLOATING));
        assert!(s.asked.is_empty(), "{:?}", s.asked);
        assert!(s.reply.contains("that is not in the store"), "{}", s.reply);
        // The path it names is its derivation's (it has no input derivations):
        // written and built there.
        let mut at = None;
        let s = serve(true, |sd| {
            let mut b = build_derivation(sd, FLOATING);
            let drv = Derivation::from_aterm_bytes(&aterm(FLOATING), sd).unwrap();
            let path = sd
                .text_path_of("x.drv", &drv.to_aterm_bytes(sd), &drv.drv_references())
                .unwrap();
            let claimed = format!("{}/{}-x.drv", sd.as_str(), "0".repeat(32));
            let real = sd.print(&path);
            assert_eq!(claimed.len(), real.len());
            let i = b
                .windows(claimed.len())
                .position(|w| w == claimed.as_bytes())
                .unwrap();
            b[i..i + real.len()].copy_from_slice(real.as_bytes());
            at = Some(path);
            b
        });
        let at = at.unwrap();
        assert_eq!(
            s.asked,
            vec![vec![DerivedPath::Built {
                drv_path: at.clone(),
                outputs: OutputsSpec::Names(["out".to_owned()].into()),
            }]],
            "{}",
            s.reply
        );
        assert!(s.store.is_valid_path(&at).unwrap());
    }

    #[test]
    fn warnings_have_nix_s_magenta_prefix() {
        // `SetOptions` (op 19) of an untrusted client naming a substituter the
        // daemon does not trust: Nix's daemon answers `warn("ignoring untrusted
        // substituter '%s'")`, `Logger::warn`'s `ANSI_WARNING "warning:"` prefix.
        let s = serve(false, |_| {
            let mut b = Vec::new();
            w64(&mut b, 19);
            // keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs,
            // maxSilentTime, useBuildHook, verboseBuild, logType, printBuildTrace,
            // buildCores, useSubstitutes.
            for n in [0, 0, 0, 3, 1, 0, 1, 0, 0, 0, 0, 1] {
                w64(&mut b, n);
            }
            w64(&mut b, 1);
            wstr(&mut b, b"substituters");
            wstr(&mut b, b"http://untrusted.invalid");
            b
        });
        assert!(
            s.reply.contains(
                "\x1b[35;1mwarning:\x1b[0m ignoring untrusted substituter 'http://untrusted.invalid'\n"
            ),
            "{:?}",
            s.reply
        );
    }

    #[test]
    fn logged_errors_have_nix_s_prefix_and_indented_lines() {
        assert_eq!(
            logged_error("builder for 'x' failed;\nlast 1 log lines:\n> a\n"),
            "\x1b[31;1merror:\x1b[0m builder for 'x' failed;\n       last 1 log lines:\n       > a"
        );
    }
}
