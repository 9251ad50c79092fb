//! Helpers of the derivation goal's unit tests: stepping a goal by hand.

pub(super) use std::os::unix::fs::PermissionsExt;

pub(super) use crate::goal::test_support::*;
pub(super) use crate::goal::WaiteeResult;
pub(super) use crate::messages::LocalBuildFinished;
pub(super) use crate::substituter::{FakeFault, InMemorySubstituter, Substituter};

use super::*;

pub(super) fn all(p: &StorePath) -> DerivationGoal {
    DerivationGoal::new(p.clone(), OutputsSpec::All, BuildMode::Normal)
}

pub(super) fn step(h: &Harness, g: &mut DerivationGoal, ev: Event) -> String {
    show(&h.drive(|e, c| g.handle(e, c), ev, false))
}

/// [`step`], also counting the blocking jobs the goal asked for on the way.
pub(super) fn step_counting_jobs(
    h: &Harness,
    g: &mut DerivationGoal,
    ev: Event,
) -> (String, usize) {
    let ctx = h.ctx(false);
    let (mut out, mut jobs, mut queue) = (Vec::new(), 0, vec![ev]);
    while let Some(ev) = queue.pop() {
        for f in g.handle(ev, &ctx) {
            match f {
                Effect::Blocking(job) => {
                    jobs += 1;
                    queue.push(job(&h.env));
                }
                other => out.push(other),
            }
        }
    }
    (show(&out), jobs)
}

pub(super) fn step_hook(h: &Harness, g: &mut DerivationGoal, ev: Event) -> String {
    show(&h.drive(|e, c| g.handle(e, c), ev, true))
}

pub(super) fn built(g: &DerivationGoal, ok: bool) -> Event {
    Event::LocalBuildFinished(LocalBuildFinished {
        id: 1,
        result: if ok {
            BuildResult::new(BuildStatus::Built)
        } else {
            BuildResult::failure(BuildStatus::PermanentFailure, "builder failed")
        },
        hash_mismatch: false,
        outputs: g
            .drv
            .as_ref()
            .map(|d| {
                d.outputs
                    .iter()
                    .filter_map(|(n, o)| Some((n.clone(), o.path()?.clone())))
                    .collect()
            })
            .unwrap_or_default(),
    })
}
