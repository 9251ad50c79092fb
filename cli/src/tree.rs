//! The live build tree `drover realise` draws on a terminal (the default there;
//! `--plain` and non-terminals get Nix's plain lines instead).
//!
//! [`Tree`] is the state, fed with the Worker's [`ProgressEvent`]s by
//! [`Tree::apply`]: per derivation that runs or waits, what it does since when —
//! building (locally or on a machine), copying (with the live byte counts of its
//! [`Transfer`]), or waiting and why ([`WaitReason`]) — plus the counters and the
//! scheduler's [`Estimates`] (expected times, the ETA) when they come.
//! [`render`] is a pure function of that state, a clock reading and the terminal's
//! width and height: the lines to draw. Goals waiting for inputs are drawn as
//! parents of those inputs (the dependency tree of what is left), the totals line
//! last. Lines never exceed the width: names are cut (with `…`), the layout is
//! kept. The I/O around it (clearing the lines drawn before, the redraw rate,
//! builder output above the tree) is [`crate::display::Display`]'s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover::store_path::StorePath;
use drover_actors::progress::{Counters, Estimates, ProgressEvent, Transfer, WaitReason};

use crate::display::{status_line, InFlight};

/// What one running or waiting goal does.
#[derive(Debug, Clone)]
pub enum NodeState {
    /// Building, locally (`machine: None`) or on a remote machine.
    Building { machine: Option<String> },
    /// Copying from a substituter.
    Copying { transfer: Arc<Transfer> },
    /// Waiting.
    Waiting(WaitReason),
}

/// A goal the tree shows, and since when it is in its state.
#[derive(Debug, Clone)]
pub struct Node {
    pub state: NodeState,
    pub since: Instant,
}

/// The state of the live tree.
#[derive(Debug)]
pub struct Tree {
    started: Instant,
    counters: Counters,
    nodes: BTreeMap<StorePath, Node>,
    /// Expected wall times from the scheduler's estimates.
    expected: HashMap<StorePath, Duration>,
    /// The last ETA and when it came.
    eta: Option<(Duration, Instant)>,
    /// NAR sizes of the paths being copied, when their substituter said.
    nar_sizes: HashMap<StorePath, u64>,
}

impl Tree {
    pub fn new(started: Instant) -> Tree {
        Tree {
            started,
            counters: Counters::default(),
            nodes: BTreeMap::new(),
            expected: HashMap::new(),
            eta: None,
            nar_sizes: HashMap::new(),
        }
    }

    /// Takes in an event that happened at `now`.
    pub fn apply(&mut self, event: &ProgressEvent, now: Instant) {
        let set = |nodes: &mut BTreeMap<StorePath, Node>, path: &StorePath, state| {
            nodes.insert(path.clone(), Node { state, since: now });
        };
        match event {
            ProgressEvent::Counters(c) => self.counters = *c,
            ProgressEvent::BuildStarted {
                drv_path, machine, ..
            } => set(
                &mut self.nodes,
                drv_path,
                NodeState::Building {
                    machine: machine.clone(),
                },
            ),
            ProgressEvent::SubstitutionStarted { path, transfer, .. } => set(
                &mut self.nodes,
                path,
                NodeState::Copying {
                    transfer: transfer.clone(),
                },
            ),
            ProgressEvent::Waiting { path, reason } => {
                // A build that goes on waiting keeps its start time when the reason
                // does not change (a lock polled again, a machine asked again).
                let same = self
                    .nodes
                    .get(path)
                    .is_some_and(|n| matches!(&n.state, NodeState::Waiting(r) if r == reason));
                if !same {
                    set(&mut self.nodes, path, NodeState::Waiting(reason.clone()));
                }
            }
            ProgressEvent::BuildFinished { drv_path: path, .. }
            | ProgressEvent::SubstitutionFinished { path, .. }
            | ProgressEvent::SubstitutionCancelled { path } => {
                self.nodes.remove(path);
                self.nar_sizes.remove(path);
            }
            ProgressEvent::SubstitutionSizes { path, nar_size, .. } => {
                self.nar_sizes.insert(path.clone(), *nar_size);
            }
            ProgressEvent::Estimates(e) => self.estimates(e, now),
            ProgressEvent::Message(_)
            | ProgressEvent::GoalStarted { .. }
            | ProgressEvent::GoalFinished { .. }
            | ProgressEvent::Scheduled { .. } => {}
        }
    }

    fn estimates(&mut self, e: &Estimates, now: Instant) {
        self.expected
            .extend(e.expected.iter().map(|(p, d)| (p.clone(), *d)));
        if let Some(eta) = e.eta {
            self.eta = Some((eta, now));
        }
    }

    /// Bytes of the copies in flight.
    fn in_flight(&self) -> InFlight {
        self.nodes
            .values()
            .fold(InFlight::default(), |acc, n| match &n.state {
                NodeState::Copying { transfer } => InFlight {
                    downloaded: acc.downloaded + transfer.downloaded(),
                    unpacked: acc.unpacked + transfer.unpacked(),
                },
                _ => acc,
            })
    }
}

/// A goal's name as the tree shows it: the derivation name without `.drv`.
fn short_name(p: &StorePath) -> &str {
    p.name().trim_end_matches(".drv")
}

/// `7s`, `2m05s`, `1h02m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s / 60) % 60)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Sort order of the shown goals: building, copying, waiting.
fn rank(s: &NodeState) -> u8 {
    match s {
        NodeState::Building { .. } => 0,
        NodeState::Copying { .. } => 1,
        NodeState::Waiting(_) => 2,
    }
}

/// The parts of one line: `left` (tree branches) and `state` are kept, `name` is
/// cut first, then `detail`.
struct Line {
    left: String,
    state: String,
    name: String,
    detail: String,
}

/// Cuts `s` to at most `n` characters, marking a cut with `…`.
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    if n == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(n - 1).collect();
    out.push('…');
    out
}

/// Deeper goals are drawn at this depth's indentation.
const MAX_DEPTH: usize = 6;

/// Names are cut to no fewer than this many characters before the detail goes.
const MIN_NAME: usize = 12;

impl Line {
    /// The line in at most `width` characters.
    fn fit(&self, width: usize) -> String {
        let len = |s: &str| s.chars().count();
        let fixed = len(&self.left) + len(&self.state) + 1;
        let (mut name, mut detail) = (self.name.clone(), self.detail.clone());
        let sep = if detail.is_empty() { 0 } else { 1 };
        let mut over = (fixed + len(&name) + sep + len(&detail)).saturating_sub(width);
        if over > 0 {
            // The name down to MIN_NAME, then the detail, then the name again.
            let spare = len(&name).saturating_sub(MIN_NAME).min(over);
            name = cut(&name, len(&name) - spare);
            over -= spare;
            let spare = len(&detail).min(over);
            detail = cut(&detail, len(&detail) - spare);
            over -= spare;
            name = cut(&name, len(&name).saturating_sub(over));
        }
        let mut s = format!("{}{} {}", self.left, self.state, name);
        if !detail.is_empty() {
            s.push(' ');
            s.push_str(&detail);
        }
        s.chars().take(width).collect()
    }
}

/// What a waiting goal waits for, in words (inputs: those still shown or running).
fn wait_words(r: &WaitReason, shown: &BTreeMap<StorePath, Node>) -> String {
    match r {
        WaitReason::Inputs(inputs) => {
            let mut left: Vec<&str> = inputs
                .iter()
                .filter(|i| shown.contains_key(*i))
                .map(short_name)
                .collect();
            left.sort_unstable();
            if left.is_empty() {
                "for inputs".into()
            } else {
                format!("for {}", left.join(", "))
            }
        }
        WaitReason::BuildSlot => "for a build slot".into(),
        WaitReason::SubstitutionSlot => "for a substitution slot".into(),
        WaitReason::Lock { pid: Some(pid), .. } => format!("for a lock held by pid {pid}"),
        WaitReason::Lock { pid: None, .. } => "for a lock held by another process".into(),
        WaitReason::Machine => "for a machine".into(),
    }
}

/// The lines of the tree at `now` for a terminal of `width` columns and `height`
/// rows: one per shown goal (at most `height - 2` of them, then `… and N more`),
/// then the totals. Every line has fewer than `width` characters (the last
/// column is left free, so that no terminal wraps).
pub fn render(tree: &Tree, now: Instant, width: usize, height: usize) -> Vec<String> {
    let width = width.saturating_sub(1).max(1);
    let since = |t: Instant| now.saturating_duration_since(t);
    // Children: the inputs a waiting goal waits for that are shown themselves.
    let children = |p: &StorePath| -> Vec<&StorePath> {
        match tree.nodes.get(p).map(|n| &n.state) {
            Some(NodeState::Waiting(WaitReason::Inputs(i))) => {
                let mut c: Vec<&StorePath> =
                    i.iter().filter(|i| tree.nodes.contains_key(*i)).collect();
                c.sort_by_key(|c| (rank(&tree.nodes[*c].state), short_name(c)));
                c
            }
            _ => Vec::new(),
        }
    };
    let is_child: BTreeSet<&StorePath> = tree.nodes.keys().flat_map(children).collect();
    let mut roots: Vec<&StorePath> = tree
        .nodes
        .keys()
        .filter(|p| !is_child.contains(p))
        .collect();
    roots.sort_by_key(|p| (rank(&tree.nodes[*p].state), short_name(p)));

    // Depth first, each goal once (under its first parent).
    let mut lines: Vec<(u8, Line)> = Vec::new();
    let mut seen: BTreeSet<&StorePath> = BTreeSet::new();
    // (path, indentation of the parents, last child of its parent, depth)
    let mut stack: Vec<(&StorePath, String, bool, usize)> = roots
        .iter()
        .rev()
        .map(|p| (*p, String::new(), true, 0))
        .collect();
    while let Some((p, indent, last, depth)) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        let n = &tree.nodes[p];
        let left = if depth == 0 {
            String::new()
        } else {
            format!("{indent}{}", if last { "└─ " } else { "├─ " })
        };
        let elapsed = duration(since(n.since));
        let (state, detail) = match &n.state {
            NodeState::Building { machine } => {
                let timing = match tree.expected.get(p) {
                    Some(e) => format!("{elapsed}/~{}", duration(*e)),
                    None => elapsed,
                };
                let on = match machine {
                    Some(m) => format!("on {m}"),
                    None => "locally".into(),
                };
                (format!("building {timing}"), on)
            }
            NodeState::Copying { transfer } => (
                format!("copying {elapsed}"),
                match tree.nar_sizes.get(p).filter(|s| **s > 0) {
                    Some(total) => format!("{}/{} MiB", mib(transfer.unpacked()), mib(*total)),
                    None => format!("{} MiB", mib(transfer.unpacked())),
                },
            ),
            NodeState::Waiting(r) => (format!("waiting {elapsed}"), wait_words(r, &tree.nodes)),
        };
        lines.push((
            rank(&n.state),
            Line {
                left,
                state: format!("{state:<16}"),
                name: short_name(p).to_owned(),
                detail,
            },
        ));
        let kids = children(p);
        let child_indent = if depth == 0 {
            String::new()
        } else if depth >= MAX_DEPTH {
            // Deep chains stop moving right: names stay readable.
            indent.clone()
        } else {
            format!("{indent}{}", if last { "   " } else { "│  " })
        };
        for (i, c) in kids.iter().enumerate().rev() {
            stack.push((c, child_indent.clone(), i + 1 == kids.len(), depth + 1));
        }
    }

    let room = height.saturating_sub(2).max(1);
    let mut out: Vec<String> = Vec::new();
    if lines.len() > room {
        // No room for the tree: a flat list, running goals first.
        lines.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
        let hidden = lines.len() - (room - 1);
        out.extend(lines[..room - 1].iter_mut().map(|(_, l)| {
            l.left.clear();
            l.fit(width)
        }));
        out.push(cut(&format!("… and {hidden} more"), width));
    } else {
        out.extend(lines.iter().map(|(_, l)| l.fit(width)));
    }
    let mut totals = status_line(
        &tree.counters,
        tree.in_flight(),
        since(tree.started).as_secs(),
        None,
    );
    if let Some((eta, at)) = tree.eta {
        totals.push_str(&format!(" ETA {}", duration(eta.saturating_sub(since(at)))));
    }
    out.push(cut(&totals, width));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover::store_path::StoreDir;

    fn path(name: &str) -> StorePath {
        let sd = StoreDir::new("/nix/store").unwrap();
        sd.parse(&format!("/nix/store/{}-{name}", "a".repeat(32)))
            .unwrap()
    }

    fn drv(name: &str) -> StorePath {
        path(&format!("{name}.drv"))
    }

    fn started(t: &mut Tree, p: &StorePath, machine: Option<&str>, at: Instant) {
        t.apply(
            &ProgressEvent::BuildStarted {
                drv_path: p.clone(),
                machine: machine.map(String::from),
                verb: "building",
                round: None,
            },
            at,
        );
    }

    fn waiting(t: &mut Tree, p: &StorePath, reason: WaitReason, at: Instant) {
        t.apply(
            &ProgressEvent::Waiting {
                path: p.clone(),
                reason,
            },
            at,
        );
    }

    const S: Duration = Duration::from_secs(1);

    /// A run: `top` waits for `a` (building) and `b` (waiting for a slot), `c`
    /// builds on a machine, `d` waits for a lock, `e` copies.
    fn scene() -> (Tree, Instant) {
        let t0 = Instant::now();
        let mut t = Tree::new(t0);
        let (top, a, b, c, d) = (drv("top"), drv("a"), drv("b"), drv("c"), drv("dd"));
        waiting(
            &mut t,
            &top,
            WaitReason::Inputs(vec![a.clone(), b.clone()]),
            t0,
        );
        waiting(&mut t, &a, WaitReason::BuildSlot, t0);
        started(&mut t, &a, None, t0 + S);
        waiting(&mut t, &b, WaitReason::BuildSlot, t0 + S);
        started(&mut t, &c, Some("ssh://m1"), t0 + 2 * S);
        waiting(
            &mut t,
            &d,
            WaitReason::Lock {
                path: "/nix/store/x.lock".into(),
                pid: Some(4242),
            },
            t0 + 2 * S,
        );
        let tr = Arc::new(Transfer::default());
        tr.add_unpacked(3 * 1024 * 1024 / 2);
        t.apply(
            &ProgressEvent::SubstitutionSizes {
                path: path("eee"),
                nar_size: 2 * 1024 * 1024,
                download_size: 1024 * 1024,
            },
            t0 + 3 * S,
        );
        t.apply(
            &ProgressEvent::SubstitutionStarted {
                path: path("eee"),
                uri: "file:///c".into(),
                transfer: tr,
            },
            t0 + 3 * S,
        );
        t.apply(
            &ProgressEvent::Counters(Counters {
                expected_builds: 5,
                running_builds: 2,
                done_builds: 1,
                expected_substitutions: 1,
                running_substitutions: 1,
                expected_nar_size: 2 * 1024 * 1024,
                ..Default::default()
            }),
            t0 + 3 * S,
        );
        (t, t0)
    }

    #[test]
    fn running_and_waiting_goals_with_their_reasons_and_the_totals() {
        let (t, t0) = scene();
        let lines = render(&t, t0 + 5 * S, 100, 40);
        assert_eq!(
            lines,
            [
                "building 3s      c on ssh://m1",
                "copying 2s       eee 1.5/2.0 MiB",
                "waiting 3s       dd for a lock held by pid 4242",
                "waiting 5s       top for a, b",
                "├─ building 4s      a locally",
                "└─ waiting 4s       b for a build slot",
                "[1/6 built, 2 running, 0/1 copied (1.5/2.0 MiB), 5s]",
            ]
        );
    }

    #[test]
    fn estimates_add_expected_times_and_the_eta_counts_down() {
        let (mut t, t0) = scene();
        t.apply(
            &ProgressEvent::Estimates(Arc::new(Estimates {
                eta: Some(20 * S),
                expected: vec![(drv("a"), 90 * S)],
                critical_path: vec![drv("a"), drv("top")],
            })),
            t0 + 4 * S,
        );
        let lines = render(&t, t0 + 6 * S, 100, 40);
        assert_eq!(lines[4], "├─ building 5s/~1m30s a locally");
        assert!(lines[6].ends_with(", 6s] ETA 18s"), "{lines:?}");
        // Past the ETA: zero, not negative.
        let lines = render(&t, t0 + 60 * S, 100, 40);
        assert!(lines[6].ends_with("ETA 0s"), "{lines:?}");
    }

    #[test]
    fn finished_goals_leave_and_their_waiters_become_roots() {
        let (mut t, t0) = scene();
        for p in [drv("a"), drv("b")] {
            t.apply(
                &ProgressEvent::BuildFinished {
                    drv_path: p,
                    status: drover::build_result::BuildStatus::Built,
                },
                t0 + 4 * S,
            );
        }
        t.apply(
            &ProgressEvent::SubstitutionFinished {
                path: path("eee"),
                status: drover::build_result::BuildStatus::Substituted,
            },
            t0 + 4 * S,
        );
        let lines = render(&t, t0 + 5 * S, 100, 40);
        assert_eq!(lines[2], "waiting 5s       top for inputs");
        assert_eq!(lines.len(), 4, "{lines:?}");
        // The same reason again keeps the time; a new one restarts it.
        waiting(
            &mut t,
            &drv("dd"),
            WaitReason::Lock {
                path: "/nix/store/x.lock".into(),
                pid: Some(4242),
            },
            t0 + 5 * S,
        );
        assert!(render(&t, t0 + 5 * S, 100, 40)[1].starts_with("waiting 3s       dd"));
        waiting(&mut t, &drv("dd"), WaitReason::Machine, t0 + 5 * S);
        assert_eq!(
            render(&t, t0 + 6 * S, 100, 40)[1],
            "waiting 1s       dd for a machine"
        );
    }

    #[test]
    fn narrow_terminals_cut_names_and_details_not_the_layout() {
        let t0 = Instant::now();
        let mut t = Tree::new(t0);
        let long = drv("a-very-long-derivation-name-that-goes-on-1.2.3");
        started(&mut t, &long, Some("ssh://builder.example.org"), t0);
        for width in [20, 30, 40, 50, 60, 200] {
            for l in render(&t, t0 + S, width, 10) {
                assert!(l.chars().count() < width, "{width}: {l:?}");
            }
        }
        let lines = render(&t, t0 + S, 40, 10);
        // The state and time stay; names are cut to 12 before the detail is cut.
        assert_eq!(lines[0], "building 1s      a-very-long… on ssh:/…");
        let lines = render(&t, t0 + S, 60, 10);
        assert_eq!(
            lines[0],
            "building 1s      a-very-long-… on ssh://builder.example.org"
        );
    }

    #[test]
    fn short_terminals_show_how_many_more() {
        let t0 = Instant::now();
        let mut t = Tree::new(t0);
        for i in 0..10 {
            waiting(&mut t, &drv(&format!("w{i:02}")), WaitReason::BuildSlot, t0);
        }
        let lines = render(&t, t0, 80, 6);
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[3], "… and 7 more");
        assert!(lines[4].starts_with("[0/0 built"));
    }

    #[test]
    fn without_room_for_the_tree_running_goals_come_first() {
        let t0 = Instant::now();
        let mut t = Tree::new(t0);
        let mut prev: Option<StorePath> = None;
        for i in 0..30 {
            let d = drv(&format!("c{i:02}"));
            if let Some(p) = prev {
                waiting(&mut t, &p, WaitReason::Inputs(vec![d.clone()]), t0);
            }
            prev = Some(d);
        }
        started(&mut t, &drv("c29"), None, t0);
        // A deep chain, drawn in full: the indentation stops growing.
        let lines = render(&t, t0, 200, 40);
        assert_eq!(lines.len(), 31);
        assert!(
            lines[29].contains("building 0s      c29 locally"),
            "{lines:?}"
        );
        assert_eq!(lines[29].find("└─"), lines[10].find("└─"));
        // Too short for it: running first, flat.
        let lines = render(&t, t0, 80, 6);
        assert_eq!(lines[0], "building 0s      c29 locally");
        assert_eq!(lines[1], "waiting 0s       c00 for c01");
        assert_eq!(lines[3], "… and 27 more");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(59 * S), "59s");
        assert_eq!(duration(125 * S), "2m05s");
        assert_eq!(duration(3720 * S), "1h02m");
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
        assert_eq!(cut("abc", 0), "");
    }
}
