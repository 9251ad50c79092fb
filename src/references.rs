//! Finding and rewriting references to store paths in byte streams.
//!
//! Nix discovers the runtime references of a build output by scanning the NAR
//! serialisation of the output for the 32-character hash parts of candidate store
//! paths (`scanForReferences` in libstore `references.cc`): any occurrence of a
//! candidate's hash part anywhere in the NAR (file contents, symlink targets, even
//! entry names) is a reference. A hash part is nix base 32, so the scan looks at
//! 32-byte windows made only of base-32 characters, and skips past any other byte
//! (checking a window from its end, a non-base-32 byte at offset `j` rules out every
//! window starting at or before it).
//!
//! * [`RefScanSink`] is that scan as an [`io::Write`] sink, fed chunk by chunk;
//!   occurrences spanning chunk boundaries are found.
//! * [`scan_path`] dumps a tree as a NAR into the scanner and a [`HashSink`] at once,
//!   giving references, NAR hash and NAR size in one pass.
//! * [`HashRewriter`] is an [`io::Write`] adapter that replaces hash parts by others of
//!   the same length (Nix's `RewritingSink`, generalised to several rewrites at once)
//!   and records where it replaced; [`rewrite_path`] copies a tree through it
//!   (dump, rewrite, restore, streaming); [`HashModuloSink`] uses it to hash a stream modulo
//!   a hash part (self-references), as Nix does for floating content-addressed outputs.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

use thiserror::Error;

use crate::content_address::FileIngestionMethod;
use crate::hash::{Hash, HashAlgo, HashSink};
use crate::nar::{dump_path, restore, NarReadError, NarSummary, NarWriteError};
use crate::nixbase32;
use crate::store_path::{StorePath, StorePathSet, HASH_PART_LEN};

const REF_LEN: usize = HASH_PART_LEN;
/// How many trailing bytes may start an occurrence completed by the next chunk.
const CARRY: usize = REF_LEN - 1;

/// Why a rewrite could not be set up or done.
#[derive(Debug, Error)]
pub enum ReferencesError {
    #[error("'{0}' is not a 32-character nix base-32 hash part")]
    BadHashPart(String),
    #[error("replacement '{0}' for a hash part is not 32 bytes long")]
    BadReplacement(String),
    #[error(transparent)]
    Dump(#[from] NarWriteError),
    #[error(transparent)]
    Restore(#[from] NarReadError),
    #[error("{context} '{path}': {source}")]
    Io {
        context: &'static str,
        path: std::path::PathBuf,
        source: io::Error,
    },
}

/// Digit value + 1 of each byte in nix base 32, 0 for other bytes.
const DIGIT: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 32 {
        t[nixbase32::ALPHABET[i] as usize] = i as u8 + 1;
        i += 1;
    }
    t
};

#[inline]
fn is_b32(b: u8) -> bool {
    DIGIT[b as usize] != 0
}

/// Walks the starts of all 32-byte windows of `s` (from `start`) made only of base-32
/// bytes, in order. `f(i)` returns where the next window may start (`> i`). Returns
/// the first start not yet ruled out: no window starting before it remains.
fn windows(s: &[u8], start: usize, mut f: impl FnMut(usize) -> usize) -> usize {
    let mut i = start;
    // s[i..good] is known to be base 32.
    let mut good = i;
    while i + REF_LEN <= s.len() {
        let mut j = i + REF_LEN;
        let mut bad = None;
        while j > good {
            j -= 1;
            if !is_b32(s[j]) {
                bad = Some(j);
                break;
            }
        }
        if let Some(b) = bad {
            i = b + 1;
            good = i;
            continue;
        }
        good = i + REF_LEN;
        i = f(i);
        good = good.max(i);
    }
    i
}

fn hash_part_key(s: &[u8]) -> Result<[u8; REF_LEN], ReferencesError> {
    let bad = || ReferencesError::BadHashPart(String::from_utf8_lossy(s).into_owned());
    let key: [u8; REF_LEN] = s.try_into().map_err(|_| bad())?;
    if !key.iter().all(|&b| is_b32(b)) {
        return Err(bad());
    }
    Ok(key)
}

/// Index of the first two characters of a window in the prefilter bitmap.
#[inline]
fn prefix_index(w: &[u8]) -> usize {
    ((DIGIT[w[0] as usize] as usize - 1) << 5) | (DIGIT[w[1] as usize] as usize - 1)
}

/// Scans a byte stream for the hash parts of candidate store paths (Nix's
/// `RefScanSink`). Feed it with [`Write`]; [`RefScanSink::found`] or
/// [`RefScanSink::into_references`] tell what occurred.
pub struct RefScanSink {
    /// Candidates not found yet, by hash part.
    pending: HashMap<[u8; REF_LEN], Vec<StorePath>>,
    /// Bit `i` set when some candidate starts with the two characters of index `i`.
    prefilter: [u64; 16],
    found: StorePathSet,
    /// The trailing base-32 bytes of the stream so far (at most 31).
    carry: Vec<u8>,
}

impl RefScanSink {
    /// A scanner for the hash parts of `candidates`.
    pub fn new<'a>(candidates: impl IntoIterator<Item = &'a StorePath>) -> RefScanSink {
        let mut pending: HashMap<[u8; REF_LEN], Vec<StorePath>> = HashMap::new();
        let mut prefilter = [0u64; 16];
        for p in candidates {
            // A StorePath's hash part is always 32 base-32 characters.
            if let Ok(key) = hash_part_key(p.hash_part().as_bytes()) {
                let idx = prefix_index(&key);
                prefilter[idx / 64] |= 1 << (idx % 64);
                pending.entry(key).or_default().push(p.clone());
            }
        }
        RefScanSink {
            pending,
            prefilter,
            found: StorePathSet::new(),
            carry: Vec::with_capacity(2 * CARRY),
        }
    }

    /// The candidates found so far.
    pub fn found(&self) -> &StorePathSet {
        &self.found
    }

    /// The candidates found in everything written.
    pub fn into_references(self) -> StorePathSet {
        self.found
    }

    fn search(&mut self, s: &[u8]) {
        if self.pending.is_empty() {
            return;
        }
        let (pending, prefilter, found) = (&mut self.pending, &self.prefilter, &mut self.found);
        windows(s, 0, |i| {
            let w = &s[i..i + REF_LEN];
            let idx = prefix_index(w);
            if prefilter[idx / 64] & (1 << (idx % 64)) != 0 {
                if let Ok(key) = <[u8; REF_LEN]>::try_from(w) {
                    if let Some(paths) = pending.remove(&key) {
                        log::debug!("found reference to '{}'", String::from_utf8_lossy(&key));
                        found.extend(paths);
                    }
                }
            }
            i + 1
        });
    }

    fn scan(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if !self.carry.is_empty() {
            // Occurrences spanning the boundary lie in carry + the leading base-32 run.
            let lead = data.iter().take(CARRY).take_while(|&&b| is_b32(b)).count();
            let mut joint = [0u8; 2 * CARRY];
            let c = self.carry.len();
            joint[..c].copy_from_slice(&self.carry);
            joint[c..c + lead].copy_from_slice(&data[..lead]);
            self.search(&joint[..c + lead]);
        }
        self.search(data);
        let trail = data
            .iter()
            .rev()
            .take(CARRY)
            .take_while(|&&b| is_b32(b))
            .count();
        if trail == data.len() {
            // The whole chunk is base 32 and short: it extends the carry.
            self.carry.extend_from_slice(data);
            let excess = self.carry.len().saturating_sub(CARRY);
            self.carry.drain(..excess);
        } else {
            self.carry.clear();
            self.carry.extend_from_slice(&data[data.len() - trail..]);
        }
    }
}

impl Write for RefScanSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`scan_path`] finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    /// The candidates whose hash part occurs in the NAR.
    pub references: StorePathSet,
    /// sha256 of the NAR.
    pub nar_hash: Hash,
    pub nar_size: u64,
}

/// Writes to two sinks.
struct Tee<'a, A, B>(&'a mut A, &'a mut B);

impl<A: Write, B: Write> Write for Tee<'_, A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// Nix's `scanForReferences`: which of `candidates` the tree at `path` refers to, with
/// its NAR hash and size, in one pass over the tree.
pub fn scan_path(path: &Path, candidates: &StorePathSet) -> Result<ScanResult, NarWriteError> {
    scan_path_tee(path, candidates, &mut io::sink())
}

/// [`scan_path`] that also writes the NAR to `tee` (e.g. to a file or a compressor).
pub fn scan_path_tee(
    path: &Path,
    candidates: &StorePathSet,
    tee: &mut impl Write,
) -> Result<ScanResult, NarWriteError> {
    let mut scanner = RefScanSink::new(candidates);
    let mut hash = HashSink::new(HashAlgo::Sha256);
    {
        let mut both = Tee(&mut scanner, &mut hash);
        let mut all = Tee(&mut both, tee);
        dump_path(path, &mut all)?;
    }
    let (nar_hash, nar_size) = hash.finish();
    Ok(ScanResult {
        references: scanner.into_references(),
        nar_hash,
        nar_size,
    })
}

/// Replaces hash parts by other 32-byte strings in a stream written through it, also
/// across chunk boundaries (Nix's `RewritingSink`, for several rewrites at once).
///
/// Occurrences are replaced left to right without overlapping; a replaced region is
/// not searched again. Up to 31 bytes are held back between writes (they may start an
/// occurrence): call [`HashRewriter::finish`] to write them out.
pub struct HashRewriter<W: Write> {
    inner: W,
    rewrites: HashMap<[u8; REF_LEN], [u8; REF_LEN]>,
    /// Bytes not yet written to `inner`; windows start no earlier than `scan_from`.
    pending: Vec<u8>,
    scan_from: usize,
    /// Stream offset of `pending[0]`.
    pos: u64,
    matches: Vec<u64>,
}

impl<W: Write> HashRewriter<W> {
    /// Rewrites every `from` (32 nix base-32 characters) into its `to` (32 bytes).
    pub fn new<A: AsRef<[u8]>, B: AsRef<[u8]>>(
        inner: W,
        rewrites: impl IntoIterator<Item = (A, B)>,
    ) -> Result<HashRewriter<W>, ReferencesError> {
        let mut map = HashMap::new();
        for (from, to) in rewrites {
            let from = hash_part_key(from.as_ref())?;
            let to: [u8; REF_LEN] = to.as_ref().try_into().map_err(|_| {
                ReferencesError::BadReplacement(String::from_utf8_lossy(to.as_ref()).into())
            })?;
            if from != to {
                map.insert(from, to);
            }
        }
        Ok(HashRewriter {
            inner,
            rewrites: map,
            pending: Vec::new(),
            scan_from: 0,
            pos: 0,
            matches: Vec::new(),
        })
    }

    /// Stream offsets (in the input, equal to the output's) of the replacements so far.
    pub fn matches(&self) -> &[u64] {
        &self.matches
    }

    /// Bytes accepted so far.
    pub fn position(&self) -> u64 {
        self.pos + self.pending.len() as u64
    }

    /// Writes out the held-back bytes; returns the inner writer and the offsets of
    /// every replacement.
    pub fn finish(mut self) -> io::Result<(W, Vec<u64>)> {
        self.inner.write_all(&self.pending)?;
        self.pos += self.pending.len() as u64;
        self.pending.clear();
        Ok((self.inner, self.matches))
    }
}

impl<W: Write> Write for HashRewriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.rewrites.is_empty() {
            self.inner.write_all(buf)?;
            self.pos += buf.len() as u64;
            return Ok(buf.len());
        }
        self.pending.extend_from_slice(buf);
        let mut found: Vec<(usize, [u8; REF_LEN])> = Vec::new();
        let rewrites = &self.rewrites;
        let pending = &self.pending;
        let next = windows(
            pending,
            self.scan_from,
            |i| match <[u8; REF_LEN]>::try_from(&pending[i..i + REF_LEN])
                .ok()
                .and_then(|k| rewrites.get(&k))
            {
                Some(to) => {
                    found.push((i, *to));
                    i + REF_LEN
                }
                None => i + 1,
            },
        );
        for (i, to) in found {
            self.pending[i..i + REF_LEN].copy_from_slice(&to);
            self.matches.push(self.pos + i as u64);
        }
        // No occurrence can start before `next` any more: write those bytes out.
        let emit = next.min(self.pending.len());
        self.inner.write_all(&self.pending[..emit])?;
        self.pending.drain(..emit);
        self.pos += emit as u64;
        self.scan_from = next - emit;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sends written bytes to a [`PipeReader`] on another thread.
struct PipeWriter(std::sync::mpsc::SyncSender<Vec<u8>>);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "NAR reader went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct PipeReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl io::Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // the writer is done (or failed)
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Copies the tree at `src` to `dst` (which must not exist yet) with hash parts
/// rewritten as by [`HashRewriter`], streaming the NAR between a dumping thread and
/// the restorer (Nix's dump, `RewritingSink`, `restorePath`). Returns the NAR hash and
/// size of the rewritten tree and the offsets of the replacements in its NAR.
/// Permissions are those of a restore (see [`mod@crate::nar::restore`]).
pub fn rewrite_path<A: AsRef<[u8]>, B: AsRef<[u8]>>(
    src: &Path,
    dst: &Path,
    rewrites: impl IntoIterator<Item = (A, B)>,
) -> Result<(NarSummary, Vec<u64>), ReferencesError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let rewriter = HashRewriter::new(
        io::BufWriter::with_capacity(64 * 1024, PipeWriter(tx)),
        rewrites,
    )?;
    std::thread::scope(|scope| {
        let dumper = scope.spawn(move || -> Result<Vec<u64>, NarWriteError> {
            let mut rewriter = rewriter;
            dump_path(src, &mut rewriter)?;
            let (mut w, matches) = rewriter.finish()?;
            w.flush()?;
            Ok(matches)
        });
        let restored = restore(
            PipeReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
            },
            dst,
        );
        // The dumper ends: it finished, failed, or found the reader gone.
        let dumped = dumper
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        match (dumped, restored) {
            (Ok(matches), Ok(summary)) => Ok((summary, matches)),
            // The dumper stopped because the restorer gave up: report the latter.
            (Err(NarWriteError::Write(e) | NarWriteError::Read { source: e, .. }), Err(r))
                if e.kind() == io::ErrorKind::BrokenPipe =>
            {
                Err(r.into())
            }
            (Err(d), _) => Err(d.into()),
            (Ok(_), Err(r)) => Err(r.into()),
        }
    })
}

/// Hashes a stream modulo a hash part (Nix's `HashModuloSink`): every occurrence of
/// `modulus` is hashed as 32 zero bytes, and then the decimal offset of each
/// occurrence is hashed as `|<offset>`, so that a stream with self-references and one
/// with them already zeroed do not collide. Used to compute the content address of
/// a floating content-addressed output that refers to its own (temporary) path.
pub struct HashModuloSink {
    rewriter: HashRewriter<HashSink>,
}

impl HashModuloSink {
    /// `modulus` is the hash part to hash modulo (32 nix base-32 characters).
    pub fn new(algo: HashAlgo, modulus: &str) -> Result<HashModuloSink, ReferencesError> {
        Ok(HashModuloSink {
            rewriter: HashRewriter::new(HashSink::new(algo), [(modulus, [0u8; REF_LEN])])?,
        })
    }

    /// The hash, and the number of bytes written (not counting the offsets).
    pub fn finish(self) -> (Hash, u64) {
        let size = self.rewriter.position();
        let HashRewriter {
            inner: mut sink,
            pending,
            matches,
            ..
        } = self.rewriter;
        sink.update(&pending);
        for m in matches {
            sink.update(format!("|{m}").as_bytes());
        }
        (sink.finish().0, size)
    }
}

/// Nix's `hashCAPath`: the contents of `path` (its NAR for `Recursive`, the file
/// itself for `Flat`) hashed with `algo` modulo the hash part `modulus`, as a
/// `fixed:` content address of a path that may refer to itself is computed.
pub fn hash_path_modulo(
    path: &Path,
    method: FileIngestionMethod,
    algo: HashAlgo,
    modulus: &str,
) -> Result<Hash, ReferencesError> {
    let io = |context: &'static str| {
        move |source| ReferencesError::Io {
            context,
            path: path.to_owned(),
            source,
        }
    };
    let mut sink = HashModuloSink::new(algo, modulus)?;
    match method {
        FileIngestionMethod::Recursive => dump_path(path, &mut sink)?,
        FileIngestionMethod::Flat => {
            let mut f = std::fs::File::open(path).map_err(io("opening"))?;
            io::copy(&mut f, &mut sink).map_err(io("reading"))?;
        }
    }
    Ok(sink.finish().0)
}

impl Write for HashModuloSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.rewriter.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    const H1: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la";
    const H2: &str = "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0";
    const H3: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";

    fn sp(h: &str, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{h}-{name}")).unwrap()
    }

    fn candidates() -> StorePathSet {
        [sp(H1, "a"), sp(H2, "b"), sp(H3, "c")]
            .into_iter()
            .collect()
    }

    /// Every 32-byte window compared with every candidate.
    fn naive_scan(data: &[u8], cands: &StorePathSet) -> StorePathSet {
        cands
            .iter()
            .filter(|p| data.windows(REF_LEN).any(|w| w == p.hash_part().as_bytes()))
            .cloned()
            .collect()
    }

    fn scan_chunks(data: &[u8], cuts: &[usize], cands: &StorePathSet) -> StorePathSet {
        let mut s = RefScanSink::new(cands);
        let mut last = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort();
        for c in cuts {
            s.write_all(&data[last..c.max(last)]).unwrap();
            last = c.max(last);
        }
        s.write_all(&data[last..]).unwrap();
        s.into_references()
    }

    #[test]
    fn finds_references_in_any_context() {
        let data = format!("xx/nix/store/{H1}-a/bin\0 and {H2}-b but not {}", &H3[1..]);
        let found = scan_chunks(data.as_bytes(), &[], &candidates());
        assert_eq!(found, [sp(H1, "a"), sp(H2, "b")].into_iter().collect());
        // Inside a longer base-32 run, too (Nix does not require word boundaries).
        let data = format!("abc{H3}xyz");
        assert_eq!(
            scan_chunks(data.as_bytes(), &[], &candidates()),
            [sp(H3, "c")].into_iter().collect()
        );
    }

    #[test]
    fn byte_by_byte_feeding() {
        let data = format!("..{H1}{H2}.{H3}");
        let cuts: Vec<usize> = (0..data.len()).collect();
        assert_eq!(
            scan_chunks(data.as_bytes(), &cuts, &candidates()),
            candidates()
        );
    }

    #[test]
    fn scan_path_gives_refs_hash_and_size() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("t")).unwrap();
        fs::write(d.path().join("t/f"), format!("ref {H2}")).unwrap();
        std::os::unix::fs::symlink(format!("/nix/store/{H1}-a"), d.path().join("t/l")).unwrap();
        let r = scan_path(&d.path().join("t"), &candidates()).unwrap();
        assert_eq!(
            r.references,
            [sp(H1, "a"), sp(H2, "b")].into_iter().collect()
        );
        let (h, n) = crate::nar::nar_hash_of_path(&d.path().join("t")).unwrap();
        assert_eq!((r.nar_hash, r.nar_size), (h, n));
        let mut tee = Vec::new();
        scan_path_tee(&d.path().join("t"), &candidates(), &mut tee).unwrap();
        assert_eq!(tee.len() as u64, n);
    }

    fn rewrite_chunks(data: &[u8], cuts: &[usize], rw: &[(&str, &str)]) -> (Vec<u8>, Vec<u64>) {
        let mut w = HashRewriter::new(Vec::new(), rw.iter().copied()).unwrap();
        let mut last = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort();
        for c in cuts {
            w.write_all(&data[last..c.max(last)]).unwrap();
            last = c.max(last);
        }
        w.write_all(&data[last..]).unwrap();
        assert_eq!(w.position(), data.len() as u64);
        w.finish().unwrap()
    }

    /// Left-to-right, non-overlapping replacement on the whole input.
    fn naive_rewrite(data: &[u8], rw: &[(&str, &str)]) -> (Vec<u8>, Vec<u64>) {
        let mut out = data.to_vec();
        let mut matches = Vec::new();
        let mut i = 0;
        while i + REF_LEN <= out.len() {
            if let Some((_, to)) = rw
                .iter()
                .find(|(f, _)| &out[i..i + REF_LEN] == f.as_bytes())
            {
                out[i..i + REF_LEN].copy_from_slice(to.as_bytes());
                matches.push(i as u64);
                i += REF_LEN;
            } else {
                i += 1;
            }
        }
        (out, matches)
    }

    #[test]
    fn rewrites_across_chunks() {
        let data = format!("a{H1}/{H1}{H2}-x");
        let rw = [(H1, H3), (H2, H1)];
        let want = format!("a{H3}/{H3}{H1}-x");
        for cuts in [
            vec![],
            vec![5],
            vec![1, 20, 33, 34, 60],
            (0..data.len()).collect(),
        ] {
            let (out, m) = rewrite_chunks(data.as_bytes(), &cuts, &rw);
            assert_eq!(String::from_utf8(out).unwrap(), want, "{cuts:?}");
            assert_eq!(m, vec![1, 34, 66]);
        }
    }

    #[test]
    fn rewriter_refuses_bad_hash_parts() {
        assert!(matches!(
            HashRewriter::new(Vec::new(), [("short", H1)]),
            Err(ReferencesError::BadHashPart(_))
        ));
        assert!(matches!(
            HashRewriter::new(Vec::new(), [("e".repeat(32), H1.to_owned())]),
            Err(ReferencesError::BadHashPart(_))
        ));
        assert!(matches!(
            HashRewriter::new(Vec::new(), [(H1, "x")]),
            Err(ReferencesError::BadReplacement(_))
        ));
    }

    #[test]
    fn rewrite_path_copies_with_rewrites() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        let big = format!("{}{H1}", "z".repeat(100_000)).repeat(5);
        fs::write(src.join("big"), &big).unwrap();
        std::os::unix::fs::symlink(format!("/store/{H1}-a"), src.join("l")).unwrap();
        let dst = d.path().join("dst");
        let (summary, matches) = rewrite_path(&src, &dst, [(H1, H2)]).unwrap();
        assert_eq!(matches.len(), 6);
        assert_eq!(
            fs::read(dst.join("big")).unwrap(),
            big.replace(H1, H2).as_bytes()
        );
        assert_eq!(
            fs::read_link(dst.join("l")).unwrap(),
            Path::new(&format!("/store/{H2}-a"))
        );
        let (h, n) = crate::nar::nar_hash_of_path(&dst).unwrap();
        assert_eq!((summary.nar_hash, summary.nar_size), (h, n));
        // Errors on either side are reported, not hung on.
        assert!(matches!(
            rewrite_path(&src, &dst, [(H1, H2)]),
            Err(ReferencesError::Restore(_))
        ));
        assert!(matches!(
            rewrite_path(&d.path().join("missing"), &d.path().join("x"), [(H1, H2)]),
            Err(ReferencesError::Dump(_))
        ));
    }

    #[test]
    fn hash_modulo_zeroes_and_appends_positions() {
        let data = format!("xx{H1}yy{H1}");
        let mut s = HashModuloSink::new(HashAlgo::Sha256, H1).unwrap();
        s.write_all(data.as_bytes()).unwrap();
        let (h, n) = s.finish();
        let mut expected = b"xx".to_vec();
        expected.extend([0u8; 32]);
        expected.extend(b"yy");
        expected.extend([0u8; 32]);
        expected.extend(b"|2|36");
        assert_eq!(h, HashAlgo::Sha256.digest(&expected));
        assert_eq!(n, data.len() as u64);
        // The same stream with another modulus occurrence hashes the same.
        let mut t = HashModuloSink::new(HashAlgo::Sha256, H2).unwrap();
        t.write_all(format!("xx{H2}yy{H2}").as_bytes()).unwrap();
        assert_eq!(t.finish().0, h);
    }

    /// Bytes biased towards base-32 runs and candidate hash parts.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(H1.as_bytes().to_vec()),
            Just(H2.as_bytes().to_vec()),
            Just(H3.as_bytes()[..20].to_vec()),
            Just(H3.as_bytes()[12..].to_vec()),
            proptest::collection::vec(
                proptest::sample::select(&b"0123456789abcdfgz-/\0e"[..]),
                0..40
            ),
            proptest::collection::vec(any::<u8>(), 0..10),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn chunked_scan_equals_naive(data in stream(), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let c = candidates();
            prop_assert_eq!(scan_chunks(&data, &cuts, &c), naive_scan(&data, &c));
        }

        #[test]
        fn chunked_rewrite_equals_naive(data in stream(), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let rw = [(H1, H2), (H2, H3), (H3, H1)];
            prop_assert_eq!(rewrite_chunks(&data, &cuts, &rw), naive_rewrite(&data, &rw));
        }
    }
}
