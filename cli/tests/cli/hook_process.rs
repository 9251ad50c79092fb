//! `drover realise` against `nix-store --realise` (Nix 2.8) on how the hook process
//! is run: the verbosity flags (and what the default `build-remote` hook then
//! prints), a hook that exits without answering, a CA derivation under the default
//! hook, and no hook process left when the run ends. Each tool runs in its own fresh
//! root; stderr is compared whole, with the root's path and store hashes
//! normalised.

use std::path::PathBuf;
use std::time::Duration;

use crate::drover;
use crate::nix_env::TestRoot;

const EXPR: &str = r#"
{
  a = derivation {
    name = "a"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo hi; echo a > $out"];
  };
  # Colours, tabs, an OSC title and BEL in the builder's output.
  esc = derivation {
    name = "esc"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "printf 'x\\033[31mred\\033[0m\\ta\\tb\\033]0;t\\007\\n'; echo c > $out"];
  };
  ca = derivation {
    name = "ca"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo ca > $out"];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  };
}
"#;

/// What one tool did.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `text` with the root's path replaced by `@ROOT@`, store path hashes by `HASH`
/// and the pid of `killing process N` by `PID`.
fn normalise(root: &TestRoot, text: &str) -> String {
    let text = text.replace(root.path().to_str().unwrap(), "@ROOT@");
    let marker = "@ROOT@/store/";
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find(marker) {
        out.push_str(&rest[..i + marker.len()]);
        rest = &rest[i + marker.len()..];
        if rest.len() > 32 && rest.as_bytes()[32] == b'-' {
            out.push_str("HASH");
            rest = &rest[32..];
        }
    }
    out.push_str(rest);
    out.lines()
        .map(|l| match l.strip_prefix("killing process ") {
            Some(_) => "killing process PID".to_owned(),
            None => l.to_owned(),
        })
        .map(|l| l + "\n")
        .collect()
}

/// Realises attribute `attr` with `flags` in a fresh root (`setup` runs first,
/// given the root), by Nix or drover.
fn realise(
    use_drover: bool,
    attr: &str,
    flags: &[&str],
    setup: &dyn Fn(&TestRoot) -> Vec<String>,
) -> (Run, TestRoot) {
    let root = TestRoot::new();
    let file = root.path().join("hook-process.nix");
    std::fs::write(&file, EXPR).unwrap();
    let drvs = root.instantiate(&file, Some(attr));
    let extra = setup(&root);
    let mut cmd = if use_drover {
        let mut c = drover(&root);
        c.arg("realise");
        c
    } else {
        let mut c = root.cmd("nix-store");
        c.arg("--realise");
        c
    };
    cmd.args(&extra).args(flags).args(&drvs);
    let out = cmd.output().unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: normalise(&root, &String::from_utf8_lossy(&out.stdout)),
        stderr: normalise(&root, &String::from_utf8_lossy(&out.stderr)),
    };
    (run, root)
}

fn no_setup(_: &TestRoot) -> Vec<String> {
    Vec::new()
}

/// The lines from `starting build hook` to `killing process`, leaving out
/// drover's own diagnostics (`[DEBUG] …`, which other threads may log meanwhile).
fn hook_block(stderr: &str) -> Vec<&str> {
    let own = ["[ERROR] ", "[WARN] ", "[INFO] ", "[DEBUG] ", "[TRACE] "];
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !own.iter().any(|p| l.starts_with(p)))
        .collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("starting build hook"));
    let end = lines.iter().position(|l| l.starts_with("killing process"));
    match (start, end) {
        (Some(s), Some(e)) if s <= e => lines[s..=e].to_vec(),
        _ => Vec::new(),
    }
}

/// Nix 2.8, default `build-hook` (`build-remote`) and no machines file: the hook
/// declines permanently and the build runs locally. At the default verbosity, with
/// `-v` and with `--quiet` (which hides `lvlInfo` lines: the plan, `building …`;
/// three times: the `--add-root` warning too) stderr is the same for both tools.
#[test]
fn verbosity_flags_with_the_default_hook() {
    require_nix!();
    for flags in [
        &[][..],
        &["-v"],
        &["--verbose"],
        &["--quiet"],
        &["--quiet", "--quiet", "--quiet"],
    ] {
        let (nix, _) = realise(false, "a", flags, &no_setup);
        let (drv, _) = realise(true, "a", flags, &no_setup);
        assert_eq!(nix.code, 0, "{flags:?}: {nix:?}");
        assert_eq!(drv, nix, "{flags:?}");
    }
    let (nix, _) = realise(false, "a", &["--quiet"], &no_setup);
    assert!(!nix.stderr.contains("building"), "{nix:?}");
}

/// At debug verbosity (`-vvv`) the hook is told `6` and prints its debug lines, and
/// Nix its own about the hook: the same block of lines from both tools (the rest of
/// Nix's debug output is Nix's internals, which drover does not imitate).
#[test]
fn debug_verbosity_shows_the_hooks_lines() {
    require_nix!();
    let (nix, _) = realise(false, "a", &["-vvv"], &no_setup);
    let (drv, _) = realise(true, "a", &["-vvv"], &no_setup);
    let expected = [
        "starting build hook '/usr/libexec/nix/build-remote'",
        "cannot find machines file '@ROOT@/etc/machines'",
        "got 0 remote builders",
        "hook reply is 'decline-permanently'",
        "killing process PID",
    ];
    assert_eq!(hook_block(&nix.stderr), expected, "{}", nix.stderr);
    assert_eq!(hook_block(&drv.stderr), expected, "{}", drv.stderr);
    assert_eq!((drv.code, &drv.stdout), (nix.code, &nix.stdout));
}

fn write_script(root: &TestRoot, name: &str, body: &str) -> PathBuf {
    let p = root.path().join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p
}

/// A hook that exits without answering, after the request was written (it sleeps
/// a second first): Nix 2.8 fails the run with `unexpected EOF reading a line` and
/// its `--show-trace` hint, exit 1, and builds nothing; so does drover.
#[test]
fn hook_exiting_without_answering_fails_the_run() {
    require_nix!();
    let setup = |root: &TestRoot| {
        let hook = write_script(root, "hook", "#!/bin/sh\nsleep 1\nexit 0\n");
        vec![
            "--option".into(),
            "build-hook".into(),
            hook.to_str().unwrap().to_owned(),
        ]
    };
    let (nix, nix_root) = realise(false, "a", &[], &setup);
    let (drv, drv_root) = realise(true, "a", &[], &setup);
    assert_eq!(nix.code, 1, "{nix:?}");
    assert!(nix.stderr.ends_with(EOF_ERROR), "{nix:?}");
    assert_eq!(drv, nix);
    for root in [nix_root, drv_root] {
        let drvs = root.instantiate(&root.path().join("hook-process.nix"), Some("a"));
        let out = root.run("nix-store", &["-q", "--outputs", &drvs[0]]);
        assert!(
            !std::path::Path::new(out.trim()).exists(),
            "{out} was built"
        );
    }
}

const EOF_ERROR: &str = "error: unexpected EOF reading a line\n(use '--show-trace' to show detailed location information)\n";

/// A hook that exits at once, before reading anything. Nix 2.8 writes the request
/// right after the fork, which usually still succeeds: then the same EOF error.
/// Under load the hook is sometimes gone first and Nix prints `build hook died
/// unexpectedly: ` and builds locally (seen here), so only drover's outcome is
/// pinned: always Nix's usual one, whichever way its later write goes.
#[test]
fn hook_exiting_at_once_fails_the_run() {
    require_nix!();
    let setup = |root: &TestRoot| {
        let hook = write_script(root, "hook", "#!/bin/sh\nexit 0\n");
        vec![
            "--option".into(),
            "build-hook".into(),
            hook.to_str().unwrap().to_owned(),
        ]
    };
    let (drv, _) = realise(true, "a", &[], &setup);
    assert_eq!(drv.code, 1, "{drv:?}");
    assert_eq!(
        drv.stderr,
        format!("this derivation will be built:\n  @ROOT@/store/HASH-a.drv\n{EOF_ERROR}")
    );
    assert_eq!(drv.stdout, "");
}

/// With `ca-derivations` enabled, Nix's local store has the system feature
/// `ca-derivations`, which a floating CA derivation requires: with the default hook
/// (no machines) it builds locally.
#[test]
fn ca_derivation_builds_locally_under_the_default_hook() {
    require_nix!();
    let (nix, _) = realise(false, "ca", &[], &no_setup);
    let (drv, _) = realise(true, "ca", &[], &no_setup);
    assert_eq!(nix.code, 0, "{nix:?}");
    assert_eq!(drv, nix);
}

/// A hook that declines and keeps a child in its process group: when the run ends
/// (the build done locally), neither tool leaves the hook or its child running.
/// (The hook writes its declines ahead: Nix asks once, drover may ask again after a
/// decline, which is the goal side's business; each request gets one.)
#[test]
fn no_hook_process_survives_the_run() {
    require_nix!();
    for use_drover in [false, true] {
        let setup = |root: &TestRoot| {
            let script = format!(
                "#!/bin/sh\nsleep 300 &\necho $$ $! >> '{}/pids'\nfor i in 1 2 3 4 5 6 7 8; do echo '# decline' >&2; done\nwait\n",
                root.path().display()
            );
            let hook = write_script(root, "hook", &script);
            vec![
                "--option".into(),
                "build-hook".into(),
                hook.to_str().unwrap().to_owned(),
            ]
        };
        let (run, root) = realise(use_drover, "a", &["-j1"], &setup);
        assert_eq!(run.code, 0, "drover: {use_drover}: {run:?}");
        let pids: Vec<i32> = std::fs::read_to_string(root.path().join("pids"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert!(!pids.is_empty(), "the hook was not started: {run:?}");
        let gone = (0..100).any(|_| {
            if pids.iter().all(|p| is_gone(*p)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
            false
        });
        for p in &pids {
            // SAFETY: plain kill(2) of a process this test's hook started.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        assert!(gone, "drover: {use_drover}: still running: {pids:?}");
        assert!(run.stderr.ends_with("garbage collector\n"), "{run:?}");
    }
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

/// Nix's logger filters what it prints (`filterANSIEscapes`): on a stderr that is
/// not a terminal, escape sequences go, tabs become spaces to the next multiple of
/// 8, BEL and `\r` go. Builder lines (and the hook's messages) are printed the same
/// by drover; the log file keeps the bytes as written.
#[test]
fn printed_lines_are_filtered_as_nix_filters_them() {
    require_nix!();
    let (nix, nix_root) = realise(false, "esc", &[], &no_setup);
    let (drv, _) = realise(true, "esc", &[], &no_setup);
    assert_eq!(nix.code, 0, "{nix:?}");
    assert!(nix.stderr.contains("\nxred    a       b0;t\n"), "{nix:?}");
    assert_eq!(drv, nix);
    let drvs = nix_root.instantiate(&nix_root.path().join("hook-process.nix"), Some("esc"));
    let log = nix_root.run("nix-store", &["--read-log", &drvs[0]]);
    assert!(log.contains("\x1b[31m"), "{log:?}");
}
