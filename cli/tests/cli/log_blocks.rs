//! Compressed build logs of several blocks (concatenated bzip2 streams, compressed in
//! parallel) against Nix 2.8's readers: `nix-store -l` prints the whole log drover
//! stored, byte for byte, as it prints the log Nix itself stored; and a log being
//! written is readable up to its last complete block while the build still runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::run;

/// What the builders write: `n` numbered lines (the awk program below, in Rust).
fn expected_lines(from: u64, to: u64) -> Vec<u8> {
    (from..to)
        .flat_map(|i| format!("line {i} of a build log {}\n", i * 7919 % 1013).into_bytes())
        .collect()
}

/// An awk call printing lines `from..to` as [`expected_lines`] does.
fn awk(from: u64, to: u64) -> String {
    format!(
        "awk 'BEGIN {{ for (i = {from}; i < {to}; i++) printf \"line %d of a build log %d\\\\n\", i, (i * 7919) % 1013 }}'"
    )
}

/// A file of derivations: `big` writes 120,000 lines (about 3.6 MB, five blocks);
/// `paused` writes 60,000 lines, waits for `$flag` to exist, then writes 1,000 more.
fn write_expr(root: &TestRoot, flag: &Path) -> PathBuf {
    let file = root.path().join("logs.nix");
    let text = format!(
        r#"let
  sh = name: script: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  }};
in {{
  big = sh "big-log" "{big}; echo > $out";
  paused = sh "paused-log" "{first}; while [ ! -e {flag} ]; do sleep 0.1; done; {second}; echo > $out";
}}
"#,
        big = awk(0, 120_000).replace('"', "\\\""),
        first = awk(0, 60_000).replace('"', "\\\""),
        second = awk(60_000, 61_000).replace('"', "\\\""),
        flag = flag.display(),
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// The stored `.bz2` of `drv` in `root`.
fn bz2_of(root: &TestRoot, drv: &str) -> Vec<u8> {
    let base = Path::new(drv).file_name().unwrap().to_str().unwrap();
    let (xx, rest) = base.split_at(2);
    std::fs::read(
        root.log_dir
            .join("drvs")
            .join(xx)
            .join(format!("{rest}.bz2")),
    )
    .unwrap()
}

#[test]
fn nix_reads_a_multi_block_log_whole() {
    require_nix!();
    let want = expected_lines(0, 120_000);
    // The same derivation built by each tool in a root of its own.
    let nix_root = TestRoot::new();
    let flag = nix_root.path().join("flag");
    let nix_drv = nix_root
        .instantiate(&write_expr(&nix_root, &flag), Some("big"))
        .remove(0);
    let r = run(nix_root.cmd("nix-store").args(["-r", "-Q", &nix_drv]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let nix_log = run(nix_root.cmd("nix-store").args(["-l", &nix_drv]));
    assert_eq!(nix_log.code, 0);
    assert!(nix_log.stdout.as_bytes() == want, "Nix's own log differs");

    let root = TestRoot::new();
    let flag = root.path().join("flag");
    let drv = root
        .instantiate(&write_expr(&root, &flag), Some("big"))
        .remove(0);
    let r = run(drover(&root).args(["realise", "-Q", &drv]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Several streams (one per block), where Nix writes one.
    let file = bz2_of(&root, &drv);
    let streams = file
        .windows(4)
        .filter(|w| *w == ::drover::build_log::blocks::STREAM_MAGIC)
        .count();
    assert!(streams >= 5, "{streams} bzip2 streams");
    assert_eq!(
        bz2_of(&nix_root, &nix_drv)
            .windows(4)
            .filter(|w| w == b"BZh9")
            .count(),
        1
    );
    for reader in [
        run(root.cmd("nix-store").args(["-l", &drv])),
        run(root.cmd("nix").args(["log", &drv])),
        run(drover(&root).args(["log", &drv])),
    ] {
        assert_eq!(reader.code, 0, "{}", reader.stderr);
        assert!(reader.stdout == nix_log.stdout, "a reader's log differs");
    }
    // drover reads Nix's single stream too.
    let ours = run(drover(&nix_root).args(["log", &nix_drv]));
    assert!(ours.code == 0 && ours.stdout == nix_log.stdout);
}

#[test]
fn a_log_is_readable_while_its_build_runs() {
    require_nix!();
    let root = TestRoot::new();
    let flag = root.path().join("flag");
    let drv = root
        .instantiate(&write_expr(&root, &flag), Some("paused"))
        .remove(0);
    let mut build = drover(&root)
        .args(["realise", "-Q", &drv])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = expected_lines(0, 60_000);
    // The builder is paused after ~1.8 MB: its complete blocks are in the file, the
    // rest waits for more output or the end.
    let block = ::drover::build_log::blocks::BLOCK_BYTES;
    let blocks = first.len() / block * block;
    assert!(blocks >= 2 * block);
    let deadline = Instant::now() + Duration::from_secs(300);
    let (ours, theirs) = loop {
        let ours = run(drover(&root).args(["log", &drv]));
        let theirs = run(root.cmd("nix-store").args(["-l", &drv]));
        if ours.stdout.len() == blocks && theirs.stdout.len() == blocks {
            break (ours, theirs);
        }
        assert!(
            Instant::now() < deadline,
            "the log did not become readable: {} / {} bytes; {} {}",
            ours.stdout.len(),
            theirs.stdout.len(),
            ours.stderr,
            theirs.stderr
        );
        assert!(build.try_wait().unwrap().is_none(), "the build ended early");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ours.code, 0, "{}", ours.stderr);
    assert_eq!(theirs.code, 0, "{}", theirs.stderr);
    assert!(ours.stdout.as_bytes() == &first[..blocks]);
    assert!(theirs.stdout == ours.stdout);
    // The build is still running.
    assert!(build.try_wait().unwrap().is_none());
    std::fs::write(&flag, "").unwrap();
    let status = build.wait().unwrap();
    assert!(status.success());
    let whole = run(root.cmd("nix-store").args(["-l", &drv]));
    assert!(whole.stdout.as_bytes() == expected_lines(0, 61_000));
    let ours = run(drover(&root).args(["log", &drv]));
    assert!(
        ours.stdout == whole.stdout && ours.stderr.is_empty(),
        "{}",
        ours.stderr
    );
}
