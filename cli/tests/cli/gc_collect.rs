//! `drover gc` next to `nix-store --gc` / `--delete` on identical roots.
//!
//! A root is set up once (`tests/data/nix/gc/collect.nix` built by Nix; roots made
//! directly in `gcroots/`, indirectly through `gcroots/auto/`, by a profile, by a
//! live process's working directory and another's open file; a stale indirect
//! root, a root to an invalid path, a leftover `.lock`, an entry that is no store
//! path) and copied aside. For each tool the copy is put back at the same place,
//! so store paths, sizes and directory order are the same; the live processes are
//! started; the tool runs; then everything observable is compared: exit status,
//! stdout, stderr (as a sorted list of lines: `deleting '…'` comes in the order
//! of the store directory, which may differ between two copies), the rows of
//! `ValidPaths`, `Refs` and `DerivationOutputs`, the store's entries, and what is
//! left in `gcroots/auto`, `db/` and `temproots/`.
//!
//! Then two concurrent scenarios: a build in progress under `drover realise`
//! survives `drover gc` (its temporary roots), and `nix-store --realise` started
//! while `drover gc` holds its lock (stopped at Nix's test synchronisation point
//! `_NIX_TEST_GC_SYNC`) reaches it over `gc-socket/socket`, so its output stays.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::drover;
use crate::nix_env::{corpus_dir, TestRoot};

/// Generous: a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tool {
    Nix,
    Drover,
}

/// The collector of `tool` with `args` (`--delete …` becomes `nix-store --delete …`).
fn collector(root: &TestRoot, tool: Tool, args: &[String]) -> Command {
    match tool {
        Tool::Nix => {
            let mut c = root.cmd("nix-store");
            if args.first().map(String::as_str) == Some("--delete") {
                c.args(args);
            } else {
                c.arg("--gc").args(args);
            }
            c
        }
        Tool::Drover => {
            let mut c = drover(root);
            c.arg("gc").args(args);
            c
        }
    }
}

/// A set-up root and its copy.
struct Scenario {
    root: TestRoot,
    snapshot: tempfile::TempDir,
    /// attribute → output path
    out: std::collections::BTreeMap<String, String>,
}

fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

impl Scenario {
    fn new(conf: &str) -> Scenario {
        Self::with(conf, |_, _| {})
    }

    /// [`Scenario::new`], with `extra` run on the root before it is copied.
    fn with(
        conf: &str,
        extra: impl FnOnce(&TestRoot, &std::collections::BTreeMap<String, String>),
    ) -> Scenario {
        let root = TestRoot::with_conf(conf);
        let expr = corpus_dir().join("gc/collect.nix");
        let drvs = root.instantiate(&expr, None);
        let outs = root.realise(&drvs.iter().map(String::as_str).collect::<Vec<_>>());
        let mut out = std::collections::BTreeMap::new();
        for o in outs {
            let name = o[root.store_dir.len() + 34..].to_owned();
            out.insert(name, o);
        }
        let state = &root.state_dir;
        let link = |target: &str, at: &Path| {
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, at).unwrap();
        };
        link(&out["top"], &state.join("gcroots/top"));
        link(&out["half1"], &state.join("gcroots/deeper/half"));
        let lonelink = root.path().join("lonelink");
        link(&out["lone"], &lonelink);
        link(lonelink.to_str().unwrap(), &state.join("gcroots/auto/lone"));
        link(
            root.path().join("gone").to_str().unwrap(),
            &state.join("gcroots/auto/stale"),
        );
        link(
            &format!("{}/00000000000000000000000000000000-gone", root.store_dir),
            &state.join("gcroots/invalid"),
        );
        link(&out["prof"], &state.join("profiles/prof-1-link"));
        File::create(format!("{}.lock", out["dep"])).unwrap();
        extra(&root, &out);
        let snapshot = tempfile::tempdir().unwrap();
        cp_a(root.path(), snapshot.path());
        Scenario {
            root,
            snapshot,
            out,
        }
    }

    /// Puts the copy back where the root is.
    fn restore(&self) {
        self.root.wipe_store();
        for e in std::fs::read_dir(self.root.path()).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        cp_a(self.snapshot.path(), self.root.path());
    }

    /// Restores the root, starts the processes that root `cwd` and `fd`, runs
    /// the collector and observes the result.
    fn run(&self, tool: Tool, args: &[String], junk: bool) -> Observed {
        self.restore();
        if junk {
            std::fs::write(format!("{}/junk", self.root.store_dir), "junk\n").unwrap();
        }
        let live = LiveProcesses::start(&self.out["cwd"], &self.out["fd"]);
        let out = wait(
            collector(&self.root, tool, args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            &format!("{tool:?} gc {args:?}"),
        );
        drop(live);
        Observed::of(&self.root, &out)
    }
}

/// `sleep`s in the store: one with its working directory in a store path, one
/// with a store file as its stdin. Killed when dropped.
struct LiveProcesses(Vec<Child>);

impl LiveProcesses {
    fn start(cwd: &str, fd: &str) -> LiveProcesses {
        let a = Command::new("sleep")
            .arg("600")
            .current_dir(cwd)
            .spawn()
            .unwrap();
        let b = Command::new("sleep")
            .arg("600")
            .stdin(File::open(fd).unwrap())
            .spawn()
            .unwrap();
        // both have exec'd once /proc shows sleep as their program
        for c in [&a, &b] {
            let start = Instant::now();
            while !std::fs::read_link(format!("/proc/{}/exe", c.id()))
                .is_ok_and(|e| e.to_string_lossy().contains("sleep"))
            {
                assert!(start.elapsed() < TIMEOUT);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        LiveProcesses(vec![a, b])
    }
}

impl Drop for LiveProcesses {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a child, killing it after [`TIMEOUT`].
fn wait(mut c: Child, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if c.try_wait().unwrap().is_some() {
            return c.wait_with_output().unwrap();
        }
        if start.elapsed() > TIMEOUT {
            let _ = c.kill();
            let out = c.wait_with_output().unwrap();
            panic!(
                "{what} did not finish in time:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, PartialEq)]
struct Observed {
    code: Option<i32>,
    stdout: String,
    /// stderr lines, sorted; `/proc/<pid>` as `/proc/PID`
    stderr: Vec<String>,
    /// stderr as printed
    stderr_raw: String,
    valid: Vec<(String, String, i64, Option<String>)>,
    refs: Vec<(String, String)>,
    drv_outputs: Vec<(String, String, String)>,
    store: Vec<String>,
    links: Vec<String>,
    state: Vec<String>,
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `/proc/<pid>/` as `/proc/PID/`: the live processes differ between runs.
fn no_pids(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("/proc/") {
        out.push_str(&rest[..i + 6]);
        rest = &rest[i + 6..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            out.push_str("PID");
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

impl Observed {
    fn of(root: &TestRoot, out: &Output) -> Observed {
        let conn = rusqlite::Connection::open_with_flags(
            root.state_dir.join("db/db.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let valid = conn
            .prepare("select path, hash, narSize, deriver from ValidPaths order by path")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let refs = conn
            .prepare("select a.path, b.path from Refs join ValidPaths a on referrer = a.id join ValidPaths b on reference = b.id order by 1, 2")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let drv_outputs = conn
            .prepare("select v.path, d.id, d.path from DerivationOutputs d join ValidPaths v on drv = v.id order by 1, 2")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut stderr: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(no_pids)
            .collect();
        stderr.sort();
        let mut state = Vec::new();
        for d in ["gcroots", "gcroots/auto", "db", "temproots"] {
            for n in listing(&root.state_dir.join(d)) {
                state.push(format!("{d}/{n}"));
            }
        }
        Observed {
            code: out.status.code(),
            stdout: no_pids(&String::from_utf8_lossy(&out.stdout)),
            stderr,
            stderr_raw: String::from_utf8_lossy(&out.stderr).into_owned(),
            valid,
            refs,
            drv_outputs,
            store: listing(Path::new(&root.store_dir)),
            links: listing(&Path::new(&root.store_dir).join(".links")),
            state,
        }
    }
}

/// Runs `args` under both tools on the scenario and asserts that everything
/// observable is the same; returns what Nix did.
#[track_caller]
fn compare(s: &Scenario, args: &[&str], junk: bool) -> Observed {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let nix = s.run(Tool::Nix, &args, junk);
    let drover = s.run(Tool::Drover, &args, junk);
    let fields = [
        (
            "exit status",
            format!("{:?}", nix.code),
            format!("{:?}", drover.code),
        ),
        ("stdout", nix.stdout.clone(), drover.stdout.clone()),
        ("stderr", nix.stderr.join("\n"), drover.stderr.join("\n")),
        (
            "ValidPaths",
            format!("{:#?}", nix.valid),
            format!("{:#?}", drover.valid),
        ),
        (
            "Refs",
            format!("{:#?}", nix.refs),
            format!("{:#?}", drover.refs),
        ),
        (
            "DerivationOutputs",
            format!("{:#?}", nix.drv_outputs),
            format!("{:#?}", drover.drv_outputs),
        ),
        (
            "store entries",
            nix.store.join("\n"),
            drover.store.join("\n"),
        ),
        (".links", nix.links.join("\n"), drover.links.join("\n")),
        ("state", nix.state.join("\n"), drover.state.join("\n")),
    ];
    for (what, n, d) in fields {
        assert_eq!(n, d, "{what} of {args:?} differ (left: Nix, right: drover)");
    }
    nix
}

fn deleted(o: &Observed) -> Vec<String> {
    o.stderr
        .iter()
        .filter_map(|l| l.strip_prefix("deleting '"))
        .map(|l| l.trim_end_matches('\'').to_owned())
        .collect()
}

/// A store entry's name without its hash part.
fn name_of(p: &str) -> &str {
    let base = p.rsplit('/').next().unwrap();
    match base.get(33..) {
        Some(rest) if base.as_bytes()[32] == b'-' => rest,
        _ => base,
    }
}

#[test]
fn gc_as_nix_store_gc() {
    require_nix!();
    let s = Scenario::new("auto-optimise-store = true");
    let o = compare(&s, &[], true);
    assert_eq!(o.code, Some(0));
    let names: Vec<String> = deleted(&o).iter().map(|p| name_of(p).to_owned()).collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    // the dead outputs, their derivations (keep-derivations keeps only live
    // outputs' ones), the lock and the junk entry; the roots' closures stay
    for n in [
        "dead1",
        "dead2",
        "dead1.drv",
        "twin1",
        "twin2",
        "half2",
        "dep.lock",
        "junk",
    ] {
        assert!(has(n), "{n} not deleted: {names:?}");
    }
    for n in [
        "top", "dep", "lone", "prof", "cwd", "fd", "half1", "top.drv", "dep.drv", "cwd.drv",
    ] {
        assert!(!has(n), "{n} deleted: {names:?}");
    }
    // the 1.5 MB file, one of the twins' files (the other had three links) and
    // the small files and derivations
    assert_eq!(o.stdout, "12 store paths deleted, 1.72 MiB freed\n");
    assert!(o.stderr.contains(&"deleting unused links...".to_owned()));
    assert!(
        o.stderr
            .iter()
            .any(|l| l.starts_with("note: currently hard linking saves ")),
        "{:?}",
        o.stderr
    );
    assert!(o
        .stderr
        .iter()
        .any(|l| l.starts_with("removing stale link from '")));
    assert!(o
        .stderr
        .iter()
        .any(|l| l.starts_with("skipping invalid root from '")));
    // what is left is consistent (drover's run was the last)
    s.root.verify_store();
    // referrers before what they refer to
    let d = s.run(Tool::Drover, &[], false);
    let pos = |n: &str| {
        d.stderr_raw
            .find(&format!("-{n}'\n"))
            .unwrap_or_else(|| panic!("{n}: {}", d.stderr_raw))
    };
    assert!(pos("dead2") < pos("dead1"), "{}", d.stderr_raw);
}

#[test]
fn gc_reports_as_nix_store_gc() {
    require_nix!();
    let s = Scenario::new("");
    let roots = compare(&s, &["--print-roots"], false);
    for n in ["top", "half1", "lone", "prof", "cwd", "fd"] {
        assert!(
            roots.stdout.lines().any(|l| l.ends_with(&format!("-{n}"))),
            "{n} not a root:\n{}",
            roots.stdout
        );
    }
    assert!(
        roots.stdout.contains("/proc/PID/cwd -> "),
        "{}",
        roots.stdout
    );
    assert!(
        roots.stdout.contains("/proc/PID/fd/0 -> "),
        "{}",
        roots.stdout
    );
    let dead = compare(&s, &["--print-dead"], false);
    let live = compare(&s, &["--print-live"], false);
    assert!(dead.stdout.contains("-dead1\n") && !dead.stdout.contains("-top\n"));
    assert!(live.stdout.contains("-top\n") && live.stdout.contains("-top.drv\n"));
}

/// keep-outputs on and keep-derivations off: the derivations of live outputs
/// are dead, the outputs of a live derivation live.
#[test]
fn gc_keep_outputs_as_nix_store_gc() {
    require_nix!();
    let s = Scenario::with(
        "keep-outputs = true\nkeep-derivations = false",
        |root, _| {
            let drv = root.instantiate(&corpus_dir().join("gc/collect.nix"), Some("dead2"));
            std::os::unix::fs::symlink(&drv[0], root.state_dir.join("gcroots/drv")).unwrap();
        },
    );
    let dead = compare(&s, &["--print-dead"], false);
    assert!(dead.stdout.contains("-top.drv\n"), "{}", dead.stdout);
    assert!(!dead.stdout.contains("-dead2\n"), "{}", dead.stdout);
    assert!(!dead.stdout.contains("-dead1\n"), "{}", dead.stdout);
    compare(&s, &["--print-live"], false);
    compare(&s, &[], false);
}

#[test]
fn gc_max_freed_as_nix_store_gc() {
    require_nix!();
    let s = Scenario::new("");
    let o = compare(&s, &["--max-freed", "1"], false);
    assert_eq!(o.code, Some(0));
    assert!(
        o.stderr
            .contains(&"deleted more than 1 bytes; stopping".to_owned()),
        "{:?}",
        o.stderr
    );
    compare(&s, &["--max-freed", "400K"], false);
    let o = compare(&s, &["--max-freed", "0"], false);
    assert_eq!(o.stdout, "0 store paths deleted, 0.00 MiB freed\n");
}

#[test]
fn delete_as_nix_store_delete() {
    require_nix!();
    let s = Scenario::with("", |root, out| {
        std::os::unix::fs::symlink(&out["top"], root.path().join("to-top")).unwrap();
    });
    let p = |n: &str| s.out[n].clone();
    // dead, with its dead referrer given too
    let o = compare(&s, &["--delete", &p("dead2"), &p("dead1")], false);
    assert_eq!(o.code, Some(0));
    assert_eq!(o.stdout, "2 store paths deleted, 1.43 MiB freed\n");
    // live, or referred to: refused with Nix's message, the summary still printed
    for n in ["top", "dead1", "dep"] {
        let o = compare(&s, &["--delete", &p(n)], false);
        assert_eq!(o.code, Some(1));
        assert_eq!(o.stdout, "0 store paths deleted, 0.00 MiB freed\n");
        let msg = format!("error: Cannot delete path '{}' since it is still alive. To find out why, use: nix-store --query --roots", p(n));
        assert!(o.stderr.contains(&msg), "{:?}", o.stderr);
    }
    // through a symlink outside the store, ignoring the roots
    let link = s.root.path().join("to-top");
    let o = compare(
        &s,
        &["--delete", "--ignore-liveness", link.to_str().unwrap()],
        false,
    );
    assert_eq!(o.code, Some(0), "{:?}", o.stderr);
    assert!(
        o.stdout.starts_with("1 store paths deleted"),
        "{}",
        o.stdout
    );
    // not in the store
    let o = compare(&s, &["--delete", "/"], false);
    assert_eq!(o.code, Some(1));
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// Opens a fifo (blocking until the other end opens) on a thread and reads it to
/// the end or writes a line; a peer that never comes fails the test after
/// [`TIMEOUT`] instead of hanging it.
fn with_fifo(p: &Path, write: bool) -> Vec<u8> {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel();
    let path = p.to_owned();
    std::thread::spawn(move || {
        let r = if write {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(b"\n"))
                .map(|_| Vec::new())
        } else {
            File::open(&path).and_then(|mut f| {
                let mut v = Vec::new();
                f.read_to_end(&mut v).map(|_| v)
            })
        };
        let _ = tx.send(r);
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(r) => r.unwrap(),
        Err(_) => {
            use std::os::unix::fs::OpenOptionsExt;
            // release the blocked thread before failing
            let _ = std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_NONBLOCK)
                .open(p);
            panic!("nobody opened the fifo '{}' in time", p.display());
        }
    }
}

#[track_caller]
fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn exists(p: &str) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn realise(root: &TestRoot, tool: Tool) -> Command {
    match tool {
        Tool::Nix => {
            let mut c = root.cmd("nix-store");
            c.arg("--realise");
            c
        }
        Tool::Drover => {
            let mut c = drover(root);
            c.arg("realise");
            c
        }
    }
}

fn gc_nix(root: &TestRoot, attr: &str, args: &[(&str, &str)]) -> String {
    let e = corpus_dir().join("gc/gc.nix");
    let mut a = vec![e.to_str().unwrap(), "-A", attr];
    for (k, v) in args {
        a.extend(["--argstr", k, v]);
    }
    root.run("nix-instantiate", &a).trim().to_owned()
}

fn output_of(root: &TestRoot, drv: &str) -> String {
    root.run("nix-store", &["-q", drv]).trim().to_owned()
}

/// Nix's tests/gc-concurrent.sh with `drover gc` as the collector and `builder`
/// building: the output being built (not valid yet), its `.lock` and its inputs
/// are the build's temporary roots and survive; a rooted derivation stays
/// buildable; once the build is over, its paths are garbage like any other.
fn build_survives_drover_gc(builder: Tool) {
    let root = TestRoot::new();
    let fifo = root.path().join("test1.fifo");
    mkfifo(&fifo);
    let drv1 = gc_nix(&root, "test1", &[("lockFifo", fifo.to_str().unwrap())]);
    let out1 = output_of(&root, &drv1);
    let drv2 = gc_nix(&root, "test2", &[]);
    let out2 = output_of(&root, &drv2);
    let drv3 = gc_nix(&root, "simple", &[]);
    let out3 = root.realise(&[&drv3]).remove(0);
    let lock3 = format!("{out3}.lock");
    File::create(&lock3).unwrap();
    let gcroots = root.state_dir.join("gcroots");
    std::os::unix::fs::symlink(&drv2, gcroots.join("foo")).unwrap();
    std::os::unix::fs::symlink(&out3, gcroots.join("foo2")).unwrap();
    let build1 = realise(&root, builder)
        .arg(&drv1)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(with_fifo(&fifo, false), b"Build started\n");
    let gc = drover(&root).arg("gc").output().unwrap();
    ok(&gc, "drover gc during the build");
    let err = String::from_utf8_lossy(&gc.stderr).into_owned();
    assert!(!err.contains(&format!("deleting '{out1}")), "{err}");
    with_fifo(&fifo, true);
    let r1 = wait(build1, "the build of test1");
    ok(&r1, &format!("{builder:?} building test1 during drover gc"));
    assert_eq!(
        std::fs::read_to_string(format!("{out1}/foobar")).unwrap(),
        "FOOBAR\n"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{out1}/input-2/bar")).unwrap(),
        "BAR\n"
    );
    let r2 = realise(&root, builder).arg(&drv2).output().unwrap();
    ok(&r2, "building test2");
    // the lock of a path built before is garbage
    assert!(!exists(&lock3), "{err}");
    assert!(exists(&out3));
    std::fs::remove_file(gcroots.join("foo")).unwrap();
    std::fs::remove_file(gcroots.join("foo2")).unwrap();
    let gc = drover(&root).arg("gc").output().unwrap();
    ok(&gc, "drover gc after the builds");
    assert!(!exists(&out1), "{builder:?}: {out1} survived");
    assert!(!exists(&out2), "{builder:?}: {out2} survived");
    assert!(!exists(&out3), "{builder:?}: {out3} survived");
    root.verify_store();
}

#[test]
fn a_build_in_progress_survives_drover_gc() {
    require_nix!();
    build_survives_drover_gc(Tool::Drover);
    build_survives_drover_gc(Tool::Nix);
}

/// Nix's tests/gc-non-blocking.sh with `drover gc` as the collector: stopped at
/// `_NIX_TEST_GC_SYNC` it holds `gc.lock`, so `builder` cannot record its roots
/// in its file alone and sends them over `gc-socket/socket`; the build finishes
/// while the collector waits, and its output survives the collection that
/// follows, while garbage made before does not.
fn a_root_sent_to_drover_gc_is_kept(builder: Tool) {
    let root = TestRoot::new();
    let sync = root.path().join("sync");
    std::fs::create_dir(&sync).unwrap();
    let fifo = sync.join("fifo");
    mkfifo(&fifo);
    let running = sync.join("running");
    File::create(&running).unwrap();
    let dummy_src = root.path().join("dummy.txt");
    std::fs::write(&dummy_src, "dummy\n").unwrap();
    let dummy = root.run("nix-store", &["--add", dummy_src.to_str().unwrap()]);
    let dummy = dummy.trim().to_owned();
    let drv = gc_nix(&root, "nonBlocking", &[("sync", sync.to_str().unwrap())]);
    let out = output_of(&root, &drv);
    let gc = drover(&root)
        .arg("gc")
        .env("_NIX_TEST_GC_SYNC", &fifo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the socket is made once the collector holds its lock
    let socket = root.state_dir.join("gc-socket/socket");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < TIMEOUT, "drover gc did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = root.path().join("result");
    let r = realise(&root, builder)
        .arg("--add-root")
        .arg(&result)
        .arg("--indirect")
        .arg(&drv)
        .output()
        .unwrap();
    ok(&r, &format!("{builder:?} building while drover gc runs"));
    std::fs::remove_file(&running).unwrap();
    let g = wait(gc, "drover gc");
    ok(&g, "drover gc");
    let err = String::from_utf8_lossy(&g.stderr).into_owned();
    assert!(
        !exists(&dummy),
        "{builder:?}: the garbage {dummy} survived:\n{err}"
    );
    assert!(
        exists(&out),
        "{builder:?}: the new output {out} was collected:\n{err}"
    );
    assert!(exists(&drv), "{builder:?}: {drv} was collected:\n{err}");
    root.verify_store();
}

#[test]
fn a_root_sent_over_the_socket_is_kept_by_drover_gc() {
    require_nix!();
    a_root_sent_to_drover_gc_is_kept(Tool::Nix);
    a_root_sent_to_drover_gc_is_kept(Tool::Drover);
}

/// With `keep-outputs` (and `ca-derivations`, as in every test root), a live
/// floating content-addressed derivation's output is live, known only from its
/// realisation. (Nix 2.8 finds no deriver for such an output — it has no
/// `DerivationOutputs` row — so if the store directory lists it before its
/// derivation, it is dead too and deleted: drover does the same, in the same
/// order.)
#[test]
fn gc_keeps_ca_outputs_of_live_derivations_as_nix() {
    require_nix!();
    let s = Scenario::with("keep-outputs = true", |root, _| {
        let e = root.path().join("ca.nix");
        std::fs::write(
            &e,
            r#"let d = name: extra: derivation ({ inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo ${name} > $out"]; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; } // extra);
               in { kept = d "ca-kept" {}; gone = d "ca-gone" {}; }"#,
        )
        .unwrap();
        let drvs = root.instantiate(&e, None);
        root.realise(&drvs.iter().map(String::as_str).collect::<Vec<_>>());
        let kept = drvs.iter().find(|d| d.ends_with("-ca-kept.drv")).unwrap();
        std::os::unix::fs::symlink(kept, root.state_dir.join("gcroots/ca")).unwrap();
    });
    let live = compare(&s, &["--print-live"], false);
    assert!(live.stdout.contains("-ca-kept\n"), "{}", live.stdout);
    assert!(!live.stdout.contains("-ca-gone\n"), "{}", live.stdout);
    let dead = compare(&s, &["--print-dead"], false);
    assert!(dead.stdout.contains("-ca-gone\n"), "{}", dead.stdout);
    compare(&s, &[], false);
}

/// Bad command lines: the same exit status and error line as `nix-store --gc`
/// (the `Try '… --help'` line names each tool); `--delete` of nothing collects
/// nothing and says so in both.
#[test]
fn gc_usage_as_nix_store() {
    require_nix!();
    let root = TestRoot::new();
    let first_error = |o: &Output| {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .find(|l| l.starts_with("error: "))
            .map(str::to_owned)
    };
    for args in [&["foo"][..], &["--max-freed", "x"], &["--max-freed", "1.5"]] {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let nix = collector(&root, Tool::Nix, &args).output().unwrap();
        let dr = collector(&root, Tool::Drover, &args).output().unwrap();
        assert_eq!(nix.status.code(), Some(1), "{args:?}");
        assert_eq!(dr.status.code(), Some(1), "{args:?}");
        assert_eq!(first_error(&nix), first_error(&dr), "{args:?}");
    }
    let args = vec!["--delete".to_owned()];
    let nix = collector(&root, Tool::Nix, &args).output().unwrap();
    let dr = collector(&root, Tool::Drover, &args).output().unwrap();
    ok(&nix, "nix-store --delete");
    ok(&dr, "drover gc --delete");
    assert_eq!(nix.stdout, dr.stdout);
    assert_eq!(
        String::from_utf8_lossy(&dr.stdout),
        "0 store paths deleted, 0.00 MiB freed\n"
    );
}

/// A smaller stress test with `drover gc` as the collector: 8 rounds of a
/// two-second build of a fresh derivation (two inputs built in the same run) by
/// `drover realise`, `drover gc` run again and again meanwhile, the previous
/// round's result unrooted first so the collector has garbage to delete. Every
/// build succeeds with its inputs in place; the store verifies at the end.
#[test]
fn stress_builds_next_to_drover_gc() {
    require_nix!();
    const ROUNDS: usize = 8;
    let root = TestRoot::new();
    let started = Instant::now();
    let e = format!(
        "builtins.genList (r: (import {} {{ round = toString r; }}).work) {ROUNDS}",
        corpus_dir().join("gc/gc.nix").display()
    );
    let drvs: Vec<String> = root
        .run("nix-instantiate", &["-E", &e])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(drvs.len(), ROUNDS);
    for (i, d) in drvs.iter().enumerate() {
        std::os::unix::fs::symlink(d, root.state_dir.join(format!("gcroots/drv-{i}"))).unwrap();
    }
    let results = root.path().join("results");
    std::fs::create_dir(&results).unwrap();
    let mut collections = 0;
    for (r, drv) in drvs.iter().enumerate() {
        if r > 0 {
            std::fs::remove_file(results.join(format!("r{}", r - 1))).unwrap();
        }
        let link = results.join(format!("r{r}"));
        let mut build = Some(
            drover(&root)
                .args(["realise", "--add-root"])
                .arg(&link)
                .arg(drv)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut finished = None;
        while finished.is_none() {
            let gc = drover(&root).arg("gc").output().unwrap();
            ok(&gc, "drover gc");
            collections += 1;
            if build.as_mut().unwrap().try_wait().unwrap().is_some() {
                finished = Some(wait(build.take().unwrap(), "drover realise"));
            }
            assert!(started.elapsed() < Duration::from_secs(600), "too slow");
        }
        let out = finished.unwrap();
        ok(
            &out,
            &format!("round {r}: drover realise next to drover gc"),
        );
        let o = std::fs::read_link(&link).unwrap();
        assert_eq!(
            std::fs::read_to_string(o.join("dep")).unwrap(),
            format!("dep {r}\n"),
            "round {r}"
        );
        assert_eq!(
            std::fs::read_to_string(o.join("cached")).unwrap(),
            format!("cached {r}\n")
        );
        assert!(o.join("step-7").exists());
        assert!(
            o.join("dep-link/x").exists(),
            "round {r}: the input was collected"
        );
    }
    let gc = drover(&root).arg("gc").output().unwrap();
    ok(&gc, "drover gc");
    root.verify_store();
    eprintln!(
        "stress: {ROUNDS} rounds, {collections} drover gc runs, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
