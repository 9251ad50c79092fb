//! Goal actors on their own: each of the three goal kinds started in a System with a
//! fake Worker (the test answers its messages by hand), a fake LocalBuilder and
//! in-memory substituters, checking the messages a goal sends and when.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use drover::build_result::BuildStatus;
use drover::derived_path::OutputsSpec;
use drover::realisation::{DrvOutput, Realisation};
use drover::store_path::StorePath;
use drover_actors::goal::actor::{GoalActor, GoalServices};
use drover_actors::goal::derivation::DerivationGoal;
use drover_actors::goal::drv_output_substitution::DrvOutputSubstitutionGoal;
use drover_actors::goal::host::{GoalEnv, GoalMachine, GoalProgressKind, SlotKind};
use drover_actors::goal::path_substitution::PathSubstitutionGoal;
use drover_actors::goal::{Effect, Event, ExitCode, GoalCtx, GoalOutcome, GoalRequest, JobEnv};
use drover_actors::messages::{
    AllSubGoalsDone, BuildMode, CancelGoal, SlotGranted, StartGoal, SubGoalDone,
};
use drover_actors::store_executor::StoreExecutor;
use drover_actors::substituter::{InMemorySubstituter, Substituter};
use drover_actors::testing::{FakeBuilder, FakeOutcome, FakeWorker, FromGoal, TestStore};
use drover_actors::WorkerSettings;
use tokio::sync::mpsc::UnboundedReceiver;

struct Setup {
    _dir: tempfile::TempDir,
    ts: TestStore,
    builder: FakeBuilder,
    subs: Vec<Arc<dyn Substituter>>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestStore::open(dir.path());
        Setup {
            builder: FakeBuilder::new(ts.store.clone()),
            ts,
            _dir: dir,
            subs: Vec::new(),
        }
    }

    /// Starts the fake Worker and builder; the services every goal of the test gets.
    fn services(
        self,
    ) -> (
        Setup2,
        Arc<GoalServices>,
        UnboundedReceiver<FromGoal>,
        Arc<Mutex<drover_actors::testing::BuilderLog>>,
    ) {
        let mut settings = WorkerSettings::from_settings(&self.ts.settings);
        settings.substituter_uris = self.subs.iter().map(|s| s.uri()).collect();
        settings.substituter_trusted = self.subs.iter().map(|s| s.is_trusted()).collect();
        settings.poll_interval = Duration::from_millis(50);
        let settings = Arc::new(settings);
        let env = Arc::new(JobEnv {
            store: self.ts.store.clone(),
            substituters: self.subs.clone(),
            drv_hashes: Default::default(),
            settings: settings.clone(),
            contents: Default::default(),
            registrations: Default::default(),
        });
        let (worker, link, rx) = FakeWorker::start();
        let log = self.builder.log.clone();
        let builder = self.builder.start();
        let services = Arc::new(GoalServices {
            env: Arc::new(GoalEnv::new(
                settings,
                self.ts.store.store_dir().clone(),
                self.subs.len(),
                false,
            )),
            executor: StoreExecutor::new(env),
            local_builder: builder.clone().recipient(),
            cancel_local_build: builder.recipient(),
            hook: None,
            cancel_hook_build: None,
            worker: link,
        });
        (
            Setup2 {
                _dir: self._dir,
                ts: self.ts,
                _worker: worker,
            },
            services,
            rx,
            log,
        )
    }
}

struct Setup2 {
    _dir: tempfile::TempDir,
    ts: TestStore,
    _worker: Addr<FakeWorker>,
}

/// The next message of the goal, skipping progress (collected into `progress`).
async fn next(rx: &mut UnboundedReceiver<FromGoal>, progress: &mut Vec<String>) -> FromGoal {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the goal said nothing for 60 s")
            .expect("the fake worker went away");
        match m {
            FromGoal::Progress(p) => progress.push(match p.progress {
                GoalProgressKind::BuildStarted { .. } => "build started".to_owned(),
                GoalProgressKind::SubstitutionStarted { uri, .. } => format!("substituting {uri}"),
                GoalProgressKind::SubstitutionStopped => "substitution stopped".to_owned(),
                GoalProgressKind::SubstitutionSizes { .. } => "sizes".to_owned(),
                GoalProgressKind::Waiting(r) => format!("waiting {r:?}"),
                GoalProgressKind::Message(m) => m,
            }),
            other => return other,
        }
    }
}

/// The goal's end, and whether it gave a slot back before it.
async fn finished(
    rx: &mut UnboundedReceiver<FromGoal>,
    progress: &mut Vec<String>,
) -> (drover_actors::messages::GoalFinished, bool) {
    let mut released = false;
    loop {
        match next(rx, progress).await {
            FromGoal::ReleaseSlot(_) => released = true,
            FromGoal::Finished(f) => return (f, released),
            other => panic!("expected the end, got {other:?}"),
        }
    }
}

fn done(exit: ExitCode, status: BuildStatus) -> Arc<GoalOutcome> {
    Arc::new(match exit {
        ExitCode::Success => GoalOutcome::success(status),
        e => GoalOutcome::failure(e, status, "failed"),
    })
}

#[actix::test]
async fn derivation_goal_requests_inputs_then_a_slot_then_builds_and_finishes() {
    let s = Setup::new();
    let dep = s.ts.add_drv("dep", &["out"], &[], &[]);
    s.ts.make_valid(&dep);
    let top = s.ts.add_drv("top", &["out"], &[&dep], &[]);
    let (s, services, mut rx, log) = s.services();
    let goal = GoalActor::new(
        7,
        DerivationGoal::new(top.clone(), OutputsSpec::All, BuildMode::Normal),
        services,
    )
    .start();
    goal.do_send(StartGoal);
    let mut progress = Vec::new();
    // Its input derivation's output first (after the empty wait for the outputs'
    // substitutions: there are no substituters).
    let r = loop {
        let FromGoal::RequestSubGoals(r) = next(&mut rx, &mut progress).await else {
            panic!("expected a request for the input");
        };
        if !r.requests.is_empty() {
            break r;
        }
        goal.do_send(AllSubGoalsDone);
    };
    assert_eq!(r.goal, 7);
    let [GoalRequest::Derivation { drv_path, .. }] = &r.requests[..] else {
        panic!("unexpected requests {:?}", r.requests);
    };
    assert_eq!(drv_path, &dep);
    let mut ok = (*done(ExitCode::Success, BuildStatus::AlreadyValid)).clone();
    ok.outputs.insert("out".into(), s.ts.output(&dep, "out"));
    goal.do_send(SubGoalDone(drover_actors::goal::WaiteeResult {
        request: r.requests[0].clone(),
        outcome: Arc::new(ok),
    }));
    goal.do_send(AllSubGoalsDone);
    // Then a build slot; nothing is built before it is granted.
    let FromGoal::AcquireSlot(a) = next(&mut rx, &mut progress).await else {
        panic!("expected a slot request");
    };
    assert_eq!((a.goal, a.kind), (7, SlotKind::Build));
    assert!(log.lock().unwrap().started.is_empty());
    goal.do_send(SlotGranted);
    let (f, released) = finished(&mut rx, &mut progress).await;
    assert!(released, "the build slot was not given back before the end");
    assert_eq!(f.goal, 7);
    assert_eq!(f.finished.outcome.result.status, BuildStatus::Built);
    assert_eq!(f.finished.wanted, Some(OutputsSpec::All));
    assert_eq!(log.lock().unwrap().started, ["top"]);
    assert_eq!(progress, ["build started"]);
    assert!(s.ts.store.is_valid_path(&s.ts.output(&top, "out")).unwrap());
}

#[actix::test]
async fn a_derivation_goal_cancelled_while_building_cancels_its_build_and_says_nothing() {
    let mut s = Setup::new();
    s.builder.script.insert("slow".into(), FakeOutcome::Hang);
    let slow = s.ts.add_drv("slow", &["out"], &[], &[]);
    let (_s, services, mut rx, log) = s.services();
    let goal = GoalActor::new(
        9,
        DerivationGoal::new(slow, OutputsSpec::All, BuildMode::Normal),
        services,
    )
    .start();
    goal.do_send(StartGoal);
    let mut progress = Vec::new();
    loop {
        match next(&mut rx, &mut progress).await {
            FromGoal::RequestSubGoals(_) => goal.do_send(AllSubGoalsDone),
            FromGoal::AcquireSlot(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    goal.do_send(SlotGranted);
    // The build runs (the fake builder hangs), then the Worker cancels the goal.
    while log.lock().unwrap().started.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    goal.do_send(CancelGoal);
    while log.lock().unwrap().cancelled.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(log.lock().unwrap().cancelled, [9]);
    // The actor stopped without a report: cancelled goals are not reported back.
    while goal.connected() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    while let Ok(m) = rx.try_recv() {
        assert!(matches!(m, FromGoal::Progress(_)), "unexpected {m:?}");
    }
}

#[actix::test]
async fn path_substitution_goal_asks_for_a_substitution_slot_and_fetches() {
    let mut s = Setup::new();
    let sd = s.ts.store.store_dir().clone();
    let path: StorePath = sd
        .parse(&format!("{}/{}-fetched", sd.as_str(), "c".repeat(32)))
        .unwrap();
    let sub = Arc::new(InMemorySubstituter::new("mem://a", 10));
    sub.add_file(path.clone(), b"contents", Default::default());
    s.subs.push(sub.clone());
    let (s, services, mut rx, _) = s.services();
    let goal = GoalActor::new(3, PathSubstitutionGoal::new(path.clone(), false), services).start();
    goal.do_send(StartGoal);
    let mut progress = Vec::new();
    loop {
        match next(&mut rx, &mut progress).await {
            // Its references (none).
            FromGoal::RequestSubGoals(r) => {
                assert!(r.requests.is_empty(), "{:?}", r.requests);
                goal.do_send(AllSubGoalsDone);
            }
            FromGoal::AcquireSlot(a) => {
                assert_eq!(a.kind, SlotKind::Substitution);
                goal.do_send(SlotGranted);
            }
            FromGoal::ReleaseSlot(r) => assert_eq!(r.kind, SlotKind::Substitution),
            FromGoal::Finished(f) => {
                assert_eq!(f.finished.outcome.result.status, BuildStatus::Substituted);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        progress.contains(&"substituting mem://a".to_owned()),
        "{progress:?}"
    );
    assert!(s.ts.store.is_valid_path(&path).unwrap());
    assert_eq!(sub.copied(), [path]);
}

#[actix::test]
async fn drv_output_substitution_goal_waits_for_the_output_path() {
    let mut s = Setup::new();
    // The output is valid already, as the path substitution the goal asks for
    // (answered by hand here) would have made it.
    let out =
        s.ts.store
            .add_text_to_store("ca-out", b"ca", &Default::default())
            .unwrap();
    let id = DrvOutput {
        drv_hash: drover::hash::HashAlgo::Sha256.digest(b"some derivation"),
        output: "out".into(),
    };
    let sub = Arc::new(InMemorySubstituter::new("mem://a", 10));
    sub.add_file(out.clone(), b"ca", Default::default());
    sub.add_realisation(Realisation {
        id: id.clone(),
        out_path: out.clone(),
        signatures: Default::default(),
        dependent_realisations: Default::default(),
    });
    s.subs.push(sub);
    let (_s, services, mut rx, _) = s.services();
    let goal = GoalActor::new(4, DrvOutputSubstitutionGoal::new(id, false), services).start();
    goal.do_send(StartGoal);
    let mut progress = Vec::new();
    // The realisation is fetched in a substitution slot, then the output path is
    // asked for.
    let FromGoal::AcquireSlot(a) = next(&mut rx, &mut progress).await else {
        panic!("expected a slot request");
    };
    assert_eq!((a.goal, a.kind), (4, SlotKind::Substitution));
    goal.do_send(SlotGranted);
    let r = loop {
        match next(&mut rx, &mut progress).await {
            FromGoal::RequestSubGoals(r) => break r,
            FromGoal::ReleaseSlot(r) => assert_eq!(r.kind, SlotKind::Substitution),
            other => panic!("unexpected {other:?}"),
        }
    };
    let [GoalRequest::Substitution { path, .. }] = &r.requests[..] else {
        panic!("unexpected requests {:?}", r.requests);
    };
    assert_eq!(path, &out);
    goal.do_send(SubGoalDone(drover_actors::goal::WaiteeResult {
        request: r.requests[0].clone(),
        outcome: done(ExitCode::Success, BuildStatus::Substituted),
    }));
    goal.do_send(AllSubGoalsDone);
    let (f, _) = finished(&mut rx, &mut progress).await;
    assert_eq!(f.finished.outcome.exit, ExitCode::Success);
}

/// A goal whose first step panics, or whose first store job does.
struct Panicking {
    in_job: bool,
}

impl GoalMachine for Panicking {
    const KIND: &'static str = "panicking";
    fn handle(&mut self, ev: Event, _: &GoalCtx) -> Vec<Effect> {
        match ev {
            Event::Start if self.in_job => {
                vec![Effect::Blocking(Box::new(|_| panic!("the job broke")))]
            }
            Event::Start => panic!("the step broke"),
            _ => vec![],
        }
    }
}

#[actix::test]
async fn a_panicking_step_or_store_job_becomes_a_failed_goal() {
    for (in_job, text) in [
        (
            false,
            "internal error: the panicking goal panicked: the step broke",
        ),
        (
            true,
            "internal error: a store job of the panicking goal panicked: the job broke",
        ),
    ] {
        let (_s, services, mut rx, _) = Setup::new().services();
        let goal = GoalActor::new(5, Panicking { in_job }, services).start();
        goal.do_send(StartGoal);
        let FromGoal::Finished(f) = next(&mut rx, &mut Vec::new()).await else {
            panic!("expected a failed goal");
        };
        assert_eq!(f.goal, 5);
        assert_eq!(f.finished.outcome.exit, ExitCode::Failed);
        assert_eq!(f.finished.outcome.result.status, BuildStatus::MiscFailure);
        assert_eq!(f.finished.outcome.result.error_msg, text);
    }
}

#[actix::test]
async fn a_goal_actor_dropped_before_its_end_is_reported_stopped() {
    let s = Setup::new();
    let drv = s.ts.add_drv("waits", &["out"], &[], &[]);
    let (_s, services, mut rx, _) = s.services();
    let goal = GoalActor::new(
        6,
        DerivationGoal::new(drv, OutputsSpec::All, BuildMode::Normal),
        services,
    )
    .start();
    goal.do_send(StartGoal);
    // It waits for the Worker's answer; the Worker drops it instead.
    let m = next(&mut rx, &mut Vec::new()).await;
    assert!(
        matches!(m, FromGoal::RequestSubGoals(_) | FromGoal::AcquireSlot(_)),
        "{m:?}"
    );
    drop(goal);
    let FromGoal::Stopped(st) = next(&mut rx, &mut Vec::new()).await else {
        panic!("expected GoalStopped");
    };
    assert_eq!(st.goal, 6);
}
