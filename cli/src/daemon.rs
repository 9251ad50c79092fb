//! `drover daemon`: serves Nix 2.8's worker protocol in place of `nix-daemon`,
//! on `$NIX_STATE_DIR/daemon-socket/socket` (or `NIX_DAEMON_SOCKET_PATH`, or
//! the socket systemd passes with `LISTEN_FDS`), or one connection on
//! stdin/stdout with `--stdio`. Every connection builds through one shared
//! `drover_actors::System`; see `drover_actors::daemon`. SIGTERM, SIGINT and
//! SIGHUP stop it as `nix-daemon` stops (exit status 0, the socket file left),
//! after cancelling every build ([`stop_cleanly`]).

use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use anyhow::Context as _;
use drover::store::gc_roots::RootsHold;
use drover_actors::daemon::store_uri::served_store;
use drover_actors::daemon::{
    authorise, connection::spawn_connection, listen, serve_connection, socket_path, EventHub,
    HubActor, Peer, Shared, SystemBuilds,
};
use drover_actors::SystemBuilder;

use crate::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Serve one connection on stdin/stdout (as `nix-daemon --stdio`).
    #[arg(long)]
    stdio: bool,
    /// The store to serve, as Nix's `--store` (default: the `store` setting,
    /// else `auto`): `local` or a path, with `?root=…&state=…&log=…`.
    #[arg(long, value_name = "URI")]
    store: Option<String>,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<ExitCode> {
    // The daemon's own settings name its socket; the store's, what it serves.
    let daemon_settings = ctx.settings.clone();
    let uri = args
        .store
        .clone()
        .or_else(|| {
            ctx.settings
                .is_set("store")
                .then(|| ctx.settings.get("store"))
                .flatten()
        })
        .unwrap_or_else(|| "auto".to_owned());
    let served = served_store(&daemon_settings, &uri)?;
    for w in &served.warnings {
        eprintln!("warning: {w}");
    }
    let settings = served.settings;
    let builder = SystemBuilder::new(&settings)
        .env(ctx.env.clone())
        .echo(false)
        .print_build_lines(false)
        .verbosity(ctx.verbosity)
        .goal_events(false);
    actix::System::new().block_on(async move {
        let hub = Arc::new(EventHub::default());
        let hub_actor = HubActor { hub: hub.clone() }.start();
        let (system, _events) = builder
            .progress(hub_actor.clone().recipient())
            .log_events_to(hub_actor.clone().recipient())
            .start()?;
        for w in system.warnings() {
            eprintln!("warning: {w}");
        }
        let interrupter = system.interrupter();
        let shared = Arc::new(Shared {
            store: system.store().clone(),
            settings: settings.clone(),
            builds: Arc::new(SystemBuilds::new(system, hub, &hub_actor)),
        });
        if args.stdio {
            // `nix-daemon --stdio` serves its one client as trusted.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sh = shared.clone();
            std::thread::spawn(move || {
                let peer = Peer {
                    uid: None,
                    trusted: true,
                };
                // A hang-up of stdin cancels the client's builds.
                let hangup = Some(drover_actors::daemon::hangup::Hangup::new(0));
                serve_connection(
                    &sh,
                    peer,
                    std::io::stdin().lock(),
                    std::io::stdout().lock(),
                    hangup,
                );
                let _ = tx.send(());
            });
            let _ = rx.await;
            return Ok(ExitCode::SUCCESS);
        }
        let path = socket_path(&daemon_settings);
        let listener = listen(&path)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .with_context(|| format!("listening on '{}'", path.display()))?;
        // SIGTERM, SIGINT, SIGHUP: stop as below rather than exit at once.
        let (stop_tx, mut stop) = tokio::sync::mpsc::unbounded_channel::<()>();
        crate::interrupt::while_running(move || {
            let _ = stop_tx.send(());
        });
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let (stream, _) = match r {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("error: accepting a connection: {e}");
                            continue;
                        }
                    };
                    if let Err(e) = accept(&shared, &settings, stream) {
                        eprintln!("error: {e:#}");
                    }
                }
                _ = stop.recv() => break,
            }
        }
        stop_cleanly(&interrupter).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// How long a stopping daemon waits for its clients' requests to answer.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Nix's daemon stops on SIGTERM or SIGINT with exit status 0 and leaves its
/// socket file; drover also ends what is running rather than leaving it to die
/// with the process: every run is interrupted (builders' and hooks' process
/// groups killed, no output registered), the clients waiting for one get
/// `interrupted by the user`, and only then the process exits (its temporary
/// roots released by `main`).
async fn stop_cleanly(interrupter: &actix::Recipient<drover_actors::Interrupt>) {
    let _ = interrupter.send(drover_actors::Interrupt).await;
    // Goals, store jobs and requests each hold the shared roots: none left means
    // every request has its answer.
    let deadline = Instant::now() + STOP_GRACE;
    while RootsHold::count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The answers on their way to the clients.
    tokio::time::sleep(Duration::from_millis(100)).await;
    crate::interrupt::after_run();
}

/// Checks who connected and hands the connection to its own actor.
fn accept(
    shared: &Arc<Shared>,
    settings: &drover::config::Settings,
    stream: tokio::net::UnixStream,
) -> anyhow::Result<()> {
    let cred = stream
        .peer_cred()
        .context("reading the peer's credentials")?;
    let stream: UnixStream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    let peer = authorise(settings, cred.uid(), cred.gid())?;
    spawn_connection(shared.clone(), stream, peer);
    Ok(())
}
