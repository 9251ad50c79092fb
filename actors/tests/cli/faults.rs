//! What a build leaves behind when it misbehaves, and the CLI's edges: each scenario
//! run by `nix-store` (Nix 2.8) and by `drover`, each in a root of its own, and the
//! observable results compared (exit status, stderr, stdout, outputs, logs).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{run, Run};

/// Writes a Nix expression into the root and instantiates it (`--arg`s given).
fn instantiate(root: &TestRoot, name: &str, expr: &str, args: &[&str]) -> String {
    let file = root.path().join(name);
    std::fs::write(&file, expr).unwrap();
    let mut a = vec![file.to_str().unwrap()];
    a.extend(args);
    let out = root.run("nix-instantiate", &a);
    out.lines().next().unwrap().trim().to_owned()
}

/// `nix-store --realise` or `drover realise` with flags.
fn realise(root: &TestRoot, use_drover: bool, args: &[&str]) -> Run {
    if use_drover {
        run(drover(root).arg("realise").args(args))
    } else {
        run(root.cmd("nix-store").arg("--realise").args(args))
    }
}

/// The root's path replaced by `@ROOT@` and store hashes by `HASH`.
fn normalise(root: &TestRoot, s: &str) -> String {
    let s = s.replace(root.path().to_str().unwrap(), "@ROOT@");
    let marker = "@ROOT@/store/";
    let mut out = String::new();
    let mut rest = s.as_str();
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

/// Every file under `dir` with its contents (`path: contents`), sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    fn walk(base: &Path, d: &Path, v: &mut Vec<String>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if p.is_dir() {
                v.push(format!("{rel}/"));
                walk(base, &p, v);
            } else {
                v.push(format!(
                    "{rel}: {}",
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap())
                ));
            }
        }
    }
    if dir.is_dir() {
        walk(dir, dir, &mut v);
    } else if dir.exists() {
        v.push(String::from_utf8_lossy(&std::fs::read(dir).unwrap()).into_owned());
    }
    v
}

/// Runs a command and returns its exit code and peak RSS (KiB), from `wait4`.
#[allow(clippy::zombie_processes)] // reaped by wait4
fn run_measured(cmd: &mut Command) -> (i32, i64) {
    use std::os::unix::process::ExitStatusExt;
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 only writes the two out-values.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = std::process::ExitStatus::from_raw(status)
        .code()
        .unwrap_or(-1);
    (code, usage.ru_maxrss)
}

const LATE: &str = r#"derivation {
  name = "late"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir $out; (sleep 2; echo x > $out/late; echo late child done) & echo main done" ];
}"#;

/// A builder's background child still writing into `$out` after the builder has
/// exited: Nix waits for every holder of the build's output to close it, so the
/// output has `late`; drover must register the same output.
#[test]
fn background_child_of_the_builder_is_waited_for() {
    require_nix!();
    let mut seen = Vec::new();
    for use_drover in [false, true] {
        let root = TestRoot::new();
        let drv = instantiate(&root, "late.nix", LATE, &[]);
        let r = realise(&root, use_drover, &[&drv]);
        let out = r.stdout.trim().to_owned();
        let log = root.run("nix-store", &["-l", &drv]);
        seen.push((
            r.code,
            normalise(&root, &r.stdout),
            normalise(&root, &r.stderr),
            tree(Path::new(&out)),
            log,
        ));
    }
    let (nix, ours) = (&seen[0], &seen[1]);
    assert_eq!(nix.0, 0, "nix: {}", nix.2);
    assert_eq!(
        nix.3,
        vec!["late: x\n".to_string()],
        "Nix 2.8 waits for the child"
    );
    assert_eq!(ours, nix, "drover differs from nix");
}

/// Builders that flood their log: drover's memory stays bounded (back-pressure
/// on the pty) and the stored log is complete, as Nix's. The log is made of short,
/// repetitive lines, which bzip2 compresses slowly: a builder writes them faster
/// than they are compressed, so without back-pressure they pile up in memory.
#[test]
fn flooding_builder_memory_is_bounded_and_log_complete() {
    require_nix!();
    const SIZE: u64 = 16_000_000;
    let expr = r#"{ n }: derivation {
  name = "flood"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "yes 'a log line of some length, repeated many times over' | head -c ${toString n}; mkdir $out" ];
}"#;
    let tiny = r#"derivation {
  name = "tiny"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "echo hello; mkdir $out" ];
}"#;
    let mut rss = Vec::new();
    for use_drover in [false, true] {
        let root = TestRoot::new();
        let n = SIZE.to_string();
        let drv = instantiate(&root, "flood.nix", expr, &["--argstr", "n", &n]);
        let small = instantiate(&root, "tiny.nix", tiny, &[]);
        let tool = |d: &str| {
            let mut c = if use_drover {
                let mut c = drover(&root);
                c.arg("realise");
                c
            } else {
                let mut c = root.cmd("nix-store");
                c.arg("--realise");
                c
            };
            c.arg(d);
            c
        };
        let (code, base) = run_measured(&mut tool(&small));
        assert_eq!(code, 0);
        let (code, peak) = run_measured(&mut tool(&drv));
        assert_eq!(code, 0, "{}", if use_drover { "drover" } else { "nix" });
        // Nix reads the stored log back whole.
        let log = root.cmd("nix-store").args(["-l", &drv]).output().unwrap();
        assert!(log.status.success());
        assert_eq!(log.stdout.len() as u64, SIZE);
        assert!(log.stdout.starts_with(b"a log line of some length"));
        eprintln!(
            "{}: peak RSS {} KiB for a {SIZE}-byte log, {} KiB for a tiny build",
            if use_drover { "drover" } else { "nix" },
            peak,
            base
        );
        rss.push((base, peak));
    }
    let (base, peak) = rss[1];
    // Bounded: the compressor's state (~5 MiB) comes on top of a tiny build.
    // Unbounded (drover before back-pressure), the log piled up: +20 MiB here.
    assert!(
        peak < base + 10 * 1024,
        "drover's peak RSS {peak} KiB grows with the log (tiny build: {base} KiB; nix: {:?})",
        rss[0]
    );
}
