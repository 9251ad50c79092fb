//! The library's collector (`drover::store::gc`) beside Nix 2.8's on one root:
//! `find_roots` finds what `nix-store --gc --print-roots` prints, `collect_garbage`
//! returns the dead paths `--print-dead` prints and frees what `nix-store --gc`
//! reports; and a Nix client adding a path while the library collects (after the
//! roots were read) reaches it over `gc-socket/socket`, so the path survives.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use drover::config::{Env, Settings};
use drover::store::gc::{self, GcAction, GcLevel, GcOptions};
use drover::store::LocalStore;

use crate::nix_env::TestRoot;
use crate::require_nix;

fn open(root: &TestRoot) -> LocalStore {
    let mut env: Env = root
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    env.insert("NIX_USER_CONF_FILES".into(), String::new());
    LocalStore::open(&Settings::load(&env, &[]).unwrap()).unwrap()
}

/// `nix-store --add` of a new file: a valid path no root holds.
fn add(root: &TestRoot, name: &str) -> String {
    let f = root.path().join(name);
    std::fs::write(&f, format!("{name}\n")).unwrap();
    root.run("nix-store", &["--add", f.to_str().unwrap()])
        .trim()
        .to_owned()
}

/// A root with two rooted paths (one directly, one through an indirect link),
/// one held by a live process's open file, and two garbage paths.
fn scenario(root: &TestRoot) -> (Vec<String>, std::process::Child) {
    let paths: Vec<String> = ["direct", "indirect", "held", "junk1", "junk2"]
        .iter()
        .map(|n| add(root, n))
        .collect();
    let gcroots = root.state_dir.join("gcroots");
    std::os::unix::fs::symlink(&paths[0], gcroots.join("direct")).unwrap();
    let link = root.path().join("result");
    std::os::unix::fs::symlink(&paths[1], &link).unwrap();
    std::fs::create_dir_all(gcroots.join("auto")).unwrap();
    std::os::unix::fs::symlink(&link, gcroots.join("auto/result")).unwrap();
    let held = Command::new("sleep")
        .arg("600")
        .stdin(std::fs::File::open(&paths[2]).unwrap())
        .spawn()
        .unwrap();
    // sleep has exec'd, its stdin open
    let start = std::time::Instant::now();
    while !std::fs::read_link(format!("/proc/{}/exe", held.id()))
        .is_ok_and(|e| e.to_string_lossy().contains("sleep"))
    {
        assert!(start.elapsed() < std::time::Duration::from_secs(120));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (paths, held)
}

fn quiet(_: GcLevel, _: &str) {}

#[test]
fn library_collector_agrees_with_nix_store_gc() {
    require_nix!();
    let root = TestRoot::new();
    let (paths, mut held) = scenario(&root);
    let store = open(&root);
    // the roots, as --print-roots lists them (pids are the same: one process)
    let roots = gc::find_roots(&store, false, &quiet).unwrap();
    let mut ours: Vec<String> = roots
        .iter()
        .flat_map(|(p, links)| {
            let p = store.store_dir().print(p);
            links.iter().map(move |l| format!("{l} -> {p}"))
        })
        .collect();
    ours.sort();
    let nix: Vec<String> = root
        .run("nix-store", &["--gc", "--print-roots"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ours, nix);
    assert_eq!(ours.len(), 3, "{ours:?}");
    // censored, as the daemon answers an untrusted client: no /proc names
    let censored = gc::find_roots(&store, true, &quiet).unwrap();
    assert!(censored
        .values()
        .flatten()
        .all(|l| !l.starts_with("/proc/")));
    // the dead paths
    let o = GcOptions {
        action: GcAction::ReturnDead,
        ..GcOptions::default()
    };
    let dead = gc::collect_garbage(&store, &o, &quiet).unwrap();
    let nix_dead: BTreeSet<String> = root
        .run("nix-store", &["--gc", "--print-dead"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(dead.paths, nix_dead);
    assert_eq!(dead.paths, paths[3..].iter().cloned().collect());
    // deleting: what Nix would report (checked by its --print-dead above)
    let r = gc::collect_garbage(&store, &GcOptions::default(), &quiet).unwrap();
    assert_eq!(r.paths, nix_dead);
    assert_eq!(r.bytes_freed, ("junk1\n".len() + "junk2\n".len()) as u64);
    let _ = held.kill();
    let _ = held.wait();
    // Nix finds nothing left to collect but what the dead process held
    let after = root.run("nix-store", &["--gc", "--print-dead"]);
    assert_eq!(after.trim(), paths[2]);
    root.verify_store();
}

#[test]
fn a_nix_client_reaches_the_library_collector_over_its_socket() {
    require_nix!();
    let root = TestRoot::new();
    let garbage = add(&root, "garbage");
    let store = open(&root);
    let added = Mutex::new(None);
    let once = AtomicBool::new(false);
    // After the roots were read, while gc.lock is held: Nix must send its root.
    let log = |_: GcLevel, m: &str| {
        if m == "deleting garbage..." && !once.swap(true, Ordering::SeqCst) {
            *added.lock().unwrap() = Some(add(&root, "made-during-gc"));
        }
    };
    let r = gc::collect_garbage(&store, &GcOptions::default(), &log).unwrap();
    let made = added.lock().unwrap().clone().expect("the client ran");
    assert!(r.paths.contains(&garbage), "{:?}", r.paths);
    assert!(!r.paths.contains(&made), "{:?}", r.paths);
    assert!(std::path::Path::new(&made).exists());
    let valid = root.run("nix-store", &["--check-validity", "--print-invalid", &made]);
    assert_eq!(valid.trim(), "");
    // a live path is refused by name
    std::os::unix::fs::symlink(&made, root.state_dir.join("gcroots/made")).unwrap();
    let o = GcOptions {
        action: GcAction::DeleteSpecific,
        paths_to_delete: [store.store_dir().parse(&made).unwrap()].into(),
        ..GcOptions::default()
    };
    let e = gc::collect_garbage(&store, &o, &quiet).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Cannot delete path '{made}' since it is still alive. To find out why, use: nix-store --query --roots")
    );
    root.verify_store();
}
