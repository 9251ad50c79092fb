//! Errors of the goal layer: what a goal's blocking job or step can fail with,
//! carrying the offending input and, where a store, derivation or I/O operation
//! failed, that error as its source. A goal turns them into its failure message or,
//! where Nix 2.8 throws them out of the goal, into a run error (`Effect::Fatal`).

use drover::derivation::DerivationError;
use drover::store::{LockError, StoreError};

/// Why a goal's work failed.
#[derive(Debug, thiserror::Error)]
pub enum GoalError {
    /// A store operation failed (its message is the store's, as Nix prints it).
    #[error("{source}")]
    Store {
        #[source]
        source: Box<StoreError>,
    },
    /// The path could not be registered as a temporary GC root, so the collector
    /// could delete it under the goal: the goal must not go on.
    #[error("cannot add temporary root for '{path}': {source}")]
    TempRoot {
        path: String,
        #[source]
        source: Box<StoreError>,
    },
    /// Locking the outputs failed (not: they are busy).
    #[error("{source}")]
    Lock {
        #[from]
        source: LockError,
    },
    /// A derivation could not be typed, resolved or hashed.
    #[error("{source}")]
    Derivation {
        #[source]
        source: Box<DerivationError>,
    },
    /// The hashes modulo of a derivation's outputs (its realisation ids) could not be
    /// computed, typically because an input derivation cannot be read.
    #[error("computing the output hashes of '{drv}': {source}")]
    OutputHashes {
        drv: String,
        #[source]
        source: Box<GoalError>,
    },
    /// With impure derivations, a pure one may not depend on an impure one.
    #[error("pure derivation '{drv}' depends on impure derivation '{input}'")]
    ImpureInput { drv: String, input: String },
    /// An input derivation lacks an output this derivation uses.
    #[error("derivation '{drv}' requires non-existent output '{output}' from input derivation '{input}'")]
    MissingInputOutput {
        drv: String,
        output: String,
        input: String,
    },
    /// The post-build hook could not be started or failed (Nix's `ExecError`:
    /// `program '…' failed with …`).
    #[error(transparent)]
    PostBuildHook(#[from] crate::local_builder::post_build_hook::PostBuildHookError),
    /// A state needing the loaded derivation ran without it (a bug).
    #[error("internal error: derivation '{0}' is not loaded")]
    NotLoaded(String),
    /// A state received an event it has no transition for (a bug, or a blocking job
    /// that died without its result).
    #[error("internal error: the goal for '{goal}' in state {state} got an unexpected {what}")]
    UnexpectedEvent {
        goal: String,
        state: String,
        what: String,
    },
}

impl From<StoreError> for GoalError {
    fn from(e: StoreError) -> GoalError {
        GoalError::Store {
            source: Box::new(e),
        }
    }
}

impl From<DerivationError> for GoalError {
    fn from(e: DerivationError) -> GoalError {
        GoalError::Derivation {
            source: Box::new(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn sources_are_kept() {
        let e = GoalError::TempRoot {
            path: "/s/x".into(),
            source: Box::new(StoreError::InvalidPath("/s/x".into())),
        };
        assert_eq!(
            e.to_string(),
            "cannot add temporary root for '/s/x': path '/s/x' is not valid"
        );
        assert!(e.source().is_some());
        let e = GoalError::OutputHashes {
            drv: "/s/d.drv".into(),
            source: Box::new(StoreError::InvalidPath("/s/i.drv".into()).into()),
        };
        assert!(
            e.to_string().ends_with("path '/s/i.drv' is not valid"),
            "{e}"
        );
    }
}
