//! SIGINT and SIGTERM during a local build and a hook build, with `nix-store
//! --realise` and with `drover realise`, each in a fresh root: both exit 1 with
//! `error: interrupted by the user`, kill the builder's and the hook's processes,
//! release their temporary roots (no `temproots/<pid>` left) and leave the same
//! store entries behind (the `.drv`s and the outputs' lock files, no output).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::drover;
use crate::nix_env::TestRoot;

/// `@DIR@`: where the builder records that it runs and its pid.
const EXPR: &str = r#"
let
  mk = name: cmd: extra: derivation ({
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" cmd];
    PATH = "/usr/bin:/bin";
  } // extra);
in {
  local = mk "local" "echo $$ > @DIR@/local-pid; echo started; exec sleep 60" {};
  remote = mk "remote" "echo r > $out" {};
}
"#;

fn write_hook(root: &TestRoot) -> PathBuf {
    let dir = root.path().join("hook");
    std::fs::create_dir_all(&dir).unwrap();
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/sleeping.py");
    let script = format!(
        "#!/bin/sh\nexport HOOK_DIR='{}'\nexport HOOK_ACCEPT='-remote.drv'\nexec python3 '{}'\n",
        dir.display(),
        py.display()
    );
    let wrapper = dir.join("hook");
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wrapper
}

fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn pids_in(p: &Path) -> Vec<i32> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[derive(Debug, PartialEq)]
struct Seen {
    code: Option<i32>,
    /// The `error:` lines.
    errors: Vec<String>,
    /// Store entries, hashes left out.
    store: Vec<String>,
    temproots: Vec<String>,
}

fn interrupted(use_drover: bool, signal: i32) -> Seen {
    let root = TestRoot::new();
    let file = root.path().join("int.nix");
    let dir = root.path().join("marks");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(&file, EXPR.replace("@DIR@", dir.to_str().unwrap())).unwrap();
    let mut drvs = root.instantiate(&file, Some("local"));
    drvs.extend(root.instantiate(&file, Some("remote")));
    let hook = write_hook(&root);
    let mut cmd = if use_drover {
        let mut c = drover(&root);
        c.arg("realise");
        c
    } else {
        let mut c = root.cmd("nix-store");
        c.arg("--realise");
        c
    };
    let mut child = cmd
        .args(["--option", "build-hook", hook.to_str().unwrap(), "-j2"])
        .args(&drvs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // both builds running: the hook recorded its pids, the builder its own
    let start = Instant::now();
    let (hook_pids, local) = (root.path().join("hook/pids"), dir.join("local-pid"));
    while pids_in(&hook_pids).is_empty() || pids_in(&local).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the builds did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut pids = pids_in(&hook_pids);
    pids.extend(pids_in(&local));
    // SAFETY: kill(2) of the child we started.
    unsafe { libc::kill(child.id() as i32, signal) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("not stopped by signal {signal} (drover: {use_drover})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let mut left = pids.clone();
    for _ in 0..100 {
        left.retain(|p| !is_gone(*p));
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &left {
        // SAFETY: kill(2) of a process this test's builds started.
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "drover: {use_drover}: still running after signal {signal}: {left:?}"
    );
    let mut store: Vec<String> = std::fs::read_dir(&root.store_dir)
        .unwrap()
        .map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            match n.get(33..) {
                Some(rest) if n.as_bytes().get(32) == Some(&b'-') => rest.to_owned(),
                _ => n,
            }
        })
        .collect();
    store.sort();
    let temproots = std::fs::read_dir(root.state_dir.join("temproots"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Seen {
        code: out.status.code(),
        errors: String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("error:"))
            .map(str::to_owned)
            .collect(),
        store,
        temproots,
    }
}

#[test]
fn sigint_and_sigterm_stop_builds_and_hooks_as_nix_does() {
    require_nix!();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let nix = interrupted(false, signal);
        assert_eq!(nix.code, Some(1), "{nix:?}");
        assert_eq!(nix.errors, ["error: interrupted by the user"]);
        assert!(nix.temproots.is_empty(), "{nix:?}");
        let drover = interrupted(true, signal);
        assert_eq!(drover, nix, "signal {signal}");
    }
}
