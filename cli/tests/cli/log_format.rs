//! `--log-format` against `nix-store --realise --log-format` (Nix 2.8).
//!
//! Both tools run the same scenario in the same root (snapshotted and restored
//! between them, so store paths agree) and their stderr is compared:
//!
//! * `internal-json`: the `@nix` event streams field by field, with activity ids
//!   renumbered in order of appearance (ids are `pid << 32 + n`). Progress results
//!   (`resProgress`, `resSetExpected`) are compared as the sequence of distinct states
//!   of each activity: drover's must occur in Nix's, in order, and end in the same
//!   state (Nix reports after every goal step, drover after each batch of changes).
//!   One activity of Nix's is not drover's and is left out of the comparison: the
//!   second `querying info about missing paths` (Nix's `Worker::run` queries again
//!   what `nix-store` has just queried; drover plans once).
//! * `raw`, `raw-with-logs`, `bar`, `bar-with-logs` off a terminal: stderr equal.
//! * an unknown format: the same error and exit status.
//!
//! nix-output-monitor is not packaged for this system (no `nix-output-monitor` in
//! the Debian archive here), so `nom --json` cannot be run; the field-by-field
//! comparison covers what it reads.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{restore, run, snapshot, Run};

const EXPR: &str = r#"
let
  mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // args);
in rec {
  a = mk { name = "a"; args = ["-c" "echo hello; echo 'to stderr' >&2; printf 'no newline'; echo x > $out"]; };
  b = mk { name = "b"; inherit a; args = ["-c" "echo built b; echo $a > $out"]; };
  f = mk { name = "f"; args = ["-c" "echo failing; echo 'bye' >&2; exit 3"]; };
}
"#;

/// The `@nix` events of a stderr (other lines as `TEXT …` strings).
fn events(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|line| match line.strip_prefix("@nix ") {
            Some(j) => serde_json::from_str(j).unwrap_or_else(|e| panic!("{line}: {e}")),
            None => Value::String(format!("TEXT {line}")),
        })
        .collect()
}

/// Leaves out the activities of Nix's that drover does not have (see the module
/// doc) with their results, then renumbers activity ids in order of appearance.
fn comparable(evs: Vec<Value>) -> Vec<Value> {
    let mut dropped: Vec<u64> = Vec::new();
    let mut queried_missing = false;
    let mut ids: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for mut v in evs {
        let id = v.get("id").and_then(Value::as_u64);
        if v["action"] == "start" {
            let ty = v["type"].as_u64().unwrap();
            let second_query = ty == 0
                && v["text"] == "querying info about missing paths"
                && std::mem::replace(&mut queried_missing, true);
            if second_query {
                dropped.extend(id);
                continue;
            }
        }
        if let Some(id) = id {
            if dropped.contains(&id) {
                continue;
            }
            let n = ids.len() as u64;
            v["id"] = (*ids.entry(id).or_insert(n)).into();
        }
        out.push(v);
    }
    out
}

/// The events without progress results, and the progress states per activity id
/// and result type (consecutive repeats dropped).
type Progress = BTreeMap<(u64, u64, u64), Vec<Value>>;

fn split(evs: Vec<Value>) -> (Vec<Value>, Progress) {
    let mut rest = Vec::new();
    let mut progress: Progress = BTreeMap::new();
    for v in comparable(evs) {
        if v["action"] == "result" {
            let ty = v["type"].as_u64().unwrap();
            if ty == 105 || ty == 106 {
                let id = v["id"].as_u64().unwrap();
                let key_field = if ty == 106 {
                    v["fields"][0].as_u64().unwrap()
                } else {
                    0
                };
                let states = progress.entry((id, ty, key_field)).or_default();
                if states.last() != Some(&v["fields"]) {
                    states.push(v["fields"].clone());
                }
                continue;
            }
        }
        rest.push(v);
    }
    (rest, progress)
}

/// Whether `sub` occurs in `seq` in order.
fn is_subsequence(sub: &[Value], seq: &[Value]) -> bool {
    let mut it = seq.iter();
    sub.iter().all(|x| it.any(|y| y == x))
}

#[track_caller]
fn assert_same_events(nix: &Run, drover: &Run) {
    assert_eq!(
        nix.code, drover.code,
        "nix:\n{}\ndrover:\n{}",
        nix.stderr, drover.stderr
    );
    assert_eq!(nix.stdout, drover.stdout);
    let (n_rest, n_prog) = split(events(&nix.stderr));
    let (d_rest, d_prog) = split(events(&drover.stderr));
    let show = |v: &[Value]| {
        v.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        show(&n_rest),
        show(&d_rest),
        "event streams differ\nnix:\n{}\ndrover:\n{}",
        nix.stderr,
        drover.stderr
    );
    assert_eq!(
        n_prog.keys().collect::<Vec<_>>(),
        d_prog.keys().collect::<Vec<_>>(),
        "progress of different activities"
    );
    for (k, n) in &n_prog {
        let mut d = &d_prog[k][..];
        // drover's Worker counts a substitution's expected bytes once its goal has
        // the narinfo, Nix's as the goal is made: drover may first report 0 bytes.
        if k.1 == 106 && d.len() > 1 && d[0][1] == 0 && n[0][1] != 0 {
            d = &d[1..];
        }
        assert_eq!(
            n.last(),
            d.last(),
            "final progress of {k:?}: {n:?} vs {d:?}"
        );
        assert!(
            is_subsequence(d, n),
            "drover's progress states of {k:?} are not Nix's: {d:?} vs {n:?}"
        );
    }
}

/// Runs `args` with `nix-store --realise` and `drover realise` from the same snapshot.
fn both(root: &TestRoot, args: &[&str]) -> (Run, Run) {
    let snap = snapshot(root);
    let nix = run(root.cmd("nix-store").arg("--realise").args(args));
    restore(root, &snap);
    let drover = run(drover(root).arg("realise").args(args));
    restore(root, &snap);
    std::fs::remove_dir_all(&snap).unwrap();
    (nix, drover)
}

fn instantiate(root: &TestRoot, attr: &str) -> String {
    let expr = root.path().join("e.nix");
    std::fs::write(&expr, EXPR).unwrap();
    root.instantiate(&expr, Some(attr)).remove(0)
}

#[test]
fn internal_json_of_a_build_and_a_failing_build() {
    require_nix!();
    let root = TestRoot::new();
    let b = instantiate(&root, "b");
    let f = instantiate(&root, "f");
    let (nix, drover) = both(&root, &["--log-format", "internal-json", &b]);
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    assert!(
        drover.stderr.contains(r#""fields":["hello"]"#),
        "{}",
        drover.stderr
    );
    assert_same_events(&nix, &drover);
    let (nix, drover) = both(&root, &["--log-format", "internal-json", &f]);
    assert_eq!(nix.code, 100, "{}", nix.stderr);
    assert_same_events(&nix, &drover);
    // -Q does not change what the JSON logger shows.
    let (nix, drover) = both(&root, &["-Q", "--log-format", "internal-json", &f]);
    assert_same_events(&nix, &drover);
}

#[test]
fn internal_json_of_a_substitution() {
    require_nix!();
    let root = TestRoot::new();
    let b = instantiate(&root, "b");
    let out = root.realise(&[&b]).remove(0);
    let cache = format!("file://{}/cache", root.path().display());
    root.run(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            &cache,
            &out,
        ],
    );
    root.wipe_store();
    std::fs::create_dir_all(&root.store_dir).unwrap();
    std::fs::create_dir_all(&root.state_dir).unwrap();
    let args = [
        "--option",
        "substituters",
        &cache,
        "--option",
        "require-sigs",
        "false",
        "--log-format",
        "internal-json",
        &out,
    ];
    let (nix, drover) = both(&root, &args);
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    assert!(nix.stderr.contains(r#""type":108"#), "{}", nix.stderr);
    assert_same_events(&nix, &drover);
}

#[test]
fn plain_formats_off_a_terminal_and_a_bad_format() {
    require_nix!();
    let root = TestRoot::new();
    let a = instantiate(&root, "a");
    let f = instantiate(&root, "f");
    for format in ["raw", "raw-with-logs", "bar", "bar-with-logs"] {
        for drv in [&a, &f] {
            let (nix, drover) = both(&root, &["--log-format", format, drv]);
            assert_eq!(
                (nix.code, &nix.stdout, &nix.stderr),
                (drover.code, &drover.stdout, &drover.stderr),
                "--log-format {format} {drv}"
            );
        }
    }
    // `-Q` does not silence a logger that shows the logs.
    for format in ["raw-with-logs", "bar-with-logs"] {
        let (nix, drover) = both(&root, &["-Q", "--log-format", format, &f]);
        assert_eq!(
            (nix.code, &nix.stdout, &nix.stderr),
            (drover.code, &drover.stdout, &drover.stderr),
            "-Q --log-format {format}"
        );
    }
    let (nix, drover) = both(&root, &["--log-format", "json", &a]);
    assert_eq!(nix.code, 1);
    assert_eq!(
        nix.stderr,
        "error: option 'log-format' has an invalid value 'json'\n"
    );
    assert_eq!((nix.code, &nix.stderr), (drover.code, &drover.stderr));
}

#[test]
fn internal_json_of_a_builtin_fetchurl() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("hello.txt");
    std::fs::write(&file, "hello file\n").unwrap();
    let sha256 = root
        .run(
            "nix-hash",
            &["--flat", "--type", "sha256", file.to_str().unwrap()],
        )
        .trim()
        .to_owned();
    for name in ["hello.txt", "missing.txt"] {
        let url = format!("file://{}/{name}", root.path().display());
        let drv = root
            .run(
                "nix-instantiate",
                &[
                    "--expr",
                    "import <nix/fetchurl.nix>",
                    "--argstr",
                    "url",
                    &url,
                    "--argstr",
                    "sha256",
                    &sha256,
                ],
            )
            .trim()
            .to_owned();
        let (nix, drover) = both(&root, &["--log-format", "internal-json", &drv]);
        // The builtin's download is an activity of its own (type 101) in both.
        assert!(
            nix.stderr.contains(r#""level":4,"text":"downloading '"#),
            "{}",
            nix.stderr
        );
        assert_same_events(&nix, &drover);
    }
}
