//! Group commit of paths fetched ahead: the substitution goals whose fetched paths
//! become registrable at about the same time (a layer of a closure whose references
//! just became valid) share one database transaction instead of one each.
//!
//! A goal's registration job hands its [`UnregisteredObject`] to [`Registrations`]
//! and waits. The first waiter that finds no registration running becomes the
//! leader: it takes every object queued so far, registers them in one transaction,
//! and wakes the others with their results; objects queued meanwhile go in the next
//! transaction. Nothing waits for company: an object alone is registered at once.
//!
//! Nix's rule holds: an object is queued only once its references are valid, so
//! every object of a batch has its references valid or in the batch, and a path
//! still becomes valid only with (or after) its references. A batch that fails is
//! registered again one object at a time, so one bad path fails only its own goal.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use drover::store::{LocalStore, UnregisteredObject};

use crate::substituter::SubstituterError;

/// The registrations waiting and the results not yet collected.
#[derive(Default)]
pub struct Registrations {
    state: Mutex<Pending>,
    turn: Condvar,
    /// Transactions committed (for tests and figures).
    batches: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Pending {
    queue: Vec<(u64, UnregisteredObject)>,
    /// A leader is registering a batch.
    leading: bool,
    next_ticket: u64,
    results: HashMap<u64, Result<(), SubstituterError>>,
}

impl std::fmt::Debug for Registrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrations")
            .field("batches", &self.batches())
            .finish_non_exhaustive()
    }
}

/// Ends a leader's turn even if registering panicked, so the waiters go on.
struct Turn<'a>(&'a Registrations);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.lock().leading = false;
        self.0.turn.notify_all();
    }
}

impl Registrations {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registration transactions committed or tried so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Registers `object` in `store`, with whatever other objects are waiting; blocks
    /// until it is registered (or failed). The object's references must be valid.
    pub fn register(
        &self,
        store: &LocalStore,
        object: UnregisteredObject,
    ) -> Result<(), SubstituterError> {
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push((ticket, object));
        loop {
            if let Some(r) = st.results.remove(&ticket) {
                return r;
            }
            if !st.leading {
                st.leading = true;
                let batch = std::mem::take(&mut st.queue);
                drop(st);
                let turn = Turn(self);
                let results = self.register_batch(store, batch);
                let mut locked = self.lock();
                locked.results.extend(results);
                drop(locked);
                drop(turn);
                st = self.lock();
                continue;
            }
            st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// One transaction for `batch`; one per object if that one fails.
    fn register_batch(
        &self,
        store: &LocalStore,
        batch: Vec<(u64, UnregisteredObject)>,
    ) -> Vec<(u64, Result<(), SubstituterError>)> {
        use std::sync::atomic::Ordering::Relaxed;
        let failed = |e: drover::store::StoreError| SubstituterError::Failed(e.to_string());
        let (tickets, mut objects): (Vec<u64>, Vec<UnregisteredObject>) = batch.into_iter().unzip();
        self.batches.fetch_add(1, Relaxed);
        match store.try_register_unregistered(&mut objects) {
            Ok(()) => tickets.into_iter().map(|t| (t, Ok(()))).collect(),
            Err(e) if objects.len() == 1 => vec![(tickets[0], Err(failed(e)))],
            Err(_) => tickets
                .into_iter()
                .zip(objects)
                .map(|(t, o)| {
                    self.batches.fetch_add(1, Relaxed);
                    (t, store.register_unregistered(vec![o]).map_err(failed))
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use drover::hash::{HashAlgo, HashSink};
    use drover::store::ValidPathInfo;
    use drover::store_path::StorePath;

    fn info(store: &LocalStore, name: &str, refs: &[&StorePath]) -> ValidPathInfo {
        let mut sink = HashSink::new(HashAlgo::Sha256);
        drover::nar::dump_bytes(name.as_bytes(), &mut sink).unwrap();
        let (h, n) = sink.finish();
        let sd = store.store_dir();
        let digest = HashAlgo::Sha256.digest(name.as_bytes());
        let hash = drover::nixbase32::encode(&digest.digest()[..20]);
        let path = sd.parse(&format!("{}/{hash}-{name}", sd.as_str())).unwrap();
        let mut i = ValidPathInfo::new(path, h, n);
        i.references = refs.iter().map(|r| (*r).clone()).collect();
        i
    }

    fn unregistered(store: &LocalStore, info: &ValidPathInfo) -> UnregisteredObject {
        let name = info.path.name().to_owned();
        store
            .write_unregistered(info, |tmp: &Path| {
                std::fs::write(tmp, name.as_bytes()).map_err(|source| {
                    drover::store::StoreError::Io {
                        context: "writing",
                        path: tmp.to_owned(),
                        source,
                    }
                })
            })
            .unwrap()
            .unwrap()
    }

    #[test]
    fn concurrent_registrations_share_transactions_and_all_become_valid() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::testing::TestStore::open(dir.path());
        let store = t.store.clone();
        let infos: Vec<ValidPathInfo> = (0..64)
            .map(|i| info(&store, &format!("p{i}"), &[]))
            .collect();
        let objects: Vec<UnregisteredObject> =
            infos.iter().map(|i| unregistered(&store, i)).collect();
        let regs = Arc::new(Registrations::default());
        std::thread::scope(|s| {
            for o in objects {
                let (regs, store) = (regs.clone(), store.clone());
                s.spawn(move || regs.register(&store, o).unwrap());
            }
        });
        for i in &infos {
            assert!(store.is_valid_path(&i.path).unwrap());
        }
        assert!(regs.batches() >= 1 && regs.batches() <= 64);
    }

    #[test]
    fn a_failing_batch_fails_only_the_bad_object() {
        let dir = tempfile::tempdir().unwrap();
        let t = crate::testing::TestStore::open(dir.path());
        let store = t.store.clone();
        let missing = info(&store, "missing", &[]);
        let good = info(&store, "good", &[]);
        let bad = info(&store, "bad", &[&missing.path]);
        let regs = Registrations::default();
        // Both queued before a leader runs: one batch, which fails on `bad`'s
        // reference, then one registration each.
        let batch = vec![
            (0, unregistered(&store, &good)),
            (1, unregistered(&store, &bad)),
        ];
        let results = regs.register_batch(&store, batch);
        assert_eq!(regs.batches(), 3);
        assert!(results[0].1.is_ok(), "{:?}", results[0].1);
        assert!(results[1].1.is_err());
        assert!(store.is_valid_path(&good.path).unwrap());
        assert!(!store.is_valid_path(&bad.path).unwrap());
        // The bad object was dropped unregistered: its contents are gone.
        assert!(!store.real_path(&bad.path).exists());
    }
}
