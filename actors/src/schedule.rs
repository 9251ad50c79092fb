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
    /// Path per goal, valid while `paths_valid`.
    paths: HashMap<GoalId, Duration>,
    paths_valid: bool,
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
            paths_valid: false,
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
        if self.nodes.insert(id, node).is_none() {
            self.unsettled += 1;
            self.fresh += 1;
            self.unsettled_ids.insert(id);
        }
        self.paths_valid = false;
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
            if let Some(w) = self.nodes.get_mut(&waiter) {
                w.waitees.insert(dep);
            }
            self.paths_valid = false;
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
        if let Some(n) = self.nodes.get_mut(&id) {
            if n.estimate != est {
                n.estimate = est;
                self.paths_valid = false;
                self.changed = true;
            }
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
        self.queue[k].insert(id);
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
        self.queue[k].remove(&id);
    }

    /// The goal finished or was cancelled: its slots are free and it leaves the graph.
    pub fn remove(&mut self, id: GoalId) {
        let Some(n) = self.nodes.remove(&id) else {
            return;
        };
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
                self.paths_valid = false;
            }
        }
        self.paths.remove(&id);
        self.changed = true;
    }

    fn update(&mut self, id: GoalId, f: impl FnOnce(&mut Node)) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        f(n);
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
                self.queue[k]
                    .iter()
                    .max_by(|a, b| self.paths[*a].cmp(&self.paths[*b]).then(b.cmp(a)))
                    .map(|g| self.nodes[g].estimate)
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
                let best = self.queue[k]
                    .iter()
                    .copied()
                    .max_by(|a, b| {
                        let (pa, pb) = (self.paths[a], self.paths[b]);
                        let (ea, eb) = (self.nodes[a].estimate, self.nodes[b].estimate);
                        pa.cmp(&pb).then(ea.cmp(&eb)).then(b.cmp(a))
                    })
                    .expect("queue is not empty");
                let path = self.paths[&best];
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
                self.queue[k].remove(&best);
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
                    estimate: self.nodes[&best].estimate,
                    still_waiting: self.queue[k].len(),
                });
            }
        }
        self.changed = true;
        grants
    }

    /// The path of every live goal (own estimate + the longest path of a waiter),
    /// computed without recursion (chains may be long).
    fn compute_paths(&mut self) {
        if self.paths_valid {
            return;
        }
        self.paths.clear();
        let ids: Vec<GoalId> = self.nodes.keys().copied().collect();
        for root in ids {
            if self.paths.contains_key(&root) {
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
                let above = n
                    .waiters
                    .iter()
                    .filter_map(|w| self.paths.get(w))
                    .max()
                    .copied()
                    .unwrap_or_default();
                self.paths.insert(g, n.estimate + above);
            }
        }
        self.paths_valid = true;
    }

    /// The goal's path (tests, reports).
    pub fn path(&mut self, id: GoalId) -> Option<Duration> {
        self.compute_paths();
        self.paths.get(&id).copied()
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
        // The remaining critical path: the longest remaining time of a goal plus
        // the longest path waiting on it.
        let mut best: Option<(Duration, GoalId)> = None;
        let mut work = Duration::ZERO;
        for (&id, n) in &self.nodes {
            let rem = Self::remaining(n, now);
            // A remote build's time passes on another machine.
            if matches!(n.kind, NodeKind::Derivation(_)) && !n.remote {
                work += rem;
            }
            let above = n
                .waiters
                .iter()
                .filter_map(|w| self.paths.get(w))
                .max()
                .copied()
                .unwrap_or_default();
            let p = rem + above;
            if best.is_none_or(|(bp, bid)| p > bp || (p == bp && id < bid)) {
                best = Some((p, id));
            }
        }
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
        let mut expected = Vec::new();
        let mut ids: Vec<GoalId> = self.nodes.keys().copied().collect();
        ids.sort();
        for id in ids {
            let n = self.nodes.get_mut(&id).expect("live");
            let ready = n.queued[0] || n.holds[0] || n.started.is_some();
            if let (true, NodeKind::Derivation(d)) = (ready, &n.kind) {
                if n.announced != Some(n.estimate) {
                    n.announced = Some(n.estimate);
                    expected.push((d.clone(), n.estimate));
                }
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
}
