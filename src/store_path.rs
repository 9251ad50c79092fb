//! Store paths and the store directory.
//!
//! A store path is `<store dir>/<hash part>-<name>`: 32 nix base-32 characters (a
//! 160-bit digest), a dash and a name of at most 211 characters from
//! `[A-Za-z0-9+-._?=]`. The store directory is a value ([`StoreDir`]), never a
//! constant: `/nix/store` is only the default. [`StorePath`] holds the base name;
//! the store dir prints it.
//!
//! The `make_*` functions compute store paths the way Nix does
//! (`makeStorePath` and friends): `sha256` of
//! `<type>:sha256:<base16 inner hash>:<store dir>:<name>`, folded to 20 bytes.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::content_address::{ContentAddress, FileIngestionMethod};
use crate::hash::{self, Encoding, Hash, HashAlgo};
use crate::nixbase32;

/// Length of the hash part of a store path's base name.
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// A sorted set of store paths (Nix's `StorePathSet`).
pub type StorePathSet = BTreeSet<StorePath>;

/// Why a string is not a store path.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum StorePathError {
    #[error("path '{0}' is not in the Nix store")]
    NotInStore(String),
    #[error(
        "path '{0}' is not a store path (it is a path inside one, or not below the store dir)"
    )]
    NotAStorePath(String),
    #[error("store path '{0}' has a hash part that is not 32 nix base-32 characters")]
    BadHashPart(String),
    #[error("store path '{0}' has no dash between hash part and name")]
    MissingDash(String),
    #[error("store path '{0}' has an empty name")]
    EmptyName(String),
    #[error("store path '{0}' has a name longer than 211 characters")]
    NameTooLong(String),
    #[error("store path '{path}' contains illegal character '{ch}'")]
    IllegalChar { path: String, ch: char },
    #[error("store directory '{0}' is not an absolute, canonical path")]
    BadStoreDir(String),
}

/// Checks a store path name (the part after `<hash>-`) as Nix 2.8 does.
pub fn check_name(path: &str, name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName(path.to_owned()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(path.to_owned()));
    }
    if let Some(ch) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(StorePathError::IllegalChar {
            path: path.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// A store path, held as its base name `<hash part>-<name>`.
///
/// Ordered as Nix orders `StorePath`s: by base name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

impl StorePath {
    /// Parses a base name `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        if base.len() < HASH_PART_LEN
            || !base.as_bytes()[..HASH_PART_LEN]
                .iter()
                .all(|&c| nixbase32::is_valid_char(c))
        {
            return Err(StorePathError::BadHashPart(base.to_owned()));
        }
        if base.as_bytes().get(HASH_PART_LEN) != Some(&b'-') {
            return Err(StorePathError::MissingDash(base.to_owned()));
        }
        check_name(base, &base[HASH_PART_LEN + 1..])?;
        Ok(StorePath {
            base: base.to_owned(),
        })
    }

    /// Builds a store path from a 20-byte digest and a name.
    pub fn from_digest(digest: &[u8; 20], name: &str) -> Result<StorePath, StorePathError> {
        let base = format!("{}-{}", nixbase32::encode(digest), name);
        check_name(&base, name)?;
        Ok(StorePath { base })
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    /// `<hash part>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// Whether this is a derivation (`.drv`) path.
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    /// Prints the base name; use [`StoreDir::print`] for the full path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

/// The store directory, e.g. `/nix/store`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreDir {
    dir: String,
}

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir {
            dir: "/nix/store".into(),
        }
    }
}

impl StoreDir {
    /// A store dir: absolute, without a trailing slash, `.` or `..` components.
    pub fn new(dir: impl Into<String>) -> Result<StoreDir, StorePathError> {
        let dir: String = dir.into();
        let ok = dir.starts_with('/')
            && dir.len() > 1
            && !dir.ends_with('/')
            && !dir.contains("//")
            && dir.split('/').all(|c| c != "." && c != "..");
        if !ok {
            return Err(StorePathError::BadStoreDir(dir));
        }
        Ok(StoreDir { dir })
    }

    pub fn as_str(&self) -> &str {
        &self.dir
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.dir)
    }

    /// The full path of `path`: `<store dir>/<base name>`.
    pub fn print(&self, path: &StorePath) -> String {
        format!("{}/{}", self.dir, path.base)
    }

    /// The full path of `path` as a filesystem path.
    pub fn to_path_buf(&self, path: &StorePath) -> PathBuf {
        PathBuf::from(self.print(path))
    }

    /// Parses a full store path, which must lie directly in this store dir.
    pub fn parse(&self, s: &str) -> Result<StorePath, StorePathError> {
        let base = s
            .strip_prefix(&self.dir)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        if base.contains('/') {
            return Err(StorePathError::NotAStorePath(s.to_owned()));
        }
        StorePath::from_base_name(base)
    }

    /// The store path that contains `s` (which may be a path inside it).
    pub fn parse_prefix(&self, s: &str) -> Result<StorePath, StorePathError> {
        let rest = s
            .strip_prefix(&self.dir)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_owned()))?;
        let base = rest.split('/').next().unwrap_or_default();
        StorePath::from_base_name(base)
    }

    /// Whether `s` is a full path directly in this store dir (not checking the name).
    pub fn is_in_store(&self, s: &str) -> bool {
        s.strip_prefix(&self.dir)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| !r.is_empty())
    }

    /// Nix's `makeStorePath`: `type` is e.g. `source`, `text:<refs>`, `output:out`.
    pub fn make_store_path(
        &self,
        ty: &str,
        inner: &Hash,
        name: &str,
    ) -> Result<StorePath, StorePathError> {
        let s = format!(
            "{}:{}:{}:{}:{}",
            ty,
            inner.algo(),
            inner.encode(Encoding::Base16),
            self.dir,
            name
        );
        let digest = HashAlgo::Sha256.digest(s.as_bytes());
        let folded: [u8; 20] = hash::compress(digest.digest(), 20)
            .try_into()
            .expect("compressed to 20 bytes");
        StorePath::from_digest(&folded, name)
    }

    /// The `type` argument for text and source paths: `<ty>:<ref>…[:self]`.
    fn make_type(&self, ty: &str, references: &StorePathSet, self_ref: bool) -> String {
        let mut s = ty.to_owned();
        for r in references {
            s.push(':');
            s.push_str(&self.print(r));
        }
        if self_ref {
            s.push_str(":self");
        }
        s
    }

    /// Nix's `makeOutputPath`: the path of output `id` of an input-addressed derivation
    /// whose (modulo) hash is `hash`.
    pub fn make_output_path(
        &self,
        id: &str,
        hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, StorePathError> {
        self.make_store_path(
            &format!("output:{id}"),
            hash,
            &output_path_name(drv_name, id),
        )
    }

    /// The path of a text object (a `.drv`, `builtins.toFile`) with these contents'
    /// sha256 and references.
    pub fn make_text_path(
        &self,
        name: &str,
        hash: &Hash,
        references: &StorePathSet,
    ) -> Result<StorePath, StorePathError> {
        self.make_store_path(&self.make_type("text", references, false), hash, name)
    }

    /// The path of a text object with these `contents`.
    pub fn text_path_of(
        &self,
        name: &str,
        contents: &[u8],
        references: &StorePathSet,
    ) -> Result<StorePath, StorePathError> {
        self.make_text_path(name, &HashAlgo::Sha256.digest(contents), references)
    }

    /// Nix's `makeFixedOutputPath` for a `fixed:` content address.
    pub fn make_fixed_output_path(
        &self,
        method: FileIngestionMethod,
        hash: &Hash,
        name: &str,
        references: &StorePathSet,
        self_ref: bool,
    ) -> Result<StorePath, StorePathError> {
        if method == FileIngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 {
            self.make_store_path(&self.make_type("source", references, self_ref), hash, name)
        } else {
            let inner = format!(
                "fixed:out:{}{}:",
                method.prefix(),
                hash.to_typed_string(Encoding::Base16)
            );
            self.make_store_path(
                "output:out",
                &HashAlgo::Sha256.digest(inner.as_bytes()),
                name,
            )
        }
    }

    /// The store path of a content-addressed object.
    pub fn make_path_from_ca(
        &self,
        name: &str,
        ca: &ContentAddress,
        references: &StorePathSet,
        self_ref: bool,
    ) -> Result<StorePath, StorePathError> {
        match ca {
            ContentAddress::Text(h) => self.make_text_path(name, h, references),
            ContentAddress::Fixed(m, h) => {
                self.make_fixed_output_path(*m, h, name, references, self_ref)
            }
        }
    }
}

/// The name of an output path: the derivation name, plus `-<output>` unless `out`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> StoreDir {
        StoreDir::default()
    }

    #[test]
    fn parse_and_print() {
        let s = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";
        let p = sd().parse(s).unwrap();
        assert_eq!(p.hash_part(), "00bgd045z0d4icpbc2yyz4gx48ak44la");
        assert_eq!(p.name(), "net-tools-1.60_p20170221182432");
        assert_eq!(sd().print(&p), s);
    }

    #[test]
    fn negative_cases() {
        let d = sd();
        assert!(matches!(
            d.parse("/tmp/00bgd045z0d4icpbc2yyz4gx48ak44la-x"),
            Err(StorePathError::NotInStore(_))
        ));
        assert!(matches!(
            d.parse("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x/bin"),
            Err(StorePathError::NotAStorePath(_))
        ));
        assert!(matches!(
            d.parse("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44le-x"),
            Err(StorePathError::BadHashPart(_))
        ));
        assert!(matches!(
            d.parse("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la_x"),
            Err(StorePathError::MissingDash(_))
        ));
        assert!(matches!(
            d.parse("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-"),
            Err(StorePathError::EmptyName(_))
        ));
        assert!(matches!(
            d.parse("/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-a b"),
            Err(StorePathError::IllegalChar { ch: ' ', .. })
        ));
        let long = format!(
            "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-{}",
            "a".repeat(212)
        );
        assert!(matches!(
            d.parse(&long),
            Err(StorePathError::NameTooLong(_))
        ));
        let max = format!(
            "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-{}",
            "a".repeat(211)
        );
        assert!(d.parse(&max).is_ok());
    }

    #[test]
    fn store_dir_validation() {
        assert!(StoreDir::new("/tmp/x/store").is_ok());
        for bad in ["", "/", "rel/store", "/a/../b", "/a/", "/a//b"] {
            assert!(StoreDir::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_path_of_builtins_to_file() {
        // `nix-instantiate --eval -E 'builtins.toFile "foo" "bar"'` with Nix 2.8
        let p = sd()
            .text_path_of("foo", b"bar", &StorePathSet::new())
            .unwrap();
        assert_eq!(
            sd().print(&p),
            "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
        );
    }
}
