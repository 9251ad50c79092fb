//! `drover realise` against `nix-store --realise` (Nix 2.8) on the same `.drv`s.
//!
//! Where results must be byte-identical (store paths, DB rows, logs, builder
//! environments) both tools run in the SAME root: the root is snapshotted after
//! instantiation, Nix builds and its results are recorded, the snapshot is restored
//! and drover builds. Failure tests run each tool in its own root and compare exit
//! codes and stderr with the root's prefix replaced by `@ROOT@`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::nix_env::{corpus_dir, TestRoot};
use crate::{corpus_drvs, drover};

/// Exit code, stdout and stderr of a command.
pub(crate) struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub(crate) fn run(cmd: &mut Command) -> Run {
    let out: Output = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn nix_realise(root: &TestRoot, args: &[&str]) -> Run {
    run(root.cmd("nix-store").arg("--realise").args(args))
}

fn drover_realise(root: &TestRoot, args: &[&str]) -> Run {
    run(drover(root).arg("realise").args(args))
}

pub(crate) fn sh(cmd: &str) {
    let ok = Command::new("/bin/sh").args(["-c", cmd]).status().unwrap();
    assert!(ok.success(), "{cmd}");
}

/// Copies the root's store and state into `<root>/snapshot`.
pub(crate) fn snapshot(root: &TestRoot) -> PathBuf {
    let snap = root.path().join("snapshot");
    let r = root.path().display();
    sh(&format!(
        "mkdir -p {s} && cp -a {r}/store {r}/var {s}/",
        s = snap.display()
    ));
    snap
}

/// Puts the snapshot back: the store, DB and logs as they were.
pub(crate) fn restore(root: &TestRoot, snap: &Path) {
    let r = root.path().display();
    sh(&format!(
        "chmod -R u+w {r}/store && rm -rf {r}/store {r}/var && cp -a {s}/store {s}/var {r}/",
        s = snap.display()
    ));
}

/// The DB rows that must be identical whoever built (ids and times left out).
pub(crate) fn db_rows(root: &TestRoot) -> String {
    let db = root.state_dir.join("db/db.sqlite");
    let q = "select 'VP', path, hash, ultimate, deriver, narSize, sigs, ca from ValidPaths order by path;
select 'REF', a.path, b.path from Refs r join ValidPaths a on r.referrer = a.id join ValidPaths b on r.reference = b.id order by 2, 3;
select 'DO', v.path, d.id, d.path from DerivationOutputs d join ValidPaths v on d.drv = v.id order by 2, 3;
select 'R', r.drvPath, r.outputName, v.path, r.signatures from Realisations r join ValidPaths v on r.outputPath = v.id order by 2, 3;
select 'RR', a.drvPath, a.outputName, b.drvPath, b.outputName from RealisationsRefs x join Realisations a on x.referrer = a.id join Realisations b on x.realisationReference = b.id order by 2, 3, 4, 5;";
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    let mut rows = String::new();
    for query in q.split(';').map(str::trim).filter(|q| !q.is_empty()) {
        let mut stmt = conn.prepare(query).unwrap();
        let columns = stmt.column_count();
        let mut result = stmt.query([]).unwrap();
        while let Some(row) = result.next().unwrap() {
            let fields: Vec<String> = (0..columns)
                .map(|i| match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Null => String::new(),
                    rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                    rusqlite::types::ValueRef::Real(f) => f.to_string(),
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        String::from_utf8_lossy(t).into_owned()
                    }
                })
                .collect();
            rows.push_str(&fields.join("|"));
            rows.push('\n');
        }
    }
    rows
}

/// Every stored build log: file name (relative to the log dir) → decompressed text.
fn logs(root: &TestRoot) -> BTreeMap<String, String> {
    let mut res = BTreeMap::new();
    let drvs = root.log_dir.join("drvs");
    let Ok(dirs) = std::fs::read_dir(&drvs) else {
        return res;
    };
    for d in dirs {
        let d = d.unwrap().path();
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            let mut text = String::new();
            bzip2::read::MultiBzDecoder::new(std::fs::File::open(&f).unwrap())
                .read_to_string(&mut text)
                .unwrap();
            res.insert(
                f.strip_prefix(&root.log_dir)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned(),
                text,
            );
        }
    }
    res
}

/// The names in the store dir (store paths, `.lock` files, `.check` copies).
fn store_listing(root: &TestRoot) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&root.store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `nix path-info --json -r` of paths, without the registration times.
fn path_info(root: &TestRoot, paths: &[String]) -> serde_json::Value {
    let mut args = vec!["path-info", "--json", "-r"];
    args.extend(paths.iter().map(String::as_str));
    let mut v: serde_json::Value = serde_json::from_str(&root.run("nix", &args)).unwrap();
    for info in v.as_array_mut().unwrap() {
        info.as_object_mut().unwrap().remove("registrationTime");
    }
    v
}

/// The `these N derivations will be built:` block.
fn plan_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("  ") || l.contains("will be built"))
        .collect()
}

/// All lines, sorted (the two schedulers may start independent builds in other
/// orders).
fn sorted_lines(s: &str) -> Vec<&str> {
    let mut v: Vec<&str> = s.lines().collect();
    v.sort();
    v
}

#[test]
fn corpus_realise_matches_nix_in_the_same_root() {
    require_nix!();
    let root = TestRoot::new();
    let drvs = corpus_drvs(&root, true);
    let args: Vec<&str> = drvs.iter().map(String::as_str).collect();
    let snap = snapshot(&root);

    let nix = nix_realise(&root, &args);
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    let outputs: Vec<String> = nix.stdout.lines().map(str::to_owned).collect();
    let nix_info = path_info(&root, &outputs);
    let nix_db = db_rows(&root);
    let nix_logs = logs(&root);
    assert!(!nix_logs.is_empty());
    let nix_listing = store_listing(&root);

    // The reverse direction first: what Nix built is valid to drover.
    let reverse = drover_realise(&root, &args);
    assert_eq!(reverse.code, 0, "{}", reverse.stderr);
    assert_eq!(reverse.stdout, nix.stdout);
    assert!(!reverse.stderr.contains("building"), "{}", reverse.stderr);
    assert!(
        !reverse.stderr.contains("will be built"),
        "{}",
        reverse.stderr
    );
    // `drover log` of a Nix-built derivation prints what `nix-store --read-log` does.
    for drv in &drvs {
        let ours = run(drover(&root).args(["log", drv]));
        let theirs = run(root.cmd("nix-store").args(["--read-log", drv]));
        assert_eq!(ours.code, theirs.code, "{drv}: {}", ours.stderr);
        assert_eq!(ours.stdout, theirs.stdout, "{drv}");
    }

    restore(&root, &snap);
    let ours = drover_realise(&root, &args);
    assert_eq!(ours.code, 0, "{}", ours.stderr);
    // Output paths in the same order.
    assert_eq!(ours.stdout, nix.stdout);
    assert_eq!(plan_lines(&ours.stderr), plan_lines(&nix.stderr));
    // The same messages: plan, `building '…'...`, `resolved derivation: …`, warning.
    assert_eq!(sorted_lines(&ours.stderr), sorted_lines(&nix.stderr));
    assert_eq!(
        ours.stderr.lines().last(),
        Some("warning: you did not specify '--add-root'; the result might be removed by the garbage collector")
    );
    assert_eq!(path_info(&root, &outputs), nix_info);
    let our_db = db_rows(&root);
    for (a, b) in our_db.lines().zip(nix_db.lines()) {
        assert_eq!(a, b);
    }
    assert_eq!(our_db, nix_db);
    assert_eq!(logs(&root), nix_logs);
    // The same store objects and no `.lock` files left behind by either.
    assert_eq!(store_listing(&root), nix_listing);
    // Of derivations and of outputs (through their deriver).
    for p in drvs.iter().chain(&outputs) {
        let ours = run(drover(&root).args(["log", p]));
        let theirs = run(root.cmd("nix-store").args(["--read-log", p]));
        assert_eq!(ours.code, theirs.code, "{p}: {}", ours.stderr);
        assert_eq!(ours.stdout, theirs.stdout, "{p}");
    }

    // Nix has nothing left to build, and the store is consistent.
    let mut dry = vec!["--dry-run"];
    dry.extend(&args);
    let again = nix_realise(&root, &dry);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(!again.stderr.contains("will be built"), "{}", again.stderr);
    let again = nix_realise(&root, &args);
    assert!(!again.stderr.contains("building"), "{}", again.stderr);
    assert_eq!(again.stdout, nix.stdout);
    root.verify_store();
}

fn fail_nix() -> PathBuf {
    corpus_dir().join("realise/fail.nix")
}

/// stderr with the root's path replaced by `@ROOT@` and store path hashes by
/// `HASH` (the roots' store dirs differ, so do the hashes).
fn normalise(root: &TestRoot, s: &str) -> String {
    let s = s.replace(root.path().to_str().unwrap(), "@ROOT@");
    let marker = "@ROOT@/store/";
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(i) = rest.find(marker) {
        out.push_str(&rest[..i + marker.len()]);
        rest = &rest[i + marker.len()..];
        if rest.len() > 32 && rest.as_bytes()[32] == b'-' {
            out.push_str("HASH");
            rest = &rest[32..];
        }
    }
    out.push_str(rest);
    out
}

/// A step run in each root before the compared command (`true`: drover's root).
type Prepare<'a> = &'a dyn Fn(&TestRoot, bool);

/// Runs `nix-store --realise` and `drover realise` with the same flags on attribute
/// `attrs` of `fail.nix`, each in a fresh root (after `prepare` with the tool's own
/// command), and returns both runs' exit codes and normalised stderr.
fn compare(
    attrs: &[&str],
    flags: &[&str],
    prepare: Option<Prepare>,
) -> ((i32, String), (i32, String)) {
    let mut res = Vec::new();
    let mut stored = Vec::new();
    let mut listings = Vec::new();
    for use_drover in [false, true] {
        let root = TestRoot::new();
        let mut drvs = Vec::new();
        for a in attrs {
            drvs.extend(root.instantiate(&fail_nix(), Some(a)));
        }
        if let Some(p) = prepare {
            p(&root, use_drover);
        }
        let mut args: Vec<&str> = flags.to_vec();
        args.extend(drvs.iter().map(String::as_str));
        let r = if use_drover {
            drover_realise(&root, &args)
        } else {
            nix_realise(&root, &args)
        };
        // The `.lock` files and `.check` copies left in the store. (Invalid
        // leftovers differ: Nix 2.8 leaves the redirected output of a `--check`
        // build under a random path; drover deletes it.)
        let mut listing: Vec<String> = store_listing(&root)
            .iter()
            .filter(|n| n.ends_with(".lock") || n.ends_with(".check"))
            .map(|n| n.get(32..).unwrap_or(n).to_owned())
            .collect();
        listing.sort();
        listings.push(listing);
        res.push((r.code, normalise(&root, &r.stderr)));
        let mut texts: Vec<String> = logs(&root).into_values().collect();
        texts.sort();
        stored.push(texts);
    }
    if flags.contains(&"max-build-log-size") {
        // Where the log is cut depends on how the output was read (in chunks, as
        // it came): both keep whole lines under the limit.
        for texts in &stored {
            let lens: Vec<usize> = texts.iter().map(String::len).collect();
            assert!(lens.iter().all(|n| *n <= 1000), "{lens:?}");
        }
    } else {
        // Failed builds are logged too, with the same contents.
        assert_eq!(stored[0], stored[1], "the stored logs differ");
    }
    assert_eq!(listings[0], listings[1], "the stores differ (nix, drover)");
    let d = res.pop().unwrap();
    let n = res.pop().unwrap();
    (n, d)
}

/// The `error:` lines with their indented continuation lines and `note:` lines.
fn messages(stderr: &str) -> Vec<&str> {
    let mut v = Vec::new();
    let mut in_error = false;
    for l in stderr.lines() {
        if l.starts_with("error:") || l.starts_with("note:") {
            in_error = true;
            v.push(l);
        } else if in_error && l.starts_with("  ") {
            v.push(l);
        } else {
            in_error = false;
        }
    }
    v
}

/// Nix and drover agree on the exit code (`code`) and the messages, which contain
/// `needle`; also with `-Q` added (then failures carry the log tail), unless the
/// flags already have it.
#[track_caller]
fn assert_same(attrs: &[&str], flags: &[&str], code: i32, needle: &str) {
    let mut variants = vec![flags.to_vec()];
    if !flags.contains(&"-Q") {
        variants.push([&["-Q"], flags].concat());
    }
    for flags in variants {
        let ((nc, ne), (dc, de)) = compare(attrs, &flags, None);
        assert_eq!(nc, code, "nix: {ne}");
        assert!(ne.contains(needle), "nix: {ne}");
        assert_eq!(dc, nc, "drover: {de}\nnix: {ne}");
        assert_eq!(messages(&de), messages(&ne), "drover: {de}\nnix: {ne}");
        // One derivation at a time: the whole of stderr is the same.
        if attrs.len() == 1 {
            assert_eq!(de, ne, "{flags:?}");
        }
    }
}

#[test]
fn failing_builder() {
    require_nix!();
    assert_same(&["fails"], &[], 100, "failed with exit code 1");
    assert_same(&["fails"], &["-Q"], 100, "last 10 log lines:");
    assert_same(
        &["fails"],
        &["-Q", "--option", "log-lines", "3"],
        100,
        "last 3 log lines:",
    );
    assert_same(&["dependent"], &[], 100, "1 dependencies of derivation");
}

#[test]
fn keep_going_with_two_failures() {
    require_nix!();
    // Independent builds run in store path order, and the paths differ between
    // the two roots: compare the messages as sets.
    let sorted = |s: &str| {
        let mut m: Vec<String> = messages(s)
            .into_iter()
            .map(|l| match l.strip_prefix("error: build of ") {
                // The failed derivations are named in path order.
                Some(names) => {
                    let mut n: Vec<&str> = names.trim_end_matches(" failed").split(", ").collect();
                    n.sort();
                    format!("error: build of {} failed", n.join(", "))
                }
                None => l.to_owned(),
            })
            .collect();
        m.sort();
        m
    };
    for flags in [&["-k"][..], &["-k", "-Q"]] {
        let ((nc, ne), (dc, de)) = compare(&["fails", "fails2", "fine"], flags, None);
        assert_eq!(nc, 100, "{ne}");
        assert_eq!(dc, nc, "{de}");
        let built = |s: &str| s.lines().filter(|l| l.starts_with("building '")).count();
        assert_eq!(built(&ne), 3);
        assert_eq!(built(&de), 3);
        assert_eq!(sorted(&de), sorted(&ne), "drover: {de}\nnix: {ne}");
        assert!(ne.contains("error: build of '"), "{ne}");
    }
}

#[test]
fn fixed_output_hash_mismatch() {
    require_nix!();
    assert_same(
        &["badHash"],
        &[],
        102,
        "hash mismatch in fixed-output derivation",
    );
}

#[test]
fn timeouts() {
    require_nix!();
    assert_same(
        &["sleeper"],
        &["--timeout", "1"],
        101,
        "timed out after 1 seconds",
    );
    assert_same(&["sleeper"], &["--max-silent-time", "1"], 101, "of silence");
}

#[test]
fn output_not_produced_and_log_limit() {
    require_nix!();
    assert_same(
        &["noOutput"],
        &[],
        1,
        "failed to produce output path for output 'out'",
    );
    assert_same(
        &["chatty"],
        // -Q: how much is echoed before the kill depends on timing.
        &["-Q", "--option", "max-build-log-size", "1000"],
        1,
        "killed after writing more than 1000 bytes of log output",
    );
}

#[test]
fn keep_failed_and_max_jobs_zero() {
    require_nix!();
    assert_same(&["fails"], &["-K"], 100, "note: keeping build directory");
    assert_same(
        &["fine"],
        &["--max-jobs", "0"],
        1,
        "unable to start any build; either increase '--max-jobs' or enable remote builds.",
    );
}

#[test]
fn check_of_a_nondeterministic_builder() {
    require_nix!();
    let prepare = |root: &TestRoot, use_drover: bool| {
        let drv = root.instantiate(&fail_nix(), Some("nondet"));
        let r = if use_drover {
            drover_realise(root, &[drv[0].as_str()])
        } else {
            nix_realise(root, &[drv[0].as_str()])
        };
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    let ((nc, ne), (dc, de)) = compare(&["nondet"], &["--check"], Some(&prepare));
    assert_eq!(nc, 104, "{ne}");
    assert!(ne.contains("may not be deterministic"), "{ne}");
    assert_eq!(dc, nc, "{de}");
    assert_eq!(messages(&de), messages(&ne));

    assert_eq!(de, ne);

    let ((nc, ne), (dc, de)) = compare(&["nondet"], &["--check", "-K"], Some(&prepare));
    assert_eq!(nc, 104, "{ne}");
    assert!(ne.contains(".check'"), "{ne}");
    assert_eq!(dc, nc, "{de}");
    assert_eq!(de, ne);

    // With -K the `.check` copy stays in the store, beside the valid output.
    let root = TestRoot::new();
    let drv = root.instantiate(&fail_nix(), Some("nondet")).remove(0);
    let out = drover_realise(&root, &[&drv]).stdout.trim().to_owned();
    let r = drover_realise(&root, &["--check", "-K", &drv]);
    assert_eq!(r.code, 104, "{}", r.stderr);
    let check = format!("{out}.check");
    assert!(Path::new(&check).exists(), "{check} is gone");
    assert_ne!(std::fs::read(&check).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn huge_log_is_stored_whole() {
    require_nix!();
    let root = TestRoot::new();
    let drv = root.instantiate(&fail_nix(), Some("huge")).remove(0);
    let r = drover_realise(&root, &["-Q", &drv]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = run(drover(&root).args(["log", &drv]));
    assert_eq!(log.stdout.len(), 20_000_000);
    let nix_log = run(root.cmd("nix-store").args(["--read-log", &drv]));
    assert!(nix_log.stdout == log.stdout, "the logs differ");
}

/// Lines of the counter file: which builders ran, once per build.
fn counts(counter: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in std::fs::read_to_string(counter).unwrap().lines() {
        *m.entry(l.to_owned()).or_default() += 1;
    }
    m
}

fn concurrent_pair(nix_second: bool) {
    let root = TestRoot::new();
    let counter = root.path().join("counter");
    std::fs::write(&counter, "").unwrap();
    let file = corpus_dir().join("realise/concurrent.nix");
    let drvs: Vec<String> = root
        .run(
            "nix-instantiate",
            &[
                file.to_str().unwrap(),
                "--argstr",
                "counter",
                counter.to_str().unwrap(),
                "-A",
                "top",
            ],
        )
        .lines()
        .map(str::to_owned)
        .collect();
    let mut a = drover(&root);
    a.arg("realise").arg("-j2").args(&drvs);
    let mut b = if nix_second {
        let mut c = root.cmd("nix-store");
        c.args(["--realise", "-j2"]).args(&drvs);
        c
    } else {
        let mut c = drover(&root);
        c.arg("realise").arg("-j2").args(&drvs);
        c
    };
    let ha = std::thread::spawn(move || a.output().unwrap());
    let hb = std::thread::spawn(move || b.output().unwrap());
    let (oa, ob) = (ha.join().unwrap(), hb.join().unwrap());
    for o in [&oa, &ob] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(oa.stdout, ob.stdout);
    let c = counts(&counter);
    let names = ["bottom", "c1", "c2", "c3", "left", "right", "top"];
    assert_eq!(
        c.keys().collect::<Vec<_>>(),
        names.iter().collect::<Vec<_>>()
    );
    assert!(c.values().all(|n| *n == 1), "built more than once: {c:?}");
}

#[test]
fn two_drovers_at_once_build_each_derivation_once() {
    require_nix!();
    concurrent_pair(false);
}

#[test]
fn drover_beside_nix_builds_each_derivation_once() {
    require_nix!();
    concurrent_pair(true);
}

#[test]
fn builder_environment_matches_nix() {
    require_nix!();
    let root = TestRoot::new();
    let env_nix = corpus_dir().join("build/env.nix");
    // plain (all attribute types, passAsFile, two outputs), structured attrs, CA.
    let drvs = root.instantiate(&env_nix, None);
    assert_eq!(drvs.len(), 3);
    let args: Vec<&str> = drvs.iter().map(String::as_str).collect();
    let snap = snapshot(&root);
    let nix = nix_realise(&root, &args);
    assert_eq!(nix.code, 0, "{}", nix.stderr);
    let outs: Vec<String> = nix.stdout.lines().map(str::to_owned).collect();
    let read = |outs: &[String]| -> Vec<String> {
        outs.iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    };
    let theirs = read(&outs);
    restore(&root, &snap);
    let ours = drover_realise(&root, &args);
    assert_eq!(ours.code, 0, "{}", ours.stderr);
    assert_eq!(ours.stdout, nix.stdout);
    let ours = read(&outs);
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o, t);
    }
    assert_eq!(ours, theirs);
}

/// A floating CA derivation with one output still valid (`lib`) and one deleted
/// (`out`): Nix rebuilds it; drover once deadlocked on its own lock of `lib`'s path.
#[test]
fn partly_valid_ca_derivation_rebuilds() {
    require_nix!();
    let root = TestRoot::new();
    let corpus = corpus_dir().join("corpus.nix");
    let drv = root.instantiate(&corpus, Some("caFloatingMulti")).remove(0);
    let outs = root.realise(&[drv.as_str()]);
    let out = outs.iter().find(|p| !p.ends_with("-lib")).unwrap();
    root.run("nix-store", &["--delete", out]);
    let r = run(root
        .cmd("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_drover"))
        .args(["realise", &drv]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().collect::<Vec<_>>(), outs);
    root.verify_store();
}

/// Bad arguments: a missing derivation, a path outside the store, a missing file,
/// a dangling symlink; the same exit code and stderr as Nix.
#[test]
fn bad_arguments_match_nix() {
    require_nix!();
    let root = TestRoot::new();
    let dangling = root.path().join("dangling");
    std::os::unix::fs::symlink("/nonexistent/x", &dangling).unwrap();
    let missing = format!("{}/00000000000000000000000000000000-x.drv", root.store_dir);
    for arg in [
        missing.as_str(),
        "/tmp",
        "/nonexistent/foo",
        dangling.to_str().unwrap(),
    ] {
        let nix = nix_realise(&root, &[arg]);
        let ours = drover_realise(&root, &[arg]);
        assert_eq!(ours.code, nix.code, "{arg}: {}", ours.stderr);
        assert_eq!(ours.stderr, nix.stderr, "{arg}");
    }
}

/// An input-addressed derivation with one of three outputs deleted: both tools
/// rebuild it and print the same.
#[test]
fn partly_valid_input_addressed_derivation_rebuilds() {
    require_nix!();
    let root = TestRoot::new();
    let corpus = corpus_dir().join("corpus.nix");
    let drv = root.instantiate(&corpus, Some("multi")).remove(0);
    let outs = root.realise(&[drv.as_str()]);
    let doc = outs.iter().find(|p| p.ends_with("-doc")).unwrap();
    root.run("nix-store", &["--delete", doc]);
    let snap = snapshot(&root);
    let nix = nix_realise(&root, &[&drv]);
    restore(&root, &snap);
    let ours = drover_realise(&root, &[&drv]);
    assert_eq!(ours.code, nix.code, "{}", ours.stderr);
    assert_eq!(ours.stdout, nix.stdout);
    assert_eq!(ours.stderr, nix.stderr);
    root.verify_store();
}
