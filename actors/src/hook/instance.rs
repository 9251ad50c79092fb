//! One build-hook process, set up as Nix 2.8 sets it up.
//!
//! * Program: the `build-hook` path (absolute; a relative one is taken relative to
//!   `/`, where Nix 2.8 `execv`s it after `chdir("/")`), no PATH search, no splitting
//!   on whitespace. argv = `[basename, "<verbosity>"]`.
//! * cwd `/`, a new session (`setsid`, so its own process group), the caller's
//!   environment unchanged.
//! * fd 0: the request pipe; fds 1 and 2: the same reply pipe; fd 4: the write side of
//!   the builder-output pipe, fd 5: its read side.
//! * The settings preamble is sent together with the first request.
//! * Dropping the instance SIGKILLs the process group (Nix does the same when done).
//!
//! The builder-output pipe is read with blocking reads on a blocking thread: the hook
//! shares the read side (fd 5), so it must not be switched to non-blocking mode. The
//! thread polls with a short timeout so that a [`StopReading`] (the job was cancelled
//! or alarmed and its process group killed) ends it even when a process that escaped
//! the group still holds the pipe open; what is already buffered is read first.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdin};

use super::TryOutcome;
use crate::messages::{HookStderrLine, LogBytes};
use drover::hook_protocol::{classify_line, parse_reply, unexpected_eof, HookLine, ReplyKind};

/// Why a hook process could not be started.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// `execv` failed (Nix's child prints `error: executing '<path>': <reason>`).
    #[error("executing '{path}': {reason}")]
    Exec { path: String, reason: String },
    /// Creating pipes or the process failed otherwise.
    #[error("starting build hook '{path}': {source}")]
    Io { path: String, source: io::Error },
}

/// A running hook process and the parent's ends of its pipes.
pub struct HookInstance {
    child: Child,
    pgid: Pid,
    to_hook: Option<ChildStdin>,
    from_hook: BufReader<pipe::Receiver>,
    builder_out: Option<OwnedFd>,
    /// Not yet sent (sent with the first request).
    preamble: Option<Arc<Vec<u8>>>,
    killed: bool,
}

fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

impl HookInstance {
    /// Starts `program` with the given verbosity; `preamble` goes out with the first
    /// request.
    pub fn spawn(
        program: &Path,
        verbosity: u32,
        preamble: Arc<Vec<u8>>,
    ) -> Result<HookInstance, SpawnError> {
        let path = Path::new("/").join(program);
        let path_text = program.display().to_string();
        let io_err = |source| SpawnError::Io {
            path: path_text.clone(),
            source,
        };
        let (reply_r, reply_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io_err(e.into()))?;
        let (out_r, out_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io_err(e.into()))?;
        let argv0 = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| path.clone().into_os_string());
        let mut cmd = std::process::Command::new(&path);
        cmd.arg0(argv0)
            .arg(verbosity.to_string())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(reply_w.try_clone().map_err(io_err)?))
            .stderr(Stdio::from(reply_w));
        let (out_r_raw, out_w_raw) = (out_r.as_raw_fd(), out_w.as_raw_fd());
        // SAFETY: only async-signal-safe calls (setsid, fcntl, dup2) between fork and
        // exec; the fds are valid in the child (inherited from the parent).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                // Move both ends above 5 first so neither dup2 clobbers the other.
                let w = libc::fcntl(out_w_raw, libc::F_DUPFD_CLOEXEC, 10);
                let r = libc::fcntl(out_r_raw, libc::F_DUPFD_CLOEXEC, 10);
                if w == -1 || r == -1 || libc::dup2(w, 4) == -1 || libc::dup2(r, 5) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => SpawnError::Exec {
                path: path_text.clone(),
                reason: errno_text(&e),
            },
            _ if e.raw_os_error().is_some() => SpawnError::Exec {
                path: path_text.clone(),
                reason: errno_text(&e),
            },
            _ => io_err(e),
        })?;
        // The parent's copies of the child's ends go away with `cmd` and `out_w`.
        drop(cmd);
        drop(out_w);
        let pid = child
            .id()
            .ok_or_else(|| io_err(io::Error::other("no pid")))?;
        let to_hook = child.stdin.take();
        let from_hook = pipe::Receiver::from_owned_fd(reply_r).map_err(io_err)?;
        Ok(HookInstance {
            child,
            pgid: Pid::from_raw(pid as i32),
            to_hook,
            from_hook: BufReader::new(from_hook),
            builder_out: Some(out_r),
            preamble: Some(preamble),
            killed: false,
        })
    }

    /// The hook's process id (= its process group).
    pub fn pid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// A handle that kills the hook's process group.
    pub fn killer(&self) -> Killer {
        Killer(self.pgid)
    }

    /// Reads one line (without `\n`); `None` at end of file (a partial last line is
    /// returned as `Err(partial)`).
    async fn read_line(&mut self) -> Result<Option<String>, String> {
        let mut buf = Vec::new();
        match self.from_hook.read_until(b'\n', &mut buf).await {
            Ok(0) => Ok(None),
            Ok(_) if buf.last() == Some(&b'\n') => {
                buf.pop();
                Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
            }
            Ok(_) => Err(String::from_utf8_lossy(&buf).into_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends one `try` request (`request` = its encoded bytes) and waits for the
    /// reply. Lines that are not replies go to `on_line`.
    pub async fn try_build(
        &mut self,
        request: &[u8],
        on_line: &mut (dyn FnMut(HookLine) + Send),
    ) -> TryOutcome {
        let mut bytes = Vec::new();
        let first_request = self.preamble.is_some();
        if let Some(p) = self.preamble.take() {
            bytes.extend_from_slice(&p);
        }
        bytes.extend_from_slice(request);
        let Some(stdin) = self.to_hook.as_mut() else {
            return TryOutcome::Error("the build hook's request pipe is closed".into());
        };
        let written = match stdin.write_all(&bytes).await {
            Ok(()) => stdin.flush().await,
            Err(e) => Err(e),
        };
        // A hook that exits at once: Nix 2.8 writes the preamble and the first
        // request right after the fork, before such a hook is gone, so the write
        // succeeds and the reply is end of file (`unexpected EOF reading a line`).
        // drover's write comes later; on a fresh hook a broken pipe is read as Nix
        // reads it: what the hook printed, then the end of its reply pipe.
        if let Err(e) = written {
            if e.kind() == io::ErrorKind::BrokenPipe && first_request {
                log::debug!("the build hook exited before reading its first request");
            } else if e.kind() == io::ErrorKind::BrokenPipe {
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    self.from_hook.read_to_end(&mut rest),
                )
                .await;
                let text = String::from_utf8_lossy(&rest);
                return TryOutcome::Died(text.trim_end_matches('\n').to_owned());
            } else {
                return TryOutcome::Error(format!("writing to the build hook: {e}"));
            }
        }
        loop {
            let line = match self.read_line().await {
                Ok(Some(l)) => l,
                Ok(None) | Err(_) => return TryOutcome::Error(unexpected_eof()),
            };
            match classify_line(&line) {
                HookLine::Reply(r) => match parse_reply(&r) {
                    Err(e) => return TryOutcome::Error(e.to_string()),
                    Ok(ReplyKind::Accept) => {
                        return match self.read_line().await {
                            Ok(Some(machine)) => TryOutcome::Accept { machine },
                            _ => TryOutcome::Error(unexpected_eof()),
                        }
                    }
                    Ok(kind) => return TryOutcome::Reply(kind),
                },
                other => on_line(other),
            }
        }
    }

    /// Runs an accepted job: sends `follow_up` (inputs and missing outputs), closes the
    /// request pipe, streams fd 4 to `bytes` and the reply pipe's `@nix` lines to
    /// `lines` until both end (or `stop` is raised and nothing more is ready), then
    /// kills the process group and returns the exit code (`None` when killed by a
    /// signal).
    pub async fn run_job(
        mut self,
        follow_up: &[u8],
        bytes: Recipient<LogBytes>,
        lines: Recipient<HookStderrLine>,
        stop: StopReading,
    ) -> Option<i32> {
        if let Some(mut stdin) = self.to_hook.take() {
            let mut all = Vec::new();
            if let Some(p) = self.preamble.take() {
                all.extend_from_slice(&p);
            }
            all.extend_from_slice(follow_up);
            if let Err(e) = stdin.write_all(&all).await {
                log::debug!("writing the inputs to the build hook: {e}");
            }
            let _ = stdin.flush().await;
        }
        let out = self.builder_out.take();
        let reader_stop = stop.clone();
        // Also when this future is dropped (the job's actor stopped, the runtime shut
        // down): the reader thread must not outlive it.
        let _stop_reader = StopOnDrop(stop.clone());
        let reader = tokio::task::spawn_blocking(move || {
            let Some(fd) = out else { return };
            let mut f = File::from(fd);
            let mut buf = [0u8; 4096];
            while wait_readable(&f, &reader_stop) {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => bytes.do_send(LogBytes(buf[..n].to_vec())),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        });
        // Nix 2.8 handles only complete `@nix` lines here; other lines (and a last
        // line without `\n`) are dropped, not echoed.
        loop {
            let line = tokio::select! {
                biased;
                l = self.read_line() => l,
                _ = stop.stopped() => break,
            };
            let Ok(Some(l)) = line else { break };
            if l.starts_with("@nix ") {
                lines.do_send(HookStderrLine(l));
            } else {
                log::debug!("dropping build hook output line '{l}'");
            }
        }
        let _ = reader.await;
        self.kill();
        let status = self.child.wait().await.ok();
        status.and_then(|s| s.code())
    }

    /// SIGKILLs the process group.
    pub fn kill(&mut self) {
        if !self.killed {
            self.killed = true;
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for HookInstance {
    fn drop(&mut self) {
        // The child is never reaped before `kill` (only `run_job` waits, after
        // killing), so its pid and process group are still ours here.
        self.kill();
    }
}

/// Tells a running job ([`HookInstance::run_job`]) to stop waiting for the hook's
/// pipes once nothing more is ready on them: raised after the job's process group was
/// killed (cancellation, log alarm), so a process that escaped the group and still
/// holds a pipe cannot keep the job (and the run) waiting.
#[derive(Debug, Clone, Default)]
pub struct StopReading {
    flag: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl StopReading {
    /// Raises the flag (idempotent).
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once [`stop`](Self::stop) was called.
    async fn stopped(&self) {
        while !self.is_stopped() {
            self.notify.notified().await;
        }
    }
}

/// Raises a [`StopReading`] when dropped.
struct StopOnDrop(StopReading);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// How long the builder-output reader waits for data before looking at its
/// [`StopReading`] flag again.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Waits until `f` is readable (data, end of file or an error: `read` will not
/// block) and returns `true`; returns `false` when nothing is ready and `stop` is
/// raised.
fn wait_readable(f: &File, stop: &StopReading) -> bool {
    loop {
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, the file is open for the whole call.
        let n = unsafe { libc::poll(&mut pfd, 1, STOP_POLL.as_millis() as libc::c_int) };
        if n > 0 {
            return true;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // Let `read` report it.
            return true;
        }
        if stop.is_stopped() {
            return false;
        }
    }
}

/// Kills a hook's process group from elsewhere (an alarm or a cancellation while the
/// job runs).
#[derive(Debug, Clone, Copy)]
pub struct Killer(Pid);

impl Killer {
    pub fn kill(&self) {
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}
