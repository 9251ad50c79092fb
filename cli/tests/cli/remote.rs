//! Remote builds through Nix 2.8's own hook (`/usr/libexec/nix/build-remote`) on
//! real ssh machines, `drover realise` against `nix-store --realise`.
//!
//! The rig (see `/work/shared/reference/remote-rig.md` for the design and its
//! pitfalls): each machine is an `sshd` on its own loopback address, run by
//! `unshare` in a mount and pid namespace where its own store directory is
//! bind-mounted over the local store dir, so it has the same logical store dir and
//! its own physical store and database. sshd's `ForceCommand` sets the machine's Nix
//! environment and runs the requested command (`nix-store --serve --write`). The
//! client side is one `ssh_config` handed to the hook through `NIX_SSHOPTS`.
//!
//! Both tools build in the same root (restored from a snapshot in between) on a
//! fresh rig each, so outputs, NAR hashes and messages can be compared exactly.
//!
//! Needs root and `sshd` (`apt-get install openssh-server`): without them the tests
//! print why they are skipped, unless `DROVER_REQUIRE_NIX` is set.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{restore, run, snapshot, Run};

const SSHD: &str = "/usr/sbin/sshd";

/// Whether the rig can run here; prints why not (or panics under
/// `DROVER_REQUIRE_NIX`).
fn rig_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root (the rig needs mount namespaces)")
    } else if !Path::new(SSHD).exists() {
        Some("no /usr/sbin/sshd (apt-get install openssh-server)")
    } else if !Path::new("/usr/libexec/nix/build-remote").exists() {
        Some("no /usr/libexec/nix/build-remote")
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

macro_rules! require_rig {
    () => {
        require_nix!();
        if !rig_available(module_path!()) {
            return;
        }
    };
}

/// One ssh machine of the rig.
struct Machine {
    name: String,
    dir: PathBuf,
    /// The `unshare` process (SIGKILL ends the namespace: `--kill-child`).
    process: Child,
}

impl Machine {
    /// Commands the machine ran, one per line.
    fn commands(&self) -> String {
        std::fs::read_to_string(self.dir.join("commands.log")).unwrap_or_default()
    }
}

/// A set of machines for one local test root.
struct Rig {
    dir: tempfile::TempDir,
    machines: Vec<Machine>,
}

fn sh(cmd: &str) {
    let out = Command::new("/bin/sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free TCP port on `addr` (bound and released: the rig's sshd takes it next).
fn free_port(addr: &str) -> u16 {
    TcpListener::bind(format!("{addr}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Rig {
    /// Starts one machine per `(name, features)` for `root`'s store dir; the
    /// machines file lines are written to `<rig>/machines`.
    fn start(root: &TestRoot, specs: &[(&str, &str)]) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("drover-rig-")
            .tempdir()
            .unwrap();
        let d = dir.path().to_owned();
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {}/id_ed25519",
            d.display()
        ));
        let client_key = std::fs::read_to_string(d.join("id_ed25519.pub")).unwrap();
        let mut ssh_config = String::new();
        let mut known_hosts = String::new();
        let mut machines_file = String::new();
        let mut rig = Rig {
            dir,
            machines: Vec::new(),
        };
        // A loopback address of its own per test process, and ports probed free.
        let addr = format!("127.0.{}.{}", 1 + std::process::id() % 250, 2);
        for (name, features) in specs {
            let m = d.join("m").join(name);
            for sub in ["store", "var/nix", "var/log/nix", "etc", "tmp"] {
                std::fs::create_dir_all(m.join(sub)).unwrap();
            }
            let conf = std::fs::read_to_string(root.conf_dir.join("nix.conf")).unwrap();
            std::fs::write(
                m.join("etc/nix.conf"),
                format!("{conf}\nextra-system-features = {features}\n"),
            )
            .unwrap();
            sh(&format!(
                "ssh-keygen -q -t ed25519 -N '' -f {}/host_key",
                m.display()
            ));
            std::fs::write(m.join("authorized_keys"), &client_key).unwrap();
            let session = format!(
                "#!/bin/sh\nexport NIX_STORE_DIR='{store}' NIX_STATE_DIR='{m}/var/nix' \
                 NIX_LOCALSTATE_DIR='{m}/var' NIX_LOG_DIR='{m}/var/log/nix' \
                 NIX_CONF_DIR='{m}/etc' PATH=/usr/bin:/bin HOME='{m}' TMPDIR='{m}/tmp' NIX_REMOTE=\n\
                 echo \"$SSH_ORIGINAL_COMMAND\" >> '{m}/commands.log'\n\
                 exec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
                store = root.store_dir,
                m = m.display()
            );
            std::fs::write(m.join("session.sh"), session).unwrap();
            sh(&format!("chmod 755 {}/session.sh", m.display()));
            let (process, port) = launch(root, &m, &addr);
            rig.machines.push(Machine {
                name: name.to_string(),
                dir: m.clone(),
                process,
            });
            let host_pub = std::fs::read_to_string(m.join("host_key.pub")).unwrap();
            let mut parts = host_pub.split_whitespace();
            let (kt, kb) = (parts.next().unwrap(), parts.next().unwrap());
            known_hosts.push_str(&format!("rig-{name} {kt} {kb}\n"));
            ssh_config.push_str(&format!(
                "Host {name}\n  HostName {addr}\n  Port {port}\n  User root\n  IdentityFile {d}/id_ed25519\n  \
                 HostKeyAlias rig-{name}\n  UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 5\n  ControlMaster no\n",
                d = d.display()
            ));
            machines_file.push_str(&format!(
                "ssh://{name} x86_64-linux {}/id_ed25519 1 1 {features} -\n",
                d.display()
            ));
        }
        std::fs::write(d.join("ssh_config"), ssh_config).unwrap();
        std::fs::write(d.join("known_hosts"), known_hosts).unwrap();
        std::fs::write(d.join("machines"), machines_file).unwrap();
        rig
    }

    fn sshopts(&self) -> String {
        format!("-F {}/ssh_config", self.dir.path().display())
    }

    fn machines_file(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("machines")).unwrap()
    }
}

/// Starts machine `m`'s sshd on `addr` in its namespace and waits until it accepts
/// connections; returns the `unshare` process and the port. A port probed free can
/// be taken by someone else before sshd binds it: then sshd exits and another port
/// is tried.
fn launch(root: &TestRoot, m: &Path, addr: &str) -> (Child, u16) {
    for _attempt in 0..5 {
        let port = free_port(addr);
        std::fs::write(
            m.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress {addr}\nHostKey {m}/host_key\nPidFile none\n\
                 UsePAM no\nPermitRootLogin prohibit-password\n\
                 AuthorizedKeysFile {m}/authorized_keys\nStrictModes no\nPermitTTY no\n\
                 MaxStartups 100:30:200\nForceCommand {m}/session.sh\n",
                m = m.display()
            ),
        )
        .unwrap();
        // The namespace: a private /run for sshd's privilege separation directory,
        // the machine's store over the local store dir, sshd as its pid 1 (when it
        // ends, everything in the namespace ends).
        let inner = format!(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/sshd && \
             mount --bind '{m}/store' '{store}' && exec {SSHD} -D -e -f '{m}/sshd_config'",
            m = m.display(),
            store = root.store_dir
        );
        let log = std::fs::File::create(m.join("sshd.log")).unwrap();
        let mut process = Command::new("setsid")
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "/bin/sh",
                "-c",
                &inner,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let sa: SocketAddr = format!("{addr}:{port}").parse().unwrap();
        let start = Instant::now();
        loop {
            if TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok() {
                return (process, port);
            }
            if process.try_wait().unwrap().is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = process.kill();
                let _ = process.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "machine {} did not start: {}",
        m.display(),
        std::fs::read_to_string(m.join("sshd.log")).unwrap_or_default()
    );
}

impl Drop for Rig {
    fn drop(&mut self) {
        for m in &mut self.machines {
            let _ = m.process.kill();
            let _ = m.process.wait();
        }
    }
}

/// `text` with the root's and the rig's paths replaced and store hashes by `HASH`.
fn normalise(root: &TestRoot, rig: &Rig, text: &str) -> String {
    let text = text
        .replace(root.path().to_str().unwrap(), "@ROOT@")
        .replace(rig.dir.path().to_str().unwrap(), "@RIG@");
    let marker = "@ROOT@/store/";
    let mut out = String::new();
    let mut rest = text.as_str();
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

const EXPR: &str = r#"
let
  mk = name: cmd: extra: derivation ({
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" cmd];
  } // extra);
in rec {
  # Built on m1 (feature fa), then copied to m2 as the input of b (feature fb).
  a = mk "rig-a" "echo building a; echo a > $out" { requiredSystemFeatures = ["fa"]; };
  b = mk "rig-b" "echo building b; read x < ${a}; echo $x b > $out" { requiredSystemFeatures = ["fb"]; };
  # Two independent builds of 3 s each, buildable anywhere.
  s1 = mk "rig-s1" "/bin/sleep 3; echo 1 > $out" {};
  s2 = mk "rig-s2" "/bin/sleep 3; echo 2 > $out" {};
  # Nobody has fz.
  z = mk "rig-z" "echo z > $out" { requiredSystemFeatures = ["fz"]; };
}
"#;

/// What one tool's run left: the run, and per output its NAR hash.
struct Outcome {
    run: Run,
    took: Duration,
    hashes: Vec<String>,
    logs: Vec<String>,
    m1: String,
    m2: String,
}

/// Realises `attr` with `flags` by Nix and then by drover, in the same root (the
/// snapshot after instantiation restored in between), each on a fresh rig of m1
/// (feature `fa`) and m2 (`fb`).
fn both(attr: &str, flags: &[&str]) -> [Outcome; 2] {
    both_on(&[("m1", "fa"), ("m2", "fb")], &[attr], flags)
}

/// [`both`] with the machines `specs` and the attributes `attrs`.
fn both_on(specs: &[(&str, &str)], attrs: &[&str], flags: &[&str]) -> [Outcome; 2] {
    let root = TestRoot::new();
    let file = root.path().join("rig.nix");
    std::fs::write(&file, EXPR).unwrap();
    let mut drvs = Vec::new();
    for a in attrs {
        drvs.extend(root.instantiate(&file, Some(a)));
    }
    let all = root.run(
        "nix-store",
        &[
            &["-qR"][..],
            &drvs.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    let closure: Vec<String> = all
        .lines()
        .filter(|l| l.ends_with(".drv"))
        .map(str::to_owned)
        .collect();
    let snap = snapshot(&root);
    [false, true].map(|use_drover| {
        restore(&root, &snap);
        let rig = Rig::start(&root, specs);
        std::fs::write(root.conf_dir.join("machines"), rig.machines_file()).unwrap();
        let mut cmd = if use_drover {
            let mut c = drover(&root);
            c.arg("realise");
            c
        } else {
            let mut c = root.cmd("nix-store");
            c.arg("--realise");
            c
        };
        cmd.env("NIX_SSHOPTS", rig.sshopts())
            .args(flags)
            .args(&drvs)
            .stdin(Stdio::null());
        let started = Instant::now();
        let mut r = run(&mut cmd);
        let took = started.elapsed();
        r.stdout = normalise(&root, &rig, &r.stdout);
        r.stderr = normalise(&root, &rig, &r.stderr);
        let mut hashes = Vec::new();
        let mut logs = Vec::new();
        for d in &closure {
            for out in root.run("nix-store", &["-q", "--outputs", d]).lines() {
                let h = root
                    .cmd("nix-store")
                    .args(["-q", "--hash", out])
                    .output()
                    .unwrap();
                hashes.push(format!(
                    "{} {}",
                    normalise(&root, &rig, out),
                    String::from_utf8_lossy(&h.stdout).trim()
                ));
            }
            let l = root
                .cmd("nix-store")
                .args(["--read-log", d])
                .output()
                .unwrap();
            logs.push(String::from_utf8_lossy(&l.stdout).into_owned());
        }
        if r.code == 0 {
            root.verify_store();
        }
        let count = |m: &Machine| {
            m.commands()
                .lines()
                .filter(|l| l.contains("nix-store --serve"))
                .count()
                .to_string()
        };
        let count_of = |name: &str| {
            rig.machines
                .iter()
                .find(|m| m.name == name)
                .map(count)
                .unwrap_or_default()
        };
        Outcome {
            took,
            m1: count_of("m1"),
            m2: count_of("m2"),
            run: r,
            hashes,
            logs,
        }
    })
}

/// `a` builds on m1 and `b` on m2 (its input `a` copied there), `--max-jobs 0`:
/// the same output paths with the same NAR hashes and logs, the same stderr lines
/// (`building '…' on 'ssh://m1'...`, build-remote's `copying N paths...` lines and
/// `copying path … from 'ssh://m1'`, without colour codes: stderr is not a
/// terminal), exit 0, and one `nix-store --serve` per build on each machine.
#[test]
fn builds_on_two_ssh_machines_as_nix_does() {
    require_rig!();
    let [nix, drv] = both("b", &["--max-jobs", "0"]);
    assert_eq!(nix.run.code, 0, "nix: {}", nix.run.stderr);
    assert!(
        nix.run.stderr.contains("on 'ssh://m1'..."),
        "{}",
        nix.run.stderr
    );
    assert!(
        nix.run.stderr.contains("copying 1 paths..."),
        "{}",
        nix.run.stderr
    );
    assert!(!nix.run.stderr.contains('\x1b'), "{}", nix.run.stderr);
    assert_eq!(drv.run.code, nix.run.code, "drover: {}", drv.run.stderr);
    assert_eq!(drv.run.stdout, nix.run.stdout);
    // The builder's output (the hook's fd 4) and the hook's messages (its stderr)
    // come through two pipes, so their interleaving varies from run to run, for Nix
    // too: the same lines, and the same order apart from the builder's.
    let builder_lines = ["building a", "building b"];
    let messages = |e: &str| -> Vec<String> {
        e.lines()
            .filter(|l| !builder_lines.contains(l))
            .map(str::to_owned)
            .collect()
    };
    let sorted = |e: &str| {
        let mut l: Vec<String> = e.lines().map(str::to_owned).collect();
        l.sort();
        l
    };
    assert_eq!(messages(&drv.run.stderr), messages(&nix.run.stderr));
    assert_eq!(sorted(&drv.run.stderr), sorted(&nix.run.stderr));
    assert_eq!(drv.hashes, nix.hashes);
    assert!(
        nix.hashes.iter().all(|h| h.contains(" sha256:")),
        "{:?}",
        nix.hashes
    );
    assert_eq!(drv.logs, nix.logs);
    assert_eq!((&nix.m1, &nix.m2), (&"1".to_owned(), &"1".to_owned()));
    assert_eq!((&drv.m1, &drv.m2), (&nix.m1, &nix.m2));
}

/// `--max-jobs 0` and machines that exist, none with the feature `fz`: build-remote
/// explains (`Failed to find a machine for remote build!` …), and Nix 2.8 ends with
/// `error: unable to start any build; remote machines may not have all required
/// system features.`, exit 1.
#[test]
fn no_machine_with_the_required_features() {
    require_rig!();
    let [nix, drv] = both("z", &["--max-jobs", "0"]);
    assert_eq!(nix.run.code, 1, "nix: {}", nix.run.stderr);
    assert!(
        nix.run.stderr.contains(
            "error: unable to start any build; remote machines may not have all required system features."
        ),
        "{}",
        nix.run.stderr
    );
    assert_eq!(drv.run.code, nix.run.code, "drover: {}", drv.run.stderr);
    assert_eq!(drv.run.stdout, nix.run.stdout);
    assert_eq!(drv.run.stderr, nix.run.stderr);
}

/// `-j1` and one remote machine with one slot, two independent 3 s builds: Nix asks
/// the hook with `amWilling = 1` (no local build is running yet), build-remote
/// sends the first build to m1 and declines the second because m1 is busy, and Nix
/// builds that one locally at the same time (about 3.6 s in all). drover asks the
/// same way (it used to ask with 0, so the hook postponed and both builds ran on m1
/// one after the other: 10 s).
#[test]
fn one_busy_remote_and_a_free_local_slot_build_at_once() {
    require_rig!();
    let [nix, drv] = both_on(&[("m1", "")], &["s1", "s2"], &["-j1"]);
    for (who, o) in [("nix", &nix), ("drover", &drv)] {
        assert_eq!(o.run.code, 0, "{who}: {}", o.run.stderr);
        let on_m1 = o
            .run
            .stderr
            .lines()
            .filter(|l| l.starts_with("building '") && l.ends_with(" on 'ssh://m1'..."))
            .count();
        let local = o
            .run
            .stderr
            .lines()
            .filter(|l| l.starts_with("building '") && l.ends_with(".drv'..."))
            .count();
        eprintln!("{who}: {:?} ({on_m1} remote, {local} local)", o.took);
        assert_eq!((on_m1, local), (1, 1), "{who}: {}", o.run.stderr);
        assert_eq!(o.m1, "1", "{who}");
    }
    assert_eq!(drv.run.stdout, nix.run.stdout);
    assert_eq!(drv.hashes, nix.hashes);
}
