//! Starting the builder: a [`Command`] set up as Nix 2.8 runs builders without a
//! sandbox: environment cleared and replaced, `argv[0]` = base name of the builder,
//! cwd = the build directory, umask 0022, stdin `/dev/null`, stdout and stderr the
//! slave side of a fresh pseudo-terminal in raw mode (no `\n` → `\r\n`), the builder a
//! session leader (`setsid`) with the pty as controlling terminal. The caller reads
//! the master ([`read_pty`]; `EIO` once every slave is closed means EOF) and kills the
//! whole process group on cancel or timeout ([`kill_process_group`]).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use thiserror::Error;

use super::env::BuilderEnv;

/// Why the builder could not be set up.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("opening pseudoterminal: {0}")]
    Pty(nix::Error),
    #[error("setting up pseudoterminal: {0}")]
    PtySetup(nix::Error),
    #[error("duplicating pseudoterminal descriptor: {0}")]
    Dup(io::Error),
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), SpawnError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(SpawnError::PtySetup)?;
    Ok(())
}

/// Who the builder runs as (a build user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// The builder command and the pty master. Drop the command (or the `Stdio`s it
/// holds) once spawned, so the master sees EOF when the builder exits.
pub fn builder_command(
    benv: &BuilderEnv,
    build_top: &Path,
    user: Option<Credentials>,
) -> Result<(Command, OwnedFd), SpawnError> {
    let pty = nix::pty::openpty(None, None).map_err(SpawnError::Pty)?;
    let (master, slave) = (pty.master, pty.slave);
    set_cloexec(&master)?;
    set_cloexec(&slave)?;
    {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let mut t = tcgetattr(&slave).map_err(SpawnError::PtySetup)?;
        cfmakeraw(&mut t);
        tcsetattr(&slave, SetArg::TCSANOW, &t).map_err(SpawnError::PtySetup)?;
    }
    let slave2 = slave.try_clone().map_err(SpawnError::Dup)?;
    let mut cmd = Command::new(&benv.builder);
    cmd.arg0(&benv.arg0)
        .args(&benv.args)
        .env_clear()
        .envs(&benv.env)
        .current_dir(build_top)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::from(slave2));
    let groups: Vec<nix::libc::gid_t> = user.as_ref().map(|u| u.groups.clone()).unwrap_or_default();
    let ids = user.as_ref().map(|u| (u.uid, u.gid));
    // SAFETY: only async-signal-safe calls (setsid, ioctl, umask, setgroups, setgid,
    // setuid) between fork and exec; `groups` is allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            if nix::libc::ioctl(1, nix::libc::TIOCSCTTY as _, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            if let Some((uid, gid)) = ids {
                if nix::libc::setgroups(groups.len() as _, groups.as_ptr()) == -1
                    || nix::libc::setgid(gid) == -1
                    || nix::libc::setuid(uid) == -1
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok((cmd, master))
}

/// Reads the pty master until EOF (a read of 0, or `EIO` once the slave side is
/// closed), passing each chunk (at most 4096 bytes, as Nix reads) to `f`.
pub fn read_pty(master: OwnedFd, mut f: impl FnMut(&[u8])) -> io::Result<()> {
    let mut file = File::from(master);
    let mut buf = [0u8; 4096];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => f(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends SIGKILL to the process group of the builder (its pid: it is a session
/// leader). A group that is already gone is fine.
pub fn kill_process_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn benv(script: &str) -> BuilderEnv {
        BuilderEnv {
            env: BTreeMap::from([("FOO".to_string(), "bar".to_string())]),
            files: vec![],
            builder: "/bin/sh".into(),
            arg0: "sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    fn run(script: &str) -> (Vec<u8>, std::process::ExitStatus) {
        let dir = tempfile::tempdir().unwrap();
        let (mut cmd, master) = builder_command(&benv(script), dir.path(), None).unwrap();
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let mut out = Vec::new();
        read_pty(master, |b| out.extend_from_slice(b)).unwrap();
        (out, child.wait().unwrap())
    }

    #[test]
    fn process_setup() {
        let (out, st) = run(
            "echo \"$FOO $HOME\"; [ -t 1 ] && echo tty1; [ -t 2 ] && echo tty2; [ -t 0 ] || echo notty0; umask; pwd; \
             [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ] && echo leader; echo err >&2; exit 3",
        );
        let s = String::from_utf8(out).unwrap();
        assert_eq!(st.code(), Some(3));
        assert!(s.starts_with("bar \n"), "{s:?}");
        assert!(s.contains("tty1\ntty2\nnotty0\n0022\n"), "{s:?}");
        assert!(s.contains("leader\n"), "{s:?}");
        assert!(!s.contains('\r'), "raw mode: {s:?}");
        assert!(s.ends_with("err\n"), "{s:?}");
    }

    #[test]
    fn kill_group_kills_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cmd, master) =
            builder_command(&benv("sleep 100 & sleep 100; echo never"), dir.path(), None).unwrap();
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let pid = child.id();
        let t = std::thread::spawn(move || {
            let mut out = Vec::new();
            read_pty(master, |b| out.extend_from_slice(b)).unwrap();
            out
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        kill_process_group(pid);
        let st = child.wait().unwrap();
        assert!(st.code().is_none());
        // EOF arrives: the background sleep died too
        assert!(t.join().unwrap().is_empty());
    }
}
