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
//!
//! A substituter may also fetch a path before its references are valid
//! ([`Substituter::fetch_unregistered`]): the path is downloaded, checked and
//! unpacked into its place, locked and invalid, and registered by the goal once its
//! references are. Each such path holds its lock file open, so at most
//! [`max_unregistered`] of them wait at once (half the soft limit on open files,
//! within 64..=8192); past that a fetch is [`Fetched::Deferred`] and the goal
//! copies after the references, as Nix does.

use std::collections::BTreeSet;

use crate::progress::Transfer;

use drover::content_address::ContentAddress;
use drover::hash::Hash;
use drover::realisation::{DrvOutput, Realisation};
use drover::store::{LocalStore, RepairFlag, UnregisteredObject};
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

/// What [`Substituter::fetch_unregistered`] did.
#[derive(Debug)]
pub enum Fetched {
    /// The path is valid already (another process made it so): nothing to register.
    AlreadyValid,
    /// In place, checked and locked; registered once its references are valid,
    /// deleted if dropped before. The place counts it among the waiting paths.
    Unpacked {
        object: Box<UnregisteredObject>,
        place: UnregisteredPlace,
    },
    /// Not fetched early (the substituter cannot, or [`max_unregistered`] paths are
    /// waiting already): copy it with [`Substituter::copy_into`] after its
    /// references.
    Deferred,
}

/// Paths fetched ahead of their references that may wait for registration at once:
/// half the soft limit on open files (each holds its lock file open), within
/// 64..=8192.
pub fn max_unregistered() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given and nothing else.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            1024
        };
        usize::try_from(soft / 2).unwrap_or(8192).clamp(64, 8192)
    })
}

/// Paths fetched ahead and not yet registered or dropped, in this process.
static UNREGISTERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A place among the [`max_unregistered`], held while a fetched path waits.
#[derive(Debug)]
pub struct UnregisteredPlace(());

impl UnregisteredPlace {
    /// A place, or `None` when all are taken.
    pub fn take() -> Option<UnregisteredPlace> {
        use std::sync::atomic::Ordering;
        UNREGISTERED
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_unregistered()).then_some(n + 1)
            })
            .ok()
            .map(|_| UnregisteredPlace(()))
    }

    /// Places taken now.
    pub fn taken() -> usize {
        UNREGISTERED.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for UnregisteredPlace {
    fn drop(&mut self) {
        UNREGISTERED.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
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
    /// Whether [`fetch_unregistered`](Self::fetch_unregistered) can fetch ahead of
    /// the references (the default cannot).
    fn fetches_early(&self) -> bool {
        false
    }
    /// Downloads, checks and unpacks `path` into its place without registering it,
    /// while its references may still be missing, counting bytes into `progress` as
    /// [`copy_into`](Self::copy_into) does. The default defers the copy.
    fn fetch_unregistered(
        &self,
        path: &StorePath,
        store: &LocalStore,
        progress: &Transfer,
    ) -> Result<Fetched, SubstituterError> {
        let _ = (path, store, progress);
        Ok(Fetched::Deferred)
    }
}

/// The in-memory fake, for tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub use crate::testing::{FakeEntry, FakeFault, InMemorySubstituter};
