//! The sandbox benchmark: N trivial independent derivations (`echo <i> > $out`)
//! built with `sandbox = true` (busybox as `/bin/sh`, no build users) by `drover
//! realise` beside Nix 2.8's `nix-store --realise`, both at `--max-jobs J`, in one
//! run. With `--unsandboxed` the same workload is also timed with `sandbox = false`,
//! so the cost of the sandbox itself shows.
//!
//! Each run gets a fresh scratch root (instantiated from the same expression, so
//! only the store dir differs); runs alternate between the tools so that background
//! load hits both alike; only the realise command is timed. Output: one row per
//! tool and mode with the median wall time, the median per build, and the
//! drover/Nix ratio of the medians.
//!
//! Needs root (user namespaces as root, as Nix's sandbox does here) and
//! `/bin/busybox`. Run with `cargo build --release -p drover-cli --bin drover &&
//! cargo run --release -p drover-actors --example bench_sandbox -- [--n 1000]`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

mod common;
use common::{drover_binary, remove_tree, Tool};

#[derive(Parser, Debug)]
#[command(about = "Time sandboxed builds: drover realise beside nix-store --realise")]
struct Opts {
    /// The drover binary (default: `target/release/drover`).
    #[arg(long)]
    drover: Option<PathBuf>,
    /// Derivations to build.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// `--max-jobs`.
    #[arg(long, default_value_t = 2)]
    jobs: u32,
    /// Timed runs per tool (and mode).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Also time the workload with `sandbox = false`.
    #[arg(long)]
    unsandboxed: bool,
    /// Where scratch roots go (default: the system temporary directory).
    #[arg(long)]
    scratch: Option<PathBuf>,
}

/// A scratch root: store, state, logs, `nix.conf`; removed on drop.
struct Root {
    dir: PathBuf,
}

impl Root {
    fn new(parent: &Path, name: &str, sandbox: bool) -> anyhow::Result<Root> {
        let dir = parent.join(name);
        remove_tree(&dir);
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let conf = if sandbox {
            "sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\n"
        } else {
            "sandbox = false\n"
        };
        std::fs::write(
            dir.join("etc/nix.conf"),
            format!("{conf}build-users-group =\nsubstituters =\n"),
        )?;
        Ok(Root { dir })
    }

    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_STORE_DIR", self.dir.join("store"))
            .env("NIX_STATE_DIR", self.dir.join("var/nix"))
            .env("NIX_LOG_DIR", self.dir.join("var/log/nix"))
            .env("NIX_CONF_DIR", self.dir.join("etc"))
            .env("NIX_USER_CONF_FILES", "")
            .env("NIX_REMOTE", "")
            .env("NIX_PATH", "")
            .env("TMPDIR", self.dir.join("tmp"))
            .stdin(Stdio::null());
        c
    }

    fn instantiate(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let file = self.dir.join("bench.nix");
        std::fs::write(
            &file,
            format!(
                "builtins.genList (i: derivation {{ name = \"sandbox-bench-${{toString i}}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo ${{toString i}} > $out\" ]; }}) {n}\n"
            ),
        )?;
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
        remove_tree(&self.dir);
    }
}

/// One timed realisation of `drvs` in a fresh root.
fn run(
    scratch: &Path,
    tool: Tool,
    drover: &Path,
    sandbox: bool,
    opts: &Opts,
) -> anyhow::Result<Duration> {
    let root = Root::new(scratch, &format!("bench-sandbox-{}", tool.name()), sandbox)?;
    let drvs = root.instantiate(opts.n)?;
    let mut c = match tool {
        Tool::Drover => {
            let mut c = root.cmd(drover);
            c.arg("realise");
            c
        }
        Tool::Nix => {
            let mut c = root.cmd(Path::new("nix-store"));
            c.arg("--realise");
            c
        }
    };
    let err = root.dir.join("realise.stderr");
    c.arg("--max-jobs")
        .arg(opts.jobs.to_string())
        .arg("--no-build-output")
        .args(&drvs)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err)?);
    let start = Instant::now();
    let status = c.status()?;
    let took = start.elapsed();
    if !status.success() {
        let text = std::fs::read_to_string(&err).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        anyhow::bail!(
            "{} realise failed with {status}:\n{}",
            tool.name(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(took)
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

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let drover = drover_binary(opts.drover.as_deref())?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("bench_sandbox needs root (sandboxed builds as root, as Nix runs them here)");
    }
    if !Path::new("/bin/busybox").is_file() {
        anyhow::bail!("bench_sandbox needs /bin/busybox (apt-get install busybox-static)");
    }
    let scratch = opts.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let mut modes = vec![true];
    if opts.unsandboxed {
        modes.push(false);
    }
    println!(
        "{} trivial builds at -j{}, {} run(s) per row",
        opts.n, opts.jobs, opts.runs
    );
    println!(
        "{:<10} {:<8} {:>10} {:>12} {:>14}",
        "sandbox", "tool", "median", "per build", "drover/nix"
    );
    for sandbox in modes {
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..opts.runs {
            for (k, tool) in [Tool::Drover, Tool::Nix].into_iter().enumerate() {
                times[k].push(run(&scratch, tool, &drover, sandbox, &opts)?);
            }
        }
        let (d, n) = (median(times[0].clone()), median(times[1].clone()));
        for (tool, m) in [(Tool::Drover, d), (Tool::Nix, n)] {
            let ratio = if tool == Tool::Drover {
                format!("{:.2}", d.as_secs_f64() / n.as_secs_f64().max(1e-9))
            } else {
                String::new()
            };
            println!(
                "{:<10} {:<8} {:>9.2}s {:>10.2}ms {:>14}",
                if sandbox { "true" } else { "false" },
                tool.name(),
                m.as_secs_f64(),
                m.as_secs_f64() * 1000.0 / opts.n as f64,
                ratio
            );
        }
    }
    Ok(())
}
