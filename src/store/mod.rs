//! The Nix-compatible local store: the only part of drover that touches the store
//! directory, the SQLite database and lock files.
//!
//! * [`local::LocalStore`]: open from [`crate::config::Settings`], query and register
//!   valid paths, derivation outputs and realisations, add text files and source
//!   trees, atomically.
//! * [`db`]: the database, with exactly Nix 2.8's schema ([`schema`]), pragmas, and
//!   `big-lock`.
//! * [`locks`]: `<path>.lock` files ([`locks::PathLocks`]).
//! * [`gc_roots`]: temporary GC roots in `<state dir>/temproots/<pid>`, and permanent
//!   (indirect) roots as `nix-store --add-root` makes them.
//! * [`gc`]: the garbage collector (`nix-store --gc`, `--delete`): roots, liveness,
//!   deletion.
//! * [`canonicalise`]: canonical metadata of store objects.
//! * [`optimise`]: hard-linking identical files through `.links` (`auto-optimise-store`).
//! * [`path_info`]: [`path_info::ValidPathInfo`] and its `nix path-info --json` form.

pub mod canonicalise;
pub mod db;
pub mod gc;
pub mod gc_roots;
pub mod local;
pub mod locks;
pub mod optimise;
pub mod path_info;
pub mod schema;
pub mod unix_socket;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use canonicalise::{canonicalise_path_meta_data, CanonicaliseError};
pub use local::{LocalStore, RepairFlag, UnregisteredObject};
pub use locks::{LockError, PathLocks};
pub use path_info::{path_infos_to_json, ValidPathInfo};

use crate::derivation::DerivationError;
use crate::nar::NarWriteError;
use crate::store_path::StorePathError;

/// A store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("SQLite error while {context}: {source}")]
    Sqlite {
        context: String,
        source: rusqlite::Error,
    },
    #[error("{context} '{path}': {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Canonicalise(#[from] CanonicaliseError),
    #[error(transparent)]
    Nar(#[from] NarWriteError),
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    #[error("current Nix store schema is version {found}, but drover only supports {supported}")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("Nix store schema version {found} is older than {supported}; run a Nix 2.8 command (e.g. 'nix-store --init') once to upgrade it")]
    SchemaTooOld { found: u32, supported: u32 },
    #[error("'{0}' is corrupt")]
    CorruptSchemaFile(PathBuf),
    #[error("path '{0}' is not valid")]
    InvalidPath(String),
    #[error("database entry for '{path}' has an invalid {field} '{value}'")]
    BadDbEntry {
        path: String,
        field: &'static str,
        value: String,
    },
    #[error("cannot add path '{0}' to the Nix store because it claims to be content-addressed but isn't")]
    CaMismatch(String),
    #[error("cannot register path '{path}': its reference '{reference}' is not valid")]
    MissingReference { path: String, reference: String },
    #[error("cycle detected in the references of '{path}' from '{parent}'")]
    Cycle { path: String, parent: String },
    #[error("NAR hash of '{0}' must be sha256")]
    NarHashNotSha256(String),
    #[error(
        "cannot register derivation output '{output}' of '{drv}': the derivation is not valid"
    )]
    DrvNotValid { drv: String, output: String },
    #[error("trying to register a realisation of '{id}', but we already have another one locally (local: '{local}', new: '{new}')")]
    RealisationConflict {
        id: String,
        local: String,
        new: String,
    },
    #[error("unable to register the realisation '{id}' as it depends on the non-existent or different realisation '{dependency}'")]
    BadDependentRealisation { id: String, dependency: String },
    #[error("secret key file '{path}': {source}")]
    BadSecretKey {
        path: PathBuf,
        source: crate::signature::SignatureError,
    },
    #[error("output '{output}' of derivation '{drv}' isn't built")]
    UnbuiltInputOutput { drv: String, output: String },
    #[error("the store database has no Realisations table (enable the 'ca-derivations' experimental feature)")]
    NoCaSchema,
    #[error("'{0}' is not a regular file, directory or symlink")]
    UnsupportedFile(PathBuf),
    #[error("invalid derivation '{path}': {source}")]
    BadDerivation {
        path: String,
        source: DerivationError,
    },
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error(transparent)]
    Optimise(#[from] optimise::OptimiseError),
    #[error("creating a garbage collector root ({0}) in the Nix store is forbidden (are you running nix-build inside the store?)")]
    RootInStore(String),
    #[error("cannot create symlink '{0}'; already exists")]
    RootExists(String),
    #[error("cannot delete path '{path}' because it is in use by {referrers}")]
    PathInUse { path: String, referrers: String },
    #[error("cannot add the temporary root '{0}': this process released its roots to exit")]
    TempRootsReleased(String),
}

impl StoreError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io {
            context,
            path,
            source,
        }
    }

    pub(crate) fn sql(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Sqlite { context, source }
    }
}
