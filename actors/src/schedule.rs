//! Critical-path scheduling: which waiting goal gets a free build or substitution
//! slot, and what the run is expected to take. A plain state machine (no actix, no
//! clock of its own: the caller passes `now`), owned by [`crate::WorkerCore`].
//!
//! * The estimate graph: one node per live goal with its expected wall time (a
//!   derivation's from the [`Estimator`] — drover's build history — or
//!   [`DEFAULT_BUILD_TIME`]; a substitution's from its NAR size at
//!   [`SUBSTITUTION_BYTES_PER_SEC`] plus [`SUBSTITUTION_OVERHEAD`]; a drv-output
//!   lookup's [`SUBSTITUTION_OVERHEAD`]), and an edge from each goal to the goals
//!   waiting on it.
//! * The path of a goal: its own estimate plus the longest path among the goals
//!   waiting on it, i.e. the estimated time from its start to the end of a
//!   requested goal through it.
//! * When the choice is made: a goal that asks for a slot is queued; slots are
//!   granted by [`Scheduler::grant`] only once every live goal is *settled* —
//!   waiting for a slot, holding one, waiting for its inputs, or running a build
//!   (local or remote) — so the ready set is complete when the choice is made (the
//!   goals still loading a `.drv` or checking outputs are about to become ready or
//!   to wait; a goal that gave its slot back after its build is registering and
//!   about to end, and its waiters then ask before the choice is made) — unless
//!   no unsettled goal could claim more: one settled before (its inputs known)
//!   claims at most its path (registering: its waiters' path), so a waiting goal
//!   with a longer path is granted at once; one never settled may
//!   still find longer inputs and is waited for.
//! * Forced grants ([`Force`]): the host forces the grant after a while so a goal
//!   that stays unsettled (still loading its `.drv`, waiting for a lock another
//!   process holds, asking a slow hook) never holds the rest back. First at the
//!   limit a wrong choice could cost (quiet, or the estimate of the build the slot
//!   would start: [`Force::Limit`]): while some goal was never settled — the graph
//!   is still being loaded, and the goals found last may be the critical path
//!   (a chain is found one link at a time, each behind the loading of everything
//!   requested beside it) — one free slot of each kind (with two or more) is kept
//!   for a goal whose path beats the first one started so; the others fill,
//!   longest path first, and go on filling as they free, without another limit,
//!   until every live goal has settled once. A wrong choice then costs the
//!   critical path nothing as long as one such goal appears at a time: it finds
//!   the kept slot. Before this, a forced grant filled every free slot, and in
//!   `bench_schedule` (a) the chain's first link, found after the 0.3 s limit,
//!   waited for an independent build to end. After the host's longest wait
//!   ([`Force::All`]) the kept slot goes too (a goal may never settle), and so on
//!   until every live goal has settled once.
//! * The choice: the longest path first; ties by the longer own estimate (longest
//!   job first), then by the lower goal id (goals are numbered in the order they
//!   were requested).
//! * Estimates ([`Scheduler::estimates`]): the remaining critical path (a running
//!   build counts what is left of its estimate, never less than zero) and the
//!   remaining work of derivations divided by the build slots — and by the share
//!   of the slots' time since the first grant that the finished builds' estimates
//!   account for (overhead between builds, load, a history from a slower run;
//!   from one second on, between 0.25 and 4) —; the ETA is the larger, `None` until the graph was first
//!   complete. A build running on a remote machine (through the hook) counts in
//!   the critical path but not in the local work (nor in the finished work the
//!   share is measured by): it takes no local slot. Graphs of more than [`LARGE_GRAPH`] goals are estimated at most
//!   every [`LARGE_GRAPH_ESTIMATE_INTERVAL`].
//! * Incrementally: a goal's path depends only on its own estimate and the paths
//!   of its waiters, so a change (a new goal or edge, a goal gone, a new estimate)
//!   forgets the paths of that goal and of the goals it waits for, transitively,
//!   and only those are computed again. The paths are kept ordered (all of them,
//!   and those of the queued goals per slot kind in the grant's order), the local
//!   work not started is a running sum, and the goals that started are kept
//!   apart, so a grant and an estimate cost what changed (and the goals
//!   running), not the size of the graph — with the same choices and values as
//!   a walk of the whole graph.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use drover::build_history::{HistorySnapshot, LOCAL_MACHINE};
use drover::store_path::{StoreDir, StorePath};

use crate::goal::host::SlotKind;
use crate::goal::GoalId;
use crate::local_builder::history::HistoryLog;
use crate::progress::Estimates;

/// The estimate of a derivation the history knows nothing about.
pub const DEFAULT_BUILD_TIME: Duration = Duration::from_secs(10);
/// The rate a substitution is expected to unpack at, when its NAR size is known.
pub const SUBSTITUTION_BYTES_PER_SEC: u64 = 50_000_000;
/// What a substitution (or a drv-output lookup) is expected to take besides bytes.
pub const SUBSTITUTION_OVERHEAD: Duration = Duration::from_millis(50);
/// Graphs with more goals than this are estimated at most every
/// [`LARGE_GRAPH_ESTIMATE_INTERVAL`] (an estimate walks the whole graph, and
/// events come one per goal step: a closure of 1,001 substitutions spent 44 % of
/// the Worker's thread here when only graphs above 1,000 goals were throttled).
pub const LARGE_GRAPH: usize = 100;
pub const LARGE_GRAPH_ESTIMATE_INTERVAL: Duration = Duration::from_millis(100);
/// How much the ETA must move (beyond the time that passed) for a new event.
pub const ETA_RESOLUTION: Duration = Duration::from_millis(100);

/// Where estimates of build times come from.
pub trait Estimator: Send + Sync {
    /// The expected wall time of building `drv_path`; `None` when unknown.
    fn build_time(&self, drv_path: &StorePath) -> Option<Duration>;

    /// Takes in what the source learnt since it was read (blocking: hosts call it
    /// off the actor threads). Fixed sources have nothing to learn.
    fn refresh(&self) {}
}

/// No history: every derivation gets [`DEFAULT_BUILD_TIME`], so the path is the
/// number of goals in the chain.
pub struct NoHistory;

impl Estimator for NoHistory {
    fn build_time(&self, _: &StorePath) -> Option<Duration> {
        None
    }
}

/// Fixed estimates by derivation name (without hash and `.drv`): tests and
/// benchmarks inject these.
#[derive(Default)]
pub struct FixedEstimates(pub HashMap<String, Duration>);

impl Estimator for FixedEstimates {
    fn build_time(&self, drv_path: &StorePath) -> Option<Duration> {
        let name = drv_path.name();
        self.0
            .get(name.strip_suffix(".drv").unwrap_or(name))
            .copied()
    }
}

/// Estimates from drover's build history, for builds on this machine of this
/// system: a snapshot read when it is made and brought up to date by
/// [`Estimator::refresh`] (the builds recorded since, by this process or others),
/// so a long-running process (`drover daemon`) learns from every build.
pub struct HistoryEstimator {
    log: Arc<HistoryLog>,
    snapshot: RwLock<HistorySnapshot>,
    store_dir: StoreDir,
    system: String,
}

impl HistoryEstimator {
    /// Reads the history (blocking).
    pub fn new(log: Arc<HistoryLog>, store_dir: StoreDir, system: String) -> HistoryEstimator {
        let snapshot = RwLock::new(log.snapshot());
        HistoryEstimator {
            log,
            snapshot,
            store_dir,
            system,
        }
    }
}

impl Estimator for HistoryEstimator {
    fn build_time(&self, drv_path: &StorePath) -> Option<Duration> {
        let name = drv_path.name();
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .estimate(
                &self.store_dir.print(drv_path),
                name.strip_suffix(".drv").unwrap_or(name),
                &self.system,
                LOCAL_MACHINE,
            )
            .map(|(d, _)| d)
    }

    fn refresh(&self) {
        // Read into a copy, so estimates are never held up by the database.
        let mut snap = self
            .snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.log.update(&mut snap);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snap;
    }
}

/// What a node stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Derivation(StorePath),
    Substitution(StorePath),
    DrvOutput,
}

#[derive(Debug)]
struct Node {
    kind: NodeKind,
    estimate: Duration,
    waiters: BTreeSet<GoalId>,
    waitees: BTreeSet<GoalId>,
    holds: [bool; 2],
    queued: [bool; 2],
    waits_inputs: bool,
    started: Option<Instant>,
    /// Its build runs on a remote machine (through the hook): it takes no local
    /// build slot, so its time is not local work.
    remote: bool,
    /// Gave its slot back after its build started: registering, about to end
    /// (and to make its waiters ready), so not settled.
    finishing: bool,
    settled: bool,
    /// Was settled once: its inputs are known, so its path bounds what it can
    /// claim when it asks (a goal never settled may still find longer inputs).
    was_settled: bool,
    /// Announced in an `Estimates` event (with this value).
    announced: Option<Duration>,
}

impl Node {
    fn is_settled(&self) -> bool {
        self.holds[0]
            || self.holds[1]
            || self.queued[0]
            || self.queued[1]
            || self.waits_inputs
            || (self.started.is_some() && !self.finishing)
    }
}

/// One slot given to a waiting goal, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub goal: GoalId,
    pub kind: SlotKind,
    /// Its path when chosen.
    pub path: Duration,
    /// Its own estimate.
    pub estimate: Duration,
    /// Goals still waiting for a slot of this kind.
    pub still_waiting: usize,
}

fn ix(kind: SlotKind) -> usize {
    match kind {
        SlotKind::Build => 0,
        SlotKind::Substitution => 1,
    }
}

const KINDS: [SlotKind; 2] = [SlotKind::Build, SlotKind::Substitution];

/// The scheduler of one run.
pub struct Scheduler {
    estimator: Arc<dyn Estimator>,
    nodes: HashMap<GoalId, Node>,
    capacity: [u64; 2],
    in_use: [u64; 2],
    queue: [BTreeSet<GoalId>; 2],
    /// Live goals that are not settled, and how many of them never were.
    unsettled: usize,
    unsettled_ids: std::collections::HashSet<GoalId>,
    fresh: usize,
    /// When estimates were last computed (large graphs: at most every
    /// [`LARGE_GRAPH_ESTIMATE_INTERVAL`]).
    last_computed: Option<Instant>,
    /// Path per goal, where known. A path holds only while the paths of the
    /// goal's waiters do: a goal without one has none for anything it waits for.
    paths: HashMap<GoalId, Duration>,
    /// Goals whose path was forgotten (or never known): computed when next needed.
    stale: Vec<GoalId>,
    /// The known paths, longest last (ties: the lower id last).
    by_path: BTreeSet<(Duration, Reverse<GoalId>)>,
    /// The queued goals with a known path, per slot kind: in the order a grant
    /// chooses by (path, own estimate, lower id; the next one last), and by path
    /// alone ([`Scheduler::deferred_estimate`]).
    queue_by_grant: [BTreeSet<(Duration, Duration, Reverse<GoalId>)>; 2],
    queue_by_path: [BTreeSet<(Duration, Reverse<GoalId>)>; 2],
    /// Goals whose build or copy started (what passes with the clock).
    running: BTreeSet<GoalId>,
    /// The estimates of the live derivations not started: local work to do.
    pending_work: Duration,
    /// Goals that may be due in the next `Estimates::expected`.
    unannounced: BTreeSet<GoalId>,
    /// The graph was complete once (every goal settled).
    graph_known: bool,
    /// Something an estimate depends on changed since the last event.
    changed: bool,
    last_eta: Option<(Duration, Instant)>,
    /// The first grant, and the estimates of the derivations built since: how
    /// much of the slots' time the estimates account for (the rest is overhead
    /// between builds, or load), to scale the remaining work by.
    first_grant: Option<Instant>,
    done_work: Duration,
    last_critical: Vec<StorePath>,
    /// The forced mode: how hard grants are pushed until every live goal has
    /// settled once ([`Force`]).
    forced: Force,
    /// Per slot kind, in the forced mode: the path the reserved (last free) slot
    /// waits for a goal to beat.
    reserve: [Option<Duration>; 2],
}

/// How hard [`Scheduler::grant`] is pushed (the host's timers decide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Force {
    /// Only once the ready set is complete: every live goal settled, or none of
    /// the unsettled ones could claim more than the goal granted.
    No,
    /// The host waited as long as a wrong choice could cost (quiet, or the
    /// estimate of the build the slot would start): grant without waiting for the
    /// unsettled goals, longest path first — but while some goal was never
    /// settled (the graph is still being loaded), keep the last free slot of each
    /// kind with two or more slots for a goal whose path beats the first one
    /// started so. Until every live goal has settled once, later grants go on so
    /// (slots are filled as they free, the reserve kept).
    Limit,
    /// The host waited its longest ([`crate::worker::actor::GRANT_MAX_DELAY`]):
    /// every free slot, reserve included, until every live goal has settled once
    /// (a goal may stay unsettled for ever: another process holds its lock).
    All,
}

impl Scheduler {
    pub fn new(estimator: Arc<dyn Estimator>, build_slots: u64, subst_slots: u64) -> Scheduler {
        Scheduler {
            estimator,
            nodes: HashMap::new(),
            capacity: [build_slots, subst_slots],
            in_use: [0, 0],
            queue: Default::default(),
            unsettled: 0,
            unsettled_ids: Default::default(),
            fresh: 0,
            last_computed: None,
            paths: HashMap::new(),
            stale: Vec::new(),
            by_path: BTreeSet::new(),
            queue_by_grant: Default::default(),
            queue_by_path: Default::default(),
            running: BTreeSet::new(),
            pending_work: Duration::ZERO,
            unannounced: BTreeSet::new(),
            graph_known: false,
            changed: false,
            last_eta: None,
            last_critical: Vec::new(),
            first_grant: None,
            done_work: Duration::ZERO,
            forced: Force::No,
            reserve: [None; 2],
        }
    }

    /// Replaces the source of estimates (before goals are added).
    pub fn set_estimator(&mut self, estimator: Arc<dyn Estimator>) {
        self.estimator = estimator;
    }

    pub fn capacity(&self, kind: SlotKind) -> u64 {
        self.capacity[ix(kind)]
    }

    pub fn in_use(&self, kind: SlotKind) -> u64 {
        self.in_use[ix(kind)]
    }

    /// A new goal (unsettled until it asks for a slot, waits or runs).
    pub fn add_goal(&mut self, id: GoalId, kind: NodeKind) {
        let estimate = match &kind {
            NodeKind::Derivation(drv) => {
                self.estimator.build_time(drv).unwrap_or(DEFAULT_BUILD_TIME)
            }
            NodeKind::Substitution(_) | NodeKind::DrvOutput => SUBSTITUTION_OVERHEAD,
        };
        let node = Node {
            kind,
            estimate,
            waiters: BTreeSet::new(),
            waitees: BTreeSet::new(),
            holds: [false; 2],
            queued: [false; 2],
            waits_inputs: false,
            started: None,
            remote: false,
            finishing: false,
            settled: false,
            was_settled: false,
            announced: None,
        };
        if let Some(old) = self.nodes.get(&id) {
            // Replaced (ids are not reused by the Worker): what the old node
            // counted for goes.
            if old.started.is_none() && matches!(old.kind, NodeKind::Derivation(_)) {
                self.pending_work -= old.estimate;
            }
            self.running.remove(&id);
            self.invalidate(id);
        }
        if matches!(node.kind, NodeKind::Derivation(_)) {
            self.pending_work += node.estimate;
        }
        if self.nodes.insert(id, node).is_none() {
            self.unsettled += 1;
            self.fresh += 1;
            self.unsettled_ids.insert(id);
        }
        self.stale.push(id);
        self.changed = true;
    }

    /// `waiter` waits for `dep`.
    pub fn add_edge(&mut self, dep: GoalId, waiter: GoalId) {
        if dep == waiter || !self.nodes.contains_key(&waiter) {
            return;
        }
        let Some(d) = self.nodes.get_mut(&dep) else {
            return;
        };
        if d.waiters.insert(waiter) {
            let dep_estimate = d.estimate;
            if let Some(w) = self.nodes.get_mut(&waiter) {
                w.waitees.insert(dep);
            }
            // Only a longer path through the new waiter changes `dep`'s.
            let unchanged = match (self.paths.get(&dep), self.paths.get(&waiter)) {
                (Some(&pd), Some(&pw)) => dep_estimate + pw <= pd,
                _ => false,
            };
            if !unchanged {
                self.invalidate(dep);
            }
            self.changed = true;
        }
    }

    /// Whether the goal now waits for inputs (`false`: they are all done).
    pub fn set_waiting_for_inputs(&mut self, id: GoalId, waits: bool) {
        self.update(id, |n| n.waits_inputs = waits);
    }

    /// The goal's build or copy started; `remote`: a build on another machine
    /// (through the hook), which takes no local build slot.
    pub fn started(&mut self, id: GoalId, now: Instant, remote: bool) {
        if let Some(n) = self.nodes.get(&id) {
            if n.started.is_none() {
                if matches!(n.kind, NodeKind::Derivation(_)) {
                    self.pending_work -= n.estimate;
                }
                self.running.insert(id);
            }
        }
        self.update(id, |n| {
            n.started.get_or_insert(now);
            n.remote = remote;
            n.finishing = false;
        });
        self.changed = true;
    }

    /// A substitution's NAR size became known: its estimate follows.
    pub fn set_nar_size(&mut self, id: GoalId, nar_size: u64) {
        let est = SUBSTITUTION_OVERHEAD
            + Duration::from_secs_f64(nar_size as f64 / SUBSTITUTION_BYTES_PER_SEC as f64);
        let Some(n) = self.nodes.get(&id) else {
            return;
        };
        if n.estimate != est {
            // Forgotten first: the ordered paths of queued goals carry the old one.
            self.invalidate(id);
            let n = self.nodes.get_mut(&id).expect("live");
            if n.started.is_none() && matches!(n.kind, NodeKind::Derivation(_)) {
                self.pending_work = self.pending_work - n.estimate + est;
            }
            n.estimate = est;
            self.note_announcement(id);
            self.changed = true;
        }
    }

    /// The goal's own estimate (tests, reports).
    pub fn estimate(&self, id: GoalId) -> Option<Duration> {
        self.nodes.get(&id).map(|n| n.estimate)
    }

    /// The goal asks for a slot: it is queued until [`Scheduler::grant`].
    pub fn acquire(&mut self, id: GoalId, kind: SlotKind) {
        let k = ix(kind);
        if !self.nodes.contains_key(&id) || self.nodes[&id].holds[k] {
            return;
        }
        self.update(id, |n| n.queued[k] = true);
        self.enqueue(id, k);
        self.changed = true;
    }

    /// The goal gives its slot back (or stops waiting for one).
    pub fn release(&mut self, id: GoalId, kind: SlotKind) {
        let k = ix(kind);
        let mut freed = false;
        self.update(id, |n| {
            freed = n.holds[k];
            n.holds[k] = false;
            n.queued[k] = false;
            if freed && n.started.is_some() {
                n.finishing = true;
            }
        });
        if freed {
            self.in_use[k] -= 1;
        }
        self.dequeue(id, k);
    }

    /// The goal finished or was cancelled: its slots are free and it leaves the graph.
    pub fn remove(&mut self, id: GoalId) {
        if !self.nodes.contains_key(&id) {
            return;
        }
        // Its path goes with it (and out of the ordered paths while it is live).
        self.drop_path(id);
        let Some(n) = self.nodes.remove(&id) else {
            return;
        };
        if n.started.is_none() && matches!(n.kind, NodeKind::Derivation(_)) {
            self.pending_work -= n.estimate;
        }
        self.running.remove(&id);
        self.unannounced.remove(&id);
        if n.started.is_some() && !n.remote && matches!(n.kind, NodeKind::Derivation(_)) {
            self.done_work += n.estimate;
        }
        if !n.settled {
            self.unsettled -= 1;
            self.unsettled_ids.remove(&id);
            if !n.was_settled {
                self.fresh -= 1;
            }
        }
        for k in 0..2 {
            if n.holds[k] {
                self.in_use[k] -= 1;
            }
            if n.queued[k] {
                self.queue[k].remove(&id);
            }
        }
        for w in &n.waiters {
            if let Some(wn) = self.nodes.get_mut(w) {
                wn.waitees.remove(&id);
            }
        }
        // Paths run through waiters: only goals this one waited on change.
        for d in &n.waitees {
            if let Some(dn) = self.nodes.get_mut(d) {
                dn.waiters.remove(&id);
                self.invalidate(*d);
            }
        }
        self.changed = true;
    }

    fn update(&mut self, id: GoalId, f: impl FnOnce(&mut Node)) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        f(n);
        let due = Self::due_announcement(n);
        let now = n.is_settled();
        if now && !n.was_settled {
            n.was_settled = true;
            self.fresh -= 1;
        }
        if now != n.settled {
            n.settled = now;
            if now {
                self.unsettled -= 1;
                self.unsettled_ids.remove(&id);
            } else {
                self.unsettled += 1;
                self.unsettled_ids.insert(id);
            }
        }
        if due {
            self.unannounced.insert(id);
        }
    }

    /// Whether the node is a ready derivation whose estimate was not announced.
    fn due_announcement(n: &Node) -> bool {
        let ready = n.queued[0] || n.holds[0] || n.started.is_some();
        ready && matches!(n.kind, NodeKind::Derivation(_)) && n.announced != Some(n.estimate)
    }

    fn note_announcement(&mut self, id: GoalId) {
        if self.nodes.get(&id).is_some_and(Self::due_announcement) {
            self.unannounced.insert(id);
        }
    }

    /// The goal's path is known: it goes into the ordered paths.
    fn set_path(&mut self, g: GoalId, p: Duration) {
        let Some(n) = self.nodes.get(&g) else {
            return;
        };
        let estimate = n.estimate;
        self.paths.insert(g, p);
        self.by_path.insert((p, Reverse(g)));
        for k in 0..2 {
            if self.queue[k].contains(&g) {
                self.queue_by_grant[k].insert((p, estimate, Reverse(g)));
                self.queue_by_path[k].insert((p, Reverse(g)));
            }
        }
    }

    /// Forgets the goal's path (to be computed again); `false` if it had none.
    fn drop_path(&mut self, g: GoalId) -> bool {
        let Some(p) = self.paths.remove(&g) else {
            return false;
        };
        self.by_path.remove(&(p, Reverse(g)));
        if let Some(n) = self.nodes.get(&g) {
            for k in 0..2 {
                if self.queue[k].contains(&g) {
                    self.queue_by_grant[k].remove(&(p, n.estimate, Reverse(g)));
                    self.queue_by_path[k].remove(&(p, Reverse(g)));
                }
            }
        }
        self.stale.push(g);
        true
    }

    /// What the goal's path depends on changed: it and the paths of the goals it
    /// waits for (transitively) are forgotten. A goal without a path stops the
    /// walk: the goals it waits for have none either.
    fn invalidate(&mut self, g: GoalId) {
        let mut stack = vec![g];
        while let Some(g) = stack.pop() {
            if self.drop_path(g) {
                if let Some(n) = self.nodes.get(&g) {
                    stack.extend(n.waitees.iter().copied());
                }
            }
        }
    }

    fn enqueue(&mut self, id: GoalId, k: usize) {
        if self.queue[k].insert(id) {
            if let (Some(&p), Some(n)) = (self.paths.get(&id), self.nodes.get(&id)) {
                self.queue_by_grant[k].insert((p, n.estimate, Reverse(id)));
                self.queue_by_path[k].insert((p, Reverse(id)));
            }
        }
    }

    fn dequeue(&mut self, id: GoalId, k: usize) {
        if self.queue[k].remove(&id) {
            if let (Some(&p), Some(n)) = (self.paths.get(&id), self.nodes.get(&id)) {
                self.queue_by_grant[k].remove(&(p, n.estimate, Reverse(id)));
                self.queue_by_path[k].remove(&(p, Reverse(id)));
            }
        }
    }

    /// Whether a slot is free and goals wait for it (a grant is due).
    pub fn has_deferred(&self) -> bool {
        (0..2).any(|k| self.in_use[k] < self.capacity[k] && !self.queue[k].is_empty())
    }

    /// The own estimate of the goal a deferred grant would go to now (the shortest
    /// over the slot kinds with a free slot): waiting longer than that for the
    /// unsettled goals costs more than a wrong choice would.
    pub fn deferred_estimate(&mut self) -> Option<Duration> {
        self.compute_paths();
        (0..2)
            .filter(|&k| self.in_use[k] < self.capacity[k])
            .filter_map(|k| {
                // The longest path, ties by the lower id.
                self.queue_by_path[k]
                    .last()
                    .and_then(|(_, Reverse(g))| self.nodes.get(g))
                    .map(|n| n.estimate)
            })
            .min()
    }

    /// Whether every live goal is settled (the ready set is complete).
    pub fn is_settled(&self) -> bool {
        self.unsettled == 0
    }

    /// Gives free slots to waiting goals, longest path first, once every live goal
    /// is settled — or sooner, as `force` says (see [`Force`]). A forced grant
    /// while goals are still being loaded keeps a reserve; the forced mode then
    /// lasts (later calls grant as forced) until every live goal has settled once.
    pub fn grant(&mut self, force: Force) -> Vec<Grant> {
        if self.unsettled == 0 && !self.graph_known && !self.nodes.is_empty() {
            self.graph_known = true;
            self.changed = true;
        }
        // Every goal's inputs are known: the forced mode (and its reserve) ends.
        if self.fresh == 0 {
            self.forced = Force::No;
            self.reserve = [None; 2];
        }
        if self.fresh > 0 {
            self.forced = self.forced.max(force);
        }
        let force = self.forced.max(force);
        if !self.has_deferred() || (force == Force::No && self.fresh > 0) {
            return Vec::new();
        }
        self.compute_paths();
        // What the unsettled goals could claim, per slot kind: nothing is known of
        // one never settled (it may find inputs with longer paths: wait for it);
        // one settled before claims at most its path, or, registering, the path
        // of its waiters.
        let mut bound: [Option<Duration>; 2] = [Some(Duration::ZERO); 2];
        if force == Force::No && self.unsettled > 0 {
            for id in &self.unsettled_ids {
                let n = &self.nodes[id];
                let k = match n.kind {
                    NodeKind::Derivation(_) => 0,
                    _ => 1,
                };
                let claim = if !n.was_settled {
                    None
                } else if n.finishing {
                    Some(self.paths[id].saturating_sub(n.estimate))
                } else {
                    Some(self.paths[id])
                };
                bound[k] = match (bound[k], claim) {
                    (Some(b), Some(c)) => Some(b.max(c)),
                    _ => None,
                };
            }
        }
        let mut grants = Vec::new();
        for kind in KINDS {
            let k = ix(kind);
            while self.in_use[k] < self.capacity[k] && !self.queue[k].is_empty() {
                let Some(bound) = bound[k] else {
                    break;
                };
                // The longest path, then the longer own estimate, then the
                // lower id (every queued goal's path is known here).
                let Some(&(path, estimate, Reverse(best))) = self.queue_by_grant[k].last() else {
                    break;
                };
                // A tie waits: the unsettled goal may win it.
                if force == Force::No && path <= bound {
                    break;
                }
                if force == Force::Limit && self.fresh > 0 && self.capacity[k] >= 2 {
                    // The reserve: the last free slot waits for a goal whose path
                    // is longer than the first one started without the full graph.
                    let beat = *self.reserve[k].get_or_insert(path);
                    if self.in_use[k] + 1 == self.capacity[k] && path <= beat {
                        break;
                    }
                }
                self.dequeue(best, k);
                self.in_use[k] += 1;
                self.first_grant.get_or_insert_with(Instant::now);
                self.update(best, |n| {
                    n.queued[k] = false;
                    n.holds[k] = true;
                });
                grants.push(Grant {
                    goal: best,
                    kind,
                    path,
                    estimate,
                    still_waiting: self.queue[k].len(),
                });
            }
        }
        self.changed = true;
        grants
    }

    /// The path of every live goal (own estimate + the longest path of a waiter)
    /// that is not known, computed without recursion (chains may be long).
    fn compute_paths(&mut self) {
        while let Some(root) = self.stale.pop() {
            if self.paths.contains_key(&root) || !self.nodes.contains_key(&root) {
                continue;
            }
            let mut stack = vec![(root, false)];
            while let Some((g, expanded)) = stack.pop() {
                if self.paths.contains_key(&g) {
                    continue;
                }
                let n = &self.nodes[&g];
                if !expanded {
                    stack.push((g, true));
                    for w in &n.waiters {
                        if !self.paths.contains_key(w) && self.nodes.contains_key(w) {
                            stack.push((*w, false));
                        }
                    }
                    continue;
                }
                let p = n.estimate + self.longest_waiter_path(n);
                self.set_path(g, p);
            }
        }
    }

    /// The longest known path among the goals waiting on `n` (zero if none).
    fn longest_waiter_path(&self, n: &Node) -> Duration {
        n.waiters
            .iter()
            .filter_map(|w| self.paths.get(w))
            .max()
            .copied()
            .unwrap_or_default()
    }

    /// The goal's path (tests, reports).
    pub fn path(&mut self, id: GoalId) -> Option<Duration> {
        self.compute_paths();
        self.paths.get(&id).copied()
    }

    /// The remaining critical path (the longest remaining time of a goal plus the
    /// longest path waiting on it; ties by the lower id) and the local work left
    /// (paths known). A goal not started has its path left; only the started
    /// ones are walked.
    fn critical_and_work(&self, now: Instant) -> (Option<(Duration, GoalId)>, Duration) {
        let mut best: Option<(Duration, GoalId)> = self
            .by_path
            .iter()
            .rev()
            .find(|(_, Reverse(g))| self.nodes.get(g).is_some_and(|n| n.started.is_none()))
            .map(|&(p, Reverse(g))| (p, g));
        let mut work = self.pending_work;
        for id in &self.running {
            let Some(n) = self.nodes.get(id) else {
                continue;
            };
            let rem = Self::remaining(n, now);
            // A remote build's time passes on another machine.
            if matches!(n.kind, NodeKind::Derivation(_)) && !n.remote {
                work += rem;
            }
            let p = rem + self.longest_waiter_path(n);
            if best.is_none_or(|(bp, bid)| p > bp || (p == bp && *id < bid)) {
                best = Some((p, *id));
            }
        }
        (best, work)
    }

    fn remaining(n: &Node, now: Instant) -> Duration {
        match n.started {
            Some(t) => n.estimate.saturating_sub(now.saturating_duration_since(t)),
            None => n.estimate,
        }
    }

    /// What the run is expected to take from `now`, when something changed since
    /// the last call that returned `Some` (and the graph was complete once).
    pub fn estimates(&mut self, now: Instant) -> Option<Estimates> {
        if !self.changed || !self.graph_known {
            return None;
        }
        // Linear in the graph: large graphs are estimated at most so often.
        if self.nodes.len() > LARGE_GRAPH {
            if let Some(t) = self.last_computed {
                if now.saturating_duration_since(t) < LARGE_GRAPH_ESTIMATE_INTERVAL {
                    return None;
                }
            }
        }
        self.last_computed = Some(now);
        self.changed = false;
        self.compute_paths();
        let (best, work) = self.critical_and_work(now);
        let cp = best.map(|b| b.0).unwrap_or_default();
        let slots = self.capacity[0].max(1) as u32;
        // The share of the slots' time so far that the finished builds'
        // estimates account for (once a second has passed): the remaining work
        // takes that much longer (or shorter, if the history was slower).
        let efficiency = match self.first_grant {
            Some(t) if now.saturating_duration_since(t) >= Duration::from_secs(1) => {
                let busy = now.saturating_duration_since(t).as_secs_f64() * slots as f64;
                (self.done_work.as_secs_f64() / busy).clamp(0.25, 4.0)
            }
            _ => 1.0,
        };
        let eta = cp.max((work / slots).div_f64(efficiency));
        let mut critical = Vec::new();
        let mut at = best.map(|b| b.1);
        while let Some(g) = at {
            let n = &self.nodes[&g];
            if let NodeKind::Derivation(d) = &n.kind {
                critical.push(d.clone());
            }
            at = n
                .waiters
                .iter()
                .copied()
                .max_by(|a, b| self.paths[a].cmp(&self.paths[b]).then(b.cmp(a)));
        }
        // The ready derivations whose estimate was not announced, by id.
        let mut expected = Vec::new();
        for id in std::mem::take(&mut self.unannounced) {
            let Some(n) = self.nodes.get_mut(&id) else {
                continue;
            };
            if !Self::due_announcement(n) {
                continue;
            }
            if let NodeKind::Derivation(d) = &n.kind {
                n.announced = Some(n.estimate);
                expected.push((d.clone(), n.estimate));
            }
        }
        let moved = match self.last_eta {
            None => true,
            Some((prev, at)) => {
                let projected = prev.saturating_sub(now.saturating_duration_since(at));
                let diff = projected.abs_diff(eta);
                diff >= ETA_RESOLUTION || (eta.is_zero() != prev.is_zero())
            }
        };
        if !moved && expected.is_empty() && critical == self.last_critical {
            return None;
        }
        self.last_eta = Some((eta, now));
        self.last_critical = critical.clone();
        Some(Estimates {
            eta: Some(eta),
            expected,
            critical_path: critical,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}.drv", "0".repeat(32))).unwrap()
    }

    fn fixed(v: &[(&str, u64)]) -> Arc<dyn Estimator> {
        Arc::new(FixedEstimates(
            v.iter()
                .map(|(n, s)| (n.to_string(), Duration::from_secs(*s)))
                .collect(),
        ))
    }

    fn goals(g: &[Grant]) -> Vec<GoalId> {
        g.iter().map(|g| g.goal).collect()
    }

    #[test]
    fn a_forced_grant_keeps_the_last_slot_for_a_longer_path_found_while_loading() {
        let ms = |n: &str, v: u64| (n.to_string(), Duration::from_millis(v));
        let est =
            FixedEstimates([ms("i", 300), ms("c0", 1000), ms("c1", 1000), ms("c2", 1000)].into());
        let mut s = Scheduler::new(Arc::new(est), 2, 1);
        // The chain's end is requested first and loads slowly; four independent
        // 0.3 s builds load at once and ask; one more is still loading.
        s.add_goal(1, NodeKind::Derivation(sp("c2")));
        for id in 2..=6 {
            s.add_goal(id, NodeKind::Derivation(sp("i")));
        }
        for id in 2..=5 {
            s.acquire(id, SlotKind::Build);
        }
        assert!(s.grant(Force::No).is_empty(), "goals 1 and 6 never settled");
        // The host's limit passed: one slot goes, the last is kept.
        assert_eq!(goals(&s.grant(Force::Limit)), [2]);
        assert_eq!(s.in_use(SlotKind::Build), 1);
        // Until every goal has settled once, a freed slot goes at once (no
        // further limit), the reserve still kept.
        s.started(2, Instant::now(), false);
        s.release(2, SlotKind::Build);
        s.remove(2);
        assert_eq!(goals(&s.grant(Force::No)), [3]);
        assert!(s.grant(Force::No).is_empty());
        // c2 loaded: it waits for c1, which loads; then c1 for c0.
        s.add_goal(7, NodeKind::Derivation(sp("c1")));
        s.add_edge(7, 1);
        s.set_waiting_for_inputs(1, true);
        assert!(s.grant(Force::No).is_empty());
        s.add_goal(8, NodeKind::Derivation(sp("c0")));
        s.add_edge(8, 7);
        s.set_waiting_for_inputs(7, true);
        // The independent build still loading asks: 0.3 s does not beat the
        // 0.3 s started without the full graph.
        s.acquire(6, SlotKind::Build);
        assert!(s.grant(Force::No).is_empty());
        // c0 asks while another goal still loads: its path of 3 s beats 0.3 s
        // and takes the kept slot.
        s.add_goal(9, NodeKind::Derivation(sp("i")));
        s.acquire(8, SlotKind::Build);
        let g = s.grant(Force::No);
        assert_eq!(goals(&g), [8]);
        assert_eq!(g[0].path, Duration::from_secs(3));
        assert_eq!(g[0].still_waiting, 3);
        // Every goal settles once: ordinary grants again. c0 registering may make
        // c1 (2 s) ready, so the freed slot waits for it, then goes to it.
        s.acquire(9, SlotKind::Build);
        s.started(8, Instant::now(), false);
        s.release(8, SlotKind::Build);
        assert!(s.grant(Force::No).is_empty());
        s.started(3, Instant::now(), false);
        s.release(3, SlotKind::Build);
        s.remove(3);
        assert!(s.grant(Force::No).is_empty(), "c1 (2 s) beats every 0.3 s");
        s.remove(8);
        s.set_waiting_for_inputs(7, false);
        s.acquire(7, SlotKind::Build);
        assert_eq!(goals(&s.grant(Force::No)), [7, 4]);
    }

    #[test]
    fn the_reserve_needs_two_slots_and_goes_after_the_longest_wait() {
        let ms = |n: &str, v: u64| (n.to_string(), Duration::from_millis(v));
        let est: Arc<dyn Estimator> = Arc::new(FixedEstimates([ms("i", 300)].into()));
        // One slot: nothing to keep it for, the forced grant gives it.
        let mut s = Scheduler::new(est.clone(), 1, 1);
        s.add_goal(1, NodeKind::Derivation(sp("loading")));
        s.add_goal(2, NodeKind::Derivation(sp("i")));
        s.acquire(2, SlotKind::Build);
        assert_eq!(goals(&s.grant(Force::Limit)), [2]);
        // Two slots, a goal that never settles (another process holds its lock):
        // the reserve goes only after the host's longest wait, and the mode stays.
        let mut s = Scheduler::new(est, 2, 1);
        s.add_goal(1, NodeKind::Derivation(sp("locked")));
        for id in 2..=5 {
            s.add_goal(id, NodeKind::Derivation(sp("i")));
            s.acquire(id, SlotKind::Build);
        }
        assert_eq!(goals(&s.grant(Force::Limit)), [2]);
        assert!(s.grant(Force::Limit).is_empty());
        assert_eq!(goals(&s.grant(Force::All)), [3]);
        s.release(3, SlotKind::Build);
        s.remove(3);
        assert_eq!(goals(&s.grant(Force::No)), [4]);
    }

    #[test]
    fn the_longest_path_gets_the_slot_once_everything_is_settled() {
        let mut s = Scheduler::new(fixed(&[("a", 1), ("b", 5), ("c", 1), ("top", 1)]), 1, 1);
        for (id, n) in [(1, "top"), (2, "a"), (3, "b"), (4, "c")] {
            s.add_goal(id, NodeKind::Derivation(sp(n)));
        }
        // top waits for a and c; b is alone but long; c has top above it.
        s.add_edge(2, 1);
        s.add_edge(4, 1);
        s.set_waiting_for_inputs(1, true);
        s.acquire(2, SlotKind::Build);
        s.acquire(3, SlotKind::Build);
        // c still loading: nothing granted yet.
        assert!(s.grant(Force::No).is_empty());
        assert!(s.has_deferred());
        s.acquire(4, SlotKind::Build);
        let g = s.grant(Force::No);
        assert_eq!(g.len(), 1);
        assert_eq!(
            (g[0].goal, g[0].path, g[0].still_waiting),
            (3, Duration::from_secs(5), 2)
        );
        s.release(3, SlotKind::Build);
        s.remove(3);
        // a and c tie on path (2 s) and estimate: the lower id.
        assert_eq!(s.grant(Force::No)[0].goal, 2);
        s.remove(2);
        assert_eq!(s.grant(Force::No)[0].goal, 4);
    }

    #[test]
    fn a_goal_whose_inputs_are_known_only_holds_back_shorter_paths() {
        let mut s = Scheduler::new(fixed(&[("w", 2), ("long", 3), ("short", 1)]), 1, 1);
        s.add_goal(1, NodeKind::Derivation(sp("w")));
        s.add_goal(2, NodeKind::Derivation(sp("long")));
        s.add_goal(3, NodeKind::Derivation(sp("short")));
        // w waited for inputs (now done: unsettled again, path 2 s).
        s.set_waiting_for_inputs(1, true);
        s.set_waiting_for_inputs(1, false);
        s.acquire(3, SlotKind::Build);
        assert!(
            s.grant(Force::No).is_empty(),
            "short (1 s) waits for w (2 s)"
        );
        s.acquire(2, SlotKind::Build);
        let g = s.grant(Force::No);
        assert_eq!(g.iter().map(|g| g.goal).collect::<Vec<_>>(), [2]);
        // A goal never settled may still find long inputs: everything waits.
        s.release(2, SlotKind::Build);
        s.add_goal(4, NodeKind::Derivation(sp("new")));
        s.acquire(1, SlotKind::Build);
        assert!(s.grant(Force::No).is_empty());
    }

    #[test]
    fn force_grants_with_unsettled_goals_and_estimates_fall_back() {
        let mut s = Scheduler::new(Arc::new(NoHistory), 2, 1);
        s.add_goal(1, NodeKind::Derivation(sp("x")));
        s.add_goal(2, NodeKind::Derivation(sp("y")));
        s.add_goal(3, NodeKind::Substitution(sp("z")));
        assert_eq!(s.estimate(1), Some(DEFAULT_BUILD_TIME));
        assert_eq!(s.estimate(3), Some(SUBSTITUTION_OVERHEAD));
        s.set_nar_size(3, 100_000_000);
        assert_eq!(
            s.estimate(3),
            Some(SUBSTITUTION_OVERHEAD + Duration::from_secs(2))
        );
        s.acquire(1, SlotKind::Build);
        assert!(s.grant(Force::No).is_empty());
        assert_eq!(s.grant(Force::All).len(), 1);
        assert_eq!(s.in_use(SlotKind::Build), 1);
        // A goal that holds a slot and asks again gets nothing more.
        s.acquire(1, SlotKind::Build);
        assert!(!s.has_deferred());
    }

    #[test]
    fn eta_is_the_larger_of_the_critical_path_and_work_over_slots() {
        // chain c1 <- c2 <- c3 (1 s each) beside four independent 2 s builds, 2 slots.
        let mut s = Scheduler::new(fixed(&[("c1", 1), ("c2", 1), ("c3", 1), ("i", 2)]), 2, 1);
        s.add_goal(1, NodeKind::Derivation(sp("c3")));
        s.add_goal(2, NodeKind::Derivation(sp("c2")));
        s.add_goal(3, NodeKind::Derivation(sp("c1")));
        s.add_edge(2, 1);
        s.add_edge(3, 2);
        s.set_waiting_for_inputs(1, true);
        s.set_waiting_for_inputs(2, true);
        let t0 = Instant::now();
        assert_eq!(s.estimates(t0), None, "graph not known yet");
        for id in 10..14 {
            s.add_goal(id, NodeKind::Derivation(sp("i")));
            s.acquire(id, SlotKind::Build);
        }
        s.acquire(3, SlotKind::Build);
        let g = s.grant(Force::No);
        // Paths: c1 3 s; each i 2 s, ties by estimate then id: 10.
        assert_eq!(g.iter().map(|g| g.goal).collect::<Vec<_>>(), [3, 10]);
        let e = s.estimates(t0).unwrap();
        // Work 3 + 8 = 11 s over 2 slots = 5.5 s > critical path 3 s.
        assert_eq!(e.eta, Some(Duration::from_millis(5500)));
        assert_eq!(e.critical_path, [sp("c1"), sp("c2"), sp("c3")]);
        assert_eq!(
            e.expected,
            [3, 10, 11, 12, 13]
                .iter()
                .map(|&i| (
                    sp(if i == 3 { "c1" } else { "i" }),
                    Duration::from_secs(if i == 3 { 1 } else { 2 })
                ))
                .collect::<Vec<_>>()
        );
        s.started(3, t0, false);
        s.started(10, t0, false);
        // Half a second later nothing new is announced (the ETA moved as time did).
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(s.estimates(t1), None);
        s.release(3, SlotKind::Build);
        s.remove(3);
        let e = s.estimates(t0 + Duration::from_secs(1)).unwrap();
        // Work left: c2 1 + c3 1 + i(running) 1 + 3 × 2 = 9 s / 2.
        assert_eq!(e.eta, Some(Duration::from_millis(4500)));
        assert!(e.expected.is_empty());
    }

    /// The paths by a walk of the whole graph (how they were computed before
    /// the scheduler kept them incrementally).
    fn full_paths(s: &Scheduler) -> HashMap<GoalId, Duration> {
        let mut paths: HashMap<GoalId, Duration> = HashMap::new();
        for &root in s.nodes.keys() {
            let mut stack = vec![(root, false)];
            while let Some((g, expanded)) = stack.pop() {
                if paths.contains_key(&g) {
                    continue;
                }
                let n = &s.nodes[&g];
                if !expanded {
                    stack.push((g, true));
                    stack.extend(n.waiters.iter().map(|w| (*w, false)));
                    continue;
                }
                let above = n.waiters.iter().map(|w| paths[w]).max();
                paths.insert(g, n.estimate + above.unwrap_or_default());
            }
        }
        paths
    }

    /// Every incremental value against what a walk of the whole graph finds.
    fn check(s: &mut Scheduler, now: Instant) {
        s.compute_paths();
        let full = full_paths(s);
        assert_eq!(s.paths, full);
        let by_path: BTreeSet<_> = full.iter().map(|(&g, &p)| (p, Reverse(g))).collect();
        assert_eq!(s.by_path, by_path);
        for k in 0..2 {
            let by_grant: BTreeSet<_> = s.queue[k]
                .iter()
                .map(|g| (full[g], s.nodes[g].estimate, Reverse(*g)))
                .collect();
            assert_eq!(s.queue_by_grant[k], by_grant);
            let by_path: BTreeSet<_> = s.queue[k].iter().map(|g| (full[g], Reverse(*g))).collect();
            assert_eq!(s.queue_by_path[k], by_path);
            // The goals the whole-queue scans chose.
            let grant = s.queue[k].iter().copied().max_by(|a, b| {
                let (ea, eb) = (s.nodes[a].estimate, s.nodes[b].estimate);
                full[a].cmp(&full[b]).then(ea.cmp(&eb)).then(b.cmp(a))
            });
            assert_eq!(s.queue_by_grant[k].last().map(|e| e.2 .0), grant);
            let deferred = s.queue[k]
                .iter()
                .copied()
                .max_by(|a, b| full[a].cmp(&full[b]).then(b.cmp(a)));
            assert_eq!(s.queue_by_path[k].last().map(|e| e.1 .0), deferred);
        }
        // The critical path and the work, as the loop over every goal found them.
        let mut best: Option<(Duration, GoalId)> = None;
        let mut work = Duration::ZERO;
        for (&id, n) in &s.nodes {
            let rem = Scheduler::remaining(n, now);
            if matches!(n.kind, NodeKind::Derivation(_)) && !n.remote {
                work += rem;
            }
            let above = n.waiters.iter().map(|w| full[w]).max();
            let p = rem + above.unwrap_or_default();
            if best.is_none_or(|(bp, bid)| p > bp || (p == bp && id < bid)) {
                best = Some((p, id));
            }
        }
        assert_eq!(s.critical_and_work(now), (best, work));
        let running: BTreeSet<_> = s
            .nodes
            .iter()
            .filter(|(_, n)| n.started.is_some())
            .map(|(g, _)| *g)
            .collect();
        assert_eq!(s.running, running);
        // What the loop over every goal would announce is noted.
        for (id, n) in &s.nodes {
            if Scheduler::due_announcement(n) {
                assert!(s.unannounced.contains(id), "goal {id} is due");
            }
        }
    }

    /// splitmix64, so each case depends only on its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n.max(1)
        }
    }

    #[test]
    fn incremental_paths_and_estimates_equal_a_walk_of_the_whole_graph() {
        let names: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
        for seed in 0..80 {
            let mut r = Rng(seed);
            // Few distinct estimates, so paths tie often.
            let est: Vec<(&str, u64)> =
                names.iter().map(|n| (n.as_str(), 1 + r.below(4))).collect();
            let mut s = Scheduler::new(fixed(&est), 1 + r.below(3), 1 + r.below(2));
            let t0 = Instant::now();
            let mut live: Vec<GoalId> = Vec::new();
            let mut next: GoalId = 1;
            let mut granted = 0;
            for step in 0..300u64 {
                let now = t0 + Duration::from_millis(step * 170);
                let pick = |r: &mut Rng, live: &[GoalId]| live[r.below(live.len() as u64) as usize];
                let op = if live.is_empty() { 0 } else { r.below(13) };
                match op {
                    0..=2 => {
                        let id = next;
                        next += 1;
                        let kind = match r.below(5) {
                            0 => NodeKind::Substitution(sp("s")),
                            1 => NodeKind::DrvOutput,
                            _ => NodeKind::Derivation(sp(&names[r.below(7) as usize % 6])),
                        };
                        s.add_goal(id, kind);
                        // Usually an input of a live goal (deps are newer: no cycles).
                        if !live.is_empty() && r.below(4) > 0 {
                            let w = pick(&mut r, &live);
                            s.add_edge(id, w);
                            s.set_waiting_for_inputs(w, true);
                        }
                        live.push(id);
                    }
                    3 | 4 => {
                        let (a, b) = (pick(&mut r, &live), pick(&mut r, &live));
                        s.add_edge(a.max(b), a.min(b));
                    }
                    5 => s.set_waiting_for_inputs(pick(&mut r, &live), r.below(2) == 0),
                    6 | 7 => {
                        let kind = KINDS[r.below(2) as usize];
                        s.acquire(pick(&mut r, &live), kind);
                    }
                    8 => s.release(pick(&mut r, &live), KINDS[r.below(2) as usize]),
                    9 => s.started(pick(&mut r, &live), now, r.below(4) == 0),
                    10 => s.set_nar_size(pick(&mut r, &live), r.below(4) * 40_000_000),
                    11 => {
                        let i = r.below(live.len() as u64) as usize;
                        s.remove(live.swap_remove(i));
                    }
                    _ => {
                        let force = [Force::No, Force::Limit, Force::All][r.below(3) as usize];
                        granted += s.grant(force).len();
                    }
                }
                if step % 3 == 0 {
                    let _ = s.estimates(now);
                }
                check(&mut s, now);
            }
            assert!(granted > 0 || seed > 0, "the cases grant slots");
        }
    }

    #[test]
    fn a_finished_goal_makes_only_the_goals_it_waited_for_computed_again() {
        // 1,000 independent goals, and a chain top <- mid <- leaf.
        let mut s = Scheduler::new(Arc::new(NoHistory), 2, 1);
        for id in 1..=1000 {
            s.add_goal(id, NodeKind::Derivation(sp("x")));
        }
        for (id, n) in [(1001, "top"), (1002, "mid"), (1003, "leaf")] {
            s.add_goal(id, NodeKind::Derivation(sp(n)));
        }
        s.add_edge(1002, 1001);
        s.add_edge(1003, 1002);
        assert_eq!(s.path(1003), Some(DEFAULT_BUILD_TIME * 3));
        assert!(s.stale.is_empty());
        // The top goal goes: mid and leaf lose a waiter, nothing else changes.
        s.remove(1001);
        let mut stale = s.stale.clone();
        stale.sort();
        stale.dedup();
        assert_eq!(stale, [1001, 1002, 1003]);
        assert_eq!(s.path(1003), Some(DEFAULT_BUILD_TIME * 2));
        // A goal with no waiters going forgets nothing else.
        s.remove(500);
        assert_eq!(s.stale, [500]);
        // An edge that does not lengthen the dep's path forgets nothing.
        s.compute_paths();
        s.add_edge(1003, 7);
        assert!(s.stale.is_empty());
        assert_eq!(s.path(1003), Some(DEFAULT_BUILD_TIME * 2));
        check(&mut s, Instant::now());
    }
}
