//! Build logs against real Nix 2.8: file naming, contents, tail and `--read-log`.

use std::io::Read;
use std::path::Path;

use drover::build_log::{
    log_file_path, parse_json_message, read_build_log, LineAssembler, LogFile, LogTail,
};
use drover::store_path::{StoreDir, StorePath};

use crate::nix_env::TestRoot;
use crate::require_nix;

/// A builder printing lines with `\r`, `@nix` messages, a few thousand lines of bulk
/// output and a partial last line, then failing (so Nix prints the tail).
const EXPR: &str = r#"
{ fail ? true }: derivation {
  name = "logs";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = ["-c" ''
    echo first line
    printf 'progress 10%%\rprogress 100%%\n'
    printf 'abcdef\rXY\n'
    echo '@nix {"action":"setPhase","phase":"buildPhase"}'
    echo '@nix {"action":"msg","level":0,"msg":"a message"}'
    echo '@nix {not json'
    i=0
    while [ $i -lt 20000 ]; do
      echo "bulk line $i of output, padded to make the log bigger .........................."
      i=$((i+1))
    done
    printf 'tab\there\r\n'
    echo
    printf 'partial last line'
    echo > $out
    ${if fail then "exit 1" else "true"}
  ''];
}
"#;

fn bunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    bzip2::read::MultiBzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The tail drover keeps for these bytes (plain lines only, as Nix's `flushLine`).
fn drover_tail(raw: &[u8], n: usize) -> Vec<String> {
    let mut tail = LogTail::new(n);
    let mut lines = LineAssembler::new();
    let mut take = |l: &[u8]| match parse_json_message(l) {
        Some(Ok(_)) => {}
        _ => tail.push_bytes(l),
    };
    lines.push(raw, &mut take);
    lines.finish(&mut take);
    tail.to_vec()
}

/// Writes a drover log of `raw` for `drv` under `log_dir`, in uneven chunks.
fn write_drover_log(
    log_dir: &Path,
    drv: &StorePath,
    raw: &[u8],
    compress: bool,
) -> std::path::PathBuf {
    let mut f = LogFile::create(log_dir, drv, compress).unwrap();
    let mut rest = raw;
    let mut n = 1;
    while !rest.is_empty() {
        let (a, b) = rest.split_at(n.min(rest.len()));
        f.write(a).unwrap();
        rest = b;
        n = n * 3 % 9973 + 1;
    }
    f.finish().unwrap()
}

#[test]
fn drover_writes_the_log_nix_writes_and_nix_reads_it() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("logs.nix");
    std::fs::write(&file, EXPR).unwrap();
    let drv_full = root.instantiate(&file, None).remove(0);
    let store_dir = StoreDir::new(root.store_dir.clone()).unwrap();
    let drv = store_dir.parse(&drv_full).unwrap();

    let out = root
        .cmd("nix-store")
        .args(["-Q", "--option", "log-lines", "6", "--realise", &drv_full])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(100));
    let stderr = String::from_utf8(out.stderr).unwrap();

    // The file name: drover computes exactly Nix's.
    let nix_file = log_file_path(&root.log_dir, &drv, true);
    assert!(nix_file.is_file(), "Nix wrote no {}", nix_file.display());
    let nix_compressed = std::fs::read(&nix_file).unwrap();
    let raw = bunzip(&nix_compressed);
    assert!(raw.len() > 1_000_000, "{}", raw.len());
    assert!(raw.starts_with(b"first line\nprogress 10%\rprogress 100%\n"));
    assert!(raw.ends_with(b"\ntab\there\r\n\npartial last line"));

    // The tail drover keeps is the one Nix prints.
    let nix_tail: Vec<String> = stderr
        .lines()
        .skip_while(|l| !l.contains("last 6 log lines:"))
        .skip(1)
        .take_while(|l| l.starts_with("       > ") || *l == "       >")
        .map(|l| l.strip_prefix("       > ").unwrap_or("").to_owned())
        .collect();
    // Nix expands tabs when it prints the tail (`tab\there` shows as `tab` + 8
    // spaces + `here`); the kept lines themselves are raw.
    let squeeze = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let ours: Vec<String> = drover_tail(&raw, 6).iter().map(|l| squeeze(l)).collect();
    let nix_tail: Vec<String> = nix_tail.iter().map(|l| squeeze(l)).collect();
    assert_eq!(nix_tail, ours, "{stderr}");
    assert!(stderr.contains("       > tab        here\n"), "{stderr}");
    assert!(stderr.contains("\na message\n"), "{stderr}");
    assert!(
        stderr.contains("bad JSON log message from builder: "),
        "{stderr}"
    );

    // drover's compressed log of the same bytes decompresses to the same bytes, and
    // Nix's `--read-log` reads it (NIX_LOG_DIR pointed at drover's log dir).
    let drover_dir = root.path().join("drover-log");
    for compress in [true, false] {
        let _ = std::fs::remove_dir_all(&drover_dir);
        let written = write_drover_log(&drover_dir, &drv, &raw, compress);
        let rel_nix = nix_file.strip_prefix(&root.log_dir).unwrap();
        let rel_drover = written.strip_prefix(&drover_dir).unwrap();
        if compress {
            assert_eq!(rel_drover, rel_nix);
            let ours = std::fs::read(&written).unwrap();
            assert!(bunzip(&ours) == raw);
            // Nix writes one level-9 stream; drover one level-1 stream per block.
            assert_eq!(&nix_compressed[..4], b"BZh9");
            let block = drover::build_log::blocks::BLOCK_BYTES;
            let streams = ours
                .windows(4)
                .filter(|w| *w == drover::build_log::blocks::STREAM_MAGIC)
                .count();
            assert_eq!(streams, raw.len().div_ceil(block).max(1));
            if raw.len() <= block {
                // One stream: Nix's bytes but for the header's block-size digit.
                assert!(ours[4..] == nix_compressed[4..], "compressed logs differ");
            }
        }
        let read = root
            .cmd("nix-store")
            .env("NIX_LOG_DIR", &drover_dir)
            .args(["--read-log", &drv_full])
            .output()
            .unwrap();
        assert!(
            read.status.success(),
            "{}",
            String::from_utf8_lossy(&read.stderr)
        );
        assert!(
            read.stdout == raw,
            "nix-store --read-log of drover's log differs"
        );
    }

    // drover reads Nix's log.
    let mut ours = Vec::new();
    read_build_log(&root.log_dir, &store_dir, &drv, |_| None, &mut ours).unwrap();
    assert!(ours == raw);
}

#[test]
fn reading_logs_of_outputs_and_missing_logs_as_nix_does() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("logs.nix");
    std::fs::write(&file, EXPR).unwrap();
    let drv_full = root.run(
        "nix-instantiate",
        &[file.to_str().unwrap(), "--arg", "fail", "false"],
    );
    let drv_full = drv_full.trim();
    let out_full = root.realise(&[drv_full]).remove(0);
    let store_dir = StoreDir::new(root.store_dir.clone()).unwrap();
    let drv = store_dir.parse(drv_full).unwrap();
    let out = store_dir.parse(&out_full).unwrap();

    // An output path is read through its deriver, by both.
    let o = root
        .cmd("nix-store")
        .args(["--read-log", &out_full])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let nix = o.stdout;
    let mut ours = Vec::new();
    read_build_log(
        &root.log_dir,
        &store_dir,
        &out,
        |_| Some(drv.clone()),
        &mut ours,
    )
    .unwrap();
    assert!(!ours.is_empty());
    assert!(ours == nix);

    // No log: the same message.
    std::fs::remove_dir_all(root.log_dir.join("drvs")).unwrap();
    for path in [drv_full, out_full.as_str()] {
        let o = root
            .cmd("nix-store")
            .args(["--read-log", path])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let nix_err = String::from_utf8(o.stderr).unwrap();
        let p = store_dir.parse(path).unwrap();
        let e = read_build_log(
            &root.log_dir,
            &store_dir,
            &p,
            |_| Some(drv.clone()),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(nix_err.trim_end(), format!("error: {e}"));
    }
}
