//! The post-build report: what happened in a run of `drover realise`.
//!
//! A [`Recorder`] takes the run's [`ProgressEvent`]s with the time they came
//! (each build's start and stop and where it ran, each copy, each wait and its
//! [`WaitReason`], the scheduler's [`Estimates`]) and makes a [`RunReport`]:
//! the critical path actually taken (from the last goal to finish back through
//! the input each step waited for longest), the slowest builds, predicted vs
//! actual time, substitutions and cache hits, time spent waiting by reason, what
//! ran where. `drover realise --report` prints it after the run; every run that
//! builds or copies saves it as JSON in `$NIX_STATE_DIR/drover/last-run.json`,
//! which `drover report` prints (`--json`: the JSON itself).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover::build_result::BuildStatus;
use drover::store_path::{StoreDir, StorePath};
use drover_actors::progress::{ProgressEvent, Transfer, WaitReason};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::tree::duration;

/// The report file in drover's state directory.
pub const LAST_RUN: &str = "drover/last-run.json";

/// A report that cannot be saved or read.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("writing the run report '{path}': {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no run report in '{path}' (drover realise writes one after each run): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the run report '{path}' is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One build of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub drv: String,
    pub name: String,
    /// `None`: built locally.
    pub machine: Option<String>,
    /// Seconds since the run started.
    pub start: f64,
    pub stop: Option<f64>,
    /// Nix's `BuildResult` status (`Built`, `PermanentFailure`, …).
    pub status: Option<String>,
    /// The scheduler's expected wall time, when it gave one.
    pub expected: Option<f64>,
}

impl BuildRecord {
    pub fn secs(&self) -> Option<f64> {
        self.stop.map(|s| s - self.start)
    }
}

/// One copy from a substituter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubstitutionRecord {
    pub path: String,
    pub uri: String,
    pub start: f64,
    pub stop: Option<f64>,
    pub nar_bytes: u64,
    pub download_bytes: u64,
    pub status: Option<String>,
}

/// One wait of a goal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitRecord {
    pub path: String,
    /// `inputs`, `build-slot`, `substitution-slot`, `lock` or `machine`.
    pub reason: String,
    /// The inputs waited for; the lock file and its holder.
    pub detail: Option<String>,
    pub start: f64,
    pub stop: f64,
}

/// One step of the critical path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub path: String,
    pub name: String,
    /// `build` or `substitution`.
    pub kind: String,
    pub start: f64,
    pub stop: f64,
    /// Seconds it waited between its inputs' end (or the run's start) and its own.
    pub waited: f64,
    /// What it waited for in that time (`build-slot`, `lock`, …).
    #[serde(default)]
    pub waited_for: Vec<String>,
    /// How it ended (`Built`, `Substituted`, `PermanentFailure`, …).
    #[serde(default)]
    pub status: Option<String>,
}

/// What happened in a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Wall time of the run, seconds.
    pub wall: f64,
    pub builds: Vec<BuildRecord>,
    pub substitutions: Vec<SubstitutionRecord>,
    pub waits: Vec<WaitRecord>,
    /// Derivations whose outputs were there already or were substituted.
    pub cache_hits: Vec<(String, String)>,
    /// The run's length predicted at the first ETA: `(when, predicted total)`.
    pub predicted: Option<(f64, f64)>,
    /// The scheduler's last critical path (drv paths).
    pub predicted_critical_path: Vec<String>,
    pub critical_path: Vec<Step>,
}

/// A goal's wait that has not ended yet.
struct OpenWait {
    reason: WaitReason,
    since: Instant,
}

/// Collects a run's events into a [`RunReport`].
pub struct Recorder {
    store_dir: StoreDir,
    started: Instant,
    builds: BTreeMap<StorePath, BuildRecord>,
    substitutions: BTreeMap<StorePath, (SubstitutionRecord, Arc<Transfer>)>,
    waits: Vec<WaitRecord>,
    open: BTreeMap<StorePath, OpenWait>,
    /// What each goal waited for (from its `Inputs` waits).
    inputs: HashMap<StorePath, Vec<StorePath>>,
    expected: HashMap<StorePath, Duration>,
    cache_hits: Vec<(String, String)>,
    predicted: Option<(f64, f64)>,
    predicted_path: Vec<StorePath>,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn reason_key(r: &WaitReason) -> &'static str {
    match r {
        WaitReason::Inputs(_) => "inputs",
        WaitReason::BuildSlot => "build-slot",
        WaitReason::SubstitutionSlot => "substitution-slot",
        WaitReason::Lock { .. } => "lock",
        WaitReason::Machine => "machine",
    }
}

impl Recorder {
    pub fn new(store_dir: StoreDir, started: Instant) -> Recorder {
        Recorder {
            store_dir,
            started,
            builds: BTreeMap::new(),
            substitutions: BTreeMap::new(),
            waits: Vec::new(),
            open: BTreeMap::new(),
            inputs: HashMap::new(),
            expected: HashMap::new(),
            cache_hits: Vec::new(),
            predicted: None,
            predicted_path: Vec::new(),
        }
    }

    fn at(&self, t: Instant) -> f64 {
        secs(t.saturating_duration_since(self.started))
    }

    /// Ends the open wait of `path`, if any.
    fn end_wait(&mut self, path: &StorePath, now: Instant) {
        if let Some(w) = self.open.remove(path) {
            let detail = match &w.reason {
                WaitReason::Inputs(i) => Some(
                    i.iter()
                        .map(|p| self.store_dir.print(p))
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                WaitReason::Lock { path, pid } => Some(match pid {
                    Some(pid) => format!("{} held by pid {pid}", path.display()),
                    None => path.display().to_string(),
                }),
                _ => None,
            };
            self.waits.push(WaitRecord {
                path: self.store_dir.print(path),
                reason: reason_key(&w.reason).into(),
                detail,
                start: self.at(w.since),
                stop: self.at(now),
            });
        }
    }

    /// Takes in an event that came at `now`.
    pub fn event(&mut self, event: &ProgressEvent, now: Instant) {
        match event {
            ProgressEvent::Waiting { path, reason } => {
                if self.open.get(path).is_some_and(|w| &w.reason == reason) {
                    return;
                }
                self.end_wait(path, now);
                if let WaitReason::Inputs(i) = reason {
                    self.inputs
                        .entry(path.clone())
                        .or_default()
                        .extend(i.iter().cloned());
                }
                self.open.insert(
                    path.clone(),
                    OpenWait {
                        reason: reason.clone(),
                        since: now,
                    },
                );
            }
            ProgressEvent::BuildStarted {
                drv_path, machine, ..
            } => {
                self.end_wait(drv_path, now);
                let start = self.at(now);
                let expected = self.expected.get(drv_path).map(|d| secs(*d));
                // A repeated build keeps its first start.
                self.builds
                    .entry(drv_path.clone())
                    .or_insert_with(|| BuildRecord {
                        drv: self.store_dir.print(drv_path),
                        name: drv_path.name().trim_end_matches(".drv").into(),
                        machine: machine.clone(),
                        start,
                        stop: None,
                        status: None,
                        expected,
                    });
            }
            ProgressEvent::BuildFinished { drv_path, status } => {
                self.end_wait(drv_path, now);
                let stop = self.at(now);
                match self.builds.get_mut(drv_path) {
                    Some(b) => {
                        b.stop = Some(stop);
                        b.status = Some(format!("{status:?}"));
                    }
                    None if matches!(
                        status,
                        BuildStatus::AlreadyValid | BuildStatus::Substituted
                    ) =>
                    {
                        self.cache_hits
                            .push((self.store_dir.print(drv_path), format!("{status:?}")))
                    }
                    None => {}
                }
            }
            ProgressEvent::SubstitutionStarted {
                path,
                uri,
                transfer,
            } => {
                self.end_wait(path, now);
                let rec = SubstitutionRecord {
                    path: self.store_dir.print(path),
                    uri: uri.clone(),
                    start: self.at(now),
                    stop: None,
                    nar_bytes: 0,
                    download_bytes: 0,
                    status: None,
                };
                self.substitutions
                    .insert(path.clone(), (rec, transfer.clone()));
            }
            ProgressEvent::SubstitutionFinished { path, status } => {
                self.end_wait(path, now);
                let stop = self.at(now);
                if let Some((r, t)) = self.substitutions.get_mut(path) {
                    r.stop = Some(stop);
                    r.status = Some(format!("{status:?}"));
                    r.nar_bytes = t.unpacked();
                    r.download_bytes = t.downloaded();
                }
            }
            ProgressEvent::SubstitutionCancelled { path } => {
                self.end_wait(path, now);
                self.substitutions.remove(path);
            }
            ProgressEvent::Estimates(e) => {
                self.expected
                    .extend(e.expected.iter().map(|(p, d)| (p.clone(), *d)));
                if let (None, Some(eta)) = (self.predicted, e.eta) {
                    let at = self.at(now);
                    self.predicted = Some((at, secs(Duration::from_secs_f64(at) + eta)));
                }
                if !e.critical_path.is_empty() {
                    self.predicted_path = e.critical_path.clone();
                }
                // Builds that started before their estimate came.
                for (p, d) in &e.expected {
                    if let Some(b) = self.builds.get_mut(p) {
                        b.expected.get_or_insert(secs(*d));
                    }
                }
            }
            ProgressEvent::Counters(_)
            | ProgressEvent::SubstitutionSizes { .. }
            | ProgressEvent::Message(_)
            | ProgressEvent::GoalStarted { .. }
            | ProgressEvent::GoalFinished { .. }
            | ProgressEvent::Scheduled { .. } => {}
        }
    }

    /// The report of the run, which ended at `now`.
    pub fn finish(mut self, now: Instant) -> RunReport {
        let open: Vec<StorePath> = self.open.keys().cloned().collect();
        for p in open {
            self.end_wait(&p, now);
        }
        let critical_path = self.critical_path();
        let mut builds: Vec<BuildRecord> = self.builds.into_values().collect();
        builds.sort_by(|a, b| a.start.total_cmp(&b.start).then(a.drv.cmp(&b.drv)));
        let mut substitutions: Vec<SubstitutionRecord> =
            self.substitutions.into_values().map(|(r, _)| r).collect();
        substitutions.sort_by(|a, b| a.start.total_cmp(&b.start).then(a.path.cmp(&b.path)));
        self.waits
            .sort_by(|a, b| a.start.total_cmp(&b.start).then(a.path.cmp(&b.path)));
        RunReport {
            wall: secs(now.saturating_duration_since(self.started)),
            builds,
            substitutions,
            waits: self.waits,
            cache_hits: self.cache_hits,
            predicted: self.predicted,
            predicted_critical_path: self
                .predicted_path
                .iter()
                .map(|p| self.store_dir.print(p))
                .collect(),
            critical_path,
        }
    }

    /// The start and stop of a goal's own work (build or copy), if it finished.
    fn span(&self, p: &StorePath) -> Option<(f64, f64, &'static str)> {
        if let Some(b) = self.builds.get(p) {
            return Some((b.start, b.stop?, "build"));
        }
        let (s, _) = self.substitutions.get(p)?;
        Some((s.start, s.stop?, "substitution"))
    }

    /// The chain that ended last: from the goal that finished last, back through
    /// the input (among those it waited for) that finished last.
    fn critical_path(&self) -> Vec<Step> {
        let ends = self
            .builds
            .keys()
            .chain(self.substitutions.keys())
            .filter_map(|p| Some((p, self.span(p)?)));
        let Some((mut cur, _)) = ends.max_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(b.0.cmp(a.0)))
        else {
            return Vec::new();
        };
        let mut steps = Vec::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            if !seen.insert(cur) {
                break;
            }
            let Some((start, stop, kind)) = self.span(cur) else {
                break;
            };
            let prev = self
                .inputs
                .get(cur)
                .into_iter()
                .flatten()
                .filter_map(|i| Some((i, self.span(i)?)))
                .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(b.0.cmp(a.0)));
            let ready = prev.map(|(_, (_, s, _))| s).unwrap_or(0.0);
            let printed = self.store_dir.print(cur);
            let mut waited_for: Vec<String> = self
                .waits
                .iter()
                .filter(|w| w.path == printed && w.reason != "inputs")
                .filter(|w| w.stop > ready && w.start < start)
                .map(|w| w.reason.clone())
                .collect();
            waited_for.dedup();
            let status = match kind {
                "build" => self.builds.get(cur).and_then(|b| b.status.clone()),
                _ => self
                    .substitutions
                    .get(cur)
                    .and_then(|(r, _)| r.status.clone()),
            };
            steps.push(Step {
                waited_for,
                status,
                path: self.store_dir.print(cur),
                name: cur.name().trim_end_matches(".drv").into(),
                kind: kind.into(),
                start,
                stop,
                waited: ((start - ready).max(0.0) * 1000.0).round() / 1000.0,
            });
            match prev {
                Some((p, _)) => cur = p,
                None => break,
            }
        }
        steps.reverse();
        steps
    }
}

fn s(x: f64) -> String {
    if x < 60.0 {
        format!("{x:.1}s")
    } else {
        duration(Duration::from_secs_f64(x))
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// How many of the slowest builds the report lists.
const SLOWEST: usize = 5;

impl RunReport {
    /// The report as text, one line per entry.
    pub fn render(&self) -> Vec<String> {
        let mut out = Vec::new();
        let failed = self
            .builds
            .iter()
            .filter(|b| b.status.as_deref().is_some_and(|s| !is_success(s)))
            .count();
        out.push(format!(
            "run: {} wall, {} built, {} failed, {} copied, {} cache hits",
            s(self.wall),
            self.builds.len() - failed,
            failed,
            self.substitutions.len(),
            self.cache_hits.len() + self.substitutions.len()
        ));
        if !self.critical_path.is_empty() {
            let first = self.critical_path.first().map_or(0.0, |st| st.start);
            let last = self.critical_path.last().map_or(0.0, |st| st.stop);
            out.push(format!(
                "critical path ({} steps, {} from the first start to the last stop):",
                self.critical_path.len(),
                s(last - first)
            ));
            for st in &self.critical_path {
                let wait = if st.waited >= 0.05 {
                    let why: Vec<&str> = st.waited_for.iter().map(|r| reason_words(r)).collect();
                    match why.is_empty() {
                        true => format!(", after {} waiting", s(st.waited)),
                        false => format!(", after {} waiting for {}", s(st.waited), why.join(", ")),
                    }
                } else {
                    String::new()
                };
                let verb = match (st.kind.as_str(), st.status.as_deref()) {
                    (_, Some(status)) if !is_success(status) => "failed",
                    ("build", _) => "built",
                    _ => "copied",
                };
                out.push(format!(
                    "  {} {} in {} ({}..{}{wait})",
                    st.name,
                    verb,
                    s(st.stop - st.start),
                    s(st.start),
                    s(st.stop)
                ));
            }
        }
        let mut slowest: Vec<&BuildRecord> =
            self.builds.iter().filter(|b| b.stop.is_some()).collect();
        slowest.sort_by(|a, b| {
            b.secs()
                .unwrap_or(0.0)
                .total_cmp(&a.secs().unwrap_or(0.0))
                .then(a.drv.cmp(&b.drv))
        });
        if !slowest.is_empty() {
            out.push("slowest builds:".into());
            for b in slowest.iter().take(SLOWEST) {
                let expected = b
                    .expected
                    .map(|e| format!(", expected {}", s(e)))
                    .unwrap_or_default();
                let status = match b.status.as_deref() {
                    Some(st) if !is_success(st) => format!(", {st}"),
                    _ => String::new(),
                };
                out.push(format!(
                    "  {} {} on {}{expected}{status}",
                    b.name,
                    s(b.secs().unwrap_or(0.0)),
                    b.machine.as_deref().unwrap_or("this machine")
                ));
            }
        }
        match self.predicted {
            Some((at, total)) => {
                let err = if total > 0.0 {
                    format!(" ({:+.0}%)", (self.wall - total) / total * 100.0)
                } else {
                    String::new()
                };
                out.push(format!(
                    "predicted vs actual: {} predicted at {}, {} actual{err}",
                    s(total),
                    s(at),
                    s(self.wall)
                ));
            }
            None => out.push("predicted vs actual: no estimates in this run".into()),
        }
        if !self.substitutions.is_empty() || !self.cache_hits.is_empty() {
            let mut by_uri: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
            for sub in &self.substitutions {
                let e = by_uri.entry(&sub.uri).or_default();
                e.0 += 1;
                e.1 += sub.nar_bytes;
            }
            for (uri, (n, bytes)) in by_uri {
                out.push(format!("copied {n} paths ({}) from '{uri}'", mib(bytes)));
            }
            let valid = self
                .cache_hits
                .iter()
                .filter(|(_, st)| st == "AlreadyValid")
                .count();
            let substituted = self.cache_hits.len() - valid;
            if !self.cache_hits.is_empty() {
                out.push(format!(
                    "cache hits: {valid} derivations already valid, {substituted} substituted"
                ));
            }
        }
        let mut waited: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        for w in &self.waits {
            let e = waited.entry(&w.reason).or_default();
            e.0 += w.stop - w.start;
            e.1 += 1;
        }
        if !waited.is_empty() {
            let parts: Vec<String> = waited
                .iter()
                .map(|(r, (t, n))| format!("{} for {} ({n} waits)", s(*t), reason_words(r)))
                .collect();
            out.push(format!("waiting: {}", parts.join(", ")));
            for w in self.waits.iter().filter(|w| w.reason == "lock") {
                out.push(format!(
                    "  {} waited {} for the lock {}",
                    w.path,
                    s(w.stop - w.start),
                    w.detail.as_deref().unwrap_or("")
                ));
            }
        }
        let mut where_: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
        for b in &self.builds {
            let e = where_
                .entry(b.machine.as_deref().unwrap_or("this machine"))
                .or_default();
            e.0 += 1;
            e.1 += b.secs().unwrap_or(0.0);
        }
        if !where_.is_empty() {
            let parts: Vec<String> = where_
                .iter()
                .map(|(m, (n, t))| format!("{m}: {n} builds, {}", s(*t)))
                .collect();
            out.push(format!("where: {}", parts.join("; ")));
        }
        out
    }

    /// Saves the report as `$NIX_STATE_DIR/drover/last-run.json` (written to a
    /// temporary file and renamed, so a reader never sees half a report).
    pub fn save(&self, state_dir: &Path) -> Result<(), ReportError> {
        let path = state_dir.join(LAST_RUN);
        let err = |source| ReportError::Write {
            path: path.clone(),
            source,
        };
        let dir = path.parent().unwrap_or(state_dir);
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(format!(".last-run.json.{}", std::process::id()));
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        json.push(b'\n');
        let written = std::fs::write(&tmp, &json).and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(err)
    }

    /// The last run's report.
    pub fn load(state_dir: &Path) -> Result<RunReport, ReportError> {
        let path = state_dir.join(LAST_RUN);
        let text = std::fs::read(&path).map_err(|source| ReportError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| ReportError::Parse { path, source })
    }
}

fn is_success(status: &str) -> bool {
    matches!(
        status,
        "Built" | "Substituted" | "AlreadyValid" | "ResolvesToAlreadyValid"
    )
}

fn reason_words(key: &str) -> &str {
    match key {
        "inputs" => "inputs",
        "build-slot" => "a build slot",
        "substitution-slot" => "a substitution slot",
        "lock" => "locks",
        "machine" => "a machine",
        other => other,
    }
}

/// `drover report [--json]`.
#[derive(clap::Args)]
pub struct Args {
    /// Print the report as JSON (the saved file).
    #[arg(long)]
    json: bool,
}

pub fn run(ctx: &crate::Context, args: Args) -> anyhow::Result<std::process::ExitCode> {
    let report = RunReport::load(ctx.settings.state_dir())?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        for l in report.render() {
            writeln!(out, "{l}")?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_actors::progress::Estimates;

    const S: Duration = Duration::from_secs(1);

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn p(name: &str) -> StorePath {
        sd().parse(&format!("/nix/store/{}-{name}", "a".repeat(32)))
            .unwrap()
    }

    fn full(name: &str) -> String {
        format!("/nix/store/{}-{name}", "a".repeat(32))
    }

    /// `top` waits for `a` and `b` (one slot: `b` waits for it), `src` is copied
    /// first for `a`; `c` runs on a machine; `cached` was valid already.
    fn run() -> RunReport {
        let t0 = Instant::now();
        let mut r = Recorder::new(sd(), t0);
        let (top, a, b, c, src) = (p("top.drv"), p("a.drv"), p("b.drv"), p("c.drv"), p("src"));
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let ev = |r: &mut Recorder, e: ProgressEvent, t: f64| r.event(&e, at(t));
        let wait = |path: &StorePath, reason| ProgressEvent::Waiting {
            path: path.clone(),
            reason,
        };
        let start = |drv: &StorePath, machine: Option<&str>| ProgressEvent::BuildStarted {
            drv_path: drv.clone(),
            machine: machine.map(String::from),
            verb: "building",
            round: None,
        };
        let done = |drv: &StorePath, status| ProgressEvent::BuildFinished {
            drv_path: drv.clone(),
            status,
        };
        ev(
            &mut r,
            wait(
                &top,
                WaitReason::Inputs(vec![a.clone(), b.clone(), c.clone()]),
            ),
            0.0,
        );
        ev(&mut r, wait(&a, WaitReason::Inputs(vec![src.clone()])), 0.0);
        ev(
            &mut r,
            ProgressEvent::Estimates(Arc::new(Estimates {
                eta: Some(7 * S),
                expected: vec![(a.clone(), 2 * S), (top.clone(), S)],
                critical_path: vec![a.clone(), top.clone()],
            })),
            0.5,
        );
        let t = Arc::new(Transfer::default());
        t.add_unpacked(2 * 1024 * 1024);
        t.add_downloaded(1024 * 1024);
        ev(
            &mut r,
            ProgressEvent::SubstitutionStarted {
                path: src.clone(),
                uri: "file:///cache".into(),
                transfer: t,
            },
            0.5,
        );
        ev(&mut r, start(&b, None), 0.5);
        ev(&mut r, start(&c, Some("ssh://m1")), 0.5);
        ev(
            &mut r,
            ProgressEvent::SubstitutionFinished {
                path: src.clone(),
                status: BuildStatus::Substituted,
            },
            1.0,
        );
        ev(&mut r, wait(&a, WaitReason::BuildSlot), 1.0);
        ev(&mut r, done(&b, BuildStatus::Built), 3.0);
        ev(&mut r, start(&a, None), 3.0);
        ev(&mut r, done(&c, BuildStatus::Built), 4.0);
        ev(&mut r, done(&a, BuildStatus::Built), 6.0);
        ev(
            &mut r,
            wait(
                &top,
                WaitReason::Lock {
                    path: "/nix/store/x.lock".into(),
                    pid: Some(77),
                },
            ),
            6.0,
        );
        ev(&mut r, start(&top, None), 7.0);
        ev(&mut r, done(&top, BuildStatus::Built), 8.0);
        ev(
            &mut r,
            done(&p("cached.drv"), BuildStatus::AlreadyValid),
            8.0,
        );
        r.finish(at(8.5))
    }

    #[test]
    fn the_critical_path_is_the_chain_that_ended_last() {
        let r = run();
        let steps: Vec<(&str, f64, f64, f64)> = r
            .critical_path
            .iter()
            .map(|s| (s.name.as_str(), s.start, s.stop, s.waited))
            .collect();
        // top waited for a (the last of its inputs), a for src; a waited 2s for
        // the slot after src arrived, top 1s for the lock.
        assert_eq!(
            steps,
            [
                ("src", 0.5, 1.0, 0.5),
                ("a", 3.0, 6.0, 2.0),
                ("top", 7.0, 8.0, 1.0)
            ]
        );
        assert_eq!(r.critical_path[1].kind, "build");
        assert_eq!(r.critical_path[0].kind, "substitution");
    }

    #[test]
    fn waits_are_recorded_with_their_reasons_and_end_at_the_next_event() {
        let r = run();
        let waits: Vec<(&str, &str, f64, f64)> = r
            .waits
            .iter()
            .map(|w| {
                (
                    w.path.rsplit('-').next().unwrap(),
                    w.reason.as_str(),
                    w.start,
                    w.stop,
                )
            })
            .collect();
        assert_eq!(
            waits,
            [
                ("a.drv", "inputs", 0.0, 1.0),
                ("top.drv", "inputs", 0.0, 6.0),
                ("a.drv", "build-slot", 1.0, 3.0),
                ("top.drv", "lock", 6.0, 7.0),
            ]
        );
        assert_eq!(
            r.waits[3].detail.as_deref(),
            Some("/nix/store/x.lock held by pid 77")
        );
        assert_eq!(
            r.waits[1].detail,
            Some([full("a.drv"), full("b.drv"), full("c.drv")].join(" "))
        );
    }

    #[test]
    fn builds_substitutions_cache_hits_and_predictions() {
        let r = run();
        assert_eq!(r.wall, 8.5);
        assert_eq!(r.predicted, Some((0.5, 7.5)));
        assert_eq!(r.predicted_critical_path, [full("a.drv"), full("top.drv")]);
        let a = r.builds.iter().find(|b| b.name == "a").unwrap();
        assert_eq!((a.start, a.stop, a.expected), (3.0, Some(6.0), Some(2.0)));
        let c = r.builds.iter().find(|b| b.name == "c").unwrap();
        assert_eq!(c.machine.as_deref(), Some("ssh://m1"));
        assert_eq!(r.substitutions.len(), 1);
        assert_eq!(r.substitutions[0].nar_bytes, 2 * 1024 * 1024);
        assert_eq!(r.cache_hits, [(full("cached.drv"), "AlreadyValid".into())]);
    }

    #[test]
    fn the_text_report() {
        assert_eq!(
            run().render(),
            [
                "run: 8.5s wall, 4 built, 0 failed, 1 copied, 2 cache hits",
                "critical path (3 steps, 7.5s from the first start to the last stop):",
                "  src copied in 0.5s (0.5s..1.0s, after 0.5s waiting)",
                "  a built in 3.0s (3.0s..6.0s, after 2.0s waiting for a build slot)",
                "  top built in 1.0s (7.0s..8.0s, after 1.0s waiting for locks)",
                "slowest builds:",
                "  c 3.5s on ssh://m1",
                "  a 3.0s on this machine, expected 2.0s",
                "  b 2.5s on this machine",
                "  top 1.0s on this machine, expected 1.0s",
                "predicted vs actual: 7.5s predicted at 0.5s, 8.5s actual (+13%)",
                "copied 1 paths (2.0 MiB) from 'file:///cache'",
                "cache hits: 1 derivations already valid, 0 substituted",
                "waiting: 2.0s for a build slot (1 waits), 7.0s for inputs (2 waits), 1.0s for locks (1 waits)",
                &format!("  {} waited 1.0s for the lock /nix/store/x.lock held by pid 77", full("top.drv")),
                "where: ssh://m1: 1 builds, 3.5s; this machine: 3 builds, 6.5s",
            ]
        );
    }

    #[test]
    fn saved_and_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let r = run();
        r.save(dir.path()).unwrap();
        assert_eq!(RunReport::load(dir.path()).unwrap(), r);
        let e = RunReport::load(&dir.path().join("none")).unwrap_err();
        assert!(e.to_string().starts_with("no run report in '"), "{e}");
        std::fs::write(dir.path().join(LAST_RUN), "{").unwrap();
        let e = RunReport::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("is not valid"), "{e}");
    }
}
