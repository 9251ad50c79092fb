//! Sandboxed builds (`sandbox = true`, busybox as `/bin/sh`) with drover's build
//! primitives, compared with real Nix 2.8 building the same derivations in the same
//! store: outputs, NAR hashes, references, database rows and logs; the view from
//! inside the sandbox; isolation (each check fails without the sandbox and holds
//! with it); `sandbox = relaxed`; build users shared with Nix.
//!
//! The tests need root, user namespaces and `/bin/busybox`; without them they are
//! skipped with a printed reason, or fail when `DROVER_REQUIRE_NIX` is set.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use drover::build::{
    build_blocking, BuildError, BuildMode, BuildOutcome, BuildSettings, BuildSpec,
};
use drover::build_result::BuildStatus;
use drover::config::{Env, SandboxMode, Settings};
use drover::store::LocalStore;
use drover::store_path::StorePath;

use crate::nix_env::TestRoot;
use crate::require_nix;

/// The `nix.conf` lines of a sandboxed root. `/bin/busybox` is there too, for `nc`.
const SANDBOX_CONF: &str = "sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox /bin/busybox\n";

/// Whether sandboxed builds can run here (root, user namespaces, busybox); prints
/// why not, or panics when `DROVER_REQUIRE_NIX` asks for every interop test.
fn sandbox_available(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !drover::build::sandbox::user_namespaces_enabled() {
        Some("user namespaces are not enabled (/proc/sys/user/max_user_namespaces)")
    } else if !Path::new("/bin/busybox").is_file() {
        Some("/bin/busybox is missing (apt-get install busybox-static)")
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

macro_rules! require_sandbox {
    () => {
        require_nix!();
        if !sandbox_available(module_path!()) {
            return;
        }
    };
}

struct Drover {
    store: LocalStore,
    bs: BuildSettings,
}

fn drover(root: &TestRoot) -> Drover {
    let mut env: Env = root
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    let s = Settings::load(&env, &[]).unwrap();
    let mut bs = BuildSettings::from_settings(&s);
    bs.caller_env = Env::new();
    Drover {
        store: LocalStore::open(&s).unwrap(),
        bs,
    }
}

impl Drover {
    fn sp(&self, s: &str) -> StorePath {
        self.store.store_dir().parse(s.trim()).unwrap()
    }

    fn spec(&self, drv: &str, mode: BuildMode) -> BuildSpec {
        let drv_path = self.sp(drv);
        let d = Arc::new(self.store.read_derivation(&drv_path).unwrap());
        let output_paths = d
            .outputs
            .iter()
            .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
            .collect();
        let mut inputs: Vec<StorePath> = d.input_srcs.iter().cloned().collect();
        for (i, outs) in &d.input_drvs {
            let m = self.store.query_derivation_outputs(i).unwrap();
            inputs.extend(outs.iter().map(|o| m[o].clone()));
        }
        BuildSpec {
            drv_path,
            drv: d,
            output_paths,
            input_closure: self.store.compute_closure(&inputs).unwrap(),
            mode,
            keep_failed: false,
            round: Default::default(),
        }
    }

    /// Builds `drv` (inputs valid); the outcome and the log.
    fn try_build(&self, drv: &str) -> Result<(BuildOutcome, String), BuildError> {
        let spec = self.spec(drv, BuildMode::Normal);
        let mut log = Vec::new();
        let o = build_blocking(&self.store, &self.bs, &spec, |b| log.extend_from_slice(b))?;
        Ok((o, String::from_utf8_lossy(&log).into_owned()))
    }

    fn build(&self, drv: &str) -> (BuildOutcome, String) {
        self.try_build(drv).unwrap()
    }

    fn built(&self, drv: &str) -> (Vec<String>, String) {
        let (o, log) = self.build(drv);
        assert_eq!(
            o.result.status,
            BuildStatus::Built,
            "{drv}: {} {log}",
            o.result.error_msg
        );
        let outs = o
            .outputs
            .values()
            .map(|p| self.store.store_dir().print(p))
            .collect();
        (outs, log)
    }
}

/// A `.nix` file of derivations run by `/bin/sh -c <script>`.
fn write_nix(root: &TestRoot, attrs: &str) -> std::path::PathBuf {
    let file = root.path().join("sandbox.nix");
    std::fs::write(
        &file,
        format!(
            r#"let
  sh = name: script: extra: derivation ({{
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  }} // extra);
in rec {{
{attrs}
}}"#
        ),
    )
    .unwrap();
    file
}

fn instantiate(root: &TestRoot, file: &Path, attr: &str) -> String {
    root.instantiate(file, Some(attr)).remove(0)
}

/// `nix path-info --json` of paths, without registration times.
fn path_info(root: &TestRoot, paths: &[String]) -> serde_json::Value {
    let mut args = vec!["path-info", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let mut v: serde_json::Value = serde_json::from_str(&root.run("nix", &args)).unwrap();
    for i in v.as_array_mut().unwrap() {
        i.as_object_mut().unwrap().remove("registrationTime");
    }
    v
}

/// The rows of ValidPaths, Refs and DerivationOutputs, as text (no times).
fn db_rows(root: &TestRoot) -> Vec<String> {
    let db = root.state_dir.join("db/db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut rows = Vec::new();
    for sql in [
        "select path || ' ' || hash || ' ' || coalesce(deriver, '-') || ' ' || coalesce(narSize, '-') || ' ' || coalesce(ultimate, '-') || ' ' || coalesce(ca, '-') || ' ' || coalesce(sigs, '-') from ValidPaths",
        "select (select path from ValidPaths where id = referrer) || ' -> ' || (select path from ValidPaths where id = reference) from Refs",
        "select (select path from ValidPaths where id = drv) || ' ' || id || ' ' || path from DerivationOutputs",
    ] {
        let mut st = conn.prepare(sql).unwrap();
        let r = st.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.extend(r.map(|x| x.unwrap()));
    }
    rows.sort();
    rows
}

/// `nix-store --realise` run without panicking: (success, stdout, stderr).
fn nix_realise(root: &TestRoot, drvs: &[&str]) -> (bool, String, String) {
    let out = root
        .cmd("nix-store")
        .arg("--realise")
        .args(drvs)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn nix_log(root: &TestRoot, drv: &str) -> String {
    root.run("nix-store", &["-l", drv])
}

fn delete(root: &TestRoot, paths: &[String]) {
    // The paths drover built in this process are its temporary roots (as they must
    // be while it runs): give them up first, as a drover process does at exit.
    drover::store::gc_roots::release_temp_roots_of(&root.state_dir);
    let mut args = vec!["--delete"];
    args.extend(paths.iter().map(String::as_str));
    root.run("nix-store", &args);
}

/// Nothing but valid paths, `.drv`s and locks is left in the store (no chroots, no
/// scratch outputs).
fn assert_store_clean(d: &Drover, root: &TestRoot) {
    for e in std::fs::read_dir(&root.store_dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        if n.starts_with('.') || n.ends_with(".lock") {
            continue;
        }
        assert!(
            d.store
                .is_valid_path(&d.sp(&format!("{}/{n}", root.store_dir)))
                .unwrap(),
            "left behind: {n}"
        );
    }
}

#[test]
fn sandboxed_builds_match_nix() {
    require_sandbox!();
    let root = TestRoot::with_conf(SANDBOX_CONF);
    let file = write_nix(
        &root,
        r#"  dep = sh "dep" "mkdir $out; echo dep > $out/file; ln -s file $out/link; echo made dep" {};
  top = sh "top" "read x < ${dep}/file; echo \"$x ${dep}\" > $out; ls ${dep}; echo built top >&2" {};
  multi = sh "multi" "mkdir $out $dev; echo $dev > $out/dev; echo dev > $dev/file" { outputs = [ "out" "dev" ]; };
  fixed = sh "fixed" "echo ok > $out" { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "dc51b8c96c2d745df3bd5590d990230a482fd247123599548e0632fdbf97fc22"; };"#,
    );
    let drvs: Vec<String> = ["dep", "top", "multi", "fixed"]
        .iter()
        .map(|a| instantiate(&root, &file, a))
        .collect();
    let refs: Vec<&str> = drvs.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = nix_realise(&root, &refs);
    assert!(ok, "{stderr}");
    let nix_outs: Vec<String> = stdout.lines().map(str::to_owned).collect();
    let nix_info = path_info(&root, &nix_outs);
    let nix_rows = db_rows(&root);
    let nix_logs: Vec<String> = drvs.iter().map(|d| nix_log(&root, d)).collect();
    delete(&root, &nix_outs);

    let d = drover(&root);
    assert_eq!(d.bs.sandbox.mode, SandboxMode::Enabled);
    let mut outs = Vec::new();
    for (drv, nix_log) in drvs.iter().zip(&nix_logs) {
        let (o, log) = d.built(drv);
        assert_eq!(&log, nix_log, "log of {drv}");
        outs.extend(o);
    }
    let mut sorted = nix_outs.clone();
    sorted.sort();
    outs.sort();
    assert_eq!(outs, sorted);
    assert_eq!(path_info(&root, &nix_outs), nix_info);
    assert_eq!(db_rows(&root), nix_rows);
    root.verify_store();
    assert_store_clean(&d, &root);
    // No chroot or build directory is left behind.
    let tmp: Vec<_> = std::fs::read_dir(root.tmp_dir()).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

/// The script that shows the sandbox from inside.
const DUMP: &str = r#"env | sort; id; hostname; cat /proc/sys/kernel/domainname; echo; ls / /dev /dev/pts /etc /tmp /build $NIX_STORE; cat /etc/passwd /etc/group; cat /etc/hosts; cat /proc/self/uid_map /proc/self/gid_map; echo pid $$; ulimit -c; pwd; ls -ld / /tmp /build /dev/shm $NIX_STORE | cut -d' ' -f1; cat /proc/self/mountinfo | wc -l; cat /proc/net/dev | cut -d: -f1 | tail -n +3"#;

#[test]
fn the_view_from_inside_matches_nix() {
    require_sandbox!();
    let root = TestRoot::with_conf(SANDBOX_CONF);
    let file = write_nix(
        &root,
        &format!(
            r#"  view = sh "view" ''{{ {DUMP}; }} > $out 2>&1'' {{}};
  fodView = sh "fod-view" ''{DUMP}; echo ok > $out'' {{ outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "dc51b8c96c2d745df3bd5590d990230a482fd247123599548e0632fdbf97fc22"; }};"#
        ),
    );
    let view = instantiate(&root, &file, "view");
    let fod = instantiate(&root, &file, "fodView");
    let (ok, stdout, stderr) = nix_realise(&root, &[&view, &fod]);
    assert!(ok, "{stderr}");
    let nix_outs: Vec<String> = stdout.lines().map(str::to_owned).collect();
    let nix_view = std::fs::read_to_string(&nix_outs[0]).unwrap();
    let nix_fod_log = nix_log(&root, &fod);
    let nix_info = path_info(&root, &nix_outs);
    delete(&root, &nix_outs);

    let d = drover(&root);
    let (o, _) = d.built(&view);
    assert_eq!(o, vec![nix_outs[0].clone()]);
    let view_text = std::fs::read_to_string(&nix_outs[0]).unwrap();
    assert_eq!(view_text, nix_view);
    // What the oracle promises, spelled out.
    assert!(
        view_text.contains("uid=1000(nixbld) gid=100(nixbld)\nlocalhost\n(none)\n"),
        "{view_text}"
    );
    assert!(view_text.contains("NIX_BUILD_TOP=/build\n"));
    assert!(view_text.contains("nixbld:x:1000:100:Nix build user:/build:/noshell\n"));
    let (_, log) = d.built(&fod);
    assert_eq!(log, nix_fod_log);
    assert!(log.contains("nsswitch.conf"), "{log}");
    assert_eq!(path_info(&root, &nix_outs), nix_info);
    root.verify_store();
}

/// A server on the host's loopback that counts the connections it accepts.
struct Server {
    port: u16,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

fn server() -> Server {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(200)));
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        }
    });
    Server { port, accepted }
}

#[test]
fn isolation_holds_only_with_the_sandbox() {
    require_sandbox!();
    let root = TestRoot::with_conf(SANDBOX_CONF);
    let host_dir = root.path().join("host");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::set_permissions(
        &host_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let secret = host_dir.join("secret");
    std::fs::write(&secret, "the host's secret\n").unwrap();
    let srv = server();
    let port = srv.port;
    let file = write_nix(
        &root,
        &format!(
            r#"  other = sh "other" "echo other > $out" {{}};
  escape = sh "escape" "echo x > {h}/escaped && echo done > $out" {{}};
  peek = sh "peek" "/bin/busybox cat {s} > $out" {{}};
  storePeek = sh "store-peek" "/bin/busybox cat ${{builtins.unsafeDiscardStringContext (toString other)}} > $out" {{}};
  net = sh "net" "/bin/busybox nc 127.0.0.1 {port} < /dev/null && echo ok > $out" {{}};
  fodNet = sh "fod-net" "/bin/busybox nc 127.0.0.1 {port} < /dev/null && echo ok > $out" {{ outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "dc51b8c96c2d745df3bd5590d990230a482fd247123599548e0632fdbf97fc22"; }};"#,
            h = host_dir.display(),
            s = secret.display(),
        ),
    );
    let attrs = ["escape", "peek", "storePeek", "net"];
    let drvs: BTreeMap<&str, String> = attrs
        .iter()
        .chain(["other", "fodNet"].iter())
        .map(|a| (*a, instantiate(&root, &file, a)))
        .collect();
    root.realise(&[&drvs["other"]]);
    let escaped = host_dir.join("escaped");

    // With the sandbox, each of them fails, under Nix and drover alike, with the
    // same log.
    let d = drover(&root);
    for a in attrs {
        let drv = &drvs[a];
        let (ok, _, stderr) = nix_realise(&root, &[drv]);
        assert!(!ok, "{a} built under Nix's sandbox");
        assert!(stderr.contains("failed with exit code 1"), "{a}: {stderr}");
        let (o, log) = d.build(drv);
        assert_eq!(o.result.status, BuildStatus::PermanentFailure, "{a}: {log}");
        assert_eq!(log, nix_log(&root, drv), "log of {a}");
        assert!(!escaped.exists());
    }
    assert_eq!(srv.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // A fixed-output derivation keeps the host network.
    let (outs, _) = d.built(&drvs["fodNet"]);
    assert_eq!(std::fs::read_to_string(&outs[0]).unwrap(), "ok\n");
    assert_eq!(srv.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    delete(&root, &outs);
    root.realise(&[&drvs["fodNet"]]);
    assert_eq!(srv.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Without the sandbox every check fails: the builds succeed.
    let mut unsandboxed = drover(&root);
    unsandboxed.bs.sandbox.mode = SandboxMode::Disabled;
    let mut outs = BTreeMap::new();
    for a in attrs {
        let (o, _) = unsandboxed.built(&drvs[a]);
        outs.insert(a, o[0].clone());
    }
    assert!(escaped.exists());
    assert_eq!(
        std::fs::read_to_string(&outs["peek"]).unwrap(),
        "the host's secret\n"
    );
    assert_eq!(srv.accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    // The path read from outside the closure is no reference (Nix scans only for
    // the inputs and outputs).
    let peeked = unsandboxed.sp(&outs["storePeek"]);
    let info = unsandboxed.store.query_path_info(&peeked).unwrap().unwrap();
    assert!(info.references.is_empty());
    root.verify_store();
}

#[test]
fn relaxed_lets_no_chroot_derivations_see_the_host() {
    require_sandbox!();
    let root = TestRoot::with_conf(SANDBOX_CONF);
    let secret = root.path().join("secret");
    std::fs::write(&secret, "host file\n").unwrap();
    let file = write_nix(
        &root,
        &format!(
            r#"  peek = sh "peek" "/bin/busybox cat {s} > $out" {{ __noChroot = true; }};
  jailed = sh "jailed" "/bin/busybox cat {s} > $out" {{}};"#,
            s = secret.display()
        ),
    );
    let peek = instantiate(&root, &file, "peek");
    let jailed = instantiate(&root, &file, "jailed");
    // sandbox = true refuses __noChroot, with Nix's message.
    let (ok, _, stderr) = nix_realise(&root, &[&peek]);
    assert!(!ok);
    let d = drover(&root);
    let err = d.try_build(&peek).unwrap_err().to_string();
    assert!(
        stderr.contains(&format!("error: {err}")),
        "nix: {stderr}\ndrover: {err}"
    );
    assert!(err.contains("has '__noChroot' set"), "{err}");
    // sandbox = relaxed: the __noChroot derivation sees the host, the other does not.
    let mut relaxed = drover(&root);
    relaxed.bs.sandbox.mode = SandboxMode::Relaxed;
    let (outs, _) = relaxed.built(&peek);
    assert_eq!(std::fs::read_to_string(&outs[0]).unwrap(), "host file\n");
    let (o, _) = relaxed.build(&jailed);
    assert_eq!(o.result.status, BuildStatus::PermanentFailure);
    let nix_outs = {
        delete(&root, &outs);
        let root_relaxed = root
            .cmd("nix-store")
            .args(["--option", "sandbox", "relaxed", "--realise", &peek])
            .output()
            .unwrap();
        assert!(root_relaxed.status.success());
        String::from_utf8_lossy(&root_relaxed.stdout)
            .trim()
            .to_owned()
    };
    assert_eq!(nix_outs, outs[0]);
    root.verify_store();
}

#[test]
fn build_users_are_shared_with_nix() {
    require_sandbox!();
    if nix::unistd::Group::from_name("nixbld")
        .ok()
        .flatten()
        .is_none()
    {
        if std::env::var_os("DROVER_REQUIRE_NIX").is_some_and(|v| v != "0") {
            panic!("build_users_are_shared_with_nix: no 'nixbld' group");
        }
        eprintln!("SKIPPED build_users_are_shared_with_nix: no 'nixbld' group");
        return;
    }
    let root = TestRoot::with_conf(&format!(
        "{SANDBOX_CONF}build-users-group = nixbld\nmax-jobs = 2\n"
    ));
    // Each builder records the host uid it runs as and when it ran.
    let mut attrs = String::new();
    for i in 0..6 {
        attrs.push_str(&format!(
            "  u{i} = sh \"u{i}\" \"mkdir $out; read a b c < /proc/self/uid_map; echo $b > $out/uid; /bin/busybox date +%s > $out/start; /bin/busybox sleep 2; /bin/busybox date +%s > $out/end\" {{}};\n"
        ));
    }
    let file = write_nix(&root, &attrs);
    let drvs: Vec<String> = (0..6)
        .map(|i| instantiate(&root, &file, &format!("u{i}")))
        .collect();
    let (a, b, n) = (
        drvs[0..2].to_vec(),
        drvs[2..4].to_vec(),
        drvs[4..6].to_vec(),
    );
    let run = |mine: Vec<String>| {
        let root_env = root.env();
        std::thread::spawn(move || {
            let mut env: Env = root_env
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            env.insert("NIX_USER_CONF_FILES".into(), String::new());
            let s = Settings::load(&env, &[]).unwrap();
            let d = Drover {
                store: LocalStore::open(&s).unwrap(),
                bs: BuildSettings::from_settings(&s),
            };
            let mut outs = Vec::new();
            for drv in &mine {
                // All build users busy: wait and retry, as the builder actor does.
                loop {
                    match d.try_build(drv) {
                        Err(BuildError::AllBuildUsersBusy(_)) => {
                            std::thread::sleep(std::time::Duration::from_millis(200))
                        }
                        r => {
                            let (o, log) = r.unwrap_or_else(|e| panic!("{drv}: {e}"));
                            assert_eq!(o.result.status, BuildStatus::Built, "{log}");
                            outs.extend(o.outputs.values().map(|p| s.store_dir().print(p)));
                            break;
                        }
                    }
                }
            }
            outs
        })
    };
    let ta = run(a);
    let tb = run(b);
    let refs: Vec<&str> = n.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = nix_realise(&root, &refs);
    assert!(ok, "{stderr}");
    let mut outs: Vec<String> = stdout.lines().map(str::to_owned).collect();
    outs.extend(ta.join().unwrap());
    outs.extend(tb.join().unwrap());
    assert_eq!(outs.len(), 6);
    let nixbld_uids: Vec<u32> = nix::unistd::Group::from_name("nixbld")
        .unwrap()
        .unwrap()
        .mem
        .iter()
        .filter_map(|m| nix::unistd::User::from_name(m).ok().flatten())
        .map(|u| u.uid.as_raw())
        .collect();
    let mut runs: Vec<(u32, u64, u64)> = Vec::new();
    for o in &outs {
        let read = |f: &str| -> String {
            std::fs::read_to_string(Path::new(o).join(f))
                .unwrap()
                .trim()
                .to_owned()
        };
        let uid: u32 = read("uid").parse().unwrap();
        assert!(nixbld_uids.contains(&uid), "{o} ran as {uid}");
        runs.push((
            uid,
            read("start").parse().unwrap(),
            read("end").parse().unwrap(),
        ));
        // Canonical: owned by root, no write bits.
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(Path::new(o).join("uid")).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o222, m.mtime()), (0, 0, 1), "{o}");
    }
    for (i, x) in runs.iter().enumerate() {
        for y in &runs[i + 1..] {
            if x.0 == y.0 {
                assert!(
                    x.2 <= y.1 || y.2 <= x.1,
                    "uid {} used twice at once: {runs:?}",
                    x.0
                );
            }
        }
    }
    root.verify_store();
}

#[test]
fn pre_build_hook_adds_sandbox_paths_as_in_nix() {
    require_sandbox!();
    let root = TestRoot::with_conf(SANDBOX_CONF);
    let secret = root.path().join("hooked");
    std::fs::write(&secret, "from the hook\n").unwrap();
    let hook = |name: &str, body: &str| {
        let p = root.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p.display().to_string()
    };
    let good = hook(
        "hook",
        &format!(
            "[ -d \"$2\" ] || exit 9\necho extra-sandbox-paths\necho /hooked={}\necho",
            secret.display()
        ),
    );
    let bogus = hook("bogus", "echo bogus");
    let failing = hook("failing", "exit 3");
    let file = write_nix(
        &root,
        r#"  hooked = sh "hooked" "read x < /hooked; echo $x > $out" {};"#,
    );
    let drv = instantiate(&root, &file, "hooked");
    let realise_with = |hook: &str| {
        let out = root
            .cmd("nix-store")
            .args(["--realise", &drv, "--option", "pre-build-hook", hook])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut d = drover(&root);
    for h in [&bogus, &failing] {
        let (ok, _, stderr) = realise_with(h);
        assert!(!ok);
        d.bs.sandbox.pre_build_hook = Some(h.clone());
        let err = d.try_build(&drv).unwrap_err().to_string();
        assert!(
            stderr.contains(&format!("error: {err}\n")),
            "nix: {stderr}\ndrover: {err}"
        );
    }
    let (ok, out, stderr) = realise_with(&good);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "from the hook\n");
    let nix_info = path_info(&root, std::slice::from_ref(&out));
    delete(&root, std::slice::from_ref(&out));
    d.bs.sandbox.pre_build_hook = Some(good);
    let (outs, _) = d.built(&drv);
    assert_eq!(outs, vec![out.clone()]);
    assert_eq!(path_info(&root, &[out]), nix_info);
}
