//! The substitution benchmark: `drover realise` beside Nix 2.8's `nix-store --realise`
//! fetching the same paths from the same binary caches.
//!
//! Setup (once, with Nix 2.8, in a scratch root `<scratch>/root`):
//! * `closure` (the default with `big`): a closure of 1,001 small paths realised by
//!   naming its root only: 10 layers of 100 trivial derivations, each output referring
//!   to three outputs of the layer below (`echo <i> <inputs> > $out`), and a root
//!   referring to the whole top layer. Only the root is named on the command line, so
//!   the closure is found narinfo by narinfo (`--closure-layers`, `--closure-width`
//!   change its shape);
//! * `small`: N (default 1000) independent trivial derivations, all named (not run by
//!   default);
//! * `big`: M (default 10) derivations of 20 MB each from `/dev/urandom`, all named
//!   (builders have no `PATH`, so `/usr/bin/head` is named absolutely; the sandbox is
//!   off).
//!
//! All outputs are built, a signing key is made with `nix-store
//! --generate-binary-cache-key`, and `nix copy` writes two signed caches, one with
//! `compression=xz` and one with `compression=zstd`. The caches are then served two
//! ways: `file://<dir>` and `http://127.0.0.1:<port>/<dir>` from an HTTP server on a
//! free loopback port that this program starts and stops: nginx when it is installed
//! (one worker, `sendfile`, keep-alive: a server that is never the bottleneck), else
//! `python3 -m http.server` (HTTP/1.0, one Python thread per connection: with many
//! parallel downloads it, not the client, sets the pace — the table says which).
//!
//! Timed runs: for each case × cache × transport × tool, the scratch root's store and
//! state are wiped (the store dir must stay the cache's `StoreDir`), `nix.conf` names
//! the one substituter and its public key, and the case's requested paths are
//! realised with `--max-jobs 0` (nothing may be built); afterwards every path of the
//! case's closure must exist. Runs alternate which tool goes
//! first. Only the realise command is timed (process start to exit).
//!
//! Output: one row per case, transport, compression and tool with the median wall
//! time, paths/s, NAR MB/s (the narinfos' `NarSize` summed, per second; 1 MB = 10^6
//! bytes), the drover/Nix ratio of the medians (below 1: drover is faster) and its
//! inverse, drover's rate as a multiple of Nix's (`rate×nix`; the target is ≥ 2).
//!
//! Run with `cargo build --release -p drover-cli --bin drover && cargo run
//! --release -p drover-actors --example bench_substitute -- [--quick]`; see
//! `docs/benchmarks.md`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

mod common;
use common::{drover_binary, remove_tree, Tool};

#[derive(Parser, Debug)]
#[command(about = "Time drover realise beside nix-store --realise substituting from binary caches")]
struct Opts {
    /// The drover binary (default: `target/release/drover`, next to this example's
    /// directory).
    #[arg(long)]
    drover: Option<PathBuf>,
    /// Small sizes and one run, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Paths in the `small` case (default 1000; 100 with --quick).
    #[arg(long)]
    small_n: Option<usize>,
    /// Layers of the `closure` case below its root (default 10; 3 with --quick).
    #[arg(long)]
    closure_layers: Option<usize>,
    /// Derivations per layer of the `closure` case (default 100; 20 with --quick).
    #[arg(long)]
    closure_width: Option<usize>,
    /// Paths in the `big` case (default 10; 3 with --quick).
    #[arg(long)]
    big_n: Option<usize>,
    /// Bytes of each `big` path (default 20000000).
    #[arg(long, default_value_t = 20_000_000)]
    big_bytes: u64,
    /// Timed runs per row (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Which cases to run.
    #[arg(long, value_delimiter = ',', default_values = ["closure", "big"])]
    cases: Vec<String>,
    /// Which compressions to run.
    #[arg(long, value_delimiter = ',', default_values = ["xz", "zstd"])]
    compressions: Vec<String>,
    /// Which transports to run.
    #[arg(long, value_delimiter = ',', default_values = ["file", "http"])]
    transports: Vec<String>,
    /// Where the scratch root and caches go (default: the system temporary
    /// directory).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Another drover binary (e.g. the main branch's) timed as a third tool,
    /// `drover-base`, beside the same Nix runs.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Keep the scratch directory (its path is printed).
    #[arg(long)]
    keep: bool,
    /// Reuse the caches of an earlier `--keep` run in `--scratch` when it was set up
    /// with the same sizes and compressions and every case asked for (the setup takes
    /// minutes: the xz cache of random data); implies `--keep`.
    #[arg(long, requires = "scratch")]
    reuse: bool,
}

/// The scratch Nix root: one store dir for building, the caches and every timed run.
struct Root {
    dir: PathBuf,
}

impl Root {
    fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// Empties the store and state and writes `nix.conf` with `extra` lines.
    fn reset(&self, extra: &str) -> anyhow::Result<()> {
        for d in ["store", "var", "tmp", "cache-home"] {
            remove_tree(&self.dir.join(d));
        }
        std::fs::create_dir_all(self.dir.join("etc"))?;
        std::fs::create_dir_all(self.dir.join("tmp"))?;
        std::fs::write(
            self.dir.join("etc/nix.conf"),
            format!(
                "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n{extra}\n"
            ),
        )?;
        Ok(())
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
            // Nix remembers HTTP caches' narinfos in $XDG_CACHE_HOME/nix: a fresh one
            // per run, so every run starts cold (as the first one would).
            .env("XDG_CACHE_HOME", self.dir.join("cache-home"))
            .stdin(Stdio::null());
        c
    }

    /// Runs a setup command; its stdout lines, or an error with its stderr.
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let out = self
            .cmd(Path::new(program))
            .args(args)
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "{program} {} failed: {}",
                args.first().copied().unwrap_or_default(),
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

/// One case's paths, built once and then copied to every cache.
struct Case {
    name: &'static str,
    /// What a timed run names on the command line.
    requested: Vec<String>,
    /// Every path a run must leave valid (the requested paths' closure).
    closure: Vec<String>,
}

/// The `closure` case: `layers` layers of `width` derivations, each output naming
/// (and so referring to) three outputs of the layer below, and one root referring to
/// the top layer. The layers are one lazy list, so each derivation is evaluated once.
fn closure_expression(layers: usize, width: usize) -> String {
    format!(
        r#"let
  width = {width};
  mk = l: i: deps: derivation {{
    name = "closure-${{toString l}}-${{toString i}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{toString l}} ${{toString i}} ${{toString deps}} > $out" ];
  }};
  below = l: j: builtins.elemAt (builtins.elemAt layers (l - 1)) (j - width * (j / width));
  layers = builtins.genList (l: builtins.genList (i:
    mk l i (if l == 0 then [ ] else [ (below l i) (below l (i + 1)) (below l (i + 7)) ])
  ) width) {layers};
in mk {layers} 0 (builtins.elemAt layers ({layers} - 1))
"#
    )
}

fn expression(case: &str, n: usize, big_bytes: u64) -> String {
    let script = match case {
        "small" => r#""echo ${toString i} > $out""#.to_owned(),
        // `i` goes into the script so every derivation (and output) differs.
        _ => format!(r##""# ${{toString i}}\n/usr/bin/head -c {big_bytes} /dev/urandom > $out""##),
    };
    format!(
        r#"builtins.genList (i: derivation {{
  name = "{case}-${{toString i}}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" {script} ];
}}) {n}
"#
    )
}

/// Sums `NarSize` over the narinfos of a cache directory.
fn nar_bytes(cache: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(cache)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            let text = std::fs::read_to_string(&p)?;
            total += text
                .lines()
                .find_map(|l| l.strip_prefix("NarSize: "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| anyhow::anyhow!("no NarSize in {}", p.display()))?;
        }
    }
    Ok(total)
}

/// An HTTP server on a free loopback port, serving `dir`; stopped on drop.
struct HttpServer {
    child: Child,
    port: u16,
    /// `nginx` or `python3 -m http.server`.
    name: &'static str,
}

impl HttpServer {
    /// nginx if it is on `PATH` (or in `/usr/sbin`), else Python's server.
    fn start(dir: &Path, scratch: &Path) -> anyhow::Result<HttpServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let (child, name) = match nginx {
            Some(nginx) => {
                let conf = scratch.join("nginx.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "daemon off;\nuser root;\nworker_processes 1;\npid {pid};\nerror_log {err};\n\
                         events {{ worker_connections 1024; }}\n\
                         http {{ access_log off; sendfile on; \
                         client_body_temp_path {tmp}; proxy_temp_path {tmp}; \
                         fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp}; \
                         server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
                        pid = scratch.join("nginx.pid").display(),
                        err = scratch.join("nginx.err").display(),
                        tmp = scratch.display(),
                        root = dir.display(),
                    ),
                )?;
                let child = Command::new(nginx)
                    .arg("-c")
                    .arg(&conf)
                    .arg("-e")
                    .arg(scratch.join("nginx.err"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                (child, "nginx")
            }
            None => {
                let child = Command::new("python3")
                    .args(["-m", "http.server", "--bind", "127.0.0.1"])
                    .arg("--directory")
                    .arg(dir)
                    .arg(port.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                (child, "python3 -m http.server")
            }
        };
        let mut server = HttpServer { child, port, name };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = server.child.kill();
                anyhow::bail!("the HTTP server did not start on port {port}");
            }
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("the HTTP server exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // SIGTERM, so nginx's master stops its worker too (SIGKILL left the worker
        // running, listening on the port).
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Realises `paths` into the emptied root from `url`; the wall time.
fn realise(
    root: &Root,
    tool: Tool,
    binary: &Path,
    url: &str,
    public_key: &str,
    paths: &[String],
    closure: &[String],
) -> anyhow::Result<Duration> {
    root.reset(&format!(
        "substituters = {url}\ntrusted-public-keys = {public_key}\n"
    ))?;
    let mut c = match tool {
        Tool::Drover => {
            let mut c = root.cmd(binary);
            c.arg("realise");
            c
        }
        Tool::Nix => {
            let mut c = root.cmd(Path::new("nix-store"));
            c.arg("--realise");
            c
        }
    };
    let file = root.dir.join("realise.stderr");
    c.args(["--max-jobs", "0"])
        .args(paths)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&file)?);
    let start = Instant::now();
    let status = c.status()?;
    let took = start.elapsed();
    if !status.success() {
        let err = std::fs::read_to_string(&file).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        anyhow::bail!(
            "{} realise from {url} failed with {status}:\n{}",
            tool.name(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // Every path of the closure must now be in the store.
    if let Some(missing) = closure.iter().find(|p| !Path::new(p).exists()) {
        anyhow::bail!("{} did not realise {missing}", tool.name());
    }
    Ok(took)
}

/// One line of the result table.
struct Row {
    case: &'static str,
    transport: String,
    compression: String,
    name: &'static str,
    tool: Tool,
    paths: usize,
    nar_bytes: u64,
    times: Vec<Duration>,
}

impl Row {
    fn median(&self) -> Duration {
        let mut t = self.times.clone();
        t.sort();
        let m = t.len() / 2;
        match t.len() {
            0 => Duration::ZERO,
            n if n % 2 == 1 => t[m],
            _ => (t[m - 1] + t[m]) / 2,
        }
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<7} {:>5} {:<5} {:<5} {:<11} {:>4} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "case",
        "paths",
        "trans",
        "comp",
        "tool",
        "runs",
        "median",
        "paths/s",
        "NAR MB/s",
        "drover/nix",
        "rate×nix"
    );
    for r in rows {
        let secs = r.median().as_secs_f64();
        let nix = rows.iter().find(|o| {
            o.case == r.case
                && o.transport == r.transport
                && o.compression == r.compression
                && o.tool == Tool::Nix
        });
        let (ratio, rate) = match nix {
            Some(n) if r.tool == Tool::Drover && !n.median().is_zero() && secs > 0.0 => {
                let nix = n.median().as_secs_f64();
                (format!("{:.2}", secs / nix), format!("{:.2}", nix / secs))
            }
            _ => (String::new(), String::new()),
        };
        println!(
            "{:<7} {:>5} {:<5} {:<5} {:<11} {:>4} {:>8.3}s {:>9.1} {:>9.2} {:>10} {:>9}",
            r.case,
            r.paths,
            r.transport,
            r.compression,
            r.name,
            r.times.len(),
            secs,
            r.paths as f64 / secs,
            r.nar_bytes as f64 / 1e6 / secs,
            ratio,
            rate
        );
    }
}

/// Builds the `name` case's `n` paths with Nix and adds it to `cases`.
fn build_case(
    root: &Root,
    cases: &mut Vec<Case>,
    name: &'static str,
    n: usize,
    layers: usize,
    width: usize,
    big_bytes: u64,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let file = root.dir.join(format!("{name}.nix"));
    let (text, roots) = match name {
        "closure" => (closure_expression(layers, width), 1),
        _ => (expression(name, n, big_bytes), n),
    };
    std::fs::write(&file, text)?;
    let drvs = root.run("nix-instantiate", &[file.to_str().unwrap_or_default()])?;
    anyhow::ensure!(drvs.len() == roots, "instantiated {} drvs", drvs.len());
    let mut args = vec!["--realise", "--max-jobs", "2"];
    args.extend(drvs.iter().map(String::as_str));
    let outs = root.run("nix-store", &args)?;
    anyhow::ensure!(outs.len() == roots, "built {} outputs", outs.len());
    let mut args = vec!["--query", "--requisites"];
    args.extend(outs.iter().map(String::as_str));
    let closure = root.run("nix-store", &args)?;
    anyhow::ensure!(
        closure.len() == n,
        "the closure has {} paths",
        closure.len()
    );
    eprintln!(
        "{name}: built {n} paths in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    cases.push(Case {
        name,
        requested: outs,
        closure,
    });
    Ok(())
}

/// The signing key (`sk`, `pk`) and one signed cache per case and compression under
/// `caches`.
fn write_caches(
    root: &Root,
    cases: &[Case],
    compressions: &[String],
    sk: &Path,
    pk: &Path,
    caches: &Path,
) -> anyhow::Result<()> {
    root.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "bench-1",
            sk.to_str().unwrap_or_default(),
            pk.to_str().unwrap_or_default(),
        ],
    )?;
    for case in cases {
        for comp in compressions {
            let t = Instant::now();
            let dir = caches.join(format!("{}-{comp}", case.name));
            // Random data does not compress and xz of the big case takes minutes.
            // Nix's multi-threaded xz is asked for, but it made no measurable
            // difference here (see docs/benchmarks.md).
            let to = format!(
                "file://{}?compression={comp}&parallel-compression=true&secret-key={}",
                dir.display(),
                sk.display()
            );
            let mut args = vec!["copy", "--to", to.as_str()];
            args.extend(case.requested.iter().map(String::as_str));
            root.run("nix", &args)?;
            eprintln!(
                "{}: wrote the {comp} cache in {:.1}s",
                case.name,
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// The cases a `--keep` run wrote to `setup.txt` (after its first line, the setup's
/// parameters).
fn read_setup(file: &Path) -> anyhow::Result<Vec<Case>> {
    let mut cases: Vec<Case> = Vec::new();
    for line in std::fs::read_to_string(file)?.lines().skip(1) {
        let (kind, value) = line
            .split_once(' ')
            .ok_or_else(|| anyhow::anyhow!("bad line in {}: {line}", file.display()))?;
        match (kind, cases.last_mut()) {
            ("case", _) => cases.push(Case {
                name: match value {
                    "closure" => "closure",
                    "small" => "small",
                    "big" => "big",
                    other => anyhow::bail!("unknown case {other} in {}", file.display()),
                },
                requested: Vec::new(),
                closure: Vec::new(),
            }),
            ("requested", Some(c)) => c.requested.push(value.to_owned()),
            ("closure", Some(c)) => c.closure.push(value.to_owned()),
            _ => anyhow::bail!("bad line in {}: {line}", file.display()),
        }
    }
    Ok(cases)
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let drover = drover_binary(o.drover.as_deref())?;
    let small_n = o.small_n.unwrap_or(if o.quick { 100 } else { 1000 });
    let big_n = o.big_n.unwrap_or(if o.quick { 3 } else { 10 });
    let layers = o
        .closure_layers
        .unwrap_or(if o.quick { 3 } else { 10 })
        .max(1);
    let width = o
        .closure_width
        .unwrap_or(if o.quick { 20 } else { 100 })
        .max(1);
    let runs = o.runs.unwrap_or(if o.quick { 1 } else { 3 }).max(1);
    let scratch = match &o.scratch {
        Some(s) => s.clone(),
        None => std::env::temp_dir().join(format!("drover-bench-subst-{}", std::process::id())),
    };
    // What the setup depends on: a reused scratch must have been made with it.
    let setup_key = format!(
        "compressions={:?} layers={layers} width={width} small={small_n} big={big_n} bytes={}",
        o.compressions, o.big_bytes
    );
    let setup_file = scratch.join("setup.txt");
    // Reused when made with the same parameters and holding every case asked for
    // (a run may time fewer cases than were set up).
    let reused = o.reuse
        && std::fs::read_to_string(&setup_file).is_ok_and(|t| {
            t.lines().next() == Some(setup_key.as_str())
                && o.cases
                    .iter()
                    .all(|c| t.lines().any(|l| l == format!("case {c}")))
        });
    if !reused {
        remove_tree(&scratch);
    }
    std::fs::create_dir_all(&scratch)?;
    eprintln!(
        "drover: {}; scratch: {}",
        drover.display(),
        scratch.display()
    );
    let root = Root {
        dir: scratch.join("root"),
    };
    root.reset("substituters =")?;

    // Build every case's outputs with Nix.
    let mut cases = Vec::new();
    let (sk, pk) = (scratch.join("key.sec"), scratch.join("key.pub"));
    let caches = scratch.join("caches");
    if reused {
        cases = read_setup(&setup_file)?;
        cases.retain(|c| o.cases.iter().any(|n| n == c.name));
        eprintln!("reusing the caches of {}", scratch.display());
    }
    for (name, n) in [
        ("closure", layers * width + 1),
        ("small", small_n),
        ("big", big_n),
    ] {
        if reused || !o.cases.iter().any(|c| c == name) {
            continue;
        }
        build_case(&root, &mut cases, name, n, layers, width, o.big_bytes)?;
    }
    if !reused {
        write_caches(&root, &cases, &o.compressions, &sk, &pk, &caches)?;
        let mut text = format!("{setup_key}\n");
        for c in &cases {
            text.push_str(&format!("case {}\n", c.name));
            for p in &c.requested {
                text.push_str(&format!("requested {p}\n"));
            }
            for p in &c.closure {
                text.push_str(&format!("closure {p}\n"));
            }
        }
        std::fs::write(&setup_file, text)?;
    }
    let public_key = std::fs::read_to_string(&pk)?.trim().to_owned();
    let server = if o.transports.iter().any(|t| t == "http") {
        let s = HttpServer::start(&caches, &scratch)?;
        eprintln!("HTTP server: {} on port {}", s.name, s.port);
        Some(s)
    } else {
        None
    };

    let mut tools: Vec<(&'static str, Tool, PathBuf)> = vec![
        (Tool::Drover.name(), Tool::Drover, drover.clone()),
        (Tool::Nix.name(), Tool::Nix, PathBuf::from("nix-store")),
    ];
    if let Some(b) = &o.baseline {
        eprintln!("baseline drover: {}", b.display());
        tools.push(("drover-base", Tool::Drover, b.clone()));
    }
    let mut rows = Vec::new();
    for case in &cases {
        for comp in &o.compressions {
            let dir = caches.join(format!("{}-{comp}", case.name));
            let nar = nar_bytes(&dir)?;
            for transport in &o.transports {
                let url = match (transport.as_str(), &server) {
                    ("file", _) => format!("file://{}", dir.display()),
                    ("http", Some(s)) => {
                        format!("http://127.0.0.1:{}/{}-{comp}", s.port, case.name)
                    }
                    _ => anyhow::bail!("unknown transport {transport}"),
                };
                let mut times: Vec<Vec<Duration>> = tools.iter().map(|_| Vec::new()).collect();
                for run in 0..runs {
                    // Rotate which tool goes first.
                    for k in 0..tools.len() {
                        let i = (k + run) % tools.len();
                        let (name, tool, binary) = &tools[i];
                        let d = realise(
                            &root,
                            *tool,
                            binary,
                            &url,
                            &public_key,
                            &case.requested,
                            &case.closure,
                        )?;
                        eprintln!(
                            "{} {transport} {comp} run {run}: {name} {:.3}s",
                            case.name,
                            d.as_secs_f64()
                        );
                        times[i].push(d);
                    }
                }
                for ((name, tool, _), times) in tools.iter().zip(times) {
                    rows.push(Row {
                        case: case.name,
                        transport: transport.clone(),
                        compression: comp.clone(),
                        name,
                        tool: *tool,
                        paths: case.closure.len(),
                        nar_bytes: nar,
                        times,
                    });
                }
            }
        }
    }
    drop(server);
    if o.keep || o.reuse {
        eprintln!("kept scratch directory {}", scratch.display());
    } else {
        remove_tree(&scratch);
    }
    print_table(&rows);
    Ok(())
}
