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

/// Runs `cmd` to its end: its exit code and its own peak RSS in KiB, read by GNU
/// time. A child's `ru_maxrss` starts at its parent's RSS when it is spawned (fork or
/// posix_spawn) and survives exec, so measured from this test process (which holds
/// the output of the tests running beside it) it once showed 135 MB for drover; GNU
/// time spawns the tool from a small process of its own.
fn run_measured(cmd: &mut Command) -> (i32, i64) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%M", "-o"])
        .arg(out.path())
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        timed.current_dir(d);
    }
    let status = timed
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("GNU time (/usr/bin/time) runs the tool");
    let text = std::fs::read_to_string(out.path()).unwrap();
    // With a failing tool GNU time writes "Command exited with non-zero status N"
    // first; the figure is the last line.
    let rss = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("GNU time's output: {text:?}"));
    (status.code().unwrap_or(-1), rss)
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
    // Bounded: the compressor's state (~5 MiB) and the echo path's buffers come on
    // top of a tiny build. Unbounded (drover before back-pressure), the log piled
    // up: +20 MiB here, and +60 MiB for a log three times as long.
    assert!(
        peak < base + 16 * 1024,
        "drover's peak RSS {peak} KiB grows with the log (tiny build: {base} KiB; nix: {:?})",
        rss[0]
    );
    // And it does not grow with the log: three times the log, about the same peak.
    let root = TestRoot::new();
    let n = (3 * SIZE).to_string();
    let drv = instantiate(&root, "flood.nix", expr, &["--argstr", "n", &n]);
    let mut c = drover(&root);
    c.arg("realise").arg(&drv);
    let (code, bigger) = run_measured(&mut c);
    assert_eq!(code, 0);
    eprintln!("drover: peak RSS {bigger} KiB for a {}-byte log", 3 * SIZE);
    assert!(
        bigger < peak + 4 * 1024,
        "drover's peak RSS grows with the log: {peak} KiB for {SIZE} bytes, {bigger} KiB for three times that"
    );
}

const MULTI: &str = r#"derivation {
  name = "multi"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  outputs = [ "out" "dev" ];
  args = [ "-c" "echo out > $out; echo dev > $dev" ];
}"#;

/// `nix-store --realise SYMLINK!dev` where SYMLINK is a root made by
/// `nix-instantiate --add-root` (tests/nix-build.sh): `!outputs` is split off,
/// then the link is followed. Both tools print the same paths, exit the same.
#[test]
fn symlink_with_outputs_is_followed() {
    require_nix!();
    for arg in [
        "drvlink!dev",
        "drvlink",
        "drvlink!out,dev",
        "drvlink!",
        "drvlink!nonexist",
    ] {
        let mut seen = Vec::new();
        for use_drover in [false, true] {
            let root = TestRoot::new();
            let file = root.path().join("multi.nix");
            std::fs::write(&file, MULTI).unwrap();
            let link = root.path().join("drvlink");
            root.run(
                "nix-instantiate",
                &["--add-root", link.to_str().unwrap(), file.to_str().unwrap()],
            );
            let r = realise(
                &root,
                use_drover,
                &[root.path().join(arg).to_str().unwrap()],
            );
            let errors: Vec<String> = r
                .stderr
                .lines()
                .filter(|l| l.starts_with("error:"))
                .map(|l| normalise(&root, l))
                .collect();
            // Sorted: paths print in store-path order, and the roots' hashes differ.
            let mut paths: Vec<String> = r.stdout.lines().map(|l| normalise(&root, l)).collect();
            paths.sort();
            seen.push((r.code, paths, errors));
        }
        assert_eq!(seen[1], seen[0], "{arg}: drover, nix");
    }
}

/// Usage errors: Nix's message, a pointer to `--help`, exit status 1 (clap's
/// default was 2); `-j abc` is refused as Nix refuses it.
#[test]
fn usage_errors_match_nix() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("multi.nix");
    std::fs::write(&file, MULTI).unwrap();
    let drv = root.run("nix-instantiate", &[file.to_str().unwrap()]);
    let drv = drv.trim();
    for args in [
        vec!["-j", "abc", drv],
        vec!["--max-jobs", "-1", drv],
        vec!["--bogus", drv],
    ] {
        let nix = realise(&root, false, &args);
        let ours = realise(&root, true, &args);
        assert_eq!(nix.code, 1, "{args:?}: {}", nix.stderr);
        assert_eq!(ours.code, nix.code, "{args:?}: {}", ours.stderr);
        let first = |s: &str| s.lines().next().unwrap_or_default().to_owned();
        assert_eq!(first(&ours.stderr), first(&nix.stderr), "{args:?}");
        assert_eq!(
            ours.stderr.lines().nth(1),
            Some("Try 'drover --help' for more information."),
            "{args:?}"
        );
        assert_eq!(ours.stdout, "");
    }
    // Refused before anything is built.
    assert!(!root.path().join("var/log/nix/drvs").exists());
}

/// `--option` with a name Nix does not know, and with a value it refuses: the same
/// warnings as nix-store 2.8 (`warning: unknown setting 'max-log-size'`,
/// `warning: error: configuration setting 'max-jobs' …`), in the same order, and
/// the build goes on.
#[test]
fn option_warnings_match_nix() {
    require_nix!();
    // (No unknown name in nix.conf: Nix's default build hook is `nix` itself,
    // which reads nix.conf again and prints those a second time.)
    let root = TestRoot::new();
    let file = root.path().join("multi.nix");
    std::fs::write(&file, MULTI).unwrap();
    let drv = root.run("nix-instantiate", &[file.to_str().unwrap()]);
    let drv = drv.trim();
    for args in [
        vec!["--option", "max-log-size", "1000000", drv],
        vec![
            "--option",
            "aaa-unknown",
            "1",
            "--option",
            "max-log-size",
            "1",
            drv,
        ],
        vec!["--option", "keep-going", "maybe", drv],
    ] {
        let nix = realise(&root, false, &args);
        let ours = realise(&root, true, &args);
        assert_eq!(nix.code, 0, "{}", nix.stderr);
        assert_eq!(ours.code, 0, "{}", ours.stderr);
        let warnings = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| l.starts_with("warning:") && !l.contains("--add-root"))
                .map(str::to_owned)
                .collect()
        };
        assert!(warnings(&nix.stderr)
            .iter()
            .any(|w| w.contains("unknown setting") || w.contains("error:")));
        assert_eq!(warnings(&ours.stderr), warnings(&nix.stderr), "{args:?}");
    }
}

/// A failing run's error names each cause once (an error that prints its source
/// in its own message used to show it twice, with Rust's `(os error N)`).
#[test]
fn error_causes_are_printed_once() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("multi.nix");
    std::fs::write(&file, MULTI).unwrap();
    let drv = root.run("nix-instantiate", &[file.to_str().unwrap()]);
    let drv = drv.trim();
    // A state dir that cannot be created (under /proc).
    let ours = run(drover(&root)
        .env("NIX_STATE_DIR", "/proc/drover-test/x")
        .args(["realise", drv]));
    let nix = run(root
        .cmd("nix-store")
        .env("NIX_STATE_DIR", "/proc/drover-test/x")
        .args(["--realise", drv]));
    assert_eq!(nix.code, 1);
    assert_eq!(ours.code, nix.code, "{}", ours.stderr);
    let line = ours
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap();
    assert_eq!(
        line.matches("No such file or directory").count(),
        1,
        "{line}"
    );
    assert!(!line.contains("os error"), "{line}");
    assert!(
        nix.stderr.ends_with(": No such file or directory\n"),
        "{}",
        nix.stderr
    );
}

/// The `post-build-hook`'s stdout and stderr (tests/post-hook.sh): never on stdout,
/// which carries only the output paths; on stderr as Nix 2.8 shows them,
/// `running post-build-hook '…'...` and `post-build-hook: <line>` (with `-Q` only
/// the first). `OUT_PATHS` is empty, as Nix 2.8's `buildDone` passes it (it reads
/// the outputs from a result `done` fills only afterwards).
#[test]
fn post_build_hook_output_goes_to_stderr() {
    require_nix!();
    for flags in [vec![], vec!["-Q"]] {
        let mut seen = Vec::new();
        for use_drover in [false, true] {
            let root = TestRoot::new();
            let hook = root.path().join("hook.sh");
            std::fs::write(
                &hook,
                "#!/bin/sh\necho \"hook stdout $DRV_PATH [$OUT_PATHS]\"\necho 'hook stderr' >&2\nprintf partial\n",
            )
            .unwrap();
            std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let drv = instantiate(&root, "multi.nix", MULTI, &[]);
            let mut args = flags.clone();
            args.extend(["--option", "post-build-hook", hook.to_str().unwrap(), &drv]);
            let r = realise(&root, use_drover, &args);
            let mut paths: Vec<String> = r.stdout.lines().map(|l| normalise(&root, l)).collect();
            paths.sort();
            let mut stderr: Vec<String> = r.stderr.lines().map(|l| normalise(&root, l)).collect();
            // The last line (the `--add-root` warning) and stdout interleave
            // differently; the order of everything else must be the same.
            stderr.sort_by_key(|l| l.contains("--add-root"));
            seen.push((r.code, paths, stderr));
        }
        assert_eq!(seen[0].0, 0, "{:?}", seen[0]);
        assert!(seen[0]
            .2
            .iter()
            .any(|l| l.starts_with("running post-build-hook '")));
        assert_eq!(seen[1], seen[0], "{flags:?}: drover, nix");
    }
}

const REJECTED: &str = r#"let
  dep = derivation {
    name = "dep"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out/sub; echo x > $out/sub/f" ];
  };
in derivation {
  name = "rejected"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  disallowedReferences = [ dep ];
  args = [ "-c" "mkdir -p $out/a/b; echo ${dep} > $out/a/b/ref; chmod -w $out/a" ];
}"#;

/// Runs `program args` as an unprivileged user: as `nobody` (through `setpriv`)
/// when we are root, else as ourselves. `None` when that is impossible.
fn unprivileged(root: &TestRoot, program: &str) -> Option<Command> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(root.cmd(program));
    }
    let ok = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return None;
    }
    let mut c = root.cmd("setpriv");
    c.args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        program,
    ]);
    // A home of its own (Nix looks at `~/.nix-defexpr`).
    c.env("HOME", root.path());
    Some(c)
}

/// An output rejected by the output checks (`disallowedReferences`; its builder
/// left a read-only directory) stays in the store unregistered, with both tools;
/// building the derivation again, as a user who is not root, must fail the same
/// way again, not with `Permission denied` on the leftover (tests/check-reqs.sh):
/// Nix deletes paths after making their directories writable.
#[test]
fn rejected_output_is_deleted_by_an_unprivileged_rebuild() {
    require_nix!();
    let mut seen = Vec::new();
    for use_drover in [false, true] {
        let root = TestRoot::new();
        let drv = instantiate(&root, "reqs.nix", REJECTED, &[]);
        let st = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(root.path())
            .status()
            .unwrap();
        if !st.success() && unsafe { libc::geteuid() } == 0 {
            panic!("chown failed");
        }
        let mut runs = Vec::new();
        for _ in 0..2 {
            let program = if use_drover {
                env!("CARGO_BIN_EXE_drover")
            } else {
                "nix-store"
            };
            let Some(mut cmd) = unprivileged(&root, program) else {
                if std::env::var_os("DROVER_REQUIRE_NIX").is_some_and(|v| v != "0") {
                    panic!("cannot run as an unprivileged user (no setpriv)");
                }
                eprintln!(
                    "SKIPPED rejected_output_is_deleted_by_an_unprivileged_rebuild: no setpriv"
                );
                return;
            };
            cmd.arg(if use_drover { "realise" } else { "--realise" })
                .arg(&drv);
            let r = run(&mut cmd);
            let errors: Vec<String> = r
                .stderr
                .lines()
                .filter(|l| l.starts_with("error:") || l.starts_with("         "))
                .map(|l| normalise(&root, l))
                .collect();
            runs.push((r.code, errors));
        }
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(root.path())
            .status();
        seen.push(runs);
    }
    assert_eq!(seen[0][0].0, 1, "{:?}", seen[0]);
    assert!(
        seen[0][1].1[0].contains("is not allowed to refer to"),
        "{:?}",
        seen[0]
    );
    assert_eq!(seen[1], seen[0], "drover, nix");
}

/// Whether tmpfs mounts can be made (root); when not, prints why the test is
/// skipped, or panics under `DROVER_REQUIRE_NIX=1`.
fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("DROVER_REQUIRE_NIX").is_some_and(|v| v != "0") {
        panic!("{test}: needs root to mount a small tmpfs");
    }
    eprintln!("SKIPPED {test}: needs root to mount a small tmpfs");
    false
}

/// Mounts a tmpfs of `size` on `dir` (keeping what `dir` held); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let keep = dir.with_extension("kept");
        std::fs::create_dir_all(dir).unwrap();
        crate::realise::sh(&format!(
            "cp -a {d} {k}",
            d = dir.display(),
            k = keep.display()
        ));
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount");
        crate::realise::sh(&format!(
            "cp -a {k}/. {d}/",
            d = dir.display(),
            k = keep.display()
        ));
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

const FILL: &str = r#"derivation {
  name = "fill"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir $out; head -c 20000000 /dev/zero > $out/big" ];
}"#;

const BIG_LOG: &str = r#"derivation {
  name = "biglog"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "head -c 3000000 /dev/urandom | base64; mkdir $out" ];
}"#;

/// A builder failing because the store's file system is full: Nix 2.8 exits 1 (a
/// transient failure, not 100) and adds `note: build failure may have been caused
/// by lack of free disk space`, after the log tail with `-Q`.
#[test]
fn full_store_disk_is_a_transient_failure_with_nix_note() {
    require_nix!();
    if !can_mount("full_store_disk_is_a_transient_failure_with_nix_note") {
        return;
    }
    for flags in [vec![], vec!["-Q"]] {
        let mut seen = Vec::new();
        for use_drover in [false, true] {
            let root = TestRoot::new();
            let drv = instantiate(&root, "fill.nix", FILL, &[]);
            let _fs = Tmpfs::mount(Path::new(&root.store_dir), "4m");
            let mut args = flags.clone();
            args.push(&drv);
            let r = realise(&root, use_drover, &args);
            let errors: Vec<String> = r
                .stderr
                .lines()
                .skip_while(|l| !l.starts_with("error:"))
                .map(|l| normalise(&root, l))
                .collect();
            seen.push((r.code, errors));
        }
        assert_eq!(seen[0].0, 1, "{:?}", seen[0]);
        assert!(
            seen[0]
                .1
                .last()
                .unwrap()
                .ends_with("note: build failure may have been caused by lack of free disk space"),
            "{:?}",
            seen[0]
        );
        assert_eq!(seen[1], seen[0], "{flags:?}: drover, nix");
    }
}

/// The log directory's file system full: Nix 2.8 does not register the output
/// (it even aborts: `terminate called after throwing … writing to file: No space
/// left on device`, status 134); drover prints the cause (naming the log file),
/// fails the build with exit status 1 and registers nothing either.
#[test]
fn full_log_disk_fails_the_build() {
    require_nix!();
    if !can_mount("full_log_disk_fails_the_build") {
        return;
    }
    let mut valid = Vec::new();
    for use_drover in [false, true] {
        let root = TestRoot::new();
        let drv = instantiate(&root, "big.nix", BIG_LOG, &[]);
        let _fs = Tmpfs::mount(&root.log_dir, "256k");
        let r = realise(&root, use_drover, &["-Q", &drv]);
        let out = root.run("nix-store", &["-q", "--outputs", &drv]);
        let check = root
            .cmd("nix-store")
            .args(["--check-validity", out.trim()])
            .output()
            .unwrap();
        valid.push(check.status.success());
        if use_drover {
            assert_eq!(r.code, 1, "{}", r.stderr);
            // The cause once, when it happened, then why the build failed.
            assert_eq!(
                r.stderr.matches("No space left on device").count(),
                1,
                "{}",
                r.stderr
            );
            assert!(
                r.stderr.contains("-biglog.drv' could not be written"),
                "{}",
                r.stderr
            );
            assert_eq!(r.stdout, "");
        } else {
            assert_ne!(r.code, 0, "{}", r.stderr);
            assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
        }
    }
    assert_eq!(
        valid,
        vec![false, false],
        "valid after the run (nix, drover)"
    );
}

const TINY: &str = r#"derivation {
  name = "tiny"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  args = [ "-c" "echo building tiny; echo out > $out" ];
}"#;

/// stdout and stderr in one stream, as a user sees them: the `--add-root` warning
/// comes once, before the first output path (Nix's `realisePath`), and
/// `nix-store --realise` without arguments prints nothing and succeeds.
#[test]
fn interleaved_output_and_no_arguments_match_nix() {
    require_nix!();
    let mut seen = Vec::new();
    for use_drover in [false, true] {
        let root = TestRoot::new();
        let drv = instantiate(&root, "tiny.nix", TINY, &[]);
        let tool = if use_drover {
            format!("{} realise", env!("CARGO_BIN_EXE_drover"))
        } else {
            "nix-store --realise".to_owned()
        };
        let mut outputs = Vec::new();
        for args in ["", &format!("{drv} {drv}")] {
            let r = run(root
                .cmd("/bin/sh")
                .args(["-c", &format!("{tool} {args} 2>&1")]));
            outputs.push((r.code, normalise(&root, &r.stdout)));
        }
        seen.push(outputs);
    }
    assert_eq!(seen[0][0], (0, String::new()));
    assert_eq!(seen[1], seen[0], "drover, nix");
}
