//! The restricted store of recursive Nix (Nix 2.8's `RestrictedStore` served
//! with `daemon::Recursive`): a session for the builder of a `recursive-nix`
//! derivation sees only the build's input closure and the paths added through
//! it. Queries of other paths answer as if they were invalid (or with Nix's
//! `… in recursive Nix` errors); what the builder adds to the store, and the
//! closures of what it builds, become allowed ("added paths"), which the build's
//! reference scan then accepts; garbage collection and roots are no-ops;
//! `SetOptions` changes nothing.
//!
//! [`RestrictedPaths`] is the allowed set, shared by the build (which reads the
//! added paths when it registers its outputs) and every connection of its
//! socket. The session consults it in [`Session::perform_restricted`] before an
//! operation, which either answers the request itself or hands it back to the
//! unrestricted code.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use drover::derived_path::DerivedPath;
use drover::realisation::DrvOutput;
use drover::store_path::{StorePath, StorePathSet};
use drover::worker_protocol::framed::FramedReader;
use drover::worker_protocol::reply::{
    write_build_result, write_opt_store_path, write_path_info, write_store_path, write_store_paths,
};
use drover::worker_protocol::request::{
    print_wire_derived_path, read_path_info_after_path, read_store_path,
};
use drover::worker_protocol::wire::{read_u64, write_bool, write_u64};
use drover::worker_protocol::{hl, Request, WireBuildMode};

use super::{add_nar, err, Failure, OpError, Session};
use crate::messages::BuildMode;

/// Makes an added path appear where the builder can see it (in a sandbox:
/// bind-mounted or linked into the chroot's store), Nix's `addDependency`.
pub type Materialise = Box<dyn Fn(&StorePath) -> Result<(), String> + Send + Sync>;

/// What a recursive-Nix build may see: its input closure and the paths added
/// since (Nix's `inputPaths`, `addedPaths`, `addedDrvOutputs`).
pub struct RestrictedPaths {
    inputs: StorePathSet,
    added: Mutex<Added>,
    materialise: Option<Materialise>,
}

#[derive(Default)]
struct Added {
    paths: StorePathSet,
    drv_outputs: BTreeSet<DrvOutput>,
}

impl RestrictedPaths {
    pub fn new(inputs: StorePathSet, materialise: Option<Materialise>) -> RestrictedPaths {
        RestrictedPaths {
            inputs,
            added: Mutex::new(Added::default()),
            materialise,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Added> {
        self.added.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nix's `isAllowed(StorePath)`.
    pub fn is_allowed(&self, p: &StorePath) -> bool {
        self.inputs.contains(p) || self.lock().paths.contains(p)
    }

    /// Nix's `isAllowed(DrvOutput)`: only realisations of builds done through
    /// the socket.
    pub fn is_allowed_output(&self, id: &DrvOutput) -> bool {
        self.lock().drv_outputs.contains(id)
    }

    /// Nix's `addDependency`: `p` becomes allowed (made visible to the builder
    /// first, if there is a sandbox).
    pub fn add(&self, p: &StorePath) -> Result<(), String> {
        if self.is_allowed(p) {
            return Ok(());
        }
        self.lock().paths.insert(p.clone());
        if let Some(m) = &self.materialise {
            m(p)?;
        }
        Ok(())
    }

    /// The paths added so far (beside the inputs), for the reference scan.
    pub fn added(&self) -> StorePathSet {
        self.lock().paths.clone()
    }

    /// Everything allowed (Nix's `queryAllValidPaths` of the restricted store).
    pub fn all(&self) -> StorePathSet {
        let mut all = self.inputs.clone();
        all.extend(self.lock().paths.iter().cloned());
        all
    }

    fn add_drv_output(&self, id: DrvOutput) {
        self.lock().drv_outputs.insert(id);
    }
}

impl<R: Read, W: Write> Session<'_, R, W> {
    /// The operation under the restricted store's rules: `Ok(None)` when
    /// answered here, `Ok(Some(req))` for the unrestricted code to perform.
    pub(super) fn perform_restricted(
        &mut self,
        allowed: &Arc<RestrictedPaths>,
        req: Request,
    ) -> Result<Option<Request>, Failure> {
        let store = self.shared.store.clone();
        let sd = store.store_dir().clone();
        let unknown = |what: &str, p: &StorePath| -> Failure {
            err(format!(
                "cannot {what} unknown path '{}' in recursive Nix",
                hl(sd.print(p))
            ))
            .into()
        };
        let invalid = |p: &StorePath| -> Failure {
            err(format!("path '{}' is not valid", hl(sd.print(p)))).into()
        };
        match req {
            Request::IsValidPath(p) if !allowed.is_allowed(&p) => {
                self.start_work()?;
                self.stop_work(None)?;
                write_bool(self.reply(), false)?;
            }
            Request::QueryValidPaths { paths, .. } => {
                // Only what is allowed, and never substituted.
                let paths = paths
                    .into_iter()
                    .filter(|p| allowed.is_allowed(p))
                    .collect();
                return Ok(Some(Request::QueryValidPaths {
                    paths,
                    substitute: false,
                }));
            }
            // The restricted store has no substituters.
            Request::HasSubstitutes(_) => {
                self.start_work()?;
                self.stop_work(None)?;
                write_bool(self.reply(), false)?;
            }
            Request::QuerySubstitutablePaths(_)
            | Request::QueryReferrers(_)
            | Request::QueryValidDerivers(_) => {
                self.start_work()?;
                self.stop_work(None)?;
                write_store_paths(self.reply(), &sd, &StorePathSet::new())?;
            }
            Request::QuerySubstitutablePathInfo(_) | Request::QuerySubstitutablePathInfos(_) => {
                self.start_work()?;
                self.stop_work(None)?;
                write_u64(self.reply(), 0)?;
            }
            Request::QueryPathHash(p) | Request::QueryReferences(p) if !allowed.is_allowed(&p) => {
                self.start_work()?;
                return Err(invalid(&p));
            }
            Request::QueryDeriver(p) => {
                // The deriver is censored.
                self.start_work()?;
                if !allowed.is_allowed(&p)
                    || store.query_path_info(&p).map_err(OpError::from)?.is_none()
                {
                    return Err(invalid(&p));
                }
                self.stop_work(None)?;
                write_opt_store_path(self.reply(), &sd, None)?;
            }
            Request::QueryPathInfo(p) => {
                self.start_work()?;
                let info = if allowed.is_allowed(&p) {
                    store.query_path_info(&p).map_err(OpError::from)?
                } else {
                    None
                };
                self.stop_work(None)?;
                let minor = self.minor;
                let w = self.reply();
                match info {
                    Some(mut i) => {
                        // Impure information is censored.
                        i.deriver = None;
                        i.registration_time = 0;
                        i.ultimate = false;
                        i.sigs.clear();
                        write_u64(w, 1)?;
                        write_path_info(w, &sd, &i, minor)?;
                    }
                    None => write_u64(w, 0)?,
                }
            }
            Request::QueryDerivationOutputs(p)
            | Request::QueryDerivationOutputMap(p)
            | Request::QueryDerivationOutputNames(p)
                if !allowed.is_allowed(&p) =>
            {
                self.start_work()?;
                return Err(err(format!(
                    "cannot query output map for unknown path '{}' in recursive Nix",
                    hl(sd.print(&p))
                ))
                .into());
            }
            Request::QueryPathFromHashPart(_) => {
                self.start_work()?;
                return Err(err("queryPathFromHashPart").into());
            }
            Request::QueryAllValidPaths => {
                self.start_work()?;
                self.stop_work(None)?;
                write_store_paths(self.reply(), &sd, &allowed.all())?;
            }
            Request::AddToStore {
                name,
                method,
                references,
                repair,
            } => {
                self.start_work()?;
                let info = self.add_to_store(&name, method, &references, repair)?;
                allowed.add(&info.path).map_err(OpError)?;
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
                allowed.add(&p).map_err(OpError)?;
                self.stop_work(None)?;
                write_store_path(self.reply(), &sd, &p)?;
            }
            Request::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                let path = info.path.clone();
                self.perform(Request::AddToStoreNar {
                    info,
                    repair,
                    dont_check_sigs,
                })?;
                allowed.add(&path).map_err(OpError)?;
            }
            Request::AddMultipleToStore { repair, .. } => {
                // The client is not trusted: signatures are always checked.
                self.start_work()?;
                let settings = self.settings.clone();
                let mut framed = FramedReader::new(&mut self.from);
                let r = (|| -> Result<(), OpError> {
                    let n = read_u64(&mut framed)?;
                    for _ in 0..n {
                        let p = read_store_path(&mut framed, &sd)?;
                        let mut info = read_path_info_after_path(&mut framed, &sd, p)?;
                        info.ultimate = false;
                        add_nar(&store, &settings, &info, repair, true, &mut framed, false)?;
                        allowed.add(&info.path).map_err(OpError)?;
                    }
                    Ok(())
                })();
                framed.finish().map_err(Failure::from_protocol)?;
                r?;
                self.stop_work(None)?;
            }
            Request::RegisterDrvOutput(_) => {
                self.start_work()?;
                return Err(err("registerDrvOutput").into());
            }
            Request::QueryRealisation(id) if !allowed.is_allowed_output(&id) => {
                self.start_work()?;
                self.stop_work(None)?;
                write_u64(self.reply(), 0)?;
            }
            // Roots and the collector are no-ops.
            Request::AddTempRoot(_) | Request::AddIndirectRoot(_) | Request::OptimiseStore => {
                self.start_work()?;
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::FindRoots => {
                self.start_work()?;
                self.stop_work(None)?;
                write_u64(self.reply(), 0)?;
            }
            Request::CollectGarbage { .. } => {
                self.start_work()?;
                self.stop_work(None)?;
                let w = self.reply();
                write_u64(w, 0)?;
                write_u64(w, 0)?;
                write_u64(w, 0)?;
            }
            Request::SetOptions(_) => {
                // As Nix in recursive mode: nothing of the client's settings is
                // applied, its verbosity included (the process's filters).
                self.start_work()?;
                self.stop_work(None)?;
            }
            Request::VerifyStore { repair, .. } => {
                self.start_work()?;
                if repair && !self.peer.trusted {
                    return Err(err("you are not privileged to repair paths").into());
                }
                self.stop_work(None)?;
                write_bool(self.reply(), false)?;
            }
            Request::NarFromPath(p) if !allowed.is_allowed(&p) => {
                self.start_work()?;
                return Err(unknown("dump", &p));
            }
            Request::QueryMissing(paths) => {
                self.start_work()?;
                let (ok, refused): (Vec<DerivedPath>, Vec<DerivedPath>) = paths
                    .into_iter()
                    .partition(|d| allowed.is_allowed(d.base_path()));
                let mut plan = if ok.is_empty() {
                    crate::plan::Plan::default()
                } else {
                    self.shared.builds.plan(&ok).map_err(OpError)?
                };
                plan.unknown
                    .extend(refused.iter().map(|d| d.base_path().clone()));
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
                if !allowed.is_allowed(&p) {
                    return Err(unknown("substitute", &p));
                }
                // Nothing to do: an allowed path is valid.
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::BuildPaths { paths, mode } => {
                let outcome = self.build_restricted(allowed, &paths, mode)?;
                if outcome.exit_status != 0 {
                    return Err(err(self.build_error(&outcome)?).into());
                }
                self.stop_work(None)?;
                write_u64(self.reply(), 1)?;
            }
            Request::BuildPathsWithResults { paths, mode } => {
                let outcome = self.build_restricted(allowed, &paths, mode)?;
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
            Request::BuildDerivation { drv, .. } => {
                // As the daemon: the client is not trusted; then the restricted
                // store does not build derivations it is sent.
                self.start_work()?;
                let ca = drv.derivation_type().is_ok_and(|t| t.is_ca());
                return Err(err(if ca {
                    "operation 'buildDerivation' is not supported by store 'local'"
                } else {
                    "you are not privileged to build input-addressed derivations"
                })
                .into());
            }
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    /// Nix's `RestrictedStore::buildPathsWithResults`: only allowed paths, only
    /// normal builds; the closures of the outputs built become allowed, and
    /// their realisations (with those they depend on).
    fn build_restricted(
        &mut self,
        allowed: &Arc<RestrictedPaths>,
        paths: &[DerivedPath],
        mode: WireBuildMode,
    ) -> Result<crate::RealiseOutcome, Failure> {
        let mode = self.build_mode(mode)?;
        self.start_work()?;
        if mode != BuildMode::Normal {
            return Err(err("unsupported build mode").into());
        }
        let store = self.shared.store.clone();
        let sd = store.store_dir().clone();
        if let Some(d) = paths.iter().find(|d| !allowed.is_allowed(d.base_path())) {
            return Err(err(format!(
                "cannot build '{}' in recursive Nix because path is unknown",
                hl(print_wire_derived_path(&sd, d))
            ))
            .into());
        }
        let outcome = self.realise(paths.to_vec(), BuildMode::Normal)?;
        let mut outputs = Vec::new();
        let mut ids = Vec::new();
        for r in &outcome.results {
            for real in r.result.built_outputs.values() {
                outputs.push(real.out_path.clone());
                ids.push(real.id.clone());
            }
        }
        for p in store.compute_closure(&outputs).map_err(OpError::from)? {
            allowed.add(&p).map_err(OpError)?;
        }
        // `Realisation::closure`: the realisations the built ones depend on.
        let mut seen = BTreeSet::new();
        while let Some(id) = ids.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(real) = store.query_realisation(&id).map_err(OpError::from)? {
                ids.extend(real.dependent_realisations.keys().cloned());
            }
            allowed.add_drv_output(id);
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::{BuildService, Peer, Shared};
    use drover::config::Settings;
    use drover::store::LocalStore;
    use drover::worker_protocol::LoggerMessage;

    /// Nothing is built in these tests.
    struct NoBuilds;

    impl BuildService for NoBuilds {
        fn plan(&self, _: &[DerivedPath]) -> Result<crate::plan::Plan, String> {
            Ok(Default::default())
        }
        fn realise(
            &self,
            paths: Vec<DerivedPath>,
            _: BuildMode,
            _: &Settings,
            _: Option<crate::daemon::hangup::Hangup>,
            _: &mut dyn FnMut(LoggerMessage),
        ) -> crate::RealiseOutcome {
            panic!("nothing may be built here: {paths:?}")
        }
        fn substituters(&self) -> &[Arc<dyn crate::substituter::Substituter>] {
            &[]
        }
    }

    fn w64(v: &mut Vec<u8>, n: u64) {
        v.extend_from_slice(&n.to_le_bytes());
    }

    fn wstr(v: &mut Vec<u8>, s: &str) {
        w64(v, s.len() as u64);
        v.extend_from_slice(s.as_bytes());
        v.resize(v.len() + (8 - s.len() % 8) % 8, 0);
    }

    struct Reply<'a>(&'a [u8]);

    impl Reply<'_> {
        fn u64(&mut self) -> u64 {
            let (n, rest) = self.0.split_at(8);
            self.0 = rest;
            u64::from_le_bytes(n.try_into().unwrap())
        }
        fn string(&mut self) -> String {
            let n = self.u64() as usize;
            let s = String::from_utf8(self.0[..n].to_vec()).unwrap();
            self.0 = &self.0[n + (8 - n % 8) % 8..];
            s
        }
        fn strings(&mut self) -> Vec<String> {
            (0..self.u64()).map(|_| self.string()).collect()
        }
        /// `STDERR_LAST`.
        fn last(&mut self) {
            assert_eq!(self.u64(), 0x616c7473);
        }
        /// `STDERR_ERROR` in the form of 1.26+: its message.
        fn error(&mut self) -> String {
            assert_eq!(self.u64(), 0x63787470);
            assert_eq!(self.string(), "Error");
            self.u64();
            self.string();
            let msg = self.string();
            assert_eq!((self.u64(), self.u64()), (0, 0));
            msg
        }
    }

    /// A session under the restricted rules, byte for byte: what is outside
    /// the inputs is invalid or refused with Nix's messages, what is added
    /// becomes visible, the path info of an input is censored.
    #[test]
    fn a_restricted_session_sees_its_inputs_and_what_it_adds() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::for_root(dir.path(), "").unwrap();
        let store = Arc::new(LocalStore::open(&settings).unwrap());
        let sd = store.store_dir().clone();
        let none = StorePathSet::new();
        let input = store.add_text_to_store("input", b"in", &none).unwrap();
        let other = store.add_text_to_store("other", b"out", &none).unwrap();
        let allowed = Arc::new(RestrictedPaths::new([input.clone()].into(), None));
        let shared = Shared {
            store: store.clone(),
            settings,
            builds: Arc::new(NoBuilds),
        };
        let (pi, po) = (sd.print(&input), sd.print(&other));
        let mut req = Vec::new();
        for n in [0x6e697863, 0x122, 0, 0] {
            w64(&mut req, n);
        }
        for (op, arg) in [(1, &po), (1, &pi), (26, &po), (26, &pi)] {
            w64(&mut req, op);
            wstr(&mut req, arg);
        }
        w64(&mut req, 8); // AddTextToStore
        wstr(&mut req, "added");
        wstr(&mut req, "text");
        w64(&mut req, 0);
        w64(&mut req, 23); // QueryAllValidPaths
        w64(&mut req, 9); // BuildPaths
        w64(&mut req, 1);
        wstr(&mut req, &po);
        w64(&mut req, 0);
        w64(&mut req, 29); // QueryPathFromHashPart
        wstr(&mut req, other.hash_part());
        w64(&mut req, 11); // AddTempRoot
        wstr(&mut req, &po);
        let mut out = Vec::new();
        let peer = Peer {
            uid: None,
            trusted: false,
        };
        Session::new(&shared, peer, &req[..], &mut out)
            .restricted(allowed.clone())
            .serve()
            .unwrap();
        let mut r = Reply(&out);
        assert_eq!(
            (r.u64(), r.u64(), r.string()),
            (0x6478696f, 0x122, "2.8.0".into())
        );
        r.last();
        // IsValidPath: the other path is not, the input is.
        r.last();
        assert_eq!(r.u64(), 0);
        r.last();
        assert_eq!(r.u64(), 1);
        // QueryPathInfo: none for the other; the input's censored.
        r.last();
        assert_eq!(r.u64(), 0);
        r.last();
        assert_eq!(r.u64(), 1);
        assert_eq!(r.string(), "", "no deriver");
        r.string();
        assert!(r.strings().is_empty());
        assert_eq!(r.u64(), 0, "no registration time");
        r.u64();
        assert_eq!(r.u64(), 0, "not ultimate");
        assert!(r.strings().is_empty(), "no signatures");
        r.string();
        // AddTextToStore: the path becomes allowed.
        r.last();
        let added = sd.parse(&r.string()).unwrap();
        assert_eq!(allowed.added(), [added.clone()].into());
        r.last();
        let mut all = r.strings();
        all.sort();
        let mut want = vec![pi.clone(), sd.print(&added)];
        want.sort();
        assert_eq!(all, want);
        // BuildPaths of an unknown path, the hash-part query: Nix's errors.
        assert_eq!(
            r.error(),
            format!(
                "cannot build '{}' in recursive Nix because path is unknown",
                hl(&po)
            )
        );
        assert_eq!(r.error(), "queryPathFromHashPart");
        // Temporary roots are a no-op.
        r.last();
        assert_eq!(r.u64(), 1);
        assert!(r.0.is_empty(), "{} bytes more", r.0.len());
    }

    #[test]
    fn added_paths_become_allowed_inputs_stay() {
        let sd = drover::store_path::StoreDir::new("/nix/store").unwrap();
        let a = sd
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a")
            .unwrap();
        let b = sd
            .parse("/nix/store/ffffffffffffffffffffffffffffffff-b")
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let r = RestrictedPaths::new(
            [a.clone()].into(),
            Some(Box::new(move |p: &StorePath| {
                record.lock().unwrap().push(p.clone());
                Ok(())
            })),
        );
        assert!(r.is_allowed(&a));
        assert!(!r.is_allowed(&b));
        r.add(&b).unwrap();
        r.add(&a).unwrap();
        r.add(&b).unwrap();
        assert!(r.is_allowed(&b));
        assert_eq!(r.added(), [b.clone()].into());
        assert_eq!(r.all(), [a, b.clone()].into());
        // Made visible once, and inputs never (they are there already).
        assert_eq!(*seen.lock().unwrap(), [b]);
    }
}
