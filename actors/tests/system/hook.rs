//! The hook pool and hook jobs against scripted hooks (`tests/data/hooks/record.py`,
//! driven by environment variables set in a per-test wrapper script).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use drover::hook_protocol::{encode_settings, Reader};
use drover::store_path::{StoreDir, StorePath};
use drover_actors::hook::{HookPool, HookPoolConfig};

use drover_actors::messages::{
    CancelHookBuild, HookBuild, HookFinished, HookReply, HookStderrLine, HookTry, LogAlarm,
    LogBytes, LogConfig, LogEof, LogSink, LogSummary, StartLogCollector,
};

fn recorder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/record.py")
}

/// A scratch directory with a wrapper hook that runs the recorder with `vars`.
struct Hook {
    dir: tempfile::TempDir,
}

impl Hook {
    fn new(vars: &[(&str, &str)]) -> Hook {
        let dir = tempfile::tempdir().unwrap();
        let mut script = format!("#!/bin/sh\nexport HOOK_DIR='{}'\n", dir.path().display());
        for (k, v) in vars {
            script.push_str(&format!("export {k}='{v}'\n"));
        }
        script.push_str(&format!("exec python3 '{}' \"$@\"\n", recorder().display()));
        Hook::with_script(dir, &script)
    }

    fn with_script(dir: tempfile::TempDir, script: &str) -> Hook {
        let p = dir.path().join("hook");
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Hook { dir }
    }

    fn program(&self) -> PathBuf {
        self.dir.path().join("hook")
    }

    /// One `pid argv…` line per process started.
    fn processes(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("argv"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn stdin(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("stdin.bin")).unwrap_or_default()
    }
}

/// What a fake log collector received.
#[derive(Default, Debug)]
struct Collected {
    bytes: Vec<u8>,
    lines: Vec<String>,
    eof: bool,
}

struct FakeCollector {
    got: Arc<Mutex<Collected>>,
}

impl Actor for FakeCollector {
    type Context = Context<Self>;
}

impl Handler<LogBytes> for FakeCollector {
    type Result = ();
    fn handle(&mut self, m: LogBytes, _: &mut Context<Self>) {
        self.got.lock().unwrap().bytes.extend(m.0);
    }
}

impl Handler<HookStderrLine> for FakeCollector {
    type Result = ();
    fn handle(&mut self, m: HookStderrLine, _: &mut Context<Self>) {
        self.got.lock().unwrap().lines.push(m.0);
    }
}

impl Handler<LogEof> for FakeCollector {
    type Result = LogSummary;
    fn handle(&mut self, _: LogEof, _: &mut Context<Self>) -> LogSummary {
        let mut g = self.got.lock().unwrap();
        g.eof = true;
        LogSummary {
            tail: vec![],
            bytes: g.bytes.len() as u64,
            log_file: None,
            ..Default::default()
        }
    }
}

/// A collector factory; with `alarm_after`, the collector raises a timeout alarm
/// that long after it starts.
fn collector(got: Arc<Mutex<Collected>>, alarm_after: Option<Duration>) -> StartLogCollector {
    Arc::new(move |_cfg: LogConfig, alarm: Recipient<LogAlarm>| {
        let addr = FakeCollector { got: got.clone() }.start();
        if let Some(d) = alarm_after {
            actix::spawn(async move {
                tokio::time::sleep(d).await;
                alarm.do_send(LogAlarm::Timeout(d));
            });
        }
        LogSink {
            bytes: addr.clone().recipient(),
            hook_stderr: addr.clone().recipient(),
            eof: addr.recipient(),
        }
    })
}

/// Waits (at most 2 s) until `n` lines have arrived: echoed lines are sent without
/// waiting for the recipient.
async fn wait_for_lines(got: &Arc<Mutex<Collected>>, n: usize) {
    for _ in 0..100 {
        if got.lock().unwrap().lines.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn store_dir() -> StoreDir {
    StoreDir::new("/nix/store").unwrap()
}

fn drv(name: &str) -> StorePath {
    StorePath::from_base_name(&format!("00000000000000000000000000000000-{name}.drv")).unwrap()
}

fn pool(
    program: Option<PathBuf>,
    got: Arc<Mutex<Collected>>,
    alarm_after: Option<Duration>,
) -> (Addr<HookPool>, Arc<Mutex<Collected>>) {
    let stderr_got = Arc::new(Mutex::new(Collected::default()));
    let stderr = FakeCollector {
        got: stderr_got.clone(),
    }
    .start();
    let config = HookPoolConfig {
        build_hook: program,
        verbosity: 3,
        preamble: Arc::new(encode_settings([
            ("max-jobs", "1"),
            ("system", "x86_64-linux"),
        ])),
        store_dir: store_dir(),
        start_log_collector: collector(got, alarm_after),
        stderr: Some(stderr.clone().recipient()),
    };
    (HookPool::new(config).start(), stderr_got)
}

fn try_msg(name: &str) -> HookTry {
    HookTry {
        am_willing: true,
        system: "x86_64-linux".into(),
        drv_path: drv(name),
        required_features: ["kvm".to_owned()].into(),
    }
}

fn describe(r: &HookReply) -> String {
    match r {
        HookReply::Decline => "decline".into(),
        HookReply::DeclinePermanently => "decline-permanently".into(),
        HookReply::Postpone => "postpone".into(),
        HookReply::Accept { machine, .. } => format!("accept {machine}"),
        HookReply::Error(e) => format!("error {e}"),
    }
}

async fn ask(p: &Addr<HookPool>, name: &str) -> HookReply {
    p.send(try_msg(name)).await.unwrap()
}

/// Receives one HookFinished.
struct Finished(Arc<Mutex<Option<HookFinished>>>);
impl Actor for Finished {
    type Context = Context<Self>;
}
impl Handler<HookFinished> for Finished {
    type Result = ();
    fn handle(&mut self, m: HookFinished, _: &mut Context<Self>) {
        *self.0.lock().unwrap() = Some(m);
    }
}

fn log_config() -> LogConfig {
    LogConfig {
        drv_path: drv("x"),
        log_dir: "/nonexistent".into(),
        compress: false,
        tail_lines: 10,
        max_log_size: 0,
        max_silent_time: None,
        timeout: None,
        echo: false,
    }
}

/// Accepts, runs the job, and waits (at most 20 s) for its HookFinished.
async fn build(reply: HookReply, inputs: &[&str]) -> HookFinished {
    let HookReply::Accept { job, .. } = reply else {
        panic!("expected accept, got {}", describe(&reply));
    };
    let slot = Arc::new(Mutex::new(None));
    let fin = Finished(slot.clone()).start();
    job.send(HookBuild {
        id: 42,
        inputs: inputs
            .iter()
            .map(|b| StorePath::from_base_name(b).unwrap())
            .collect(),
        missing_outputs: ["out".to_owned(), "dev".to_owned()].into(),
        log: log_config(),
        reply_to: fin.recipient(),
    })
    .await
    .unwrap();
    for _ in 0..400 {
        if let Some(f) = slot.lock().unwrap().take() {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no HookFinished");
}

#[actix::test]
async fn one_process_for_three_tries_until_accept() {
    let hook = Hook::new(&[("HOOK_REPLIES", "decline,postpone,decline,accept:m1,decline")]);
    let got = Arc::new(Mutex::new(Collected::default()));
    let (p, stderr) = pool(Some(hook.program()), got, None);
    assert_eq!(describe(&ask(&p, "a").await), "decline");
    assert_eq!(describe(&ask(&p, "b").await), "postpone");
    assert_eq!(describe(&ask(&p, "c").await), "decline");
    let acc = ask(&p, "d").await;
    assert_eq!(describe(&acc), "accept m1");
    assert_eq!(hook.processes().len(), 1, "{:?}", hook.processes());
    // argv: the verbosity only after argv[0].
    assert!(hook.processes()[0].ends_with(" 3"));
    // The next request starts a new process.
    assert_eq!(describe(&ask(&p, "e").await), "decline");
    assert_eq!(hook.processes().len(), 2);
    // The preamble went out once per process; then the requests, in order.
    let sent = hook.stdin();
    let mut r = Reader::new(&sent);
    assert_eq!(r.read_settings().unwrap().len(), 2);
    for name in ["a", "b", "c", "d"] {
        let t = r.read_try().unwrap();
        assert_eq!(
            t.drv_path,
            format!("/nix/store/00000000000000000000000000000000-{name}.drv")
        );
        assert_eq!(t.required_features, BTreeSet::from(["kvm".to_owned()]));
        assert!(t.am_willing);
    }
    drop(acc);
    // The `@nix` lines printed while answering reached the stderr recipient.
    wait_for_lines(&stderr, 5).await;
    let lines = stderr.lock().unwrap().lines.clone();
    assert_eq!(lines.len(), 5, "{lines:?}");
    // As Nix prints them: the `msg` of each (level 3: shown at verbosity 3).
    assert!(lines[0].starts_with("recorder pid "), "{lines:?}");
}

#[actix::test]
async fn decline_permanently_is_never_asked_again() {
    let hook = Hook::new(&[("HOOK_REPLIES", "decline-permanently,decline")]);
    let (p, _) = pool(Some(hook.program()), Default::default(), None);
    assert_eq!(describe(&ask(&p, "a").await), "decline-permanently");
    assert_eq!(describe(&ask(&p, "b").await), "decline-permanently");
    assert_eq!(describe(&ask(&p, "c").await), "decline-permanently");
    assert_eq!(hook.processes().len(), 1);
    assert_eq!(
        std::fs::read_to_string(hook.dir.path().join("count")).unwrap(),
        "1"
    );
}

#[actix::test]
async fn no_hook_configured_declines_permanently() {
    let (p, _) = pool(None, Default::default(), None);
    assert_eq!(describe(&ask(&p, "a").await), "decline-permanently");
}

#[actix::test]
async fn missing_program_is_unexpected_eof() {
    let got = Arc::new(Mutex::new(Collected::default()));
    let stderr_got = Arc::new(Mutex::new(Collected::default()));
    let stderr = FakeCollector {
        got: stderr_got.clone(),
    }
    .start();
    let config = HookPoolConfig {
        build_hook: Some("/nonexistent/hook".into()),
        verbosity: 3,
        preamble: Arc::new(encode_settings(Vec::<(String, String)>::new())),
        store_dir: store_dir(),
        start_log_collector: collector(got, None),
        stderr: Some(stderr.recipient()),
    };
    let p = HookPool::new(config).start();
    assert_eq!(
        describe(&ask(&p, "a").await),
        "error unexpected EOF reading a line\n(use '--show-trace' to show detailed location information)"
    );
    wait_for_lines(&stderr_got, 1).await;
    assert_eq!(
        stderr_got.lock().unwrap().lines,
        ["error: executing '/nonexistent/hook': No such file or directory"]
    );
}

#[actix::test]
async fn accepted_job_builds() {
    let hook = Hook::new(&[("HOOK_REPLIES", "accept:machine-7"), ("HOOK_BUILD", "ok")]);
    let got = Arc::new(Mutex::new(Collected::default()));
    let (p, _) = pool(Some(hook.program()), got.clone(), None);
    let reply = ask(&p, "a").await;
    let dep = "11111111111111111111111111111111-dep";
    let src = "22222222222222222222222222222222-hello.txt";
    let fin = build(reply, &[src, dep]).await;
    assert_eq!(fin.id, 42);
    assert_eq!(fin.exit_code, Some(0));
    assert_eq!(fin.alarm, None);
    assert_eq!(fin.log.bytes, 23);
    let g = got.lock().unwrap();
    assert_eq!(g.bytes, b"remote log line\npartial");
    assert!(g.eof);
    // Only `@nix` lines are forwarded after acceptance (Nix 2.8 drops the others).
    assert_eq!(
        g.lines,
        [r#"@nix {"action":"msg","level":0,"msg":"remote says hi"}"#]
    );
    // The hook read the inputs and missing outputs, then EOF (it checks).
    let sent = hook.stdin();
    let mut r = Reader::new(&sent);
    r.read_settings().unwrap();
    r.read_try().unwrap();
    let inputs: Vec<String> = r.read_string_set().unwrap().into_iter().collect();
    assert_eq!(
        inputs,
        [format!("/nix/store/{dep}"), format!("/nix/store/{src}")]
    );
    let outs: Vec<String> = r.read_string_set().unwrap().into_iter().collect();
    assert_eq!(outs, ["dev", "out"]);
    assert!(r.rest().is_empty());
}

#[actix::test]
async fn accepted_job_fails() {
    let hook = Hook::new(&[("HOOK_REPLIES", "accept:m"), ("HOOK_BUILD", "fail")]);
    let got = Arc::new(Mutex::new(Collected::default()));
    let (p, _) = pool(Some(hook.program()), got, None);
    let fin = build(ask(&p, "a").await, &[]).await;
    assert_eq!(fin.exit_code, Some(1));
    assert_eq!(fin.alarm, None);
}

#[actix::test]
async fn hanging_job_is_killed_by_an_alarm() {
    let hook = Hook::new(&[("HOOK_REPLIES", "accept:m"), ("HOOK_BUILD", "hang")]);
    let got = Arc::new(Mutex::new(Collected::default()));
    let (p, _) = pool(
        Some(hook.program()),
        got.clone(),
        Some(Duration::from_millis(300)),
    );
    let start = std::time::Instant::now();
    let fin = build(ask(&p, "a").await, &[]).await;
    assert_eq!(fin.exit_code, None, "killed by a signal");
    assert_eq!(
        fin.alarm,
        Some(LogAlarm::Timeout(Duration::from_millis(300)))
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(got.lock().unwrap().bytes, b"remote log line\npartial");
}

#[actix::test]
async fn hook_that_dies_without_answering() {
    let hook = Hook::new(&[("HOOK_REPLIES", "die")]);
    let (p, _) = pool(Some(hook.program()), Default::default(), None);
    assert_eq!(
        describe(&ask(&p, "a").await),
        "error unexpected EOF reading a line\n(use '--show-trace' to show detailed location information)"
    );
    // A later request gets a new process.
    assert_eq!(
        describe(&ask(&p, "b").await),
        "error unexpected EOF reading a line\n(use '--show-trace' to show detailed location information)"
    );
    assert_eq!(hook.processes().len(), 2);
}

#[actix::test]
async fn broken_pipe_declines_and_restarts() {
    let hook = Hook::new(&[("HOOK_REPLIES", "decline-close,decline")]);
    let stderr_got = Arc::new(Mutex::new(Collected::default()));
    let stderr = FakeCollector {
        got: stderr_got.clone(),
    }
    .start();
    let config = HookPoolConfig {
        build_hook: Some(hook.program()),
        verbosity: 3,
        preamble: Arc::new(encode_settings(Vec::<(String, String)>::new())),
        store_dir: store_dir(),
        start_log_collector: collector(Default::default(), None),
        stderr: Some(stderr.recipient()),
    };
    let p = HookPool::new(config).start();
    assert_eq!(describe(&ask(&p, "a").await), "decline");
    // Wait until the hook has closed its request pipe.
    for _ in 0..200 {
        if hook.dir.path().join("closed").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(describe(&ask(&p, "b").await), "decline");
    wait_for_lines(&stderr_got, 2).await;
    let lines = stderr_got.lock().unwrap().lines.clone();
    assert!(
        lines.contains(&"build hook died unexpectedly: dying words".to_owned()),
        "{lines:?}"
    );
    // The dead process is replaced by a new one.
    assert_eq!(describe(&ask(&p, "c").await), "decline");
    assert_eq!(hook.processes().len(), 2);
}

#[actix::test]
async fn bad_replies_are_errors() {
    let hook = Hook::new(&[("HOOK_REPLIES", "garbage:# nonsense")]);
    let (p, _) = pool(Some(hook.program()), Default::default(), None);
    assert_eq!(
        describe(&ask(&p, "a").await),
        "error bad hook reply 'nonsense'"
    );
    let hook = Hook::new(&[("HOOK_REPLIES", "accept:m"), ("HOOK_BUILD", "noline")]);
    let (p, _) = pool(Some(hook.program()), Default::default(), None);
    assert_eq!(
        describe(&ask(&p, "a").await),
        "error unexpected EOF reading a line\n(use '--show-trace' to show detailed location information)"
    );
}

/// Interop: the pool, configured from a Nix test root's settings, sends a hook the
/// same bytes (preamble and `try`) and argv as `nix-store --realise` does.
#[actix::test]
async fn pool_sends_what_nix_sends() {
    require_nix!();
    let rec_nix = tempfile::tempdir().unwrap();
    let root = crate::nix_env::TestRoot::with_conf(&format!(
        "build-hook = {}\nmax-jobs = 2\n",
        recorder().display()
    ));
    let f = root.path().join("e.nix");
    std::fs::write(
        &f,
        r#"derivation { name = "hook-feat"; system = builtins.currentSystem; builder = "/bin/sh";
             args = ["-c" "echo hi > $out"]; requiredSystemFeatures = ["kvm" "big-parallel"]; }"#,
    )
    .unwrap();
    let drv = root.instantiate(&f, None).remove(0);
    let out = root
        .cmd("nix-store")
        .args(["--realise", &drv])
        .env("HOOK_DIR", rec_nix.path())
        .env("HOOK_REPLIES", "decline")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nix_sent = std::fs::read(rec_nix.path().join("stdin.bin")).unwrap();

    let mut env: drover::config::Env = std::env::vars().collect();
    for (k, v) in root.env() {
        env.insert(k.to_owned(), v);
    }
    let settings = drover::config::Settings::load(&env, &[]).unwrap();
    // Our wrapper script sets HOOK_DIR and replaces argv[0]; it runs the recorder,
    // which Nix ran directly, with the same arguments.
    let hook = Hook::new(&[("HOOK_REPLIES", "decline")]);
    let mut config =
        HookPoolConfig::from_settings(&settings, &env, 3, collector(Default::default(), None));
    assert_eq!(config.build_hook.as_deref(), Some(recorder().as_path()));
    config.build_hook = Some(hook.program());
    let p = HookPool::new(config).start();
    let reply = p
        .send(HookTry {
            am_willing: true,
            system: drover::config::native_system(),
            drv_path: settings.store_dir().parse(&drv).unwrap(),
            required_features: ["kvm".to_owned(), "big-parallel".to_owned()].into(),
        })
        .await
        .unwrap();
    assert_eq!(describe(&reply), "decline");
    assert_eq!(hook.stdin(), nix_sent);
    let argv = |d: &Path| {
        std::fs::read_to_string(d.join("argv"))
            .unwrap()
            .split_once(' ')
            .unwrap()
            .1
            .to_owned()
    };
    assert_eq!(argv(hook.dir.path()), argv(rec_nix.path()));
}

// ---------------------------------------------------------------------------------------
// Cancellation: Nix 2.8 kills the hook's process group when it drops a goal whose
// build runs through the hook (keep-going off and another goal failed).
// ---------------------------------------------------------------------------------------

/// `tests/data/hooks/sleeping.py` accepting `.drv` paths containing `accept`; its
/// child sleeps 30 s (in a session of its own with `escape`).
fn matching_hook(accept: &str, escape: bool) -> Hook {
    let dir = tempfile::tempdir().unwrap();
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/sleeping.py");
    let script = format!(
        "#!/bin/sh\nexport HOOK_DIR='{}' HOOK_ACCEPT='{accept}' HOOK_SLEEP=30{}\nexec python3 '{}'\n",
        dir.path().display(),
        if escape { " HOOK_ESCAPE=1" } else { "" },
        py.display()
    );
    Hook::with_script(dir, &script)
}

/// The pids the matching hook recorded (hook, child), once it did (at most 10 s).
async fn recorded_pids(hook: &Hook) -> Vec<i32> {
    let path = hook.dir.path().join("pids");
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(&path) {
            return s.split_whitespace().map(|p| p.parse().unwrap()).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the hook did not start building");
}

/// Whether a process is gone: no such process, or a zombie nobody reaped yet.
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S …`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (at most 5 s) until every process in `pids` is gone.
async fn wait_gone(pids: &[i32]) -> bool {
    for _ in 0..100 {
        if pids.iter().all(|p| is_gone(*p)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Kills what a failed test left behind.
struct KillOnDrop(Vec<i32>);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            // SAFETY: plain kill(2) on a pid this test's hook recorded.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
    }
}

/// Accepts with the hook, starts the build as id 42 and cancels it through the
/// pool once the hook is building; returns the HookFinished, how long the
/// cancellation took, and the hook's recorded pids.
async fn build_and_cancel(
    hook: &Hook,
    got: Arc<Mutex<Collected>>,
) -> (HookFinished, Duration, Vec<i32>) {
    let (p, _) = pool(Some(hook.program()), got, None);
    let HookReply::Accept { job, .. } = ask(&p, "remote").await else {
        panic!("expected accept");
    };
    let slot = Arc::new(Mutex::new(None));
    let fin = Finished(slot.clone()).start();
    job.send(HookBuild {
        id: 42,
        inputs: Default::default(),
        missing_outputs: ["out".to_owned()].into(),
        log: log_config(),
        reply_to: fin.recipient(),
    })
    .await
    .unwrap();
    let pids = recorded_pids(hook).await;
    let _guard = KillOnDrop(pids.clone());
    // Another build's cancellation is not this job's.
    p.send(CancelHookBuild { id: 7 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(slot.lock().unwrap().is_none(), "cancelled the wrong build");
    let start = std::time::Instant::now();
    p.send(CancelHookBuild { id: 42 }).await.unwrap();
    for _ in 0..400 {
        if let Some(f) = slot.lock().unwrap().take() {
            return (f, start.elapsed(), pids);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no HookFinished after the cancellation");
}

#[actix::test]
async fn cancelled_job_kills_the_hook_and_answers() {
    let hook = matching_hook("-remote.drv", false);
    let got = Arc::new(Mutex::new(Collected::default()));
    let (fin, took, pids) = build_and_cancel(&hook, got.clone()).await;
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(fin.id, 42);
    assert_eq!(fin.exit_code, None, "killed");
    assert_eq!(fin.alarm, None);
    // The log was closed with what the hook wrote.
    {
        let g = got.lock().unwrap();
        assert!(g.eof);
        assert_eq!(g.bytes, b"remote build started\n");
    }
    // The whole process group is gone: the hook and its sleeping child.
    assert!(wait_gone(&pids).await, "still running: {pids:?}");
}

#[actix::test]
async fn cancelled_job_does_not_wait_for_an_escaped_process() {
    // The child left the hook's process group and keeps the log pipe open: the job
    // must still answer at once (the escaped process is the hook's business).
    let hook = matching_hook("-remote.drv", true);
    let got = Arc::new(Mutex::new(Collected::default()));
    let (fin, took, pids) = build_and_cancel(&hook, got.clone()).await;
    let _guard = KillOnDrop(pids.clone());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(fin.exit_code, None);
    assert!(got.lock().unwrap().eof);
    assert!(wait_gone(&pids[..1]).await, "the hook itself is killed");
}

/// The Worker with the real hook pool and a fake local builder: the hook builds
/// `remote` (30 s) while the local build of `bad` fails; without keep-going the run
/// ends at once, as Nix 2.8's, and the hook's processes are killed.
#[actix::test]
async fn a_failing_local_build_cancels_the_running_hook_build() {
    use drover::build_result::BuildStatus;
    use drover_actors::testing::{FakeBuilder, FakeOutcome, TestStore};
    use drover_actors::{Realise, Worker, WorkerConfig, WorkerSettings};

    let dir = tempfile::tempdir().unwrap();
    let ts = TestStore::open(dir.path());
    let remote = ts.add_drv("remote", &["out"], &[], &[]);
    // `bad` waits for `pre`, so the hook build is running when `bad` fails.
    let pre = ts.add_drv("pre", &["out"], &[], &[]);
    let bad = ts.add_drv("bad", &["out"], &[&pre], &[]);
    let hook = matching_hook("-remote.drv", false);
    let got = Arc::new(Mutex::new(Collected::default()));
    let config = HookPoolConfig {
        build_hook: Some(hook.program()),
        verbosity: 3,
        preamble: Arc::new(encode_settings([("max-jobs", "2")])),
        store_dir: ts.store.store_dir().clone(),
        start_log_collector: collector(got.clone(), None),
        stderr: None,
    };
    let pool = HookPool::new(config).start();
    let mut fb = FakeBuilder::new(ts.store.clone());
    fb.script.insert(
        "bad".into(),
        FakeOutcome::Fail(
            BuildStatus::PermanentFailure,
            "builder for 'bad' failed with exit code 1".into(),
        ),
    );
    // Give the hook time to start building (and record its pids) before `bad`
    // fails: `pre` and `bad` take 1 s each. (The hook accepts `remote` before `pre`
    // is even offered: the pool answers one request at a time.)
    fb.delay = Duration::from_millis(1000);
    let fb = fb.start();
    let mut settings = WorkerSettings::from_settings(&ts.settings);
    settings.max_jobs = 2;
    let w = Worker::new(WorkerConfig {
        store: ts.store.clone(),
        local_builder: fb.clone().recipient(),
        cancel_local_build: fb.recipient(),
        hook: Some(pool.clone().recipient()),
        cancel_hook_build: Some(pool.recipient()),
        substituters: vec![],
        settings,
        progress: None,
    })
    .start();
    let d = |p: &StorePath| drover::derived_path::DerivedPath::Built {
        drv_path: p.clone(),
        outputs: drover::derived_path::OutputsSpec::All,
    };
    let start = std::time::Instant::now();
    let outcome = w
        .send(Realise {
            requests: vec![d(&remote), d(&bad)],
            mode: drover_actors::messages::BuildMode::Normal,
        })
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let pids = recorded_pids(&hook).await;
    let _guard = KillOnDrop(pids.clone());
    // Nix 2.8: exit 100, the builder's error, then both requests named.
    assert_eq!(outcome.exit_status, 100, "{:?}", outcome.errors);
    assert_eq!(outcome.errors.len(), 2, "{:?}", outcome.errors);
    assert_eq!(
        outcome.errors[0],
        "builder for 'bad' failed with exit code 1"
    );
    assert!(
        outcome.errors[1].starts_with("build of '"),
        "{:?}",
        outcome.errors
    );
    assert!(
        wait_gone(&pids).await,
        "the hook is still running: {pids:?}"
    );
    // The job closed the log.
    for _ in 0..100 {
        if got.lock().unwrap().eof {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(got.lock().unwrap().eof);
}

/// A hook that answers `# decline` at once and keeps a child in its process group;
/// it records its pid and the child's in `pids`.
fn declining_hook_with_child() -> Hook {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "#!/bin/sh\nsleep 300 &\necho $$ $! > '{}/pids'\necho '# decline' >&2\nwait\n",
        dir.path().display()
    );
    Hook::with_script(dir, &script)
}

fn both_pids(hook: &Hook) -> Vec<i32> {
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(hook.dir.path().join("pids")) {
            let pids: Vec<i32> = s
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.len() == 2 {
                return pids;
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the hook recorded no pids");
}

/// The idle hook the pool keeps for the next request dies with the pool's actor
/// system: the hook and its child (its process group), as Nix kills its hook when
/// the run ends.
#[test]
fn idle_hook_dies_with_the_system() {
    let hook = declining_hook_with_child();
    let program = hook.program();
    actix::System::new().block_on(async move {
        let (p, _) = pool(Some(program), Default::default(), None);
        assert_eq!(describe(&ask(&p, "a").await), "decline");
    });
    let pids = both_pids(&hook);
    let _guard = KillOnDrop(pids.clone());
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        pids.iter().all(|p| is_gone(*p))
    });
    assert!(gone, "still running after the system ended: {pids:?}");
}

/// Also when only the pool goes away (its last address dropped) while the system
/// runs on.
#[actix::test]
async fn idle_hook_dies_with_a_dropped_pool() {
    let hook = declining_hook_with_child();
    let (p, _) = pool(Some(hook.program()), Default::default(), None);
    assert_eq!(describe(&ask(&p, "a").await), "decline");
    let pids = both_pids(&hook);
    let _guard = KillOnDrop(pids.clone());
    assert!(!pids.iter().any(|p| is_gone(*p)), "idle, kept for reuse");
    drop(p);
    assert!(wait_gone(&pids).await, "still running: {pids:?}");
}

/// A hook that closes its stdin and exits before reading anything: whether drover's
/// write of the first request meets a broken pipe or not, the answer is Nix's
/// `unexpected EOF reading a line` (Nix 2.8 writes before such a hook is gone), not
/// a decline and a local build.
#[actix::test]
async fn hook_exiting_at_once_is_unexpected_eof() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::with_script(
        dir,
        "#!/bin/sh\nexec 0<&-\necho 'gone at once' >&2\nexit 0\n",
    );
    for _ in 0..5 {
        let (p, stderr) = pool(Some(hook.program()), Default::default(), None);
        // Let the hook exit first, so the write meets a closed pipe.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            describe(&ask(&p, "a").await),
            "error unexpected EOF reading a line\n(use '--show-trace' to show detailed location information)"
        );
        wait_for_lines(&stderr, 1).await;
        assert_eq!(stderr.lock().unwrap().lines, ["gone at once"]);
    }
}

/// A running hook build whose actor system ends (the CLI returning from a
/// cancelled run, or a library user dropping it): the job's future is dropped and
/// the hook's whole process group is killed, with nothing waited for.
#[test]
fn running_job_dies_with_the_system() {
    let hook = matching_hook("-remote.drv", false);
    let h = &hook;
    let pids = actix::System::new().block_on(async move {
        let (p, _) = pool(Some(h.program()), Default::default(), None);
        let HookReply::Accept { job, .. } = ask(&p, "remote").await else {
            panic!("expected accept");
        };
        let fin = Finished(Arc::new(Mutex::new(None))).start();
        job.send(HookBuild {
            id: 1,
            inputs: Default::default(),
            missing_outputs: ["out".to_owned()].into(),
            log: log_config(),
            reply_to: fin.recipient(),
        })
        .await
        .unwrap();
        recorded_pids(h).await
    });
    let _guard = KillOnDrop(pids.clone());
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        pids.iter().all(|p| is_gone(*p))
    });
    assert!(gone, "still running after the system ended: {pids:?}");
}

/// A hook that never answers a `try`: when the system ends with the request in
/// flight, the hook and its child are killed.
#[test]
fn hook_asked_in_flight_dies_with_the_system() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "#!/bin/sh\nsleep 300 &\necho $$ $! > '{}/pids'\nwait\n",
        dir.path().display()
    );
    let hook = Hook::with_script(dir, &script);
    let program = hook.program();
    actix::System::new().block_on(async move {
        let (p, _) = pool(Some(program), Default::default(), None);
        // The reply never comes: give up on it after a while.
        let asked = tokio::time::timeout(Duration::from_secs(1), ask(&p, "a")).await;
        assert!(asked.is_err(), "the hook answered");
    });
    let pids = both_pids(&hook);
    let _guard = KillOnDrop(pids.clone());
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        pids.iter().all(|p| is_gone(*p))
    });
    assert!(gone, "still running after the system ended: {pids:?}");
}

/// An accepted job records its build in drover's build history: the wall time
/// from the inputs sent to the hook's end, on the machine the hook named.
#[actix::test]
async fn an_accepted_job_records_its_build_in_the_history() {
    use drover::build_history::BuildHistory;
    use drover_actors::local_builder::history::HistoryLog;
    let dir = tempfile::tempdir().unwrap();
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/sleeping.py");
    let hook = Hook::with_script(
        tempfile::tempdir().unwrap(),
        &format!(
            "#!/bin/sh\nexport HOOK_DIR='{}' HOOK_ACCEPT='-remote.drv' HOOK_SLEEP=0.3\nexec python3 '{}'\n",
            dir.path().display(),
            py.display()
        ),
    );
    let got = Arc::new(Mutex::new(Collected::default()));
    let config = HookPoolConfig {
        build_hook: Some(hook.program()),
        verbosity: 3,
        preamble: Arc::new(encode_settings([("max-jobs", "1")])),
        store_dir: store_dir(),
        start_log_collector: collector(got, None),
        stderr: None,
    };
    let state = dir.path().join("state");
    let p = HookPool::new(config)
        .with_history(Arc::new(HistoryLog::new(&state)))
        .start();
    let HookReply::Accept { job, machine } = ask(&p, "remote").await else {
        panic!("expected accept");
    };
    assert_eq!(machine, "remote-machine");
    let slot = Arc::new(Mutex::new(None));
    let fin = Finished(slot.clone()).start();
    job.send(HookBuild {
        id: 1,
        inputs: Default::default(),
        missing_outputs: ["out".to_owned()].into(),
        log: log_config(),
        reply_to: fin.recipient(),
    })
    .await
    .unwrap();
    let drv_path = store_dir().print(&drv("remote"));
    let mut rows = Vec::new();
    for _ in 0..400 {
        if slot.lock().unwrap().is_some() {
            rows = BuildHistory::open(&state)
                .unwrap()
                .builds_of(&drv_path)
                .unwrap();
            if !rows.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (r.pname.as_str(), r.machine.as_str(), r.status.as_str()),
        ("remote", "remote-machine", "Built")
    );
    assert!(r.wall >= Duration::from_millis(300), "{r:?}");
    assert_eq!((r.cpu, r.peak_rss), (None, None));
}
