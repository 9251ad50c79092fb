//! The store executor: runs goals' blocking jobs (SQLite, NAR hashing, file trees,
//! substituter downloads) on tokio's blocking pool, never on an arbiter thread.
//!
//! At most [`StoreExecutor::concurrency`] jobs run at once; the others wait in FIFO
//! order for a permit before they reach the pool. Without the bound, a run that
//! starts thousands of goals at once queues thousands of jobs and the blocking pool
//! grows to hundreds of threads (they serialise on the store's database lock anyway);
//! every thread's stack and heap mappings then make each `fork` of a builder slower
//! (a 1,000-derivation build spent most of its extra system time copying them).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::goal::{Event, Job, JobEnv};

/// Runs [`Job`]s against one [`JobEnv`].
#[derive(Clone)]
pub struct StoreExecutor {
    env: Arc<JobEnv>,
    permits: Arc<Semaphore>,
}

impl StoreExecutor {
    pub fn new(env: Arc<JobEnv>) -> StoreExecutor {
        let permits = Arc::new(Semaphore::new(Self::concurrency(&env)));
        StoreExecutor { env, permits }
    }

    /// How many jobs may run at once: one per substitution slot (downloads are jobs
    /// and may be slow) plus a few for store queries, which take the database lock
    /// one at a time.
    pub fn concurrency(env: &JobEnv) -> usize {
        (env.settings.max_substitution_jobs.max(1) as usize).saturating_add(2)
    }

    pub fn env(&self) -> &Arc<JobEnv> {
        &self.env
    }

    /// Runs `job` off the arbiter once a permit is free. A job that panics gives
    /// the panic's message as the error (its goal then fails with it): jobs return
    /// errors as values, so this is a bug, never a hang.
    pub fn run(&self, job: Job) -> impl Future<Output = Result<Event, String>> + 'static {
        let env = self.env.clone();
        let permits = self.permits.clone();
        async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await.ok();
            tokio::task::spawn_blocking(move || job(&env))
                .await
                .map_err(|e| match e.try_into_panic() {
                    Ok(p) => crate::goal::host::panic_message(&*p),
                    Err(e) => e.to_string(),
                })
        }
    }
}
