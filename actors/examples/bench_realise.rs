//! The realisation benchmark: `drover realise` beside Nix 2.8's `nix-store --realise`
//! on the same generated derivation DAG.
//!
//! The DAG is generated from a fixed seed: derivations are laid out in [`LAYERS`]
//! layers; each derivation after the first layer depends on one derivation of the
//! layer just before it and on up to two more of the few layers before, near its own
//! position (see [`Dag::generate`]). Builders
//! are `/bin/sh -c "echo <i> <input paths> > $out"`, so every input is a real
//! dependency (the output references it). The expression is a list of all N
//! derivations, so `nix-instantiate` writes every `.drv`; the paths realised are the
//! sinks (derivations nothing else depends on).
//!
//! Cases:
//! * `noop`: all N outputs are made valid once (written and registered in one
//!   transaction through the library, as a build would leave them), then the sinks
//!   are realised by each tool, several runs each: nothing to build. Runs for each
//!   N of `--noop-n` (default 10,000 and 100,000). Only the sinks are goals: their
//!   outputs are valid, so no goal is made for their inputs.
//! * `noop-all`: the same root, but every one of the N derivations is requested, so
//!   the run holds N goals (the case that measures memory per goal at scale). At
//!   100,000 the paths would pass Linux's 6 MiB limit on a command's arguments, so
//!   they are given as short symlinks to the `.drv`s, which both tools follow.
//! * `build -jJ`: a fresh scratch root per run and tool (instantiated from the same
//!   expression; only the store dir differs), then the sinks are realised with
//!   `--max-jobs J`: every derivation is built.
//!
//! Runs alternate between the tools so that background load hits both alike. Only
//! the realise command is timed (process start to exit). Output: one table row per
//! case and tool with the median, min and max wall time, the CPU time, the peak
//! RSS of the realising process (`wait4`'s `ru_maxrss`), that peak divided by the
//! derivations and by the goals of the run (the derivations requested, or all of
//! them in the build case), and the drover/Nix ratios of the medians. `--baseline OLD` adds a third tool, another drover binary (e.g. the
//! one before a change), timed in the same runs.
//!
//! Run with `cargo build --release -p drover-cli --bin drover && cargo run
//! --release -p drover-actors --example bench_realise -- [--quick]`; see
//! `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

mod common;
use common::{drover_binary, remove_tree, Tool};

/// Layers of the generated DAG (its depth).
const LAYERS: usize = 10;
/// How many layers back a derivation's inputs may come from.
const REACH: usize = 3;
/// How far (in positions) from its own position a derivation's inputs are.
const WINDOW: usize = 4;

#[derive(Parser, Debug)]
#[command(about = "Time drover realise beside nix-store --realise on a generated DAG")]
struct Opts {
    /// The drover binary (default: `drover` next to this example's directory, i.e.
    /// `target/release/drover`).
    #[arg(long)]
    drover: Option<PathBuf>,
    /// Small sizes and fewer runs, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Another drover binary timed beside the first (e.g. the previous version).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Derivations in the no-op DAGs (default 10000,100000; 1000 with --quick).
    #[arg(long, value_delimiter = ',')]
    noop_n: Vec<usize>,
    /// Derivations in the build DAGs (default 1000,10000; 100 with --quick).
    #[arg(long, value_delimiter = ',')]
    build_n: Vec<usize>,
    /// Build DAGs larger than this are built by drover only (a Nix 2.8 run of
    /// 10,000 builds takes minutes per run); 0 = no limit.
    #[arg(long, default_value_t = 0)]
    nix_build_max_n: usize,
    /// No-op DAGs larger than this are realised by drover only (Nix 2.8 takes
    /// minutes per run at 100,000 derivations on a loaded machine); 0 = no limit.
    #[arg(long, default_value_t = 0)]
    nix_noop_max_n: usize,
    /// Timed runs per tool in the no-op cases (default 5; 2 with --quick; 0 sets
    /// the roots up and times nothing, for a later `--reuse`).
    #[arg(long)]
    noop_runs: Option<usize>,
    /// Timed runs per tool and job count in the build case (default 3; 1 with --quick).
    #[arg(long)]
    build_runs: Option<usize>,
    /// Timed runs per tool and job count of build DAGs over 1,000 derivations
    /// (default 1).
    #[arg(long, default_value_t = 1)]
    large_build_runs: usize,
    /// The `--max-jobs` values of the build case.
    #[arg(long, value_delimiter = ',', default_values_t = [2u32, 8])]
    jobs: Vec<u32>,
    /// The seed of the DAG.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Which cases to run: `noop`, `noop-all` (every derivation requested), `build`.
    #[arg(long, value_delimiter = ',', default_values = ["noop", "build"])]
    cases: Vec<String>,
    /// Where scratch roots go (default: the system temporary directory). A tmpfs
    /// such as /dev/shm takes the disk file system out of the figures.
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Keep the scratch roots (their paths are printed).
    #[arg(long)]
    keep: bool,
    /// Reuse the no-op roots a previous run with `--reuse` left in `--scratch`, if
    /// they hold the same DAG, and keep them: setting up 100,000 derivations takes
    /// many minutes.
    #[arg(long, requires = "scratch")]
    reuse: bool,
}

/// splitmix64: a small deterministic generator, so the DAG depends only on the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A generated DAG: the inputs of each derivation (indices of earlier ones).
struct Dag {
    inputs: Vec<Vec<usize>>,
}

impl Dag {
    /// [`LAYERS`] layers of `ceil(n / LAYERS)` derivations. A derivation at position
    /// `p` of layer `l > 0` depends on one derivation of layer `l - 1` and on up to
    /// two more of the [`REACH`] layers before it, each within [`WINDOW`] positions
    /// of `p` (wrapping around). Input closures stay bounded (a cone of at most
    /// `LAYERS × (2·WINDOW+1)` paths) as N grows, as in real package sets, so the
    /// figures measure per-derivation overhead rather than ever larger closures.
    fn generate(n: usize, seed: u64) -> Dag {
        let mut rng = Rng(seed);
        let width = n.div_ceil(LAYERS).max(1);
        let mut inputs = Vec::with_capacity(n);
        let near = |rng: &mut Rng, layer: usize, pos: usize| {
            let offset = rng.below(2 * WINDOW + 1);
            let p = (pos + width * 2 + offset - WINDOW) % width;
            (layer * width + p).min(n - 1)
        };
        for i in 0..n {
            let (layer, pos) = (i / width, i % width);
            let mut deps = Vec::new();
            if layer > 0 {
                deps.push(near(&mut rng, layer - 1, pos));
                for _ in 0..rng.below(3) {
                    let back = 1 + rng.below(REACH.min(layer));
                    let d = near(&mut rng, layer - back, pos);
                    if !deps.contains(&d) {
                        deps.push(d);
                    }
                }
            }
            inputs.push(deps);
        }
        Dag { inputs }
    }

    /// Derivations no other derivation depends on.
    fn sinks(&self) -> Vec<usize> {
        let mut used = vec![false; self.inputs.len()];
        for deps in &self.inputs {
            for &d in deps {
                used[d] = true;
            }
        }
        (0..self.inputs.len()).filter(|&i| !used[i]).collect()
    }

    fn edges(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum()
    }

    /// The Nix expression: a list of all derivations, in index order.
    fn expression(&self, seed: u64) -> String {
        let mut s = String::new();
        s.push_str("let\n  mk = i: deps: derivation {\n    name = \"bench-${toString i}\";\n    system = builtins.currentSystem;\n    builder = \"/bin/sh\";\n");
        s.push_str(&format!(
            "    args = [ \"-c\" \"echo ${{toString i}} {seed} ${{toString deps}} > $out\" ];\n  }};\n"
        ));
        for (i, deps) in self.inputs.iter().enumerate() {
            let deps: Vec<String> = deps.iter().map(|d| format!("d{d}")).collect();
            s.push_str(&format!("  d{i} = mk {i} [ {} ];\n", deps.join(" ")));
        }
        s.push_str("in [\n");
        for i in 0..self.inputs.len() {
            s.push_str(&format!("  d{i}\n"));
        }
        s.push_str("]\n");
        s
    }
}

/// The file of a no-op root that says it is ready: the `.drv` paths, one a line.
const READY: &str = "ready-drvs";

/// A scratch Nix root (store, state, logs, `nix.conf`), as the test harness makes.
struct Root {
    dir: PathBuf,
    keep: bool,
}

impl Root {
    fn new(parent: &Path, name: &str, keep: bool) -> anyhow::Result<Root> {
        let dir = parent.join(name);
        if dir.exists() {
            remove_tree(&dir);
        }
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::write(
            dir.join("etc/nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command\n",
        )?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(Root { dir, keep })
    }

    /// A root that a previous `--reuse` run left ready for `expr` (instantiated,
    /// every output valid): its `.drv` paths in index order, or `None`.
    fn ready_drvs(parent: &Path, name: &str, expr: &str) -> Option<(Root, Vec<String>)> {
        let dir = parent.join(name);
        let same = std::fs::read_to_string(dir.join("dag.nix")).ok()? == expr;
        let drvs = std::fs::read_to_string(dir.join(READY)).ok()?;
        same.then(|| {
            let drvs = drvs.lines().map(str::to_owned).collect();
            (Root { dir, keep: true }, drvs)
        })
    }

    /// Marks the root ready for [`Root::ready_drvs`]: records its `.drv` paths.
    fn mark_ready(&self, drvs: &[String]) -> anyhow::Result<()> {
        std::fs::write(self.dir.join(READY), drvs.join("\n"))?;
        Ok(())
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_STORE_DIR", self.store_dir())
            .env("NIX_STATE_DIR", self.dir.join("var/nix"))
            .env("NIX_LOG_DIR", self.dir.join("var/log/nix"))
            .env("NIX_CONF_DIR", self.dir.join("etc"))
            .env("NIX_REMOTE", "")
            .env("NIX_PATH", "")
            .env("TMPDIR", self.dir.join("tmp"))
            .stdin(Stdio::null());
        c
    }

    /// Writes the expression and instantiates it: the `.drv` paths in index order.
    fn instantiate(&self, expr: &str) -> anyhow::Result<Vec<String>> {
        let file = self.dir.join("dag.nix");
        std::fs::write(&file, expr)?;
        let out = self
            .cmd(Path::new("nix-instantiate"))
            .arg(&file)
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "nix-instantiate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
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

/// Runs one realisation of `paths` and returns its wall time; fails on a nonzero exit.
fn realise(
    root: &Root,
    tool: &Bench,
    jobs: Option<u32>,
    paths: &[String],
) -> anyhow::Result<Sample> {
    let mut c = match tool.tool {
        Tool::Drover => {
            let mut c = root.cmd(&tool.drover);
            c.arg("realise");
            c
        }
        Tool::Nix => {
            let mut c = root.cmd(Path::new("nix-store"));
            c.arg("--realise");
            c
        }
    };
    if let Some(j) = jobs {
        c.arg("--max-jobs").arg(j.to_string());
    }
    // Builder output goes to the logs only (`-Q` in both tools).
    c.arg("--no-build-output");
    let file = root.dir.join("realise.stderr");
    c.args(paths)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&file)?);
    // The peak RSS of a child starts at its parent's RSS when it forks (and stays
    // over `exec`): measured through GNU time, a small process that forks the tool,
    // so the benchmark's own memory does not count; without it, from `wait4`.
    let time = Path::new("/usr/bin/time");
    let rss_file = root.dir.join("realise.rss");
    if time.exists() {
        let program = c.get_program().to_owned();
        let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
        let mut t = root.cmd(time);
        t.arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&rss_file)
            .arg(program)
            .args(args);
        t.stdout(Stdio::null())
            .stderr(std::fs::File::create(&file)?);
        c = t;
    }
    let start = Instant::now();
    let child = c.spawn()?;
    let (status, mut usage) = wait4(child)?;
    let took = start.elapsed();
    if time.exists() {
        if let Some(kib) = std::fs::read_to_string(&rss_file)
            .ok()
            .and_then(|t| t.lines().last()?.trim().parse().ok())
        {
            usage.max_rss_kib = kib;
        }
    }
    if !status.success() {
        let err = std::fs::read_to_string(&file).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        anyhow::bail!(
            "{} realise failed with {status}:\n{}",
            tool.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(Sample {
        wall: took,
        cpu: usage.cpu,
        rss_kib: usage.max_rss_kib,
    })
}

/// The `.drv` paths to pass on one command line: the paths themselves, or, when
/// they would come near Linux's limit on a command's arguments (¼ of the stack
/// limit, at most 6 MiB: 100,000 paths under a scratch root are 9.4 MB), short
/// symlinks to them (`<root>/a/<i>`), which both tools follow to the store as
/// Nix's `followLinksToStorePath` does.
fn short_arguments(root: &Root, drvs: &[String]) -> anyhow::Result<Vec<String>> {
    let mut stack = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut stack) } == 0 {
        (stack.rlim_cur as usize / 4).min(6 << 20)
    } else {
        2 << 20
    };
    // Each argument costs its bytes, a NUL and a pointer; leave room for the
    // environment.
    let bytes = |v: &mut dyn Iterator<Item = usize>| v.map(|l| l + 1 + 8).sum::<usize>();
    if bytes(&mut drvs.iter().map(|d| d.len())) < limit * 3 / 4 {
        return Ok(drvs.to_vec());
    }
    let dir = root.dir.join("a");
    std::fs::create_dir_all(&dir)?;
    let mut links = Vec::with_capacity(drvs.len());
    for (i, d) in drvs.iter().enumerate() {
        let link = dir.join(i.to_string());
        if std::fs::read_link(&link).ok().as_deref() != Some(Path::new(d)) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(d, &link)?;
        }
        links.push(link.to_string_lossy().into_owned());
    }
    if bytes(&mut links.iter().map(|l| l.len())) >= limit * 3 / 4 {
        eprintln!(
            "{} paths are too long for one command even as links: raise `ulimit -s` \
             (e.g. to 65536, for Linux's 6 MiB)",
            links.len()
        );
    }
    Ok(links)
}

/// Whether starting the command failed because its arguments are too long
/// (`E2BIG`).
fn too_many_arguments(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.raw_os_error() == Some(libc::E2BIG))
}

/// A tool to time: which kind, its display name, and for drover the binary.
struct Bench {
    tool: Tool,
    name: &'static str,
    drover: PathBuf,
}

/// One timed run: wall time, CPU time (user + system) of the tool and every
/// process it waited for (the builders), and the peak RSS of the largest of them
/// (the tool itself: builders are tiny).
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    rss_kib: u64,
}

/// What `wait4` says of a child: its CPU time (with its own waited-for children)
/// and peak resident set size.
struct Usage {
    cpu: Duration,
    max_rss_kib: u64,
}

/// Waits for `child` with `wait4`, which gives that one child's resource usage.
fn wait4(child: std::process::Child) -> anyhow::Result<(std::process::ExitStatus, Usage)> {
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
    // The child is reaped: `Child` must not wait for it again (dropping it does not).
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

/// One line of the result table.
struct Row {
    case: String,
    n: usize,
    /// The goals of the run: derivations requested, or all N when all are built.
    goals: usize,
    tool: &'static str,
    times: Vec<Sample>,
}

impl Row {
    fn median(&self) -> Duration {
        median(self.times.iter().map(|s| s.wall).collect())
    }

    fn cpu_median(&self) -> Duration {
        median(self.times.iter().map(|s| s.cpu).collect())
    }

    /// Median peak RSS in KiB.
    fn rss_median(&self) -> u64 {
        let mut r: Vec<u64> = self.times.iter().map(|s| s.rss_kib).collect();
        r.sort_unstable();
        r.get(r.len() / 2).copied().unwrap_or(0)
    }

    fn min(&self) -> Duration {
        self.times.iter().map(|s| s.wall).min().unwrap_or_default()
    }

    fn max(&self) -> Duration {
        self.times.iter().map(|s| s.wall).max().unwrap_or_default()
    }
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

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<10} {:>6} {:>6} {:<10} {:>4} {:>9} {:>9} {:>9} {:>7} {:>9} {:>7} {:>9} {:>8} {:>8} {:>7}",
        "case",
        "N",
        "goals",
        "tool",
        "runs",
        "median",
        "min",
        "max",
        "vs nix",
        "cpu",
        "vs nix",
        "peak RSS",
        "B/drv",
        "B/goal",
        "vs nix"
    );
    for r in rows {
        let nix = rows
            .iter()
            .find(|o| o.case == r.case && o.n == r.n && o.tool == Tool::Nix.name());
        let ratio = |a: f64, b: f64| {
            if r.tool != Tool::Nix.name() && b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                String::new()
            }
        };
        let (wall_ratio, cpu_ratio, rss_ratio) = match nix {
            Some(n) => (
                ratio(r.median().as_secs_f64(), n.median().as_secs_f64()),
                ratio(r.cpu_median().as_secs_f64(), n.cpu_median().as_secs_f64()),
                ratio(r.rss_median() as f64, n.rss_median() as f64),
            ),
            None => Default::default(),
        };
        println!(
            "{:<10} {:>6} {:>6} {:<10} {:>4} {:>9} {:>9} {:>9} {:>7} {:>9} {:>7} {:>8}M {:>8} {:>8} {:>7}",
            r.case,
            r.n,
            r.goals,
            r.tool,
            r.times.len(),
            secs(r.median()),
            secs(r.min()),
            secs(r.max()),
            wall_ratio,
            secs(r.cpu_median()),
            cpu_ratio,
            format!("{:.1}", r.rss_median() as f64 / 1024.0),
            r.rss_median() * 1024 / r.n.max(1) as u64,
            r.rss_median() * 1024 / r.goals.max(1) as u64,
            rss_ratio
        );
    }
}

/// The build rows' cost per derivation (median wall and CPU time ÷ N), and for
/// each tool and job count the ratio of the largest N's cost to the smallest's.
fn print_per_derivation(rows: &[Row]) {
    let builds: Vec<&Row> = rows
        .iter()
        .filter(|r| r.case.starts_with("build"))
        .collect();
    if builds.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:>6} {:<10} {:>10} {:>10} {:>12}",
        "case", "N", "tool", "wall/drv", "cpu/drv", "vs smallest N"
    );
    let per = |r: &Row, d: Duration| d.as_secs_f64() * 1000.0 / r.n.max(1) as f64;
    for r in &builds {
        let smallest = builds
            .iter()
            .filter(|o| o.case == r.case && o.tool == r.tool)
            .min_by_key(|o| o.n)
            .filter(|o| o.n < r.n);
        let growth = smallest
            .map(|s| format!("{:.2}", per(r, r.median()) / per(s, s.median())))
            .unwrap_or_default();
        println!(
            "{:<10} {:>6} {:<10} {:>8.2}ms {:>8.2}ms {:>12}",
            r.case,
            r.n,
            r.tool,
            per(r, r.median()),
            per(r, r.cpu_median()),
            growth
        );
    }
}

/// Makes every output of the `.drv`s valid, as a build of each would leave it
/// (a small file naming its inputs, with those as references), in one transaction.
fn make_outputs_valid(root: &Root, drvs: &[String]) -> anyhow::Result<()> {
    let env: drover::config::Env = [
        ("NIX_STORE_DIR", root.store_dir()),
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
    for d in drvs {
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
        for out in drv.outputs.values() {
            let Some(p) = out.path() else { continue };
            let real = store.real_path(p);
            let text: Vec<String> = refs.iter().map(|r| sd.print(r)).collect();
            std::fs::write(&real, format!("{}\n", text.join(" ")))?;
            let (hash, size) = drover::nar::nar_hash_of_path(&real)?;
            let mut info = drover::store::ValidPathInfo::new(p.clone(), hash, size);
            info.references = refs.clone();
            info.deriver = Some(drv_path.clone());
            infos.push(info);
        }
    }
    store.register_valid_paths(&infos)?;
    Ok(())
}

/// The order of the tools in run `run`: rotated, so that each goes first as often.
fn order(tools: &[Bench], run: usize) -> Vec<&Bench> {
    (0..tools.len())
        .map(|i| &tools[(i + run) % tools.len()])
        .collect()
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let drover = drover_binary(o.drover.as_deref())?;
    let noop_ns = if !o.noop_n.is_empty() {
        o.noop_n.clone()
    } else if o.quick {
        vec![1000]
    } else {
        vec![10_000, 100_000]
    };
    let build_ns = if !o.build_n.is_empty() {
        o.build_n.clone()
    } else if o.quick {
        vec![100]
    } else {
        vec![1000, 10_000]
    };
    // 0 no-op runs only sets the roots up (for a later `--reuse`).
    let noop_runs = o.noop_runs.unwrap_or(if o.quick { 2 } else { 5 });
    let build_runs = o.build_runs.unwrap_or(if o.quick { 1 } else { 3 }).max(1);
    let scratch = match &o.scratch {
        Some(s) => s.clone(),
        None => std::env::temp_dir().join(format!("drover-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch)?;
    eprintln!(
        "drover: {}; scratch: {}",
        drover.display(),
        scratch.display()
    );
    let mut tools = vec![
        Bench {
            tool: Tool::Drover,
            name: Tool::Drover.name(),
            drover: drover.clone(),
        },
        Bench {
            tool: Tool::Nix,
            name: Tool::Nix.name(),
            drover: drover.clone(),
        },
    ];
    if let Some(b) = &o.baseline {
        eprintln!("baseline drover: {}", b.display());
        tools.push(Bench {
            tool: Tool::Drover,
            name: "drover-old",
            drover: b.clone(),
        });
    }
    let mut rows = Vec::new();

    let noop_cases: Vec<&str> = ["noop", "noop-all"]
        .into_iter()
        .filter(|case| o.cases.iter().any(|c| c == case))
        .collect();
    if !noop_cases.is_empty() {
        for &noop_n in &noop_ns {
            let dag = Dag::generate(noop_n, o.seed);
            let sinks = dag.sinks();
            eprintln!(
                "noop: {noop_n} derivations, {} edges, {} sinks",
                dag.edges(),
                sinks.len()
            );
            let name = format!("noop-{noop_n}");
            let expr = dag.expression(o.seed);
            let ready = if o.reuse {
                Root::ready_drvs(&scratch, &name, &expr)
            } else {
                None
            };
            let (root, drvs) = match ready {
                Some((root, drvs)) if drvs.len() == noop_n => {
                    eprintln!("noop: reusing {}", root.dir.display());
                    (root, drvs)
                }
                _ => {
                    let root = Root::new(&scratch, &name, o.keep || o.reuse)?;
                    let t = Instant::now();
                    let drvs = root.instantiate(&expr)?;
                    anyhow::ensure!(drvs.len() == noop_n, "instantiated {} drvs", drvs.len());
                    eprintln!("noop: instantiated in {}", secs(t.elapsed()));
                    let t = Instant::now();
                    make_outputs_valid(&root, &drvs)?;
                    eprintln!("noop: made all outputs valid in {}", secs(t.elapsed()));
                    if o.reuse {
                        root.mark_ready(&drvs)?;
                    }
                    (root, drvs)
                }
            };
            let with_nix = o.nix_noop_max_n == 0 || noop_n <= o.nix_noop_max_n;
            if !with_nix {
                eprintln!("noop: {noop_n} > --nix-noop-max-n: drover only");
            }
            for &case in &noop_cases {
                let targets: Vec<String> = if case == "noop-all" {
                    short_arguments(&root, &drvs)?
                } else {
                    sinks.iter().map(|&i| drvs[i].clone()).collect()
                };
                let mut times: Vec<Vec<Sample>> = tools.iter().map(|_| Vec::new()).collect();
                'runs: for run in 0..noop_runs {
                    for tool in order(&tools, run) {
                        if !with_nix && tool.tool == Tool::Nix {
                            continue;
                        }
                        let d = match realise(&root, tool, None, &targets) {
                            Err(e) if too_many_arguments(&e) => {
                                eprintln!(
                                    "{case} {noop_n}: skipped: {} paths are too many arguments \
                                     for one command (Linux allows ¼ of `ulimit -s`, at most \
                                     6 MiB; raise it, or use a shorter --scratch path or a \
                                     smaller N)",
                                    targets.len()
                                );
                                break 'runs;
                            }
                            r => r?,
                        };
                        eprintln!(
                            "{case} {noop_n} run {run}: {} {} (cpu {}, {} KiB)",
                            tool.name,
                            secs(d.wall),
                            secs(d.cpu),
                            d.rss_kib
                        );
                        let i = tools.iter().position(|t| t.name == tool.name).unwrap_or(0);
                        times[i].push(d);
                    }
                }
                for (tool, t) in tools.iter().zip(times) {
                    if t.is_empty() {
                        continue;
                    }
                    rows.push(Row {
                        case: case.into(),
                        n: noop_n,
                        goals: targets.len(),
                        tool: tool.name,
                        times: t,
                    });
                }
            }
        }
    }

    if o.cases.iter().any(|c| c == "build") {
        for &build_n in &build_ns {
            let dag = Dag::generate(build_n, o.seed);
            let sinks = dag.sinks();
            let expr = dag.expression(o.seed);
            eprintln!(
                "build: {build_n} derivations, {} edges, {} sinks",
                dag.edges(),
                sinks.len()
            );
            let with_nix = o.nix_build_max_n == 0 || build_n <= o.nix_build_max_n;
            if !with_nix {
                eprintln!("build: {build_n} > --nix-build-max-n: drover only");
            }
            let runs = if build_n > 1000 {
                o.large_build_runs.max(1)
            } else {
                build_runs
            };
            let case_tools: Vec<&Bench> = tools
                .iter()
                .filter(|t| with_nix || t.tool != Tool::Nix)
                .collect();
            // Roots are removed only after the case: deleting thousands of files
            // right before the next timed run makes the file system's inode
            // allocation slower for whichever tool runs next.
            let mut used_roots = Vec::new();
            for &j in &o.jobs {
                let mut times: Vec<Vec<Sample>> = case_tools.iter().map(|_| Vec::new()).collect();
                for run in 0..runs {
                    for i in 0..case_tools.len() {
                        let i = (i + run) % case_tools.len();
                        let tool = case_tools[i];
                        let root = Root::new(
                            &scratch,
                            &format!("build-{build_n}-j{j}-{run}-{}", tool.name),
                            o.keep,
                        )?;
                        let drvs = root.instantiate(&expr)?;
                        anyhow::ensure!(drvs.len() == build_n, "instantiated {} drvs", drvs.len());
                        let targets: Vec<String> = sinks.iter().map(|&i| drvs[i].clone()).collect();
                        let d = realise(&root, tool, Some(j), &targets)?;
                        eprintln!(
                            "build {build_n} -j{j} run {run}: {} {} (cpu {}, {} KiB)",
                            tool.name,
                            secs(d.wall),
                            secs(d.cpu),
                            d.rss_kib
                        );
                        times[i].push(d);
                        used_roots.push(root);
                    }
                }
                for (tool, t) in case_tools.iter().zip(times) {
                    rows.push(Row {
                        case: format!("build -j{j}"),
                        n: build_n,
                        goals: build_n,
                        tool: tool.name,
                        times: t,
                    });
                }
            }
            drop(used_roots);
        }
    }

    if !o.keep && !o.reuse {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    print_table(&rows);
    print_per_derivation(&rows);
    Ok(())
}
