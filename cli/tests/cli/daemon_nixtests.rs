//! Regression tests for what Nix 2.8's own functional tests (`tests/*.sh`)
//! found different between `drover daemon` and `nix-daemon`: each runs the
//! same steps against both daemons on one test root and compares what the
//! Nix client saw. (How the functional tests themselves are run is in
//! `docs/daemon-nix-tests.md`.)

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nix_env::TestRoot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Nix,
    Drover,
}

/// A daemon on `<root>/dSocket` (outside the state directory, as the
/// functional tests put it, so wiping the state keeps the socket); killed and
/// reaped on drop.
struct Daemon(Child);

fn socket(root: &TestRoot) -> PathBuf {
    root.path().join("dSocket")
}

impl Daemon {
    fn start(root: &TestRoot, which: Which) -> Daemon {
        let socket = socket(root);
        let _ = std::fs::remove_file(&socket);
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
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "{which:?} daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client(root: &TestRoot, program: &str) -> Command {
    let mut c = root.cmd(program);
    c.env("NIX_REMOTE", "daemon")
        .env("NIX_DAEMON_SOCKET_PATH", socket(root));
    c
}

/// Exit code, stdout and stderr of a client command.
fn run(c: &mut Command) -> String {
    let out = c.output().unwrap();
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The tests' `clearStore`: store and state directories removed and made
/// again, empty, while the daemon runs.
fn clear_store(root: &TestRoot) {
    root.wipe_store();
    std::fs::create_dir_all(&root.store_dir).unwrap();
    std::fs::create_dir_all(&root.state_dir).unwrap();
}

/// The stdout of what [`run`] recorded.
fn stdout_of(ran: &str) -> String {
    ran.lines().nth(2).unwrap_or_default().to_owned()
}

fn wiped_store_scenario(root: &TestRoot, which: Which, file: &Path) -> Vec<String> {
    let _d = Daemon::start(root, which);
    let f = file.to_str().unwrap();
    let mut t = Vec::new();
    t.push(run(client(root, "nix-store").args(["--add", f])));
    let p = stdout_of(&t[0]);
    clear_store(root);
    // A fresh daemon connection sees the new, empty store: the path is gone
    // and is added (and written) again.
    t.push(run(client(root, "nix-store").args(["--check-validity", &p])));
    t.push(run(client(root, "nix-store").args(["--add", f])));
    t.push(run(client(root, "nix-store").args(["-q", "--hash", &p])));
    t.push(format!("exists {}", Path::new(&p).exists()));
    t
}

/// `simple.sh`, `gc.sh`, `flakes.sh` and others call `clearStore` after their
/// daemon started: nix-daemon's next connection opens the new, empty
/// database; drover's one process must not go on with the deleted one.
#[test]
fn a_store_wiped_under_the_daemon_is_seen_empty_as_by_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("hello.txt");
    std::fs::write(&file, "hello\n").unwrap();
    let nix = wiped_store_scenario(&root, Which::Nix, &file);
    clear_store(&root);
    let ours = wiped_store_scenario(&root, Which::Drover, &file);
    assert!(nix[1].starts_with("exit Some(1)"), "{}", nix[1]);
    assert_eq!(nix[4], "exists true");
    assert_eq!(ours, nix, "drover daemon (left) differs from nix-daemon");
}

const ACTIVITIES_NIX: &str = r#"
derivation {
  name = "reports";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    echo '@nix {"action":"start","id":7,"level":3,"type":101,"text":"fetching thing","parent":0,"fields":["file:///thing"]}'
    echo '@nix {"action":"result","id":7,"type":105,"fields":[10,40,0,0]}'
    echo '@nix {"action":"start","id":8,"level":3,"type":105,"text":"not a transfer","parent":0,"fields":[]}'
    echo '@nix {"action":"result","id":8,"type":105,"fields":[1,1,0,0]}'
    echo '@nix {"action":"stop","id":7}'
    echo '@nix {"action":"setPhase","phase":"somePhase"}'
    echo plain line
    echo done > $out
  '' ];
}
"#;

/// The lines of `--log-format internal-json` about activities other than the
/// Worker's own three, with ids numbered in order of appearance.
fn builder_activity_lines(out: &str) -> Vec<String> {
    let mut ids: Vec<u64> = Vec::new();
    let mut num = |n: u64| -> u64 {
        if n == 0 {
            return 0;
        }
        match ids.iter().position(|&i| i == n) {
            Some(p) => p as u64 + 1,
            None => {
                ids.push(n);
                ids.len() as u64
            }
        }
    };
    let mut keep: Vec<u64> = Vec::new();
    let mut lines = Vec::new();
    for line in out.lines() {
        let Some(j) = line.strip_prefix("@nix ") else {
            continue;
        };
        let mut v: serde_json::Value = serde_json::from_str(j).unwrap();
        let action = v["action"].as_str().unwrap_or_default().to_owned();
        let id = v["id"].as_u64().unwrap_or(0);
        let ty = v["type"].as_u64().unwrap_or(0);
        let wanted = match action.as_str() {
            // actBuild and the builder's file transfer.
            "start" if ty == 105 || ty == 101 => {
                keep.push(id);
                true
            }
            "result" | "stop" => keep.contains(&id),
            _ => false,
        };
        if !wanted {
            continue;
        }
        for key in ["id", "parent"] {
            if let Some(n) = v.get(key).and_then(|x| x.as_u64()) {
                v[key] = num(n).into();
            }
        }
        lines.push(v.to_string());
    }
    lines
}

fn activities_scenario(root: &TestRoot, which: Which, file: &Path) -> Vec<String> {
    let _d = Daemon::start(root, which);
    let out = client(root, "nix")
        .args(["build", "-f", file.to_str().unwrap(), "--no-link", "-v"])
        .args(["--log-format", "internal-json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{which:?}: {out:?}");
    builder_activity_lines(&String::from_utf8_lossy(&out.stderr))
}

/// A builder's `@nix` file-transfer activity (and its results) reaches the
/// client as a child of the build's activity, as nix-daemon forwards it; one of
/// another type is not forwarded.
#[test]
fn a_builders_own_activities_reach_the_client_as_through_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("reports.nix");
    std::fs::write(&file, ACTIVITIES_NIX).unwrap();
    let nix = activities_scenario(&root, Which::Nix, &file);
    root.wipe_store();
    let ours = activities_scenario(&root, Which::Drover, &file);
    assert!(
        nix.iter().any(|l| l.contains("fetching thing")),
        "nix-daemon forwarded no transfer: {nix:#?}"
    );
    assert_eq!(ours, nix, "drover daemon (left) differs from nix-daemon");
}

const CA_CHAIN_NIX: &str = r#"
let
  ca = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };
in rec {
  a = ca "a" "echo a > $out";
  b = ca "b" "cat ${a} > $out; echo b >> $out";
}
"#;

/// Exit code and stdout of a client command (its stderr's build lines may
/// come in another order).
fn run_stdout(c: &mut Command) -> String {
    let out = c.output().unwrap();
    format!(
        "exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    )
}

fn ca_chain_scenario(root: &TestRoot, which: Which, file: &Path) -> Vec<String> {
    let _d = Daemon::start(root, which);
    let f = file.to_str().unwrap();
    let drv = run_stdout(client(root, "nix-instantiate").args([f, "-A", "b"]));
    let drv_path = drv.lines().nth(1).unwrap_or_default().to_owned();
    vec![
        drv.clone(),
        run_stdout(client(root, "nix-store").args(["-r", &drv_path])),
        // Again, now that it is realised.
        run_stdout(client(root, "nix-store").args(["-r", &drv_path])),
        run_stdout(client(root, "nix-store").args(["-q", "--outputs", &drv_path])),
    ]
}

/// `ca/gc.sh` and every `NIX_TESTS_CA_BY_DEFAULT` test: `nix-store -r` of a
/// floating content-addressed derivation asks `QueryDerivationOutputMap`,
/// which nix-daemon answers from the realisations of the derivation's static
/// output hashes.
#[test]
fn a_floating_ca_derivations_outputs_are_mapped_as_by_nix_daemon() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("ca-chain.nix");
    std::fs::write(&file, CA_CHAIN_NIX).unwrap();
    let nix = ca_chain_scenario(&root, Which::Nix, &file);
    root.wipe_store();
    let ours = ca_chain_scenario(&root, Which::Drover, &file);
    assert!(nix[1].starts_with("exit Some(0)\n/"), "{}", nix[1]);
    assert_eq!(ours, nix, "drover daemon (left) differs from nix-daemon");
}
