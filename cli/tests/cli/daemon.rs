//! `drover daemon` against `nix-daemon`: the same Nix 2.8 clients, with
//! `NIX_REMOTE=daemon`, run the same scenario against each daemon on the same
//! test root (the store wiped in between, so paths are identical), and see the
//! same exit codes, output and messages. Raw protocol clients check the bytes
//! of error replies and that garbage from one client never takes the daemon
//! down.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nix_env::{corpus_dir, TestRoot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Nix,
    Drover,
}

/// A daemon serving a test root; killed (SIGTERM, then SIGKILL) and reaped on drop.
pub(crate) struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    pub(crate) fn start(root: &TestRoot, which: Which) -> Daemon {
        let socket = root.state_dir.join("daemon-socket/socket");
        let _ = std::fs::remove_file(&socket);
        // The database first: on a fresh root, nix-daemon's first two
        // connections (the probe below and the test's) race to create it, and
        // the loser dies with "SQLite database ... is busy", its client reset.
        root.run("nix-store", &["--init"]);
        let mut cmd = match which {
            Which::Nix => root.cmd("nix-daemon"),
            Which::Drover => {
                let mut c = root.cmd(env!("CARGO_BIN_EXE_drover"));
                c.arg("daemon");
                c
            }
        };
        let log = std::fs::File::create(root.path().join(format!("{which:?}-daemon.log"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon { child, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&d.socket).is_err() {
            assert!(Instant::now() < deadline, "{which:?} daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Nix client talking to the root's daemon.
pub(crate) fn client(root: &TestRoot, program: &str) -> Command {
    let mut c = root.cmd(program);
    c.env("NIX_REMOTE", "daemon");
    c
}

/// What one client command showed: exit code, stdout, stderr.
fn run(c: &mut Command) -> String {
    let out = c.output().unwrap(); // stdin: null unless the caller set one
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(c: &mut Command) -> String {
    let out = c.output().unwrap(); // stdin: null unless the caller set one
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn corpus() -> String {
    corpus_dir().join("corpus.nix").to_str().unwrap().to_owned()
}

/// The scenario both daemons serve: adding, building, querying, exporting.
fn scenario(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let _d = Daemon::start(root, which);
    let mut t = Vec::new();
    let hello = corpus_dir().join("hello.txt");
    let hello = hello.to_str().unwrap();
    t.push((
        "nix-store --add".into(),
        run(client(root, "nix-store").args(["--add", hello])),
    ));
    t.push((
        "nix-store --add again".into(),
        run(client(root, "nix-store").args(["--add", hello])),
    ));
    for args in [
        vec!["--add-fixed", "sha256", hello],
        vec!["--add-fixed", "sha1", hello],
        vec!["--add-fixed", "--recursive", "sha512", hello],
    ] {
        t.push((
            format!("nix-store {}", args[..args.len() - 1].join(" ")),
            run(client(root, "nix-store").args(&args)),
        ));
    }
    let c = corpus();
    t.push((
        "nix-build chain3".into(),
        run(client(root, "nix-build").args([&c, "-A", "chain3", "--no-out-link"])),
    ));
    let out = stdout(client(root, "nix-build").args([&c, "-A", "chain3", "--no-out-link"]));
    let out = out.trim().to_owned();
    let drv = stdout(client(root, "nix-store").args(["-q", "--deriver", &out]));
    let drv = drv.trim().to_owned();
    for q in [
        "--references",
        "--referrers",
        "--deriver",
        "--requisites",
        "--hash",
        "--size",
    ] {
        t.push((
            format!("nix-store -q {q} out"),
            run(client(root, "nix-store").args(["-q", q, &out])),
        ));
    }
    t.push((
        "nix-store -q --outputs drv".into(),
        run(client(root, "nix-store").args(["-q", "--outputs", &drv])),
    ));
    t.push((
        "nix-store -q --referrers simple".into(),
        run(client(root, "nix-store").args(["-q", "--referrers-closure", &drv])),
    ));
    let info = stdout(client(root, "nix").args(["path-info", "--json", "-r", &out]));
    let mut info: serde_json::Value = serde_json::from_str(&info).unwrap();
    for i in info.as_array_mut().unwrap() {
        i.as_object_mut().unwrap().remove("registrationTime");
    }
    t.push(("nix path-info --json -r".into(), info.to_string()));
    t.push((
        "nix-store -r drv (valid)".into(),
        run(client(root, "nix-store").args(["-r", &drv])),
    ));
    t.push((
        "nix log".into(),
        run(client(root, "nix").args(["log", &drv])),
    ));
    let export = client(root, "nix-store")
        .args(["--export", &out])
        .output()
        .unwrap();
    assert!(export.status.success());
    t.push((
        "nix-store --export".into(),
        format!("{} bytes, sha256 {}", export.stdout.len(), {
            drover::hash::HashAlgo::Sha256
                .digest(&export.stdout)
                .encode(drover::hash::Encoding::Base16)
        }),
    ));
    // drover and Nix may start independent builds in different orders: compare
    // the lines of this one sorted.
    let diamond = run(client(root, "nix").args(["build", "-f", &c, "diamondTop", "--no-link"]));
    let mut lines: Vec<&str> = diamond.lines().collect();
    lines.sort();
    t.push(("nix build diamondTop".into(), lines.join("\n")));
    let fail = corpus_dir().join("realise/fail.nix");
    t.push((
        "nix-build fails".into(),
        run(client(root, "nix-build").args([
            fail.to_str().unwrap(),
            "-A",
            "fails",
            "--no-out-link",
        ])),
    ));
    t.push((
        "nix build -L fails".into(),
        run(client(root, "nix").args([
            "build",
            "-f",
            fail.to_str().unwrap(),
            "fails",
            "--no-link",
            "-L",
        ])),
    ));
    t.push((
        "nix build --log-format internal-json fine".into(),
        internal_json(&run(client(root, "nix").args([
            "build",
            "-f",
            fail.to_str().unwrap(),
            "fine",
            "--no-link",
            "-v",
            "--log-format",
            "internal-json",
        ]))),
    ));
    // One key for both daemons, so that the signatures compare.
    let key = root.path().join("signing-key");
    if !key.exists() {
        let k = stdout(
            root.cmd("nix")
                .args(["key", "generate-secret", "--key-name", "test-1"]),
        );
        std::fs::write(&key, k).unwrap();
    }
    t.push((
        "nix store sign".into(),
        run(client(root, "nix").args(["store", "sign", "-k", key.to_str().unwrap(), &out])),
    ));
    t.push((
        "nix path-info --sigs".into(),
        run(client(root, "nix").args(["path-info", "--sigs", &out])),
    ));
    // What the second half imports into an empty store.
    let keep = root.path().join(format!("{which:?}-kept"));
    std::fs::create_dir_all(&keep).unwrap();
    let closure = stdout(client(root, "nix-store").args(["-qR", &out]));
    let mut args = vec!["--export"];
    args.extend(closure.lines());
    let export = client(root, "nix-store").args(&args).output().unwrap();
    assert!(export.status.success());
    std::fs::write(keep.join("closure.export"), &export.stdout).unwrap();
    let cache = format!("file://{}", keep.join("cache").display());
    t.push((
        "nix copy --to file://".into(),
        run(client(root, "nix").args(["copy", "--to", &cache, &out])),
    ));
    t.push((
        "nix-shell --run".into(),
        run(client(root, "nix-shell").args([
            &c,
            "-A",
            "simple",
            "--run",
            "echo in the shell of $name",
        ])),
    ));
    let profile = keep.join("profile");
    t.push((
        "nix-env -i into a profile".into(),
        run(client(root, "nix-env").args([
            "-p",
            profile.to_str().unwrap(),
            "-f",
            &c,
            "-iA",
            "simple",
        ])),
    ));
    t.push((
        "nix-env -q".into(),
        run(client(root, "nix-env").args(["-p", profile.to_str().unwrap(), "-q"])),
    ));
    t.push((
        "nix-store -q invalid".into(),
        run(client(root, "nix-store").args([
            "-q",
            "--references",
            &format!("{}/00000000000000000000000000000000-x", root.store_dir),
        ])),
    ));
    t
}

/// The second half, on an empty store: importing what the first exported,
/// copying from the cache it wrote.
fn scenario_import(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let keep = root.path().join(format!("{which:?}-kept"));
    // The first half's cache as the substituter, for daemon and clients alike.
    let conf = root.conf_dir.join("nix.conf");
    let original = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        format!(
            "{original}\nsubstituters = file://{}\nrequire-sigs = false\n",
            keep.join("cache").display()
        ),
    )
    .unwrap();
    let d = Daemon::start(root, which);
    let mut t = Vec::new();
    let c = corpus();
    // drover's Worker reports progress once more than Nix's here (before the
    // substitute's sizes are known): the activities are compared, not the
    // progress reports.
    let without_progress = |s: String| {
        s.lines()
            .filter(|l| {
                !(l.contains("\"action\":\"result\"")
                    && (l.contains("\"type\":105") || l.contains("\"type\":106")))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    t.push((
        "nix build (substituted) internal-json".into(),
        without_progress(internal_json(&run(client(root, "nix").args([
            "build",
            "-f",
            &c,
            "chain3",
            "--no-link",
            "--log-format",
            "internal-json",
        ])))),
    ));
    t.push((
        "nix-store -q --hash (substituted)".into(),
        run(client(root, "nix-build").args([&c, "-A", "chain3", "--no-out-link"])),
    ));
    drop(d);
    std::fs::write(&conf, original).unwrap();
    let _d = Daemon::start(root, which);
    let export = std::fs::File::open(keep.join("closure.export")).unwrap();
    let out = client(root, "nix-store")
        .arg("--import")
        .stdin(export)
        .output()
        .unwrap();
    t.push((
        "nix-store --import".into(),
        format!(
            "exit {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ));
    let imported = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = imported.lines().last().unwrap_or_default().to_owned();
    t.push((
        "nix-store -q --references imported".into(),
        run(client(root, "nix-store").args(["-q", "--references", &last])),
    ));
    let cache = format!("file://{}", keep.join("cache").display());
    let simple = stdout(client(root, "nix-instantiate").args([&c, "-A", "simple"]));
    let simple_out = stdout(client(root, "nix-store").args(["-q", "--outputs", simple.trim()]));
    t.push((
        "nix copy --from file:// (unsigned)".into(),
        run(client(root, "nix").args(["copy", "--from", &cache, &last])),
    ));
    t.push((
        "nix copy --from file:// --no-check-sigs".into(),
        run(client(root, "nix").args(["copy", "--no-check-sigs", "--from", &cache, &last])),
    ));
    t.push((
        "nix-store --verify --check-contents".into(),
        run(client(root, "nix-store").args(["--verify", "--check-contents"])),
    ));
    // A modified path is reported as Nix reports it.
    let victim = Path::new(&last);
    assert!(victim.exists(), "{} was not imported", victim.display());
    {
        let mut perm = std::fs::metadata(victim).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        std::fs::set_permissions(victim, perm).unwrap();
        std::fs::write(victim, "tampered\n").unwrap();
        t.push((
            "nix-store --verify --check-contents (modified)".into(),
            run(client(root, "nix-store").args(["--verify", "--check-contents"])),
        ));
    }
    t.push((
        "nix-store --check-validity".into(),
        run(client(root, "nix-store").args(["--check-validity", &last, simple_out.trim()])),
    ));
    t
}

/// `--log-format internal-json` output with activity ids numbered in order of
/// appearance (they are pid-based) and the messages Nix prints only as a local
/// store dropped.
fn internal_json(s: &str) -> String {
    let mut ids: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    for line in s.lines() {
        let Some(j) = line.strip_prefix("@nix ") else {
            out.push(line.to_owned());
            continue;
        };
        let mut v: serde_json::Value = serde_json::from_str(j).unwrap();
        for key in ["id", "parent"] {
            if let Some(n) = v.get(key).and_then(|x| x.as_u64()) {
                let k = if n == 0 {
                    0
                } else {
                    match ids.iter().position(|&i| i == n) {
                        Some(p) => p + 1,
                        None => {
                            ids.push(n);
                            ids.len()
                        }
                    }
                };
                v[key] = k.into();
            }
        }
        out.push(v.to_string());
    }
    out.join("\n")
}

#[test]
fn nix_clients_see_the_same_through_drover_daemon_as_through_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let wipe = || {
        root.wipe_store();
        let _ = std::fs::remove_dir_all(&root.log_dir);
    };
    let mut nix = scenario(&root, Which::Nix);
    wipe();
    nix.extend(scenario_import(&root, Which::Nix));
    wipe();
    let mut ours = scenario(&root, Which::Drover);
    wipe();
    ours.extend(scenario_import(&root, Which::Drover));
    assert_eq!(nix.len(), ours.len());
    for ((label, n), (_, o)) in nix.iter().zip(&ours) {
        // Each daemon kept its exports and cache in a directory of its own.
        let (n, o) = (
            n.replace("Nix-kept", "KEPT"),
            o.replace("Drover-kept", "KEPT"),
        );
        assert_eq!(
            o, n,
            "{label}: drover daemon (left) differs from nix-daemon (right)"
        );
    }
}

fn w64(v: &mut Vec<u8>, n: u64) {
    v.extend_from_slice(&n.to_le_bytes());
}

fn wstr(v: &mut Vec<u8>, s: &[u8]) {
    w64(v, s.len() as u64);
    v.extend_from_slice(s);
    v.extend(std::iter::repeat_n(0u8, (8 - s.len() % 8) % 8));
}

/// A Nix 2.8 client's greeting: magic, version 1.34, no CPU affinity, no
/// reserveSpace.
fn greeting() -> Vec<u8> {
    let mut v = Vec::new();
    w64(&mut v, 0x6e697863);
    w64(&mut v, 0x122);
    w64(&mut v, 0);
    w64(&mut v, 0);
    v
}

/// Sends `bytes` on a new connection and returns everything the daemon sends
/// until it closes the connection (or 60 s pass).
fn exchange(socket: &Path, bytes: &[u8], close_write: bool) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = s.write_all(bytes);
    if close_write {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// Raw requests whose replies must be byte-identical: unknown and retired
/// operation codes, a path outside the store, a valid query then EOF.
fn raw_requests(store_dir: &str) -> Vec<(&'static str, Vec<u8>)> {
    let mut v = Vec::new();
    for (label, op) in [
        ("op 99", 99u64),
        ("op 24 (QueryFailedPaths)", 24),
        ("op 0", 0),
    ] {
        let mut b = greeting();
        w64(&mut b, op);
        v.push((label, b));
    }
    let mut b = greeting();
    w64(&mut b, 1); // IsValidPath
    wstr(&mut b, b"/nonexistent/x");
    v.push(("IsValidPath outside the store", b));
    let mut b = greeting();
    w64(&mut b, 1);
    wstr(
        &mut b,
        format!("{store_dir}/00000000000000000000000000000000-x").as_bytes(),
    );
    w64(&mut b, 23); // QueryAllValidPaths
    v.push(("IsValidPath, QueryAllValidPaths, EOF", b));
    let mut b = greeting();
    w64(&mut b, 26); // QueryPathInfo of an invalid path
    wstr(
        &mut b,
        format!("{store_dir}/00000000000000000000000000000000-x").as_bytes(),
    );
    w64(&mut b, 20); // CollectGarbage with ignoreLiveness
    w64(&mut b, 0);
    w64(&mut b, 0);
    w64(&mut b, 1);
    w64(&mut b, 0);
    for _ in 0..3 {
        w64(&mut b, 0);
    }
    v.push(("QueryPathInfo invalid, CollectGarbage ignoring liveness", b));
    let mut b = greeting();
    w64(&mut b, 1);
    w64(&mut b, 5); // a string cut short
    b.extend_from_slice(b"/x");
    v.push(("truncated string", b));
    let mut b = Vec::new();
    w64(&mut b, 0x1234);
    v.push(("bad magic", b));
    v
}

#[test]
fn error_replies_are_byte_identical_to_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let mut replies = Vec::new();
    for which in [Which::Nix, Which::Drover] {
        let d = Daemon::start(&root, which);
        let mut r = Vec::new();
        for (label, bytes) in raw_requests(&root.store_dir) {
            r.push((label, exchange(&d.socket, &bytes, true)));
        }
        replies.push(r);
        drop(d);
        root.wipe_store();
    }
    let mut differ = Vec::new();
    for ((label, n), (_, o)) in replies[0].iter().zip(&replies[1]) {
        if o != n {
            differ.push(format!(
                "{label}:\n  drover:     {:?}\n  nix-daemon: {:?}",
                String::from_utf8_lossy(o),
                String::from_utf8_lossy(n)
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

#[test]
fn garbage_from_one_client_never_takes_the_daemon_down() {
    require_nix!();
    let root = TestRoot::new();
    let mut d = Daemon::start(&root, Which::Drover);
    let hello = corpus_dir().join("hello.txt");
    let added = stdout(client(&root, "nix-store").args(["--add", hello.to_str().unwrap()]));
    let added = added.trim().to_owned();
    let works = |what: &str| {
        let out = client(&root, "nix-store")
            .args(["-q", "--hash", &added])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "after {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A client that connects and says nothing must not block the others.
    let idle = UnixStream::connect(&d.socket).unwrap();
    let mut idle_greeted = UnixStream::connect(&d.socket).unwrap();
    idle_greeted.write_all(&greeting()).unwrap();
    works("idle clients");
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut b = greeting();
    w64(&mut b, 1);
    w64(&mut b, u64::MAX); // a string of 2^64-1 bytes
    cases.push(("an oversized string", b));
    let mut b = greeting();
    w64(&mut b, 31); // QueryValidPaths with 2^60 paths
    w64(&mut b, 1 << 60);
    cases.push(("an oversized collection", b));
    let mut b = greeting();
    w64(&mut b, 44); // AddMultipleToStore, then a huge frame
    w64(&mut b, 0);
    w64(&mut b, 0);
    w64(&mut b, u64::MAX);
    cases.push(("an oversized frame", b));
    let mut b = greeting();
    w64(&mut b, 44); // AddMultipleToStore, a frame cut short
    w64(&mut b, 0);
    w64(&mut b, 0);
    w64(&mut b, 1000);
    b.extend_from_slice(&[7u8; 100]);
    cases.push(("a truncated frame", b));
    let mut b = greeting();
    w64(&mut b, 39); // AddToStoreNar of garbage
    wstr(
        &mut b,
        format!("{}/00000000000000000000000000000000-x", root.store_dir).as_bytes(),
    );
    wstr(&mut b, b"");
    wstr(&mut b, &[b'0'; 64]);
    w64(&mut b, 0);
    w64(&mut b, 0);
    w64(&mut b, 8);
    w64(&mut b, 0);
    w64(&mut b, 0);
    wstr(&mut b, b"");
    w64(&mut b, 0);
    w64(&mut b, 1);
    w64(&mut b, 16);
    b.extend_from_slice(b"not a nar at all");
    w64(&mut b, 0);
    cases.push(("a NAR that is not one", b));
    // Pseudo-random bytes after a greeting, from a fixed seed.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..20 {
        let mut b = greeting();
        for _ in 0..(i * 37 % 300) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push(x as u8);
        }
        cases.push(("random bytes", b));
    }
    for (what, bytes) in &cases {
        exchange(&d.socket, bytes, true);
        assert!(d.alive(), "the daemon died after {what}");
        works(what);
    }
    // The NAR that was not one left no valid path behind.
    let out = client(&root, "nix-store")
        .args([
            "--check-validity",
            &format!("{}/00000000000000000000000000000000-x", root.store_dir),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    drop(idle);
    drop(idle_greeted);
    works("closing the idle clients");
    assert!(d.alive());
}

#[test]
fn two_clients_building_the_same_derivations_at_once_both_succeed_with_one_build_each() {
    require_nix!();
    let root = TestRoot::new();
    let _d = Daemon::start(&root, Which::Drover);
    let counter = root.path().join("counter");
    let file = corpus_dir().join("realise/concurrent.nix");
    let spawn = || {
        client(&root, "nix-build")
            .args([file.to_str().unwrap(), "-A", "top", "--no-out-link"])
            .args(["--argstr", "counter", counter.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn();
    let b = spawn();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(a.stdout, b.stdout);
    let mut built: Vec<String> = std::fs::read_to_string(&counter)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    built.sort();
    assert_eq!(built, ["bottom", "c1", "c2", "c3", "left", "right", "top"]);
}

/// `--stdio`: one connection on stdin/stdout, as `nix-daemon --stdio`. With
/// `len`, reads that many bytes before closing stdin (nix-daemon takes a hang-up
/// of its input as an interrupt and stops at once); without, reads to EOF.
fn stdio_exchange(root: &TestRoot, which: Which, bytes: &[u8], len: Option<usize>) -> Vec<u8> {
    // Under `timeout`, so that a daemon that sends less than expected cannot
    // hang the test.
    let mut cmd = root.cmd("timeout");
    cmd.arg("120");
    match which {
        Which::Nix => cmd.arg("nix-daemon"),
        Which::Drover => cmd.args([env!("CARGO_BIN_EXE_drover"), "daemon"]),
    };
    let mut child = cmd
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(bytes).unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut out = Vec::new();
    match len {
        Some(n) => {
            out.resize(n, 0);
            let r = stdout.read_exact(&mut out);
            drop(stdin);
            let _ = child.wait();
            r.unwrap();
        }
        None => {
            drop(stdin);
            stdout.read_to_end(&mut out).unwrap();
            assert!(child.wait().unwrap().success());
        }
    }
    out
}

#[test]
fn stdio_serves_one_connection_as_nix_daemon_stdio() {
    require_nix!();
    let root = TestRoot::new();
    let hello = corpus_dir().join("hello.txt");
    let added = root.run("nix-store", &["--add", hello.to_str().unwrap()]);
    let mut b = greeting();
    w64(&mut b, 1); // IsValidPath
    wstr(&mut b, added.trim().as_bytes());
    w64(&mut b, 26); // QueryPathInfo
    wstr(&mut b, added.trim().as_bytes());
    w64(&mut b, 6); // QueryReferrers
    wstr(&mut b, added.trim().as_bytes());
    w64(&mut b, 29); // QueryPathFromHashPart
    wstr(
        &mut b,
        &added.trim().rsplit('/').next().unwrap().as_bytes()[..32],
    );
    let ours = stdio_exchange(&root, Which::Drover, &b, None);
    assert!(ours.len() > 100, "{ours:?}");
    let nix = stdio_exchange(&root, Which::Nix, &b, Some(ours.len()));
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&nix)
    );
}

#[test]
fn socket_activation_serves_the_socket_systemd_passes() {
    require_nix!();
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let root = TestRoot::new();
    // A socket elsewhere than the default path, as a unit's ListenStream may be.
    let path = root.path().join("activated.socket");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = root.cmd("sh");
    cmd.args([
        "-c",
        &format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec {} daemon",
            env!("CARGO_BIN_EXE_drover")
        ),
    ]);
    // SAFETY: only dup2 between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it then.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _d = Daemon {
        child,
        socket: path.clone(),
    };
    drop(listener);
    let hello = corpus_dir().join("hello.txt");
    let store = format!("unix://{}", path.display());
    let out =
        stdout(
            root.cmd("nix-store")
                .args(["--store", &store, "--add", hello.to_str().unwrap()]),
        );
    assert!(out.trim().ends_with("-hello.txt"), "{out}");
    assert!(!root.state_dir.join("daemon-socket/socket").exists());
    // A wrong LISTEN_PID is refused with Nix's message.
    let out = root
        .cmd(env!("CARGO_BIN_EXE_drover"))
        .arg("daemon")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: unexpected systemd environment variables\n"
    );
}

/// What an unprivileged user (`nobody`, through `setpriv`) sees from a daemon:
/// allowed to add, refused to import unsigned paths, to sign and to repair.
fn untrusted_scenario(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let _d = Daemon::start(root, which);
    let c = corpus();
    let out = stdout(client(root, "nix-build").args([&c, "-A", "chain1", "--no-out-link"]));
    let out = out.trim().to_owned();
    let drv = stdout(client(root, "nix-store").args(["-q", "--deriver", &out]));
    let export = client(root, "nix-store")
        .args(["--export", &out])
        .output()
        .unwrap();
    let home = root.path().join(format!("{which:?}-home"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let export_file = home.join("export");
    std::fs::write(&export_file, &export.stdout).unwrap();
    let data = home.join("data");
    std::fs::write(&data, "an unprivileged user's file\n").unwrap();
    let key = home.join("key");
    let k = stdout(
        root.cmd("nix")
            .args(["key", "generate-secret", "--key-name", "test-1"]),
    );
    std::fs::write(&key, k).unwrap();
    for f in [&export_file, &data, &key] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    let nobody = |args: &[&str]| {
        let mut c = client(root, "setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        c.args(args);
        c.env("HOME", &home);
        c
    };
    vec![
        (
            "nobody: nix-store --add".into(),
            run(&mut nobody(&["nix-store", "--add", data.to_str().unwrap()])),
        ),
        (
            "nobody: nix-store --import (unsigned)".into(),
            run(nobody(&["nix-store", "--import"])
                .stdin(std::fs::File::open(&export_file).unwrap())),
        ),
        (
            "nobody: nix store sign".into(),
            run(&mut nobody(&[
                "nix",
                "store",
                "sign",
                "-k",
                key.to_str().unwrap(),
                &out,
            ])),
        ),
        (
            "nobody: nix-store -r --repair".into(),
            run(&mut nobody(&["nix-store", "-r", "--repair", drv.trim()])),
        ),
        (
            "nobody: nix-store -q --references".into(),
            run(&mut nobody(&["nix-store", "-q", "--references", &out])),
        ),
    ]
}

#[test]
fn an_unprivileged_user_is_refused_what_nix_daemon_refuses() {
    require_nix!();
    if unsafe { libc::geteuid() } != 0 {
        // Only root can switch to `nobody`; CI runs the tests as root.
        assert!(
            std::env::var_os("DROVER_REQUIRE_NIX").is_none(),
            "this test needs root"
        );
        eprintln!("SKIPPED an_unprivileged_user_is_refused_what_nix_daemon_refuses: not root");
        return;
    }
    let root = TestRoot::new();
    let nix = untrusted_scenario(&root, Which::Nix);
    root.wipe_store();
    let ours = untrusted_scenario(&root, Which::Drover);
    let said = |i: usize, what: &str| {
        assert!(ours[i].1.contains(what), "{}: {}", ours[i].0, ours[i].1);
    };
    said(0, "exit Some(0)");
    said(1, "because it lacks a valid signature");
    said(2, "you are not privileged to add signatures");
    said(
        3,
        "repairing is not allowed because you are not in 'trusted-users'",
    );
    said(4, "exit Some(0)");
    for ((label, n), (_, o)) in nix.iter().zip(&ours) {
        let (n, o) = (
            n.replace("Nix-home", "HOME"),
            o.replace("Drover-home", "HOME"),
        );
        assert_eq!(
            o, n,
            "{label}: drover daemon (left) differs from nix-daemon (right)"
        );
    }
}

/// `run` with stdout's lines sorted: the collector prints paths in no set order.
/// The link of `nix-build`'s temporary root to its derivation is named after
/// the client's pid (`<tmp>/nix-build-<pid>-0/result`, its `auto/` name a hash of
/// that): both are replaced.
fn run_sorted(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let mut lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    lines.sort_unstable();
    let stderr: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| match l.strip_prefix("removing stale link from ") {
            Some(rest) if rest.contains("/nix-build-") => {
                "removing stale link from <auto> to <nix-build result>".to_owned()
            }
            _ => l.to_owned(),
        })
        .collect();
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        lines.join("\n"),
        stderr.join("\n")
    )
}

/// Waits (up to 20 s) until no temporary-roots file is left in the root, as when
/// no client is connected and nothing builds; returns the names still there.
fn temp_roots_once_idle(root: &TestRoot) -> Vec<String> {
    let dir = root.state_dir.join("temproots");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() || Instant::now() > deadline {
            return names;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw client that sent `AddTempRoot` for `path` and got its answer; the root
/// lasts as long as the connection.
fn hold_temp_root(socket: &Path, path: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut b = greeting();
    w64(&mut b, 11); // AddTempRoot
    wstr(&mut b, path.as_bytes());
    s.write_all(&b).unwrap();
    // The answer ends with STDERR_LAST and the result 1.
    let mut end = Vec::new();
    w64(&mut end, 0x616c7473);
    w64(&mut end, 1);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&end) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the daemon hung up before answering AddTempRoot");
        got.extend_from_slice(&buf[..n]);
    }
    s
}

/// Builds, roots and collects on an empty root through one daemon: what each
/// collector command showed, the temporary-roots files left when the daemon was
/// idle, and the valid paths at the end.
fn gc_scenario(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let d = Daemon::start(root, which);
    let mut t = Vec::new();
    let c = corpus();
    let result = root.path().join("result");
    let result = result.to_str().unwrap();
    t.push((
        "nix-build chain3 -o result".into(),
        run(client(root, "nix-build").args([&c, "-A", "chain3", "-o", result])),
    ));
    let kept = stdout(client(root, "nix-build").args([&c, "-A", "pathInput", "--no-out-link"]));
    let kept = kept.trim().to_owned();
    t.push(("nix-build pathInput".into(), kept.clone()));
    let hello = corpus_dir().join("hello.txt");
    let added = stdout(client(root, "nix-store").args(["--add", hello.to_str().unwrap()]));
    let added = added.trim().to_owned();
    t.push(("nix-store --add".into(), added.clone()));
    let gc = |t: &mut Vec<(String, String)>, label: &str| {
        t.push((
            format!("temp roots once idle, {label}"),
            format!("{:?}", temp_roots_once_idle(root)),
        ));
        for what in ["--print-dead", "--print-live"] {
            t.push((
                format!("nix-store --gc {what}, {label}"),
                run_sorted(client(root, "nix-store").args(["--gc", what])),
            ));
        }
    };
    gc(&mut t, "after the builds");
    {
        let _conn = hold_temp_root(&d.socket, &kept);
        t.push((
            "nix-store --gc --print-dead, a client holding a temp root".into(),
            run_sorted(client(root, "nix-store").args(["--gc", "--print-dead"])),
        ));
        // Nix's own collector, on the store directly, reads the daemon's files too.
        t.push((
            "local nix-store --gc --print-dead, a client holding a temp root".into(),
            run_sorted(root.cmd("nix-store").args(["--gc", "--print-dead"])),
        ));
        t.push((
            "nix-store --delete, a client holding a temp root".into(),
            run(client(root, "nix-store").args(["--delete", &kept])),
        ));
    }
    gc(&mut t, "that client gone");
    let chain3 = std::fs::read_link(result).unwrap();
    let chain3 = chain3.to_str().unwrap().to_owned();
    t.push((
        "nix-store --delete a rooted path".into(),
        run(client(root, "nix-store").args(["--delete", &chain3])),
    ));
    t.push((
        "nix-store --delete dead paths".into(),
        run(client(root, "nix-store").args(["--delete", &added, &kept])),
    ));
    std::fs::remove_file(result).unwrap();
    gc(&mut t, "result removed");
    t.push((
        "nix-collect-garbage".into(),
        run_sorted(&mut client(root, "nix-collect-garbage")),
    ));
    gc(&mut t, "after nix-collect-garbage");
    t.push((
        "valid paths".into(),
        run_sorted(client(root, "nix").args(["path-info", "--all"])),
    ));
    drop(d);
    t
}

#[test]
fn nix_collect_garbage_through_drover_daemon_as_through_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let nix = gc_scenario(&root, Which::Nix);
    root.wipe_store();
    let ours = gc_scenario(&root, Which::Drover);
    assert_eq!(nix.len(), ours.len());
    for ((label, n), (_, o)) in nix.iter().zip(&ours) {
        assert_eq!(
            o, n,
            "{label}: drover daemon (left) differs from nix-daemon (right)"
        );
    }
}

fn wait_for(path: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Client A wants `shared` and `onlyA`, client B only `shared`; A is killed
/// once both build and B waits too: `onlyA`'s builder is killed and its output
/// never registered, `shared` finishes and B succeeds, the store verifies.
fn killed_client_scenario(which: Which) {
    let root = TestRoot::with_conf("max-jobs = 2");
    let _d = Daemon::start(&root, which);
    let marks = root.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let file = corpus_dir().join("daemon/cancel.nix");
    let build = |attr: &str| {
        client(&root, "nix-build")
            .args([file.to_str().unwrap(), "-A", attr, "--no-out-link"])
            .args(["--argstr", "marks", marks.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut a = build("a");
    wait_for(&marks.join("shared-started"), 60);
    wait_for(&marks.join("only-a-started"), 60);
    let b = build("b");
    // B's request has reached the daemon once it instantiated and asked.
    std::thread::sleep(Duration::from_millis(1500));
    a.kill().unwrap();
    a.wait().unwrap();
    let b = b.wait_with_output().unwrap();
    assert!(
        b.status.success(),
        "{which:?}: {}",
        String::from_utf8_lossy(&b.stderr)
    );
    // Long enough for an `onlyA` builder left running to finish.
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        !marks.join("only-a-finished").exists(),
        "{which:?}: the builder only the killed client wanted ran to its end"
    );
    let drv = root.instantiate(&file_with_marks(&file, &marks), Some("onlyA"));
    let out = stdout(client(&root, "nix-store").args(["-q", "--outputs", &drv[0]]));
    let valid = client(&root, "nix-store")
        .args(["--check-validity", out.trim()])
        .output()
        .unwrap();
    assert!(!valid.status.success(), "{which:?}: {out} was registered");
    root.verify_store();
}

/// A file calling `file` with `marks`, for `nix-instantiate`.
fn file_with_marks(file: &Path, marks: &Path) -> PathBuf {
    let f = marks.with_file_name("with-marks.nix");
    std::fs::write(
        &f,
        format!(
            "import {} {{ marks = \"{}\"; }}",
            file.display(),
            marks.display()
        ),
    )
    .unwrap();
    f
}

#[test]
fn a_client_that_hangs_up_cancels_the_builds_only_it_wanted() {
    require_nix!();
    killed_client_scenario(Which::Nix);
    killed_client_scenario(Which::Drover);
}

/// SIGTERM or SIGINT while a client's build runs: the daemon's exit status and
/// what is left of its socket, then (with `which`'s own checks) what became of
/// the build and the client.
fn signal_scenario(which: Which, sig: i32) -> String {
    let root = TestRoot::new();
    let mut d = Daemon::start(&root, which);
    let marks = root.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let file = corpus_dir().join("daemon/cancel.nix");
    let client_build = client(&root, "nix-build")
        .args([file.to_str().unwrap(), "-A", "onlyA", "--no-out-link"])
        .args(["--argstr", "marks", marks.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&marks.join("only-a-started"), 60);
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(d.child.id() as i32, sig) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{which:?} did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen = format!(
        "exit {:?}, socket file left: {}",
        status.code(),
        d.socket.exists()
    );
    let out = client_build.wait_with_output().unwrap();
    if which == Which::Drover {
        // Nix's daemon leaves the build to its connection's process, which goes
        // on; drover's one process ends it, and tells the client.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("interrupted by the user"), "{stderr}");
        std::thread::sleep(Duration::from_secs(7));
        assert!(
            !marks.join("only-a-finished").exists(),
            "the builder outlived the daemon"
        );
        let leftovers: Vec<String> = std::fs::read_dir(&root.store_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            // The output lock file stays, as Nix leaves it after a build that did
            // not succeed (it deletes lock files only after a success).
            .filter(|n| n.contains("-only-a") && !n.ends_with(".drv") && !n.ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "left in the store: {leftovers:?}");
        assert!(
            temp_roots_once_idle(&root).is_empty(),
            "temporary roots files left"
        );
        root.verify_store();
    }
    seen
}

#[test]
fn sigterm_and_sigint_stop_drover_daemon_as_nix_daemon_with_builds_cancelled() {
    require_nix!();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let nix = signal_scenario(Which::Nix, sig);
        let ours = signal_scenario(Which::Drover, sig);
        assert_eq!(
            ours, nix,
            "signal {sig}: drover daemon (left), nix-daemon (right)"
        );
    }
}

/// A failing and a slow build in one `nix-build`, with and without
/// `--keep-going`: the exit code and whether the slow one was built. (The
/// wording of the `build of … failed` error is not compared: drover's differs.)
fn keep_going_scenario(root: &TestRoot, which: Which) -> Vec<(String, String)> {
    let _d = Daemon::start(root, which);
    let file = corpus_dir().join("daemon/keep-going.nix");
    let file = file.to_str().unwrap();
    let slow_drv = root.instantiate(Path::new(file), Some("slow"));
    let slow = stdout(client(root, "nix-store").args(["-q", "--outputs", &slow_drv[0]]));
    let mut t = Vec::new();
    for flag in ["--no-keep-going", "--keep-going"] {
        let out = client(root, "nix-build")
            .args([file, "-A", "fail", "-A", "slow", "--no-out-link", flag])
            .output()
            .unwrap();
        let built = client(root, "nix-store")
            .args(["--check-validity", slow.trim()])
            .output()
            .unwrap()
            .status
            .success();
        t.push((
            flag.to_owned(),
            format!("exit {:?}, slow built: {built}", out.status.code()),
        ));
    }
    t
}

#[test]
fn keep_going_from_the_client_applies_to_its_run_as_with_nix_daemon() {
    require_nix!();
    let root = TestRoot::with_conf("max-jobs = 2");
    let nix = keep_going_scenario(&root, Which::Nix);
    root.wipe_store();
    let ours = keep_going_scenario(&root, Which::Drover);
    assert_ne!(
        nix[0].1, nix[1].1,
        "the flag must make a difference: {nix:?}"
    );
    for ((label, n), (_, o)) in nix.iter().zip(&ours) {
        assert_eq!(o, n, "{label}: drover daemon (left), nix-daemon (right)");
    }
}

/// Nix 2.8's `substitute-with-invalid-ca.sh` through each daemon: a narinfo
/// whose `CA` was left while its NAR (URL, hashes, sizes) was swapped for another
/// path's is refused by the daemon with Nix's `ca hash mismatch` error, and the
/// path stays invalid.
fn invalid_ca_scenario(root: &TestRoot, which: Which) -> (String, bool) {
    let d = Daemon::start(root, which);
    let cache = root.path().join("ca-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let url = format!("file://{}", cache.display());
    let add = |name: &str, text: &str| {
        let f = root.path().join(name);
        std::fs::write(&f, text).unwrap();
        let out = stdout(client(root, "nix-store").arg("--add").arg(&f));
        out.trim().to_owned()
    };
    let good = add("good.txt", "I'm a good path\n");
    let bad = add("bad.txt", "I'm a bad path\n");
    for p in [&good, &bad] {
        stdout(client(root, "nix").args(["copy", "--to", &url, p]));
    }
    stdout(&mut client(root, "nix-collect-garbage"));
    let narinfo = |p: &str| {
        let base = Path::new(p).file_name().unwrap().to_str().unwrap();
        cache.join(format!("{}.narinfo", &base[..32]))
    };
    let bad_info = std::fs::read_to_string(narinfo(&bad)).unwrap();
    let good_info = std::fs::read_to_string(narinfo(&good)).unwrap();
    let swapped = ["URL", "FileHash", "FileSize", "NarHash", "NarSize"];
    let field = |l: &str| swapped.iter().any(|f| l.starts_with(&format!("{f}:")));
    let mut falsified: String = good_info
        .lines()
        .filter(|l| !field(l))
        .map(|l| format!("{l}\n"))
        .collect();
    for l in bad_info.lines().filter(|l| field(l)) {
        falsified.push_str(l);
        falsified.push('\n');
    }
    std::fs::write(narinfo(&good), falsified).unwrap();
    let copied = run(client(root, "nix").args(["copy", "--from", &url, &good]));
    let valid = client(root, "nix-store")
        .args(["--check-validity", &good])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    drop(d);
    (copied, valid)
}

#[test]
fn a_narinfo_whose_ca_does_not_match_its_nar_is_refused_as_by_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let nix = invalid_ca_scenario(&root, Which::Nix);
    root.wipe_store();
    let ours = invalid_ca_scenario(&root, Which::Drover);
    assert!(
        nix.0.contains("ca hash mismatch importing path"),
        "{}",
        nix.0
    );
    assert!(!nix.1, "nix-daemon made the path valid");
    assert_eq!(ours, nix);
}
