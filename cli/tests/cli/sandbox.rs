//! Sandboxed builds through the CLI: `drover realise` beside `nix-store --realise`
//! (Nix 2.8) with `sandbox = true` and busybox as `/bin/sh`.
//!
//! What Nix 2.8 does, and drover with it:
//! * a sandboxed build prints the same lines, stores the same log and exits 0;
//! * `__noChroot` under `sandbox = true`: `error: derivation '…' has '__noChroot'
//!   set, but that's not allowed when 'sandbox' is 'true'`, exit 1;
//! * when the sandbox cannot be made (here: user namespaces off, inside a user
//!   namespace without `setgroups`), with `sandbox-fallback = false` the helper's
//!   `error: setgroups failed: Operation not permitted` (coloured, as Nix prints
//!   it) and `error: unable to start build process`, exit 1; with
//!   `sandbox-fallback = true` the same helper error is printed and the build then
//!   runs unsandboxed.
//!
//! One difference, not of the sandbox: Nix prints `building '…'...` only once the
//! builder is set up, drover when the build is handed to the local builder, so in
//! the failing cases drover's stderr has that line more; it is left out of the
//! comparison.

use std::path::Path;

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{run, Run};

const CONF: &str = "sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\n";

const EXPR: &str = r#"
let mk = name: script: extra: derivation ({ inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; } // extra);
in {
  hello = mk "hello" "echo hello from $(hostname); id; echo $out > $out" {};
  noChroot = mk "no-chroot" "echo > $out" { __noChroot = true; };
}
"#;

/// Root, user namespaces, busybox and `unshare`; prints why not (or panics when
/// `DROVER_REQUIRE_NIX` is set).
pub(crate) fn sandbox_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root")
    } else if std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim() == "0")
        .unwrap_or(true)
    {
        Some("user namespaces are not enabled")
    } else if !Path::new("/bin/busybox").is_file() {
        Some("/bin/busybox is missing")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            if std::env::var_os("DROVER_REQUIRE_NIX").is_some_and(|v| v != "0") {
                panic!("{test}: {why}, but DROVER_REQUIRE_NIX is set");
            }
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

fn instantiate(root: &TestRoot, attr: &str) -> String {
    let expr = root.path().join("sandbox.nix");
    std::fs::write(&expr, EXPR).unwrap();
    root.instantiate(&expr, Some(attr)).remove(0)
}

fn without_building(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("building '"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn sandboxed_realise_matches_nix() {
    require_nix!();
    if !sandbox_available(module_path!()) {
        return;
    }
    let root = TestRoot::with_conf(CONF);
    let drv = instantiate(&root, "hello");
    let nix = run(root.cmd("nix-store").args(["--realise", &drv]));
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    let nix_log = root.run("nix-store", &["-l", &drv]);
    assert!(nix_log.contains("hello from localhost\nuid=1000(nixbld) gid=100(nixbld)\n"));
    root.run("nix-store", &["--delete", nix.stdout.trim()]);
    let ours = run(drover(&root).args(["realise", &drv]));
    assert_eq!(ours.code, 0, "{}", ours.stderr);
    assert_eq!(ours.stdout, nix.stdout);
    assert_eq!(ours.stderr, nix.stderr);
    assert_eq!(root.run("nix-store", &["-l", &drv]), nix_log);
    root.verify_store();
}

#[test]
fn no_chroot_is_refused_with_sandbox_true() {
    require_nix!();
    if !sandbox_available(module_path!()) {
        return;
    }
    let root = TestRoot::with_conf(CONF);
    let drv = instantiate(&root, "noChroot");
    let nix = run(root.cmd("nix-store").args(["--realise", &drv]));
    let ours = run(drover(&root).args(["realise", &drv]));
    assert_eq!(
        (nix.code, ours.code),
        (1, 1),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert_eq!(
        without_building(&ours.stderr),
        without_building(&nix.stderr)
    );
    assert!(nix.stderr.contains(&format!(
        "error: derivation '{drv}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'\n"
    )));
}

/// Runs `tool realise drv` inside a user namespace where user namespaces are off
/// and `setgroups` is denied, so the sandbox cannot be made.
fn without_user_namespaces(root: &TestRoot, tool: &str, drv: &str) -> Run {
    let script = "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\"";
    let mut c = root.cmd("unshare");
    c.args(["-U", "-r", "sh", "-c", script, "sh"]);
    if tool == "nix" {
        c.args(["nix-store", "--realise", drv]);
    } else {
        c.args([env!("CARGO_BIN_EXE_drover"), "realise", drv]);
    }
    run(&mut c)
}

#[test]
fn sandbox_failures_and_fallback_match_nix() {
    require_nix!();
    if !sandbox_available(module_path!()) {
        return;
    }
    let probe = run(std::process::Command::new("unshare").args(["-U", "-r", "true"]));
    if probe.code != 0 {
        eprintln!("SKIPPED sandbox_failures_and_fallback_match_nix: unshare -U -r does not work");
        return;
    }
    let root = TestRoot::with_conf(&format!("{CONF}sandbox-fallback = false\n"));
    let drv = instantiate(&root, "hello");
    let nix = without_user_namespaces(&root, "nix", &drv);
    let ours = without_user_namespaces(&root, "drover", &drv);
    assert_eq!(
        (nix.code, ours.code),
        (1, 1),
        "{}\n{}",
        nix.stderr,
        ours.stderr
    );
    assert!(
        nix.stderr.contains(
            "\x1b[31;1merror:\x1b[0m setgroups failed: \x1b[35;1mOperation not permitted\x1b[0m\nerror: unable to start build process\n"
        ),
        "{}",
        nix.stderr
    );
    assert_eq!(
        without_building(&ours.stderr),
        without_building(&nix.stderr)
    );
    assert_eq!(ours.stdout, nix.stdout);

    // With sandbox-fallback the helper's error is printed and the build runs
    // unsandboxed.
    let root = TestRoot::with_conf(&format!("{CONF}sandbox-fallback = true\n"));
    let drv = instantiate(&root, "hello");
    let nix = without_user_namespaces(&root, "nix", &drv);
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    let nix_log = root.run("nix-store", &["-l", &drv]);
    root.run("nix-store", &["--delete", nix.stdout.trim()]);
    let ours = without_user_namespaces(&root, "drover", &drv);
    assert_eq!(ours.code, 0, "{}", ours.stderr);
    assert_eq!(ours.stdout, nix.stdout);
    assert_eq!(
        without_building(&ours.stderr),
        without_building(&nix.stderr)
    );
    assert_eq!(root.run("nix-store", &["-l", &drv]), nix_log);
    assert!(!nix_log.contains("hello from localhost"), "{nix_log}");
    assert!(nix.stderr.contains("setgroups failed"), "{}", nix.stderr);
}
