//! The store executor: runs goals' blocking jobs (SQLite, NAR hashing, file trees,
//! substituter downloads) on tokio's blocking pool, never on an arbiter thread.
//!
//! At most [`StoreExecutor::concurrency`] jobs run at once; the others wait for a
//! permit before they reach the pool. Without the bound, a run that starts
//! thousands of goals at once queues thousands of jobs and the blocking pool grows
//! to hundreds of threads (they serialise on the store's database lock anyway);
//! every thread's stack and heap mappings then make each `fork` of a builder slower
//! (a 1,000-derivation build spent most of its extra system time copying them).
//!
//! Waiting jobs are served in three classes ([`JobPriority`]): the jobs of goals
//! that already ran one (a goal going on with its work), then the first job of a
//! goal another goal waits for (loading an input's derivation), then the first job
//! of a requested goal, each class in FIFO order. Goals that have started then
//! finish before more start, so at any time only about as many goals hold a loaded
//! derivation as jobs can run, instead of every goal of a large run at once: the
//! peak memory of a run no longer grows with the number of goals it starts. And
//! the graph below the goals already loaded is found before more requests load:
//! a chain is discovered one link at a time, and each link's load no longer waits
//! for every requested goal beside it to load (`schedule`: the critical path
//! waits for its discovery).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::goal::{Event, Job, JobEnv};

/// Which waiting jobs get a free permit first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPriority {
    /// A requested goal's first job: it starts holding memory (its derivation)
    /// once run.
    Start,
    /// The first job of a goal another goal waits for (a subgoal): finding the
    /// graph below goals already started goes before starting more.
    StartSubGoal,
    /// Any later job of a goal: running it brings the goal closer to its end.
    Continue,
}

/// Runs [`Job`]s against one [`JobEnv`].
#[derive(Clone)]
pub struct StoreExecutor {
    env: Arc<JobEnv>,
    permits: Arc<Permits>,
}

impl StoreExecutor {
    pub fn new(env: Arc<JobEnv>) -> StoreExecutor {
        let permits = Arc::new(Permits::new(Self::concurrency(&env)));
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
    pub fn run(
        &self,
        job: Job,
        priority: JobPriority,
    ) -> impl Future<Output = Result<Event, String>> + 'static {
        let env = self.env.clone();
        let permit = Permits::acquire(&self.permits, priority);
        // The shared temporary roots stay while the job runs, even if its goal
        // went meanwhile (`drover::store::gc_roots`).
        let hold = drover::store::gc_roots::RootsHold::new();
        async move {
            let _permit = permit.await;
            tokio::task::spawn_blocking(move || {
                let _hold = hold;
                job(&env)
            })
            .await
            .map_err(|e| match e.try_into_panic() {
                Ok(p) => crate::goal::host::panic_message(&*p),
                Err(e) => e.to_string(),
            })
        }
    }
}

/// A counting semaphore whose waiters are served [`JobPriority::Continue`] first.
struct Permits {
    state: Mutex<PermitState>,
}

struct PermitState {
    free: usize,
    /// Waiters of [`JobPriority::Continue`], [`JobPriority::StartSubGoal`], then
    /// of [`JobPriority::Start`].
    waiting: [VecDeque<oneshot::Sender<Permit>>; 3],
}

/// One running job's permit; dropping it hands the permit on.
struct Permit {
    permits: Arc<Permits>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        Permits::release(&self.permits);
    }
}

impl Permits {
    fn new(n: usize) -> Permits {
        Permits {
            state: Mutex::new(PermitState {
                free: n.max(1),
                waiting: Default::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PermitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit, now or once one is handed to this waiter. Dropping the future
    /// before then gives up the place (a permit sent meanwhile is handed on).
    fn acquire(this: &Arc<Permits>, priority: JobPriority) -> impl Future<Output = Permit> {
        let now = {
            let mut s = this.lock();
            if s.free > 0 {
                s.free -= 1;
                Ok(Permit {
                    permits: this.clone(),
                })
            } else {
                let (tx, rx) = oneshot::channel();
                let class = match priority {
                    JobPriority::Continue => 0,
                    JobPriority::StartSubGoal => 1,
                    JobPriority::Start => 2,
                };
                s.waiting[class].push_back(tx);
                Err(rx)
            }
        };
        let this = this.clone();
        async move {
            match now {
                Ok(p) => p,
                // The sender is only dropped after sending (release) or when the
                // whole semaphore goes, which cannot happen while `this` lives.
                Err(rx) => rx.await.unwrap_or_else(|_| Permit { permits: this }),
            }
        }
    }

    /// A permit came back: the first live waiter of the best class gets it.
    fn release(this: &Arc<Permits>) {
        let mut s = this.lock();
        loop {
            let next = s.waiting.iter_mut().find_map(|q| q.pop_front());
            let Some(tx) = next else {
                s.free += 1;
                return;
            };
            // Handing on must not run this permit's drop under the lock: the
            // permit is built here and, if the waiter is gone, forgotten (its
            // place goes to the next waiter, in this loop).
            let permit = Permit {
                permits: this.clone(),
            };
            match tx.send(permit) {
                Ok(()) => return,
                Err(p) => std::mem::forget(p),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn later_jobs_of_started_goals_go_before_first_jobs_and_subgoals_before_requests() {
        let p = Arc::new(Permits::new(1));
        let held = Permits::acquire(&p, JobPriority::Start).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, prio) in [
            ("start-1", JobPriority::Start),
            ("cont-1", JobPriority::Continue),
            ("sub-1", JobPriority::StartSubGoal),
            ("start-2", JobPriority::Start),
            ("sub-2", JobPriority::StartSubGoal),
            ("cont-2", JobPriority::Continue),
        ] {
            let fut = Permits::acquire(&p, prio);
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = fut.await;
                order.lock().unwrap().push(name);
            }));
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["cont-1", "cont-2", "sub-1", "sub-2", "start-1", "start-2"]
        );
        assert_eq!(p.lock().free, 1, "every permit came back");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_that_gave_up_does_not_keep_a_permit() {
        let p = Arc::new(Permits::new(1));
        let held = Permits::acquire(&p, JobPriority::Start).await;
        let gone = Permits::acquire(&p, JobPriority::Continue);
        let next = Permits::acquire(&p, JobPriority::Start);
        drop(gone);
        drop(held);
        let got = next.await;
        assert_eq!(p.lock().free, 0);
        drop(got);
        assert_eq!(p.lock().free, 1);
    }
}
