//! The ATerm form of derivations: the contents of `.drv` files.
//!
//! Grammar (no whitespace anywhere; `STR` is a double-quoted string):
//!
//! ```text
//! drv      = 'Derive(' '[' output,* ']' ',' '[' inputdrv,* ']' ',' '[' STR,* ']' ','
//!            STR(system) ',' STR(builder) ',' '[' STR,* ']' ',' '[' envpair,* ']' ')'
//! output   = '(' STR(name) ',' STR(path) ',' STR(hashAlgo) ',' STR(hash) ')'
//! inputdrv = '(' STR(drv path) ',' '[' STR(output name),* ']' ')'
//! envpair  = '(' STR(key) ',' STR(value) ')'
//! ```
//!
//! Nix 2.8 escapes only the builder, the arguments and the environment (keys and
//! values): `"` → `\"`, `\` → `\\`, newline → `\n`, carriage return → `\r`, tab →
//! `\t`; every other byte is written as is. All other strings (output names, paths,
//! hash fields, input derivation outputs, input sources, system) are written
//! *without* escaping. Printing here does exactly the same, so a `.drv` Nix wrote
//! round-trips byte for byte. (A system or output name containing `"` or `\` can
//! therefore not round-trip, in Nix either.)
//!
//! Parsing is stricter than Nix's: only the five escapes above are accepted, strings
//! must be UTF-8, outputs/input derivations/input sources/environment keys must be
//! strictly sorted (no duplicates), fixed-output hashes must be bare digests, nothing
//! may follow the closing `)`. Errors carry the byte offset.
//!
//! [`Derivation::to_aterm_bytes_modulo`] prints the form `hashDerivationModulo`
//! hashes: input derivation paths replaced by their hashes, optionally with the
//! output paths and output variables masked (empty).

use std::collections::{BTreeMap, BTreeSet};

use super::{Derivation, DerivationError, DerivationOutput};
use crate::content_address::{ContentAddress, ContentAddressMethod};
use crate::hash::{Encoding, Hash, HashAlgo};
use crate::store_path::{StoreDir, StorePath, StorePathSet};

/// A cursor over the input bytes.
struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

fn describe(b: Option<&u8>) -> String {
    match b {
        None => "end of input".into(),
        Some(c) if c.is_ascii_graphic() => format!("'{}'", *c as char),
        Some(c) => format!("byte 0x{c:02x}"),
    }
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn err_expected(&self, expected: &str) -> DerivationError {
        if self.pos >= self.input.len() {
            DerivationError::Truncated {
                offset: self.pos,
                expected: expected.to_owned(),
            }
        } else {
            DerivationError::Expected {
                offset: self.pos,
                expected: expected.to_owned(),
                found: describe(self.input.get(self.pos)),
            }
        }
    }

    /// Consumes the literal `lit`.
    fn expect(&mut self, lit: &str) -> Result<(), DerivationError> {
        for &b in lit.as_bytes() {
            if self.peek() != Some(b) {
                return Err(self.err_expected(&format!("'{lit}'")));
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// A quoted string with Nix's escapes.
    fn string(&mut self) -> Result<String, DerivationError> {
        if self.peek() != Some(b'"') {
            return Err(self.err_expected("'\"' (start of a string)"));
        }
        self.pos += 1;
        let start = self.pos;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => {
                    return Err(DerivationError::Truncated {
                        offset: self.pos,
                        expected: "'\"' (end of a string)".into(),
                    })
                }
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = match self.input.get(self.pos + 1) {
                        Some(b'"') => b'"',
                        Some(b'\\') => b'\\',
                        Some(b'n') => b'\n',
                        Some(b'r') => b'\r',
                        Some(b't') => b'\t',
                        None => {
                            return Err(DerivationError::Truncated {
                                offset: self.pos + 1,
                                expected: "an escaped character".into(),
                            })
                        }
                        Some(_) => {
                            let rest = &self.input[self.pos + 1..];
                            let len = utf8_len(rest[0]).min(rest.len());
                            return Err(DerivationError::BadEscape {
                                offset: self.pos,
                                found: String::from_utf8_lossy(&rest[..len]).into_owned(),
                            });
                        }
                    };
                    out.push(c);
                    self.pos += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| DerivationError::NotUtf8 { offset: start })
    }

    /// `[` elem (`,` elem)* `]`, or `[]`.
    fn list<T>(
        &mut self,
        what: &str,
        mut elem: impl FnMut(&mut Self) -> Result<T, DerivationError>,
    ) -> Result<Vec<T>, DerivationError> {
        self.expect("[")?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(elem(self)?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(items);
                }
                _ => return Err(self.err_expected(&format!("',' or ']' in the list of {what}"))),
            }
        }
    }

    /// A string that must be a store path in `store_dir`.
    fn store_path(&mut self, store_dir: &StoreDir) -> Result<StorePath, DerivationError> {
        let offset = self.pos;
        let s = self.string()?;
        parse_path(store_dir, &s, offset)
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

fn at(offset: usize) -> String {
    format!("ATerm, byte {offset}")
}

fn parse_path(store_dir: &StoreDir, s: &str, offset: usize) -> Result<StorePath, DerivationError> {
    store_dir
        .parse(s)
        .map_err(|source| DerivationError::InvalidStorePath {
            at: at(offset),
            path: s.to_owned(),
            source,
        })
}

/// Inserts into a sorted map, requiring strictly ascending keys.
fn insert_sorted<K: Ord + ToString, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    what: &'static str,
    offset: usize,
) -> Result<(), DerivationError> {
    if let Some((last, _)) = map.last_key_value() {
        if *last == key {
            return Err(DerivationError::DuplicateKey {
                at: at(offset),
                what,
                key: key.to_string(),
            });
        }
        if *last > key {
            return Err(DerivationError::Unsorted {
                at: at(offset),
                what,
                key: key.to_string(),
                previous: last.to_string(),
            });
        }
    }
    map.insert(key, value);
    Ok(())
}

fn set_sorted<T: Ord + ToString>(
    items: Vec<(usize, T)>,
    what: &'static str,
) -> Result<BTreeSet<T>, DerivationError> {
    let mut map = BTreeMap::new();
    for (offset, item) in items {
        insert_sorted(&mut map, item, (), what, offset)?;
    }
    Ok(map.into_keys().collect())
}

/// Builds an output from its three ATerm/JSON fields (Nix's `parseDerivationOutput`).
/// `at` locates the output in error messages; `missing_fixed_path` supplies the path
/// of a fixed output that has none (or fails).
pub fn output_from_fields(
    at: &str,
    name: &str,
    path: Option<StorePath>,
    hash_algo: &str,
    hash: &str,
    missing_fixed_path: impl FnOnce(&ContentAddress) -> Result<StorePath, DerivationError>,
) -> Result<DerivationOutput, DerivationError> {
    let invalid = |reason: String| DerivationError::InvalidOutput {
        at: at.to_owned(),
        output: name.to_owned(),
        reason,
    };
    if hash_algo.is_empty() {
        if !hash.is_empty() {
            return Err(invalid(format!("has hash '{hash}' but no hash algorithm")));
        }
        return Ok(match path {
            Some(path) => DerivationOutput::InputAddressed { path },
            None => DerivationOutput::Deferred,
        });
    }
    let (method, algo) = ContentAddressMethod::parse_with_algo(hash_algo)
        .map_err(|e| invalid(format!("bad hash algorithm '{hash_algo}': {e}")))?;
    if hash == "impure" || hash.is_empty() {
        if let Some(p) = path {
            return Err(invalid(format!(
                "is {} but has a path '{p}'",
                if hash.is_empty() {
                    "floating"
                } else {
                    "impure"
                }
            )));
        }
        return Ok(if hash.is_empty() {
            DerivationOutput::CAFloating { method, algo }
        } else {
            DerivationOutput::Impure { method, algo }
        });
    }
    if hash.contains(':') || hash.contains('-') {
        return Err(invalid(format!(
            "hash '{hash}' must be a bare digest without algorithm prefix"
        )));
    }
    let h = Hash::parse_with_algo(hash, algo)
        .map_err(|e| invalid(format!("bad hash '{hash}': {e}")))?;
    let ca = match method {
        ContentAddressMethod::Text if h.algo() != HashAlgo::Sha256 => {
            return Err(invalid(format!(
                "text hashing needs sha256, not '{}'",
                h.algo()
            )))
        }
        ContentAddressMethod::Text => ContentAddress::Text(h),
        ContentAddressMethod::Fixed(m) => ContentAddress::Fixed(m, h),
    };
    let path = match path {
        Some(p) => p,
        None => missing_fixed_path(&ca)?,
    };
    Ok(DerivationOutput::CAFixed { ca, path })
}

/// How input derivations are printed.
enum Inputs<'a> {
    /// As paths (the `.drv` file).
    Paths,
    /// As hashes modulo (`hashDerivationModulo`).
    Hashes(&'a BTreeMap<String, BTreeSet<String>>),
}

impl Derivation {
    /// Parses a `.drv` file's contents; the paths must be in `store_dir`.
    pub fn from_aterm_bytes(
        bytes: &[u8],
        store_dir: &StoreDir,
    ) -> Result<Derivation, DerivationError> {
        let mut p = Parser {
            input: bytes,
            pos: 0,
        };
        p.expect("Derive(")?;

        let mut outputs = BTreeMap::new();
        let outs = p.list("outputs", |p| {
            let offset = p.pos;
            p.expect("(")?;
            let name = p.string()?;
            p.expect(",")?;
            let path_off = p.pos;
            let path = p.string()?;
            p.expect(",")?;
            let hash_algo = p.string()?;
            p.expect(",")?;
            let hash = p.string()?;
            p.expect(")")?;
            let path = if path.is_empty() {
                None
            } else {
                Some(parse_path(store_dir, &path, path_off)?)
            };
            let out = output_from_fields(&at(offset), &name, path, &hash_algo, &hash, |_| {
                Err(DerivationError::InvalidOutput {
                    at: at(offset),
                    output: name.clone(),
                    reason: "is fixed-output but has no path".into(),
                })
            })?;
            Ok((offset, name, out))
        })?;
        for (offset, name, out) in outs {
            insert_sorted(&mut outputs, name, out, "outputs", offset)?;
        }

        p.expect(",")?;
        let mut input_drvs = BTreeMap::new();
        let ins = p.list("input derivations", |p| {
            let offset = p.pos;
            p.expect("(")?;
            let path = p.store_path(store_dir)?;
            p.expect(",")?;
            let names = p.list("output names", |p| Ok((p.pos, p.string()?)))?;
            p.expect(")")?;
            Ok((
                offset,
                path,
                set_sorted(names, "output names of an input derivation")?,
            ))
        })?;
        for (offset, path, names) in ins {
            insert_sorted(&mut input_drvs, path, names, "input derivations", offset)?;
        }

        p.expect(",")?;
        let srcs = p.list("input sources", |p| Ok((p.pos, p.store_path(store_dir)?)))?;
        let input_srcs: StorePathSet = set_sorted(srcs, "input sources")?;

        p.expect(",")?;
        let system = p.string()?;
        p.expect(",")?;
        let builder = p.string()?;
        p.expect(",")?;
        let args = p.list("arguments", |p| p.string())?;
        p.expect(",")?;
        let mut env = BTreeMap::new();
        let pairs = p.list("environment variables", |p| {
            let offset = p.pos;
            p.expect("(")?;
            let k = p.string()?;
            p.expect(",")?;
            let v = p.string()?;
            p.expect(")")?;
            Ok((offset, k, v))
        })?;
        for (offset, k, v) in pairs {
            insert_sorted(&mut env, k, v, "environment variables", offset)?;
        }
        p.expect(")")?;
        if p.pos != bytes.len() {
            return Err(DerivationError::TrailingGarbage {
                offset: p.pos,
                len: bytes.len() - p.pos,
            });
        }
        Ok(Derivation {
            outputs,
            input_drvs,
            input_srcs,
            system,
            builder,
            args,
            env,
        })
    }

    /// The `.drv` file contents, byte-identical to what Nix 2.8 writes.
    pub fn to_aterm_bytes(&self, store_dir: &StoreDir) -> Vec<u8> {
        self.print(store_dir, false, Inputs::Paths)
    }

    /// The form `hashDerivationModulo` hashes: input derivations given as
    /// `<base16 hash> → output names` (sorted by hash), and with `mask_outputs` the
    /// output paths and the environment variables named like outputs printed empty.
    pub fn to_aterm_bytes_modulo(
        &self,
        store_dir: &StoreDir,
        input_hashes: &BTreeMap<String, BTreeSet<String>>,
        mask_outputs: bool,
    ) -> Vec<u8> {
        self.print(store_dir, mask_outputs, Inputs::Hashes(input_hashes))
    }

    fn print(&self, store_dir: &StoreDir, mask: bool, inputs: Inputs<'_>) -> Vec<u8> {
        let mut s = Vec::with_capacity(1024);
        s.extend_from_slice(b"Derive([");
        for (i, (name, out)) in self.outputs.iter().enumerate() {
            if i > 0 {
                s.push(b',');
            }
            s.push(b'(');
            raw(&mut s, name);
            let path = match out.path() {
                Some(p) if !mask => store_dir.print(p),
                _ => String::new(),
            };
            let hash = match out {
                DerivationOutput::CAFixed { ca, .. } => ca.hash().encode(Encoding::Base16),
                DerivationOutput::Impure { .. } => "impure".into(),
                _ => String::new(),
            };
            for field in [path, out.hash_algo_field(), hash] {
                s.push(b',');
                raw(&mut s, &field);
            }
            s.push(b')');
        }
        s.extend_from_slice(b"],[");
        let mut first = true;
        let mut input = |s: &mut Vec<u8>, key: &str, names: &BTreeSet<String>| {
            if !std::mem::take(&mut first) {
                s.push(b',');
            }
            s.push(b'(');
            raw(s, key);
            s.push(b',');
            raw_list(s, names.iter().map(String::as_str));
            s.push(b')');
        };
        match inputs {
            Inputs::Paths => {
                for (p, names) in &self.input_drvs {
                    input(&mut s, &store_dir.print(p), names);
                }
            }
            Inputs::Hashes(h) => {
                for (k, names) in h {
                    input(&mut s, k, names);
                }
            }
        }
        s.extend_from_slice(b"],");
        let srcs: Vec<String> = self.input_srcs.iter().map(|p| store_dir.print(p)).collect();
        raw_list(&mut s, srcs.iter().map(String::as_str));
        s.push(b',');
        raw(&mut s, &self.system);
        s.push(b',');
        escaped(&mut s, &self.builder);
        s.extend_from_slice(b",[");
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                s.push(b',');
            }
            escaped(&mut s, a);
        }
        s.extend_from_slice(b"],[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            if i > 0 {
                s.push(b',');
            }
            s.push(b'(');
            escaped(&mut s, k);
            s.push(b',');
            let masked = mask && self.outputs.contains_key(k);
            escaped(&mut s, if masked { "" } else { v });
            s.push(b')');
        }
        s.extend_from_slice(b"])");
        s
    }
}

/// A string in quotes, not escaped (Nix's `printUnquotedString`).
fn raw(s: &mut Vec<u8>, v: &str) {
    s.push(b'"');
    s.extend_from_slice(v.as_bytes());
    s.push(b'"');
}

fn raw_list<'a>(s: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    s.push(b'[');
    for (i, v) in items.enumerate() {
        if i > 0 {
            s.push(b',');
        }
        raw(s, v);
    }
    s.push(b']');
}

/// A string in quotes with Nix's escapes (Nix's `printString`).
fn escaped(s: &mut Vec<u8>, v: &str) {
    s.push(b'"');
    for &b in v.as_bytes() {
        match b {
            b'"' => s.extend_from_slice(b"\\\""),
            b'\\' => s.extend_from_slice(b"\\\\"),
            b'\n' => s.extend_from_slice(b"\\n"),
            b'\r' => s.extend_from_slice(b"\\r"),
            b'\t' => s.extend_from_slice(b"\\t"),
            _ => s.push(b),
        }
    }
    s.push(b'"');
}
