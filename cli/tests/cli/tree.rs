//! The live build tree on a terminal, checked on the screen of a `tmux` session of
//! a fixed size: with `-j1`, one slow build runs, the other waits for the build
//! slot, a third waits for the output lock a concurrent `nix-store --realise`
//! holds (with that process's pid), and their dependent waits for all three, as
//! a tree, above the totals; the builder output Nix echoes is on the screen above
//! the tree, and the tree is gone when the run ends. Off a terminal (a pipe),
//! `drover realise` prints exactly what `nix-store --realise` prints. After the
//! run, `drover report` prints the saved report of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::drover;
use crate::nix_env::TestRoot;

/// `@DIR@`: the builders' marks. Slow builders wait (at most two minutes) for
/// `@DIR@/go`, so that the screen holds still while it is read.
const EXPR: &str = r#"
let
  mk = name: cmd: deps: derivation {
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" cmd]; PATH = "/usr/bin:/bin";
  };
  slow = name: mk name ''
    echo ${name}-says-hello
    touch @DIR@/${name}-started
    i=0; while [ ! -e @DIR@/go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
    echo ${name} > $out
  '' [];
  slow-a = slow "slow-a";
  slow-b = slow "slow-b";
  locked = slow "locked";
  top = mk "top" "echo top-says-hello; echo top > $out" [slow-a slow-b locked];
  chain-1 = mk "chain-1" "echo one; echo 1 > $out" [];
  chain-2 = mk "chain-2" "echo two; echo 2 > $out" [chain-1];
  fails = mk "fails" "echo going wrong; exit 3" [];
  remote = mk "remote" "echo r > $out" [];
in { inherit top locked chain-2 fails remote; }
"#;

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A tmux server of its own (socket in the root) with one session; on drop the
/// slow builders are released and the server and everything in it are killed,
/// whatever happened.
struct Tmux {
    tmpdir: PathBuf,
    marks: PathBuf,
    nix: Option<Child>,
    /// A file of pids to kill at the end (a hook's processes).
    pids: Option<PathBuf>,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.env("TMUX_TMPDIR", &self.tmpdir).env_remove("TMUX").args([
            "-L",
            "drover-tree",
            "-f",
            "/dev/null",
        ]);
        c
    }

    /// Starts `script` in a new 100×30 session.
    fn start(&self, script: &Path) {
        let ok = self
            .cmd()
            .args(["new-session", "-d", "-s", "t", "-x", "100", "-y", "30"])
            .arg(format!("/bin/sh {}", quote(script.to_str().unwrap())))
            .status()
            .unwrap();
        assert!(ok.success(), "tmux new-session failed");
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-J", "-t", "t"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen (wrapped lines joined) once `ready` holds of it (panics after two minutes).
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.screen();
            if ready(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::fs::write(self.marks.join("go"), "");
        if let Some(mut nix) = self.nix.take() {
            let _ = nix.wait();
        }
        let _ = self.cmd().arg("kill-server").status();
        if let Some(p) = &self.pids {
            for pid in std::fs::read_to_string(p)
                .unwrap_or_default()
                .split_whitespace()
            {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) of a process this test's hook started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

fn wait_for_file(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A script that runs `drover args…` with the root's environment, then says its
/// exit status and stays (so that the screen can be read after the run).
fn script(root: &TestRoot, env: &[(&str, String)], args: &[&str]) -> PathBuf {
    let path = root.path().join("run.sh");
    let mut sh = String::new();
    for (k, v) in root
        .env()
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .chain(env.iter().cloned())
    {
        sh.push_str(&format!("export {k}={}\n", quote(&v)));
    }
    let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
    sh.push_str(&format!(
        "{} {}\necho EXIT=$?\nsleep 600\n",
        quote(env!("CARGO_BIN_EXE_drover")),
        args.join(" ")
    ));
    std::fs::write(&path, sh).unwrap();
    path
}

fn setup(root: &TestRoot) -> (PathBuf, PathBuf) {
    let marks = root.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let file = root.path().join("tree.nix");
    std::fs::write(&file, EXPR.replace("@DIR@", marks.to_str().unwrap())).unwrap();
    (file, marks)
}

#[test]
fn the_tree_shows_running_and_waiting_builds_with_their_reasons() {
    if !crate::nix_env::nix_available("the_tree_shows_running_and_waiting_builds") {
        return;
    }
    if !tmux_available() {
        eprintln!("SKIPPED the_tree_shows_running_and_waiting_builds: no tmux");
        return;
    }
    let root = TestRoot::new();
    let (file, marks) = setup(&root);
    let top = root.instantiate(&file, Some("top")).remove(0);
    let locked = root.instantiate(&file, Some("locked")).remove(0);
    let mut tmux = Tmux {
        tmpdir: root.tmp_dir(),
        marks: marks.clone(),
        nix: None,
        pids: None,
    };
    // Nix builds `locked` meanwhile, holding its output lock.
    let nix = root
        .cmd("nix-store")
        .args(["--realise", &locked])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let nix_pid = nix.id();
    tmux.nix = Some(nix);
    wait_for_file(&marks.join("locked-started"));

    let run = script(&root, &[], &["realise", "-j1", &top]);
    tmux.start(&run);

    let screen = tmux.wait_for("a build running and one waiting for the slot", |s| {
        // Everything at once: a whole tree drawn after the builder's line.
        s.contains("for a build slot")
            && s.contains("says-hello")
            && s.contains("for a lock held by pid")
            && s.contains(" locally")
            && s.contains("[0/4 built, 1 running")
    });
    eprintln!("the screen while building:\n{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    let (running, other) = if screen.contains("slow-a-says-hello") {
        ("slow-a", "slow-b")
    } else {
        ("slow-b", "slow-a")
    };
    let has = |pred: &dyn Fn(&str) -> bool, what: &str| {
        assert!(
            lines.iter().any(|l| pred(l)),
            "no {what} on the screen:\n{screen}"
        );
    };
    // The builder output Nix echoes, above the tree.
    has(&|l| l == format!("{running}-says-hello"), "builder output");
    has(
        &|l| l.starts_with("building '") && l.contains(&format!("-{running}.drv'...")),
        "`building` line",
    );
    // The dependent waits for its three inputs, drawn under it.
    has(
        &|l| {
            l.starts_with("waiting ")
                && l.contains(" top for ")
                && ["locked", "slow-a", "slow-b"].iter().all(|n| l.contains(n))
        },
        "waiting top",
    );
    has(
        &|l| l.contains("─ building ") && l.contains(&format!(" {running} locally")),
        "running build",
    );
    has(
        &|l| l.contains("─ waiting ") && l.ends_with(&format!(" {other} for a build slot")),
        "build waiting for the slot",
    );
    has(
        &|l| {
            l.contains("─ waiting ")
                && l.ends_with(&format!(" locked for a lock held by pid {nix_pid}"))
        },
        "build waiting for the lock nix-store holds",
    );
    has(&|l| l.starts_with("[0/4 built, 1 running, "), "totals");
    // The tree's lines (wrapped lines are joined) fit the 100 columns.
    let tree_line = |l: &str| {
        ["building ", "waiting ", "├", "└", "["]
            .iter()
            .any(|p| l.starts_with(p))
            && !l.starts_with("building '")
    };
    for l in lines.iter().filter(|l| tree_line(l)) {
        assert!(l.chars().count() < 100, "wider than the terminal: {l:?}");
    }
    // The tree is below everything else.
    let last = lines.iter().rposition(|l| !l.trim().is_empty()).unwrap();
    assert!(lines[last].starts_with("[0/4 built"), "{screen}");

    std::fs::write(marks.join("go"), "").unwrap();
    let screen = tmux.wait_for("the end of the run", |s| s.contains("EXIT="));
    eprintln!("the screen at the end:\n{screen}");
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("top-says-hello"), "{screen}");
    assert!(screen.contains(&format!("{other}-says-hello")), "{screen}");
    // What the tree drew is gone; only Nix's lines are left.
    for gone in ["for a build slot", "locally", " built, "] {
        assert!(
            !screen.contains(gone),
            "{gone:?} left on the screen:\n{screen}"
        );
    }
    drop(tmux);

    // The run's report, saved for `drover report`.
    let out = drover(&root).arg("report").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("run: "), "{text}");
    assert!(text.contains(" 3 built, 0 failed"), "{text}");
    assert!(text.contains("\n  top built in "), "{text}");
    // slow-b waits for the slot; the scheduler may hold a grant back briefly too.
    assert!(text.contains(" for a build slot ("), "{text}");
    assert!(text.contains("for locks (1 waits)"), "{text}");
    assert!(text.contains(&format!("held by pid {nix_pid}")), "{text}");
    assert!(
        text.contains("cache hits: 1 derivations already valid"),
        "{text}"
    );
    let out = drover(&root).args(["report", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let path: Vec<&str> = json["critical_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(path.last(), Some(&"top"), "{json}");
    assert_eq!(path.len(), 2, "{json}");
}

#[test]
fn off_a_terminal_the_lines_are_those_of_nix_store() {
    if !crate::nix_env::nix_available("off_a_terminal_the_lines_are_those_of_nix_store") {
        return;
    }
    // One root: Nix builds, the root is put back, drover builds.
    let root = TestRoot::new();
    let (file, marks) = setup(&root);
    std::fs::write(marks.join("go"), "").unwrap();
    let drv = root.instantiate(&file, Some("chain-2")).remove(0);
    let snap = crate::realise::snapshot(&root);
    let mut seen = Vec::new();
    for tool in ["nix-store", "drover"] {
        crate::realise::restore(&root, &snap);
        let mut cmd = if tool == "drover" {
            let mut c = drover(&root);
            c.arg("realise");
            c
        } else {
            let mut c = root.cmd("nix-store");
            c.arg("--realise");
            c
        };
        let out = cmd.args(["-j1", &drv]).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        seen.push((out.status.code(), text(&out.stdout), text(&out.stderr)));
    }
    assert_eq!(seen[0], seen[1]);
    assert!(seen[1].2.contains("\none\n"), "{:?}", seen[1].2);
    assert!(!seen[1].2.contains('\x1b'), "{:?}", seen[1].2);

    // `--report`: the same lines, then the report (stdout unchanged).
    crate::realise::restore(&root, &snap);
    let out = drover(&root)
        .args(["realise", "--report", "-j1", &drv])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), seen[0].1);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = stderr
        .strip_prefix(&seen[0].2)
        .unwrap_or_else(|| panic!("{stderr}"));
    let lines: Vec<&str> = report.lines().collect();
    assert!(lines[0].starts_with("run: "), "{report}");
    assert!(
        lines[0].contains(", 2 built, 0 failed, 0 copied"),
        "{report}"
    );
    assert!(lines[1].starts_with("critical path (2 steps, "), "{report}");
    assert!(lines[2].starts_with("  chain-1 built in "), "{report}");
    assert!(lines[3].starts_with("  chain-2 built in "), "{report}");
    // The scheduler predicts from the build history (here empty: its default).
    assert!(
        report.contains("\npredicted vs actual: ") && report.contains(" predicted at "),
        "{report}"
    );
    assert!(
        report.contains("\nwhere: this machine: 2 builds, "),
        "{report}"
    );
}

#[test]
fn a_failed_run_has_nix_stores_lines_then_its_report() {
    if !crate::nix_env::nix_available("a_failed_run_has_nix_stores_lines_then_its_report") {
        return;
    }
    let root = TestRoot::new();
    let (file, _marks) = setup(&root);
    let drv = root.instantiate(&file, Some("fails")).remove(0);
    let snap = crate::realise::snapshot(&root);
    let nix = root
        .cmd("nix-store")
        .args(["--realise", &drv])
        .output()
        .unwrap();
    crate::realise::restore(&root, &snap);
    // No report yet: a clear error.
    let out = drover(&root).arg("report").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: no run report in '") && err.contains("drover/last-run.json"),
        "{err}"
    );
    let out = drover(&root)
        .args(["realise", "--report", &drv])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), nix.status.code());
    assert_eq!(out.stdout, nix.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let nix_err = String::from_utf8_lossy(&nix.stderr).into_owned();
    let report = stderr
        .strip_prefix(&nix_err)
        .unwrap_or_else(|| panic!("nix:\n{nix_err}\ndrover:\n{stderr}"));
    assert!(report.starts_with("run: "), "{report}");
    assert!(report.contains(", 0 built, 1 failed, "), "{report}");
    assert!(report.contains("\n  fails failed in "), "{report}");
    assert!(report.contains(", PermanentFailure\n"), "{report}");
    // And saved.
    let out = drover(&root).arg("report").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), report);
}

/// A root with the `remote` derivation, the sleeping hook (with `env`) and a
/// tmux session running `drover realise` of it through the hook.
fn remote_run(test: &str, env: &[(&str, &str)]) -> Option<(TestRoot, Tmux)> {
    if !crate::nix_env::nix_available(test) {
        return None;
    }
    if !tmux_available() {
        eprintln!("SKIPPED {test}: no tmux");
        return None;
    }
    let root = TestRoot::new();
    let (file, marks) = setup(&root);
    let drv = root.instantiate(&file, Some("remote")).remove(0);
    let hook_dir = root.path().join("hook");
    std::fs::create_dir_all(&hook_dir).unwrap();
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/sleeping.py");
    let hook = hook_dir.join("hook");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\nexec python3 {}\n", quote(py.to_str().unwrap())),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tmux = Tmux {
        tmpdir: root.tmp_dir(),
        marks,
        nix: None,
        pids: Some(hook_dir.join("pids")),
    };
    let mut vars = vec![
        ("HOOK_DIR", hook_dir.to_str().unwrap().to_owned()),
        ("HOOK_ACCEPT", "-remote.drv".to_owned()),
        ("HOOK_SLEEP", "60".to_owned()),
    ];
    vars.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let run = script(
        &root,
        &vars,
        &[
            "realise",
            "--option",
            "build-hook",
            hook.to_str().unwrap(),
            &drv,
        ],
    );
    tmux.start(&run);
    Some((root, tmux))
}

#[test]
fn the_tree_shows_on_which_machine_a_build_runs() {
    let Some((_root, tmux)) = remote_run("the_tree_shows_on_which_machine_a_build_runs", &[])
    else {
        return;
    };
    let screen = tmux.wait_for("the remote build", |s| {
        s.contains(" remote on remote-machine")
            && s.contains("remote build started")
            && s.contains("[0/1 built, 1 running, ")
    });
    eprintln!("the screen while building remotely:\n{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("building ") && l.ends_with(" remote on remote-machine")),
        "{screen}"
    );
    // The hook's log line, echoed as Nix echoes it, and Nix's `building … on …` line.
    assert!(lines.contains(&"remote build started"), "{screen}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("building '")
                && l.ends_with("-remote.drv' on 'remote-machine'...")),
        "{screen}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[0/1 built, 1 running, ")),
        "{screen}"
    );
}

#[test]
fn the_tree_shows_a_build_waiting_for_a_machine() {
    let Some((_root, tmux)) = remote_run(
        "the_tree_shows_a_build_waiting_for_a_machine",
        &[("HOOK_REPLY", "# postpone")],
    ) else {
        return;
    };
    let screen = tmux.wait_for("the postponed build", |s| {
        s.contains(" remote for a machine") && s.contains("[0/1 built, ")
    });
    eprintln!("the screen while waiting for a machine:\n{screen}");
    let lines: Vec<&str> = screen.lines().collect();
    // Nix's message, then the tree.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("waiting for a machine to build '")
                && l.ends_with("-remote.drv'...")),
        "{screen}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("waiting ") && l.ends_with(" remote for a machine")),
        "{screen}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("[0/1 built, ")),
        "{screen}"
    );
}
