//! The LogCollector actor: summaries, files, events, alarms and bounded memory.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use drover::build_log::log_file_path;
use drover::store_path::StorePath;
use drover_actors::log_collector::{
    starter, starter_with, CollectorOptions, GetLogStats, IntoLogSink, LogCollector,
};
use drover_actors::messages::{
    BuildLogEvent, HookStderrLine, LogAlarm, LogBytes, LogConfig, LogEof,
};

/// Records whatever it receives.
struct Recorder<T>(Arc<Mutex<Vec<T>>>);

impl<T: Unpin + 'static> Actor for Recorder<T> {
    type Context = Context<Self>;
}

impl Handler<LogAlarm> for Recorder<LogAlarm> {
    type Result = ();
    fn handle(&mut self, m: LogAlarm, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(m);
    }
}

impl Handler<BuildLogEvent> for Recorder<BuildLogEvent> {
    type Result = ();
    fn handle(&mut self, m: BuildLogEvent, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(m);
    }
}

fn recorder<T: Unpin + 'static>() -> (Arc<Mutex<Vec<T>>>, Addr<Recorder<T>>)
where
    Recorder<T>: Actor<Context = Context<Recorder<T>>>,
{
    let v = Arc::new(Mutex::new(Vec::new()));
    (v.clone(), Recorder(v).start())
}

fn drv() -> StorePath {
    StorePath::from_base_name("n1hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv").unwrap()
}

fn config(log_dir: &Path) -> LogConfig {
    LogConfig {
        drv_path: drv(),
        log_dir: log_dir.to_owned(),
        compress: true,
        tail_lines: 10,
        max_log_size: 0,
        max_silent_time: None,
        timeout: None,
        echo: false,
    }
}

fn bunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    bzip2::read::MultiBzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn options(events: Option<Recipient<BuildLogEvent>>) -> (Arc<Mutex<Vec<u8>>>, CollectorOptions) {
    let err = Arc::new(Mutex::new(Vec::new()));
    let mut o = CollectorOptions::new(events);
    o.stderr = err.clone();
    (err, o)
}

#[actix::test]
async fn eof_answers_the_summary_with_a_complete_file() {
    let t = tempfile::tempdir().unwrap();
    let (events, ev) = recorder::<BuildLogEvent>();
    let (alarms, al) = recorder::<LogAlarm>();
    let (err, mut o) = options(Some(ev.recipient()));
    o.verbosity = 3;
    let mut c = config(t.path());
    c.echo = true;
    let sink = starter_with(o)(c, al.recipient());
    for chunk in [
        &b"hello\nabc"[..],
        b"def\rXY\n@nix {\"action\":\"setPhase\",\"phase\":\"p\"}\n",
        b"last",
    ] {
        sink.bytes.send(LogBytes(chunk.to_vec())).await.unwrap();
    }
    sink.hook_stderr
        .send(HookStderrLine(
            "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"from hook\"}".into(),
        ))
        .await
        .unwrap();
    let summary = sink.eof.send(LogEof).await.unwrap();
    assert_eq!(summary.tail, ["hello", "XYcdef", "last"]);
    assert_eq!(summary.bytes, 59);
    let file = summary.log_file.unwrap();
    assert_eq!(file, log_file_path(t.path(), &drv(), true));
    assert_eq!(
        bunzip(&file),
        b"hello\nabcdef\rXY\n@nix {\"action\":\"setPhase\",\"phase\":\"p\"}\nlast"
    );
    assert_eq!(
        String::from_utf8(err.lock().unwrap().clone()).unwrap(),
        "hello\nXYcdef\nfrom hook\nlast\n"
    );
    // Let the event recorder drain its mailbox.
    actix_rt::time::sleep(Duration::from_millis(20)).await;
    let ev = events.lock().unwrap().clone();
    assert_eq!(ev.len(), 5, "{ev:?}");
    assert_eq!(
        ev[2],
        BuildLogEvent::Phase {
            drv_path: drv(),
            phase: "p".into()
        }
    );
    assert!(alarms.lock().unwrap().is_empty());
}

#[actix::test]
async fn plain_log_is_readable_while_the_build_runs() {
    let t = tempfile::tempdir().unwrap();
    let (_, al) = recorder::<LogAlarm>();
    let mut c = config(t.path());
    c.compress = false;
    let sink = starter(None)(c, al.recipient());
    sink.bytes
        .send(LogBytes(b"running\n".to_vec()))
        .await
        .unwrap();
    let path = log_file_path(t.path(), &drv(), false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read(&path).unwrap_or_default() != b"running\n" {
        assert!(Instant::now() < deadline);
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    let s = sink.eof.send(LogEof).await.unwrap();
    assert_eq!(s.log_file, Some(path));
}

#[actix::test]
async fn no_log_dir_means_no_file() {
    let (_, al) = recorder::<LogAlarm>();
    let sink = starter(None)(config(Path::new("")), al.recipient());
    sink.bytes.send(LogBytes(b"x\n".to_vec())).await.unwrap();
    let s = sink.eof.send(LogEof).await.unwrap();
    assert_eq!(s.log_file, None);
    assert_eq!(s.tail, ["x"]);
}

#[actix::test]
async fn unwritable_log_dir_is_reported_and_the_build_goes_on() {
    let t = tempfile::tempdir().unwrap();
    let blocker = t.path().join("f");
    std::fs::write(&blocker, b"").unwrap();
    let (_, al) = recorder::<LogAlarm>();
    let (err, o) = options(None);
    let sink = starter_with(o)(config(&blocker), al.recipient());
    sink.bytes.send(LogBytes(b"x\n".to_vec())).await.unwrap();
    let s = sink.eof.send(LogEof).await.unwrap();
    assert_eq!(s.log_file, None);
    let err = String::from_utf8(err.lock().unwrap().clone()).unwrap();
    assert!(err.starts_with("error: creating log file '"), "{err}");
}

async fn alarms_with(
    c: LogConfig,
    feed: impl AsyncFnOnce(&drover_actors::messages::LogSink),
) -> Vec<LogAlarm> {
    let (alarms, al) = recorder::<LogAlarm>();
    let sink = starter(None)(c, al.recipient());
    feed(&sink).await;
    sink.eof.send(LogEof).await.unwrap();
    actix_rt::time::sleep(Duration::from_millis(20)).await;
    let v = alarms.lock().unwrap().clone();
    v
}

#[actix::test]
async fn silence_alarm_fires_once() {
    let t = tempfile::tempdir().unwrap();
    let mut c = config(t.path());
    c.max_silent_time = Some(Duration::from_millis(150));
    let got = alarms_with(c, async |sink| {
        // Output every 50 ms keeps it alive.
        for _ in 0..6 {
            sink.bytes.send(LogBytes(b".".to_vec())).await.unwrap();
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
        let silent_from = Instant::now();
        actix_rt::time::sleep(Duration::from_millis(500)).await;
        assert!(silent_from.elapsed() >= Duration::from_millis(150));
    })
    .await;
    assert_eq!(got, [LogAlarm::Silent(Duration::from_millis(150))]);
}

#[actix::test]
async fn timeout_alarm_fires_once_despite_output() {
    let t = tempfile::tempdir().unwrap();
    let mut c = config(t.path());
    c.timeout = Some(Duration::from_millis(200));
    c.max_silent_time = Some(Duration::from_secs(60));
    let got = alarms_with(c, async |sink| {
        for _ in 0..12 {
            sink.bytes.send(LogBytes(b"busy\n".to_vec())).await.unwrap();
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(got, [LogAlarm::Timeout(Duration::from_millis(200))]);
}

#[actix::test]
async fn log_limit_alarm_fires_once() {
    let t = tempfile::tempdir().unwrap();
    let mut c = config(t.path());
    c.max_log_size = 1000;
    let got = alarms_with(c, async |sink| {
        for _ in 0..50 {
            sink.bytes.send(LogBytes(vec![b'x'; 100])).await.unwrap();
        }
    })
    .await;
    assert_eq!(got, [LogAlarm::LogLimit(1000)]);
    let logged = bunzip(&log_file_path(t.path(), &drv(), true));
    assert_eq!(logged.len(), 1000, "the chunk over the limit is not logged");
}

#[actix::test]
async fn no_alarm_after_eof() {
    let t = tempfile::tempdir().unwrap();
    let mut c = config(t.path());
    c.timeout = Some(Duration::from_millis(100));
    let got = alarms_with(c, async |_| {}).await;
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    assert!(got.is_empty());
}

/// `line` repeated, readable at any offset: `Pattern::at(pos, n)` is bytes
/// `pos..pos + n` of the infinite repetition (n ≤ 64 KiB).
struct Pattern {
    bytes: Vec<u8>,
    period: usize,
}

impl Pattern {
    fn new(line: &[u8]) -> Pattern {
        let bytes = line
            .iter()
            .copied()
            .cycle()
            .take(64 * 1024 + line.len())
            .collect();
        Pattern {
            bytes,
            period: line.len(),
        }
    }

    fn at(&self, pos: usize, n: usize) -> &[u8] {
        let start = pos % self.period;
        &self.bytes[start..start + n]
    }
}

/// Compares a reader's bytes with the first `total` bytes of a pattern, in constant
/// memory.
fn same_bytes(mut r: impl Read, p: &Pattern, total: usize) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return pos == total;
        }
        if pos + n > total || buf[..n] != *p.at(pos, n) {
            return false;
        }
        pos += n;
    }
}

/// Resident memory of this process, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Streams `total` bytes of output (`line` repeated) through one collector in 64 KiB
/// chunks generated on the fly; checks that the bytes buffered between the collector
/// and its writer thread stay bounded, that resident memory does not grow with the
/// log, and that everything is logged.
async fn stream(compress: bool, total: usize, line: &[u8]) {
    let t = tempfile::tempdir().unwrap();
    let (alarms, al) = recorder::<LogAlarm>();
    let mut o = CollectorOptions::new(None);
    o.queue_chunks = 8;
    let mut c = config(t.path());
    c.compress = compress;
    let addr = LogCollector::new(c, al.recipient(), o).start();
    let sink = addr.sink();
    const CHUNK: usize = 64 * 1024;
    let rss_before = rss_bytes();
    let pattern = Pattern::new(line);
    let mut sent = 0;
    while sent < total {
        let n = CHUNK.min(total - sent);
        sink.bytes
            .send(LogBytes(pattern.at(sent, n).to_vec()))
            .await
            .unwrap();
        sent += n;
    }
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    let stats = addr.send(GetLogStats).await.unwrap();
    assert_eq!(stats.bytes, total as u64);
    // The writer queue (8 chunks) plus the chunk being written and one waiting.
    assert!(stats.peak_queued_bytes <= 10 * CHUNK as u64, "{stats:?}");
    // Generous: other tests of this binary run concurrently in the same process.
    assert!(
        rss_growth < 64 << 20,
        "resident memory grew by {rss_growth} bytes"
    );
    let s = sink.eof.send(LogEof).await.unwrap();
    assert_eq!(s.bytes, total as u64);
    let file = s.log_file.unwrap();
    let f = std::fs::File::open(&file).unwrap();
    let reader: Box<dyn Read> = if compress {
        Box::new(bzip2::read::MultiBzDecoder::new(f))
    } else {
        Box::new(f)
    };
    assert!(
        same_bytes(reader, &pattern, total),
        "the log differs from what was sent"
    );
    assert!(alarms.lock().unwrap().is_empty());
    assert_eq!(s.tail.len(), 10);
}

/// 100 MB of plain log through one collector.
#[actix::test]
async fn big_plain_log_streams_in_bounded_memory() {
    stream(
        false,
        100 * 1024 * 1024,
        b"0123456789abcdefghijklmnopqrstuvwxyz progress 42%\r done\n",
    )
    .await;
}

/// A compressed log: the compression thread keeps up through back-pressure.
#[actix::test]
async fn big_compressed_log_streams_in_bounded_memory() {
    stream(
        true,
        6 * 1024 * 1024,
        b"some build output line, progress 42%\r done with 7 of 9\n",
    )
    .await;
}

/// The output of a real Nix 2.8 build, fed through a collector with `echo`: the log
/// file is byte-identical to Nix's, and what the collector prints is what `nix-store`
/// printed for the builder.
#[actix::test]
async fn collector_matches_nix_on_a_real_build() {
    require_nix!();
    let root = crate::nix_env::TestRoot::new();
    let expr = root.path().join("x.nix");
    std::fs::write(
        &expr,
        r#"derivation { name = "echoed"; system = builtins.currentSystem; builder = "/bin/sh";
          args = ["-c" ''
            echo first
            printf 'abcdef\rXY\n'
            echo '@nix {"action":"setPhase","phase":"buildPhase"}'
            echo '@nix {"action":"msg","level":1,"msg":"a warning"}'
            echo '@nix {"action":"msg","level":5,"msg":"too chatty"}'
            echo '@nix {"action":"start","id":3,"level":3,"type":101,"text":"fetching","parent":0,"fields":[]}'
            echo '@nix {"action":"result","id":3,"type":101,"fields":["fetched line"]}'
            echo '@nix {broken'
            i=0; while [ $i -lt 3000 ]; do echo "line $i"; i=$((i+1)); done
            printf 'no newline'
            exit 1
          ''];
        }"#,
    )
    .unwrap();
    let drv_full = root.instantiate(&expr, None).remove(0);
    let out = root
        .cmd("nix-store")
        .args(["--realise", &drv_full])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(100));
    let nix_stderr = String::from_utf8(out.stderr).unwrap();
    let builder_part: Vec<&str> = nix_stderr
        .lines()
        .skip_while(|l| !l.starts_with("building '"))
        .skip(1)
        .take_while(|l| !l.starts_with("error: builder for"))
        .collect();

    for expected in [
        "first",
        "XYcdef",
        "a warning",
        "fetching...",
        "fetched line",
        "no newline",
    ] {
        assert!(builder_part.contains(&expected), "{nix_stderr}");
    }
    assert!(!nix_stderr.contains("too chatty"));
    let drv = StorePath::from_base_name(drv_full.rsplit('/').next().unwrap()).unwrap();
    let nix_file = log_file_path(&root.log_dir, &drv, true);
    let nix_compressed = std::fs::read(&nix_file).unwrap();
    let raw = {
        let mut v = Vec::new();
        bzip2::read::BzDecoder::new(&nix_compressed[..])
            .read_to_end(&mut v)
            .unwrap();
        v
    };

    let t = tempfile::tempdir().unwrap();
    let (err, o) = options(None);
    let (_, al) = recorder::<LogAlarm>();
    let mut c = config(t.path());
    c.drv_path = drv.clone();
    c.echo = true;
    let sink = starter_with(o)(c, al.recipient());
    for chunk in raw.chunks(4096) {
        sink.bytes.send(LogBytes(chunk.to_vec())).await.unwrap();
    }
    let s = sink.eof.send(LogEof).await.unwrap();
    let ours = std::fs::read(s.log_file.unwrap()).unwrap();
    // A log shorter than a block is one stream, as Nix's: the same bytes but for the
    // header's block-size digit (drover's blocks are level 1, Nix's stream level 9).
    assert!(raw.len() <= drover::build_log::blocks::BLOCK_BYTES);
    assert_eq!(
        (&ours[..4], &nix_compressed[..4]),
        (&drover::build_log::blocks::STREAM_MAGIC[..], &b"BZh9"[..])
    );
    assert!(
        ours[4..] == nix_compressed[4..],
        "compressed log differs from Nix's"
    );
    assert_eq!(s.tail.last().map(String::as_str), Some("no newline"));

    let printed = String::from_utf8(err.lock().unwrap().clone()).unwrap();
    let printed: Vec<&str> = printed.lines().collect();
    assert_eq!(
        printed.len(),
        builder_part.len(),
        "{printed:?}\n{builder_part:?}"
    );
    for (ours, nix) in printed.iter().zip(&builder_part) {
        // The JSON parsers word their errors differently.
        let bad = "bad JSON log message from builder: ";
        if nix.starts_with(bad) {
            assert!(ours.starts_with(bad), "{ours}");
        } else {
            assert_eq!(ours, nix);
        }
    }
}
