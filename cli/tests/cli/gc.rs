//! `drover realise` next to Nix 2.8's garbage collector, each scenario run once with
//! `nix-store --realise` and once with `drover realise`, in fresh roots, with the
//! same checks (the expressions are `tests/data/nix/gc/gc.nix`):
//!
//! * Nix's tests/gc-concurrent.sh: `nix-collect-garbage` while a build waits on a
//!   fifo keeps the output being built, its `.lock` and the inputs; afterwards, with
//!   the builder gone, the collector deletes them;
//! * Nix's tests/gc-non-blocking.sh: a collector holding its lock (stopped at its
//!   test synchronisation point) does not block a build, and learns of the build's
//!   paths over its socket: the output survives, garbage does not;
//! * `--add-root` (and `--indirect`): the same symlink names, printed paths and
//!   indirect roots as `nix-store`, and the same errors;
//! * a stress test: 50 rounds of a substitution and a build of two seconds, each
//!   with `nix-store --gc` run over and over meanwhile; no build fails, nothing in
//!   use goes, and the store verifies;
//! * `umask 000`: nothing either tool creates is writable by others;
//! * a substitution killed with `kill -9` halfway, then run again: the same store
//!   entries afterwards, no temporary left.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::drover;
use crate::nix_env::{corpus_dir, TestRoot};

/// Generous: a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug)]
enum Tool {
    Nix,
    Drover,
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

fn expr() -> PathBuf {
    corpus_dir().join("gc/gc.nix")
}

/// `nix-instantiate gc.nix -A attr --argstr k v ...`: the `.drv`.
fn instantiate(root: &TestRoot, attr: &str, args: &[(&str, &str)]) -> String {
    let e = expr();
    let mut a = vec![e.to_str().unwrap(), "-A", attr];
    for (k, v) in args {
        a.extend(["--argstr", k, v]);
    }
    let out = root.run("nix-instantiate", &a);
    out.trim().to_owned()
}

fn output_of(root: &TestRoot, drv: &str) -> String {
    root.run("nix-store", &["-q", drv]).trim().to_owned()
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

/// Opens a fifo (blocking until the other end opens) on a thread, so a peer that
/// never comes makes the test fail after [`TIMEOUT`] instead of hanging it.
fn with_fifo(p: &Path, write: bool) -> Vec<u8> {
    let (tx, rx) = mpsc::channel();
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

/// Waits for a child, killing it after [`TIMEOUT`].
fn wait(mut c: Child, what: &str) -> std::process::Output {
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

#[track_caller]
fn ok(out: &std::process::Output, what: &str) {
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

/// tests/gc-concurrent.sh of Nix 2.8, with `tool` doing every realisation.
fn gc_concurrent_with(tool: Tool) {
    let root = TestRoot::new();
    let fifo = root.path().join("test1.fifo");
    mkfifo(&fifo);
    let drv1 = instantiate(&root, "test1", &[("lockFifo", fifo.to_str().unwrap())]);
    let out1 = output_of(&root, &drv1);
    let drv2 = instantiate(&root, "test2", &[]);
    let out2 = output_of(&root, &drv2);
    let drv3 = instantiate(&root, "simple", &[]);
    let r = realise(&root, tool).arg(&drv3).output().unwrap();
    ok(&r, "realising simple");
    let out3 = String::from_utf8(r.stdout).unwrap().trim().to_owned();
    let lock3 = format!("{out3}.lock");
    assert!(!exists(&lock3), "{tool:?} left {lock3}");
    File::create(&lock3).unwrap();
    let gcroots = root.state_dir.join("gcroots");
    std::os::unix::fs::symlink(&drv2, gcroots.join("foo")).unwrap();
    std::os::unix::fs::symlink(&out3, gcroots.join("foo2")).unwrap();

    let build1 = realise(&root, tool)
        .arg(&drv1)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the build of drv1 has started
    assert_eq!(with_fifo(&fifo, false), b"Build started\n");
    let gc = root.cmd("nix-collect-garbage").output().unwrap();
    ok(&gc, "nix-collect-garbage");
    with_fifo(&fifo, true);
    let r1 = wait(build1, "the build of test1");
    ok(
        &r1,
        &format!("{tool:?} building test1 during the collection"),
    );
    // neither the output being built nor its inputs were collected
    assert_eq!(
        std::fs::read_to_string(format!("{out1}/foobar")).unwrap(),
        "FOOBAR\n"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{out1}/input-2/bar")).unwrap(),
        "BAR\n"
    );
    // drv2 is a root: it builds
    let r2 = realise(&root, tool).arg(&drv2).output().unwrap();
    ok(&r2, "building test2");
    assert_eq!(
        std::fs::read_to_string(format!("{out2}/foobar")).unwrap(),
        "FOOBARxyzzy\n"
    );
    std::fs::remove_file(gcroots.join("foo")).unwrap();
    std::fs::remove_file(gcroots.join("foo2")).unwrap();
    // the collector deleted the lock of a path built before
    assert!(!exists(&lock3));
    // with the builders gone, their temporary roots are stale: all is garbage now
    let gc = root.cmd("nix-collect-garbage").output().unwrap();
    ok(&gc, "nix-collect-garbage");
    assert!(!exists(&out1), "{tool:?}: {out1} survived");
    assert!(!exists(&out2), "{tool:?}: {out2} survived");
    root.verify_store();
}

#[test]
fn gc_concurrent_keeps_what_is_being_built() {
    require_nix!();
    gc_concurrent_with(Tool::Nix);
    gc_concurrent_with(Tool::Drover);
}

/// tests/gc-non-blocking.sh of Nix 2.8: the collector waits at its test
/// synchronisation point (`_NIX_TEST_GC_SYNC`) holding the GC lock; the build runs
/// meanwhile and releases it.
fn gc_non_blocking_with(tool: Tool) {
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
    // the derivation exists before the collector starts (nix-build would
    // instantiate it while the collector waits; the root keeps it in both cases)
    let drv = instantiate(&root, "nonBlocking", &[("sync", sync.to_str().unwrap())]);
    let out = output_of(&root, &drv);
    let gc = root
        .cmd("sh")
        .arg("-c")
        .arg(format!(
            "nix-store --gc; s=$?; rm '{}'; exit $s",
            running.display()
        ))
        .env("_NIX_TEST_GC_SYNC", &fifo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait until the collector holds its lock
    let lock = root.state_dir.join("gc-socket/socket");
    let start = Instant::now();
    while !lock.exists() {
        assert!(start.elapsed() < TIMEOUT, "the collector did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let result = root.path().join("result");
    let r = realise(&root, tool)
        .arg("--add-root")
        .arg(&result)
        .arg("--indirect")
        .arg("--max-silent-time")
        .arg("60")
        .arg(&drv)
        .output()
        .unwrap();
    ok(&r, &format!("{tool:?} building while the collector runs"));
    assert_eq!(
        String::from_utf8(r.stdout).unwrap(),
        format!("{}\n", result.display())
    );
    let g = wait(gc, "nix-store --gc");
    ok(&g, "nix-store --gc");
    assert!(!running.exists());
    assert!(!exists(&dummy), "{tool:?}: the garbage {dummy} survived");
    assert!(exists(&out), "{tool:?}: the new output {out} was collected");
    assert_eq!(std::fs::read_link(&result).unwrap(), Path::new(&out));
    root.verify_store();
}

#[test]
fn gc_non_blocking() {
    require_nix!();
    gc_non_blocking_with(Tool::Nix);
    gc_non_blocking_with(Tool::Drover);
}

/// What `--add-root` leaves: the printed lines, the root symlinks (name → target)
/// and the indirect roots' targets, with the root's prefix as `@ROOT@`.
struct Roots {
    code: i32,
    stdout: String,
    stderr_errors: Vec<String>,
    links: BTreeMap<String, String>,
    auto: Vec<String>,
}

fn add_root_run(tool: Tool, args: &dyn Fn(&TestRoot) -> Vec<String>) -> Roots {
    let root = TestRoot::new();
    let a = args(&root);
    let r = realise(&root, tool)
        .current_dir(root.path())
        .args(&a)
        .output()
        .unwrap();
    let norm = |s: &str| s.replace(root.path().to_str().unwrap(), "@ROOT@");
    let mut links = BTreeMap::new();
    for e in std::fs::read_dir(root.path()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_symlink() {
            let t = std::fs::read_link(e.path()).unwrap();
            links.insert(name, without_hash(&norm(t.to_str().unwrap())));
        }
    }
    let mut auto: Vec<String> = std::fs::read_dir(root.state_dir.join("gcroots/auto"))
        .map(|d| {
            d.map(|e| {
                norm(
                    std::fs::read_link(e.unwrap().path())
                        .unwrap()
                        .to_str()
                        .unwrap(),
                )
            })
            .collect()
        })
        .unwrap_or_default();
    auto.sort();
    // the roots hold: the collector keeps every output
    let gc = root.cmd("nix-store").arg("--gc").output().unwrap();
    ok(&gc, "nix-store --gc");
    for name in links.keys() {
        assert!(
            root.path().join(name).exists(),
            "{tool:?}: the target of root {name} was collected"
        );
    }
    Roots {
        code: r.status.code().unwrap_or(-1),
        stdout: norm(&String::from_utf8_lossy(&r.stdout)),
        stderr_errors: String::from_utf8_lossy(&r.stderr)
            .lines()
            .filter(|l| l.starts_with("error:") || l.starts_with("warning:"))
            .map(norm)
            .collect(),
        links,
        auto,
    }
}

/// `@ROOT@/store/<hash>-name` as `@ROOT@/store/…-name`: each root has its own store
/// dir, so its own hashes.
fn without_hash(p: &str) -> String {
    match p.strip_prefix("@ROOT@/store/") {
        Some(rest) if rest.len() > 33 => format!("@ROOT@/store/…{}", &rest[32..]),
        _ => p.to_owned(),
    }
}

/// Both tools, the same arguments (built from each tool's own root).
fn compare_add_root(args: &dyn Fn(&TestRoot) -> Vec<String>) -> Roots {
    let nix = add_root_run(Tool::Nix, args);
    let drover = add_root_run(Tool::Drover, args);
    assert_eq!(nix.code, drover.code, "exit codes");
    assert_eq!(nix.stdout, drover.stdout, "stdout");
    assert_eq!(
        nix.stderr_errors, drover.stderr_errors,
        "error and warning lines"
    );
    assert_eq!(nix.links, drover.links, "root symlinks");
    assert_eq!(nix.auto, drover.auto, "indirect roots");
    nix
}

#[test]
fn add_root_as_nix_store() {
    require_nix!();
    let corpus = corpus_dir().join("corpus.nix");
    let drv =
        move |root: &TestRoot, attr: &str| root.instantiate(&corpus, Some(attr)).pop().unwrap();
    // several arguments, several outputs, an output subset, a plain store path,
    // a relative root name
    let r = compare_add_root(&|root: &TestRoot| {
        let multi = drv(root, "multi");
        let simple = drv(root, "simple");
        let src = root.path().join("plain.txt");
        std::fs::write(&src, "plain\n").unwrap();
        let plain = root.run("nix-store", &["--add", src.to_str().unwrap()]);
        vec![
            "--add-root".into(),
            "res".into(),
            "--indirect".into(),
            multi.clone(),
            format!("{multi}!dev"),
            simple,
            plain.trim().to_owned(),
        ]
    });
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("@ROOT@/res-2-dev\n"), "{}", r.stdout);
    assert_eq!(r.links.len(), 6, "{:?}", r.links);
    // an existing file that is not a link into the store is not replaced
    let r = compare_add_root(&|root: &TestRoot| {
        std::fs::write(root.path().join("taken"), "mine\n").unwrap();
        vec!["--add-root".into(), "taken".into(), drv(root, "simple")]
    });
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr_errors,
        ["error: cannot create symlink '@ROOT@/taken'; already exists"]
    );
    // ... but an old root pointing into the store is
    let r = compare_add_root(&|root: &TestRoot| {
        let old = root.realise(&[&drv(root, "multi")]).pop().unwrap();
        std::os::unix::fs::symlink(old, root.path().join("again")).unwrap();
        vec!["--add-root".into(), "again".into(), drv(root, "simple")]
    });
    assert_eq!(r.code, 0);
    // no root inside the store
    let r = compare_add_root(&|root: &TestRoot| {
        vec![
            "--add-root".into(),
            format!("{}/in-store", root.store_dir),
            drv(root, "simple"),
        ]
    });
    assert_eq!(r.code, 1);
}

/// 50 rounds: each builds an input, substitutes another from a binary cache,
/// and then runs a two-second build of a fresh derivation, with `nix-store --gc`
/// run again and again for as long as the build runs, and the previous round's root removed first so the collector has garbage
/// to delete meanwhile. Every build must succeed with the expected output, and the
/// store must verify at the end.
#[test]
fn stress_builds_next_to_a_collector() {
    require_nix!();
    const ROUNDS: usize = 50;
    let root = TestRoot::new();
    let started = Instant::now();
    // All rounds' derivations at once, rooted (as a caller's instantiation would
    // be), so that only what drover does is at stake.
    let all = |attr: &str| -> Vec<String> {
        let e = format!(
            "builtins.genList (r: (import {} {{ round = toString r; }}).{attr}) {ROUNDS}",
            expr().display()
        );
        root.run("nix-instantiate", &["-E", &e])
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let drvs = all("work");
    assert_eq!(drvs.len(), ROUNDS);
    for (i, d) in drvs.iter().enumerate() {
        let link = root.state_dir.join(format!("gcroots/drv-{i}"));
        std::os::unix::fs::symlink(d, link).unwrap();
    }
    // Each round's `cached` input is in a binary cache, and not in the store: drover
    // substitutes it while the collector runs.
    let cached = all("cached");
    let mut args = vec!["--realise", "-j2"];
    args.extend(cached.iter().map(String::as_str));
    let outs: Vec<String> = root
        .run("nix-store", &args)
        .lines()
        .map(str::to_owned)
        .collect();
    let cache = format!("file://{}", root.path().join("cache").display());
    let mut args = vec!["copy", "--to", &cache];
    args.extend(outs.iter().map(String::as_str));
    root.run("nix", &args);
    root.run("nix-store", &["--gc"]);
    assert!(!Path::new(&outs[0]).exists());
    let results = root.path().join("results");
    std::fs::create_dir(&results).unwrap();
    let mut collections = 0;
    for (r, drv) in drvs.iter().enumerate() {
        if r > 0 {
            std::fs::remove_file(results.join(format!("r{}", r - 1))).unwrap();
        }
        let link = results.join(format!("r{r}"));
        let build = drover(&root)
            .args(["realise", "--add-root"])
            .arg(&link)
            .args(["--option", "substituters", &cache])
            .args(["--option", "require-sigs", "false"])
            .arg(drv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut build = Some(build);
        let mut finished = None;
        while finished.is_none() {
            let gc = root.cmd("nix-store").arg("--gc").output().unwrap();
            // Nix 2.8's runtime-root scan fails when a process exits between
            // listing /proc and opening its fd directory (it tolerates ENOENT,
            // not ESRCH): the collector's own bug, not drover's; run it again.
            let stderr = String::from_utf8_lossy(&gc.stderr);
            if !gc.status.success() && stderr.contains("/fd: No such process") {
                continue;
            }
            ok(&gc, "nix-store --gc");
            collections += 1;
            if build.as_mut().unwrap().try_wait().unwrap().is_some() {
                finished = Some(wait(build.take().unwrap(), "drover realise"));
            }
            assert!(started.elapsed() < Duration::from_secs(600), "too slow");
        }
        let out = finished.unwrap();
        ok(
            &out,
            &format!("round {r}: drover realise next to nix-store --gc"),
        );
        let o = std::fs::read_link(&link).unwrap();
        assert!(
            o.exists(),
            "round {r}: the rooted output {} was collected after drover exited",
            o.display()
        );
        assert_eq!(
            std::fs::read_to_string(o.join("dep")).unwrap(),
            format!("dep {r}\n"),
            "round {r}"
        );
        assert_eq!(
            std::fs::read_to_string(o.join("src")).unwrap(),
            format!("source {r}\n")
        );
        assert_eq!(
            std::fs::read_to_string(o.join("cached")).unwrap(),
            format!("cached {r}\n")
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("copying path '"),
            "round {r}: nothing substituted: {err}"
        );
        assert!(o.join("step-7").exists());
        assert!(
            o.join("dep-link/x").exists(),
            "round {r}: the input was collected"
        );
    }
    // one more collection: the last output and its input stay, nothing is broken
    let gc = root.cmd("nix-store").arg("--gc").output().unwrap();
    ok(&gc, "nix-store --gc");
    root.verify_store();
    eprintln!(
        "stress: {ROUNDS} rounds, {collections} collections, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Directories and files under `dir` (symlinks left out) that others may write,
/// relative to `dir`, and the modes of the directories `nix-store` creates.
fn permissions(dir: &Path) -> (Vec<String>, BTreeMap<String, u32>) {
    use std::os::unix::fs::PermissionsExt;
    let mut writable = Vec::new();
    let mut walk = vec![dir.to_owned()];
    while let Some(d) = walk.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.file_type().is_symlink() {
                continue;
            }
            if m.permissions().mode() & 0o002 != 0 {
                writable.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
            if m.is_dir() {
                walk.push(e.path());
            }
        }
    }
    writable.sort();
    let mut modes = BTreeMap::new();
    for d in [
        "store",
        "store/.links",
        "var/nix",
        "var/nix/db",
        "var/nix/db/db.sqlite",
        "var/nix/temproots",
        "var/nix/gcroots",
        "var/nix/profiles",
        "var/log/nix",
        "var/log/nix/drvs",
    ] {
        if let Ok(m) = std::fs::metadata(dir.join(d)) {
            modes.insert(d.to_owned(), m.permissions().mode() & 0o7777);
        }
    }
    (writable, modes)
}

/// Under `umask 000`, Nix sets its own umask (022): nothing it creates — store,
/// `.links`, database, logs — is writable by others. drover, creating the same
/// root from nothing, leaves the same modes.
#[test]
fn umask_000_creates_nothing_world_writable() {
    require_nix!();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let nix = TestRoot::new();
    let e = nix.path().join("hello.nix");
    std::fs::write(
        &e,
        "derivation { name = \"hello\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [\"-c\" \"echo hi; echo hello > $out\"]; }",
    )
    .unwrap();
    let script = format!(
        "umask 000 && d=$(nix-instantiate {}) && nix-store --realise $d",
        e.display()
    );
    let r = nix.cmd("sh").args(["-c", &script]).output().unwrap();
    ok(&r, "nix under umask 000");
    let drv = Path::new(env!("CARGO_BIN_EXE_drover"));
    let dr = TestRoot::new();
    let script = format!(
        "umask 000 && d=$('{p}' derivation add {j}) && '{p}' realise $d",
        p = drv.to_str().unwrap(),
        j = examples.join("hello.drv.json").display()
    );
    let r = dr.cmd("sh").args(["-c", &script]).output().unwrap();
    ok(&r, "drover under umask 000");
    let (nix_w, nix_modes) = permissions(nix.path());
    let (dr_w, dr_modes) = permissions(dr.path());
    // the test roots' own tmp directories are made by the test, not the tools
    let filter = |v: Vec<String>| -> Vec<String> {
        v.into_iter().filter(|p| !p.starts_with("tmp")).collect()
    };
    assert_eq!(filter(nix_w), Vec::<String>::new(), "Nix");
    assert_eq!(filter(dr_w), Vec::<String>::new(), "drover");
    assert_eq!(nix_modes.len(), 10, "{nix_modes:?}");
    assert_eq!(nix_modes, dr_modes);
}

/// A substitution killed (`kill -9`) halfway through unpacking a NAR, then run
/// again: the output a tool builds (`big`, 40 files of 16 KiB, in a cache with
/// uncompressed NARs whose server stops sending halfway through the first try).
/// Returns the store's entries after the kill and after the rerun, hashes left out.
fn killed_substitution(tool: Tool) -> (Vec<String>, Vec<String>) {
    use crate::http_server::{Action, HttpServer};
    let root = TestRoot::new();
    let e = root.path().join("big.nix");
    std::fs::write(
        &e,
        r#"derivation { name = "big"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
            args = ["-c" "mkdir $out; i=0; while [ $i -lt 40 ]; do head -c 16384 /dev/zero | tr '\\0' x > $out/f$i; i=$((i+1)); done"]; }"#,
    )
    .unwrap();
    let drv = root.instantiate(&e, None).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let cache = root.path().join("cache");
    root.run(
        "nix",
        &[
            "copy",
            "--to",
            &format!("file://{}?compression=none", cache.display()),
            &out,
        ],
    );
    root.wipe_store();
    let drv = root.instantiate(&e, None).remove(0);
    let server = HttpServer::with_policy(&cache, |r| {
        if r.path.starts_with("/nar/") {
            Action::Stall(r.file_len() / 2)
        } else {
            Action::Serve
        }
    });
    let args = |c: &mut Command| {
        c.args(["--option", "substituters", &server.url()])
            .args(["--option", "require-sigs", "false"])
            .arg(&drv);
    };
    let listing = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&root.store_dir)
            .unwrap()
            .map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                match n.get(33..) {
                    Some(rest) if n.as_bytes().get(32) == Some(&b'-') => rest.to_owned(),
                    _ => n,
                }
            })
            .collect();
        v.sort();
        v
    };
    let mut first = realise(&root, tool);
    args(&mut first);
    let mut child = first
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // killed once the unpacking has begun (the server has stalled by then)
    let start = Instant::now();
    while !listing()
        .iter()
        .any(|n| n.starts_with("big") && !n.ends_with(".lock"))
    {
        assert!(
            start.elapsed() < TIMEOUT,
            "{tool:?}: the substitution never began to unpack"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = listing();
    server.set_policy(|_| Action::Serve);
    let mut again = realise(&root, tool);
    args(&mut again);
    let r = again.output().unwrap();
    ok(&r, &format!("{tool:?}: substituting again after kill -9"));
    assert_eq!(String::from_utf8(r.stdout).unwrap().trim(), out);
    root.verify_store();
    (after_kill, listing())
}

/// Nix 2.8 unpacks into the final path under its lock, and whoever takes the lock
/// next deletes what a dead process left there; drover unpacks into
/// `<path>.drover-tmp` under the same lock and removes it the same way. After the
/// rerun both stores hold the same entries, no temporary among them.
#[test]
fn killed_substitution_leaves_nothing_after_a_rerun() {
    require_nix!();
    let (nix_killed, nix_after) = killed_substitution(Tool::Nix);
    let (drover_killed, drover_after) = killed_substitution(Tool::Drover);
    assert!(
        drover_killed.iter().any(|n| n.ends_with(".drover-tmp")),
        "the kill came too late to test anything: {drover_killed:?}"
    );
    assert!(nix_killed.contains(&"big".to_owned()), "{nix_killed:?}");
    assert_eq!(drover_after, nix_after);
    assert!(
        !drover_after.iter().any(|n| n.contains("drover")),
        "{drover_after:?}"
    );
}
