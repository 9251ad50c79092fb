//! More of `drover daemon` against `nix-daemon` on the same root (issue #11's
//! remaining divergences): what Nix 2.8's clients print when builds fail
//! through the daemon, a pure derivation on an impure one, `EnsurePath` of a
//! path nothing can make, and `--store`.

use std::path::Path;
use std::process::Stdio;

use crate::daemon::{client, exchange, greeting, run, w64, wstr, Daemon, Which};
use crate::nix_env::{corpus_dir, TestRoot};

fn failures() -> String {
    corpus_dir()
        .join("daemon/failures.nix")
        .to_str()
        .unwrap()
        .to_owned()
}

/// Failing builds through one daemon: `nix-build` (`BuildPaths`) of three
/// requests with and without `--keep-going`, `nix build` (`BuildPathsWithResults`)
/// of two with and without it, `nix-store -r` of a derivation whose input fails,
/// and the refused pure derivation on an impure one through both operations.
fn failures_scenario(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let _d = Daemon::start(root, which);
    let f = failures();
    let mut t = Vec::new();
    for flag in ["--no-keep-going", "--keep-going"] {
        t.push((
            format!("nix-build {flag}"),
            run(client(root, "nix-build").args([
                &f,
                "-A",
                "fail",
                "-A",
                "fail2",
                "-A",
                "ok",
                "--no-out-link",
                flag,
            ])),
        ));
        t.push((
            format!("nix build -L {flag}"),
            run(client(root, "nix").args([
                "build",
                "-L",
                "-f",
                &f,
                "fail",
                "fail2",
                "--no-link",
                flag,
            ])),
        ));
    }
    let dep = root.instantiate(Path::new(&f), Some("dep"));
    t.push((
        "nix-store -r dep".into(),
        run(client(root, "nix-store").args(["-r", &dep[0]])),
    ));
    t.push((
        "nix build onImpure".into(),
        run(client(root, "nix").args(["build", "-L", "-f", &f, "onImpure", "--no-link"])),
    ));
    let on_impure = root.instantiate(Path::new(&f), Some("onImpure"));
    t.push((
        "nix-store -r onImpure".into(),
        run(client(root, "nix-store").args(["-r", &on_impure[0]])),
    ));
    t
}

#[test]
fn failed_builds_print_through_drover_daemon_what_they_print_through_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let nix = failures_scenario(&root, Which::Nix);
    root.wipe_store();
    let _ = std::fs::remove_dir_all(&root.log_dir);
    let ours = failures_scenario(&root, Which::Drover);
    // What this is about must be there at all.
    let all: String = nix.iter().map(|(_, o)| o.as_str()).collect();
    for needle in [
        "error: builder for '",
        "       last 10 log lines:",
        "error: build of '",
        "depends on impure derivation",
        "error: 1 dependencies of derivation",
    ] {
        assert!(
            all.contains(needle),
            "nix-daemon never said {needle:?}: {all}"
        );
    }
    for ((label, n), (_, o)) in nix.iter().zip(&ours) {
        assert_eq!(
            o, n,
            "{label}: drover daemon (left) differs from nix-daemon (right)"
        );
    }
}

#[test]
fn ensure_path_of_a_path_nothing_can_make_is_refused_as_by_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let mut replies = Vec::new();
    for which in [Which::Nix, Which::Drover] {
        let d = Daemon::start(&root, which);
        let mut b = greeting();
        w64(&mut b, 10); // EnsurePath
        wstr(
            &mut b,
            format!("{}/00000000000000000000000000000000-x", root.store_dir).as_bytes(),
        );
        replies.push(exchange(&d.socket, &b, true));
        drop(d);
        root.wipe_store();
    }
    // The activities before it carry each daemon's own ids (Nix's are made
    // of its pid): the error, from `STDERR_ERROR` on, is what must match.
    let error = |r: &[u8]| {
        let at = r
            .windows(8)
            .position(|w| w == 0x63787470u64.to_le_bytes())
            .unwrap_or_else(|| panic!("no STDERR_ERROR in {:?}", String::from_utf8_lossy(r)));
        String::from_utf8_lossy(&r[at..]).into_owned()
    };
    let (nix, ours) = (error(&replies[0]), error(&replies[1]));
    assert!(
        nix.contains("does not exist and cannot be created"),
        "{nix:?}"
    );
    assert_eq!(ours, nix, "drover daemon (left), nix-daemon (right)");
}

/// `<daemon> --stdio --store URI` with nothing on stdin: exit code and stderr.
fn stdio_with_store(root: &TestRoot, which: Which, uri: &str) -> String {
    let mut cmd = root.cmd("timeout");
    cmd.arg("60");
    match which {
        Which::Nix => cmd.arg("nix-daemon"),
        Which::Drover => cmd.args([env!("CARGO_BIN_EXE_drover"), "daemon"]),
    };
    run(cmd.args(["--stdio", "--store", uri]).stdin(Stdio::null()))
}

#[test]
fn store_uris_no_store_has_are_refused_as_by_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    for uri in ["foo://bar", "relpath"] {
        let nix = stdio_with_store(&root, Which::Nix, uri);
        let ours = stdio_with_store(&root, Which::Drover, uri);
        assert!(nix.contains("don't know how to open Nix store"), "{nix}");
        assert_eq!(ours, nix, "{uri}: drover daemon (left), nix-daemon (right)");
    }
}

/// A daemon serving `local?state=…&log=…`: a client's `nix-store --add` and
/// build land in that state directory, not in the one the daemon's settings
/// (and its socket) are in.
fn store_scenario(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let other = root.path().join("other");
    let uri = format!(
        "local?state={0}/var/nix&log={0}/var/log/nix",
        other.display()
    );
    root.run("nix-store", &["--init"]);
    let socket = root.state_dir.join("daemon-socket/socket");
    let mut cmd = match which {
        Which::Nix => root.cmd("nix-daemon"),
        Which::Drover => {
            let mut c = root.cmd(env!("CARGO_BIN_EXE_drover"));
            c.arg("daemon");
            c
        }
    };
    let child = cmd
        .args(["--store", &uri])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stopped (SIGTERM) when dropped, whatever happens below.
    let daemon = Daemon { child, socket };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{which:?} did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let hello = corpus_dir().join("hello.txt");
    let mut t = Vec::new();
    let added = run(client(root, "nix-store").args(["--add", hello.to_str().unwrap()]));
    let path = added.lines().nth(2).unwrap_or_default().to_owned();
    t.push(("nix-store --add".into(), added));
    let f = failures();
    t.push((
        "nix-build ok".into(),
        run(client(root, "nix-build").args([&f, "-A", "ok", "--no-out-link"])),
    ));
    drop(daemon);
    for (label, store) in [
        ("the served store", uri.as_str()),
        ("the default one", "local"),
    ] {
        t.push((
            format!("valid in {label}"),
            run(root
                .cmd("nix-store")
                .args(["--store", store, "--check-validity", &path])),
        ));
    }
    t.push((
        "the served store's log".into(),
        format!("{}", other.join("var/log/nix/drvs").is_dir()),
    ));
    t
}

#[test]
fn drover_daemon_serves_the_store_its_store_option_names_as_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let nix = store_scenario(&root, Which::Nix);
    root.wipe_store();
    let _ = std::fs::remove_dir_all(root.path().join("other"));
    let ours = store_scenario(&root, Which::Drover);
    assert!(nix[2].1.starts_with("exit Some(0)"), "{nix:?}");
    assert!(!nix[3].1.starts_with("exit Some(0)"), "{nix:?}");
    for ((label, n), (_, o)) in nix.iter().zip(&ours) {
        assert_eq!(o, n, "{label}: drover daemon (left), nix-daemon (right)");
    }
}
