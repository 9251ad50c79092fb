//! Realise a derivation with drover's actor system, as a library user does.
//!
//! ```sh
//! cargo run -p drover-actors --example realise
//! ```
//!
//! Makes a scratch store in a temporary directory, adds two derivations (`message`
//! and `greeting`, which reads `message`'s output), starts the whole system with
//! one call (`System::start`), realises `greeting` and prints the outcome, its
//! output's contents and the stored build log. Needs only `/bin/sh`; no Nix.

mod scratch;

use drover::derived_path::{DerivedPath, OutputsSpec};
use drover_actors::messages::BuildMode;
use drover_actors::System;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = scratch::Root::new()?;
    let settings = scratch::settings(root.path());
    actix::System::new().block_on(async move {
        let (system, _events) = System::start(&settings)?;
        let store = system.store().clone();
        let message =
            scratch::add_derivation(&store, "message", "echo 'Hello from drover' > $out", &[])?;
        let greeting = scratch::add_derivation(
            &store,
            "greeting",
            "echo building the greeting; read -r m < $message; echo \"$m (greeted)\" > $out",
            &[&message],
        )?;
        let sd = store.store_dir();
        println!("scratch store: {}", sd.as_str());
        println!("realising {}", sd.print(&greeting));

        let request = DerivedPath::Built {
            drv_path: greeting.clone(),
            outputs: OutputsSpec::All,
        };
        for line in drover_actors::plan::describe(sd, &system.plan(std::slice::from_ref(&request))?)
        {
            println!("{line}");
        }
        let outcome = system.realise(vec![request], BuildMode::Normal).await;
        for e in &outcome.errors {
            eprintln!("error: {e}");
        }
        println!("exit status: {}", outcome.exit_status);
        for r in &outcome.results {
            println!("{}: {}", r.path.print(sd), r.result.status);
            for (id, realisation) in &r.result.built_outputs {
                let out = sd.print(&realisation.out_path);
                println!("  {} -> {out}", id.output);
                print!("  contents: {}", std::fs::read_to_string(&out)?);
            }
        }
        let mut log = Vec::new();
        drover::build_log::read::read_build_log(
            settings.log_dir(),
            sd,
            &greeting,
            |_| None,
            &mut log,
        )?;
        println!(
            "build log of greeting:\n{}",
            String::from_utf8_lossy(&log).trim_end()
        );
        if outcome.exit_status != 0 {
            std::process::exit(outcome.exit_status);
        }
        Ok(())
    })
}
