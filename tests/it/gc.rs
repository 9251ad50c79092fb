//! drover's temporary roots against Nix 2.8's real collector (`nix-store --gc`),
//! library level: a collector stopped at its test synchronisation point
//! (`_NIX_TEST_GC_SYNC`, a fifo it reads after it has taken `gc.lock`, started its
//! socket and read the roots) must learn of every root drover adds meanwhile, for
//! paths drover creates (`add_text_to_store`) and for valid paths it starts to use
//! (`add_temp_root`), and still delete the garbage.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use drover::config::{Env, Settings};
use drover::store::LocalStore;
use drover::store_path::StorePathSet;

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

/// `nix-store --add` of a new file with `text`: a valid path no root holds.
fn garbage(root: &TestRoot, name: &str, text: &str) -> String {
    let f = root.path().join(name);
    std::fs::write(&f, text).unwrap();
    root.run("nix-store", &["--add", f.to_str().unwrap()])
        .trim()
        .to_owned()
}

#[test]
fn a_running_collector_learns_temp_roots_over_its_socket() {
    require_nix!();
    let root = TestRoot::new();
    let doomed = garbage(&root, "doomed", "doomed\n");
    let reused = garbage(&root, "reused", "reused\n");
    let store = open(&root);
    let fifo = root.path().join("gc.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut gc = root
        .cmd("nix-store")
        .arg("--gc")
        .env("_NIX_TEST_GC_SYNC", &fifo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the socket exists once the collector holds its lock
    let socket = root.state_dir.join("gc-socket/socket");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no collector");
        std::thread::sleep(Duration::from_millis(20));
    }
    // a root can only reach the collector now through the socket
    let lock = std::fs::File::open(root.state_dir.join("gc.lock")).unwrap();
    // SAFETY: flock(2) on a descriptor we own.
    let free = unsafe {
        nix::libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            nix::libc::LOCK_SH | nix::libc::LOCK_NB,
        )
    } == 0;
    assert!(!free, "the collector does not hold gc.lock");
    drop(lock);
    let made = store
        .add_text_to_store("made-during-gc", b"new\n", &StorePathSet::new())
        .unwrap();
    let reused_path = store.store_dir().parse(&reused).unwrap();
    store.add_temp_root(&reused_path).unwrap();
    // let the collector go on: it deletes garbage now
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let start = Instant::now();
    while gc.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = gc.kill();
            panic!("the collector did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = gc.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !std::path::Path::new(&doomed).exists(),
        "garbage kept: {stderr}"
    );
    assert!(store.real_path(&made).exists(), "{stderr}");
    assert!(store.is_valid_path(&made).unwrap());
    assert!(std::path::Path::new(&reused).exists(), "{stderr}");
    assert!(store.is_valid_path(&reused_path).unwrap());
    root.verify_store();
}
