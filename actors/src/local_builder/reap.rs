//! Reaping a `posix_spawn`ed builder on the arbiter, without a blocking thread.
//!
//! A pidfd (`pidfd_open`, Linux 5.3) becomes readable when its process exits; it is
//! registered with the runtime's reactor and the builder is then reaped with a
//! `waitpid` that does not block. Where pidfds are unavailable the blocking
//! [`drover::build::spawn::wait_pid`] runs on tokio's blocking pool, as before.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::history::Usage;

/// `wait4(pid, WNOHANG)`: the status and usage once the process has exited.
fn try_wait(pid: u32) -> io::Result<Option<(ExitStatus, Usage)>> {
    super::history::wait4(pid, nix::libc::WNOHANG)
}

/// A pidfd of `pid` (a child of ours not yet reaped, so the pid is not reused).
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes a pid and flags and returns a new descriptor or -1.
    let r = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Waits for child `pid` (not started by `std::process`, so nobody else reaps it)
/// and reaps it, with the process tree's CPU time and peak RSS (`wait4`).
pub async fn wait(pid: u32) -> io::Result<(ExitStatus, Usage)> {
    if let Some(s) = try_wait(pid)? {
        return Ok(s);
    }
    // SAFETY: as in `pty::pump`: the `OwnedFd` stays open as long as the `AsyncFd`.
    let registered = pidfd_open(pid).and_then(|fd| {
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    });
    match registered {
        Ok(fd) => loop {
            let mut guard = fd.readable().await?;
            match try_wait(pid)? {
                Some(s) => return Ok(s),
                None => guard.clear_ready(),
            }
        },
        Err(_) => tokio::task::spawn_blocking(move || super::history::wait_with_usage(pid))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn spawn(script: &str) -> u32 {
        // Forget the Child: `wait` reaps it, as the LocalBuilder's posix_spawn path.
        let c = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .spawn()
            .unwrap();
        let pid = c.id();
        std::mem::forget(c);
        pid
    }

    #[actix::test]
    async fn reaps_running_and_exited_children_with_their_status() {
        let pid = spawn("sleep 0.3; exit 3");
        let (s, _) = wait(pid).await.unwrap();
        assert_eq!(s.code(), Some(3));
        // Already exited by the time it is waited for.
        let pid = spawn("exit 0");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(wait(pid).await.unwrap().0.success());
        // Killed by a signal.
        let pid = spawn("sleep 30");
        // SAFETY: signals our own child.
        unsafe { nix::libc::kill(pid as _, nix::libc::SIGKILL) };
        assert_eq!(wait(pid).await.unwrap().0.signal(), Some(9));
        // Reaped: a second wait fails (no such child).
        assert!(wait(pid).await.is_err());
    }
}
