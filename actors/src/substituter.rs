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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::progress::Transfer;

use drover::content_address::ContentAddress;
use drover::hash::Hash;
use drover::realisation::{DrvOutput, Realisation};
use drover::store::{LocalStore, RepairFlag, ValidPathInfo};
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

/// One path the in-memory substituter serves: its info and file contents (a regular
/// file, written as is into the store).
#[derive(Debug, Clone)]
pub struct FakeEntry {
    pub info: SubstitutablePathInfo,
    pub contents: Vec<u8>,
}

/// Scripted misbehaviour of the fake for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeFault {
    /// `query_path_info` fails.
    QueryFails,
    /// `copy_into` fails (a corrupt NAR).
    CopyFails,
    /// `copy_into` says the NAR is gone.
    Gone,
}

/// An in-memory substituter serving files it holds; for tests and examples.
#[derive(Default)]
pub struct InMemorySubstituter {
    pub uri: String,
    pub priority: u64,
    /// Accept its paths without signatures (true from [`InMemorySubstituter::new`]).
    pub trusted: bool,
    paths: Mutex<BTreeMap<StorePath, FakeEntry>>,
    realisations: Mutex<BTreeMap<DrvOutput, Realisation>>,
    faults: Mutex<HashMap<StorePath, FakeFault>>,
    /// Every path copied out of it, in order.
    pub copied: Mutex<Vec<StorePath>>,
    /// Scratch directory for writing files before adding them.
    scratch: Mutex<Option<PathBuf>>,
}

impl InMemorySubstituter {
    pub fn new(uri: &str, priority: u64) -> InMemorySubstituter {
        InMemorySubstituter {
            uri: uri.to_owned(),
            priority,
            trusted: true,
            ..Default::default()
        }
    }

    /// Serves a regular file with these contents at `path` (its NAR hash is computed).
    pub fn add_file(&self, path: StorePath, contents: &[u8], references: StorePathSet) {
        let mut sink = drover::hash::HashSink::new(drover::hash::HashAlgo::Sha256);
        drover::nar::dump_bytes(contents, &mut sink).expect("hashing into memory");
        let (nar_hash, nar_size) = sink.finish();
        let info = SubstitutablePathInfo {
            path: path.clone(),
            references,
            deriver: None,
            nar_hash,
            nar_size,
            download_size: Some(contents.len() as u64),
            ca: None,
            sigs: BTreeSet::new(),
        };
        self.paths.lock().expect("lock").insert(
            path,
            FakeEntry {
                info,
                contents: contents.to_vec(),
            },
        );
    }

    pub fn add_realisation(&self, r: Realisation) {
        self.realisations
            .lock()
            .expect("lock")
            .insert(r.id.clone(), r);
    }

    /// Adds a signature to a served path's info.
    pub fn add_signature(&self, path: &StorePath, sig: String) {
        if let Some(e) = self.paths.lock().expect("lock").get_mut(path) {
            e.info.sigs.insert(sig);
        }
    }

    pub fn set_fault(&self, path: StorePath, fault: FakeFault) {
        self.faults.lock().expect("lock").insert(path, fault);
    }

    fn fault(&self, path: &StorePath) -> Option<FakeFault> {
        self.faults.lock().expect("lock").get(path).copied()
    }

    pub fn copied(&self) -> Vec<StorePath> {
        self.copied.lock().expect("lock").clone()
    }
}

impl Substituter for InMemorySubstituter {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn priority(&self) -> u64 {
        self.priority
    }

    fn is_trusted(&self) -> bool {
        self.trusted
    }

    fn query_path_info(
        &self,
        path: &StorePath,
    ) -> Result<Option<SubstitutablePathInfo>, SubstituterError> {
        if self.fault(path) == Some(FakeFault::QueryFails) {
            return Err(SubstituterError::Failed(format!(
                "unable to download narinfo of '{path}' from '{}'",
                self.uri
            )));
        }
        Ok(self
            .paths
            .lock()
            .expect("lock")
            .get(path)
            .map(|e| e.info.clone()))
    }

    /// Counts the file's length as downloaded and its NAR size as unpacked (the
    /// `FileSize` and `NarSize` it serves).
    fn copy_into(
        &self,
        path: &StorePath,
        store: &LocalStore,
        repair: RepairFlag,
        progress: &Transfer,
    ) -> Result<(), SubstituterError> {
        match self.fault(path) {
            Some(FakeFault::CopyFails) => {
                return Err(SubstituterError::Failed(format!(
                    "NAR for '{}' fetched from '{}' is incomplete",
                    store.store_dir().print(path),
                    self.uri
                )))
            }
            Some(FakeFault::Gone) => {
                return Err(SubstituterError::Gone {
                    path: store.store_dir().print(path),
                    message: format!(
                        "file 'nar/{}.nar' does not exist in binary cache '{}'",
                        path.hash_part(),
                        self.uri
                    ),
                })
            }
            _ => {}
        }
        let entry = self
            .paths
            .lock()
            .expect("lock")
            .get(path)
            .cloned()
            .ok_or_else(|| SubstituterError::Gone {
                path: store.store_dir().print(path),
                message: format!(
                    "file '{}.narinfo' does not exist in binary cache '{}'",
                    path.hash_part(),
                    self.uri
                ),
            })?;
        let _ = &self.scratch;
        let mut info = ValidPathInfo::new(path.clone(), entry.info.nar_hash, entry.info.nar_size);
        info.references = entry.info.references.clone();
        info.deriver = entry.info.deriver.clone();
        info.ca = entry.info.ca.clone();
        info.sigs = entry.info.sigs.clone();
        store
            .add_object_with(&info, repair, |tmp| {
                std::fs::write(tmp, &entry.contents).map_err(|source| {
                    drover::store::StoreError::Io {
                        context: "writing",
                        path: tmp.to_owned(),
                        source,
                    }
                })
            })
            .map_err(|e| SubstituterError::Failed(e.to_string()))?;
        progress.add_downloaded(entry.contents.len() as u64);
        progress.add_unpacked(entry.info.nar_size);
        self.copied.lock().expect("lock").push(path.clone());
        Ok(())
    }

    fn query_realisation(&self, id: &DrvOutput) -> Result<Option<Realisation>, SubstituterError> {
        Ok(self.realisations.lock().expect("lock").get(id).cloned())
    }
}
