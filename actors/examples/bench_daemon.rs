//! The daemon benchmark (issue #11): the real `nix-build` client of Nix 2.8 through
//! `nix-daemon` and through `drover daemon`, side by side in one run, on identical
//! scratch roots.
//!
//! The expression is N trivial derivations (`/bin/sh -c "echo <i> <input> > $out"`)
//! in a binary tree: derivation `i > 0` depends on derivation `(i - 1) / 2`, so every
//! build but the first waits for an input and the paths realised are the leaves.
//! `nix-build` evaluates it in the client, which sends every `.drv` to the daemon
//! (`AddTextToStore`), then asks for the outputs (`QueryMissing`, `BuildPaths`).
//!
//! Cases:
//! * `build -jJ`: a fresh root per run and daemon; `nix-build --max-jobs J` (the
//!   root's `nix.conf` says `max-jobs = J` too, since one shared daemon does not take
//!   a job count from one client): every derivation is built by the daemon.
//! * `noop`: one root whose N outputs are all valid (instantiated and registered
//!   once beforehand, without a daemon); `nix-build` through each daemon in turn has
//!   nothing to build, which times the per-request cost of the daemon.
//!
//! Each run starts a fresh daemon on the root (not timed), times the client from
//! start to exit (wall, and the client's CPU), then waits for the daemon's children
//! (`nix-daemon` forks one per connection) to be gone, stops the daemon with SIGTERM
//! and takes its resource usage from `wait4`: the CPU of the daemon and of every
//! process it waited for (the per-connection children of `nix-daemon`, the
//! builders), and the peak RSS of the largest of them. Processes are started
//! through `sh -c 'exec …'` so that the benchmark's own memory does not count in the
//! peak RSS (a child's peak starts at its parent's when it forks). Runs alternate
//! between the daemons so that background load hits both alike.
//!
//! Run with `cargo build --release -p drover-cli --bin drover && cargo run --release
//! -p drover-actors --example bench_daemon -- [--quick]`; see `docs/benchmarks.md`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[allow(dead_code)] // `Tool` is for the benchmarks of the CLI.
mod common;
use common::{drover_binary, remove_tree};

#[derive(Parser, Debug)]
#[command(about = "Time nix-build through nix-daemon beside drover daemon")]
struct Opts {
    /// The drover binary (default: `target/release/drover`).
    #[arg(long)]
    drover: Option<PathBuf>,
    /// Another drover binary timed as a third daemon (e.g. the one before a change).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Small sizes and fewer runs, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Derivations built (default 1000; 100 with --quick).
    #[arg(long)]
    build_n: Option<usize>,
    /// Derivations of the no-op (default 10000; 1000 with --quick).
    #[arg(long)]
    noop_n: Option<usize>,
    /// The `--max-jobs` values of the build case.
    #[arg(long, value_delimiter = ',', default_values_t = [2u32, 8])]
    jobs: Vec<u32>,
    /// Timed runs per daemon and case (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Which cases to run.
    #[arg(long, value_delimiter = ',', default_values = ["build", "noop"])]
    cases: Vec<String>,
    /// Where scratch roots go (default: the system temporary directory).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Keep the scratch roots (their paths are printed).
    #[arg(long)]
    keep: bool,
}

/// A daemon to time: its display name and how to start it.
struct Bench {
    name: &'static str,
    /// `None`: Nix 2.8's `nix-daemon`; else this drover binary's `daemon`.
    drover: Option<PathBuf>,
}

const NIX: &str = "nix-daemon";

/// The expression: N derivations in a binary tree, all listed.
fn expression(n: usize) -> String {
    let mut s = String::from(
        "let\n  mk = i: deps: derivation {\n    name = \"dbench-${toString i}\";\n    system = builtins.currentSystem;\n    builder = \"/bin/sh\";\n    args = [ \"-c\" \"echo ${toString i} ${toString deps} > $out\" ];\n  };\n",
    );
    for i in 0..n {
        let deps = if i == 0 {
            String::new()
        } else {
            format!("d{}", (i - 1) / 2)
        };
        s.push_str(&format!("  d{i} = mk {i} [ {deps} ];\n"));
    }
    s.push_str("in [\n");
    for i in 0..n {
        s.push_str(&format!("  d{i}\n"));
    }
    s.push_str("]\n");
    s
}

/// A scratch Nix root with the expression in it.
struct Root {
    dir: PathBuf,
    keep: bool,
}

impl Root {
    fn new(parent: &Path, name: &str, jobs: u32, expr: &str, keep: bool) -> anyhow::Result<Root> {
        let dir = parent.join(name);
        remove_tree(&dir);
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        std::fs::write(
            dir.join("etc/nix.conf"),
            format!(
                "sandbox = false\nbuild-users-group =\nsubstituters =\nmax-jobs = {jobs}\ntrusted-users = *\n"
            ),
        )?;
        std::fs::write(dir.join("dag.nix"), expr)?;
        Ok(Root { dir, keep })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("var/nix/daemon-socket/socket")
    }

    /// `program args…` in this root, started through `sh -c 'exec …'`.
    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg("exec \"$0\" \"$@\"").arg(program);
        c.env("NIX_STORE_DIR", self.dir.join("store"))
            .env("NIX_STATE_DIR", self.dir.join("var/nix"))
            .env("NIX_LOG_DIR", self.dir.join("var/log/nix"))
            .env("NIX_CONF_DIR", self.dir.join("etc"))
            .env("NIX_USER_CONF_FILES", "")
            .env_remove("NIX_DAEMON_SOCKET_PATH")
            .env("NIX_REMOTE", "")
            .env("NIX_PATH", "")
            .env("TMPDIR", self.dir.join("tmp"))
            .stdin(Stdio::null());
        c
    }

    /// Instantiates the expression locally (no daemon): the `.drv` paths.
    fn instantiate(&self) -> anyhow::Result<Vec<String>> {
        let out = self
            .cmd(Path::new("nix-instantiate"))
            .arg(self.dir.join("dag.nix"))
            .stderr(Stdio::piped())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "nix-instantiate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept scratch root {}", self.dir.display());
        } else {
            remove_tree(&self.dir);
        }
    }
}

/// What `wait4` says of a child: its CPU time (with its waited-for descendants)
/// and the peak RSS of the largest of them.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu: Duration,
    max_rss_kib: u64,
}

/// Waits for `child` with `wait4`.
fn wait4(child: Child) -> anyhow::Result<(std::process::ExitStatus, Usage)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 only writes the status and the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    anyhow::ensure!(r == pid, "wait4: {}", std::io::Error::last_os_error());
    // Reaped: `Child` must not wait for it again (dropping it does not).
    std::mem::forget(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok((
        std::process::ExitStatus::from_raw(status),
        Usage {
            cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
            max_rss_kib: ru.ru_maxrss as u64,
        },
    ))
}

/// The pids whose parent is `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let child: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // `pid (comm) state ppid …`: comm may hold spaces, so from the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == pid).then_some(child)
    })
    .collect()
}

/// A running daemon on a root.
struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn start(root: &Root, bench: &Bench) -> anyhow::Result<Daemon> {
        let _ = std::fs::remove_file(root.socket());
        let mut c = match &bench.drover {
            None => root.cmd(Path::new("nix-daemon")),
            Some(d) => {
                let mut c = root.cmd(d);
                c.arg("daemon");
                c
            }
        };
        let log = std::fs::File::create(root.dir.join(format!("{}-daemon.log", bench.name)))?;
        let child = c.stdout(Stdio::null()).stderr(log).spawn()?;
        let mut d = Daemon { child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(root.socket()).is_err() {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                anyhow::bail!("{} exited at start with {st}", bench.name);
            }
            anyhow::ensure!(Instant::now() < deadline, "{} did not start", bench.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// Waits for the daemon's children to end, stops it and returns its usage.
    fn stop(mut self) -> anyhow::Result<Usage> {
        let child = self.child.take().expect("a running daemon");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !children_of(pid).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let (_, usage) = wait4(child)?;
        Ok(usage)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One timed run.
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    client_cpu: Duration,
    daemon: Usage,
}

/// One `nix-build` of the root's expression through `bench`'s daemon; checks that
/// it printed one output per derivation.
fn run(root: &Root, bench: &Bench, jobs: Option<u32>, n: usize) -> anyhow::Result<Sample> {
    let daemon = Daemon::start(root, bench)?;
    let mut c = root.cmd(Path::new("nix-build"));
    c.env("NIX_REMOTE", "daemon")
        .arg(root.dir.join("dag.nix"))
        .arg("--no-out-link")
        .arg("-Q");
    if let Some(j) = jobs {
        c.arg("--max-jobs").arg(j.to_string());
    }
    let out_file = root.dir.join("nix-build.stdout");
    let err_file = root.dir.join("nix-build.stderr");
    c.stdout(std::fs::File::create(&out_file)?)
        .stderr(std::fs::File::create(&err_file)?);
    let start = Instant::now();
    let (status, client) = wait4(c.spawn()?)?;
    let wall = start.elapsed();
    let daemon = daemon.stop()?;
    if !status.success() {
        let err = std::fs::read_to_string(&err_file).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        anyhow::bail!(
            "nix-build through {} failed with {status}:\n{}",
            bench.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let outputs = std::fs::read_to_string(&out_file)?.lines().count();
    anyhow::ensure!(
        outputs == n,
        "nix-build through {} printed {outputs} outputs, not {n}",
        bench.name
    );
    Ok(Sample {
        wall,
        client_cpu: client.cpu,
        daemon,
    })
}

/// Makes every output of the `.drv`s valid as a build would leave it (the file the
/// builder writes, its input as a reference), in one transaction.
fn make_outputs_valid(root: &Root, drvs: &[String]) -> anyhow::Result<()> {
    let env: drover::config::Env = [
        ("NIX_STORE_DIR", root.dir.join("store")),
        ("NIX_STATE_DIR", root.dir.join("var/nix")),
        ("NIX_LOG_DIR", root.dir.join("var/log/nix")),
        ("NIX_CONF_DIR", root.dir.join("etc")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.display().to_string()))
    .chain([("NIX_USER_CONF_FILES".to_owned(), String::new())])
    .collect();
    let settings = drover::config::Settings::load(&env, &[])?;
    let store = drover::store::LocalStore::open(&settings)?;
    let sd = store.store_dir().clone();
    let mut infos = Vec::new();
    for (i, d) in drvs.iter().enumerate() {
        let drv_path = sd.parse(d)?;
        let drv = store.read_derivation(&drv_path)?;
        let mut refs = drover::store_path::StorePathSet::new();
        for (input, outputs) in &drv.input_drvs {
            let input = store.read_derivation(input)?;
            for o in outputs {
                if let Some(p) = input.outputs.get(o).and_then(|o| o.path()) {
                    refs.insert(p.clone());
                }
            }
        }
        let Some(out) = drv.outputs.get("out").and_then(|o| o.path()) else {
            anyhow::bail!("{d} has no output path");
        };
        let real = store.real_path(out);
        let text: Vec<String> = refs.iter().map(|r| sd.print(r)).collect();
        let line = format!("{i} {}", text.join(" "));
        std::fs::write(&real, format!("{}\n", line.trim_end()))?;
        let (hash, size) = drover::nar::nar_hash_of_path(&real)?;
        let mut info = drover::store::ValidPathInfo::new(out.clone(), hash, size);
        info.references = refs;
        info.deriver = Some(drv_path.clone());
        infos.push(info);
    }
    store.register_valid_paths(&infos)?;
    Ok(())
}

/// One line of the result table.
struct Row {
    case: String,
    n: usize,
    daemon: &'static str,
    samples: Vec<Sample>,
}

fn median(mut t: Vec<Duration>) -> Duration {
    t.sort();
    let m = t.len() / 2;
    match t.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => t[m],
        _ => (t[m - 1] + t[m]) / 2,
    }
}

impl Row {
    fn wall(&self) -> Duration {
        median(self.samples.iter().map(|s| s.wall).collect())
    }
    fn daemon_cpu(&self) -> Duration {
        median(self.samples.iter().map(|s| s.daemon.cpu).collect())
    }
    fn client_cpu(&self) -> Duration {
        median(self.samples.iter().map(|s| s.client_cpu).collect())
    }
    fn rss_kib(&self) -> u64 {
        let mut r: Vec<u64> = self.samples.iter().map(|s| s.daemon.max_rss_kib).collect();
        r.sort_unstable();
        r.get(r.len() / 2).copied().unwrap_or(0)
    }
    fn min(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| s.wall)
            .min()
            .unwrap_or_default()
    }
    fn max(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| s.wall)
            .max()
            .unwrap_or_default()
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<10} {:>6} {:<11} {:>4} {:>9} {:>9} {:>9} {:>7} {:>11} {:>7} {:>10} {:>9} {:>7}",
        "case",
        "N",
        "daemon",
        "runs",
        "wall",
        "min",
        "max",
        "vs nix",
        "daemon cpu",
        "vs nix",
        "client cpu",
        "peak RSS",
        "vs nix"
    );
    for r in rows {
        let nix = rows
            .iter()
            .find(|o| o.case == r.case && o.n == r.n && o.daemon == NIX);
        let ratio = |a: f64, b: f64| match nix {
            Some(_) if r.daemon != NIX && b > 0.0 => format!("{:.2}", a / b),
            _ => String::new(),
        };
        let (w, c, m) = match nix {
            Some(x) => (
                ratio(r.wall().as_secs_f64(), x.wall().as_secs_f64()),
                ratio(r.daemon_cpu().as_secs_f64(), x.daemon_cpu().as_secs_f64()),
                ratio(r.rss_kib() as f64, x.rss_kib() as f64),
            ),
            None => Default::default(),
        };
        println!(
            "{:<10} {:>6} {:<11} {:>4} {:>9} {:>9} {:>9} {:>7} {:>11} {:>7} {:>10} {:>8}M {:>7}",
            r.case,
            r.n,
            r.daemon,
            r.samples.len(),
            secs(r.wall()),
            secs(r.min()),
            secs(r.max()),
            w,
            secs(r.daemon_cpu()),
            c,
            secs(r.client_cpu()),
            format!("{:.1}", r.rss_kib() as f64 / 1024.0),
            m
        );
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let drover = drover_binary(o.drover.as_deref())?;
    let build_n = o.build_n.unwrap_or(if o.quick { 100 } else { 1000 });
    let noop_n = o.noop_n.unwrap_or(if o.quick { 1000 } else { 10_000 });
    let runs = o.runs.unwrap_or(if o.quick { 1 } else { 3 }).max(1);
    let scratch = match &o.scratch {
        Some(s) => s.clone(),
        None => std::env::temp_dir().join(format!("drover-bench-daemon-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch)?;
    eprintln!(
        "drover: {}; scratch: {}; load average {}",
        drover.display(),
        scratch.display(),
        load_average()
    );
    let mut benches = vec![
        Bench {
            name: NIX,
            drover: None,
        },
        Bench {
            name: "drover",
            drover: Some(drover),
        },
    ];
    if let Some(b) = &o.baseline {
        benches.push(Bench {
            name: "drover-old",
            drover: Some(b.clone()),
        });
    }
    let mut rows = Vec::new();
    let mut record = |case: String, n: usize, samples: Vec<Vec<Sample>>| {
        for (b, s) in benches.iter().zip(samples) {
            rows.push(Row {
                case: case.clone(),
                n,
                daemon: b.name,
                samples: s,
            });
        }
    };

    if o.cases.iter().any(|c| c == "build") {
        let expr = expression(build_n);
        for &j in &o.jobs {
            let mut samples: Vec<Vec<Sample>> = benches.iter().map(|_| Vec::new()).collect();
            for r in 0..runs {
                for k in 0..benches.len() {
                    let i = (k + r) % benches.len();
                    let b = &benches[i];
                    let root = Root::new(
                        &scratch,
                        &format!("build-j{j}-{r}-{}", b.name),
                        j,
                        &expr,
                        o.keep,
                    )?;
                    let s = run(&root, b, Some(j), build_n)?;
                    eprintln!(
                        "build {build_n} -j{j} run {r}: {} {} (daemon cpu {}, client cpu {}, {} KiB; load {})",
                        b.name,
                        secs(s.wall),
                        secs(s.daemon.cpu),
                        secs(s.client_cpu),
                        s.daemon.max_rss_kib,
                        load_average()
                    );
                    samples[i].push(s);
                }
            }
            record(format!("build -j{j}"), build_n, samples);
        }
    }

    if o.cases.iter().any(|c| c == "noop") {
        let root = Root::new(&scratch, "noop", 2, &expression(noop_n), o.keep)?;
        let t = Instant::now();
        let drvs = root.instantiate()?;
        anyhow::ensure!(drvs.len() == noop_n, "instantiated {} drvs", drvs.len());
        make_outputs_valid(&root, &drvs)?;
        eprintln!(
            "noop: {noop_n} derivations instantiated and their outputs made valid in {}",
            secs(t.elapsed())
        );
        let mut samples: Vec<Vec<Sample>> = benches.iter().map(|_| Vec::new()).collect();
        for r in 0..runs {
            for k in 0..benches.len() {
                let i = (k + r) % benches.len();
                let b = &benches[i];
                let s = run(&root, b, None, noop_n)?;
                eprintln!(
                    "noop {noop_n} run {r}: {} {} (daemon cpu {}, client cpu {}, {} KiB; load {})",
                    b.name,
                    secs(s.wall),
                    secs(s.daemon.cpu),
                    secs(s.client_cpu),
                    s.daemon.max_rss_kib,
                    load_average()
                );
                samples[i].push(s);
            }
        }
        record("noop".into(), noop_n, samples);
    }

    if !o.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    eprintln!("load average at the end {}", load_average());
    print_table(&rows);
    Ok(())
}
