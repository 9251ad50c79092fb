//! A client's settings (`SetOptions`) through `drover daemon` as through
//! `nix-daemon`: Nix 2.8's daemon applies them to the client's builds (its
//! process is the client's alone); drover's gives them to the client's runs. The
//! same Nix 2.8 clients pass `--option post-build-hook`, `secret-key-files`,
//! `auto-optimise-store`, `--cores`, `-K`, `--max-silent-time` as the trusted
//! user, and an unprivileged user a restricted setting (ignored) and `timeout`
//! (applied), against each daemon on the same root; what each build did must be
//! the same.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use super::daemon::{client, stdout, Daemon, Which};
use crate::nix_env::{corpus_dir, TestRoot};

fn file() -> String {
    corpus_dir()
        .join("daemon/options.nix")
        .to_str()
        .unwrap()
        .to_owned()
}

/// `nix-build` of one attribute of `options.nix`, without a link.
fn build(c: &mut Command, attr: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let f = file();
    let out = c
        .args([f.as_str(), "-A", attr, "--no-out-link"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of `stderr` that contain `what`.
fn lines_with(stderr: &str, what: &str) -> String {
    stderr
        .lines()
        .filter(|l| l.contains(what))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What one daemon did with each setting, as (setting, what the build showed).
fn scenario(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let _d = Daemon::start(root, which);
    let dir = root.path();
    let hook_log = dir.join("hook.log");
    let _ = std::fs::remove_file(&hook_log);
    let hook = dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$DRV_PATH [$OUT_PATHS]\" >> {}\n",
            hook_log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, PermissionsExt::from_mode(0o755)).unwrap();
    let hook = hook.to_str().unwrap().to_owned();
    // `OUT_PATHS` is empty under both: Nix 2.8 reads it from a result not yet
    // filled when the hook runs.
    let hook_ran = || std::fs::read_to_string(&hook_log).unwrap_or_default();
    let key = dir.join("secret-key");
    let key = key.to_str().unwrap();
    let mut t = Vec::new();

    let (code, _, _) = build(
        &mut client(root, "nix-build"),
        "hooked",
        &["--option", "post-build-hook", &hook],
    );
    t.push((
        "post-build-hook".into(),
        format!("exit {code:?}, the hook saw: {}", hook_ran()),
    ));

    let (code, out, _) = build(
        &mut client(root, "nix-build"),
        "signed",
        &["--option", "secret-key-files", key],
    );
    let sigs = stdout(client(root, "nix").args(["path-info", "--sigs", &out]));
    t.push(("secret-key-files".into(), format!("exit {code:?}: {sigs}")));

    let (code, out, _) = build(
        &mut client(root, "nix-build"),
        "optimised",
        &["--option", "auto-optimise-store", "true"],
    );
    let ino = |f: &str| std::fs::metadata(Path::new(&out).join(f)).map(|m| m.ino());
    t.push((
        "auto-optimise-store".into(),
        format!(
            "exit {code:?}, a and b one file: {}",
            ino("a").is_ok() && ino("a").ok() == ino("b").ok()
        ),
    ));

    let (code, out, _) = build(&mut client(root, "nix-build"), "cores", &["--cores", "3"]);
    t.push((
        "cores".into(),
        format!(
            "exit {code:?}, NIX_BUILD_CORES={}",
            std::fs::read_to_string(&out).unwrap_or_default().trim()
        ),
    ));

    // Where both daemons keep it (their `TMPDIR` is the root's). drover daemon
    // prints its `note: keeping build directory` on its own stderr, not the
    // client's: the note is left out.
    let kept = root.tmp_dir().join("nix-build-failing.drv-0");
    let (code, _, _) = build(&mut client(root, "nix-build"), "failing", &["-K"]);
    let left = kept.join("left-behind").exists();
    let _ = std::fs::remove_dir_all(&kept);
    t.push((
        "keep-failed".into(),
        format!("exit {code:?}, kept with its files: {left}"),
    ));

    let (code, _, err) = build(
        &mut client(root, "nix-build"),
        "silent",
        &["--max-silent-time", "1"],
    );
    t.push((
        "max-silent-time".into(),
        format!("exit {code:?}: {}", lines_with(&err, "timed out")),
    ));

    if unsafe { libc::geteuid() } == 0 {
        t.extend(untrusted(root, which, &hook, &hook_log));
    }
    t
}

/// An unprivileged user (`nobody`): `post-build-hook` is a restricted setting
/// (ignored), `timeout` is not (applied).
fn untrusted(root: &TestRoot, which: Which, hook: &str, hook_log: &Path) -> Vec<(String, String)> {
    let home = root.path().join(format!("{which:?}-home"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, PermissionsExt::from_mode(0o777)).unwrap();
    let nobody = || {
        let mut c = client(root, "setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "nix-build",
        ]);
        c.env("HOME", &home).env("TMPDIR", &home);
        c
    };
    let (code, _, err) = build(
        &mut nobody(),
        "hooked-untrusted",
        &["--option", "post-build-hook", hook],
    );
    let hook_ran = std::fs::read_to_string(hook_log)
        .unwrap_or_default()
        .contains("hooked-untrusted");
    let (tcode, _, terr) = build(
        &mut nobody(),
        "silent-untrusted",
        &["--option", "timeout", "1"],
    );
    vec![
        (
            "nobody: post-build-hook".into(),
            format!(
                "exit {code:?}, the hook ran: {hook_ran}; warnings: {}",
                lines_with(&err, "warning")
            ),
        ),
        (
            "nobody: timeout".into(),
            format!("exit {tcode:?}: {}", lines_with(&terr, "error")),
        ),
    ]
}

#[test]
fn a_clients_settings_apply_to_its_builds_as_with_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let key = stdout(
        root.cmd("nix")
            .args(["key", "generate-secret", "--key-name", "test-1"]),
    );
    std::fs::write(root.path().join("secret-key"), key).unwrap();
    let nix = scenario(&root, Which::Nix);
    root.wipe_store();
    let ours = scenario(&root, Which::Drover);
    // Each setting made a difference under nix-daemon.
    let said = |i: usize, what: &str| {
        assert!(nix[i].1.contains(what), "{}: {}", nix[i].0, nix[i].1);
    };
    said(0, "hooked");
    said(1, "test-1:");
    said(2, "one file: true");
    said(3, "NIX_BUILD_CORES=3");
    said(4, "kept with its files: true");
    said(5, "timed out after 1 seconds of silence");
    if nix.len() > 6 {
        said(6, "the hook ran: false");
        said(7, "timed out after 1 seconds");
    }
    assert_eq!(nix.len(), ours.len());
    for ((label, n), (_, o)) in nix.iter().zip(&ours) {
        assert_eq!(o, n, "{label}: drover daemon (left), nix-daemon (right)");
    }
}
