//! Content addresses: how a store object's path follows from its contents.
//!
//! Nix 2.8 writes them in the `ca` column of `ValidPaths` and narinfo `CA:` fields as
//! `text:sha256:<base32>` (text objects: `.drv` files, `builtins.toFile`) or
//! `fixed:[r:]<algo>:<base32>` (fixed-output and floating content-addressed outputs,
//! added sources). Derivations name a *method* and algorithm without the digest:
//! `text:sha256`, `r:sha256`, `sha256` ([`ContentAddressMethod`]).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::hash::{Encoding, Hash, HashAlgo, HashError};

/// How a file system object is turned into bytes to hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileIngestionMethod {
    /// The contents of a single regular file.
    Flat,
    /// The NAR serialisation of the tree.
    Recursive,
}

impl FileIngestionMethod {
    /// `r:` for recursive, empty for flat.
    pub fn prefix(self) -> &'static str {
        match self {
            FileIngestionMethod::Flat => "",
            FileIngestionMethod::Recursive => "r:",
        }
    }
}

/// A content-addressing method without its digest, as derivations state it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentAddressMethod {
    Text,
    Fixed(FileIngestionMethod),
}

impl ContentAddressMethod {
    /// The prefix of a derivation's `hashAlgo` field: `text:`, `r:` or empty.
    pub fn prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Text => "text:",
            ContentAddressMethod::Fixed(m) => m.prefix(),
        }
    }

    /// Splits a derivation `hashAlgo` field (`r:sha256`) into method and algorithm.
    pub fn parse_with_algo(s: &str) -> Result<(ContentAddressMethod, HashAlgo), CaError> {
        let (method, algo) = if let Some(a) = s.strip_prefix("r:") {
            (
                ContentAddressMethod::Fixed(FileIngestionMethod::Recursive),
                a,
            )
        } else if let Some(a) = s.strip_prefix("text:") {
            (ContentAddressMethod::Text, a)
        } else {
            (ContentAddressMethod::Fixed(FileIngestionMethod::Flat), s)
        };
        let algo = algo
            .parse()
            .map_err(|e| CaError::BadHash(s.to_owned(), e))?;
        Ok((method, algo))
    }

    /// Prints the derivation `hashAlgo` field.
    pub fn print_with_algo(self, algo: HashAlgo) -> String {
        format!("{}{}", self.prefix(), algo)
    }
}

/// Why a string is not a content address.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CaError {
    #[error("content address '{0}' has an unknown prefix (expected 'text:' or 'fixed:')")]
    UnknownPrefix(String),
    #[error("content address '{0}': {1}")]
    BadHash(String, HashError),
    #[error("text content address '{0}' must use sha256")]
    TextNotSha256(String),
}

/// A content address with its digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentAddress {
    /// `text:sha256:…` — the sha256 of the file contents.
    Text(Hash),
    /// `fixed:[r:]algo:…`.
    Fixed(FileIngestionMethod, Hash),
}

impl ContentAddress {
    pub fn method(&self) -> ContentAddressMethod {
        match self {
            ContentAddress::Text(_) => ContentAddressMethod::Text,
            ContentAddress::Fixed(m, _) => ContentAddressMethod::Fixed(*m),
        }
    }

    pub fn hash(&self) -> &Hash {
        match self {
            ContentAddress::Text(h) | ContentAddress::Fixed(_, h) => h,
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{}", h.to_typed_string(Encoding::Base32)),
            ContentAddress::Fixed(m, h) => write!(
                f,
                "fixed:{}{}",
                m.prefix(),
                h.to_typed_string(Encoding::Base32)
            ),
        }
    }
}

impl FromStr for ContentAddress {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, CaError> {
        let bad = |e| CaError::BadHash(s.to_owned(), e);
        if let Some(rest) = s.strip_prefix("text:") {
            let h = Hash::parse_any_prefixed(rest).map_err(bad)?;
            if h.algo() != HashAlgo::Sha256 {
                return Err(CaError::TextNotSha256(s.to_owned()));
            }
            Ok(ContentAddress::Text(h))
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            let (m, rest) = match rest.strip_prefix("r:") {
                Some(r) => (FileIngestionMethod::Recursive, r),
                None => (FileIngestionMethod::Flat, rest),
            };
            Ok(ContentAddress::Fixed(
                m,
                Hash::parse_any_prefixed(rest).map_err(bad)?,
            ))
        } else {
            Err(CaError::UnknownPrefix(s.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in [
            "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            "fixed:sha1:1b8m03r63zqhnjf7l5wnldhh7c134ap5",
        ] {
            assert_eq!(s.parse::<ContentAddress>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            "foo:sha256:abc".parse::<ContentAddress>(),
            Err(CaError::UnknownPrefix(_))
        ));
        assert!(matches!(
            "text:sha1:1b8m03r63zqhnjf7l5wnldhh7c134ap5".parse::<ContentAddress>(),
            Err(CaError::TextNotSha256(_))
        ));
    }

    #[test]
    fn method_fields() {
        assert_eq!(
            ContentAddressMethod::parse_with_algo("r:sha256").unwrap(),
            (
                ContentAddressMethod::Fixed(FileIngestionMethod::Recursive),
                HashAlgo::Sha256
            )
        );
        assert_eq!(
            ContentAddressMethod::Text.print_with_algo(HashAlgo::Sha256),
            "text:sha256"
        );
    }
}
