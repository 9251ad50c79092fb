//! Fakes for tests of the actor system (feature `testing`; not part of the API of a
//! normal build) (and of code built on it): a temporary store
//! with a derivation factory, a fake LocalBuilder answering [`RunLocalBuild`] with
//! scripted outcomes (really writing and registering the outputs, so validity checks
//! pass), a fake hook pool answering [`HookTry`] with scripted replies and fake
//! [`HookBuild`] jobs, and a progress recorder.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use drover::build_result::{BuildResult, BuildStatus};
use drover::config::Settings;
use drover::derivation::{Derivation, DerivationOutput, DrvHashCache};
use drover::store::{LocalStore, StoreError, ValidPathInfo};
use drover::store_path::StorePath;

use crate::goal::host::{AnyGoal, EffectSink, GoalHost, GoalMachine, GoalReport, HookBuildWork};
use crate::goal::{Event, GoalId, Job};
use crate::messages::{
    CancelLocalBuild, HookBuild, HookFinished, HookReply, HookTry, LocalBuildFinished, LogSummary,
    RunLocalBuild,
};
use crate::progress::ProgressEvent;
use crate::worker::{Action, ToGoal};

/// A scratch store under a directory the caller owns (e.g. a `tempfile::TempDir`).
pub struct TestStore {
    pub store: Arc<LocalStore>,
    pub settings: Settings,
    hashes: Mutex<DrvHashCache>,
}

impl TestStore {
    /// Opens a store at `<dir>/store` with state in `<dir>/var/nix`, CA derivations
    /// enabled and no build users.
    pub fn open(dir: &Path) -> TestStore {
        let settings = Settings::for_root(dir, "experimental-features = ca-derivations\n")
            .expect("test settings");
        let store = Arc::new(LocalStore::open(&settings).expect("test store"));
        TestStore {
            store,
            settings,
            hashes: Mutex::new(DrvHashCache::new()),
        }
    }

    /// Adds an input-addressed derivation `name` with outputs `outputs`, depending on
    /// the `out` output of each of `inputs`, with extra environment entries.
    pub fn add_drv(
        &self,
        name: &str,
        outputs: &[&str],
        inputs: &[&StorePath],
        env: &[(&str, &str)],
    ) -> StorePath {
        let (drv, bytes) = self.make_drv(name, outputs, inputs, env);
        self.store
            .add_text_to_store(&format!("{name}.drv"), &bytes, &drv.drv_references())
            .expect("adding drv")
    }

    /// Writes many derivations and their outputs (all valid) with one registration:
    /// `specs` are (name, indices of earlier specs used as inputs). Fast setup for
    /// large graphs.
    pub fn add_valid_drvs(&self, specs: &[(String, Vec<usize>)]) -> Vec<StorePath> {
        let sd = self.store.store_dir().clone();
        let mut paths: Vec<StorePath> = Vec::new();
        let mut infos = Vec::new();
        for (name, inputs) in specs {
            let ins: Vec<&StorePath> = inputs.iter().map(|i| &paths[*i]).collect();
            let (drv, bytes) = self.make_drv(name, &["out"], &ins, &[]);
            let refs = drv.drv_references();
            let p = sd
                .text_path_of(&format!("{name}.drv"), &bytes, &refs)
                .expect("drv path");
            let real = self.store.real_path(&p);
            std::fs::write(&real, &bytes).expect("writing drv");
            let mut sink = drover::hash::HashSink::new(drover::hash::HashAlgo::Sha256);
            drover::nar::dump_bytes(&bytes, &mut sink).expect("hashing");
            let (h, n) = sink.finish();
            let mut i = ValidPathInfo::new(p.clone(), h, n);
            i.references = refs;
            i.ca = Some(drover::content_address::ContentAddress::Text(
                drover::hash::HashAlgo::Sha256.digest(&bytes),
            ));
            infos.push(i);
            for o in drv.outputs.values() {
                let Some(out) = o.path() else { continue };
                let real = self.store.real_path(out);
                std::fs::write(&real, name.as_bytes()).expect("writing output");
                let (h, n) = drover::nar::nar_hash_of_path(&real).expect("hashing output");
                let mut i = ValidPathInfo::new(out.clone(), h, n);
                i.deriver = Some(p.clone());
                infos.push(i);
            }
            paths.push(p);
        }
        self.store
            .register_valid_paths(&infos)
            .expect("registering");
        paths
    }

    fn make_drv(
        &self,
        name: &str,
        outputs: &[&str],
        inputs: &[&StorePath],
        env: &[(&str, &str)],
    ) -> (Derivation, Vec<u8>) {
        let sd = self.store.store_dir().clone();
        let mut drv = Derivation {
            system: drover::config::native_system(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), "true".into()],
            ..Default::default()
        };
        let floating = env.iter().any(|(k, _)| *k == "__contentAddressed");
        for o in outputs {
            if floating {
                drv.outputs.insert(
                    (*o).into(),
                    DerivationOutput::CAFloating {
                        method: drover::content_address::ContentAddressMethod::Fixed(
                            drover::content_address::FileIngestionMethod::Recursive,
                        ),
                        algo: drover::hash::HashAlgo::Sha256,
                    },
                );
            } else {
                drv.outputs.insert((*o).into(), DerivationOutput::Deferred);
            }
            drv.env.insert((*o).into(), String::new());
        }
        for i in inputs {
            drv.input_drvs
                .entry((*i).clone())
                .or_default()
                .insert("out".into());
        }
        drv.env.insert("name".into(), name.into());
        drv.env.insert("system".into(), drv.system.clone());
        drv.env.insert("builder".into(), "/bin/sh".into());
        for (k, v) in env {
            drv.env.insert((*k).into(), (*v).into());
        }
        let mut cache = self.hashes.lock().expect("lock");
        let store = &self.store;
        let drv = drv
            .with_output_paths::<_, StoreError>(&sd, name, |p| {
                cache.hash_of(&sd, p, |q| store.read_derivation(q).map(Arc::new))
            })
            .expect("output paths");
        let bytes = drv.to_aterm_bytes(&sd);
        (drv, bytes)
    }

    /// Adds a floating content-addressed derivation (`__contentAddressed = true`,
    /// recursive sha256) with output `out`, depending on the `out` of `inputs`.
    pub fn add_ca_drv(&self, name: &str, inputs: &[&StorePath]) -> StorePath {
        let (drv, bytes) = self.make_drv(
            name,
            &["out"],
            inputs,
            &[
                ("__contentAddressed", "1"),
                ("outputHashMode", "recursive"),
                ("outputHashAlgo", "sha256"),
            ],
        );
        self.store
            .add_text_to_store(&format!("{name}.drv"), &bytes, &drv.drv_references())
            .expect("adding drv")
    }

    /// The path of an output of a derivation.
    pub fn output(&self, drv: &StorePath, output: &str) -> StorePath {
        let d = self.store.read_derivation(drv).expect("drv");
        d.outputs[output].path().expect("static output").clone()
    }

    /// Makes all outputs of `drv` valid (as if built earlier).
    pub fn make_valid(&self, drv: &StorePath) {
        let d = self.store.read_derivation(drv).expect("drv");
        let outputs: BTreeMap<String, StorePath> = d
            .outputs
            .iter()
            .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
            .collect();
        write_outputs(&self.store, drv, &outputs).expect("writing outputs");
    }
}

/// Writes each output as a small file and registers it (as a builder would).
pub fn write_outputs(
    store: &LocalStore,
    drv: &StorePath,
    outputs: &BTreeMap<String, StorePath>,
) -> Result<(), StoreError> {
    let mut infos = Vec::new();
    for p in outputs.values() {
        if store.is_valid_path(p)? {
            continue;
        }
        let real = store.real_path(p);
        std::fs::write(&real, drv.to_string()).map_err(|source| StoreError::Io {
            context: "writing",
            path: real.clone(),
            source,
        })?;
        let (h, n) = drover::nar::nar_hash_of_path(&real).map_err(|e| StoreError::Io {
            context: "hashing",
            path: real.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut i = ValidPathInfo::new(p.clone(), h, n);
        i.deriver = Some(drv.clone());
        i.ultimate = true;
        infos.push(i);
    }
    store.register_valid_paths(&infos)
}

/// Produces every output of a build request: known paths via [`write_outputs`],
/// floating ones added as content-addressed paths (`fixed:r:sha256`).
pub fn build_outputs(
    store: &LocalStore,
    req: &crate::messages::LocalBuildRequest,
) -> Result<BTreeMap<String, StorePath>, StoreError> {
    write_outputs(store, &req.drv_path, &req.output_paths)?;
    let mut res = req.output_paths.clone();
    let name = drover::derivation::name_from_drv_path(&req.drv_path)?;
    for o in req.drv.outputs.keys() {
        if res.contains_key(o) {
            continue;
        }
        let dir = tempfile_dir(store);
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            context: "creating",
            path: dir.clone(),
            source,
        })?;
        let src = dir.join(format!("{}-{o}", req.drv_path.hash_part()));
        std::fs::write(&src, format!("{name} {o}")).map_err(|source| StoreError::Io {
            context: "writing",
            path: src.clone(),
            source,
        })?;
        let p = store.add_path_to_store(&src, &drover::store_path::output_path_name(name, o))?;
        let _ = std::fs::remove_file(&src);
        res.insert(o.clone(), p);
    }
    Ok(res)
}

fn tempfile_dir(store: &LocalStore) -> std::path::PathBuf {
    store.state_dir().join("fake-builds")
}

/// What the fake builder does with one derivation (by derivation name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeOutcome {
    Succeed,
    Fail(BuildStatus, String),
    /// A fixed-output hash mismatch (OutputRejected + the hash-mismatch flag).
    HashMismatch,
    /// Never answers (until cancelled).
    Hang,
}

/// What the fake builder saw.
#[derive(Debug, Default, Clone)]
pub struct BuilderLog {
    /// Derivation names in the order their builds started.
    pub started: Vec<String>,
    pub cancelled: Vec<u64>,
    pub running: usize,
    pub max_running: usize,
    /// Per build started: its name, `keep_failed`, and the `cores` of its run's
    /// own settings (`LocalBuildRequest::run_settings`), if it has them.
    pub settings: Vec<(String, bool, Option<u64>)>,
}

/// A LocalBuilder stand-in.
pub struct FakeBuilder {
    pub store: Arc<LocalStore>,
    pub script: HashMap<String, FakeOutcome>,
    pub delay: Duration,
    pub log: Arc<Mutex<BuilderLog>>,
}

impl FakeBuilder {
    pub fn new(store: Arc<LocalStore>) -> FakeBuilder {
        FakeBuilder {
            store,
            script: HashMap::new(),
            delay: Duration::from_millis(0),
            log: Arc::default(),
        }
    }
}

impl Actor for FakeBuilder {
    type Context = Context<Self>;
}

fn drv_name(p: &StorePath) -> String {
    p.name().trim_end_matches(".drv").to_owned()
}

impl Handler<RunLocalBuild> for FakeBuilder {
    type Result = ();
    fn handle(&mut self, msg: RunLocalBuild, _ctx: &mut Context<Self>) {
        let name = drv_name(&msg.request.drv_path);
        let outcome = self
            .script
            .get(&name)
            .cloned()
            .unwrap_or(FakeOutcome::Succeed);
        {
            let mut l = self.log.lock().expect("lock");
            l.settings.push((
                name.clone(),
                msg.request.keep_failed,
                msg.request.run_settings.as_ref().map(|r| r.build.cores),
            ));
            l.started.push(name);
            l.running += 1;
            l.max_running = l.max_running.max(l.running);
        }
        if outcome == FakeOutcome::Hang {
            return;
        }
        let store = self.store.clone();
        let log = self.log.clone();
        let delay = self.delay;
        actix::spawn(async move {
            tokio::time::sleep(delay).await;
            let req = msg.request;
            let _ = &req;
            let (result, hash_mismatch, outputs) = match outcome {
                FakeOutcome::Succeed => {
                    let req2 = req.clone();
                    let r = tokio::task::spawn_blocking(move || build_outputs(&store, &req2)).await;
                    match r {
                        Ok(Ok(outputs)) => {
                            let mut r = BuildResult::new(BuildStatus::Built);
                            r.times_built = 1;
                            (r, false, outputs)
                        }
                        _ => (
                            BuildResult::failure(BuildStatus::MiscFailure, "fake write failed"),
                            false,
                            BTreeMap::new(),
                        ),
                    }
                }
                FakeOutcome::Fail(s, m) => (BuildResult::failure(s, m), false, BTreeMap::new()),
                FakeOutcome::HashMismatch => (
                    BuildResult::failure(BuildStatus::OutputRejected, "hash mismatch"),
                    true,
                    BTreeMap::new(),
                ),
                FakeOutcome::Hang => unreachable!("returned above"),
            };
            {
                // A cancelled build no longer counts as running (the cancel said so).
                let mut l = log.lock().expect("lock");
                if l.cancelled.contains(&msg.id) {
                    return;
                }
                l.running -= 1;
            }
            msg.reply_to.do_send(LocalBuildFinished {
                id: msg.id,
                result,
                hash_mismatch,
                outputs,
            });
        });
    }
}

impl Handler<CancelLocalBuild> for FakeBuilder {
    type Result = ();
    fn handle(&mut self, msg: CancelLocalBuild, _ctx: &mut Context<Self>) {
        let mut l = self.log.lock().expect("lock");
        l.cancelled.push(msg.id);
        l.running = l.running.saturating_sub(1);
    }
}

/// A scripted hook reply (at the pool level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeHookReply {
    Decline,
    DeclinePermanently,
    Postpone,
    /// Accept; the job builds the outputs (if `build`) and exits with `exit_code`
    /// (None: killed by a signal — the hook died).
    Accept {
        exit_code: Option<i32>,
        build: bool,
    },
    /// Something that is not a reply: `bad hook reply '…'`.
    Garbage(String),
}

/// A hook pool stand-in: answers each `HookTry` with the next scripted reply (the
/// last one repeats).
pub struct FakeHookPool {
    pub store: Arc<LocalStore>,
    pub replies: VecDeque<FakeHookReply>,
    /// (amWilling, derivation name) of every request.
    pub tries: Arc<Mutex<Vec<(bool, String)>>>,
}

impl Actor for FakeHookPool {
    type Context = Context<Self>;
}

impl Handler<HookTry> for FakeHookPool {
    type Result = HookReply;
    fn handle(&mut self, msg: HookTry, _ctx: &mut Context<Self>) -> HookReply {
        self.tries
            .lock()
            .expect("lock")
            .push((msg.am_willing, drv_name(&msg.drv_path)));
        let r = if self.replies.len() > 1 {
            self.replies.pop_front()
        } else {
            self.replies.front().cloned()
        };
        match r.unwrap_or(FakeHookReply::DeclinePermanently) {
            FakeHookReply::Decline => HookReply::Decline,
            FakeHookReply::DeclinePermanently => HookReply::DeclinePermanently,
            FakeHookReply::Postpone => HookReply::Postpone,
            FakeHookReply::Garbage(s) => HookReply::Error(format!("bad hook reply '{s}'")),
            FakeHookReply::Accept { exit_code, build } => {
                let job = FakeHookJob {
                    store: self.store.clone(),
                    drv_path: msg.drv_path,
                    exit_code,
                    build,
                }
                .start();
                HookReply::Accept {
                    machine: "fake-machine".into(),
                    job: job.recipient(),
                }
            }
        }
    }
}

/// The job of an accepted fake hook.
pub struct FakeHookJob {
    store: Arc<LocalStore>,
    drv_path: StorePath,
    exit_code: Option<i32>,
    build: bool,
}

impl Actor for FakeHookJob {
    type Context = Context<Self>;
}

impl Handler<HookBuild> for FakeHookJob {
    type Result = ();
    fn handle(&mut self, msg: HookBuild, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let drv_path = self.drv_path.clone();
        let (exit_code, build) = (self.exit_code, self.build);
        actix::spawn(async move {
            if build {
                let _ = tokio::task::spawn_blocking(move || {
                    let d = store.read_derivation(&drv_path)?;
                    let outs = d
                        .outputs
                        .iter()
                        .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
                        .collect();
                    write_outputs(&store, &drv_path, &outs)
                })
                .await;
            }
            msg.reply_to.do_send(HookFinished {
                id: msg.id,
                exit_code,
                log: LogSummary::default(),
                alarm: None,
            });
        });
        ctx.stop();
    }
}

/// Records every progress event.
#[derive(Default)]
pub struct ProgressRecorder {
    pub events: Arc<Mutex<Vec<ProgressEvent>>>,
}

impl Actor for ProgressRecorder {
    type Context = Context<Self>;
}

impl Handler<ProgressEvent> for ProgressRecorder {
    type Result = ();
    fn handle(&mut self, msg: ProgressEvent, _ctx: &mut Context<Self>) {
        self.events.lock().expect("lock").push(msg);
    }
}

/// Runs a [`crate::WorkerCore`] and its goals without an actor system, for
/// deterministic scheduler tests. Goals are hosted by the same
/// [`GoalHost`](crate::goal::host::GoalHost) as in the goal actors, so effects are
/// performed by the same code; only the sink differs: blocking jobs run inline when
/// their turn comes, local builds go through a closure, timers fire at once, hook
/// requests through a closure (only replies without a job: accepting needs an actor
/// system).
///
/// Order: messages from the core (and a goal's "later" events) are delivered first,
/// in order; then the oldest outside event (a job's result, a build's end, a hook
/// reply, a timer), one at a time.
pub struct SyncDriver<'a> {
    pub env: crate::goal::JobEnv,
    /// Decides each local build; `None` leaves it running (never finishes).
    #[allow(clippy::type_complexity)]
    pub build:
        Box<dyn FnMut(&crate::messages::LocalBuildRequest) -> Option<LocalBuildFinished> + 'a>,
    pub hook: Box<dyn FnMut(&HookTryArgs) -> HookReply + 'a>,
    /// Whether a blocking job of a goal of this kind ([`GoalMachine::KIND`]) stays
    /// in flight for ever instead of running (given the progress so far).
    #[allow(clippy::type_complexity)]
    pub hold_job: Box<dyn FnMut(&'static str, &[ProgressEvent]) -> bool + 'a>,
    /// Whether a blocking job of this goal (by its key, given the progress so
    /// far) is slow: it is set aside and ends only when nothing else moves, after
    /// the forced grant the Worker's timer sends by then (the graph loads more
    /// slowly than the forced-grant limit), one slow job per such turn.
    #[allow(clippy::type_complexity)]
    pub slow_job: Box<dyn FnMut(&crate::progress::GoalKey, &[ProgressEvent]) -> bool + 'a>,
    /// Derivation names in build start order.
    pub started: Vec<String>,
    /// The goals made as subgoals (`Action::Spawn`'s `subgoal`), in order.
    pub subgoals: Vec<crate::progress::GoalKey>,
    pub cancelled: Vec<u64>,
    /// Goal ids whose running hook builds were cancelled (`CancelHookBuild`).
    pub cancelled_hooks: Vec<u64>,
    /// Builds the `build` closure left running: (goal id, derivation name).
    pub running: Vec<(u64, String)>,
    pub tries: Vec<HookTryArgs>,
    pub progress: Vec<ProgressEvent>,
    hosts: BTreeMap<GoalId, SyncGoal>,
    /// Messages from the core and "later" events: delivered before anything else.
    inbox: VecDeque<(GoalId, Input)>,
    /// Outside events, one delivered per turn.
    outside: VecDeque<(GoalId, Input)>,
    /// Slow jobs ([`SyncDriver::slow_job`]), in the order they were asked for.
    slow: VecDeque<(GoalId, Job)>,
}

/// What a hook request carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookTryArgs {
    pub am_willing: bool,
    pub drv_name: String,
}

enum SyncGoal {
    Drv(GoalHost<crate::goal::derivation::DerivationGoal>),
    Subst(GoalHost<crate::goal::path_substitution::PathSubstitutionGoal>),
    DrvOut(GoalHost<crate::goal::drv_output_substitution::DrvOutputSubstitutionGoal>),
}

enum Input {
    Msg(ToGoal),
    Event(Event),
    Job(&'static str, Job),
}

/// The driver's [`EffectSink`] for one goal's step.
struct SyncSink<'d, 'a> {
    goal: GoalId,
    kind: &'static str,
    d: &'d mut SyncDriver<'a>,
    reports: Vec<GoalReport>,
}

impl EffectSink for SyncSink<'_, '_> {
    fn blocking(&mut self, job: Job) {
        self.d
            .outside
            .push_back((self.goal, Input::Job(self.kind, job)));
    }

    fn run_local_build(&mut self, request: crate::messages::LocalBuildRequest) {
        self.d.started.push(drv_name(&request.drv_path));
        match (self.d.build)(&request) {
            Some(mut f) => {
                f.id = self.goal;
                self.d
                    .outside
                    .push_back((self.goal, Input::Event(Event::LocalBuildFinished(f))));
            }
            None => self
                .d
                .running
                .push((self.goal, drv_name(&request.drv_path))),
        }
    }

    fn cancel_local_build(&mut self) {
        self.d.cancelled.push(self.goal);
    }

    fn hook_try(&mut self, request: HookTry) {
        let args = HookTryArgs {
            am_willing: request.am_willing,
            drv_name: drv_name(&request.drv_path),
        };
        let r = (self.d.hook)(&args);
        self.d.tries.push(args);
        self.d
            .outside
            .push_back((self.goal, Input::Event(Event::HookReply(r))));
    }

    fn hook_build(&mut self, _job: Recipient<HookBuild>, _work: HookBuildWork) {}

    fn cancel_hook_build(&mut self) {
        self.d.cancelled_hooks.push(self.goal);
    }

    fn wake_later(&mut self) {
        self.d
            .outside
            .push_back((self.goal, Input::Event(Event::Wake)));
    }

    fn later(&mut self, ev: Event) {
        self.d.inbox.push_back((self.goal, Input::Event(ev)));
    }

    fn report(&mut self, report: GoalReport) {
        self.reports.push(report);
    }
}

impl<'a> SyncDriver<'a> {
    /// A driver over `store` whose builds succeed (writing the outputs).
    pub fn new(
        store: Arc<LocalStore>,
        settings: Arc<crate::WorkerSettings>,
        substituters: Vec<Arc<dyn crate::substituter::Substituter>>,
    ) -> SyncDriver<'a> {
        let st = store.clone();
        SyncDriver {
            env: crate::goal::JobEnv {
                store,
                substituters,
                drv_hashes: Mutex::new(DrvHashCache::new()),
                settings,
                contents: Default::default(),
                registrations: Default::default(),
            },
            build: Box::new(move |req| {
                let r = build_outputs(&st, req);
                Some(LocalBuildFinished {
                    id: 0,
                    result: match &r {
                        Ok(_) => BuildResult::new(BuildStatus::Built),
                        Err(e) => BuildResult::failure(BuildStatus::MiscFailure, e.to_string()),
                    },
                    hash_mismatch: false,
                    outputs: r.unwrap_or_default(),
                })
            }),
            hook: Box::new(|_| HookReply::DeclinePermanently),
            hold_job: Box::new(|_, _| false),
            slow_job: Box::new(|_, _| false),
            started: Vec::new(),
            subgoals: Vec::new(),
            cancelled: Vec::new(),
            cancelled_hooks: Vec::new(),
            running: Vec::new(),
            tries: Vec::new(),
            progress: Vec::new(),
            hosts: BTreeMap::new(),
            inbox: VecDeque::new(),
            outside: VecDeque::new(),
            slow: VecDeque::new(),
        }
    }

    /// Hands an outside event (e.g. the end of a build left running) to a goal; it
    /// is delivered by the next [`SyncDriver::run`].
    pub fn deliver(&mut self, goal: GoalId, ev: Event) {
        self.outside.push_back((goal, Input::Event(ev)));
    }

    /// Runs the core and its goals until nothing is left to do; returns the outcome
    /// when the run finished, `None` when it waits for something outside.
    pub fn run(&mut self, core: &mut crate::WorkerCore) -> Option<crate::RealiseOutcome> {
        loop {
            for a in core.take_actions() {
                match a {
                    Action::Spawn {
                        goal,
                        machine,
                        env,
                        subgoal,
                    } => {
                        if subgoal {
                            self.subgoals.extend(core.goal_key(goal).cloned());
                        }
                        let host = match *machine {
                            AnyGoal::Drv(g) => SyncGoal::Drv(GoalHost::new(goal, g, env)),
                            AnyGoal::Subst(g) => SyncGoal::Subst(GoalHost::new(goal, g, env)),
                            AnyGoal::DrvOut(g) => SyncGoal::DrvOut(GoalHost::new(goal, g, env)),
                        };
                        self.hosts.insert(goal, host);
                    }
                    Action::ToGoal { goal, msg } => self.inbox.push_back((goal, Input::Msg(msg))),
                    Action::Progress(p) => self.progress.push(p),
                }
            }
            if core.is_finished() {
                // The cancels of the end of the run still reach their goals.
                while let Some((g, input)) = self.inbox.pop_front() {
                    if matches!(input, Input::Msg(ToGoal::Cancel)) {
                        self.input(core, g, input);
                    }
                }
                return Some(core.outcome());
            }
            if let Some((g, input)) = self.inbox.pop_front().or_else(|| self.outside.pop_front()) {
                self.input(core, g, input);
                continue;
            }
            // Nothing moves but goals that stay unsettled (a slow or held job):
            // the Worker's timer forces the deferred grants (a reserve kept for
            // goals still loading); then a slow job ends; only when none is left
            // does the timer's longest wait pass and every free slot go.
            if core.has_deferred_grants() && core.grant_deferred(false) {
                continue;
            }
            if let Some((g, job)) = self.slow.pop_front() {
                let ev = job(&self.env);
                if let Some(host) = self.hosts.remove(&g) {
                    self.step(core, g, host, Input::Event(ev));
                }
                continue;
            }
            if core.has_deferred_grants() && core.grant_deferred(true) {
                continue;
            }
            return None;
        }
    }

    fn input(&mut self, core: &mut crate::WorkerCore, goal: GoalId, input: Input) {
        let Some(host) = self.hosts.remove(&goal) else {
            return;
        };
        let input = match input {
            Input::Job(kind, job) => {
                if (self.hold_job)(kind, &self.progress) {
                    self.hosts.insert(goal, host);
                    return;
                }
                if core
                    .goal_key(goal)
                    .is_some_and(|key| (self.slow_job)(key, &self.progress))
                {
                    self.hosts.insert(goal, host);
                    self.slow.push_back((goal, job));
                    return;
                }
                Input::Event(job(&self.env))
            }
            other => other,
        };
        self.step(core, goal, host, input);
    }

    fn step(
        &mut self,
        core: &mut crate::WorkerCore,
        goal: GoalId,
        mut host: SyncGoal,
        input: Input,
    ) {
        let mut sink = SyncSink {
            goal,
            kind: host.kind(),
            d: self,
            reports: Vec::new(),
        };
        host.input(input, &mut sink);
        let reports = std::mem::take(&mut sink.reports);
        if !host.is_finished() {
            self.hosts.insert(goal, host);
        }
        for r in reports {
            core.report(goal, r);
        }
    }
}

impl SyncGoal {
    fn kind(&self) -> &'static str {
        match self {
            SyncGoal::Drv(_) => crate::goal::derivation::DerivationGoal::KIND,
            SyncGoal::Subst(_) => crate::goal::path_substitution::PathSubstitutionGoal::KIND,
            SyncGoal::DrvOut(_) => {
                crate::goal::drv_output_substitution::DrvOutputSubstitutionGoal::KIND
            }
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            SyncGoal::Drv(h) => h.is_finished(),
            SyncGoal::Subst(h) => h.is_finished(),
            SyncGoal::DrvOut(h) => h.is_finished(),
        }
    }

    fn input(&mut self, input: Input, sink: &mut SyncSink) {
        match self {
            SyncGoal::Drv(h) => feed(h, input, sink),
            SyncGoal::Subst(h) => feed(h, input, sink),
            SyncGoal::DrvOut(h) => feed(h, input, sink),
        }
    }
}

/// Delivers one input to a hosted goal, as the goal actor's handlers do.
fn feed<G: GoalMachine>(h: &mut GoalHost<G>, input: Input, sink: &mut SyncSink) {
    match input {
        Input::Msg(ToGoal::Start) => h.step(Event::Start, sink),
        Input::Msg(ToGoal::SubGoalDone(r)) => h.step(Event::WaiteeDone(r), sink),
        Input::Msg(ToGoal::AllSubGoalsDone) => h.step(Event::WaiteesDone, sink),
        Input::Msg(ToGoal::SlotGranted) => h.step(Event::SlotGranted, sink),
        Input::Msg(ToGoal::AddWantedOutputs(o)) => h.add_wanted_outputs(&o),
        Input::Msg(ToGoal::Cancel) => h.cancel(sink),
        Input::Event(ev) => h.step(ev, sink),
        Input::Job(..) => unreachable!("jobs are run before they reach a goal"),
    }
}

/// A goal → Worker message, as a [`FakeWorker`] passes it on.
#[derive(Debug)]
pub enum FromGoal {
    RequestSubGoals(crate::messages::RequestSubGoals),
    AcquireSlot(crate::messages::AcquireSlot),
    ReleaseSlot(crate::messages::ReleaseSlot),
    Progress(crate::messages::GoalProgress),
    Finished(crate::messages::GoalFinished),
    Fatal(crate::messages::GoalFatal),
    Stopped(crate::messages::GoalStopped),
}

/// A Worker stand-in for goal actor tests: every message a goal sends it goes to a
/// channel, so the test sees them in order and answers the goal itself.
pub struct FakeWorker {
    pub tx: tokio::sync::mpsc::UnboundedSender<FromGoal>,
}

impl FakeWorker {
    /// A started fake Worker, the link goals report to, and the receiving end.
    pub fn start() -> (
        Addr<FakeWorker>,
        crate::messages::WorkerLink,
        tokio::sync::mpsc::UnboundedReceiver<FromGoal>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let addr = FakeWorker { tx }.start();
        let link = crate::messages::WorkerLink::to(&addr);
        (addr, link, rx)
    }
}

impl Actor for FakeWorker {
    type Context = Context<Self>;
}

macro_rules! fake_worker_handles {
    ($($msg:ident),*) => {$(
        impl Handler<crate::messages::$msg> for FakeWorker {
            type Result = ();
            fn handle(&mut self, msg: crate::messages::$msg, _: &mut Context<Self>) {
                let _ = self.tx.send(FromGoal::$msg(msg));
            }
        }
    )*};
}

fake_worker_handles!(RequestSubGoals, AcquireSlot, ReleaseSlot);

impl Handler<crate::messages::GoalProgress> for FakeWorker {
    type Result = ();
    fn handle(&mut self, msg: crate::messages::GoalProgress, _: &mut Context<Self>) {
        let _ = self.tx.send(FromGoal::Progress(msg));
    }
}

impl Handler<crate::messages::GoalFinished> for FakeWorker {
    type Result = ();
    fn handle(&mut self, msg: crate::messages::GoalFinished, _: &mut Context<Self>) {
        let _ = self.tx.send(FromGoal::Finished(msg));
    }
}

impl Handler<crate::messages::GoalFatal> for FakeWorker {
    type Result = ();
    fn handle(&mut self, msg: crate::messages::GoalFatal, _: &mut Context<Self>) {
        let _ = self.tx.send(FromGoal::Fatal(msg));
    }
}

impl Handler<crate::messages::GoalStopped> for FakeWorker {
    type Result = ();
    fn handle(&mut self, msg: crate::messages::GoalStopped, _: &mut Context<Self>) {
        let _ = self.tx.send(FromGoal::Stopped(msg));
    }
}

// ---------------------------------------------------------------------------------------
// An in-memory substituter
// ---------------------------------------------------------------------------------------

use std::collections::BTreeSet;
use std::path::PathBuf;

use drover::realisation::{DrvOutput, Realisation};
use drover::store::RepairFlag;
use drover::store_path::StorePathSet;

use crate::progress::Transfer;
use crate::substituter::{SubstitutablePathInfo, Substituter, SubstituterError};

/// One path the in-memory substituter serves: its info and file contents (a regular
/// file, written as is into the store).
#[derive(Debug, Clone)]
pub struct FakeEntry {
    pub info: SubstitutablePathInfo,
    pub contents: Vec<u8>,
}

/// Scripted misbehaviour of the fake for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeFault {
    /// `query_path_info` fails.
    QueryFails,
    /// `copy_into` fails (a corrupt NAR).
    CopyFails,
    /// `copy_into` says the NAR is gone.
    Gone,
}

/// An in-memory substituter serving files it holds; for tests and examples.
#[derive(Default)]
pub struct InMemorySubstituter {
    pub uri: String,
    pub priority: u64,
    /// Accept its paths without signatures (true from [`InMemorySubstituter::new`]).
    pub trusted: bool,
    paths: Mutex<BTreeMap<StorePath, FakeEntry>>,
    realisations: Mutex<BTreeMap<DrvOutput, Realisation>>,
    faults: Mutex<HashMap<StorePath, FakeFault>>,
    /// Every path copied out of it, in order.
    pub copied: Mutex<Vec<StorePath>>,
    /// Scratch directory for writing files before adding them.
    scratch: Mutex<Option<PathBuf>>,
    /// Fetch paths ahead of their references, as a binary cache does (off by
    /// default).
    pub fetch_ahead: bool,
}

/// Writes a fake entry's contents as a regular file at `tmp`.
fn write_fake(tmp: &std::path::Path, contents: &[u8]) -> Result<(), drover::store::StoreError> {
    std::fs::write(tmp, contents).map_err(|source| drover::store::StoreError::Io {
        context: "writing",
        path: tmp.to_owned(),
        source,
    })
}

impl InMemorySubstituter {
    /// The entry to copy and the info to register it with; the path's fault, if
    /// any, as the copy's error.
    fn entry_to_copy(
        &self,
        path: &StorePath,
        store: &LocalStore,
    ) -> Result<(FakeEntry, ValidPathInfo), SubstituterError> {
        match self.fault(path) {
            Some(FakeFault::CopyFails) => {
                return Err(SubstituterError::Failed(format!(
                    "NAR for '{}' fetched from '{}' is incomplete",
                    store.store_dir().print(path),
                    self.uri
                )))
            }
            Some(FakeFault::Gone) => {
                return Err(SubstituterError::Gone {
                    path: store.store_dir().print(path),
                    message: format!(
                        "file 'nar/{}.nar' does not exist in binary cache '{}'",
                        path.hash_part(),
                        self.uri
                    ),
                })
            }
            _ => {}
        }
        let entry = self
            .paths
            .lock()
            .expect("lock")
            .get(path)
            .cloned()
            .ok_or_else(|| SubstituterError::Gone {
                path: store.store_dir().print(path),
                message: format!(
                    "file '{}.narinfo' does not exist in binary cache '{}'",
                    path.hash_part(),
                    self.uri
                ),
            })?;
        let _ = &self.scratch;
        let mut info = ValidPathInfo::new(
            path.clone(),
            entry.info.nar_hash.clone(),
            entry.info.nar_size,
        );
        info.references = entry.info.references.clone();
        info.deriver = entry.info.deriver.clone();
        info.ca = entry.info.ca.clone();
        info.sigs = entry.info.sigs.clone();
        Ok((entry, info))
    }

    pub fn new(uri: &str, priority: u64) -> InMemorySubstituter {
        InMemorySubstituter {
            uri: uri.to_owned(),
            priority,
            trusted: true,
            ..Default::default()
        }
    }

    /// Serves a regular file with these contents at `path` (its NAR hash is computed).
    pub fn add_file(&self, path: StorePath, contents: &[u8], references: StorePathSet) {
        let mut sink = drover::hash::HashSink::new(drover::hash::HashAlgo::Sha256);
        drover::nar::dump_bytes(contents, &mut sink).expect("hashing into memory");
        let (nar_hash, nar_size) = sink.finish();
        let info = SubstitutablePathInfo {
            path: path.clone(),
            references,
            deriver: None,
            nar_hash,
            nar_size,
            download_size: Some(contents.len() as u64),
            ca: None,
            sigs: BTreeSet::new(),
        };
        self.paths.lock().expect("lock").insert(
            path,
            FakeEntry {
                info,
                contents: contents.to_vec(),
            },
        );
    }

    pub fn add_realisation(&self, r: Realisation) {
        self.realisations
            .lock()
            .expect("lock")
            .insert(r.id.clone(), r);
    }

    /// Adds a signature to a served path's info.
    pub fn add_signature(&self, path: &StorePath, sig: String) {
        if let Some(e) = self.paths.lock().expect("lock").get_mut(path) {
            e.info.sigs.insert(sig);
        }
    }

    pub fn set_fault(&self, path: StorePath, fault: FakeFault) {
        self.faults.lock().expect("lock").insert(path, fault);
    }

    fn fault(&self, path: &StorePath) -> Option<FakeFault> {
        self.faults.lock().expect("lock").get(path).copied()
    }

    pub fn copied(&self) -> Vec<StorePath> {
        self.copied.lock().expect("lock").clone()
    }
}

impl Substituter for InMemorySubstituter {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn priority(&self) -> u64 {
        self.priority
    }

    fn is_trusted(&self) -> bool {
        self.trusted
    }

    fn query_path_info(
        &self,
        path: &StorePath,
    ) -> Result<Option<SubstitutablePathInfo>, SubstituterError> {
        if self.fault(path) == Some(FakeFault::QueryFails) {
            return Err(SubstituterError::Failed(format!(
                "unable to download narinfo of '{path}' from '{}'",
                self.uri
            )));
        }
        Ok(self
            .paths
            .lock()
            .expect("lock")
            .get(path)
            .map(|e| e.info.clone()))
    }

    /// Counts the file's length as downloaded and its NAR size as unpacked (the
    /// `FileSize` and `NarSize` it serves).
    fn copy_into(
        &self,
        path: &StorePath,
        store: &LocalStore,
        repair: RepairFlag,
        progress: &Transfer,
    ) -> Result<(), SubstituterError> {
        let (entry, info) = self.entry_to_copy(path, store)?;
        store
            .add_object_with(&info, repair, |tmp| write_fake(tmp, &entry.contents))
            .map_err(|e| SubstituterError::Failed(e.to_string()))?;
        progress.add_downloaded(entry.contents.len() as u64);
        progress.add_unpacked(entry.info.nar_size);
        self.copied.lock().expect("lock").push(path.clone());
        Ok(())
    }

    fn fetches_early(&self) -> bool {
        self.fetch_ahead
    }

    fn fetch_unregistered(
        &self,
        path: &StorePath,
        store: &LocalStore,
        progress: &Transfer,
    ) -> Result<crate::substituter::Fetched, SubstituterError> {
        use crate::substituter::{Fetched, UnregisteredPlace};
        if !self.fetch_ahead {
            return Ok(Fetched::Deferred);
        }
        let Some(place) = UnregisteredPlace::take() else {
            return Ok(Fetched::Deferred);
        };
        let (entry, info) = self.entry_to_copy(path, store)?;
        let object = store
            .write_unregistered(&info, |tmp| write_fake(tmp, &entry.contents))
            .map_err(|e| SubstituterError::Failed(e.to_string()))?;
        progress.add_downloaded(entry.contents.len() as u64);
        progress.add_unpacked(entry.info.nar_size);
        self.copied.lock().expect("lock").push(path.clone());
        Ok(match object {
            None => Fetched::AlreadyValid,
            Some(object) => Fetched::Unpacked {
                object: Box::new(object),
                place,
            },
        })
    }

    fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, SubstituterError> {
        Ok(self.realisations.lock().expect("lock").get(id).cloned())
    }
}
