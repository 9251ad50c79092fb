//! Streaming NAR parsing.
//!
//! [`parse`] reads a NAR from any [`Read`] and drives a [`NarSink`] with what it finds:
//! directories (opened and closed), regular files (with their executable flag, size and
//! a reader over their contents) and symlinks. Memory use does not depend on the input:
//! file contents are handed to the sink as a bounded [`Read`] that the sink pulls in
//! chunks of its own buffer size, directory nesting is kept on an explicit stack (no
//! recursion, so no stack overflow on adversarial input) bounded by [`MAX_DEPTH`], and
//! no string whose length comes from the input is allocated beyond a small bound
//! ([`MAX_NAME_LEN`], [`MAX_TARGET_LEN`]). Every byte read is hashed on the way, so one
//! pass gives the sink's work *and* the sha256 NAR hash and NAR size ([`NarSummary`]).
//!
//! Why a sink driven by the parser rather than a pull/event API: the parser then owns
//! all the validation state (sort order, nesting, padding) and a sink cannot get it
//! wrong; file contents still stream because the sink receives a `&mut dyn Read`
//! limited to the file. A sink that does not read the contents (e.g. [`NullSink`]) is
//! fine: the parser drains (and hashes) what is left.
//!
//! The parser is strict: it accepts exactly the canonical NAR that Nix's `dumpPath`
//! (and [`super::dump_path`]) writes, so anything accepted re-serialises to the same
//! bytes. Nix 2.8's own parser is laxer in field order (it loops over fields), but Nix
//! only ever writes the canonical form. It refuses, with the byte offset and the entry
//! path:
//!
//! * a missing `nix-archive-1` magic, unknown or misplaced tokens, non-zero padding,
//!   truncated input;
//! * entry names that are empty, `.`, `..`, or contain `/` or NUL, names longer than
//!   [`MAX_NAME_LEN`], duplicate entries and entries not in strictly increasing byte
//!   order, as Nix means to require (Nix 2.8's sort check is broken: it compares each
//!   name with an always-empty previous one, so `nix-store --restore` accepts unsorted
//!   entries, and refuses duplicates only when creating the second one fails);
//! * symlink targets that are empty, contain NUL or are longer than [`MAX_TARGET_LEN`];
//! * nesting deeper than [`MAX_DEPTH`];
//! * with [`parse`], any data after the root node ([`parse_embedded`] instead stops
//!   right after the NAR, for NARs inside a larger stream such as the worker protocol).
//!
//! The reader is read in small pieces (8-byte tokens); wrap an unbuffered source (a
//! file, a socket) in a [`std::io::BufReader`]. The parser itself never reads past the
//! end of the NAR.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::hash::{Hash, HashAlgo, HashSink};

/// The magic string every NAR starts with.
pub const NAR_VERSION_MAGIC_1: &[u8] = b"nix-archive-1";
/// Longest entry name accepted (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target accepted (Linux's `PATH_MAX` minus the NUL).
pub const MAX_TARGET_LEN: usize = 4095;
/// Deepest directory nesting accepted. Every level of a real path takes at least two
/// bytes, so a tree Nix can dump (paths under `PATH_MAX`) is far shallower.
pub const MAX_DEPTH: usize = 2048;
/// Longest keyword token (`nix-archive-1`, `executable`, …) there is; longer ones are
/// refused without being read.
const MAX_KEYWORD_LEN: usize = 16;
/// Size of the parser's own buffer, used to drain file contents a sink left unread.
pub const BUF_SIZE: usize = 64 * 1024;

/// The NAR hash (sha256) and size of a NAR, computed while parsing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSummary {
    pub nar_hash: Hash,
    pub nar_size: u64,
}

/// Receives the file system objects of a NAR, in NAR order (a directory, then its
/// entries sorted by name, then its closing).
///
/// `path` is the object's path relative to the root of the NAR, empty for the root
/// itself; its components are validated entry names.
pub trait NarSink {
    /// A directory starts; its entries follow.
    fn create_directory(&mut self, path: &Path) -> io::Result<()>;

    /// All entries of the directory at `path` have been delivered.
    fn close_directory(&mut self, path: &Path) -> io::Result<()> {
        let _ = path;
        Ok(())
    }

    /// A regular file of `size` bytes. `contents` yields exactly those bytes (then
    /// EOF); the sink may read all, part or none of it.
    fn create_file(
        &mut self,
        path: &Path,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()>;

    /// A symbolic link to `target` (non-empty, without NUL bytes).
    fn create_symlink(&mut self, path: &Path, target: &[u8]) -> io::Result<()>;
}

/// A sink that does nothing: parsing into it only validates the NAR and computes its
/// hash and size (Nix's null `ParseSink`, as used by `copyNAR`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl NarSink for NullSink {
    fn create_directory(&mut self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn create_file(&mut self, _: &Path, _: bool, _: u64, _: &mut dyn Read) -> io::Result<()> {
        Ok(())
    }
    fn create_symlink(&mut self, _: &Path, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// Why a NAR was refused. Every variant names the byte offset (from the start of the
/// NAR) of the offending token and the path of the entry being parsed (`/` is the root).
#[derive(Debug, Error)]
pub enum NarReadError {
    #[error("reading NAR at byte {offset} (entry '{path}'): {source}")]
    Io {
        offset: u64,
        path: String,
        source: io::Error,
    },
    #[error("NAR is truncated at byte {offset} (entry '{path}'): expected {expected}")]
    Truncated {
        offset: u64,
        path: String,
        expected: &'static str,
    },
    #[error("input doesn't look like a Nix archive (bad magic at byte {offset})")]
    BadMagic { offset: u64 },
    #[error("bad NAR at byte {offset} (entry '{path}'): expected {expected}, found {found}")]
    UnexpectedToken {
        offset: u64,
        path: String,
        expected: &'static str,
        found: String,
    },
    #[error("bad NAR at byte {offset} (entry '{path}'): non-zero padding")]
    NonZeroPadding { offset: u64, path: String },
    #[error("bad NAR at byte {offset} (entry '{path}'): {what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        offset: u64,
        path: String,
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("NAR contains invalid file name {name:?} at byte {offset} (in directory '{path}')")]
    InvalidName {
        offset: u64,
        path: String,
        name: String,
    },
    #[error("NAR directory '{path}' has a duplicate entry {name:?} at byte {offset}")]
    DuplicateEntry {
        offset: u64,
        path: String,
        name: String,
    },
    #[error("NAR directory '{path}' is not sorted: entry {name:?} at byte {offset} does not come after {previous:?}")]
    NotSorted {
        offset: u64,
        path: String,
        name: String,
        previous: String,
    },
    #[error("NAR contains an invalid symlink target {target:?} at byte {offset} (entry '{path}')")]
    InvalidTarget {
        offset: u64,
        path: String,
        target: String,
    },
    #[error("NAR nests directories deeper than {max} levels at byte {offset} (entry '{path}')")]
    TooDeep {
        offset: u64,
        path: String,
        max: usize,
    },
    #[error("NAR is followed by trailing data at byte {offset}")]
    TrailingData { offset: u64 },
    #[error("while unpacking NAR entry '{path}' (byte {offset}): {source}")]
    Sink {
        offset: u64,
        path: String,
        source: io::Error,
    },
}

impl NarReadError {
    /// The byte offset the error refers to.
    pub fn offset(&self) -> u64 {
        match self {
            NarReadError::Io { offset, .. }
            | NarReadError::Truncated { offset, .. }
            | NarReadError::BadMagic { offset }
            | NarReadError::UnexpectedToken { offset, .. }
            | NarReadError::NonZeroPadding { offset, .. }
            | NarReadError::TooLong { offset, .. }
            | NarReadError::InvalidName { offset, .. }
            | NarReadError::NotSorted { offset, .. }
            | NarReadError::DuplicateEntry { offset, .. }
            | NarReadError::InvalidTarget { offset, .. }
            | NarReadError::TooDeep { offset, .. }
            | NarReadError::TrailingData { offset }
            | NarReadError::Sink { offset, .. } => *offset,
        }
    }
}

/// Parses the NAR that makes up all of `reader` into `sink`; data after the root node
/// is an error. Returns the NAR's sha256 hash and size.
pub fn parse<R: Read>(reader: R, sink: &mut dyn NarSink) -> Result<NarSummary, NarReadError> {
    let mut p = Parser::new(reader, sink);
    p.run()?;
    p.expect_eof()?;
    Ok(p.finish())
}

/// [`parse`] without hashing: returns the NAR's size only, for a caller that hashes
/// the stream itself (the pipelined unpacking hashes it on another thread). The
/// checks and errors are those of [`parse`], trailing data included.
pub fn parse_counted<R: Read>(reader: R, sink: &mut dyn NarSink) -> Result<u64, NarReadError> {
    let mut p = Parser::with_hash(reader, sink, None);
    p.run()?;
    p.expect_eof()?;
    Ok(p.input.len)
}

/// Parses one NAR from the start of `reader` into `sink` and stops right after its root
/// node, leaving the rest of the stream unread.
pub fn parse_embedded<R: Read>(
    reader: &mut R,
    sink: &mut dyn NarSink,
) -> Result<NarSummary, NarReadError> {
    let mut p = Parser::new(reader, sink);
    p.run()?;
    Ok(p.finish())
}

/// Checks that `reader` holds exactly one valid NAR and returns its hash and size.
pub fn validate<R: Read>(reader: R) -> Result<NarSummary, NarReadError> {
    parse(reader, &mut NullSink)
}

/// Nix's `copyNAR`: copies exactly one NAR from the start of `reader` to `writer`,
/// validating it on the way, and stops right after it (like [`parse_embedded`]).
/// Returns its hash and size. On error, part of the NAR may have been written.
pub fn copy_nar<R: Read, W: io::Write>(
    reader: &mut R,
    writer: &mut W,
) -> Result<NarSummary, NarReadError> {
    let mut tee = TeeReader { reader, writer };
    parse_embedded(&mut tee, &mut NullSink)
}

/// Writes what it reads.
struct TeeReader<'a, R, W> {
    reader: &'a mut R,
    writer: &'a mut W,
}

impl<R: Read, W: io::Write> Read for TeeReader<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        let got = buf.get(..n).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "reader returned too much")
        })?;
        self.writer
            .write_all(got)
            .map_err(|e| io::Error::new(e.kind(), format!("writing the NAR copy: {e}")))?;
        Ok(n)
    }
}

/// The input, hashed (unless the caller hashes it) and counted as it is read.
struct HashingReader<R> {
    inner: R,
    hash: Option<HashSink>,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    fn offset(&self) -> u64 {
        self.len
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    let got = buf.get(..n).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "reader returned too much")
                    })?;
                    if let Some(h) = &mut self.hash {
                        h.update(got);
                    }
                    self.len += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a failed `read_exact` on the input means.
enum InputError {
    Eof,
    Io(io::Error),
}

/// Reads exactly `buf.len()` bytes.
fn fill<R: Read>(r: &mut HashingReader<R>, buf: &mut [u8]) -> Result<(), InputError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Err(InputError::Eof),
            Ok(n) => done += n,
            Err(e) => return Err(InputError::Io(e)),
        }
    }
    Ok(())
}

/// The contents of one file, as handed to the sink.
struct ContentReader<'a, R> {
    input: &'a mut HashingReader<R>,
    remaining: u64,
    /// The first input error, kept so the parser reports it rather than the sink's.
    error: Option<InputError>,
}

impl<R: Read> Read for ContentReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        if self.error.is_some() {
            return Err(io::Error::other("NAR input already failed"));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                self.error = Some(InputError::Eof);
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "NAR ends inside file contents",
                ))
            }
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.error = Some(InputError::Io(e));
                Err(copy)
            }
        }
    }
}

/// Parse state of an open directory.
struct DirState {
    /// The previous entry's name, for the sort check.
    previous: Option<Vec<u8>>,
}

enum NodeKind {
    Directory,
    Leaf,
}

struct Parser<'s, R> {
    input: HashingReader<R>,
    sink: &'s mut dyn NarSink,
    /// The path of the node being parsed, relative to the root.
    path: PathBuf,
    buf: Vec<u8>,
}

fn show(path: &Path) -> String {
    format!("/{}", path.display())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl<'s, R: Read> Parser<'s, R> {
    fn new(reader: R, sink: &'s mut dyn NarSink) -> Self {
        Self::with_hash(reader, sink, Some(HashSink::new(HashAlgo::Sha256)))
    }

    fn with_hash(reader: R, sink: &'s mut dyn NarSink, hash: Option<HashSink>) -> Self {
        Parser {
            input: HashingReader {
                inner: reader,
                hash,
                len: 0,
            },
            sink,
            path: PathBuf::new(),
            buf: Vec::new(),
        }
    }

    fn finish(self) -> NarSummary {
        let hash = self
            .input
            .hash
            .unwrap_or_else(|| HashSink::new(HashAlgo::Sha256));
        let (nar_hash, nar_size) = hash.finish();
        NarSummary { nar_hash, nar_size }
    }

    fn input_error(&self, e: InputError, offset: u64, expected: &'static str) -> NarReadError {
        match e {
            InputError::Eof => NarReadError::Truncated {
                offset,
                path: show(&self.path),
                expected,
            },
            InputError::Io(source) => NarReadError::Io {
                offset,
                path: show(&self.path),
                source,
            },
        }
    }

    fn read_u64(&mut self, expected: &'static str) -> Result<u64, NarReadError> {
        let offset = self.input.offset();
        let mut b = [0u8; 8];
        fill(&mut self.input, &mut b).map_err(|e| self.input_error(e, offset, expected))?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarReadError> {
        let pad = ((8 - len % 8) % 8) as usize;
        if pad == 0 {
            return Ok(());
        }
        let offset = self.input.offset();
        let mut b = [0u8; 8];
        fill(&mut self.input, &mut b[..pad]).map_err(|e| self.input_error(e, offset, "padding"))?;
        if b.iter().any(|&x| x != 0) {
            return Err(NarReadError::NonZeroPadding {
                offset,
                path: show(&self.path),
            });
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes into `self.buf`; returns its offset.
    fn read_string(
        &mut self,
        max: usize,
        what: &'static str,
        on_too_long: impl FnOnce(u64, u64, String) -> NarReadError,
    ) -> Result<u64, NarReadError> {
        let offset = self.input.offset();
        let len = self.read_u64(what)?;
        if len > max as u64 {
            return Err(on_too_long(offset, len, show(&self.path)));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(len as usize, 0);
        let r = fill(&mut self.input, &mut buf);
        self.buf = buf;
        r.map_err(|e| self.input_error(e, offset, what))?;
        self.read_padding(len)?;
        Ok(offset)
    }

    /// Reads a keyword token; returns it (in `self.buf`) and its offset.
    fn read_keyword(&mut self, expected: &'static str) -> Result<u64, NarReadError> {
        self.read_string(MAX_KEYWORD_LEN, expected, |offset, len, path| {
            NarReadError::UnexpectedToken {
                offset,
                path,
                expected,
                found: format!("a string of {len} bytes"),
            }
        })
    }

    fn unexpected(&self, offset: u64, expected: &'static str) -> NarReadError {
        NarReadError::UnexpectedToken {
            offset,
            path: show(&self.path),
            expected,
            found: format!("{:?}", lossy(&self.buf)),
        }
    }

    /// Reads a token that must be `tok`.
    fn expect(&mut self, tok: &'static str) -> Result<(), NarReadError> {
        let expected = match tok {
            "(" => "'('",
            ")" => "')'",
            "type" => "'type'",
            "contents" => "'contents'",
            "name" => "'name'",
            "node" => "'node'",
            "target" => "'target'",
            _ => "a keyword",
        };
        let offset = self.read_keyword(expected)?;
        if self.buf != tok.as_bytes() {
            return Err(self.unexpected(offset, expected));
        }
        Ok(())
    }

    fn sink_error(&self, offset: u64, source: io::Error) -> NarReadError {
        NarReadError::Sink {
            offset,
            path: show(&self.path),
            source,
        }
    }

    fn run(&mut self) -> Result<(), NarReadError> {
        // Magic.
        let len = self.read_u64("the NAR magic").map_err(|e| match e {
            NarReadError::Truncated { .. } => NarReadError::BadMagic { offset: 0 },
            e => e,
        })?;
        if len != NAR_VERSION_MAGIC_1.len() as u64 {
            return Err(NarReadError::BadMagic { offset: 0 });
        }
        let mut magic = [0u8; 16];
        let m = &mut magic[..NAR_VERSION_MAGIC_1.len()];
        fill(&mut self.input, m).map_err(|e| match e {
            InputError::Eof => NarReadError::BadMagic { offset: 0 },
            e => self.input_error(e, 0, "the NAR magic"),
        })?;
        if m != NAR_VERSION_MAGIC_1 {
            return Err(NarReadError::BadMagic { offset: 0 });
        }
        self.read_padding(NAR_VERSION_MAGIC_1.len() as u64)?;

        let mut dirs: Vec<DirState> = Vec::new();
        let mut at_node = true;
        loop {
            if at_node {
                match self.node()? {
                    NodeKind::Directory => dirs.push(DirState { previous: None }),
                    NodeKind::Leaf => {
                        if dirs.is_empty() {
                            return Ok(());
                        }
                        self.expect(")")?; // closes the entry
                        self.path.pop();
                    }
                }
            }
            // Inside a directory: another entry, or its end.
            let offset = self.read_keyword("'entry' or ')'")?;
            if self.buf == b")" {
                let end = self.input.offset();
                self.sink
                    .close_directory(&self.path)
                    .map_err(|e| self.sink_error(end, e))?;
                dirs.pop();
                if dirs.is_empty() {
                    return Ok(());
                }
                self.expect(")")?; // closes the entry holding this directory
                self.path.pop();
                at_node = false;
                continue;
            }
            if self.buf != b"entry" {
                return Err(self.unexpected(offset, "'entry' or ')'"));
            }
            self.expect("(")?;
            self.expect("name")?;
            let offset = self.read_string(MAX_NAME_LEN, "an entry name", |offset, len, path| {
                NarReadError::TooLong {
                    offset,
                    path,
                    what: "entry name",
                    len,
                    max: MAX_NAME_LEN,
                }
            })?;
            let name = std::mem::take(&mut self.buf);
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.iter().any(|&b| b == b'/' || b == 0)
            {
                return Err(NarReadError::InvalidName {
                    offset,
                    path: show(&self.path),
                    name: lossy(&name),
                });
            }
            if let Some(prev) = dirs.last().and_then(|d| d.previous.as_ref()) {
                if name == *prev {
                    return Err(NarReadError::DuplicateEntry {
                        offset,
                        path: show(&self.path),
                        name: lossy(&name),
                    });
                }
                if name.as_slice() < prev.as_slice() {
                    return Err(NarReadError::NotSorted {
                        offset,
                        path: show(&self.path),
                        name: lossy(&name),
                        previous: lossy(prev),
                    });
                }
            }
            if dirs.len() >= MAX_DEPTH {
                return Err(NarReadError::TooDeep {
                    offset,
                    path: show(&self.path),
                    max: MAX_DEPTH,
                });
            }
            self.path.push(OsStr::from_bytes(&name));
            if let Some(dir) = dirs.last_mut() {
                match &mut dir.previous {
                    Some(p) => {
                        p.clear();
                        p.extend_from_slice(&name);
                    }
                    None => dir.previous = Some(name),
                }
            }
            self.expect("node")?;
            at_node = true;
        }
    }

    /// Parses `( type …` of the node at `self.path`. A leaf is parsed to its closing
    /// `)`; a directory only up to its type (its entries follow).
    fn node(&mut self) -> Result<NodeKind, NarReadError> {
        self.expect("(")?;
        self.expect("type")?;
        let offset = self.read_keyword("a file type")?;
        match self.buf.as_slice() {
            b"directory" => {
                self.sink
                    .create_directory(&self.path)
                    .map_err(|e| self.sink_error(offset, e))?;
                Ok(NodeKind::Directory)
            }
            b"symlink" => {
                self.expect("target")?;
                let offset =
                    self.read_string(MAX_TARGET_LEN, "a symlink target", |offset, len, path| {
                        NarReadError::TooLong {
                            offset,
                            path,
                            what: "symlink target",
                            len,
                            max: MAX_TARGET_LEN,
                        }
                    })?;
                let target = std::mem::take(&mut self.buf);
                if target.is_empty() || target.contains(&0) {
                    return Err(NarReadError::InvalidTarget {
                        offset,
                        path: show(&self.path),
                        target: lossy(&target),
                    });
                }
                let r = self.sink.create_symlink(&self.path, &target);
                self.buf = target;
                r.map_err(|e| self.sink_error(offset, e))?;
                self.expect(")")?;
                Ok(NodeKind::Leaf)
            }
            b"regular" => {
                let offset = self.read_keyword("'executable' or 'contents'")?;
                let executable = match self.buf.as_slice() {
                    b"executable" => {
                        let offset = self.read_keyword("''")?;
                        if !self.buf.is_empty() {
                            return Err(self.unexpected(offset, "'' after 'executable'"));
                        }
                        self.expect("contents")?;
                        true
                    }
                    b"contents" => false,
                    _ => return Err(self.unexpected(offset, "'executable' or 'contents'")),
                };
                self.contents(executable)?;
                self.expect(")")?;
                Ok(NodeKind::Leaf)
            }
            _ => Err(self.unexpected(offset, "'regular', 'directory' or 'symlink'")),
        }
    }

    fn contents(&mut self, executable: bool) -> Result<(), NarReadError> {
        let offset = self.input.offset();
        let size = self.read_u64("the file size")?;
        let mut reader = ContentReader {
            input: &mut self.input,
            remaining: size,
            error: None,
        };
        let r = self
            .sink
            .create_file(&self.path, executable, size, &mut reader);
        let (remaining, error) = (reader.remaining, reader.error);
        let pos = self.input.offset();
        if let Some(e) = error {
            return Err(self.input_error(e, pos, "file contents"));
        }
        r.map_err(|e| self.sink_error(offset, e))?;
        self.drain(remaining)?;
        self.read_padding(size)
    }

    /// Reads and discards `n` bytes of contents a sink did not consume.
    fn drain(&mut self, mut n: u64) -> Result<(), NarReadError> {
        if n == 0 {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(BUF_SIZE, 0);
        let mut result = Ok(());
        while n > 0 {
            let want = n.min(BUF_SIZE as u64) as usize;
            let offset = self.input.offset();
            if let Err(e) = fill(&mut self.input, &mut buf[..want]) {
                result = Err(self.input_error(e, offset, "file contents"));
                break;
            }
            n -= want as u64;
        }
        buf.clear();
        buf.shrink_to(MAX_TARGET_LEN + 1);
        self.buf = buf;
        result
    }

    fn expect_eof(&mut self) -> Result<(), NarReadError> {
        let offset = self.input.offset();
        let mut b = [0u8; 1];
        loop {
            match self.input.inner.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(NarReadError::TrailingData { offset }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NarReadError::Io {
                        offset,
                        path: "/".into(),
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::writer::write_str;
    use crate::nar::{dump_bytes, dump_path, nar_hash_of_path, restore};
    use proptest::prelude::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// A NAR made of these tokens, each written as a NAR string.
    fn nar(tokens: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for t in tokens {
            write_str(&mut out, t).unwrap();
        }
        out
    }

    const HEAD: &[&[u8]] = &[b"nix-archive-1", b"(", b"type", b"directory"];

    /// A directory NAR whose root holds an entry per name, each an empty file.
    fn dir_with(names: &[&[u8]]) -> Vec<u8> {
        let mut t: Vec<&[u8]> = HEAD.to_vec();
        for n in names {
            t.extend([
                &b"entry"[..],
                b"(",
                b"name",
                n,
                b"node",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b")",
                b")",
            ]);
        }
        t.push(b")");
        nar(&t)
    }

    /// A tree exercising every kind of node.
    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::write(root.join("a/b/c/deep"), b"deep file\n").unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("exe"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("exe"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("B-upper"), vec![7u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("a/b", root.join("link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/x", root.join("dangling")).unwrap();
        fs::create_dir(root.join("emptydir")).unwrap();
    }

    fn dump(p: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        dump_path(p, &mut v).unwrap();
        v
    }

    #[test]
    fn round_trip_tree() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        sample_tree(&src);
        let bytes = dump(&src);
        let dst = d.path().join("dst");
        let summary = restore(&bytes[..], &dst).unwrap();
        assert_eq!(dump(&dst), bytes);
        let (h, n) = nar_hash_of_path(&src).unwrap();
        assert_eq!(
            summary,
            NarSummary {
                nar_hash: h,
                nar_size: n
            }
        );
        assert_eq!(n, bytes.len() as u64);
        let mode = |p: &str| fs::metadata(dst.join(p)).unwrap().permissions().mode();
        assert_eq!(mode("exe") & 0o111, 0o111);
        assert_eq!(mode("empty") & 0o111, 0);
        assert_eq!(fs::read_link(dst.join("link")).unwrap(), Path::new("a/b"));
    }

    #[test]
    fn root_file_and_symlink() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Vec::new();
        dump_bytes(b"hello", &mut b).unwrap();
        restore(&b[..], &d.path().join("f")).unwrap();
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"hello");
        let l = nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"x/y",
            b")",
        ]);
        restore(&l[..], &d.path().join("l")).unwrap();
        assert_eq!(fs::read_link(d.path().join("l")).unwrap(), Path::new("x/y"));
        assert_eq!(validate(&l[..]).unwrap().nar_size, l.len() as u64);
    }

    #[test]
    fn restore_refuses_existing_target() {
        let d = tempfile::tempdir().unwrap();
        let b = dir_with(&[b"a"]);
        let e = restore(&b[..], d.path()).unwrap_err();
        assert!(matches!(e, NarReadError::Sink { offset: 56, .. }), "{e}");
        fs::write(d.path().join("f"), b"").unwrap();
        let mut f = Vec::new();
        dump_bytes(b"x", &mut f).unwrap();
        assert!(restore(&f[..], &d.path().join("f")).is_err());
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"");
    }

    #[test]
    fn bad_magic() {
        for b in [
            nar(&[b"nix-archive-2", b"(", b")"]),
            nar(&[b"nix-archive-1x"]),
            vec![],
            vec![13, 0, 0],
            nar(&[b"not a nar"]),
        ] {
            assert!(matches!(
                validate(&b[..]),
                Err(NarReadError::BadMagic { offset: 0 })
            ));
        }
    }

    #[test]
    fn unknown_tokens() {
        for (b, off) in [
            (nar(&[b"nix-archive-1", b"[", b")"]), 24),
            (nar(&[b"nix-archive-1", b"(", b"kind"]), 40),
            (nar(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"]), 56),
            (
                nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"size"]),
                72,
            ),
            (
                nar(&[
                    b"nix-archive-1",
                    b"(",
                    b"type",
                    b"regular",
                    b"executable",
                    b"x",
                ]),
                96,
            ),
            (
                nar(&[b"nix-archive-1", b"(", b"type", b"directory", b"file"]),
                80,
            ),
            (
                nar(&[
                    b"nix-archive-1",
                    b"(",
                    b"type",
                    b"regular",
                    b"contents",
                    b"",
                    b"x",
                ]),
                96,
            ),
        ] {
            match validate(&b[..]) {
                Err(e @ NarReadError::UnexpectedToken { .. }) => assert_eq!(e.offset(), off, "{e}"),
                other => panic!("{other:?}"),
            }
        }
        // A keyword position holding a huge string is refused without reading it.
        let mut b = nar(&[b"nix-archive-1"]);
        b.extend(u64::MAX.to_le_bytes());
        assert!(matches!(
            validate(&b[..]),
            Err(NarReadError::UnexpectedToken { offset: 24, .. })
        ));
    }

    #[test]
    fn non_zero_padding() {
        let mut b = dir_with(&[b"abc"]);
        let good = b.clone();
        let pos = b.windows(3).position(|w| w == b"abc").unwrap() + 3;
        b[pos] = 1;
        let e = validate(&b[..]).unwrap_err();
        assert!(
            matches!(e, NarReadError::NonZeroPadding { offset, .. } if offset == pos as u64),
            "{e}"
        );
        validate(&good[..]).unwrap();
    }

    #[test]
    fn every_truncation_is_refused() {
        let d = tempfile::tempdir().unwrap();
        sample_tree(d.path());
        let b = dump(d.path());
        // All prefixes would take too long with the 10 kB file; check a spread.
        for len in (0..b.len()).filter(|l| l % 97 == 0 || *l < 400 || b.len() - l < 400) {
            let e = validate(&b[..len]).unwrap_err();
            assert!(
                matches!(
                    e,
                    NarReadError::Truncated { .. } | NarReadError::BadMagic { .. }
                ),
                "{len}: {e}"
            );
        }
        validate(&b[..]).unwrap();
    }

    #[test]
    fn trailing_data() {
        let mut b = dir_with(&[b"a"]);
        let n = b.len() as u64;
        b.push(0);
        assert!(matches!(
            validate(&b[..]),
            Err(NarReadError::TrailingData { offset }) if offset == n
        ));
        // Embedded parsing stops at the end of the NAR.
        let mut r = &b[..];
        let s = parse_embedded(&mut r, &mut NullSink).unwrap();
        assert_eq!(s.nar_size, n);
        assert_eq!(r, &[0]);
    }

    #[test]
    fn parse_counted_counts_what_parse_hashes_and_fails_alike() {
        let good = dir_with(&[b"a", b"b"]);
        let s = parse(&good[..], &mut NullSink).unwrap();
        assert_eq!(parse_counted(&good[..], &mut NullSink).unwrap(), s.nar_size);
        let mut trailing = good.clone();
        trailing.push(0);
        let cut = &good[..good.len() - 3];
        for bad in [&trailing[..], cut, &good[1..]] {
            let want = parse(bad, &mut NullSink).unwrap_err().to_string();
            let got = parse_counted(bad, &mut NullSink).unwrap_err().to_string();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn copy_nar_copies_exactly_one_nar() {
        let d = tempfile::tempdir().unwrap();
        sample_tree(d.path());
        let b = dump(d.path());
        let mut input = [b.clone(), b"rest".to_vec()].concat();
        let mut r = &input[..];
        let mut out = Vec::new();
        let s = copy_nar(&mut r, &mut out).unwrap();
        assert_eq!(out, b);
        assert_eq!(r, b"rest");
        assert_eq!(s, validate(&b[..]).unwrap());
        input[30] = b'X';
        assert!(copy_nar(&mut &input[..], &mut Vec::new()).is_err());
    }

    #[test]
    fn invalid_names() {
        for name in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            let e = validate(&dir_with(&[name])[..]).unwrap_err();
            assert!(
                matches!(e, NarReadError::InvalidName { offset: 128, .. }),
                "{e}"
            );
        }
        let long = vec![b'x'; MAX_NAME_LEN + 1];
        assert!(matches!(
            validate(&dir_with(&[&long])[..]),
            Err(NarReadError::TooLong {
                what: "entry name",
                ..
            })
        ));
        validate(&dir_with(&[&long[1..]])[..]).unwrap();
    }

    #[test]
    fn unsorted_and_duplicate_entries() {
        validate(&dir_with(&[b"B", b"a", b"b", b"ba"])[..]).unwrap();
        for names in [&[&b"b"[..], b"a"][..], &[b"a", b"b", b"ab"]] {
            let e = validate(&dir_with(names)[..]).unwrap_err();
            assert!(matches!(e, NarReadError::NotSorted { .. }), "{e}");
        }
        let e = validate(&dir_with(&[b"a", b"b", b"b"])[..]).unwrap_err();
        assert!(
            matches!(&e, NarReadError::DuplicateEntry { name, offset: 496, .. } if name == "b"),
            "{e}"
        );
        // Sorting is by unsigned bytes.
        validate(&dir_with(&[b"z", b"\xc3\xa9"])[..]).unwrap();
    }

    #[test]
    fn invalid_targets() {
        for t in [&b""[..], b"a\0"] {
            let b = nar(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"symlink",
                b"target",
                t,
                b")",
            ]);
            assert!(matches!(
                validate(&b[..]),
                Err(NarReadError::InvalidTarget { offset: 88, .. })
            ));
        }
        let long = vec![b'x'; MAX_TARGET_LEN + 1];
        let b = nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            &long,
            b")",
        ]);
        assert!(matches!(
            validate(&b[..]),
            Err(NarReadError::TooLong { .. })
        ));
    }

    fn nested(depth: usize) -> Vec<u8> {
        let mut b = nar(&[b"nix-archive-1"]);
        for _ in 0..depth {
            b.extend(nar(&[
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"a",
                b"node",
            ]));
        }
        b.extend(nar(&[b"(", b"type", b"directory", b")"]));
        for _ in 0..depth {
            b.extend(nar(&[b")", b")"]));
        }
        b
    }

    #[test]
    fn nesting_is_bounded() {
        validate(&nested(MAX_DEPTH - 1)[..]).unwrap();
        let e = validate(&nested(MAX_DEPTH)[..]).unwrap_err();
        assert!(matches!(e, NarReadError::TooDeep { .. }), "{}", e);
        // Far deeper input is refused without recursion.
        assert!(validate(&nested(100_000)[..]).is_err());
    }

    #[test]
    fn huge_declared_size_is_truncation_not_allocation() {
        let mut b = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
        b.extend(u64::MAX.to_le_bytes());
        b.extend([1, 2, 3]);
        assert!(matches!(
            validate(&b[..]),
            Err(NarReadError::Truncated { .. })
        ));
    }

    /// A sink recording events, and reading contents in odd chunk sizes.
    #[derive(Default)]
    struct Recorder(Vec<String>);
    impl NarSink for Recorder {
        fn create_directory(&mut self, p: &Path) -> io::Result<()> {
            self.0.push(format!("dir {}", p.display()));
            Ok(())
        }
        fn close_directory(&mut self, p: &Path) -> io::Result<()> {
            self.0.push(format!("end {}", p.display()));
            Ok(())
        }
        fn create_file(&mut self, p: &Path, x: bool, n: u64, c: &mut dyn Read) -> io::Result<()> {
            let mut v = Vec::new();
            let mut buf = [0u8; 7];
            loop {
                let k = c.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                v.extend_from_slice(&buf[..k]);
            }
            assert_eq!(v.len() as u64, n);
            self.0.push(format!(
                "file {} {x} {}",
                p.display(),
                lossy(&v[..v.len().min(12)])
            ));
            Ok(())
        }
        fn create_symlink(&mut self, p: &Path, t: &[u8]) -> io::Result<()> {
            self.0.push(format!("link {} {}", p.display(), lossy(t)));
            Ok(())
        }
    }

    #[test]
    fn events_in_order() {
        let d = tempfile::tempdir().unwrap();
        sample_tree(d.path());
        let mut r = Recorder::default();
        parse(&dump(d.path())[..], &mut r).unwrap();
        let expected = [
            "dir ",
            "file B-upper false \u{7}\u{7}\u{7}\u{7}\u{7}\u{7}\u{7}\u{7}\u{7}\u{7}\u{7}\u{7}",
            "dir a",
            "dir a/b",
            "dir a/b/c",
            "file a/b/c/deep false deep file\n",
            "end a/b/c",
            "end a/b",
            "end a",
            "link dangling /nonexistent/x",
            "file empty false ",
            "dir emptydir",
            "end emptydir",
            "file exe true #!/bin/sh\nec",
            "link link a/b",
            "end ",
        ];
        assert_eq!(r.0, expected);
    }

    #[test]
    fn sink_errors_name_the_entry() {
        struct Fail;
        impl NarSink for Fail {
            fn create_directory(&mut self, _: &Path) -> io::Result<()> {
                Ok(())
            }
            fn create_file(
                &mut self,
                p: &Path,
                _: bool,
                _: u64,
                _: &mut dyn Read,
            ) -> io::Result<()> {
                if p == Path::new("b") {
                    return Err(io::Error::other("disk full"));
                }
                Ok(())
            }
            fn create_symlink(&mut self, _: &Path, _: &[u8]) -> io::Result<()> {
                Ok(())
            }
        }
        let e = parse(&dir_with(&[b"a", b"b"])[..], &mut Fail).unwrap_err();
        assert!(
            matches!(&e, NarReadError::Sink { path, .. } if path == "/b"),
            "{e}"
        );
        assert!(e.to_string().contains("disk full"));
    }

    /// Yields a NAR of one regular file of `size` bytes without holding it.
    struct BigNar {
        head: Vec<u8>,
        size: u64,
        pos: u64,
        tail: Vec<u8>,
        largest_read: usize,
    }

    impl BigNar {
        fn new(size: u64) -> BigNar {
            let mut head = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
            head.extend(size.to_le_bytes());
            let mut tail = vec![0u8; ((8 - size % 8) % 8) as usize];
            tail.extend(nar(&[b")"]));
            BigNar {
                head,
                size,
                pos: 0,
                tail,
                largest_read: 0,
            }
        }
        fn total(&self) -> u64 {
            self.head.len() as u64 + self.size + self.tail.len() as u64
        }
    }

    impl Read for BigNar {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest_read = self.largest_read.max(buf.len());
            let h = self.head.len() as u64;
            let n = if self.pos < h {
                let s = &self.head[self.pos as usize..];
                let n = s.len().min(buf.len());
                buf[..n].copy_from_slice(&s[..n]);
                n
            } else if self.pos < h + self.size {
                let n = ((h + self.size - self.pos) as usize).min(buf.len());
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = ((self.pos - h + i as u64) % 251) as u8;
                }
                n
            } else {
                let off = (self.pos - h - self.size) as usize;
                let s = self.tail.get(off..).unwrap_or_default();
                let n = s.len().min(buf.len());
                buf[..n].copy_from_slice(&s[..n]);
                n
            };
            self.pos += n as u64;
            Ok(n)
        }
    }

    /// Streams a 64 MiB file through the validator (and a 1 GiB one when ignored tests
    /// run): the parser never asks for more than its buffer and allocates at most about
    /// one buffer, whatever the file size. (That the hash is right is checked by the
    /// round trips here and against Nix in the interop tests.)
    fn stream_big(size: u64) {
        let mut src = BigNar::new(size);
        let total = src.total();
        alloc::start();
        let s = validate(&mut src).unwrap();
        let peak = alloc::stop();
        assert_eq!(s.nar_size, total);
        assert!(src.largest_read <= BUF_SIZE, "{}", src.largest_read);
        assert!(
            peak <= 2 * BUF_SIZE,
            "parser allocated {peak} bytes at peak"
        );
    }

    #[test]
    fn streams_large_file_in_bounded_memory() {
        stream_big(64 << 20);
    }

    #[test]
    #[ignore = "slow in debug builds"]
    fn streams_1gib_file_in_bounded_memory() {
        stream_big(1 << 30);
    }

    /// A global allocator that tracks the peak live bytes allocated by one thread while
    /// enabled, to show that parsing does not buffer file contents.
    pub(crate) mod alloc {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static TRACK: Cell<bool> = const { Cell::new(false) };
            static LIVE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        struct Tracking;

        unsafe impl GlobalAlloc for Tracking {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                note(l.size() as isize);
                System.alloc(l)
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                note(-(l.size() as isize));
                System.dealloc(p, l)
            }
            unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
                note(new as isize - l.size() as isize);
                System.realloc(p, l, new)
            }
        }

        fn note(delta: isize) {
            let _ = TRACK.try_with(|t| {
                if t.get() {
                    let live = LIVE.with(|l| {
                        l.set(l.get() + delta);
                        l.get()
                    });
                    PEAK.with(|p| p.set(p.get().max(live)));
                }
            });
        }

        #[global_allocator]
        static GLOBAL: Tracking = Tracking;

        pub fn start() {
            LIVE.with(|l| l.set(0));
            PEAK.with(|p| p.set(0));
            TRACK.with(|t| t.set(true));
        }

        /// Peak live bytes since [`start`].
        pub fn stop() -> usize {
            TRACK.with(|t| t.set(false));
            PEAK.with(|p| p.get()) as usize
        }
    }

    #[derive(Debug, Clone)]
    enum Tree {
        File(Vec<u8>, bool),
        Link(Vec<u8>),
        Dir(Vec<(Vec<u8>, Tree)>),
    }

    /// Entry names: any bytes but `/` and NUL, often high ones (not UTF-8), to
    /// exercise the unsigned byte order of entries.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "[a-zA-Z0-9._\u{e9}-]{1,12}".prop_map(String::into_bytes),
            proptest::collection::vec(
                any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
                1..12
            ),
        ]
    }

    fn tree() -> impl Strategy<Value = Tree> {
        let leaf = prop_oneof![
            (
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<bool>()
            )
                .prop_map(|(c, x)| Tree::File(c, x)),
            proptest::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 1..30)
                .prop_map(Tree::Link),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            proptest::collection::btree_map(name(), inner, 0..6).prop_map(|m| {
                Tree::Dir(
                    m.into_iter()
                        .filter(|(k, _)| k != b"." && k != b"..")
                        .collect(),
                )
            })
        })
    }

    fn build(p: &Path, t: &Tree) {
        match t {
            Tree::File(c, x) => {
                fs::write(p, c).unwrap();
                let mode = if *x { 0o755 } else { 0o644 };
                fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
            }
            Tree::Link(t) => std::os::unix::fs::symlink(OsStr::from_bytes(t), p).unwrap(),
            Tree::Dir(es) => {
                fs::create_dir(p).unwrap();
                for (n, e) in es {
                    build(&p.join(OsStr::from_bytes(n)), e);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_trees_round_trip(t in tree()) {
            let d = tempfile::tempdir().unwrap();
            let src = d.path().join("src");
            build(&src, &t);
            let bytes = dump(&src);
            let dst = d.path().join("dst");
            let s = restore(&bytes[..], &dst).unwrap();
            prop_assert_eq!(s.nar_size, bytes.len() as u64);
            prop_assert_eq!(dump(&dst), bytes);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = validate(&b[..]);
            let mut with_magic = nar(&[b"nix-archive-1"]);
            with_magic.extend(&b);
            let _ = validate(&with_magic[..]);
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100))]

        #[test]
        fn mutated_nars_never_panic(
            t in tree(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let d = tempfile::tempdir().unwrap();
            let src = d.path().join("src");
            build(&src, &t);
            let mut b = dump(&src);
            for (i, v) in edits {
                let i = i.index(b.len());
                b[i] = v;
            }
            let _ = validate(&b[..]);
            let _ = validate(&b[..cut.index(b.len())]);
            let _ = restore(&b[..], &d.path().join("dst"));
        }
    }
}
