//! `.narinfo` files: what a binary cache says about one store path.
//!
//! A narinfo is a list of `Name: value` lines, each ending in `\n` (the last one too;
//! a bare `Name:` is read as an empty value). Nix 2.8 reads:
//!
//! | field | value |
//! |---|---|
//! | `StorePath` | full store path (required) |
//! | `URL` | where the (compressed) NAR is, relative to the cache (required, non-empty) |
//! | `Compression` | `xz`, `zstd`, `bzip2`, `br`, `gzip`, `none`; `bzip2` when absent or empty |
//! | `FileHash`, `FileSize` | hash and size of the compressed file |
//! | `NarHash` | hash of the NAR, any algorithm/encoding `Hash` accepts (required) |
//! | `NarSize` | size of the NAR (required, not 0) |
//! | `References` | space-separated base names (may include the path itself); may appear twice only if the first is empty |
//! | `Deriver` | base name of the deriver, `unknown-deriver` meaning none |
//! | `System` | the deriver's system |
//! | `Sig` | `<key name>:<base64>`; repeatable, kept as a sorted set |
//! | `CA` | content address (`fixed:r:sha256:…`); may appear once, empty means none |
//!
//! Unknown fields are ignored; for other repeated fields the last one wins. Nix
//! prints the fields in the order of the table (`Compression` always, hashes as
//! `sha256:<base32>`, `References: ` even when empty, `Sig` lines sorted), so a narinfo
//! written by `nix copy` prints back byte-identically. Unlike Nix, a narinfo without
//! `FileHash`/`FileSize` prints without them instead of failing.
//!
//! Signatures sign the [fingerprint](fingerprint_path)
//! `1;<store path>;<NarHash as sha256:base32>;<NarSize>;<full reference paths, comma-separated>`.
//! A path whose `CA` field really gives its store path needs no signature.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::content_address::{CaError, ContentAddress};
use crate::hash::{Encoding, Hash, HashError};
use crate::signature::{PublicKeys, SecretKey, SignatureError};
use crate::store_path::{StoreDir, StorePath, StorePathError, StorePathSet};

/// What [`NarInfo::check_signatures`] returns for a content-addressed path, as Nix's
/// `ValidPathInfo::maxSigs`: it needs no signature.
pub const MAX_SIGS: usize = usize::MAX;

/// Why a narinfo cannot be read or signed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo line {line} is not of the form 'Name: value': '{text}'")]
    MalformedLine { line: usize, text: String },
    #[error("narinfo line {line} does not end with a newline: '{text}'")]
    MissingNewline { line: usize, text: String },
    #[error("narinfo field '{field}' has an invalid store path '{value}': {source}")]
    BadStorePath {
        field: &'static str,
        value: String,
        source: StorePathError,
    },
    #[error("narinfo field '{field}' has an invalid hash '{value}': {source}")]
    BadHash {
        field: &'static str,
        value: String,
        source: HashError,
    },
    #[error("narinfo field '{field}' has an invalid number '{value}'")]
    BadNumber { field: &'static str, value: String },
    #[error("narinfo field 'CA' has an invalid content address '{value}': {source}")]
    BadCa { value: String, source: CaError },
    #[error("narinfo field '{field}' appears twice (line {line})")]
    DuplicateField { field: &'static str, line: usize },
    #[error("narinfo field '{0}' is missing")]
    MissingField(&'static str),
    #[error("narinfo field 'URL' is empty")]
    EmptyUrl,
    #[error("narinfo field 'NarSize' is 0")]
    ZeroNarSize,
    #[error("cannot calculate fingerprint of path '{0}' because its size is not known")]
    UnknownNarSize(String),
    #[error("signature of path '{path}': {source}")]
    Signature {
        path: String,
        source: SignatureError,
    },
}

/// A parsed narinfo file (Nix's `NarInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    pub url: String,
    /// `bzip2` when the file does not say.
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: StorePathSet,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    /// `Sig` lines, unverified.
    pub signatures: BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

fn parse_base_name(field: &'static str, value: &str) -> Result<StorePath, NarInfoError> {
    StorePath::from_base_name(value).map_err(|source| NarInfoError::BadStorePath {
        field,
        value: value.to_owned(),
        source,
    })
}

fn parse_hash(field: &'static str, value: &str) -> Result<Hash, NarInfoError> {
    Hash::parse_any_prefixed(value).map_err(|source| NarInfoError::BadHash {
        field,
        value: value.to_owned(),
        source,
    })
}

fn parse_number(field: &'static str, value: &str) -> Result<u64, NarInfoError> {
    let bad = || NarInfoError::BadNumber {
        field,
        value: value.to_owned(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

impl NarInfo {
    /// Parses narinfo text whose `StorePath` lies in `store_dir`.
    pub fn parse(s: &str, store_dir: &StoreDir) -> Result<NarInfo, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = StorePathSet::new();
        let mut deriver = None;
        let mut system = None;
        let mut signatures = BTreeSet::new();
        let mut ca = None;

        let mut rest = s;
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let Some((line, next)) = rest.split_once('\n') else {
                return Err(NarInfoError::MissingNewline {
                    line: line_no,
                    text: rest.to_owned(),
                });
            };
            rest = next;
            let malformed = || NarInfoError::MalformedLine {
                line: line_no,
                text: line.to_owned(),
            };
            let (name, value) = line.split_once(':').ok_or_else(malformed)?;
            let value = match value.strip_prefix(' ') {
                Some(v) => v,
                None if value.is_empty() => value,
                None => return Err(malformed()),
            };
            match name {
                "StorePath" => {
                    store_path = Some(store_dir.parse(value).map_err(|source| {
                        NarInfoError::BadStorePath {
                            field: "StorePath",
                            value: value.to_owned(),
                            source,
                        }
                    })?)
                }
                "URL" => url = Some(value.to_owned()),
                "Compression" => compression = Some(value.to_owned()),
                "FileHash" => file_hash = Some(parse_hash("FileHash", value)?),
                "FileSize" => file_size = Some(parse_number("FileSize", value)?),
                "NarHash" => nar_hash = Some(parse_hash("NarHash", value)?),
                "NarSize" => nar_size = Some(parse_number("NarSize", value)?),
                "References" => {
                    if !references.is_empty() {
                        return Err(NarInfoError::DuplicateField {
                            field: "References",
                            line: line_no,
                        });
                    }
                    for r in value.split(' ').filter(|r| !r.is_empty()) {
                        references.insert(parse_base_name("References", r)?);
                    }
                }
                // `unknown-deriver` leaves an earlier Deriver in place, as in Nix.
                "Deriver" if value == "unknown-deriver" => {}
                "Deriver" => deriver = Some(parse_base_name("Deriver", value)?),
                "System" => system = Some(value.to_owned()),
                "Sig" => {
                    signatures.insert(value.to_owned());
                }
                "CA" => {
                    if ca.is_some() {
                        return Err(NarInfoError::DuplicateField {
                            field: "CA",
                            line: line_no,
                        });
                    }
                    if !value.is_empty() {
                        ca = Some(value.parse().map_err(|source| NarInfoError::BadCa {
                            value: value.to_owned(),
                            source,
                        })?);
                    }
                }
                _ => {}
            }
        }

        let store_path = store_path.ok_or(NarInfoError::MissingField("StorePath"))?;
        let nar_hash = nar_hash.ok_or(NarInfoError::MissingField("NarHash"))?;
        let url = url.ok_or(NarInfoError::MissingField("URL"))?;
        if url.is_empty() {
            return Err(NarInfoError::EmptyUrl);
        }
        let nar_size = nar_size.ok_or(NarInfoError::MissingField("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        let compression = match compression {
            Some(c) if !c.is_empty() => c,
            _ => "bzip2".to_owned(),
        };
        Ok(NarInfo {
            store_path,
            url,
            compression,
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            system: system.filter(|s| !s.is_empty()),
            signatures,
            ca,
        })
    }

    /// Prints the narinfo as Nix's `NarInfo::to_string` does.
    pub fn to_string(&self, store_dir: &StoreDir) -> String {
        let mut s = String::new();
        let mut field = |name: &str, value: &str| {
            s.push_str(name);
            s.push_str(": ");
            s.push_str(value);
            s.push('\n');
        };
        field("StorePath", &store_dir.print(&self.store_path));
        field("URL", &self.url);
        field("Compression", &self.compression);
        if let Some(h) = &self.file_hash {
            field("FileHash", &h.to_typed_string(Encoding::Base32));
        }
        if let Some(n) = self.file_size {
            field("FileSize", &n.to_string());
        }
        field("NarHash", &self.nar_hash.to_typed_string(Encoding::Base32));
        field("NarSize", &self.nar_size.to_string());
        let refs: Vec<&str> = self.references.iter().map(StorePath::base_name).collect();
        field("References", &refs.join(" "));
        if let Some(d) = &self.deriver {
            field("Deriver", d.base_name());
        }
        if let Some(sys) = &self.system {
            field("System", sys);
        }
        for sig in &self.signatures {
            field("Sig", sig);
        }
        if let Some(ca) = &self.ca {
            field("CA", &ca.to_string());
        }
        s
    }

    /// The string Nix signs for this path (see [`fingerprint_path`]); fails when
    /// `NarSize` is 0, as Nix does.
    pub fn fingerprint(&self, store_dir: &StoreDir) -> Result<String, NarInfoError> {
        if self.nar_size == 0 {
            return Err(NarInfoError::UnknownNarSize(
                store_dir.print(&self.store_path),
            ));
        }
        Ok(fingerprint_path(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        ))
    }

    /// Adds `key`'s signature of the fingerprint to `Sig` (Nix's `ValidPathInfo::sign`).
    pub fn sign(&mut self, store_dir: &StoreDir, key: &SecretKey) -> Result<(), NarInfoError> {
        let fp = self.fingerprint(store_dir)?;
        self.signatures.insert(key.sign(fp.as_bytes()));
        Ok(())
    }

    /// How many `Sig`s are valid signatures by keys in `keys`. A `Sig` named after
    /// an untrusted key does not count; one named after a trusted key that is not a
    /// well-formed signature is an error (as in Nix).
    pub fn valid_signatures(
        &self,
        store_dir: &StoreDir,
        keys: &PublicKeys,
    ) -> Result<usize, NarInfoError> {
        let fp = self.fingerprint(store_dir)?;
        keys.count_valid(fp.as_bytes(), &self.signatures)
            .map_err(|source| NarInfoError::Signature {
                path: store_dir.print(&self.store_path),
                source,
            })
    }

    /// Whether the `CA` field really gives this store path (Nix's
    /// `isContentAddressed`): such a path is trusted without signatures. A
    /// self-reference counts as `self` in the path computation.
    pub fn is_content_addressed(&self, store_dir: &StoreDir) -> bool {
        let Some(ca) = &self.ca else {
            return false;
        };
        let mut refs = self.references.clone();
        let self_ref = refs.remove(&self.store_path);
        let computed = match ca {
            ContentAddress::Text(_) => {
                store_dir.make_path_from_ca(self.store_path.name(), ca, &self.references, false)
            }
            ContentAddress::Fixed(..) => {
                store_dir.make_path_from_ca(self.store_path.name(), ca, &refs, self_ref)
            }
        };
        computed.is_ok_and(|p| p == self.store_path)
    }

    /// Nix's `ValidPathInfo::checkSignatures`: [`MAX_SIGS`] for a path that is
    /// content-addressed, else the number of [valid signatures](Self::valid_signatures).
    /// With `require-sigs`, a substitute is acceptable when this is not 0.
    pub fn check_signatures(
        &self,
        store_dir: &StoreDir,
        keys: &PublicKeys,
    ) -> Result<usize, NarInfoError> {
        if self.is_content_addressed(store_dir) {
            return Ok(MAX_SIGS);
        }
        self.valid_signatures(store_dir, keys)
    }
}

/// The fingerprint Nix signs for a store path (`ValidPathInfo::fingerprint`):
/// `1;<store path>;<nar hash as algo:base32>;<nar size>;<reference paths joined by ','>`.
/// The NAR hash is always printed in base 32, whatever encoding it was read in.
pub fn fingerprint_path(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &StorePathSet,
) -> String {
    let refs: Vec<String> = references.iter().map(|r| store_dir.print(r)).collect();
    format!(
        "1;{};{};{};{}",
        store_dir.print(path),
        nar_hash.to_typed_string(Encoding::Base32),
        nar_size,
        refs.join(",")
    )
}

#[cfg(test)]
mod tests;
