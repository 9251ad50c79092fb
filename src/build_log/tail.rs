//! The tail of a build log: the last `log-lines` lines, shown in the failure message
//! (`last 10 log lines:` then `> line` each).
//!
//! A ring of at most `log-lines` lines; older lines are dropped as new ones arrive, so
//! its memory is bounded whatever the log size (lines themselves are capped by
//! [`super::lines::MAX_LINE_LEN`]). Lines are kept as text; bytes that are not UTF-8
//! are replaced with U+FFFD.

use std::collections::VecDeque;

/// The last `capacity` lines of a log.
#[derive(Debug, Clone)]
pub struct LogTail {
    lines: VecDeque<String>,
    capacity: usize,
}

impl LogTail {
    /// A tail keeping `capacity` (`log-lines`) lines; 0 keeps none.
    pub fn new(capacity: usize) -> LogTail {
        LogTail {
            lines: VecDeque::with_capacity(capacity.min(1024)),
            capacity,
        }
    }

    /// Appends a line, dropping the oldest one when full.
    pub fn push(&mut self, line: String) {
        if self.capacity == 0 {
            return;
        }
        if self.lines.len() == self.capacity {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Appends a line given as bytes (lossily decoded). Once the tail is full, the
    /// dropped line's buffer is reused: no allocation per line of a long log.
    pub fn push_bytes(&mut self, line: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let text = String::from_utf8_lossy(line);
        if self.lines.len() == self.capacity {
            if let Some(mut old) = self.lines.pop_front() {
                old.clear();
                old.push_str(&text);
                self.lines.push_back(old);
                return;
            }
        }
        self.lines.push_back(text.into_owned());
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The lines, oldest first.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(String::as_str)
    }

    /// The lines, oldest first, as a vector.
    pub fn to_vec(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_in_order() {
        let mut t = LogTail::new(3);
        assert!(t.is_empty());
        for i in 0..10 {
            t.push(i.to_string());
        }
        assert_eq!(t.to_vec(), ["7", "8", "9"]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn bytes_pushed_into_a_full_tail_replace_the_oldest() {
        let mut t = LogTail::new(2);
        for l in [&b"first long line"[..], b"b", b"c\xff", b""] {
            t.push_bytes(l);
        }
        assert_eq!(t.to_vec(), ["c\u{fffd}", ""]);
        let mut none = LogTail::new(0);
        none.push_bytes(b"x");
        assert!(none.is_empty());
    }

    #[test]
    fn fewer_lines_than_capacity() {
        let mut t = LogTail::new(10);
        t.push("a".into());
        t.push_bytes(b"b\xff");
        assert_eq!(t.lines().collect::<Vec<_>>(), ["a", "b\u{fffd}"]);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut t = LogTail::new(0);
        t.push("a".into());
        assert!(t.is_empty());
    }
}
