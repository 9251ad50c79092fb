//! What Nix's terminal logger does to every message before it writes it to stderr
//! (Nix 2.8's `filterANSIEscapes`, applied by its simple logger to its own messages,
//! to echoed builder lines and to the messages and activities of the build hook):
//!
//! * escape sequences are removed, except that colour sequences (CSI sequences
//!   ending in `m`) are kept when stderr is a terminal ([`should_ansi`]); a CSI
//!   sequence is `ESC [`, parameter bytes `0x30..=0x3f`, intermediate bytes
//!   `0x20..=0x2f` and one final byte `0x40..=0x7e`; any other escape is `ESC` and
//!   at most one byte `0x40..=0x5f` (so of `ESC ] 0;title BEL` only `0;title` is
//!   left);
//! * a tab becomes spaces up to the next multiple of 8 columns (counted from the
//!   start of the line, one column per UTF-8 character);
//! * `\r` and BEL are dropped.

/// Whether Nix would keep colours on stderr: stderr is a terminal, `TERM` is set and
/// not `dumb`, and `NO_COLOR` is unset (Nix's `shouldANSI`).
pub fn should_ansi() -> bool {
    nix::unistd::isatty(2).unwrap_or(false)
        && std::env::var("TERM").is_ok_and(|t| t != "dumb")
        && std::env::var_os("NO_COLOR").is_none()
}

/// Nix's filter as a stream: the column of tab expansion carries over between
/// calls and restarts at each `\n`, so output cut into chunks anywhere (a
/// builder's pty) is filtered as the lines it holds would be one by one.
#[derive(Debug, Default)]
pub struct AnsiFilter {
    /// Drop colour sequences too (stderr is not a terminal).
    pub filter_all: bool,
    col: usize,
}

impl AnsiFilter {
    pub fn new(filter_all: bool) -> AnsiFilter {
        AnsiFilter { filter_all, col: 0 }
    }

    /// The next piece of the stream, filtered.
    pub fn filter(&mut self, s: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            let c = s[i];
            match c {
                0x1b => {
                    let start = i;
                    i += 1;
                    let mut last = 0u8;
                    if s.get(i) == Some(&b'[') {
                        i += 1;
                        while s.get(i).is_some_and(|b| (0x30..=0x3f).contains(b)) {
                            i += 1;
                        }
                        while s.get(i).is_some_and(|b| (0x20..=0x2f).contains(b)) {
                            i += 1;
                        }
                        if let Some(&b) = s.get(i).filter(|b| (0x40..=0x7e).contains(*b)) {
                            last = b;
                            i += 1;
                        }
                    } else if s.get(i).is_some_and(|b| (0x40..=0x5f).contains(b)) {
                        i += 1;
                    }
                    if !self.filter_all && last == b'm' {
                        out.extend_from_slice(&s[start..i]);
                    }
                }
                b'\t' => {
                    i += 1;
                    out.push(b' ');
                    self.col += 1;
                    while !self.col.is_multiple_of(8) {
                        out.push(b' ');
                        self.col += 1;
                    }
                }
                b'\r' | 0x07 => i += 1,
                b'\n' => {
                    out.push(c);
                    self.col = 0;
                    i += 1;
                }
                _ => {
                    out.push(c);
                    // One column per character, not per UTF-8 byte.
                    if c & 0xc0 != 0x80 {
                        self.col += 1;
                    }
                    i += 1;
                }
            }
        }
        out
    }
}

/// Filters one message as Nix's logger does; `filter_all` (stderr is not a
/// terminal) removes colour sequences too.
pub fn filter_ansi_escapes(s: &[u8], filter_all: bool) -> Vec<u8> {
    AnsiFilter::new(filter_all).filter(s)
}

/// [`filter_ansi_escapes`] of text.
pub fn filter_ansi_text(s: &str, filter_all: bool) -> String {
    String::from_utf8_lossy(&filter_ansi_escapes(s.as_bytes(), filter_all)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f(s: &[u8], all: bool) -> Vec<u8> {
        filter_ansi_escapes(s, all)
    }

    /// What nix-store 2.8 printed, stderr a file, for a builder writing
    /// `x ESC[31m red ESC[0m TAB a TAB b ESC]0;t BEL`.
    #[test]
    fn observed_builder_line() {
        let line = b"x\x1b[31mred\x1b[0m\ta\tb\x1b]0;t\x07";
        assert_eq!(f(line, true), b"xred    a       b0;t");
        assert_eq!(
            f(line, false),
            b"x\x1b[31mred\x1b[0m    a       b0;t".to_vec()
        );
    }

    /// build-remote's messages: `copying path '<ESC>[35;1m…<ESC>[0m' to …`.
    #[test]
    fn colours_of_messages() {
        let m = b"copying path '\x1b[35;1m/s/x\x1b[0m' to 'ssh://m1'";
        assert_eq!(f(m, true), b"copying path '/s/x' to 'ssh://m1'");
        assert_eq!(f(m, false), m.to_vec());
        // Non-colour CSI sequences go even on a terminal.
        assert_eq!(f(b"a\x1b[2Kb\x1b[1;2Hc", false), b"abc");
        // A truncated sequence at the end.
        assert_eq!(f(b"a\x1b[", true), b"a");
        assert_eq!(f(b"a\x1b", true), b"a");
    }

    #[test]
    fn tabs_count_characters_not_bytes() {
        assert_eq!(f("é\tx".as_bytes(), true), "é       x".as_bytes());
        assert_eq!(f(b"\r\tx", true), b"        x");
        assert_eq!(filter_ansi_text("12345678\tx", true), "12345678        x");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let all = f(&data, true);
            prop_assert!(!all.contains(&0x1b));
            let _ = f(&data, false);
        }
    }
}
