//! Watch the event stream of a run: every goal, build, log line and message as it
//! happens, from the `Events` that `System::start` returns.
//!
//! ```sh
//! cargo run -p drover-actors --example watch_events
//! ```
//!
//! Builds a small diamond of derivations (two of them print a few lines slowly) in
//! a scratch store in a temporary directory, with two builds at once, and prints
//! each event with the time since the start. Needs only `/bin/sh`; no Nix.

mod scratch;

use std::time::Instant;

use drover::derived_path::{DerivedPath, OutputsSpec};
use drover_actors::messages::{BuildLogEvent, BuildMode};
use drover_actors::progress::{GoalKey, ProgressEvent};
use drover_actors::{System, SystemEvent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = scratch::Root::new()?;
    let mut settings = scratch::settings(root.path());
    settings.apply_option("max-jobs", "2");
    let started = Instant::now();
    actix::System::new().block_on(async move {
        let (system, mut events) = System::start(&settings)?;
        let store = system.store().clone();
        // `/bin/sh` alone: builtins only (the builder's PATH is unset, as in Nix).
        let slow = "for i in 1 2 3; do echo \"$name: step $i\"; j=0; \
                    while [ $j -lt 30000 ]; do j=$((j+1)); done; done; echo $name > $out";
        let base = scratch::add_derivation(&store, "base", "echo base > $out", &[])?;
        let left = scratch::add_derivation(&store, "left", slow, &[&base])?;
        let right = scratch::add_derivation(&store, "right", slow, &[&base])?;
        let top = scratch::add_derivation(
            &store,
            "top",
            "read -r l < $left; read -r r < $right; echo \"$l $r\" > $out",
            &[&left, &right],
        )?;
        let sd = store.store_dir().clone();

        let printer = actix::spawn(async move {
            while let Some(ev) = events.recv().await {
                let t = started.elapsed().as_secs_f64();
                let name = |p: &drover::store_path::StorePath| p.name().to_owned();
                let text = match ev {
                    SystemEvent::Progress(ProgressEvent::GoalStarted { goal }) => {
                        format!("goal started: {}", key(&goal))
                    }
                    SystemEvent::Progress(ProgressEvent::GoalFinished { goal, result }) => {
                        format!("goal finished: {} ({})", key(&goal), result.status)
                    }
                    SystemEvent::Progress(ProgressEvent::BuildStarted { drv_path, .. }) => {
                        format!("build started: {}", name(&drv_path))
                    }
                    SystemEvent::Progress(ProgressEvent::BuildFinished { drv_path, status }) => {
                        format!("build finished: {} ({status})", name(&drv_path))
                    }
                    SystemEvent::Progress(ProgressEvent::Counters(c)) => format!(
                        "counters: {} running, {} done of {} builds",
                        c.running_builds,
                        c.done_builds,
                        c.expected_builds + c.done_builds
                    ),
                    SystemEvent::Progress(other) => format!("{other:?}"),
                    SystemEvent::Log(BuildLogEvent::Line { drv_path, line }) => {
                        format!("log of {}: {line}", name(&drv_path))
                    }
                    SystemEvent::Log(other) => format!("{other:?}"),
                };
                println!("{t:7.3}s  {text}");
            }
        });
        let outcome = system
            .realise(
                vec![DerivedPath::Built {
                    drv_path: top,
                    outputs: OutputsSpec::All,
                }],
                BuildMode::Normal,
            )
            .await;
        for e in &outcome.errors {
            eprintln!("error: {e}");
        }
        // The stream ends when the system is dropped.
        drop(system);
        let _ = printer.await;
        println!(
            "exit status {} (store: {})",
            outcome.exit_status,
            sd.as_str()
        );
        Ok(())
    })
}

fn key(k: &GoalKey) -> String {
    match k {
        GoalKey::Derivation(p) => format!("build {}", p.name()),
        GoalKey::Substitution(p) => format!("fetch {}", p.name()),
        GoalKey::DrvOutput(id) => format!("realisation {}", id.output),
    }
}
