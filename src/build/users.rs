//! Build users (Nix 2.8's `UserLock`): when drover runs as root and
//! `build-users-group` names a group, every build runs as one of that group's
//! members, a user no other build is using. A user is taken by `flock`ing
//! `<state dir>/userpool/<uid>`; it is released when the lock is dropped. Before and
//! after a build every process of the user is killed ([`kill_user`]); the build
//! directory and the files in it belong to the user, and the builder drops to its
//! uid, gid and supplementary groups.

use std::fs::File;
use std::path::Path;

use thiserror::Error;

use crate::store::locks::{lock_fd, open_lock_file, LockType};

/// Why no build user could be taken.
#[derive(Debug, Error)]
pub enum UserError {
    #[error("the group '{0}' specified in 'build-users-group' does not exist")]
    NoGroup(String),
    #[error("the build users group '{0}' has no members")]
    NoMembers(String),
    #[error("the user '{user}' in the group '{group}' does not exist")]
    NoUser { user: String, group: String },
    #[error("the Nix user should not be a member of '{0}'")]
    SelfInGroup(String),
    #[error("opening user lock '{path}': {source}")]
    Lock {
        path: String,
        source: std::io::Error,
    },
}

/// A build user held for the duration of a build.
#[derive(Debug)]
pub struct BuildUser {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of the user (without the build group itself).
    pub groups: Vec<u32>,
    _lock: File,
}

/// Whether builds use build users: running as root with a non-empty group.
pub fn use_build_users(group: Option<&str>) -> bool {
    nix::unistd::geteuid().is_root() && group.is_some_and(|g| !g.is_empty())
}

/// Takes a free member of `group`; `Ok(None)` when all are busy (wait and retry).
pub fn acquire(state_dir: &Path, group: &str) -> Result<Option<BuildUser>, UserError> {
    let gr = nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .ok_or_else(|| UserError::NoGroup(group.to_owned()))?;
    if gr.mem.is_empty() {
        return Err(UserError::NoMembers(group.to_owned()));
    }
    let pool = state_dir.join("userpool");
    std::fs::create_dir_all(&pool).map_err(|source| UserError::Lock {
        path: pool.display().to_string(),
        source,
    })?;
    for name in &gr.mem {
        let pw = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| UserError::NoUser {
                user: name.clone(),
                group: group.to_owned(),
            })?;
        let path = pool.join(pw.uid.as_raw().to_string());
        let lock_err = |source| UserError::Lock {
            path: path.display().to_string(),
            source,
        };
        let f = open_lock_file(&path, true)
            .map_err(|e| lock_err(std::io::Error::other(e.to_string())))?
            .ok_or_else(|| lock_err(std::io::ErrorKind::NotFound.into()))?;
        if lock_fd(&f, LockType::Write, false).map_err(lock_err)? {
            let uid = pw.uid.as_raw();
            if uid == nix::unistd::getuid().as_raw() || uid == nix::unistd::geteuid().as_raw() {
                return Err(UserError::SelfInGroup(group.to_owned()));
            }
            let groups = supplementary_groups(name, gr.gid.as_raw());
            return Ok(Some(BuildUser {
                user: name.clone(),
                uid,
                gid: gr.gid.as_raw(),
                groups,
                _lock: f,
            }));
        }
    }
    Ok(None)
}

fn supplementary_groups(user: &str, gid: u32) -> Vec<u32> {
    let Ok(cuser) = std::ffi::CString::new(user) else {
        return Vec::new();
    };
    nix::unistd::getgrouplist(&cuser, nix::unistd::Gid::from_raw(gid))
        .map(|gs| {
            gs.into_iter()
                .map(|g| g.as_raw())
                .filter(|g| *g != gid)
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process of `uid` (Nix's `killUser`): a child drops to the uid and
/// sends SIGKILL to all processes it may signal (`kill(-1, SIGKILL)`).
pub fn kill_user(uid: u32) {
    if uid == 0 {
        return;
    }
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg("true");
    // SAFETY: only async-signal-safe calls (setuid, kill, _exit) after fork.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if nix::libc::setuid(uid) == -1 {
                nix::libc::_exit(1);
            }
            // One kill(-1) signals every process of the uid; retry only on EINTR.
            loop {
                if nix::libc::kill(-1, nix::libc::SIGKILL) == 0 {
                    break;
                }
                if *nix::libc::__errno_location() != nix::libc::EINTR {
                    break;
                }
            }
            nix::libc::_exit(0);
        });
    }
    if let Ok(mut c) = cmd.spawn() {
        let _ = c.wait();
    }
}
