//! The critical-path scheduler on the synchronous driver (exact start orders on
//! small graphs with injected estimates, the fallback estimate, the ETA event), and
//! the build history a real local build writes and the next run reads.

use std::sync::Arc;
use std::time::Duration;

use drover::build_history::BuildHistory;
use drover::config::{Env, Settings};
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store_path::StorePath;
use drover_actors::messages::BuildMode;
use drover_actors::progress::{Estimates, GoalKey, ProgressEvent};
use drover_actors::schedule::{FixedEstimates, DEFAULT_BUILD_TIME};
use drover_actors::testing::{SyncDriver, TestStore};
use drover_actors::{SystemBuilder, SystemEvent, WorkerCore, WorkerSettings};

use crate::nix_env::TestRoot;

fn built(p: &StorePath) -> DerivedPath {
    DerivedPath::Built {
        drv_path: p.clone(),
        outputs: OutputsSpec::All,
    }
}

struct Graph {
    _dir: tempfile::TempDir,
    ts: TestStore,
    settings: Arc<WorkerSettings>,
}

impl Graph {
    fn new(max_jobs: u64) -> Graph {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestStore::open(dir.path());
        let mut settings = WorkerSettings::from_settings(&ts.settings);
        settings.max_jobs = max_jobs;
        Graph {
            _dir: dir,
            ts,
            settings: Arc::new(settings),
        }
    }

    fn drv(&self, name: &str, inputs: &[&StorePath]) -> StorePath {
        self.ts.add_drv(name, &["out"], inputs, &[])
    }

    /// Runs the requests to the end with these estimates (seconds by name; `None`:
    /// no history): the start order and the progress events.
    fn run(
        &self,
        estimates: Option<&[(&str, f64)]>,
        requests: &[&StorePath],
    ) -> (Vec<String>, Vec<ProgressEvent>) {
        let mut core = WorkerCore::new(
            self.settings.clone(),
            self.ts.store.store_dir().clone(),
            0,
            false,
        );
        if let Some(e) = estimates {
            core.set_estimator(Arc::new(FixedEstimates(
                e.iter()
                    .map(|(n, s)| (n.to_string(), Duration::from_secs_f64(*s)))
                    .collect(),
            )));
        }
        let mut d = SyncDriver::new(self.ts.store.clone(), self.settings.clone(), vec![]);
        core.start(
            requests.iter().map(|p| built(p)).collect(),
            BuildMode::Normal,
        );
        let out = d.run(&mut core).expect("the run ends");
        assert_eq!(out.exit_status, 0, "{:?}", out.errors);
        (d.started.clone(), d.progress.clone())
    }
}

fn estimates(progress: &[ProgressEvent]) -> Vec<Arc<Estimates>> {
    progress
        .iter()
        .filter_map(|p| match p {
            ProgressEvent::Estimates(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn one_slot_goes_to_the_longest_remaining_path_in_seconds() {
    let g = Graph::new(1);
    let a1 = g.drv("a1", &[]);
    let a2 = g.drv("a2", &[&a1]);
    let a3 = g.drv("a3", &[&a2]);
    let b = g.drv("b", &[]);
    let c = g.drv("c", &[]);
    let est = [
        ("a1", 1.0),
        ("a2", 1.0),
        ("a3", 1.0),
        ("b", 2.5),
        ("c", 0.5),
    ];
    // Requested smallest first: the order is the estimates', not the requests'.
    let (started, progress) = g.run(Some(&est), &[&c, &b, &a3]);
    // a1 (path 3 s) > b (2.5) > c; then b (2.5) > a2 (2); a2 > a3 (1) > c (0.5).
    assert_eq!(started, ["a1", "b", "a2", "a3", "c"]);
    let why: Vec<(String, Duration, usize)> = progress
        .iter()
        .filter_map(|p| match p {
            ProgressEvent::Scheduled {
                goal: GoalKey::Derivation(d),
                path,
                still_waiting,
                ..
            } => Some((d.name().to_string(), *path, *still_waiting)),
            _ => None,
        })
        .collect();
    let ms = Duration::from_millis;
    assert_eq!(
        why,
        [
            ("a1.drv".to_string(), ms(3000), 2),
            // b goes as soon as a1 is done: a2 (2 s, its inputs known) could not
            // claim more, so the grant does not wait for it.
            ("b.drv".to_string(), ms(2500), 1),
            ("a2.drv".to_string(), ms(2000), 1),
            ("a3.drv".to_string(), ms(1000), 1),
            ("c.drv".to_string(), ms(500), 0),
        ]
    );
}

#[test]
fn ties_go_to_the_longer_own_estimate_then_the_earlier_request() {
    let g = Graph::new(1);
    // p (1 s) has q2 (3 s) above it: path 4 s, as the lone r (4 s).
    let p = g.drv("p", &[]);
    let q2 = g.drv("q2", &[&p]);
    let r = g.drv("r", &[]);
    let x = g.drv("x", &[]);
    let y = g.drv("y", &[]);
    let est = [("p", 1.0), ("q2", 3.0), ("r", 4.0), ("x", 0.5), ("y", 0.5)];
    let (started, _) = g.run(Some(&est), &[&y, &x, &q2, &r]);
    // r before p (same path, longer own estimate); y before x (asked first).
    assert_eq!(started, ["r", "p", "q2", "y", "x"]);
}

#[test]
fn without_history_the_default_estimate_makes_the_longest_chain_first() {
    let g = Graph::new(2);
    let c1 = g.drv("c1", &[]);
    let c2 = g.drv("c2", &[&c1]);
    let c3 = g.drv("c3", &[&c2]);
    let i: Vec<StorePath> = (0..3).map(|n| g.drv(&format!("i{n}"), &[])).collect();
    let mut req: Vec<&StorePath> = i.iter().collect();
    req.push(&c3);
    let (started, progress) = g.run(None, &req);
    // c1 (3 × default) and the first independent one share the two slots; the
    // chain goes on as each link ends; c3 ties with i2 (one default each), which
    // was requested first.
    assert_eq!(started, ["c1", "i0", "c2", "i1", "i2", "c3"]);
    let first = &estimates(&progress)[0];
    assert_eq!(first.eta, Some(DEFAULT_BUILD_TIME * 3));
    assert!(first.expected.iter().all(|(_, d)| *d == DEFAULT_BUILD_TIME));
    assert_eq!(first.critical_path, [c1, c2, c3]);
}

#[test]
fn the_eta_is_the_larger_of_critical_path_and_work_per_slot_and_shrinks() {
    let g = Graph::new(2);
    let c1 = g.drv("c1", &[]);
    let c2 = g.drv("c2", &[&c1]);
    let i: Vec<StorePath> = (0..4).map(|n| g.drv(&format!("i{n}"), &[])).collect();
    let est = [
        ("c1", 1.0),
        ("c2", 1.0),
        ("i0", 2.0),
        ("i1", 2.0),
        ("i2", 2.0),
        ("i3", 2.0),
    ];
    let mut req: Vec<&StorePath> = i.iter().collect();
    req.push(&c2);
    let (_, progress) = g.run(Some(&est), &req);
    let all = estimates(&progress);
    // Work 2 + 8 s over 2 slots: 5 s, more than the 2 s critical path.
    assert_eq!(all[0].eta, Some(Duration::from_secs(5)));
    assert_eq!(all[0].critical_path, [i[0].clone()]);
    let mut expected: Vec<_> = all.iter().flat_map(|e| e.expected.clone()).collect();
    expected.sort();
    let mut want: Vec<_> = est
        .iter()
        .map(|(n, s)| {
            let p = if n.starts_with('c') {
                if *n == "c1" {
                    &c1
                } else {
                    &c2
                }
            } else {
                &i[n[1..].parse::<usize>().unwrap()]
            };
            (p.clone(), Duration::from_secs_f64(*s))
        })
        .collect();
    want.sort();
    // Each derivation's expected time is announced once, when it became ready.
    assert_eq!(expected, want);
    let etas: Vec<Duration> = all.iter().filter_map(|e| e.eta).collect();
    assert!(etas.windows(2).all(|w| w[1] <= w[0]), "{etas:?}");
    assert!(etas.last().unwrap() < &Duration::from_secs(2), "{etas:?}");
}

const EXPR: &str = r#"
let sys = builtins.currentSystem; in {
  slow = derivation { name = "slow-1.0"; system = sys; builder = "/bin/sh";
    args = ["-c" "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; /bin/sleep 0.3; echo $i > $out"]; };
  slow2 = derivation { name = "slow-1.1"; system = sys; builder = "/bin/sh";
    args = ["-c" "echo 2 > $out"]; };
}
"#;

/// Builds one request with the real system on Nix's test root: the estimates seen.
async fn realise_seeing_estimates(root: &TestRoot, drv: &str) -> Vec<Arc<Estimates>> {
    let mut env: Env = root
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    let settings = Settings::load(&env, &[]).unwrap();
    let (system, mut events) = SystemBuilder::new(&settings).echo(false).start().unwrap();
    let drv = system.store().store_dir().parse(drv).unwrap();
    let out = system.realise(vec![built(&drv)], BuildMode::Normal).await;
    assert_eq!(out.exit_status, 0, "{:?}", out.errors);
    let mut seen = Vec::new();
    while let Some(ev) = events.try_recv() {
        if let SystemEvent::Progress(ProgressEvent::Estimates(e)) = ev {
            seen.push(e);
        }
    }
    seen
}

#[actix::test]
async fn local_builds_are_recorded_and_estimate_the_next_run() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("e.nix");
    std::fs::write(&file, EXPR).unwrap();
    let slow = root.instantiate(&file, Some("slow")).remove(0);
    let slow2 = root.instantiate(&file, Some("slow2")).remove(0);
    let first = realise_seeing_estimates(&root, &slow).await;
    assert_eq!(first[0].expected[0].1, DEFAULT_BUILD_TIME, "{first:?}");
    // The record is written off the build's path: wait for it.
    let state = root.path().join("var/nix");
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = BuildHistory::open(&state)
            .unwrap()
            .builds_of(&slow)
            .unwrap();
        if !rows.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (r.pname.as_str(), r.machine.as_str(), r.status.as_str()),
        ("slow", "local", "Built")
    );
    assert!(r.wall >= Duration::from_millis(300), "{r:?}");
    assert!(r.cpu.is_some_and(|c| c > Duration::ZERO), "{r:?}");
    assert!(r.peak_rss.is_some_and(|m| m > 0), "{r:?}");
    // A new version of the package inherits the estimate by its name.
    let second = realise_seeing_estimates(&root, &slow2).await;
    assert_eq!(second[0].expected[0].1, r.wall, "{second:?}");
    // Nix agrees the outputs drover built are valid.
    let out = root.run("nix-store", &["-q", "--outputs", &slow]);
    root.run("nix-store", &["--verify-path", out.trim()]);
}
