//! Hashes as Nix names and prints them.
//!
//! A [`Hash`](struct@Hash) is an algorithm ([`HashAlgo`]: md5, sha1, sha256, sha512) and its digest.
//! Nix prints digests in four encodings ([`Encoding`]): base 16, nix base 32
//! ([`crate::nixbase32`]), base 64, and SRI (`sha256-<base64>`). When parsing, the
//! encoding of a bare digest is recognised by its length, as Nix does.
//! [`HashSink`] hashes a stream incrementally and counts its bytes.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use sha2::Digest;
use thiserror::Error;

use crate::nixbase32;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// The digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// Nix's name for the algorithm (`sha256`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Hashes `data` in one go.
    pub fn digest(self, data: impl AsRef<[u8]>) -> Hash {
        let mut sink = HashSink::new(self);
        sink.update(data.as_ref());
        sink.finish().0
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(HashError::UnknownAlgo(s.to_owned())),
        }
    }
}

/// How a digest is written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    Base32,
    Base64,
    /// `<algo>-<base64>`, the Subresource Integrity form.
    Sri,
}

/// Why a string is not a hash.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}'")]
    UnknownAlgo(String),
    #[error("hash '{0}' does not include a type")]
    MissingAlgo(String),
    #[error("hash '{input}' has wrong length for hash type '{algo}'")]
    WrongLength { input: String, algo: HashAlgo },
    #[error("invalid base-16 hash '{0}'")]
    InvalidBase16(String),
    #[error("invalid base-32 hash '{0}'")]
    InvalidBase32(String),
    #[error("invalid base-64 hash '{0}'")]
    InvalidBase64(String),
    #[error("hash '{input}' should have type '{expected}'")]
    AlgoMismatch { input: String, expected: HashAlgo },
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    digest: Vec<u8>,
}

impl Hash {
    /// Wraps a digest; fails when its length does not fit `algo`.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.size() {
            return Err(HashError::WrongLength {
                input: HEXLOWER_PERMISSIVE.encode(digest),
                algo,
            });
        }
        Ok(Hash {
            algo,
            digest: digest.to_vec(),
        })
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// The digest alone in `encoding` (for [`Encoding::Sri`], with its algorithm).
    pub fn encode(&self, encoding: Encoding) -> String {
        match encoding {
            Encoding::Base16 => HEXLOWER_PERMISSIVE.encode(&self.digest),
            Encoding::Base32 => nixbase32::encode(&self.digest),
            Encoding::Base64 => BASE64.encode(&self.digest),
            Encoding::Sri => self.to_sri(),
        }
    }

    /// `<algo>:<digest>` in `encoding`, or the SRI form for [`Encoding::Sri`].
    pub fn to_typed_string(&self, encoding: Encoding) -> String {
        match encoding {
            Encoding::Sri => self.to_sri(),
            e => format!("{}:{}", self.algo, self.encode(e)),
        }
    }

    /// `sha256-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, BASE64.encode(&self.digest))
    }

    /// Parses a hash that names its algorithm: `algo:digest` (base 16, 32 or 64) or SRI.
    pub fn parse_any_prefixed(s: &str) -> Result<Hash, HashError> {
        Self::parse(s, None)
    }

    /// Parses a hash whose algorithm is given by the context when not in the string.
    pub fn parse_with_algo(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        Self::parse(s, Some(algo))
    }

    /// Parses `algo:digest`, `algo-base64` (SRI) or, when `algo` is given, a bare digest
    /// whose encoding is told by its length. A prefix that disagrees with `algo` fails.
    pub fn parse(s: &str, algo: Option<HashAlgo>) -> Result<Hash, HashError> {
        let (prefix, rest, sri) = if let Some((p, r)) = s.split_once(':') {
            (Some(p), r, false)
        } else if let Some((p, r)) = s.split_once('-') {
            (Some(p), r, true)
        } else {
            (None, s, false)
        };
        let algo = match (prefix, algo) {
            (Some(p), expected) => {
                let parsed: HashAlgo = p.parse()?;
                if let Some(e) = expected {
                    if e != parsed {
                        return Err(HashError::AlgoMismatch {
                            input: s.to_owned(),
                            expected: e,
                        });
                    }
                }
                parsed
            }
            (None, Some(a)) => a,
            (None, None) => return Err(HashError::MissingAlgo(s.to_owned())),
        };
        if sri {
            return Self::decode_base64(s, rest, algo);
        }
        Self::decode_bare(s, rest, algo)
    }

    fn decode_base64(input: &str, rest: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        let d = BASE64
            .decode(rest.as_bytes())
            .map_err(|_| HashError::InvalidBase64(input.to_owned()))?;
        Hash::new(algo, &d).map_err(|_| HashError::WrongLength {
            input: input.to_owned(),
            algo,
        })
    }

    fn decode_bare(input: &str, rest: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        let size = algo.size();
        let digest = if rest.len() == size * 2 {
            HEXLOWER_PERMISSIVE
                .decode(rest.as_bytes())
                .map_err(|_| HashError::InvalidBase16(input.to_owned()))?
        } else if rest.len() == nixbase32::encoded_len(size) {
            nixbase32::decode(rest).map_err(|_| HashError::InvalidBase32(input.to_owned()))?
        } else if rest.len() == BASE64.encode_len(size) {
            return Self::decode_base64(input, rest, algo);
        } else {
            return Err(HashError::WrongLength {
                input: input.to_owned(),
                algo,
            });
        };
        Ok(Hash { algo, digest })
    }
}

/// Prints `algo:base32`, the form Nix uses in narinfo files and `ca` fields.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_typed_string(Encoding::Base32))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_typed_string(Encoding::Base16))
    }
}

impl FromStr for Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Hash, HashError> {
        Hash::parse_any_prefixed(s)
    }
}

enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

/// Incremental hashing that also counts the bytes it has seen; an [`std::io::Write`].
pub struct HashSink {
    hasher: Hasher,
    len: u64,
}

impl HashSink {
    pub fn new(algo: HashAlgo) -> HashSink {
        let hasher = match algo {
            HashAlgo::Md5 => Hasher::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        };
        HashSink { hasher, len: 0 }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        match &mut self.hasher {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash and the number of bytes hashed.
    pub fn finish(self) -> (Hash, u64) {
        let (algo, digest) = match self.hasher {
            Hasher::Md5(h) => (HashAlgo::Md5, h.finalize().to_vec()),
            Hasher::Sha1(h) => (HashAlgo::Sha1, h.finalize().to_vec()),
            Hasher::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            Hasher::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
        };
        (Hash { algo, digest }, self.len)
    }
}

impl std::io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Nix's `compressHash`: folds a digest to `len` bytes by xor-ing byte `i` into `i % len`.
pub fn compress(digest: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, b) in digest.iter().enumerate() {
        out[i % len] ^= b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256_HEX: &str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_and_encodings() {
        let h = HashAlgo::Sha256.digest(b"");
        assert_eq!(h.encode(Encoding::Base16), EMPTY_SHA256_HEX);
        assert_eq!(
            h.to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn parse_every_form() {
        let h = HashAlgo::Sha256.digest(b"");
        for s in [
            format!("sha256:{EMPTY_SHA256_HEX}"),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".into(),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
        ] {
            assert_eq!(Hash::parse_any_prefixed(&s).unwrap(), h, "{s}");
        }
        assert_eq!(
            Hash::parse_with_algo(EMPTY_SHA256_HEX, HashAlgo::Sha256).unwrap(),
            h
        );
    }

    #[test]
    fn parse_errors_name_the_input() {
        assert_eq!(
            Hash::parse_any_prefixed("sha256:abc"),
            Err(HashError::WrongLength {
                input: "sha256:abc".into(),
                algo: HashAlgo::Sha256
            })
        );
        assert_eq!(
            Hash::parse_any_prefixed("abc"),
            Err(HashError::MissingAlgo("abc".into()))
        );
        assert_eq!(
            Hash::parse_any_prefixed("foo:abc"),
            Err(HashError::UnknownAlgo("foo".into()))
        );
        assert!(matches!(
            Hash::parse_with_algo(&format!("sha1:{EMPTY_SHA256_HEX}"), HashAlgo::Sha256),
            Err(HashError::AlgoMismatch { .. })
        ));
    }

    #[test]
    fn other_algos() {
        assert_eq!(
            HashAlgo::Md5.digest(b"").encode(Encoding::Base16),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(
            HashAlgo::Sha1.digest(b"").encode(Encoding::Base16),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        assert_eq!(HashAlgo::Sha512.digest(b"").digest().len(), 64);
    }

    #[test]
    fn compress_folds() {
        assert_eq!(compress(&[1, 2, 3, 4], 2), vec![1 ^ 3, 2 ^ 4]);
    }
}
