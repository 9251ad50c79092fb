//! SIGINT, SIGTERM and SIGHUP as Nix 2.8 takes them: not death by the signal, but
//! an orderly stop. `error: interrupted by the user`, every builder's and hook's
//! process group killed, locks and temporary roots released, exit status 1.
//!
//! [`install`] puts in a handler that only writes a byte into a pipe (all a signal
//! handler may safely do); a thread reading the pipe then acts. While a Worker
//! runs, it is sent [`Interrupt`](drover_actors::Interrupt) (see [`while_running`]):
//! it cancels every goal (the local builder and the hook pool kill the process
//! groups) and ends the run with that error, which the command prints and exits
//! with. Outside a run (planning, printing) there is nothing to cancel: the error
//! is printed and the process exits at once. After an interrupted run,
//! [`after_run`] kills any child process group still alive, so none outlives us.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use drover_actors::worker::INTERRUPTED;

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static SIGNALLED: AtomicBool = AtomicBool::new(false);

type Target = Box<dyn Fn() + Send>;
static TARGET: Mutex<Option<Target>> = Mutex::new(None);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is a static byte.
        unsafe { libc::write(fd, b"!".as_ptr().cast(), 1) };
    }
}

/// Catches SIGINT, SIGTERM and SIGHUP for the rest of the process.
pub fn install() -> std::io::Result<()> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two descriptors of `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let [read_fd, write_fd] = fds;
    PIPE_WRITE.store(write_fd, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || loop {
            let mut b = [0u8; 1];
            // SAFETY: reading one byte into a local buffer from our own pipe.
            let n = unsafe { libc::read(read_fd, b.as_mut_ptr().cast(), 1) };
            if n == 1 {
                interrupted();
            } else if n < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
                continue;
            } else {
                return;
            }
        })?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with our handler; `on_signal` is async-signal-safe.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn interrupted() {
    let target = TARGET.lock().unwrap_or_else(|e| e.into_inner());
    match &*target {
        Some(interrupt) => interrupt(),
        None => {
            eprintln!("error: {INTERRUPTED}");
            drover::store::gc_roots::release_temp_roots();
            std::process::exit(1);
        }
    }
}

/// While a run is under way, an interrupt calls `interrupt` (which sends the
/// Worker its `Interrupt`) instead of exiting. A signal that came before is
/// passed on at once.
pub fn while_running(interrupt: impl Fn() + Send + 'static) {
    let mut t = TARGET.lock().unwrap_or_else(|e| e.into_inner());
    if SIGNALLED.load(Ordering::SeqCst) {
        interrupt();
    }
    *t = Some(Box::new(interrupt));
}

/// The run is over: later signals exit at once again. After an interrupt, kills
/// the process groups of children still alive (a hook or builder whose
/// cancellation had not reached it yet).
pub fn after_run() {
    TARGET.lock().unwrap_or_else(|e| e.into_inner()).take();
    if SIGNALLED.load(Ordering::SeqCst) {
        kill_children();
    }
}

/// SIGKILL to every child process of ours and, for a child that leads its own
/// process group (builders and hooks are session leaders), to that group.
fn kill_children() {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp …`; comm may hold spaces or parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(ppid), Some(pgrp)) = (
            fields.get(1).and_then(|s| s.parse::<i32>().ok()),
            fields.get(2).and_then(|s| s.parse::<i32>().ok()),
        ) else {
            continue;
        };
        if ppid != me {
            continue;
        }
        // SAFETY: kill(2) with pids we just read; no memory is passed.
        unsafe {
            if pgrp == pid {
                libc::kill(-pid, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
