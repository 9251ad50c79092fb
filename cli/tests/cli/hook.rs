//! `drover realise` against `nix-store --realise` (Nix 2.8) with a scripted build
//! hook, each tool in its own fresh root, comparing exit codes and `error:` lines
//! (root prefix and store hashes normalised):
//!
//! * a build running through the hook is cancelled when a local build fails without
//!   keep-going: both tools return at once (the hook's build would take 30 s), exit
//!   100, name both requests in `build of … failed`, and kill the hook's processes;
//! * `bad hook reply '…'` and `some outputs are unexpectedly invalid` end the whole
//!   run (exit 1, that error only), even with `--keep-going`, and kill the local
//!   build still running.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::drover;
use crate::nix_env::TestRoot;

/// `@SLEEP@` is replaced by the path of `sleep` (builders get no PATH).
const EXPR: &str = r#"
let
  mk = name: cmd: extra: derivation ({
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" cmd];
  } // extra);
  q = mk "q" "echo q > $out" {};
in {
  # Built locally; long enough that a run which waits for it is noticed.
  slow = mk "slow" "echo started; @SLEEP@ 20; echo s > $out" {};
  # Offered to the hook only after `q` is built, so `slow` is running by then.
  late = mk "late" "echo late > $out" { dep = q; };
  remote = mk "remote" "echo r > $out" {};
  bad = mk "bad" "echo failing; exit 1" { dep = q; };
}
"#;

fn sleep_program() -> &'static str {
    ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("no sleep program")
}

/// Writes a wrapper under the root that runs `tests/data/hooks/sleeping.py` (a hook
/// whose remote builds sleep; see its docstring) with `vars`; returns the wrapper.
fn write_hook(root: &TestRoot, vars: &[(&str, &str)]) -> PathBuf {
    let dir = root.path().join("hook");
    std::fs::create_dir_all(&dir).unwrap();
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/sleeping.py");
    let mut script = format!("#!/bin/sh\nexport HOOK_DIR='{}'\n", dir.display());
    for (k, v) in vars {
        script.push_str(&format!("export {k}='{v}'\n"));
    }
    script.push_str(&format!("exec python3 '{}'\n", py.display()));
    let wrapper = dir.join("hook");
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wrapper
}

/// stderr's `error:` lines, with the root's path replaced by `@ROOT@` and store path
/// hashes by `HASH` (each tool has its own root), and the names in `build of …
/// failed` sorted again.
fn errors(root: &TestRoot, stderr: &str) -> Vec<String> {
    let marker = "@ROOT@/store/";
    stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(|l| {
            let l = l.replace(root.path().to_str().unwrap(), "@ROOT@");
            let mut out = String::new();
            let mut rest = l.as_str();
            while let Some(i) = rest.find(marker) {
                out.push_str(&rest[..i + marker.len()]);
                rest = &rest[i + marker.len()..];
                if rest.len() > 32 && rest.as_bytes()[32] == b'-' {
                    out.push_str("HASH");
                    rest = &rest[32..];
                }
            }
            out.push_str(rest);
            // The names are sorted by path, i.e. by hash: sort what is left of them.
            match out
                .strip_prefix("error: build of ")
                .and_then(|l| l.strip_suffix(" failed"))
            {
                Some(names) => {
                    let mut n: Vec<&str> = names.split(", ").collect();
                    n.sort_unstable();
                    format!("error: build of {} failed", n.join(", "))
                }
                None => out,
            }
        })
        .collect()
}

/// Whether a process is gone: no such process, or a zombie nobody reaped yet.
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// What one tool did.
#[derive(Debug)]
struct Outcome {
    code: i32,
    errors: Vec<String>,
    took: Duration,
    /// The hook build's processes still running 5 s after the tool returned.
    left_running: Vec<i32>,
}

/// Realises `attrs` with `flags` and the hook configured by `vars`, with Nix and
/// then drover, each in a fresh root.
fn both(attrs: &[&str], flags: &[&str], vars: &[(&str, &str)]) -> [Outcome; 2] {
    [false, true].map(|use_drover| {
        let root = TestRoot::new();
        let file = root.path().join("hook.nix");
        std::fs::write(&file, EXPR.replace("@SLEEP@", sleep_program())).unwrap();
        let mut drvs = Vec::new();
        for a in attrs {
            drvs.extend(root.instantiate(&file, Some(a)));
        }
        let hook = write_hook(&root, vars);
        let mut cmd = if use_drover {
            let mut c = drover(&root);
            c.arg("realise");
            c
        } else {
            let mut c = root.cmd("nix-store");
            c.arg("--realise");
            c
        };
        cmd.args(["--option", "build-hook", hook.to_str().unwrap()])
            .args(flags)
            .args(&drvs);
        let start = Instant::now();
        let out = cmd.output().unwrap();
        let took = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let pids: Vec<i32> = std::fs::read_to_string(root.path().join("hook/pids"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        let mut left_running = pids.clone();
        for _ in 0..100 {
            left_running.retain(|p| !is_gone(*p));
            if left_running.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in &left_running {
            // SAFETY: plain kill(2) of a process this test's hook started.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        Outcome {
            code: out.status.code().unwrap_or(-1),
            errors: errors(&root, &stderr),
            took,
            left_running,
        }
    })
}

#[track_caller]
fn assert_same(attrs: &[&str], flags: &[&str], vars: &[(&str, &str)], code: i32, first: &str) {
    let [nix, drover] = both(attrs, flags, vars);
    assert_eq!(nix.code, code, "nix: {nix:?}");
    assert_eq!(
        nix.errors.first().map(String::as_str),
        Some(first),
        "nix: {nix:?}"
    );
    assert_eq!(drover.code, nix.code, "drover: {drover:?}\nnix: {nix:?}");
    assert_eq!(
        drover.errors, nix.errors,
        "drover: {drover:?}\nnix: {nix:?}"
    );
    for o in [&nix, &drover] {
        // The hook build sleeps 30 s and `slow` 20 s: neither is waited for.
        assert!(o.took < Duration::from_secs(15), "{o:?}");
        assert!(o.left_running.is_empty(), "{o:?}");
    }
}

#[test]
fn failing_local_build_cancels_the_hook_build() {
    require_nix!();
    assert_same(
        &["remote", "bad"],
        &["-j2"],
        &[("HOOK_ACCEPT", "-remote.drv")],
        100,
        "error: builder for '@ROOT@/store/HASH-bad.drv' failed with exit code 1",
    );
}

#[test]
fn bad_hook_reply_ends_the_run() {
    require_nix!();
    assert_same(
        &["slow", "late"],
        &["-j2", "--keep-going"],
        &[("HOOK_ACCEPT", "-late.drv"), ("HOOK_REPLY", "# nonsense")],
        1,
        "error: bad hook reply 'nonsense'",
    );
}

#[test]
fn unexpectedly_invalid_outputs_end_the_run() {
    require_nix!();
    assert_same(
        &["slow", "late"],
        &["-j2", "--keep-going"],
        &[("HOOK_ACCEPT", "-late.drv"), ("HOOK_BUILD", "noop")],
        1,
        "error: some outputs are unexpectedly invalid",
    );
}
