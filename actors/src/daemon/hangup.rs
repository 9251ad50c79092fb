//! Whether a client hung up while its request runs (Nix's `MonitorFdHup` in
//! `daemon.cc`): the session does not read its socket while a build goes on, so
//! the daemon polls the descriptor for `POLLHUP`, which a socket reports once the
//! peer has closed it (a client that only shut down its sending side still
//! waits for the answer, and is not taken as gone).

use std::os::fd::RawFd;

/// The descriptor a client's requests come in on.
#[derive(Debug, Clone, Copy)]
pub struct Hangup {
    fd: RawFd,
}

impl Hangup {
    /// Watches `fd`, which must stay open as long as this is used (the session
    /// owns it).
    pub fn new(fd: RawFd) -> Hangup {
        Hangup { fd }
    }

    /// Whether the other side is gone (or the descriptor is unusable).
    pub fn hung_up(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_closed_peer_is_a_hangup_a_half_closed_one_is_not() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let h = Hangup::new(ours.as_raw_fd());
        assert!(!h.hung_up());
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(!h.hung_up(), "still waiting for the answer");
        drop(theirs);
        assert!(h.hung_up());
    }
}
