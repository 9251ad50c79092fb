//! How a failed build is reported (Nix 2.8's `buildDone`, `timedOut` and the log
//! limit; drover's `drover::build::done`), `nix-store --realise` against `drover
//! realise` in the same root (store wiped in between, so the paths are the same):
//! exit status and the `error:` lines, for a failing builder with `-Q` (the log tail
//! and `nix log`, also without `nix-command`), a dependency that times out for
//! silence (the goal is named `…!out`, the outputs it was made for), a top-level
//! `timeout` (`…!*`) and the log limit.

use std::path::Path;

use crate::drover;
use crate::nix_env::TestRoot;

/// `@SLEEP@` is replaced by the path of `sleep` (builders get no PATH).
const EXPR: &str = r#"
let mk = name: cmd: extra: derivation ({
  inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" cmd];
} // extra);
  quiet = mk "quiet" "@SLEEP@ 30; echo > $out" {};
in {
  fails = mk "fails" "echo one; echo two; exit 3" {};
  dependent = mk "dependent" "echo > $out" { dep = quiet; };
  slow = mk "slow" "echo tick; @SLEEP@ 30; echo > $out" {};
  chatty = mk "chatty" "for i in 1 2 3 4 5 6 7 8 9 10; do echo 0123456789012345678901234567890123456789; done; @SLEEP@ 30; echo > $out" {};
}
"#;

fn sleep_program() -> &'static str {
    ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("no sleep program")
}

/// (exit status, `error:` lines with their continuation lines) of one tool.
fn run(root: &TestRoot, attr: &str, flags: &[&str], use_drover: bool) -> (i32, Vec<String>) {
    root.wipe_store();
    let file = root.path().join("done.nix");
    std::fs::write(&file, EXPR.replace("@SLEEP@", sleep_program())).unwrap();
    let drv = root.instantiate(&file, Some(attr)).remove(0);
    let mut cmd = if use_drover {
        let mut c = drover(root);
        c.arg("realise");
        c
    } else {
        let mut c = root.cmd("nix-store");
        c.arg("--realise");
        c
    };
    let out = cmd.args(flags).arg(&drv).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut lines = Vec::new();
    let mut in_error = false;
    for l in stderr.lines() {
        if l.starts_with("error:") {
            in_error = true;
        } else if !l.starts_with("       ") {
            in_error = false;
        }
        if in_error {
            lines.push(l.to_owned());
        }
    }
    (out.status.code().unwrap_or(-1), lines)
}

/// Both tools exit with `code` and print the same errors, the first starting with
/// `first` (the root's path written `@ROOT@`) and containing `contains`.
#[track_caller]
fn assert_same(conf: &str, attr: &str, flags: &[&str], code: i32, first: &str, contains: &str) {
    let root = TestRoot::with_conf(conf);
    let nix = run(&root, attr, flags, false);
    let drover = run(&root, attr, flags, true);
    let first = first.replace("@ROOT@", root.path().to_str().unwrap());
    assert_eq!(nix.0, code, "nix: {nix:?}");
    assert!(nix.1[0].starts_with(&first), "nix: {nix:?}");
    assert!(nix.1.join("\n").contains(contains), "nix: {nix:?}");
    assert_eq!(drover, nix, "drover (left) and nix (right) differ");
}

#[test]
fn a_failing_builder_shows_the_log_tail_and_names_nix_log_even_without_nix_command() {
    require_nix!();
    for conf in ["", "experimental-features = ca-derivations\n"] {
        assert_same(
            conf,
            "fails",
            &["-Q"],
            100,
            "error: builder for '@ROOT@/store/",
            "last 2 log lines:\n       > one\n       > two\n       For full logs, run 'nix log ",
        );
    }
}

#[test]
fn a_dependency_timing_out_is_named_by_its_wanted_outputs() {
    require_nix!();
    assert_same(
        "",
        "dependent",
        &["-Q", "--option", "max-silent-time", "1"],
        101,
        "error: building of '@ROOT@/store/",
        "-quiet.drv!out' from .drv file timed out after 1 seconds of silence",
    );
}

#[test]
fn a_top_level_timeout_is_named_for_all_outputs() {
    require_nix!();
    assert_same(
        "",
        "slow",
        &["--option", "timeout", "1"],
        101,
        "error: building of '@ROOT@/store/",
        "-slow.drv!*' from .drv file timed out after 1 seconds",
    );
}

#[test]
fn the_log_limit_kills_the_build() {
    require_nix!();
    assert_same(
        "",
        "chatty",
        &["--option", "max-build-log-size", "100"],
        1,
        "error: building of '@ROOT@/store/",
        "-chatty.drv!*' from .drv file killed after writing more than 100 bytes of log output",
    );
}
