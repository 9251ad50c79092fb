//! What `drover realise` shows on stderr.
//!
//! Every line goes through one [`Display`], shared (behind a mutex) by the CLI and the
//! log collectors. On a terminal it keeps a status line at the bottom — builds done,
//! running, failed, what is running and for how long — redrawn after each line of
//! output; elsewhere (a pipe, a CI log) it prints exactly what `nix-store --realise`
//! prints, and nothing else.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::time::Instant;

use drover::store_path::StorePath;
use drover_actors::progress::Counters;

/// Shared stderr with an optional live status line.
pub struct Display {
    live: bool,
    /// Bytes written since the last newline (a status line is only drawn at a line
    /// boundary, so partial lines of builder output are never split).
    mid_line: bool,
    status_drawn: bool,
    counters: Counters,
    running: BTreeMap<StorePath, Instant>,
    started: Instant,
}

impl Display {
    /// Live on a terminal, unless `plain` is asked for.
    pub fn new(plain: bool) -> Display {
        Display {
            live: !plain && io::stderr().is_terminal(),
            mid_line: false,
            status_drawn: false,
            counters: Counters::default(),
            running: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    /// Prints a whole message line (Nix's `printMsg`).
    pub fn line(&mut self, s: &str) {
        let mut buf = s.as_bytes().to_vec();
        buf.push(b'\n');
        let _ = self.write_all(&buf);
    }

    pub fn counters(&mut self, c: Counters) {
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

    /// Removes the status line for good (before the final output).
    pub fn finish(&mut self) {
        self.clear();
        self.live = false;
    }

    fn clear(&mut self) {
        if self.status_drawn {
            let _ = io::stderr().write_all(b"\r\x1b[K");
            self.status_drawn = false;
        }
    }

    /// Redraws the status line (when live and at a line boundary).
    pub fn redraw(&mut self) {
        if !self.live || self.mid_line {
            return;
        }
        self.clear();
        let c = &self.counters;
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
                ", {}/{} copied",
                c.done_substitutions,
                c.expected_substitutions + c.done_substitutions
            ));
        }
        s.push_str(&format!(", {}s]", self.started.elapsed().as_secs()));
        if let Some((drv, since)) = self.running.iter().min_by_key(|(_, t)| **t) {
            s.push_str(&format!(
                " building {} ({}s)",
                drv.name().trim_end_matches(".drv"),
                since.elapsed().as_secs()
            ));
            if self.running.len() > 1 {
                s.push_str(&format!(" and {} more", self.running.len() - 1));
            }
        }
        let width = terminal_width();
        let shown: String = s.chars().take(width.saturating_sub(1)).collect();
        let _ = io::stderr().write_all(format!("\x1b[2m{shown}\x1b[0m").as_bytes());
        self.status_drawn = true;
    }
}

impl Write for Display {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.clear();
        io::stderr().write_all(buf)?;
        self.mid_line = buf.last() != Some(&b'\n');
        self.redraw();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

fn terminal_width() -> usize {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
    let r = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        80
    }
}
