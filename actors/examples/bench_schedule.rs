//! The scheduling benchmark: drover's critical-path scheduler beside Nix 2.8's
//! `nix-store --realise`, on graphs where the order of the builds decides the
//! makespan, and the error of drover's ETA.
//!
//! Cases (each in fresh scratch roots, one per tool, instantiated by
//! `nix-instantiate` from the same expression; `--max-jobs 2`):
//! * (a) `chain+100x0.1`: a chain of 10 builds of 1 s beside 100 independent
//!   builds of 0.1 s;
//! * (b) `chain+10x1`: a chain of 10 builds of 1 s beside 10 independent builds
//!   of 1 s.
//!
//! Both have a lower bound of 10 s: the larger of the critical path (10 × 1 s) and
//! the work divided by the slots (20 s / 2). Each tool realises the chain's end and
//! every independent build (all requested on one command line), first in the fresh
//! root (`empty`: drover's history is empty), then — after `nix-store --delete` of
//! every output — again in the same root (`warm`: drover's history knows every
//! derivation; for Nix it is just a second run). The figure is the makespan (the
//! realise call, start to end) ÷ the lower bound, median of `--runs`.
//! * (c) `eta`: a random DAG (seeded) of 300 derivations with durations drawn from
//!   0.02–0.4 s, realised once to fill the history, then again after deleting the
//!   outputs: the ETA of the latest `Estimates` event before 10 % and 50 % of the
//!   run's actual length (projected to that moment) against the actual remaining
//!   time. Nix's makespan of the same DAG is printed beside drover's.
//!
//! drover runs in-process through `drover_actors::System` (the library the CLI
//! uses), with `max-jobs = 2`; builders are `/bin/sleep` then `echo` of their inputs
//! into `$out`, so every input is a real dependency.
//!
//! Run with `cargo run --release -p drover-actors --example bench_schedule --
//! [--runs N] [--cases a,b,c]`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use drover::config::{Env, Settings};
use drover::derived_path::{DerivedPath, OutputsSpec};
use drover_actors::messages::BuildMode;
use drover_actors::progress::{Estimates, GoalKey, ProgressEvent};
use drover_actors::{SystemBuilder, SystemEvent};

#[allow(dead_code)]
mod common;
use common::remove_tree;

#[derive(Parser, Debug)]
#[command(about = "drover's critical-path scheduling and ETA beside nix-store --realise")]
struct Opts {
    /// Runs per tool and case (the median is printed).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Which cases to run (a, b, c).
    #[arg(long, value_delimiter = ',', default_values_t = ["a".to_string(), "b".to_string(), "c".to_string()])]
    cases: Vec<String>,
    /// The seed of case (c)'s DAG.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Derivations in case (c)'s DAG.
    #[arg(long, default_value_t = 300)]
    eta_n: usize,
    /// Where the scratch roots go (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Diagnose chain links: builders also write wall-clock timestamps when they
    /// start and end (two `date` calls each, so the builds differ from the
    /// untraced ones), and drover's link latencies are printed: builder exit of a
    /// chain link → the dependent's grant, `building` event and builder start.
    #[arg(long)]
    trace: bool,
}

/// One derivation of a generated graph: its name, duration and inputs (indices).
struct Node {
    name: String,
    secs: f64,
    inputs: Vec<usize>,
}

/// The expression of a graph; with `trace`, each builder appends
/// `<name> s|e <unix seconds>` lines to that file when it starts and ends.
fn expression(nodes: &[Node], trace: Option<&Path>) -> String {
    let mut s = String::from("let sys = builtins.currentSystem;\n");
    for (i, n) in nodes.iter().enumerate() {
        let ins: Vec<String> = n.inputs.iter().map(|j| format!("${{d{j}}}")).collect();
        let stamp = |what: &str| match trace {
            Some(t) => format!(
                "echo {} {what} $(/bin/date +%s.%N) >> '{}'",
                n.name,
                t.display()
            ),
            None => String::new(),
        };
        let (start, end) = match trace {
            Some(_) => (format!("{}; ", stamp("s")), format!("; {}", stamp("e"))),
            None => (String::new(), String::new()),
        };
        s.push_str(&format!(
            "  d{i} = derivation {{ name = \"{}\"; system = sys; builder = \"/bin/sh\"; args = [\"-c\" \"{start}/bin/sleep {} && echo {} > $out{end}\"]; }};\n",
            n.name,
            n.secs,
            ins.join(" "),
        ));
    }
    s.push_str("in [");
    for i in 0..nodes.len() {
        s.push_str(&format!(" d{i}"));
    }
    s.push_str(" ]\n");
    s
}

/// A chain of `chain` 1 s builds beside `n` independent builds of `secs`.
fn chain_beside(n: usize, secs: f64) -> Vec<Node> {
    let mut v: Vec<Node> = (0..10)
        .map(|i| Node {
            name: format!("chain-{i}"),
            secs: 1.0,
            inputs: if i == 0 { vec![] } else { vec![i - 1] },
        })
        .collect();
    v.extend((0..n).map(|i| Node {
        name: format!("ind-{i}"),
        secs,
        inputs: vec![],
    }));
    v
}

/// A random DAG: each node depends on up to three earlier ones (seeded xorshift).
fn random_dag(n: usize, seed: u64) -> Vec<Node> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let durations = [0.02, 0.05, 0.1, 0.2, 0.4];
    (0..n)
        .map(|i| {
            let secs = durations[(next() % durations.len() as u64) as usize];
            let mut inputs = Vec::new();
            if i > 0 {
                for _ in 0..(next() % 4) {
                    // Mostly recent nodes, so the DAG has depth.
                    let back = 1 + (next() % 12) as usize;
                    let j = i.saturating_sub(back);
                    if !inputs.contains(&j) {
                        inputs.push(j);
                    }
                }
            }
            Node {
                name: format!("n{i}-1.0"),
                secs,
                inputs,
            }
        })
        .collect()
}

/// What is requested: every node nothing else depends on.
fn sinks(nodes: &[Node]) -> Vec<usize> {
    let mut used = vec![false; nodes.len()];
    for n in nodes {
        for &i in &n.inputs {
            used[i] = true;
        }
    }
    (0..nodes.len()).filter(|&i| !used[i]).collect()
}

struct Root {
    dir: PathBuf,
    /// The builders' timestamp file (`--trace`).
    trace: Option<PathBuf>,
}

impl Root {
    fn new(parent: &Path, name: &str, trace: bool) -> anyhow::Result<Root> {
        let dir = parent.join(name);
        remove_tree(&dir);
        std::fs::create_dir_all(dir.join("etc"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        std::fs::write(
            dir.join("etc/nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )?;
        let trace = trace.then(|| dir.join("trace"));
        Ok(Root { dir, trace })
    }

    /// The builders' timestamps since the last call: (name, start?, unix seconds).
    fn take_trace(&self) -> Vec<(String, bool, f64)> {
        let Some(t) = &self.trace else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(t).unwrap_or_default();
        let _ = std::fs::remove_file(t);
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (n, k, at) = (w.next()?, w.next()?, w.next()?.parse().ok()?);
                Some((n.to_owned(), k == "s", at))
            })
            .collect()
    }

    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("NIX_STORE_DIR", self.dir.join("store")),
            ("NIX_STATE_DIR", self.dir.join("var/nix")),
            ("NIX_LOG_DIR", self.dir.join("var/log/nix")),
            ("NIX_CONF_DIR", self.dir.join("etc")),
            ("TMPDIR", self.dir.join("tmp")),
        ]
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c.env("NIX_REMOTE", "")
            .env("NIX_PATH", "")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .cmd(program)
            .args(args)
            .stderr(Stdio::piped())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    fn instantiate(&self, nodes: &[Node]) -> anyhow::Result<Vec<String>> {
        let file = self.dir.join("graph.nix");
        std::fs::write(&file, expression(nodes, self.trace.as_deref()))?;
        let drvs: Vec<String> = self
            .run("nix-instantiate", &[file.to_str().unwrap_or_default()])?
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        anyhow::ensure!(drvs.len() == nodes.len(), "instantiated {}", drvs.len());
        Ok(drvs)
    }

    /// Deletes every output (drover's temporary roots of this process given up
    /// first, as a drover process gives them up at exit).
    fn delete_outputs(&self, drvs: &[String]) -> anyhow::Result<()> {
        drover::store::gc_roots::release_temp_roots_of(&self.dir.join("var/nix"));
        let mut args = vec!["-q", "--outputs"];
        args.extend(drvs.iter().map(String::as_str));
        let outs = self.run("nix-store", &args)?;
        let mut del = vec!["--delete"];
        del.extend(outs.lines());
        self.run("nix-store", &del)?;
        Ok(())
    }

    fn settings(&self) -> anyhow::Result<Settings> {
        let mut env: Env = self
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.display().to_string()))
            .collect();
        env.insert("NIX_USER_CONF_FILES".into(), String::new());
        env.insert("NIX_CONFIG".into(), "max-jobs = 2\n".into());
        Ok(Settings::load(&env, &[])?)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        remove_tree(&self.dir);
    }
}

/// Nix 2.8: `nix-store --realise --max-jobs 2` of the requested drvs.
fn realise_nix(root: &Root, drvs: &[String], want: &[usize]) -> anyhow::Result<Duration> {
    let mut args = vec!["--realise", "--max-jobs", "2", "--no-build-output"];
    args.extend(want.iter().map(|&i| drvs[i].as_str()));
    let t = Instant::now();
    let out = root
        .cmd("nix-store")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "nix-store failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// What a drover run showed.
struct DroverRun {
    took: Duration,
    /// When each `Estimates` event arrived (since the start), with it.
    estimates: Vec<(Duration, Arc<Estimates>)>,
    /// Each grant: (drv name, path, when since the start) in order.
    scheduled: Vec<(String, Duration, Duration)>,
    /// Grants, `building` and finished events: (drv name without `.drv`, what,
    /// unix seconds when the benchmark received it).
    events: Vec<(String, &'static str, f64)>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn realise_drover(root: &Root, drvs: &[String], want: &[usize]) -> anyhow::Result<DroverRun> {
    let settings = root.settings()?;
    let want: Vec<String> = want.iter().map(|&i| drvs[i].clone()).collect();
    actix::System::new().block_on(async move {
        let (system, mut events) = SystemBuilder::new(&settings)
            .echo(false)
            .start()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let sd = system.store().store_dir().clone();
        let requests = want
            .iter()
            .map(|d| {
                Ok(DerivedPath::Built {
                    drv_path: sd.parse(d)?,
                    outputs: OutputsSpec::All,
                })
            })
            .collect::<Result<Vec<_>, drover::store_path::StorePathError>>()?;
        let t = Instant::now();
        let outcome = system.realise(requests, BuildMode::Normal);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let collect = actix::spawn(async move {
            let mut est = Vec::new();
            let mut sched = Vec::new();
            let mut evs = Vec::new();
            let mut rx = rx;
            let name =
                |d: &drover::store_path::StorePath| d.name().trim_end_matches(".drv").to_owned();
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(SystemEvent::Progress(ProgressEvent::Estimates(e))) => {
                            est.push((t.elapsed(), e))
                        }
                        Some(SystemEvent::Progress(ProgressEvent::Scheduled {
                            goal: GoalKey::Derivation(d),
                            path,
                            ..
                        })) => {
                            evs.push((name(&d), "granted", unix_now()));
                            sched.push((d.name().to_string(), path, t.elapsed()))
                        }
                        Some(SystemEvent::Progress(ProgressEvent::BuildStarted {
                            drv_path,
                            ..
                        })) => evs.push((name(&drv_path), "building", unix_now())),
                        Some(SystemEvent::Progress(ProgressEvent::BuildFinished {
                            drv_path,
                            ..
                        })) => evs.push((name(&drv_path), "finished", unix_now())),
                        Some(_) => {}
                        None => break,
                    },
                    _ = &mut rx => break,
                }
            }
            (est, sched, evs)
        });
        let outcome = outcome.await;
        let took = t.elapsed();
        anyhow::ensure!(
            outcome.exit_status == 0,
            "drover failed: {:?}",
            outcome.errors
        );
        // Let the last events through, then stop the collector.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tx.send(());
        let (estimates, scheduled, events) = collect.await?;
        Ok(DroverRun {
            took,
            estimates,
            scheduled,
            events,
        })
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ratio_case(opts: &Opts, parent: &Path, label: &str, nodes: &[Node]) -> anyhow::Result<()> {
    let bound = 10.0;
    let want = sinks(nodes);
    let mut cells: Vec<(&str, Vec<Duration>)> = vec![
        ("nix-2.8 empty", vec![]),
        ("nix-2.8 warm", vec![]),
        ("drover empty", vec![]),
        ("drover warm", vec![]),
    ];
    let mut last_order = Vec::new();
    for run in 0..opts.runs {
        // Alternate which tool goes first, so background load hits both alike.
        let order: [bool; 2] = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for drover in order {
            let root = Root::new(
                parent,
                &format!("{label}-{}", if drover { "drover" } else { "nix" }),
                opts.trace,
            )?;
            let drvs = root.instantiate(nodes)?;
            for (phase, warm) in [(0, false), (1, true)] {
                if warm {
                    root.delete_outputs(&drvs)?;
                }
                root.take_trace();
                let (took, events) = if drover {
                    let r = realise_drover(&root, &drvs, &want)?;
                    if warm {
                        last_order = r.scheduled.clone();
                    }
                    (r.took, r.events)
                } else {
                    (realise_nix(&root, &drvs, &want)?, Vec::new())
                };
                if opts.trace {
                    let tool = if drover { "drover" } else { "nix-2.8" };
                    let phase = if warm { "warm" } else { "empty" };
                    print_links(
                        &format!("{label} {tool} {phase}"),
                        took,
                        &root.take_trace(),
                        &events,
                    );
                }
                let i = if drover { 2 } else { 0 } + phase;
                cells[i].1.push(took);
            }
        }
    }
    for (name, v) in &cells {
        let m = median(v.clone());
        println!(
            "{label:<16} {name:<14} makespan {:>6.2} s  bound {bound:.1} s  ratio {:.3}",
            m.as_secs_f64(),
            m.as_secs_f64() / bound
        );
    }
    let first: Vec<String> = last_order
        .iter()
        .take(6)
        .map(|(n, p, _)| format!("{} ({:.1} s)", n.trim_end_matches(".drv"), p.as_secs_f64()))
        .collect();
    println!("{label:<16} drover warm: first grants {}", first.join(", "));
    let chain: Vec<String> = last_order
        .iter()
        .filter(|(n, _, _)| n.starts_with("chain-"))
        .map(|(_, _, t)| format!("{:.2}", t.as_secs_f64()))
        .collect();
    println!(
        "{label:<16} drover warm: chain links granted at {} s",
        chain.join(", ")
    );
    Ok(())
}

/// `--trace`: per chain link, the time from the input's builder exit to the
/// dependent's builder start (and for drover to its grant and `building` event,
/// and to the input's `finished` event); for the independent builds, how long a
/// builder ran against its nominal time and the gaps between builds.
fn print_links(
    label: &str,
    took: Duration,
    trace: &[(String, bool, f64)],
    events: &[(String, &'static str, f64)],
) {
    let at = |name: &str, start: bool| {
        trace
            .iter()
            .find(|(n, s, _)| n == name && *s == start)
            .map(|t| t.2)
    };
    let ev = |name: &str, what: &str| {
        events
            .iter()
            .find(|(n, w, _)| n == name && *w == what)
            .map(|e| e.2)
    };
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}", v * 1000.0));
    let mut gaps = Vec::new();
    for k in 1..10 {
        let (prev, this) = (format!("chain-{}", k - 1), format!("chain-{k}"));
        let Some(exit) = at(&prev, false) else {
            continue;
        };
        let d = |t: Option<f64>| t.map(|t| t - exit);
        let gap = d(at(&this, true));
        if let Some(g) = gap {
            gaps.push(g);
        }
        println!(
            "  {label}: link {k}: builder exit → input finished {} ms, granted {} ms, building {} ms, builder start {} ms",
            ms(d(ev(&prev, "finished"))),
            ms(d(ev(&this, "granted"))),
            ms(d(ev(&this, "building"))),
            ms(gap),
        );
    }
    // The independent builds' time outside their builders: builder exit → the
    // `finished` event (registration, the end of the goal); the latest builder
    // exit → a grant (registration, the slot given back, the grant); grant →
    // builder start (locks, prepare, spawn, the shell).
    let mut exit_fin = Vec::new();
    let mut grant_start = Vec::new();
    let mut fin_grant = Vec::new();
    for (n, what, t) in events {
        if !n.starts_with("ind-") {
            continue;
        }
        match *what {
            "finished" => {
                if let Some(e) = at(n, false) {
                    exit_fin.push(t - e);
                }
            }
            "granted" => {
                if let Some(s) = at(n, true) {
                    grant_start.push(s - t);
                }
                if let Some(e) = trace
                    .iter()
                    .filter(|(_, start, et)| !start && et <= t)
                    .map(|e| e.2)
                    .max_by(f64::total_cmp)
                {
                    fin_grant.push(t - e);
                }
            }
            _ => {}
        }
    }
    if !exit_fin.is_empty() {
        for v in [&mut exit_fin, &mut grant_start, &mut fin_grant] {
            v.sort_by(f64::total_cmp);
        }
        let med = |v: &[f64]| v.get(v.len() / 2).copied();
        println!(
            "  {label}: independent builds: builder exit → finished median {} ms, latest builder exit → grant {} ms, grant → builder start {} ms",
            ms(med(&exit_fin)),
            ms(med(&fin_grant)),
            ms(med(&grant_start)),
        );
    }
    let mut ind: Vec<(f64, f64)> = trace
        .iter()
        .filter(|(n, s, _)| n.starts_with("ind-") && *s)
        .filter_map(|(n, _, t)| Some((*t, at(n, false)?)))
        .collect();
    ind.sort_by(|a, b| a.0.total_cmp(&b.0));
    let ran: f64 = ind.iter().map(|(s, e)| e - s).sum::<f64>() / ind.len().max(1) as f64;
    let mut igaps: Vec<f64> = ind
        .windows(2)
        .map(|w| w[1].0 - w[0].1)
        .filter(|g| *g > 0.0)
        .collect();
    igaps.sort_by(f64::total_cmp);
    gaps.sort_by(f64::total_cmp);
    let med = |v: &[f64]| v.get(v.len() / 2).copied();
    println!(
        "  {label}: makespan {:.2} s; chain link gap median {} ms, sum {} ms; independent builders ran {:.0} ms on average, median gap between them {} ms",
        took.as_secs_f64(),
        ms(med(&gaps)),
        ms(Some(gaps.iter().sum())),
        ran * 1000.0,
        ms(med(&igaps)),
    );
}

fn eta_case(opts: &Opts, parent: &Path) -> anyhow::Result<()> {
    let nodes = random_dag(opts.eta_n, opts.seed);
    let want = sinks(&nodes);
    let work: f64 = nodes.iter().map(|n| n.secs).sum();
    let mut cp = vec![0.0f64; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        cp[i] = n.secs + n.inputs.iter().map(|&j| cp[j]).fold(0.0, f64::max);
    }
    let cp = cp.iter().copied().fold(0.0, f64::max);
    let bound = cp.max(work / 2.0);
    println!(
        "eta: {} derivations, {} requested, work {work:.1} s, critical path {cp:.1} s, bound {bound:.1} s",
        nodes.len(),
        want.len()
    );
    let nix_root = Root::new(parent, "eta-nix", false)?;
    let drvs = nix_root.instantiate(&nodes)?;
    let nix = realise_nix(&nix_root, &drvs, &want)?;
    drop(nix_root);
    let root = Root::new(parent, "eta-drover", false)?;
    let drvs = root.instantiate(&nodes)?;
    let cold = realise_drover(&root, &drvs, &want)?;
    let mut errors = [Vec::new(), Vec::new()];
    let mut warm_took = Vec::new();
    for _ in 0..opts.runs {
        root.delete_outputs(&drvs)?;
        let warm = realise_drover(&root, &drvs, &want)?;
        let total = warm.took.as_secs_f64();
        warm_took.push(warm.took);
        for (k, frac) in [0.1, 0.5].into_iter().enumerate() {
            let at = total * frac;
            let Some((when, e)) = warm
                .estimates
                .iter()
                .rev()
                .find(|(w, e)| w.as_secs_f64() <= at && e.eta.is_some())
            else {
                anyhow::bail!("no estimate before {frac} of the run");
            };
            let predicted =
                (e.eta.unwrap_or_default().as_secs_f64() - (at - when.as_secs_f64())).max(0.0);
            let actual = total - at;
            let err = (predicted - actual) / actual;
            println!(
                "eta: at {:>3.0} % ({at:.2} s): predicted {predicted:.2} s remaining, actual {actual:.2} s, error {:+.1} %",
                frac * 100.0,
                err * 100.0
            );
            errors[k].push(err.abs());
        }
        if let Some((_, e)) = warm.estimates.iter().find(|(_, e)| e.eta.is_some()) {
            let names: Vec<&str> = e
                .critical_path
                .iter()
                .map(|p| p.name().trim_end_matches(".drv"))
                .collect();
            println!(
                "eta: first ETA {:.2} s; critical path found ({} steps): {}",
                e.eta.unwrap_or_default().as_secs_f64(),
                names.len(),
                names.join(" → ")
            );
        }
    }
    println!(
        "eta: makespan nix-2.8 {:.2} s, drover empty history {:.2} s, drover warm {:.2} s (bound {bound:.2} s)",
        nix.as_secs_f64(),
        cold.took.as_secs_f64(),
        median(warm_took).as_secs_f64()
    );
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "eta: median |error| at 10 %: {:.1} %, at 50 %: {:.1} %",
        med(errors[0].clone()) * 100.0,
        med(errors[1].clone()) * 100.0
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let parent = base.join(format!("drover-bench-schedule-{}", std::process::id()));
    std::fs::create_dir_all(&parent)?;
    let r = (|| {
        for c in &opts.cases {
            match c.as_str() {
                "a" => ratio_case(&opts, &parent, "a chain+100x0.1", &chain_beside(100, 0.1))?,
                "b" => ratio_case(&opts, &parent, "b chain+10x1", &chain_beside(10, 1.0))?,
                "c" => eta_case(&opts, &parent)?,
                other => anyhow::bail!("unknown case {other}"),
            }
        }
        Ok(())
    })();
    remove_tree(&parent);
    r
}
