//! The build-log benchmark: a builder that writes a large log (200 MB and 20 MB of
//! compiler-like lines by default), built by `drover realise` and by Nix 2.8's
//! `nix-store --realise` on fresh scratch roots in one run.
//!
//! Both tools store the log bzip2-compressed (`compress-build-log`, the default), so
//! the figure is how fast a heavily logging build can go: the builder blocks when
//! its pty is full, so a log pipeline slower than the builder holds the build back.
//! Both run with `--no-build-output` (`-Q`), so only the stored log costs.
//!
//! For every size, tool and run: a fresh root, `nix-instantiate` of the same
//! expression (only the store dir differs), then the realise command alone is timed
//! (spawn to exit). The table gives the median wall time, the log's MB/s (10^6 bytes
//! of log over the wall time), the CPU time (tool and builder), the peak RSS of the
//! tool (GNU time's `%M`, as `bench_realise` reads it) and the size of the stored
//! `.bz2`. After the first run of each size, the stored log of each tool is read
//! back by the other tool too (`nix-store -l` reads drover's, `drover log` reads
//! Nix's) and compared with what the builder wrote (length and hash): a mismatch
//! fails the benchmark.
//!
//! Run with `cargo build --release -p drover-cli --bin drover && cargo run
//! --release -p drover-actors --example bench_log -- [--quick]`; see
//! `docs/benchmarks.md`.

use std::hash::Hasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

mod common;
use common::{drover_binary, remove_tree, Tool};

#[derive(Parser, Debug)]
#[command(about = "Time a heavily logging build: drover realise beside nix-store --realise")]
struct Opts {
    /// The drover binary (default: `target/release/drover`).
    #[arg(long)]
    drover: Option<PathBuf>,
    /// Log sizes in MB (10^6 bytes).
    #[arg(long, value_delimiter = ',', default_values_t = [200u64, 20])]
    sizes: Vec<u64>,
    /// Timed runs per tool and size (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// One run of a 20 MB log only, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Where scratch roots go (default: the system temporary directory).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Keep the scratch roots.
    #[arg(long)]
    keep: bool,
    /// Another drover binary timed beside the first (e.g. the one before a change).
    #[arg(long)]
    baseline: Option<PathBuf>,
}

/// A tool to time: which kind, its display name, and for drover the binary.
struct Bench {
    tool: Tool,
    name: &'static str,
    bin: PathBuf,
}

/// The builder's log generator: `gen.sh BYTES` writes at least BYTES of compiler-like
/// lines (compile commands, every seventh line a warning with pseudo-random
/// positions from a fixed seed) to stdout, then `ok` to `$out`.
const GENERATOR: &str = r#"#!/bin/sh
/usr/bin/awk -v n="$1" 'BEGIN {
  srand(7); t = 0; i = 0;
  while (t < n) {
    m = i % 97;
    if (i % 7 == 3)
      s = sprintf("src/module_%d/file_%d.c:%d:%d: warning: unused variable '\''tmp_%d'\'' [-Wunused-variable]", m, i, int(rand() * 2000) + 1, int(rand() * 80) + 1, int(rand() * 100000));
    else
      s = sprintf("libtool: compile:  gcc -DHAVE_CONFIG_H -I. -I../include -g -O2 -Wall -c src/module_%d/file_%d.c -fPIC -DPIC -o .libs/file_%d.o", m, i, i);
    print s; t += length(s) + 1; i++;
  }
}'
echo ok > "$out"
"#;

/// A scratch Nix root, as the test harness makes.
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

    /// Instantiates the logging derivation: its `.drv` path.
    fn instantiate(&self, generator: &Path, bytes: u64) -> anyhow::Result<String> {
        let file = self.dir.join("log.nix");
        std::fs::write(
            &file,
            format!(
                "derivation {{ name = \"biglog\"; system = builtins.currentSystem; \
                 builder = \"/bin/sh\"; args = [ \"{}\" \"{bytes}\" ]; }}\n",
                generator.display()
            ),
        )?;
        let out = self
            .cmd(Path::new("nix-instantiate"))
            .arg(&file)
            .stderr(Stdio::piped())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "nix-instantiate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// The stored log file's size in bytes (the `.bz2` under `var/log/nix/drvs`).
    fn log_file_size(&self) -> u64 {
        fn walk(d: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(d) else {
                return 0;
            };
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        }
        walk(&self.dir.join("var/log/nix/drvs"))
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

/// One timed run.
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    rss_kib: u64,
    bz2_bytes: u64,
}

/// Waits for `child` with `wait4`: its exit status and CPU time (with its children).
fn wait4(child: std::process::Child) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
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
    std::mem::forget(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok((
        std::process::ExitStatus::from_raw(status),
        tv(ru.ru_utime) + tv(ru.ru_stime),
    ))
}

/// Builds `drv` with `tool` in `root`, timed; the peak RSS through GNU time.
fn realise(root: &Root, bench: &Bench, drv: &str) -> anyhow::Result<Sample> {
    let (program, sub): (&Path, &str) = match bench.tool {
        Tool::Drover => (&bench.bin, "realise"),
        Tool::Nix => (Path::new("nix-store"), "--realise"),
    };
    let time = Path::new("/usr/bin/time");
    let rss_file = root.dir.join("realise.rss");
    let err_file = root.dir.join("realise.stderr");
    let mut c = if time.exists() {
        let mut c = root.cmd(time);
        c.arg("-f").arg("%M").arg("-o").arg(&rss_file).arg(program);
        c
    } else {
        root.cmd(program)
    };
    c.arg(sub)
        .arg("--no-build-output")
        .arg(drv)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_file)?);
    let start = Instant::now();
    let (status, cpu) = wait4(c.spawn()?)?;
    let wall = start.elapsed();
    if !status.success() {
        anyhow::bail!(
            "{} realise failed with {status}: {}",
            bench.name,
            std::fs::read_to_string(&err_file).unwrap_or_default()
        );
    }
    let rss_kib = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.lines().last()?.trim().parse().ok())
        .unwrap_or(0);
    Ok(Sample {
        wall,
        cpu,
        rss_kib,
        bz2_bytes: root.log_file_size(),
    })
}

/// Length and hash of a byte stream.
fn digest(mut r: impl Read) -> anyhow::Result<(u64, u64)> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.write(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finish()))
}

/// What the generator writes for `bytes`: length and hash.
fn expected(generator: &Path, scratch: &Path, bytes: u64) -> anyhow::Result<(u64, u64)> {
    let mut child = Command::new("/bin/sh")
        .arg(generator)
        .arg(bytes.to_string())
        .env("out", scratch.join("gen.out"))
        .stdout(Stdio::piped())
        .spawn()?;
    let d = digest(child.stdout.take().expect("piped"))?;
    anyhow::ensure!(child.wait()?.success(), "the generator failed");
    Ok(d)
}

/// Reads the stored log of `drv` with `reader` (`nix-store -l` or `drover log`) and
/// checks it against `want`.
fn check_log(
    root: &Root,
    reader: Tool,
    drover: &Path,
    drv: &str,
    want: (u64, u64),
) -> anyhow::Result<()> {
    let mut c = match reader {
        Tool::Nix => {
            let mut c = root.cmd(Path::new("nix-store"));
            c.arg("-l");
            c
        }
        Tool::Drover => {
            let mut c = root.cmd(drover);
            c.arg("log");
            c
        }
    };
    let mut child = c
        .arg(drv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let got = digest(child.stdout.take().expect("piped"))?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success() && got == want,
        "{} read {} bytes (hash {:x}), want {} (hash {:x}); exit {}: {}",
        reader.name(),
        got.0,
        got.1,
        want.0,
        want.1,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let drover = drover_binary(o.drover.as_deref())?;
    let sizes = if o.quick { vec![20] } else { o.sizes.clone() };
    let runs = o.runs.unwrap_or(if o.quick { 1 } else { 3 }).max(1);
    let scratch = match &o.scratch {
        Some(s) => s.clone(),
        None => std::env::temp_dir().join(format!("drover-bench-log-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch)?;
    let generator = scratch.join("gen.sh");
    std::fs::write(&generator, GENERATOR)?;
    eprintln!(
        "drover: {}; scratch: {}",
        drover.display(),
        scratch.display()
    );
    let mut tools = vec![
        Bench {
            tool: Tool::Drover,
            name: Tool::Drover.name(),
            bin: drover.clone(),
        },
        Bench {
            tool: Tool::Nix,
            name: Tool::Nix.name(),
            bin: PathBuf::from("nix-store"),
        },
    ];
    if let Some(b) = &o.baseline {
        eprintln!("baseline drover: {}", b.display());
        tools.push(Bench {
            tool: Tool::Drover,
            name: "drover-old",
            bin: b.clone(),
        });
    }
    // (size, tool, samples)
    let mut rows: Vec<(u64, &Bench, Vec<Sample>)> = Vec::new();
    for &mb in &sizes {
        let bytes = mb * 1_000_000;
        let want = expected(&generator, &scratch, bytes)?;
        eprintln!("{mb} MB: the builder writes {} bytes", want.0);
        let mut samples: Vec<Vec<Sample>> = tools.iter().map(|_| Vec::new()).collect();
        for run in 0..runs {
            // Alternate which tool goes first.
            for k in 0..tools.len() {
                let i = (k + run) % tools.len();
                let tool = &tools[i];
                let root = Root::new(&scratch, &format!("{mb}-{run}-{}", tool.name), o.keep)?;
                let drv = root.instantiate(&generator, bytes)?;
                let s = realise(&root, tool, &drv)?;
                eprintln!(
                    "{mb} MB run {run}: {} {:.2}s {:.1} MB/s (cpu {:.2}s, {} KiB, .bz2 {} bytes)",
                    tool.name,
                    s.wall.as_secs_f64(),
                    want.0 as f64 / 1e6 / s.wall.as_secs_f64(),
                    s.cpu.as_secs_f64(),
                    s.rss_kib,
                    s.bz2_bytes
                );
                if run == 0 {
                    // Each tool's stored log, read by the other tool and by itself.
                    for reader in [Tool::Drover, Tool::Nix] {
                        check_log(&root, reader, &drover, &drv, want)?;
                    }
                }
                samples[i].push(s);
            }
        }
        for (i, s) in samples.into_iter().enumerate() {
            rows.push((want.0, &tools[i], s));
        }
    }
    if !o.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    println!(
        "{:>8} {:<10} {:>4} {:>9} {:>8} {:>7} {:>8} {:>9} {:>10}",
        "log MB", "tool", "runs", "wall", "MB/s", "vs nix", "cpu", "peak RSS", ".bz2 KB"
    );
    for (bytes, tool, s) in &rows {
        let wall = median(s.iter().map(|s| s.wall).collect());
        let rate = *bytes as f64 / 1e6 / wall.as_secs_f64();
        let nix_rate = rows
            .iter()
            .find(|(b, t, _)| b == bytes && t.tool == Tool::Nix)
            .map(|(b, _, s)| {
                *b as f64 / 1e6 / median(s.iter().map(|s| s.wall).collect()).as_secs_f64()
            });
        let vs = match (tool.tool, nix_rate) {
            (Tool::Drover, Some(n)) => format!("{:.2}", rate / n),
            _ => String::new(),
        };
        println!(
            "{:>8.0} {:<10} {:>4} {:>8.2}s {:>8.1} {:>7} {:>7.2}s {:>8.1}M {:>10}",
            *bytes as f64 / 1e6,
            tool.name,
            s.len(),
            wall.as_secs_f64(),
            rate,
            vs,
            median(s.iter().map(|s| s.cpu).collect()).as_secs_f64(),
            median(s.iter().map(|s| s.rss_kib).collect()) as f64 / 1024.0,
            median(s.iter().map(|s| s.bz2_bytes).collect()) / 1000
        );
    }
    Ok(())
}
