//! What `drover realise` shows on stderr.
//!
//! Every line goes through one [`Display`], shared (behind a mutex) by the CLI and the
//! log collectors. On a terminal it keeps a status line at the bottom — builds done,
//! running, failed; paths copied with their NAR and download MiB, counting the bytes
//! of copies in flight; what is building and for how long — written by
//! [`status_line`], a pure function of the counters. Elsewhere (a pipe, a CI log) it
//! prints exactly what `nix-store --realise` prints, and nothing else.
//!
//! Without a `--log-format`, the status line is the last line of the live build
//! tree ([`crate::tree`]), drawn above it; the tree's lines are cleared as a block
//! (cursor up, erase to the end of the screen) before output goes above them.
//!
//! Redraws are rate-limited: events (counters, builds and copies starting) redraw
//! at most once per [`MIN_REDRAW_INTERVAL`], and the CLI calls [`Display::tick`] on
//! a timer ([`TICK_INTERVAL`]) so the line stays current (elapsed time, bytes in
//! flight) and shows what skipped redraws left out. A flood of progress events
//! therefore costs no terminal output beyond a few lines a second. Output lines put
//! the status line back below them at once, as Nix's progress bar does.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover::store_path::StorePath;
use drover_actors::progress::{Counters, Transfer};

use crate::log_format::{AnsiFilter, JsonLogger};

/// Event-driven redraws are at least this far apart.
pub const MIN_REDRAW_INTERVAL: Duration = Duration::from_millis(100);
/// How often the CLI calls [`Display::tick`].
pub const TICK_INTERVAL: Duration = Duration::from_millis(150);

/// Bytes of the copies in flight (not yet in the counters' `done_*` sizes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Compressed bytes downloaded.
    pub downloaded: u64,
    /// NAR bytes unpacked.
    pub unpacked: u64,
}

/// The oldest running build, for the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Building {
    /// Derivation name without `.drv`.
    pub name: String,
    /// Seconds since it started.
    pub secs: u64,
    /// How many other builds run.
    pub more: usize,
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// The status line (without colour or width limit):
/// `[d/n built, R running, F failed, d/n copied (X/Y MiB), A/B MiB DL, Ns] building x (Ns)`.
///
/// The copy part appears when substitutions are expected or done, as in Nix's
/// progress bar: X = NAR MiB unpacked (done and in flight), Y = NAR MiB expected
/// and done; the `MiB DL` part (A downloaded, B expected and done) appears when
/// there is something to download (another local store has no file to download).
pub fn status_line(
    c: &Counters,
    in_flight: InFlight,
    elapsed_secs: u64,
    building: Option<&Building>,
) -> String {
    let mut s = format!(
        "[{}/{} built",
        c.done_builds,
        c.expected_builds + c.done_builds
    );
    if c.running_builds > 0 {
        s.push_str(&format!(", {} running", c.running_builds));
    }
    if c.failed_builds > 0 {
        s.push_str(&format!(", {} failed", c.failed_builds));
    }
    if c.expected_substitutions + c.done_substitutions > 0 {
        s.push_str(&format!(
            ", {}/{} copied ({}/{} MiB)",
            c.done_substitutions,
            c.expected_substitutions + c.done_substitutions,
            mib(c.done_nar_size + in_flight.unpacked),
            mib(c.expected_nar_size + c.done_nar_size)
        ));
        let total_download = c.expected_download_size + c.done_download_size;
        let downloaded = c.done_download_size + in_flight.downloaded;
        if total_download > 0 || downloaded > 0 {
            s.push_str(&format!(
                ", {}/{} MiB DL",
                mib(downloaded),
                mib(total_download)
            ));
        }
    }
    s.push_str(&format!(", {elapsed_secs}s]"));
    if let Some(b) = building {
        s.push_str(&format!(" building {} ({}s)", b.name, b.secs));
        if b.more > 0 {
            s.push_str(&format!(" and {} more", b.more));
        }
    }
    s
}

/// The display of the running command, once it has one (see [`notice`]).
static SHARED: std::sync::OnceLock<Arc<Mutex<Display>>> = std::sync::OnceLock::new();

/// Makes `d` the display [`notice`] writes through.
pub fn share(d: &Arc<Mutex<Display>>) {
    let _ = SHARED.set(d.clone());
}

/// Prints a line Nix prints (from any thread): through the shared display, so the
/// status line stays intact, or straight to stderr before there is one.
pub fn notice(line: &str) {
    match SHARED.get() {
        Some(d) => d.lock().unwrap_or_else(|e| e.into_inner()).line(line),
        None => eprintln!("{line}"),
    }
}

/// Runs `f` inside an activity of the shared display's JSON logger (a query of
/// `--log-format internal-json`: `start` before, `stop` after); without a JSON
/// logger it only runs `f`.
pub fn json_activity<T>(
    level: u64,
    ty: u64,
    text: impl FnOnce(&drover::store_path::StoreDir) -> String,
    fields: impl FnOnce(&drover::store_path::StoreDir) -> Vec<serde_json::Value>,
    f: impl FnOnce() -> T,
) -> T {
    let Some(d) = SHARED.get() else { return f() };
    let mut id = None;
    d.lock().unwrap_or_else(|e| e.into_inner()).emit_json(|j| {
        let sd = j.store_dir().clone();
        let (i, s) = j.start_activity(level, ty, &text(&sd), fields(&sd));
        id = Some(i);
        s
    });
    let r = f();
    if let Some(i) = id {
        d.lock()
            .unwrap_or_else(|e| e.into_inner())
            .emit_json(|_| JsonLogger::stop_activity(i));
    }
    r
}

/// Shared stderr with an optional live status line.
pub struct Display {
    out: Box<dyn Write + Send>,
    live: bool,
    /// Bytes written since the last newline (a status line is only drawn at a line
    /// boundary, so partial lines of builder output are never split).
    mid_line: bool,
    /// How many lines of status (or tree) are drawn below the output.
    drawn: usize,
    /// The live build tree ([`crate::tree`]), drawn instead of the status line.
    tree: Option<crate::tree::Tree>,
    last_draw: Option<Instant>,
    counters: Counters,
    running: BTreeMap<StorePath, Instant>,
    /// The live byte counts of running copies.
    transfers: BTreeMap<StorePath, Arc<Transfer>>,
    started: Instant,
    /// `--log-format internal-json`: everything is written as `@nix` lines.
    json: Option<JsonLogger>,
    /// Text goes through Nix's `filterANSIEscapes` (all escapes off a terminal).
    filter: AnsiFilter,
}

impl Display {
    /// Live on a terminal, unless `plain` is asked for.
    pub fn new(plain: bool) -> Display {
        let tty = io::stderr().is_terminal();
        let mut d = Display::to(Box::new(io::stderr()), !plain && tty);
        d.filter = AnsiFilter::new(!tty);
        d
    }

    /// A display writing to `out`, with a status line when `live`.
    pub fn to(out: Box<dyn Write + Send>, live: bool) -> Display {
        Display {
            out,
            live,
            mid_line: false,
            drawn: 0,
            tree: None,
            last_draw: None,
            counters: Counters::default(),
            running: BTreeMap::new(),
            transfers: BTreeMap::new(),
            started: Instant::now(),
            json: None,
            filter: AnsiFilter::new(!live),
        }
    }

    /// On a terminal, draw the live build tree instead of the status line.
    pub fn use_tree(&mut self) {
        self.tree = Some(crate::tree::Tree::new(self.started));
    }

    /// Gives an event to the tree (a wait or new estimates redraw it).
    pub fn event(&mut self, event: &drover_actors::progress::ProgressEvent) {
        use drover_actors::progress::ProgressEvent as E;
        if let Some(tree) = &mut self.tree {
            tree.apply(event, Instant::now());
            if matches!(event, E::Waiting { .. } | E::Estimates(_)) {
                self.redraw();
            }
        }
    }

    /// From now on, write Nix's `@nix` JSON lines instead of text (no status line).
    pub fn set_json(&mut self, logger: JsonLogger) {
        self.live = false;
        self.json = Some(logger);
    }

    /// The JSON logger, with `--log-format internal-json`.
    pub fn json(&mut self) -> Option<&mut JsonLogger> {
        self.json.as_mut()
    }

    /// Writes what the JSON logger made of an event.
    pub fn emit_json(&mut self, f: impl FnOnce(&mut JsonLogger) -> String) {
        if let Some(j) = self.json.as_mut() {
            let s = f(j);
            if !s.is_empty() {
                let _ = self.out.write_all(s.as_bytes());
                let _ = self.out.flush();
            }
        }
    }

    /// Prints a whole message line (Nix's `printMsg`).
    pub fn line(&mut self, s: &str) {
        if self.json.is_some() {
            return self.emit_json(|j| j.message(s));
        }
        let mut buf = s.as_bytes().to_vec();
        buf.push(b'\n');
        let _ = self.write_all(&buf);
    }

    pub fn counters(&mut self, c: Counters) {
        self.emit_json(|j| j.counters(&c));
        self.counters = c;
        self.redraw();
    }

    pub fn build_started(&mut self, drv: StorePath) {
        self.running.insert(drv, Instant::now());
        self.redraw();
    }

    pub fn build_finished(&mut self, drv: &StorePath) {
        self.running.remove(drv);
        self.redraw();
    }

    /// A copy of `path` started (replacing the transfer of an earlier attempt).
    pub fn substitution_started(&mut self, path: StorePath, transfer: Arc<Transfer>) {
        self.transfers.insert(path, transfer);
        self.redraw();
    }

    /// Its bytes now count in the counters' done sizes.
    pub fn substitution_finished(&mut self, path: &StorePath) {
        self.transfers.remove(path);
    }

    /// Removes the status line for good (before the final output).
    pub fn finish(&mut self) {
        self.emit_json(|j| j.worker_finished());
        let _ = self.out.write_all(&clear(self.drawn));
        self.drawn = 0;
        self.live = false;
    }

    /// The bytes of the copies in flight.
    fn in_flight(&self) -> InFlight {
        self.transfers
            .values()
            .fold(InFlight::default(), |acc, t| InFlight {
                downloaded: acc.downloaded + t.downloaded(),
                unpacked: acc.unpacked + t.unpacked(),
            })
    }

    /// Redraws the status line after an event, unless it was drawn less than
    /// [`MIN_REDRAW_INTERVAL`] ago (the next [`tick`](Self::tick) draws it then).
    pub fn redraw(&mut self) {
        if !self.live {
            return;
        }
        if self
            .last_draw
            .is_some_and(|t| t.elapsed() < MIN_REDRAW_INTERVAL)
        {
            return;
        }
        self.draw();
    }

    /// Redraws the status line now (from the CLI's timer).
    pub fn tick(&mut self) {
        if self.live {
            self.draw();
        }
    }

    /// Draws the status line in place of the old one (at a line boundary).
    fn draw(&mut self) {
        if self.mid_line {
            return;
        }
        let building = self
            .running
            .iter()
            .min_by_key(|(_, t)| **t)
            .map(|(drv, since)| Building {
                name: drv.name().trim_end_matches(".drv").to_owned(),
                secs: since.elapsed().as_secs(),
                more: self.running.len() - 1,
            });
        let s = status_line(
            &self.counters,
            self.in_flight(),
            self.started.elapsed().as_secs(),
            building.as_ref(),
        );
        let (width, height) = terminal_size();
        let mut buf = clear(self.drawn);
        if let Some(tree) = &self.tree {
            let lines = crate::tree::render(tree, Instant::now(), width, height);
            let last = lines.len() - 1;
            for (i, l) in lines.iter().enumerate() {
                if i == last {
                    buf.extend_from_slice(format!("\x1b[2m{l}\x1b[0m").as_bytes());
                } else {
                    buf.extend_from_slice(l.as_bytes());
                    buf.extend_from_slice(b"\n");
                }
            }
            self.drawn = lines.len();
        } else {
            let shown: String = s.chars().take(width.saturating_sub(1)).collect();
            buf.extend_from_slice(format!("\x1b[2m{shown}\x1b[0m").as_bytes());
            self.drawn = 1;
        }
        let _ = self.out.write_all(&buf);
        let _ = self.out.flush();
        self.last_draw = Some(Instant::now());
    }
}

impl Write for Display {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.json.is_some() {
            self.emit_json(|j| j.write(buf));
            return Ok(buf.len());
        }
        let consumed = buf.len();
        let filtered = self.filter.filter(buf);
        let buf = &filtered[..];
        if buf.is_empty() {
            return Ok(consumed);
        }
        if self.drawn > 0 {
            let mut all = clear(self.drawn);
            all.extend_from_slice(buf);
            self.out.write_all(&all)?;
            self.drawn = 0;
        } else {
            self.out.write_all(buf)?;
        }
        self.mid_line = buf.last() != Some(&b'\n');
        // The line went above the status line, which comes back at once (as in
        // Nix): only redraws for events wait for the interval. The tree (many lines)
        // waits for it too, or for the next tick: a flood of builder output must not
        // cost a whole tree per line.
        if self.live {
            if self.tree.is_some() {
                self.redraw();
            } else {
                self.draw();
            }
        }
        Ok(consumed)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The terminal's columns and rows (80×24 when stderr does not say).
fn terminal_size() -> (usize, usize) {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
    let r = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    let or = |v: u16, d: usize| if r == 0 && v > 0 { v as usize } else { d };
    (or(ws.ws_col, 80), or(ws.ws_row, 24))
}

/// Erases the `n` lines drawn last, leaving the cursor where the first began: the
/// line itself for one (as Nix's progress bar), else up `n - 1` lines and to the
/// end of the screen (only drawn lines are below).
fn clear(n: usize) -> Vec<u8> {
    match n {
        0 => Vec::new(),
        1 => b"\r\x1b[K".to_vec(),
        n => format!("\r\x1b[{}A\x1b[J", n - 1).into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn builds_only() {
        let c = Counters {
            expected_builds: 2,
            running_builds: 1,
            done_builds: 1,
            failed_builds: 1,
            ..Default::default()
        };
        let b = Building {
            name: "hello".into(),
            secs: 4,
            more: 1,
        };
        assert_eq!(
            status_line(&c, InFlight::default(), 7, Some(&b)),
            "[1/3 built, 1 running, 1 failed, 7s] building hello (4s) and 1 more"
        );
        assert_eq!(
            status_line(&Counters::default(), InFlight::default(), 0, None),
            "[0/0 built, 0s]"
        );
    }

    #[test]
    fn copies_with_bytes_in_flight() {
        let c = Counters {
            expected_substitutions: 2,
            running_substitutions: 1,
            done_substitutions: 1,
            expected_nar_size: 3 * MIB,
            done_nar_size: MIB,
            expected_download_size: MIB,
            done_download_size: MIB / 2,
            ..Default::default()
        };
        let in_flight = InFlight {
            downloaded: MIB / 4,
            unpacked: MIB / 2,
        };
        assert_eq!(
            status_line(&c, in_flight, 3, None),
            "[0/0 built, 1/3 copied (1.5/4.0 MiB), 0.8/1.5 MiB DL, 3s]"
        );
    }

    #[test]
    fn one_decimal_rounded_and_no_download_part_without_downloads() {
        // Another local store: NAR bytes only.
        let c = Counters {
            expected_substitutions: 1,
            expected_nar_size: 1_000_000,
            ..Default::default()
        };
        let in_flight = InFlight {
            downloaded: 0,
            unpacked: 123_456,
        };
        assert_eq!(
            status_line(&c, in_flight, 0, None),
            "[0/0 built, 0/1 copied (0.1/1.0 MiB), 0s]"
        );
    }

    /// A writer whose bytes a test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn draws(s: &str) -> usize {
        s.matches("\x1b[2m[").count()
    }

    #[test]
    fn a_flood_of_counters_is_rate_limited_and_ticks_show_bytes_in_flight() {
        let out = Shared::default();
        let mut d = Display::to(Box::new(out.clone()), true);
        let sd = drover::store_path::StoreDir::new("/nix/store").unwrap();
        let path = sd
            .parse(&format!("/nix/store/{}-x", "a".repeat(32)))
            .unwrap();
        let t = Arc::new(Transfer::default());
        d.substitution_started(path.clone(), t.clone());
        for i in 0..10_000 {
            d.counters(Counters {
                expected_substitutions: 1,
                expected_nar_size: 2 * MIB,
                expected_download_size: MIB,
                done_builds: i,
                ..Default::default()
            });
        }
        assert_eq!(draws(&out.text()), 1, "{:?}", out.text());
        t.add_unpacked(MIB);
        t.add_downloaded(MIB / 2);
        d.tick();
        let text = out.text();
        assert_eq!(draws(&text), 2);
        assert!(
            text.ends_with("copied (1.0/2.0 MiB), 0.5/1.0 MiB DL, 0s]\x1b[0m"),
            "{text:?}"
        );
        // Finished: its bytes are the counters' now.
        d.substitution_finished(&path);
        d.tick();
        assert!(out
            .text()
            .ends_with("copied (0.0/2.0 MiB), 0.0/1.0 MiB DL, 0s]\x1b[0m"));
        d.finish();
        assert!(out.text().ends_with("\r\x1b[K"));
    }

    #[test]
    fn off_a_terminal_only_the_lines_are_written() {
        let out = Shared::default();
        let mut d = Display::to(Box::new(out.clone()), false);
        d.counters(Counters {
            expected_substitutions: 1,
            ..Default::default()
        });
        d.line("copying path 'x' from 'y'...");
        d.tick();
        let _ = d.write_all(b"partial");
        d.tick();
        d.finish();
        assert_eq!(out.text(), "copying path 'x' from 'y'...\npartial");
    }

    #[test]
    fn output_lines_put_the_status_line_back_below_them() {
        let out = Shared::default();
        let mut d = Display::to(Box::new(out.clone()), true);
        d.tick();
        d.line("one");
        d.line("two");
        assert_eq!(
            out.text(),
            "\x1b[2m[0/0 built, 0s]\x1b[0m\r\x1b[Kone\n\x1b[2m[0/0 built, 0s]\x1b[0m\
             \r\x1b[Ktwo\n\x1b[2m[0/0 built, 0s]\x1b[0m"
        );
    }

    #[test]
    fn no_status_line_in_the_middle_of_a_line() {
        let out = Shared::default();
        let mut d = Display::to(Box::new(out.clone()), true);
        let _ = d.write_all(b"half a line");
        d.tick();
        assert_eq!(out.text(), "half a line");
        let _ = d.write_all(b" and the rest\n");
        d.tick();
        let text = out.text();
        assert!(
            text.starts_with("half a line and the rest\n\x1b[2m[0/0 built"),
            "{text:?}"
        );
    }

    #[test]
    fn the_tree_is_cleared_for_output_lines_and_drawn_again_below_them() {
        use drover_actors::progress::{ProgressEvent, WaitReason};
        let out = Shared::default();
        let mut d = Display::to(Box::new(out.clone()), true);
        d.use_tree();
        let sd = drover::store_path::StoreDir::new("/nix/store").unwrap();
        let a = sd
            .parse(&format!("/nix/store/{}-a.drv", "a".repeat(32)))
            .unwrap();
        let b = sd
            .parse(&format!("/nix/store/{}-b.drv", "a".repeat(32)))
            .unwrap();
        d.event(&ProgressEvent::BuildStarted {
            drv_path: a.clone(),
            machine: None,
            verb: "building",
            round: None,
        });
        d.event(&ProgressEvent::Waiting {
            path: b,
            reason: WaitReason::BuildSlot,
        });
        d.tick();
        let tree = "building 0s      a locally\nwaiting 0s       b for a build slot\n\
                    \x1b[2m[0/0 built, 0s]\x1b[0m";
        assert!(out.text().ends_with(tree), "{:?}", out.text());
        let before = out.text().len();
        d.line("a> hello");
        // Up two lines, erase to the end of the screen, the line; the tree comes
        // back at the next tick (it was drawn just now).
        assert_eq!(&out.text()[before..], "\r\x1b[2A\x1b[Ja> hello\n");
        d.tick();
        assert_eq!(
            &out.text()[before..],
            format!("\r\x1b[2A\x1b[Ja> hello\n{tree}")
        );
        // A flood of output: the lines, and the tree at most once per interval.
        let before = out.text().len();
        let t = Instant::now();
        for i in 0..10_000 {
            d.line(&format!("line {i}"));
        }
        let most = 2 + (t.elapsed().as_millis() / MIN_REDRAW_INTERVAL.as_millis()) as usize;
        let flood = &out.text()[before..];
        assert!(flood.matches("for a build slot").count() <= most.min(100));
        assert!(flood.contains("line 9999\n"));
        d.tick();
        assert!(out.text().ends_with(tree));
        d.finish();
        assert!(out.text().ends_with("\r\x1b[2A\x1b[J"));
    }
}
