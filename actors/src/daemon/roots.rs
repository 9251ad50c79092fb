//! Which temporary roots a daemon client keeps, and for how long (the rules are
//! in `drover::store::gc_roots`): the roots a connection adds itself live in its
//! own file for the connection's life ([`enter_connection`]); a run it waits for
//! holds the Worker's shared roots ([`RunRoots`]) and, before letting go, copies
//! what the run produced into the connection's file, as Nix's per-connection
//! daemon process still has those roots when the client makes its own.

use std::sync::Arc;

use drover::derived_path::DerivedPath;
use drover::store::gc_roots::{ConnectionRoots, ConnectionScope, RootsHold};
use drover::store::LocalStore;
use drover::store_path::StorePath;

use crate::RealiseOutcome;

/// Puts this thread (a connection's) in a scope of its own: the roots it adds go
/// to a file that goes when the returned values are dropped.
pub fn enter_connection(store: &LocalStore) -> (Arc<ConnectionRoots>, ConnectionScope) {
    let roots = ConnectionRoots::new(store.state_dir());
    let scope = roots.enter();
    (roots, scope)
}

/// The shared roots held for one run a client waits for.
#[derive(Debug)]
pub struct RunRoots {
    _hold: RootsHold,
}

impl RunRoots {
    /// Holds the shared roots before the run starts.
    pub fn start() -> RunRoots {
        RunRoots {
            _hold: RootsHold::new(),
        }
    }

    /// The run ended: its requests' paths and outputs become roots of the
    /// calling thread's connection, then the hold goes. Over-keeps (every known
    /// output of a requested derivation, failed or not) rather than under-keeps.
    pub fn finish(self, store: &LocalStore, requests: &[DerivedPath], outcome: &RealiseOutcome) {
        let mut paths: Vec<StorePath> = Vec::new();
        for r in requests {
            match r {
                DerivedPath::Opaque(p) => paths.push(p.clone()),
                DerivedPath::Built { drv_path, .. } => {
                    paths.push(drv_path.clone());
                    if let Ok(outs) = store.query_derivation_outputs(drv_path) {
                        paths.extend(outs.into_values());
                    }
                }
            }
        }
        for k in &outcome.results {
            paths.extend(k.result.built_outputs.values().map(|r| r.out_path.clone()));
        }
        if let Err(e) = store.add_temp_roots(&paths) {
            // The roots stay under the hold a little longer: nothing is lost by
            // keeping the hold until the connection ends instead.
            log::warn!("keeping the outputs of a run as temporary roots: {e}");
            std::mem::forget(self);
        }
    }
}
