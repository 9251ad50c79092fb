//! The substituter interface the substitution goals use, and an in-memory fake.
//!
//! A substituter (a binary cache, another store) answers three questions: what it
//! knows about a store path (`queryPathInfo` over a narinfo), how to copy that path
//! into the local store (download, unpack, check the NAR hash, register), and what
//! realisation it has for a content-addressed derivation output. All methods block;
//! goals call them through the store executor, never on an arbiter thread.
//!
//! A copy counts the bytes it downloads and unpacks into the [`Transfer`] it is
//! handed, as they pass, so a progress display can show a copy in flight.
//!
//! Substituters are tried in order of [`Substituter::priority`] (lower first, stable),
//! as Nix's `getDefaultSubstituters` sorts them.

use std::collections::BTreeSet;

use crate::progress::Transfer;

use drover::content_address::ContentAddress;
use drover::hash::Hash;
use drover::realisation::{DrvOutput, Realisation};
use drover::store::{LocalStore, RepairFlag};
use drover::store_path::{StorePath, StorePathSet};
use thiserror::Error;

/// What a substituter knows about a path (a narinfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstitutablePathInfo {
    pub path: StorePath,
    pub references: StorePathSet,
    pub deriver: Option<StorePath>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Compressed size (`FileSize`), when known.
    pub download_size: Option<u64>,
    pub ca: Option<ContentAddress>,
    pub sigs: BTreeSet<String>,
}

/// Why a substituter could not answer or copy.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SubstituterError {
    /// The narinfo exists but the NAR is gone (`SubstituteGone`): not a real failure.
    /// `message` is what Nix prints, e.g. `file 'nar/….nar.xz' does not exist in
    /// binary cache`.
    #[error("{message}")]
    Gone { path: String, message: String },
    /// The substituter is disabled (e.g. unreachable and marked so).
    #[error("substituter '{0}' is disabled")]
    Disabled(String),
    /// Anything else (network, corrupt NAR, hash mismatch): a real failure.
    #[error("{0}")]
    Failed(String),
}

/// A source of store paths and realisations. Methods block.
pub trait Substituter: Send + Sync {
    /// The substituter's URI, for messages (`copying path '…' from '<uri>'`).
    fn uri(&self) -> String;
    /// Lower is tried first (cache.nixos.org is 40).
    fn priority(&self) -> u64;
    /// Whether its paths are accepted without signatures (`?trusted=1`).
    fn is_trusted(&self) -> bool {
        false
    }
    /// The narinfo of `path`, or `None` when it has no substitute.
    fn query_path_info(
        &self,
        path: &StorePath,
    ) -> Result<Option<SubstitutablePathInfo>, SubstituterError>;
    /// Copies `path` into `store` and registers it (its references must be valid),
    /// counting the bytes downloaded and unpacked into `progress`. A valid path is
    /// left alone unless `repair` asks for a fresh copy over it.
    fn copy_into(
        &self,
        path: &StorePath,
        store: &LocalStore,
        repair: RepairFlag,
        progress: &Transfer,
    ) -> Result<(), SubstituterError>;
    /// The realisation of a content-addressed derivation output.
    fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, SubstituterError>;
}

/// The in-memory fake, for tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub use crate::testing::{FakeEntry, FakeFault, InMemorySubstituter};
