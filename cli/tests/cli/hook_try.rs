//! The `try` requests a build hook receives, as Nix 2.8's `tryToBuild` /
//! `tryBuildHook` / `tryLocalBuild` send them: one `try` per attempt, `amWilling` = 1
//! when fewer local builds run than `max-jobs` allows (asked *before* a slot is
//! taken); after `# decline` a free slot builds at once (else the goal waits for a
//! slot and asks again when woken); after `# postpone` the goal prints `waiting for
//! a machine to build '…'...` and asks again on the next wake-up.
//!
//! Each scenario runs `nix-store --realise` and then `drover realise` in the same
//! root, the store wiped in between (so store paths, and hence the bytes sent, are
//! the same), with the recording hook `tests/data/hooks/record.py`; compared: exit
//! status, the `error:`/`building`/`waiting` lines of stderr, whether the outputs
//! are valid, and every byte the hook received.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover::hook_protocol::Reader;

use crate::drover;
use crate::nix_env::TestRoot;

const EXPR: &str = r#"
let mk = name: system: derivation {
  inherit name system; builder = "/bin/sh"; args = ["-c" "echo ${name} > $out"];
};
in {
  x = mk "x" builtins.currentSystem;
  y = mk "y" builtins.currentSystem;
  # A system nobody here builds for.
  foreign = mk "foreign" "foo-linux";
  # Local with `ca-derivations` enabled (the test roots enable it).
  needs_ca_drv = derivation {
    name = "needs-ca"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo ca > $out"]; requiredSystemFeatures = ["ca-derivations"];
  };
  # Features nobody here has, given in the structured attributes (`__json`).
  structured_features = derivation {
    name = "structured-features"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "echo s > $out"]; __structuredAttrs = true;
    requiredSystemFeatures = ["drover-test-feature" "another one"];
  };
}
"#;

fn recorder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/record.py")
}

/// What one tool did.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    code: i32,
    /// stderr's `error:` (with continuation lines), `building` and `waiting` lines.
    lines: Vec<String>,
    /// Whether every output of the requested derivations is valid afterwards.
    valid: bool,
    /// Every byte the hook processes read.
    sent: Vec<u8>,
}

/// A scenario: derivations (attributes of [`EXPR`]), extra flags, the hook's replies
/// (`HOOK_REPLIES` of `record.py`), or `hook` to use another hook program.
struct Scenario<'a> {
    attrs: &'a [&'a str],
    flags: &'a [&'a str],
    replies: &'a str,
    hook: Option<&'a str>,
}

impl Scenario<'_> {
    /// Extra environment for the hook.
    fn env(&self) -> Vec<(&'static str, &'static str)> {
        match self.hook {
            Some(h) if h.ends_with("sleeping-hook") => {
                vec![("HOOK_ACCEPT", "-x.drv"), ("HOOK_SLEEP", "3")]
            }
            _ => vec![],
        }
    }
}

fn run(root: &TestRoot, sc: &Scenario, use_drover: bool) -> (Run, Duration) {
    root.wipe_store();
    let file = root.path().join("try.nix");
    std::fs::write(&file, EXPR).unwrap();
    let drvs: Vec<String> = sc
        .attrs
        .iter()
        .flat_map(|a| root.instantiate(&file, Some(a)))
        .collect();
    let rec = root.path().join("rec");
    let _ = std::fs::remove_dir_all(&rec);
    std::fs::create_dir_all(&rec).unwrap();
    let hook = sc
        .hook
        .map(str::to_owned)
        .unwrap_or_else(|| recorder().display().to_string());
    let mut cmd = if use_drover {
        let mut c = drover(root);
        c.arg("realise");
        c
    } else {
        let mut c = root.cmd("nix-store");
        c.arg("--realise");
        c
    };
    cmd.args(["--option", "build-hook", &hook])
        .args(["--option", "build-poll-interval", "1"])
        .args(sc.flags)
        .args(&drvs)
        .env("HOOK_DIR", &rec)
        .env("HOOK_REPLIES", sc.replies)
        .envs(sc.env());
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut lines = Vec::new();
    let mut in_error = false;
    for l in stderr.lines() {
        if l.starts_with("error:") {
            in_error = true;
        } else if !l.starts_with("       ") {
            in_error = false;
        }
        if in_error || l.starts_with("building ") || l.starts_with("waiting for") {
            lines.push(l.to_owned());
        }
    }
    let valid = drvs.iter().all(|d| {
        let outs = root.run("nix-store", &["-q", "--outputs", d]);
        outs.lines().all(|o| {
            root.cmd("nix-store")
                .args(["--check-validity", o])
                .output()
                .unwrap()
                .status
                .success()
        })
    });
    let sent = std::fs::read(rec.join("stdin.bin")).unwrap_or_default();
    (
        Run {
            code: out.status.code().unwrap_or(-1),
            lines,
            valid,
            sent,
        },
        took,
    )
}

/// (amWilling, derivation name) of each `try` a single hook process received.
fn tries(sent: &[u8]) -> Vec<(bool, String)> {
    let mut r = Reader::new(sent);
    if sent.is_empty() {
        return Vec::new();
    }
    r.read_settings().expect("the settings preamble");
    let mut out = Vec::new();
    while !r.rest().is_empty() {
        let Ok(t) = r.read_try() else { break };
        let base = t.drv_path.rsplit_once('/').unwrap().1;
        let name = base.split_once('-').unwrap().1.to_owned();
        out.push((t.am_willing, name));
    }
    out
}

/// Runs both tools; returns (nix, drover).
fn both(sc: &Scenario) -> [(Run, Duration); 2] {
    let root = TestRoot::new();
    let nix = run(&root, sc, false);
    let drover = run(&root, sc, true);
    [nix, drover]
}

/// Both tools did the same, with Nix's exit `code` and `tries`; byte for byte.
#[track_caller]
fn assert_same(sc: &Scenario, code: i32, expected_tries: &[(bool, &str)]) -> Run {
    let [(nix, _), (drover, took)] = both(sc);
    let expected: Vec<(bool, String)> = expected_tries
        .iter()
        .map(|(w, n)| (*w, n.to_string()))
        .collect();
    assert_eq!(nix.code, code, "nix: {nix:?}");
    assert_eq!(tries(&nix.sent), expected, "nix: {nix:?}");
    assert_eq!(drover.code, nix.code, "drover: {drover:?}\nnix: {nix:?}");
    assert_eq!(drover.lines, nix.lines, "stderr");
    assert_eq!(drover.valid, nix.valid);
    assert_eq!(tries(&drover.sent), expected, "drover's tries");
    assert!(
        drover.sent == nix.sent,
        "the bytes the hook received differ"
    );
    assert!(took < Duration::from_secs(60), "drover took {took:?}");
    nix
}

#[test]
fn decline_builds_locally_with_one_try() {
    require_nix!();
    for flags in [&["-j1"][..], &["-j2"]] {
        let r = assert_same(
            &Scenario {
                attrs: &["x"],
                flags,
                replies: "decline",
                hook: None,
            },
            0,
            &[(true, "x.drv")],
        );
        assert!(r.valid);
    }
}

#[test]
fn decline_permanently_builds_locally_with_one_try() {
    require_nix!();
    assert_same(
        &Scenario {
            attrs: &["x"],
            flags: &["-j1"],
            replies: "decline-permanently",
            hook: None,
        },
        0,
        &[(true, "x.drv")],
    );
}

#[test]
fn postpone_waits_and_asks_again() {
    require_nix!();
    let r = assert_same(
        &Scenario {
            attrs: &["x"],
            flags: &["-j1"],
            replies: "postpone,decline",
            hook: None,
        },
        0,
        &[(true, "x.drv"), (true, "x.drv")],
    );
    assert!(
        r.lines[0].starts_with("waiting for a machine to build '") && r.lines[0].ends_with("'..."),
        "{r:?}"
    );
}

#[test]
fn accept_sends_inputs_and_missing_outputs() {
    require_nix!();
    // The recorder builds nothing: `some outputs are unexpectedly invalid`.
    assert_same(
        &Scenario {
            attrs: &["x"],
            flags: &["-j1"],
            replies: "accept:m1",
            hook: None,
        },
        1,
        &[(true, "x.drv")],
    );
}

#[test]
fn max_jobs_zero_is_unwilling_and_a_decline_is_a_run_error() {
    require_nix!();
    let r = assert_same(
        &Scenario {
            attrs: &["x"],
            flags: &["-j0"],
            replies: "decline",
            hook: None,
        },
        1,
        &[(false, "x.drv")],
    );
    assert!(
        r.lines[0].starts_with("error: unable to start any build;"),
        "{r:?}"
    );
}

#[test]
fn a_foreign_system_is_offered_willing_and_fails_locally_after_a_decline() {
    require_nix!();
    let r = assert_same(
        &Scenario {
            attrs: &["foreign"],
            flags: &["-j1"],
            replies: "decline",
            hook: None,
        },
        1,
        &[(true, "foreign.drv")],
    );
    assert!(
        r.lines[0].starts_with("error: a 'foo-linux' with features {} is required to build '"),
        "{r:?}"
    );
}

#[test]
fn required_features_are_read_from_structured_attrs() {
    require_nix!();
    // Nix 2.8 reads `requiredSystemFeatures` from the `__json` object (each string a
    // feature, even one with a space): the hook is asked with them, and after a
    // decline the local build is refused with them.
    let r = assert_same(
        &Scenario {
            attrs: &["structured_features"],
            flags: &["-j1"],
            replies: "decline",
            hook: None,
        },
        1,
        &[(true, "structured-features.drv")],
    );
    assert!(
        r.lines[0].starts_with(
            "error: a 'x86_64-linux' with features {another one, drover-test-feature} is required"
        ),
        "{r:?}"
    );
}

#[test]
fn ca_derivations_is_a_local_system_feature_when_enabled() {
    require_nix!();
    let r = assert_same(
        &Scenario {
            attrs: &["needs_ca_drv"],
            flags: &["-j1"],
            replies: "decline",
            hook: None,
        },
        0,
        &[(true, "needs-ca.drv")],
    );
    assert!(r.valid);
}

#[test]
fn a_hook_declining_everything_with_one_slot_builds_all_locally() {
    require_nix!();
    // Whether the second derivation is offered while the first builds depends on
    // timing (in Nix too): compared as what must hold for both tools.
    let sc = Scenario {
        attrs: &["x", "y"],
        flags: &["-j1"],
        replies: "decline",
        hook: None,
    };
    for (r, took) in both(&sc) {
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.valid, "{r:?}");
        assert!(took < Duration::from_secs(60), "{took:?}");
        let t = tries(&r.sent);
        // One offer each, the first willing; one more, willing, for one that had to
        // wait for the slot (asked again when woken). Never more.
        assert!(t.len() == 2 || t.len() == 3, "{t:?}");
        assert!(t[0].0, "{t:?}");
        assert_ne!(t[0].1, t[1].1, "{t:?}");
        if t.len() == 3 {
            assert_eq!(t[2], (true, t[1].1.clone()), "{t:?}");
        }
    }
}

#[test]
fn build_remote_with_no_free_machine_slot_builds_locally_at_once() {
    require_nix!();
    let build_remote = "/usr/libexec/nix/build-remote";
    if !Path::new(build_remote).exists() {
        eprintln!("skipped: no {build_remote}");
        return;
    }
    // A machine with 0 jobs is never free: build-remote declines a willing request
    // (and postpones an unwilling one, which drover used to send for ever).
    let [(nix, nix_took), (drover, took)] = both(&Scenario {
        attrs: &["x"],
        flags: &[
            "-j1",
            "--option",
            "builders",
            "ssh://nobody@127.0.0.1 x86_64-linux - 0 1",
        ],
        replies: "",
        hook: Some(build_remote),
    });
    assert_eq!(nix.code, 0, "{nix:?}");
    assert!(nix.valid);
    assert_eq!(drover.code, 0, "{drover:?}");
    assert!(drover.valid);
    assert_eq!(drover.lines, nix.lines);
    assert!(nix_took < Duration::from_secs(30), "{nix_took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn hook_builds_are_not_timed_out_locally() {
    require_nix!();
    // Nix 2.8 leaves `max-silent-time` and `timeout` of a hook build to the remote
    // side: a silent 3 s remote build outlives `max-silent-time = 1` (and then, as
    // the scripted hook builds nothing, the outputs are unexpectedly invalid).
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks/sleeping.py");
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("sleeping-hook");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec python3 '{}'\n", py.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let hook = wrapper.display().to_string();
    let sc = Scenario {
        attrs: &["x"],
        flags: &["-j1", "--option", "max-silent-time", "1"],
        replies: "",
        hook: Some(&hook),
    };
    let [(nix, _), (drover, _)] = both(&sc);
    assert_eq!(nix.code, 1, "{nix:?}");
    assert_eq!(
        nix.lines.last().map(String::as_str),
        Some("error: some outputs are unexpectedly invalid"),
        "{nix:?}"
    );
    assert_eq!((drover.code, &drover.lines), (nix.code, &nix.lines));
}
