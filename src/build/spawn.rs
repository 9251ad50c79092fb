//! Starting the builder: a [`Command`] set up as Nix 2.8 runs builders without a
//! sandbox: environment cleared and replaced, `argv[0]` = base name of the builder,
//! cwd = the build directory, umask 0022, stdin `/dev/null`, stdout and stderr the
//! slave side of a fresh pseudo-terminal in raw mode (no `\n` → `\r\n`), the builder a
//! session leader (`setsid`) WITHOUT a controlling terminal, as in Nix (`O_NOCTTY`):
//! were the pty its controlling terminal, the kernel would hang up the session when
//! the builder exits and kill the background children Nix lets finish. The caller
//! reads the master ([`read_pty`]; `EIO` once every slave is closed means EOF: every
//! process holding the pty is done) and then kills the whole process group
//! ([`kill_process_group`]), as on cancel or timeout.

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
    // SAFETY: only async-signal-safe calls (setsid, umask, setgroups, setgid,
    // setuid) between fork and exec; `groups` is allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
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

/// The builder of [`builder_command`] started with `posix_spawn` instead of `fork`.
///
/// glibc's `posix_spawn` runs the child on the parent's memory until `execve`
/// (`CLONE_VM | CLONE_VFORK`), so nothing of the parent is copied; a `fork` copies
/// the page tables of the whole (multi-threaded, goal-laden) drover process, which
/// made starting builders the largest cost of big builds. Same set-up as the
/// `pre_exec` path: `POSIX_SPAWN_SETSID`, the pty slave opened by path with
/// `O_NOCTTY` (so not the controlling terminal), stdin `/dev/null`, stdout and stderr the slave, cwd the
/// build dir, signal mask and dispositions reset. Only used when the process umask
/// is already 0022 (`posix_spawn` cannot set it) and no build user is involved.
#[derive(Debug)]
pub struct FastSpawn {
    program: std::ffi::CString,
    argv: Vec<std::ffi::CString>,
    envp: Vec<std::ffi::CString>,
    cwd: std::ffi::CString,
    slave: std::ffi::CString,
}

/// The process umask, from `/proc/self/status` (reading it with `umask(2)` would
/// change it for every thread for a moment).
fn process_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
}

/// A [`FastSpawn`] of the builder, when it applies: no build user, umask 0022, an
/// absolute builder path, no NUL bytes; `None` means use the `Command`.
pub fn fast_spawn_plan(
    benv: &BuilderEnv,
    build_top: &Path,
    user: Option<&Credentials>,
    master: &OwnedFd,
) -> Option<FastSpawn> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    static UMASK_OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if user.is_some()
        || !*UMASK_OK.get_or_init(|| process_umask() == Some(0o022))
        || !benv.builder.starts_with('/')
    {
        return None;
    }
    let slave = slave_path(master)?;
    let argv = std::iter::once(benv.arg0.as_str())
        .chain(benv.args.iter().map(String::as_str))
        .map(|a| CString::new(a).ok())
        .collect::<Option<Vec<_>>>()?;
    let envp = benv
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect::<Option<Vec<_>>>()?;
    Some(FastSpawn {
        program: CString::new(benv.builder.as_str()).ok()?,
        argv,
        envp,
        cwd: CString::new(build_top.as_os_str().as_bytes()).ok()?,
        slave: CString::new(slave).ok()?,
    })
}

/// The path of the pty slave of `master` (`ptsname_r`).
fn slave_path(master: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = [0 as nix::libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `buf.len()` bytes.
    let r = unsafe { nix::libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_bytes().to_vec())
}

impl FastSpawn {
    /// Starts the builder; its pid. An `Err` is the `execve` failure (or a set-up
    /// failure) as an OS error, as `Command::spawn` reports it.
    pub fn spawn(&self) -> io::Result<u32> {
        use nix::libc;
        let check = |r: libc::c_int| {
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(r))
            }
        };
        let mut argv: Vec<*mut libc::c_char> =
            self.argv.iter().map(|a| a.as_ptr() as *mut _).collect();
        argv.push(std::ptr::null_mut());
        let mut envp: Vec<*mut libc::c_char> =
            self.envp.iter().map(|a| a.as_ptr() as *mut _).collect();
        envp.push(std::ptr::null_mut());
        // SAFETY: the attribute and file-action objects are initialised before use
        // and destroyed on every path; every pointer passed stays alive (owned by
        // `self`, `argv`, `envp`) until posix_spawn returns.
        unsafe {
            let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
            let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
            check(libc::posix_spawnattr_init(&mut attr))?;
            if let Err(e) = check(libc::posix_spawn_file_actions_init(&mut fa)) {
                libc::posix_spawnattr_destroy(&mut attr);
                return Err(e);
            }
            let r = (|| {
                let mut empty: libc::sigset_t = std::mem::zeroed();
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigfillset(&mut all);
                check(libc::posix_spawnattr_setsigmask(&mut attr, &empty))?;
                check(libc::posix_spawnattr_setsigdefault(&mut attr, &all))?;
                check(libc::posix_spawnattr_setflags(
                    &mut attr,
                    (libc::POSIX_SPAWN_SETSID as libc::c_int
                        | libc::POSIX_SPAWN_SETSIGMASK
                        | libc::POSIX_SPAWN_SETSIGDEF) as _,
                ))?;
                check(libc::posix_spawn_file_actions_addopen(
                    &mut fa,
                    0,
                    c"/dev/null".as_ptr(),
                    libc::O_RDONLY,
                    0,
                ))?;
                check(libc::posix_spawn_file_actions_addopen(
                    &mut fa,
                    1,
                    self.slave.as_ptr(),
                    libc::O_RDWR | libc::O_NOCTTY,
                    0,
                ))?;
                check(libc::posix_spawn_file_actions_adddup2(&mut fa, 1, 2))?;
                check(libc::posix_spawn_file_actions_addchdir_np(
                    &mut fa,
                    self.cwd.as_ptr(),
                ))?;
                let mut pid: libc::pid_t = 0;
                check(libc::posix_spawn(
                    &mut pid,
                    self.program.as_ptr(),
                    &fa,
                    &attr,
                    argv.as_ptr(),
                    envp.as_ptr(),
                ))?;
                Ok(pid as u32)
            })();
            libc::posix_spawn_file_actions_destroy(&mut fa);
            libc::posix_spawnattr_destroy(&mut attr);
            r
        }
    }
}

/// Waits for a process started by [`FastSpawn::spawn`] (blocking).
pub fn wait_pid(pid: u32) -> io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let mut status: nix::libc::c_int = 0;
    loop {
        // SAFETY: waitpid writes only the status integer.
        let r = unsafe { nix::libc::waitpid(pid as _, &mut status, 0) };
        if r == pid as nix::libc::pid_t {
            return Ok(std::process::ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
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
    fn fast_spawn_sets_up_the_process_like_the_command() {
        if process_umask() != Some(0o022) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = "echo \"$FOO $HOME\"; [ -t 1 ] && echo tty1; [ -t 2 ] && echo tty2; [ -t 0 ] || echo notty0; umask; pwd; \
             [ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ] && echo leader; echo err >&2; exit 3";
        let (cmd, master) = builder_command(&benv(script), dir.path(), None).unwrap();
        let plan = fast_spawn_plan(&benv(script), dir.path(), None, &master).expect("applies");
        let pid = plan.spawn().unwrap();
        drop(cmd);
        let mut out = Vec::new();
        read_pty(master, |b| out.extend_from_slice(b)).unwrap();
        let st = wait_pid(pid).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert_eq!(st.code(), Some(3));
        assert!(s.starts_with("bar \n"), "{s:?}");
        assert!(s.contains("tty1\ntty2\nnotty0\n0022\n"), "{s:?}");
        assert!(s.contains(&format!("{}\n", dir.path().display())), "{s:?}");
        assert!(s.contains("leader\n"), "{s:?}");
        assert!(!s.contains('\r'), "raw mode: {s:?}");
        assert!(s.ends_with("err\n"), "{s:?}");
        // An unexecutable builder is an error of spawn, as with Command.
        let mut missing = benv("true");
        missing.builder = "/nonexistent/builder".into();
        let (_cmd, master) = builder_command(&missing, dir.path(), None).unwrap();
        let plan = fast_spawn_plan(&missing, dir.path(), None, &master).unwrap();
        assert_eq!(
            plan.spawn().unwrap_err().raw_os_error(),
            Some(nix::libc::ENOENT)
        );
        // Build users need the fork path.
        let user = Credentials {
            uid: 1,
            gid: 1,
            groups: vec![],
        };
        assert!(fast_spawn_plan(&benv("true"), dir.path(), Some(&user), &master).is_none());
    }

    #[test]
    fn no_controlling_terminal_so_background_children_outlive_the_builder() {
        // Both ways of starting: the builder has no controlling terminal (field 7 of
        // /proc/PID/stat is 0), and its background child, still holding the pty,
        // writes after the builder has exited; EOF comes only after that.
        let dir = tempfile::tempdir().unwrap();
        let script = "cut -d' ' -f7 /proc/$$/stat; (sleep 1; echo late) & exit 0";
        let (mut cmd, master) = builder_command(&benv(script), dir.path(), None).unwrap();
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let mut out = Vec::new();
        read_pty(master, |b| out.extend_from_slice(b)).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0));
        assert_eq!(String::from_utf8(out).unwrap(), "0\nlate\n");
        if process_umask() == Some(0o022) {
            let (cmd, master) = builder_command(&benv(script), dir.path(), None).unwrap();
            let plan = fast_spawn_plan(&benv(script), dir.path(), None, &master).unwrap();
            let pid = plan.spawn().unwrap();
            drop(cmd);
            let mut out = Vec::new();
            read_pty(master, |b| out.extend_from_slice(b)).unwrap();
            assert_eq!(wait_pid(pid).unwrap().code(), Some(0));
            assert_eq!(String::from_utf8(out).unwrap(), "0\nlate\n");
        }
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
