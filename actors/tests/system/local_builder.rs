//! The LocalBuilder with a fake log collector: builder output is forwarded as raw
//! bytes, outputs are registered, alarms and cancellation kill the builder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use drover::build_result::BuildStatus;
use drover::config::{Env, Settings};
use drover::derivation::{json, DerivationError, DrvHash};
use drover::store::LocalStore;
use drover::store_path::{StorePath, StorePathSet};
use drover_actors::local_builder::{LocalBuilder, LocalBuilderConfig};
use drover_actors::messages::*;

/// What the fake collector saw, shared with the test.
#[derive(Default)]
struct Seen {
    bytes: Vec<u8>,
    eof: bool,
    alarm: Option<Recipient<LogAlarm>>,
    config: Option<LogConfig>,
}

struct FakeCollector {
    seen: Arc<Mutex<Seen>>,
}

impl Actor for FakeCollector {
    type Context = Context<Self>;
}

impl Handler<LogBytes> for FakeCollector {
    type Result = ();
    fn handle(&mut self, msg: LogBytes, _: &mut Context<Self>) {
        self.seen.lock().unwrap().bytes.extend_from_slice(&msg.0);
    }
}

impl Handler<HookStderrLine> for FakeCollector {
    type Result = ();
    fn handle(&mut self, _: HookStderrLine, _: &mut Context<Self>) {}
}

impl Handler<LogEof> for FakeCollector {
    type Result = LogSummary;
    fn handle(&mut self, _: LogEof, _: &mut Context<Self>) -> LogSummary {
        let mut s = self.seen.lock().unwrap();
        s.eof = true;
        let text = String::from_utf8_lossy(&s.bytes).into_owned();
        LogSummary {
            tail: text.lines().map(str::to_owned).collect(),
            bytes: s.bytes.len() as u64,
            log_file: None,
            ..Default::default()
        }
    }
}

fn start_log(seen: Arc<Mutex<Seen>>) -> StartLogCollector {
    Arc::new(move |config: LogConfig, alarm: Recipient<LogAlarm>| {
        {
            let mut s = seen.lock().unwrap();
            s.alarm = Some(alarm);
            s.config = Some(config);
        }
        let addr = FakeCollector { seen: seen.clone() }.start();
        LogSink {
            bytes: addr.clone().recipient(),
            hook_stderr: addr.clone().recipient(),
            eof: addr.recipient(),
        }
    })
}

/// Receives `LocalBuildFinished` into a channel.
struct Reply(tokio::sync::mpsc::UnboundedSender<LocalBuildFinished>);

impl Actor for Reply {
    type Context = Context<Self>;
}

impl Handler<LocalBuildFinished> for Reply {
    type Result = ();
    fn handle(&mut self, msg: LocalBuildFinished, _: &mut Context<Self>) {
        let _ = self.0.send(msg);
    }
}

fn settings(dir: &Path) -> Settings {
    let mut env = Env::new();
    let d = |p: &str| dir.join(p).display().to_string();
    env.insert("NIX_STORE_DIR".into(), d("store"));
    env.insert("NIX_STATE_DIR".into(), d("var/nix"));
    env.insert("NIX_LOG_DIR".into(), d("var/log/nix"));
    env.insert("NIX_CONF_DIR".into(), d("etc"));
    env.insert("TMPDIR".into(), d("tmp"));
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    env.insert(
        "NIX_CONFIG".into(),
        "sandbox = false\nexperimental-features = nix-command ca-derivations\nbuild-users-group =\n".into(),
    );
    Settings::load(&env, &[]).unwrap()
}

/// Writes a derivation running `script` with /bin/sh and returns the request.
fn request(store: &LocalStore, name: &str, script: &str) -> LocalBuildRequest {
    let sd = store.store_dir().clone();
    let v = serde_json::json!({
        "name": name,
        "outputs": {"out": {}},
        "inputSrcs": [], "inputDrvs": {},
        "system": "x86_64-linux", "builder": "/bin/sh",
        "args": ["-c", script],
        "env": {"name": name, "out": "", "PATH": "/usr/bin:/bin"}
    });
    let no_inputs = |_: &StorePath| -> Result<DrvHash, DerivationError> {
        Err(DerivationError::Cycle("none".into()))
    };
    let (drv_path, drv) = json::from_json_with_paths(&v, &sd, no_inputs).unwrap();
    store
        .add_text_to_store(
            drv_path.name(),
            &drv.to_aterm_bytes(&sd),
            &drv.drv_references(),
        )
        .unwrap();
    LocalBuildRequest {
        goal_name: drover::build::done::goal_name(&sd.print(&drv_path), "*"),
        drv_path,
        output_paths: drv
            .outputs
            .iter()
            .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
            .collect(),
        drv: Arc::new(drv),
        wanted_outputs: BTreeSet::from(["out".to_string()]),
        input_closure: StorePathSet::new(),
        mode: BuildMode::Normal,
        keep_failed: false,
        round: (1, 1),
        run_settings: None,
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<LocalStore>,
    seen: Arc<Mutex<Seen>>,
    builder: Addr<LocalBuilder>,
    reply: Recipient<LocalBuildFinished>,
    rx: tokio::sync::mpsc::UnboundedReceiver<LocalBuildFinished>,
    tmp: std::path::PathBuf,
}

fn harness(echo: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    let store = Arc::new(LocalStore::open(&s).unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut config = LocalBuilderConfig::from_settings(&s);
    config.echo = echo;
    config.build.build_dir_root = dir.path().join("tmp");
    let builder = LocalBuilder::new(store.clone(), config, start_log(seen.clone())).start();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reply = Reply(tx).start().recipient();
    Harness {
        tmp: dir.path().join("tmp"),
        _dir: dir,
        store,
        seen,
        builder,
        reply,
        rx,
    }
}

async fn wait_for_output(seen: &Arc<Mutex<Seen>>, what: &str) {
    for _ in 0..500 {
        if String::from_utf8_lossy(&seen.lock().unwrap().bytes).contains(what) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("builder never printed {what:?}");
}

#[actix::test]
async fn builds_forwards_bytes_and_registers() {
    let mut h = harness(true);
    let req = request(
        &h.store,
        "hello",
        "printf 'partial'; echo ' line'; echo hi > $out",
    );
    let drv_path = req.drv_path.clone();
    let out = req.output_paths["out"].clone();
    h.builder.do_send(RunLocalBuild {
        id: 7,
        request: req,
        reply_to: h.reply.clone(),
    });
    let f = h.rx.recv().await.unwrap();
    assert_eq!(f.id, 7);
    assert_eq!(
        f.result.status,
        BuildStatus::Built,
        "{}",
        f.result.error_msg
    );
    assert_eq!(
        f.outputs,
        BTreeMap::from([("out".to_string(), out.clone())])
    );
    assert!(h.store.is_valid_path(&out).unwrap());
    assert_eq!(f.result.times_built, 1);
    assert!(f.result.start_time > 0 && f.result.stop_time >= f.result.start_time);
    assert!(f.result.built_outputs.is_empty() || f.result.built_outputs.len() == 1);
    let seen = h.seen.lock().unwrap();
    assert_eq!(seen.bytes, b"partial line\n");
    assert!(seen.eof);
    assert_eq!(seen.config.as_ref().unwrap().drv_path, drv_path);
    assert_eq!(
        std::fs::read_dir(&h.tmp).unwrap().count(),
        0,
        "build dir removed"
    );
}

#[actix::test]
async fn failure_carries_the_tail_when_not_echoed() {
    let mut h = harness(false);
    let req = request(&h.store, "fails", "echo one; echo two; exit 2");
    let drv = h.store.store_dir().print(&req.drv_path);
    h.builder.do_send(RunLocalBuild {
        id: 1,
        request: req,
        reply_to: h.reply.clone(),
    });
    let f = h.rx.recv().await.unwrap();
    assert_eq!(f.result.status, BuildStatus::PermanentFailure);
    assert_eq!(
        f.result.error_msg,
        format!("builder for '{drv}' failed with exit code 2;\nlast 2 log lines:\n> one\n> two\nFor full logs, run 'nix log {drv}'.")
    );
}

#[actix::test]
async fn silence_alarm_kills_the_builder() {
    let mut h = harness(true);
    let req = request(
        &h.store,
        "silent",
        "echo start; sleep 100 & sleep 100; echo never > $out",
    );
    let drv = h.store.store_dir().print(&req.drv_path);
    h.builder.do_send(RunLocalBuild {
        id: 2,
        request: req,
        reply_to: h.reply.clone(),
    });
    wait_for_output(&h.seen, "start").await;
    let alarm = h.seen.lock().unwrap().alarm.clone().unwrap();
    alarm.do_send(LogAlarm::Silent(Duration::from_secs(2)));
    let f = tokio::time::timeout(Duration::from_secs(20), h.rx.recv())
        .await
        .expect("killed promptly")
        .unwrap();
    assert_eq!(f.result.status, BuildStatus::TimedOut);
    assert_eq!(
        f.result.error_msg,
        format!("building of '{drv}!*' from .drv file timed out after 2 seconds of silence")
    );
    assert!(f.outputs.is_empty());
}

#[actix::test]
async fn log_limit_and_timeout_alarms() {
    let mut h = harness(true);
    for (id, alarm, expect) in [
        (
            3,
            LogAlarm::LogLimit(1000),
            "killed after writing more than 1000 bytes of log output",
        ),
        (
            4,
            LogAlarm::Timeout(Duration::from_secs(5)),
            "timed out after 5 seconds",
        ),
    ] {
        let req = request(
            &h.store,
            &format!("alarm{id}"),
            &format!("echo go{id}; sleep 100"),
        );
        h.builder.do_send(RunLocalBuild {
            id,
            request: req,
            reply_to: h.reply.clone(),
        });
        wait_for_output(&h.seen, &format!("go{id}")).await;
        let a = h.seen.lock().unwrap().alarm.clone().unwrap();
        a.do_send(alarm);
        let f = h.rx.recv().await.unwrap();
        assert_eq!(f.id, id);
        assert!(
            f.result.error_msg.ends_with(expect),
            "{}",
            f.result.error_msg
        );
        let st = if id == 3 {
            BuildStatus::LogLimitExceeded
        } else {
            BuildStatus::TimedOut
        };
        assert_eq!(f.result.status, st);
    }
}

#[actix::test]
async fn cancel_kills_and_cleans_up() {
    let mut h = harness(true);
    let req = request(&h.store, "cancelled", "echo running; sleep 100");
    h.builder.do_send(RunLocalBuild {
        id: 5,
        request: req,
        reply_to: h.reply.clone(),
    });
    wait_for_output(&h.seen, "running").await;
    h.builder.do_send(CancelLocalBuild { id: 5 });
    let f = tokio::time::timeout(Duration::from_secs(20), h.rx.recv())
        .await
        .expect("cancelled promptly")
        .unwrap();
    assert!(!f.result.success());
    assert_eq!(
        std::fs::read_dir(&h.tmp).unwrap().count(),
        0,
        "build dir removed"
    );
}

/// The actor builds corpus derivations in a Nix test root; Nix accepts the result.
#[actix::test]
async fn builds_corpus_derivations_nix_accepts() {
    require_nix!();
    let root = crate::nix_env::TestRoot::new();
    let mut env: Env = root
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    let s = Settings::load(&env, &[]).unwrap();
    let store = Arc::new(LocalStore::open(&s).unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let builder = LocalBuilder::new(
        store.clone(),
        LocalBuilderConfig::from_settings(&s),
        start_log(seen.clone()),
    )
    .start();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reply = Reply(tx).start().recipient();
    let corpus = crate::nix_env::corpus_dir().join("corpus.nix");
    for (id, attr) in (1..).zip([
        "multi",
        "selfRef",
        "fodRecursive",
        "caFloatingMulti",
        "structured",
    ]) {
        let drv = root.instantiate(&corpus, Some(attr)).remove(0);
        let drv_path = store.store_dir().parse(&drv).unwrap();
        let d = Arc::new(store.read_derivation(&drv_path).unwrap());
        builder.do_send(RunLocalBuild {
            id,
            request: LocalBuildRequest {
                goal_name: drover::build::done::goal_name(&drv, "*"),
                drv_path,
                output_paths: d
                    .outputs
                    .iter()
                    .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
                    .collect(),
                wanted_outputs: d.outputs.keys().cloned().collect(),
                drv: d,
                input_closure: store.compute_closure(&[]).unwrap(),
                mode: BuildMode::Normal,
                keep_failed: false,
                round: (1, 1),
                run_settings: None,
            },
            reply_to: reply.clone(),
        });
        let f = rx.recv().await.unwrap();
        assert_eq!(
            f.result.status,
            BuildStatus::Built,
            "{attr}: {}",
            f.result.error_msg
        );
        // Nix agrees the outputs are valid and need no build
        let outs = root.realise(&[&drv]);
        let mut ours: Vec<String> = f
            .outputs
            .values()
            .map(|p| store.store_dir().print(p))
            .collect();
        ours.sort();
        let mut outs = outs;
        outs.sort();
        assert_eq!(ours, outs, "{attr}");
    }
    root.verify_store();
}
