use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use drover::build_result::BuildStatus;
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover::store_path::StorePath;
use drover_actors::messages::BuildMode;
use drover_actors::progress::{Counters, ProgressEvent, WaitReason};
use drover_actors::substituter::{FakeFault, InMemorySubstituter, Substituter};
use drover_actors::testing::{
    BuilderLog, FakeBuilder, FakeHookPool, FakeHookReply, FakeOutcome, ProgressRecorder, TestStore,
};
use drover_actors::{spawn_worker, Realise, RealiseOutcome, WorkerConfig, WorkerSettings};

struct Setup {
    _dir: tempfile::TempDir,
    ts: TestStore,
    settings: WorkerSettings,
    script: Vec<(String, FakeOutcome)>,
    delay: Duration,
    hook: Option<VecDeque<FakeHookReply>>,
    subs: Vec<Arc<dyn Substituter>>,
}

struct Run {
    outcome: RealiseOutcome,
    builder: BuilderLog,
    tries: Vec<(bool, String)>,
    progress: Vec<ProgressEvent>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ts = TestStore::open(dir.path());
        let mut settings = WorkerSettings::from_settings(&ts.settings);
        settings.poll_interval = Duration::from_millis(20);
        settings.max_jobs = 4;
        Setup {
            _dir: dir,
            ts,
            settings,
            script: vec![],
            delay: Duration::from_millis(0),
            hook: None,
            subs: vec![],
        }
    }

    fn drv(&self, name: &str, inputs: &[&StorePath]) -> StorePath {
        self.ts.add_drv(name, &["out"], inputs, &[])
    }

    fn fail(&mut self, name: &str, status: BuildStatus) {
        self.script.push((
            name.into(),
            FakeOutcome::Fail(
                status,
                format!("builder for '{name}' failed with exit code 1"),
            ),
        ));
    }

    async fn realise(&self, requests: Vec<DerivedPath>, mode: BuildMode) -> Run {
        let mut fb = FakeBuilder::new(self.ts.store.clone());
        fb.delay = self.delay;
        fb.script = self.script.iter().cloned().collect();
        let blog = fb.log.clone();
        let fb = fb.start();
        let tries = Arc::new(Mutex::new(Vec::new()));
        let hook = self.hook.clone().map(|replies| {
            FakeHookPool {
                store: self.ts.store.clone(),
                replies,
                tries: tries.clone(),
            }
            .start()
            .recipient()
        });
        let rec = ProgressRecorder::default();
        let events = rec.events.clone();
        let rec = rec.start();
        let w = spawn_worker(WorkerConfig {
            store: self.ts.store.clone(),
            local_builder: fb.clone().recipient(),
            cancel_local_build: fb.recipient(),
            hook,
            cancel_hook_build: None,
            substituters: self.subs.clone(),
            settings: self.settings.clone(),
            progress: Some(rec.recipient()),
        });
        let outcome = w.send(Realise { requests, mode }).await.unwrap();
        // Let the last progress events arrive.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let builder = blog.lock().unwrap().clone();
        let tries = tries.lock().unwrap().clone();
        let progress = events.lock().unwrap().clone();
        Run {
            outcome,
            builder,
            tries,
            progress,
        }
    }
}

fn built(p: &StorePath) -> DerivedPath {
    DerivedPath::Built {
        drv_path: p.clone(),
        outputs: OutputsSpec::All,
    }
}

fn last_counters(r: &Run) -> Counters {
    r.progress
        .iter()
        .rev()
        .find_map(|e| match e {
            ProgressEvent::Counters(c) => Some(*c),
            _ => None,
        })
        .unwrap_or_default()
}

fn p(s: &Setup, path: &StorePath) -> String {
    s.ts.store.store_dir().print(path)
}

#[actix::test]
async fn chain_is_built_in_order_and_counters_return_to_zero() {
    let s = Setup::new();
    let a = s.drv("a", &[]);
    let b = s.drv("b", &[&a]);
    let c = s.drv("c", &[&b]);
    let r = s.realise(vec![built(&c)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    assert_eq!(r.builder.started, ["a", "b", "c"]);
    let res = &r.outcome.results[0].result;
    assert_eq!(res.status, BuildStatus::Built);
    assert_eq!(res.built_outputs.len(), 1);
    assert!(s.ts.store.is_valid_path(&s.ts.output(&c, "out")).unwrap());
    let c = last_counters(&r);
    assert_eq!(c.expected_builds, 0);
    assert_eq!(c.running_builds, 0);
    assert_eq!(c.done_builds, 3);
    assert_eq!(c.failed_builds, 0);
    assert!(r.progress.iter().any(|e| matches!(
        e,
        ProgressEvent::BuildStarted {
            verb: "building",
            ..
        }
    )));
    // A second run finds everything valid.
    let r2 = s
        .realise(vec![built(&s.drv("c", &[&b]))], BuildMode::Normal)
        .await;
    assert_eq!(
        r2.outcome.results[0].result.status,
        BuildStatus::AlreadyValid
    );
    assert!(r2.builder.started.is_empty());
}

#[actix::test]
async fn dedup_and_wanted_outputs_merge() {
    let s = Setup::new();
    let m = s.ts.add_drv("multi", &["out", "dev"], &[], &[]);
    let req = |o: &str| DerivedPath::Built {
        drv_path: m.clone(),
        outputs: OutputsSpec::name(o),
    };
    let r = s
        .realise(vec![req("out"), req("dev")], BuildMode::Normal)
        .await;
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    assert_eq!(r.builder.started, ["multi"]);
    // Each result is restricted to its request's outputs.
    let outs: Vec<Vec<String>> = r
        .outcome
        .results
        .iter()
        .map(|k| {
            k.result
                .built_outputs
                .keys()
                .map(|d| d.output.clone())
                .collect()
        })
        .collect();
    assert_eq!(outs, [vec!["out".to_string()], vec!["dev".to_string()]]);
    // A shared dependency is built once.
    let d = s.drv("shared", &[]);
    let x = s.drv("x", &[&d]);
    let y = s.drv("y", &[&d]);
    let r = s
        .realise(vec![built(&x), built(&y)], BuildMode::Normal)
        .await;
    assert_eq!(
        r.builder.started.iter().filter(|n| *n == "shared").count(),
        1
    );
}

#[actix::test]
async fn dependency_failure_and_exit_status_100() {
    let mut s = Setup::new();
    s.fail("a", BuildStatus::PermanentFailure);
    let a = s.drv("a", &[]);
    let b = s.drv("b", &[&a]);
    let r = s.realise(vec![built(&b)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 100);
    assert_eq!(
        r.outcome.results[0].result.status,
        BuildStatus::DependencyFailed
    );
    assert_eq!(
        r.outcome.errors,
        [format!(
            "1 dependencies of derivation '{}' failed to build",
            p(&s, &b)
        )]
    );
    let c = last_counters(&r);
    assert_eq!(c.failed_builds, 1);
    assert_eq!(c.expected_builds, 0);
}

#[actix::test]
async fn keep_going_counts_all_failures() {
    let mut s = Setup::new();
    s.settings.keep_going = true;
    s.fail("f1", BuildStatus::PermanentFailure);
    s.fail("f2", BuildStatus::PermanentFailure);
    let f1 = s.drv("f1", &[]);
    let f2 = s.drv("f2", &[]);
    let ok = s.drv("ok", &[]);
    let top = s.drv("top", &[&f1, &f2, &ok]);
    let r = s.realise(vec![built(&top)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 100);
    assert_eq!(
        r.outcome.errors,
        [format!(
            "2 dependencies of derivation '{}' failed to build",
            p(&s, &top)
        )]
    );
    assert!(r.builder.started.contains(&"ok".to_string()));
}

#[actix::test]
async fn stop_at_first_failure_cancels_running_builds() {
    let mut s = Setup::new();
    s.fail("bad", BuildStatus::PermanentFailure);
    s.script.push(("slow".into(), FakeOutcome::Hang));
    // `bad` waits for `pre`, so `slow` is normally running when `bad` fails.
    let pre = s.drv("pre", &[]);
    let bad = s.drv("bad", &[&pre]);
    let slow = s.drv("slow", &[]);
    let r = s
        .realise(vec![built(&slow), built(&bad)], BuildMode::Normal)
        .await;
    assert_eq!(r.outcome.exit_status, 100);
    let slow_started = r.builder.started.iter().any(|n| n == "slow");
    assert_eq!(r.builder.cancelled.len(), usize::from(slow_started));
    assert_eq!(r.outcome.results[0].result.status, BuildStatus::MiscFailure);
    assert_eq!(
        r.outcome.results[1].result.status,
        BuildStatus::PermanentFailure
    );
    // Nix 2.8 names every top-level goal that did not succeed, the cancelled
    // `slow` included (observed: `error: build of '…slow.drv', '…bad.drv' failed`).
    let mut names = [format!("'{}'", p(&s, &slow)), format!("'{}'", p(&s, &bad))];
    names.sort();
    assert_eq!(
        r.outcome.errors,
        [
            "builder for 'bad' failed with exit code 1".to_string(),
            format!("build of {} failed", names.join(", "))
        ]
    );
    let c = last_counters(&r);
    assert_eq!((c.expected_builds, c.running_builds), (0, 0));
}

#[actix::test]
async fn exit_statuses() {
    for (outcome, expected) in [
        (FakeOutcome::Fail(BuildStatus::TimedOut, "t".into()), 101),
        (FakeOutcome::HashMismatch, 102),
        // outside `--check` (a differing round of `repeat`) no check mismatch: 1
        (
            FakeOutcome::Fail(BuildStatus::NotDeterministic, "n".into()),
            1,
        ),
        (
            FakeOutcome::Fail(BuildStatus::LogLimitExceeded, "l".into()),
            1,
        ),
        (
            FakeOutcome::Fail(BuildStatus::TransientFailure, "t".into()),
            1,
        ),
    ] {
        let mut s = Setup::new();
        s.script.push(("x".into(), outcome.clone()));
        let x = s.drv("x", &[]);
        let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
        assert_eq!(r.outcome.exit_status, expected, "{outcome:?}");
    }
}

#[actix::test]
async fn max_jobs_zero_is_a_run_error() {
    let mut s = Setup::new();
    s.settings.max_jobs = 0;
    let x = s.drv("x", &[]);
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 1);
    assert_eq!(r.outcome.errors, ["unable to start any build; either increase '--max-jobs' or enable remote builds.\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html".to_string()]);
    assert!(r.builder.started.is_empty());
}

#[actix::test]
async fn max_jobs_is_honoured() {
    for jobs in [1u64, 2] {
        let mut s = Setup::new();
        s.settings.max_jobs = jobs;
        s.delay = Duration::from_millis(30);
        let reqs: Vec<DerivedPath> = (0..5)
            .map(|i| built(&s.drv(&format!("j{i}"), &[])))
            .collect();
        let r = s.realise(reqs, BuildMode::Normal).await;
        assert_eq!(r.outcome.exit_status, 0);
        assert_eq!(r.builder.started.len(), 5);
        assert_eq!(r.builder.max_running as u64, jobs);
    }
}

#[actix::test]
async fn critical_path_goes_first() {
    // With one slot held by `blocker`, a leaf with a long chain of dependents waits
    // next to a lone leaf; the chain's leaf gets the slot first.
    let mut s = Setup::new();
    s.settings.max_jobs = 1;
    s.delay = Duration::from_millis(150);
    let blocker = s.drv("blocker", &[]);
    let lone = s.drv("lone", &[]);
    let c1 = s.drv("c1", &[]);
    let c2 = s.drv("c2", &[&c1]);
    let c3 = s.drv("c3", &[&c2]);
    let r = s
        .realise(
            vec![built(&blocker), built(&lone), built(&c3)],
            BuildMode::Normal,
        )
        .await;
    assert_eq!(r.outcome.exit_status, 0);
    // Whichever leaf got the free slot first, the next slot goes to c1 (two goals
    // wait on it), not to the other lone leaf.
    let pos = |n: &str| r.builder.started.iter().position(|x| x == n).unwrap();
    assert!(pos("c1") <= 1, "{:?}", r.builder.started);
}

#[actix::test]
async fn ten_thousand_valid_derivations() {
    let s = Setup::new();
    let n = 10_000;
    // Short chains of 10 so the graph has edges.
    let specs: Vec<(String, Vec<usize>)> = (0..n)
        .map(|i| {
            (
                format!("v{i}"),
                if i % 10 == 0 { vec![] } else { vec![i - 1] },
            )
        })
        .collect();
    let reqs: Vec<DerivedPath> = s.ts.add_valid_drvs(&specs).iter().map(built).collect();
    let t = Instant::now();
    let r = s.realise(reqs, BuildMode::Normal).await;
    let took = t.elapsed();
    eprintln!("realising {n} valid derivations took {took:?}");
    assert_eq!(r.outcome.exit_status, 0);
    assert!(r
        .outcome
        .results
        .iter()
        .all(|k| k.result.status == BuildStatus::AlreadyValid));
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_eq!(last_counters(&r).expected_builds, 0);
}

#[actix::test]
async fn substitution_instead_of_building() {
    let mut s = Setup::new();
    let x = s.drv("x", &[]);
    let out = s.ts.output(&x, "out");
    let sub = Arc::new(InMemorySubstituter::new("mem://cache", 40));
    sub.add_file(out.clone(), b"hello", Default::default());
    s.subs = vec![sub.clone()];
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    assert_eq!(r.outcome.results[0].result.status, BuildStatus::Substituted);
    assert!(r.builder.started.is_empty());
    assert_eq!(sub.copied(), [out]);
    let c = last_counters(&r);
    assert_eq!(c.done_substitutions, 1);
    assert_eq!((c.expected_substitutions, c.running_substitutions), (0, 0));
    assert_eq!((c.expected_nar_size, c.expected_download_size), (0, 0));
    assert_eq!((c.done_nar_size, c.done_download_size), (120, 5));
}

#[actix::test]
async fn failed_substitution_needs_fallback() {
    let mut s = Setup::new();
    let x = s.drv("x", &[]);
    let out = s.ts.output(&x, "out");
    let sub = Arc::new(InMemorySubstituter::new("mem://cache", 40));
    sub.add_file(out.clone(), b"hello", Default::default());
    sub.set_fault(out.clone(), FakeFault::CopyFails);
    s.subs = vec![sub.clone()];
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(
        r.outcome.results[0].result.status,
        BuildStatus::TransientFailure
    );
    assert_eq!(r.outcome.exit_status, 1);
    assert!(r.outcome.errors[0].ends_with("try '--fallback' to build derivation from source"));
    assert_eq!(last_counters(&r).failed_substitutions, 1);
    s.settings.fallback = true;
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(r.outcome.results[0].result.status, BuildStatus::Built);
    // A gone NAR is not a real failure: building follows without --fallback.
    let mut s = Setup::new();
    let y = s.drv("y", &[]);
    let sub = Arc::new(InMemorySubstituter::new("mem://cache", 40));
    sub.add_file(s.ts.output(&y, "out"), b"y", Default::default());
    sub.set_fault(s.ts.output(&y, "out"), FakeFault::Gone);
    s.subs = vec![sub];
    let r = s.realise(vec![built(&y)], BuildMode::Normal).await;
    assert_eq!(r.outcome.results[0].result.status, BuildStatus::Built);
}

#[actix::test]
async fn opaque_paths_and_incomplete_closures() {
    let mut s = Setup::new();
    let sd = s.ts.store.store_dir().clone();
    let dep = sd
        .parse(&format!(
            "{}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-dep",
            sd.as_str()
        ))
        .unwrap();
    let top = sd
        .parse(&format!(
            "{}/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-top",
            sd.as_str()
        ))
        .unwrap();
    let sub = Arc::new(InMemorySubstituter::new("mem://cache", 40));
    sub.add_file(dep.clone(), b"dep", Default::default());
    sub.add_file(top.clone(), b"top", [dep.clone()].into());
    s.subs = vec![sub.clone()];
    let r = s
        .realise(vec![DerivedPath::Opaque(top.clone())], BuildMode::Normal)
        .await;
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    assert_eq!(sub.copied(), [dep.clone(), top.clone()], "references first");
    // No substituter has it.
    let missing = sd
        .parse(&format!(
            "{}/cccccccccccccccccccccccccccccccc-missing",
            sd.as_str()
        ))
        .unwrap();
    let r = s
        .realise(
            vec![DerivedPath::Opaque(missing.clone())],
            BuildMode::Normal,
        )
        .await;
    assert_eq!(
        r.outcome.results[0].result.status,
        BuildStatus::NoSubstituters
    );
    assert_eq!(r.outcome.exit_status, 1);
    assert_eq!(
        r.outcome.results[0].result.error_msg,
        format!(
            "path '{}' is required, but there is no substituter that can build it",
            sd.print(&missing)
        )
    );
    // Nix 2.8 rethrows only derivation goals' errors: a path is just named.
    assert_eq!(
        r.outcome.errors,
        [format!("build of '{}' failed", sd.print(&missing))]
    );
}

#[actix::test]
async fn hook_accepts_and_builds() {
    let mut s = Setup::new();
    s.hook = Some(
        [FakeHookReply::Accept {
            exit_code: Some(0),
            build: true,
        }]
        .into(),
    );
    let x = s.drv("x", &[]);
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    assert_eq!(r.outcome.results[0].result.status, BuildStatus::Built);
    assert!(r.builder.started.is_empty());
    // Nix 2.8 asks before taking a slot: willing, as one is free.
    assert_eq!(r.tries, [(true, "x".to_string())]);
    assert!(r.progress.iter().any(
        |e| matches!(e, ProgressEvent::BuildStarted { machine: Some(m), .. } if m == "fake-machine")
    ));
}

#[actix::test]
async fn hook_declines_and_a_free_slot_builds_at_once() {
    let mut s = Setup::new();
    s.hook = Some([FakeHookReply::Decline].into());
    let x = s.drv("x", &[]);
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0);
    assert_eq!(r.builder.started, ["x"]);
    // One `try` per attempt, as Nix 2.8 sends.
    assert_eq!(r.tries, [(true, "x".to_string())]);
}

#[actix::test]
async fn a_hook_declining_everything_with_one_slot_builds_all_locally() {
    // Nix 2.8: the second derivation is offered unwilling while the first builds,
    // waits for the slot and is offered again, willing, when woken.
    let mut s = Setup::new();
    s.settings.max_jobs = 1;
    s.delay = Duration::from_millis(100);
    s.hook = Some([FakeHookReply::Decline].into());
    let x = s.drv("x", &[]);
    let y = s.drv("y", &[]);
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        s.realise(vec![built(&x), built(&y)], BuildMode::Normal),
    )
    .await
    .expect("no hang");
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    // Which one is offered first, and whether the second is offered before the
    // first takes the slot, depends on which store job ends first (as in Nix).
    let t = &r.tries;
    assert!(t.len() == 2 || t.len() == 3, "{t:?}");
    assert!(t[0].0, "the first offer is willing: {t:?}");
    assert_ne!(t[0].1, t[1].1, "{t:?}");
    if t.len() == 3 {
        // The one that waited for the slot is asked again, willing, when woken.
        assert_eq!(t[2], (true, t[1].1.clone()), "{t:?}");
    }
}

#[actix::test]
async fn hook_declines_permanently() {
    let mut s = Setup::new();
    s.hook = Some([FakeHookReply::DeclinePermanently].into());
    let a = s.drv("a", &[]);
    let b = s.drv("b", &[&a]);
    let r = s.realise(vec![built(&b)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0);
    assert_eq!(r.tries.len(), 1, "never asked again: {:?}", r.tries);
    assert_eq!(r.builder.started, ["a", "b"]);
}

#[actix::test]
async fn hook_postpones_then_accepts() {
    let mut s = Setup::new();
    s.hook = Some(
        [
            FakeHookReply::Postpone,
            FakeHookReply::Accept {
                exit_code: Some(0),
                build: true,
            },
        ]
        .into(),
    );
    let x = s.drv("x", &[]);
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0);
    assert_eq!(r.tries.len(), 2);
    assert!(r.progress.iter().any(|e| matches!(e, ProgressEvent::Message(m) if m.starts_with("waiting for a machine to build"))));
    // Why it waited, for the build tree.
    assert!(r.progress.contains(&ProgressEvent::Waiting {
        path: x.clone(),
        reason: WaitReason::Machine
    }));
}

#[actix::test]
async fn hook_failures() {
    let cases = [
        (
            FakeHookReply::Accept {
                exit_code: Some(1),
                build: false,
            },
            BuildStatus::MiscFailure,
            "failed with exit code 1",
        ),
        (
            FakeHookReply::Accept {
                exit_code: Some(100),
                build: false,
            },
            BuildStatus::PermanentFailure,
            "failed with exit code 100",
        ),
        (
            FakeHookReply::Accept {
                exit_code: None,
                build: false,
            },
            BuildStatus::MiscFailure,
            "failed due to signal",
        ),
    ];
    for (reply, status, msg) in cases {
        let mut s = Setup::new();
        s.hook = Some([reply.clone()].into());
        let x = s.drv("x", &[]);
        let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
        let res = &r.outcome.results[0].result;
        assert_eq!(res.status, status, "{reply:?}");
        assert!(res.error_msg.contains(msg), "{reply:?}: {}", res.error_msg);
        let expected_exit = if status == BuildStatus::PermanentFailure {
            100
        } else {
            1
        };
        assert_eq!(r.outcome.exit_status, expected_exit, "{reply:?}");
    }
    // Errors Nix 2.8 throws out of the goal end the whole run: exit 1, that error only.
    let fatal = [
        (
            FakeHookReply::Accept {
                exit_code: Some(0),
                build: false,
            },
            "some outputs are unexpectedly invalid",
        ),
        (
            FakeHookReply::Garbage("nonsense".into()),
            "bad hook reply 'nonsense'",
        ),
    ];
    for (reply, msg) in fatal {
        let mut s = Setup::new();
        s.hook = Some([reply.clone()].into());
        let x = s.drv("x", &[]);
        let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
        assert_eq!(r.outcome.exit_status, 1, "{reply:?}");
        assert_eq!(r.outcome.errors, [msg], "{reply:?}");
    }
}

#[actix::test]
async fn foreign_system_without_hook_is_a_run_error() {
    let s = Setup::new();
    let x = s.ts.add_drv(
        "foreign",
        &["out"],
        &[],
        &[("requiredSystemFeatures", "no-such-feature")],
    );
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 1);
    assert!(
        r.outcome.errors[0].contains("with features {no-such-feature} is required to build"),
        "{:?}",
        r.outcome.errors
    );
}

#[actix::test]
async fn output_lock_contention_waits() {
    let s = Setup::new();
    let x = s.drv("x", &[]);
    let out = s.ts.store.real_path(&s.ts.output(&x, "out"));
    let lock = drover::store::PathLocks::lock(&[out].into()).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(lock);
    });
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    release.join().unwrap();
    assert_eq!(r.outcome.exit_status, 0);
    assert!(r
        .progress
        .iter()
        .any(|e| matches!(e, ProgressEvent::Message(m) if m.starts_with("waiting for lock on"))));
    // Why it waited, and who held the lock: this process.
    let lock_file =
        drover::store::locks::lock_path_of(&s.ts.store.real_path(&s.ts.output(&x, "out")));
    assert!(
        r.progress.contains(&ProgressEvent::Waiting {
            path: x.clone(),
            reason: WaitReason::Lock {
                path: lock_file,
                pid: Some(std::process::id())
            }
        }),
        "{:?}",
        r.progress
    );
}

#[actix::test]
async fn goals_say_they_wait_for_inputs_and_for_a_build_slot() {
    let mut s = Setup::new();
    s.settings.max_jobs = 1;
    s.delay = Duration::from_millis(100);
    let a = s.drv("a", &[]);
    let b = s.drv("b", &[]);
    let c = s.drv("c", &[&a, &b]);
    let r = s.realise(vec![built(&c)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0);
    let waits: Vec<(&StorePath, &WaitReason)> = r
        .progress
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Waiting { path, reason } => Some((path, reason)),
            _ => None,
        })
        .collect();
    let inputs = waits.iter().find_map(|(p, r)| match r {
        WaitReason::Inputs(i) if *p == &c => Some(i.clone()),
        _ => None,
    });
    let mut inputs = inputs.unwrap_or_else(|| panic!("{waits:?}"));
    inputs.sort();
    let mut ab = vec![a.clone(), b.clone()];
    ab.sort();
    assert_eq!(inputs, ab);
    // One slot: whichever of a and b asked second waited for it.
    assert!(
        waits
            .iter()
            .any(|(p, r)| (*p == &a || *p == &b) && **r == WaitReason::BuildSlot),
        "{waits:?}"
    );
    // A goal waits before it starts.
    let pos = |f: &dyn Fn(&ProgressEvent) -> bool| r.progress.iter().position(f).unwrap();
    assert!(
        pos(&|e| matches!(e, ProgressEvent::Waiting { path, .. } if path == &c))
            < pos(&|e| matches!(e, ProgressEvent::BuildStarted { drv_path, .. } if drv_path == &c))
    );
}

#[actix::test]
async fn floating_ca_and_deferred_derivations_are_resolved() {
    let s = Setup::new();
    let a = s.drv("a", &[]);
    let c = s.ts.add_ca_drv("c", &[&a]);
    let b = s.drv("b", &[&c]);
    let r = s.realise(vec![built(&b)], BuildMode::Normal).await;
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    assert_eq!(r.outcome.results[0].result.status, BuildStatus::Built);
    assert_eq!(r.builder.started, ["a", "c", "b"]);
    let resolved: Vec<&String> = r
        .progress
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Message(m) if m.starts_with("resolved derivation: ") => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(resolved.len(), 2, "{resolved:?}");
    let out = &r.outcome.results[0].result.built_outputs;
    assert_eq!(out.len(), 1);
    // The realisations make the second run a no-op.
    let r2 = s.realise(vec![built(&b)], BuildMode::Normal).await;
    assert_eq!(r2.outcome.exit_status, 0, "{:?}", r2.outcome.errors);
    assert!(r2.builder.started.is_empty(), "{:?}", r2.builder.started);
    assert_eq!(
        r2.outcome.results[0].result.status,
        BuildStatus::AlreadyValid
    );
}

#[actix::test]
async fn repair_mode_without_substituters_rebuilds_corrupt_outputs() {
    let s = Setup::new();
    let x = s.drv("x", &[]);
    s.ts.make_valid(&x);
    let r = s.realise(vec![built(&x)], BuildMode::Repair).await;
    assert_eq!(r.outcome.exit_status, 0, "{:?}", r.outcome.errors);
    assert_eq!(
        r.outcome.results[0].result.status,
        BuildStatus::AlreadyValid
    );
    assert!(r.builder.started.is_empty());
    std::fs::write(s.ts.store.real_path(&s.ts.output(&x, "out")), "corrupt").unwrap();
    let r = s.realise(vec![built(&x)], BuildMode::Repair).await;
    assert_eq!(r.builder.started, ["x"]);
    assert!(r.progress.iter().any(|e| matches!(
        e,
        ProgressEvent::BuildStarted {
            verb: "repairing outputs of",
            ..
        }
    )));
}

#[actix::test]
async fn dependency_errors_are_reported_as_messages() {
    let mut s = Setup::new();
    s.fail("a", BuildStatus::PermanentFailure);
    let a = s.drv("a", &[]);
    let b = s.drv("b", &[&a]);
    let r = s.realise(vec![built(&b)], BuildMode::Normal).await;
    let msgs: Vec<&String> = r
        .progress
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Message(m) if m.starts_with("error: ") => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(msgs, ["error: builder for 'a' failed with exit code 1"]);
}

#[actix::test]
async fn results_carry_build_times() {
    let s = Setup::new();
    let x = s.drv("x", &[]);
    let r = s.realise(vec![built(&x)], BuildMode::Normal).await;
    let res = &r.outcome.results[0].result;
    assert_eq!(res.times_built, 1);
    assert!(
        res.start_time > 0 && res.stop_time >= res.start_time,
        "{res:?}"
    );
}

impl Setup {
    /// A Worker over a FakeBuilder whose builds take `self.delay`.
    fn worker(&self) -> (Addr<drover_actors::Worker>, Arc<Mutex<BuilderLog>>) {
        let mut fb = FakeBuilder::new(self.ts.store.clone());
        fb.delay = self.delay;
        fb.script = self.script.iter().cloned().collect();
        let blog = fb.log.clone();
        let fb = fb.start();
        let w = spawn_worker(WorkerConfig {
            store: self.ts.store.clone(),
            local_builder: fb.clone().recipient(),
            cancel_local_build: fb.recipient(),
            hook: None,
            cancel_hook_build: None,
            substituters: self.subs.clone(),
            settings: self.settings.clone(),
            progress: None,
        });
        (w, blog)
    }
}

#[actix::test]
async fn overlapping_realisations_share_the_build_and_both_get_its_result() {
    let mut s = Setup::new();
    s.delay = Duration::from_millis(300);
    let dep = s.drv("dep", &[]);
    let top = s.drv("top", &[&dep]);
    let other = s.drv("other", &[]);
    let (w, blog) = s.worker();
    let a = w.send(Realise {
        requests: vec![built(&top)],
        mode: BuildMode::Normal,
    });
    let b = w.send(Realise {
        requests: vec![built(&top), built(&other)],
        mode: BuildMode::Normal,
    });
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.exit_status, b.exit_status), (0, 0), "{a:?} {b:?}");
    assert_eq!(a.results[0].result, b.results[0].result);
    let mut started = blog.lock().unwrap().started.clone();
    started.sort();
    assert_eq!(started, ["dep", "other", "top"], "each built once");
    // Both ran at once: the three builds overlapped.
    assert!(blog.lock().unwrap().max_running >= 2);
}

#[actix::test]
async fn a_cancelled_run_ends_alone_and_the_other_run_completes() {
    let mut s = Setup::new();
    s.delay = Duration::from_millis(400);
    let shared = s.drv("shared", &[]);
    let mine = s.drv("mine", &[]);
    let (w, blog) = s.worker();
    let run = drover_actors::new_run_id();
    let a = w.send(drover_actors::RealiseRun {
        run,
        requests: vec![built(&shared), built(&mine)],
        mode: BuildMode::Normal,
        keep_going: None,
        settings: None,
        substituters: None,
    });
    let b = w.send(Realise {
        requests: vec![built(&shared)],
        mode: BuildMode::Normal,
    });
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.do_send(drover_actors::CancelRun(run));
    };
    let (a, b, ()) = tokio::join!(a, b, cancel);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.exit_status, 1);
    assert_eq!(a.errors, ["interrupted by the user"]);
    assert_eq!(b.exit_status, 0, "{b:?}");
    let log = blog.lock().unwrap();
    assert_eq!(log.cancelled.len(), 1, "only the build run A alone wanted");
    assert!(s
        .ts
        .store
        .is_valid_path(&s.ts.output(&shared, "out"))
        .unwrap());
}

#[actix::test]
async fn a_check_run_waits_for_the_runs_going_on() {
    let mut s = Setup::new();
    s.delay = Duration::from_millis(200);
    let x = s.drv("x", &[]);
    let (w, blog) = s.worker();
    let a = w.send(Realise {
        requests: vec![built(&x)],
        mode: BuildMode::Normal,
    });
    let b = w.send(Realise {
        requests: vec![built(&x)],
        mode: BuildMode::Check,
    });
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.exit_status, 0, "{a:?}");
    // The check ran after the build, as a build of its own.
    assert_eq!(blog.lock().unwrap().started, ["x", "x"]);
    assert_eq!(b.exit_status, 0, "{b:?}");
    assert_eq!(b.results[0].result.status, BuildStatus::Built);
}

#[actix::test]
async fn a_run_with_settings_of_its_own_gives_them_to_the_goals_it_makes() {
    // Run A (keep-failed, its own local-build settings with 7 cores) builds `a`
    // and `shared`; run B (the Worker's settings) joins while `shared` builds and
    // builds `b` too: `shared` keeps A's settings, `b` gets the Worker's.
    let mut s = Setup::new();
    s.settings.max_jobs = 4;
    s.delay = Duration::from_millis(300);
    let shared = s.drv("shared", &[]);
    let a = s.drv("a", &[]);
    let b = s.drv("b", &[]);
    let (w, blog) = s.worker();
    let dir = tempfile::tempdir().unwrap();
    let conf = drover::config::Settings::for_root(dir.path(), "cores = 7\n").unwrap();
    let mut own = s.settings.clone();
    own.keep_failed = true;
    own.local_build = Some(Arc::new(
        drover_actors::messages::RunBuildSettings::from_settings(&conf),
    ));
    let first = w.send(drover_actors::RealiseRun {
        run: drover_actors::new_run_id(),
        requests: vec![built(&a), built(&shared)],
        mode: BuildMode::Normal,
        keep_going: None,
        settings: Some(Arc::new(own)),
        substituters: None,
    });
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.send(Realise {
            requests: vec![built(&shared), built(&b)],
            mode: BuildMode::Normal,
        })
        .await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap().exit_status, 0);
    assert_eq!(second.unwrap().exit_status, 0);
    let mut seen = blog.lock().unwrap().settings.clone();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("a".to_owned(), true, Some(7)),
            ("b".to_owned(), false, None),
            ("shared".to_owned(), true, Some(7)),
        ]
    );
}
