//! Line assembly of builder output, as Nix 2.8 does it (`handleChildOutput` /
//! `flushLine` of the derivation goal).
//!
//! Bytes are processed one by one against a current line and a write position:
//!
//! * `\r` sets the write position back to 0; following bytes **overwrite** the line
//!   from its start, the rest of the old line stays (`abcdef\rXY\n` gives `XYcdef`);
//! * `\n` ends the line: it is emitted (without the `\n`) and the line and position
//!   are reset;
//! * any other byte is written at the position, extending the line if needed.
//!
//! At end of output a non-empty current line is emitted as if ended by `\n`. Nix
//! emits empty lines too (`\n\n` gives two empty lines), but never an empty partial
//! line at EOF.
//!
//! Lines are bytes: builders may print anything, and the log file keeps the raw bytes
//! anyway. Unlike Nix, a line is capped at [`MAX_LINE_LEN`] bytes (bytes written past
//! it are dropped) so that one build's memory stays bounded whatever it prints.

/// The longest line kept; bytes a builder writes past it on one line are dropped.
pub const MAX_LINE_LEN: usize = 1 << 20;

/// Assembles lines from chunks of builder output; chunking never changes the lines.
#[derive(Debug, Default, Clone)]
pub struct LineAssembler {
    line: Vec<u8>,
    pos: usize,
}

impl LineAssembler {
    pub fn new() -> LineAssembler {
        LineAssembler::default()
    }

    /// Feeds a chunk; `emit` gets every line it completes.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        // The bytes between control characters are written as one run.
        while !data.is_empty() {
            let run = data
                .iter()
                .position(|&c| c == b'\n' || c == b'\r')
                .unwrap_or(data.len());
            self.write_run(&data[..run]);
            match data.get(run) {
                Some(b'\r') => self.pos = 0,
                Some(_) => self.flush(&mut emit),
                None => return,
            }
            data = &data[run + 1..];
        }
    }

    /// Writes bytes other than `\r` and `\n` at the position: over the line, then
    /// extending it up to [`MAX_LINE_LEN`] (`pos <= len` always holds).
    fn write_run(&mut self, run: &[u8]) {
        let over = (self.line.len() - self.pos).min(run.len());
        self.line[self.pos..self.pos + over].copy_from_slice(&run[..over]);
        self.pos += over;
        let rest = &run[over..];
        let add = rest.len().min(MAX_LINE_LEN.saturating_sub(self.pos));
        self.line.extend_from_slice(&rest[..add]);
        self.pos += add;
    }

    /// End of output: emits the partial line, if any.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            self.flush(&mut emit);
        }
    }

    /// The line being assembled (bytes written so far).
    pub fn current(&self) -> &[u8] {
        &self.line
    }

    fn flush(&mut self, emit: &mut impl FnMut(&[u8])) {
        emit(&self.line);
        self.line.clear();
        self.pos = 0;
    }
}

/// All lines of a complete output (convenience for tests and one-shot use).
pub fn split_lines(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut a = LineAssembler::new();
    a.push(data, |l| out.push(l.to_vec()));
    a.finish(|l| out.push(l.to_vec()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(data: &[u8]) -> Vec<String> {
        split_lines(data)
            .into_iter()
            .map(|l| String::from_utf8(l).unwrap())
            .collect()
    }

    #[test]
    fn newline_ends_lines_and_empty_lines_count() {
        assert_eq!(lines(b"a\nbc\n\nd\n"), ["a", "bc", "", "d"]);
        assert_eq!(lines(b""), Vec::<String>::new());
        assert_eq!(lines(b"\n"), [""]);
    }

    #[test]
    fn carriage_return_overwrites_from_the_start() {
        // Observed with Nix 2.8: `printf 'abcdef\rXY\n'` gives the tail line `XYcdef`.
        assert_eq!(lines(b"abcdef\rXY\n"), ["XYcdef"]);
        assert_eq!(lines(b"50%\r100%\n"), ["100%"]);
        assert_eq!(lines(b"abc\r\n"), ["abc"]);
        assert_eq!(lines(b"abc\r\rd\r"), ["dbc"]);
    }

    #[test]
    fn partial_last_line_is_flushed_but_not_an_empty_one() {
        assert_eq!(lines(b"a\npartial"), ["a", "partial"]);
        assert_eq!(lines(b"a\n"), ["a"]);
        // `\r` alone leaves the line non-empty: it is flushed.
        assert_eq!(lines(b"x\r"), ["x"]);
    }

    #[test]
    fn chunks_split_anywhere() {
        let mut a = LineAssembler::new();
        let mut out = Vec::new();
        for chunk in [&b"ab"[..], b"c\r", b"X", b"\n", b"tail"] {
            a.push(chunk, |l| out.push(l.to_vec()));
        }
        assert_eq!(a.current(), b"tail");
        a.finish(|l| out.push(l.to_vec()));
        assert_eq!(out, [b"Xbc".to_vec(), b"tail".to_vec()]);
    }

    #[test]
    fn lines_are_capped() {
        let mut data = vec![b'x'; MAX_LINE_LEN + 10];
        data.push(b'\n');
        let l = split_lines(&data);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].len(), MAX_LINE_LEN);
    }

    /// Nix's rule byte by byte, with a small cap: what the run-wise assembler must give.
    fn byte_by_byte(data: &[u8], cap: usize) -> Vec<Vec<u8>> {
        let (mut out, mut line, mut pos) = (Vec::new(), Vec::new(), 0);
        for &c in data {
            match c {
                b'\r' => pos = 0,
                b'\n' => {
                    out.push(std::mem::take(&mut line));
                    pos = 0;
                }
                _ if pos < line.len() => {
                    line[pos] = c;
                    pos += 1;
                }
                _ if pos < cap => {
                    line.push(c);
                    pos += 1;
                }
                _ => {}
            }
        }
        if !line.is_empty() {
            out.push(line);
        }
        out
    }

    proptest! {
        #[test]
        fn runs_give_what_bytes_one_by_one_give(
            data in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), Just(b'b'), any::<u8>()], 0..400),
        ) {
            prop_assert_eq!(split_lines(&data), byte_by_byte(&data, MAX_LINE_LEN));
        }

        #[test]
        fn chunking_does_not_change_lines(
            data in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), Just(b'b'), any::<u8>()], 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..10),
        ) {
            let whole = split_lines(&data);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let mut a = LineAssembler::new();
            let mut out = Vec::new();
            let mut start = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                a.push(&data[start..c], |l| out.push(l.to_vec()));
                start = c;
            }
            a.finish(|l| out.push(l.to_vec()));
            prop_assert_eq!(out, whole);
        }
    }
}
