//! The store executor: runs goals' blocking jobs (SQLite, NAR hashing, file trees,
//! substituter downloads) on tokio's blocking pool, never on an arbiter thread.

use std::future::Future;
use std::sync::Arc;

use crate::goal::{Event, Job, JobEnv};

/// Runs [`Job`]s against one [`JobEnv`].
#[derive(Clone)]
pub struct StoreExecutor {
    env: Arc<JobEnv>,
}

impl StoreExecutor {
    pub fn new(env: Arc<JobEnv>) -> StoreExecutor {
        StoreExecutor { env }
    }

    pub fn env(&self) -> &Arc<JobEnv> {
        &self.env
    }

    /// Runs `job` off the arbiter; a panicking job becomes an empty `Wake` (the goal
    /// ignores it) — jobs return errors as values, so this does not happen.
    pub fn run(&self, job: Job) -> impl Future<Output = Event> + 'static {
        let env = self.env.clone();
        async move {
            tokio::task::spawn_blocking(move || job(&env))
                .await
                .unwrap_or(Event::Wake)
        }
    }
}
