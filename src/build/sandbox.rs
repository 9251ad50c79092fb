//! The Linux build sandbox (Nix 2.8's `useChroot` builds).
//!
//! [`use_chroot`] decides whether a build is sandboxed (`sandbox = true`: always;
//! `relaxed`: unless fixed-output, impure or `__noChroot`; `false`: never). A
//! sandboxed build then goes through these steps, in Nix 2.8's order:
//!
//! 1. [`Chroot::create`] (parent, before any process): the bind list
//!    (`sandbox-paths`/`extra-sandbox-paths` as `target[=source][?]`, the build
//!    directory at `sandbox-build-dir`, the closure of store paths among those
//!    sources, `__impureHostDeps` within `allowed-impure-host-deps`), the chroot
//!    directory `<real store>/<drv>.chroot` (0750, group the build user's), `/tmp`
//!    (1777), `/etc/group`, `/etc/hosts` (not for fixed-output derivations), the fake
//!    store directory (1775) holding the input closure (directories bind-mounted,
//!    other paths hard-linked), and the outputs removed from the bind list; then
//!    `pre-build-hook`, if set, with the `.drv` and the chroot as arguments
//!    ([`Chroot::run_pre_build_hook`]).
//! 2. [`start`]: a helper process is forked (single-threaded, so the namespace child
//!    may allocate), which `clone`s the builder with `CLONE_NEWUSER | CLONE_NEWNS |
//!    CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS` (plus `CLONE_NEWNET` unless
//!    fixed-output) and `CLONE_PARENT`, so the builder is drover's own child; on
//!    `EPERM`/`EINVAL` it retries without `CLONE_NEWUSER`, and when that fails too
//!    it asks for the `sandbox-fallback`. The parent writes the child's
//!    `uid_map` (`1000 <build user or caller> 1`), `setgroups` (`deny`) and `gid_map`
//!    (`100 <gid> 1`) and `/etc/passwd`, then lets the child go on.
//! 3. The child (`run_child`): session leader with the pty slave as stdout/stderr,
//!    loopback up (private network), hostname `localhost`, domain `(none)`, `/`
//!    made private, the chroot and its store bind-mounted onto themselves, a minimal
//!    `/dev` (`full`, `kvm` with the `kvm` feature, `null`, `random`, `tty`,
//!    `urandom`, `zero` bound from the host; `fd`, `stdin`, `stdout`, `stderr`
//!    links), for fixed-output derivations `/etc/nsswitch.conf` and the host's
//!    `/etc/resolv.conf`, `/etc/services`, `/etc/hosts`; every bind mount; a new
//!    `/proc`, a `tmpfs` on `/dev/shm` (`sandbox-dev-shm-size`), a new `devpts` on
//!    `/dev/pts` with `/dev/ptmx` linked to it; a new mount namespace, `pivot_root`
//!    into the chroot, the old root detached, uid 1000 and gid 100 (in the user
//!    namespace), cwd `/build`, core dumps off, address space randomisation off.
//!    It reports ready (or the error that stopped it) on a status pipe and waits.
//! 4. [`SandboxedBuilder::spawn`] tells it to `execve` the builder and reports an
//!    `execve` failure as `Command::spawn` would.
//! 5. After the build, outputs are read from the chroot's store
//!    ([`super::outputs::ScratchOutputs::chroot`]) and moved to the real store when
//!    registered (or, after a failure, for inspection); [`Chroot`] deletes the
//!    chroot on drop.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::libc;
use thiserror::Error;

use super::env::BuilderEnv;
use crate::config::{SandboxMode, Settings};
use crate::derivation::{Derivation, DerivationType};
use crate::store::{LocalStore, StoreError};

/// The sandbox settings of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSettings {
    /// `sandbox`.
    pub mode: SandboxMode,
    /// `sandbox-fallback`: build unsandboxed when the kernel refuses the namespaces.
    pub fallback: bool,
    /// `sandbox-paths` (with `extra-sandbox-paths`): `target[=source][?]` entries.
    pub paths: Vec<String>,
    /// `sandbox-build-dir` (`/build`): the build directory inside the sandbox.
    pub build_dir: String,
    /// `sandbox-dev-shm-size` (`50%`): the `size=` of the `/dev/shm` tmpfs.
    pub dev_shm_size: String,
    /// `allowed-impure-host-deps`: prefixes `__impureHostDeps` may name.
    pub allowed_impure_host_deps: Vec<String>,
    /// `kvm` is among the `system-features`: `/dev/kvm` goes into the sandbox.
    pub kvm: bool,
    /// `pre-build-hook`: run before each sandboxed build; it may add bind mounts.
    pub pre_build_hook: Option<String>,
}

impl SandboxSettings {
    pub fn from_settings(s: &Settings) -> SandboxSettings {
        SandboxSettings {
            mode: s.sandbox(),
            fallback: s.sandbox_fallback(),
            paths: s.sandbox_paths(),
            build_dir: s.sandbox_build_dir(),
            dev_shm_size: s.sandbox_dev_shm_size(),
            allowed_impure_host_deps: s.allowed_impure_host_deps(),
            kvm: s.system_features().contains("kvm"),
            pre_build_hook: s.pre_build_hook(),
        }
    }

    /// No sandbox (`sandbox = false`).
    pub fn disabled() -> SandboxSettings {
        SandboxSettings {
            mode: SandboxMode::Disabled,
            fallback: true,
            paths: Vec::new(),
            build_dir: "/build".into(),
            dev_shm_size: "50%".into(),
            allowed_impure_host_deps: Vec::new(),
            kvm: false,
            pre_build_hook: None,
        }
    }
}

/// Why a build cannot run as the sandbox settings ask, or the sandbox could not be
/// set up (Nix's messages).
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error(
        "derivation '{0}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"
    )]
    NoChrootNotAllowed(String),
    #[error("derivation '{drv}' requested impure path '{path}', but it was not in allowed-impure-host-deps")]
    ImpureHostDep { drv: String, path: String },
    #[error("{what}: {}", strerror(source))]
    Sys { what: String, source: io::Error },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot perform a sandboxed build because user namespaces are not enabled; check /proc/sys/user/max_user_namespaces")]
    NoUserNamespaces,
    #[error("unable to start build process")]
    StartFailed,
    /// The child stopped while setting up the sandbox; its message.
    #[error("{0}")]
    Child(String),
    #[error("while waiting for the build environment for '{drv}' to initialize ({status}, previous messages: )")]
    ChildDied { drv: String, status: String },
    #[error("unknown pre-build hook command '{0}'")]
    UnknownHookCommand(String),
    #[error("program '{program}' {status}")]
    HookFailed { program: String, status: String },
    /// The namespaces could not be created and `sandbox-fallback` is set: build
    /// without the sandbox (not an error the user sees).
    #[error("the sandbox could not be created; falling back to an unsandboxed build")]
    Fallback,
}

/// The C library's text for an OS error (`No such file or directory`), as Nix's
/// `SysError` prints it.
pub fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => e.to_string(),
    }
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Sys { what, source }
}

/// A boolean derivation attribute as Nix's `ParsedDerivation::getBoolAttr`: with
/// structured attributes a JSON `true`, else the environment value `1`.
pub fn bool_attr(drv: &Derivation, name: &str) -> bool {
    match super::env::structured_attrs(drv) {
        Ok(Some(m)) => m.get(name).and_then(|v| v.as_bool()).unwrap_or(false),
        _ => drv.env.get(name).is_some_and(|v| v == "1"),
    }
}

fn strings_attr(drv: &Derivation, name: &str) -> Vec<String> {
    match super::env::structured_attrs(drv) {
        Ok(Some(m)) => m
            .get(name)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        _ => drv
            .env
            .get(name)
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

/// Whether the build of `drv` (printed `drv_path`) runs in the sandbox, as Nix 2.8
/// decides it: always with `sandbox = true` (where `__noChroot` is an error), never
/// with `false`, and with `relaxed` unless the derivation is fixed-output or impure
/// or sets `__noChroot`.
pub fn use_chroot(
    mode: SandboxMode,
    drv: &Derivation,
    ty: DerivationType,
    drv_path: &str,
) -> Result<bool, SandboxError> {
    let no_chroot = bool_attr(drv, "__noChroot");
    Ok(match mode {
        SandboxMode::Enabled => {
            if no_chroot {
                return Err(SandboxError::NoChrootNotAllowed(drv_path.to_owned()));
            }
            true
        }
        SandboxMode::Disabled => false,
        SandboxMode::Relaxed => ty.is_sandboxed() && !no_chroot,
    })
}

/// One entry of the bind list: what is mounted at a path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindSource {
    pub source: String,
    /// `path?`: a missing source is skipped.
    pub optional: bool,
}

/// Parses `sandbox-paths` entries (`target`, `target=source`, either with a
/// trailing `?` for optional) into the bind list.
pub fn parse_sandbox_paths(paths: &[String]) -> BTreeMap<String, BindSource> {
    let mut dirs = BTreeMap::new();
    for entry in paths {
        if entry.is_empty() {
            continue;
        }
        let (entry, optional) = match entry.strip_suffix('?') {
            Some(e) => (e, true),
            None => (entry.as_str(), false),
        };
        let (target, source) = match entry.split_once('=') {
            Some((t, s)) => (t, s),
            None => (entry, entry),
        };
        dirs.insert(
            target.to_owned(),
            BindSource {
                source: source.to_owned(),
                optional,
            },
        );
    }
    dirs
}

/// The bind mounts a `pre-build-hook` asks for: `extra-sandbox-paths` (or
/// `extra-chroot-dirs`) on a line of its own, then `target[=source]` lines up to an
/// empty line; any other command is an error. Only complete lines count.
pub fn parse_hook_output(out: &str) -> Result<Vec<(String, String)>, SandboxError> {
    let mut binds = Vec::new();
    let mut in_paths = false;
    let mut rest = out;
    while let Some(nl) = rest.find('\n') {
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        if !in_paths {
            if line == "extra-sandbox-paths" || line == "extra-chroot-dirs" {
                in_paths = true;
            } else {
                return Err(SandboxError::UnknownHookCommand(line.to_owned()));
            }
        } else if line.is_empty() {
            in_paths = false;
        } else {
            let (t, s) = line.split_once('=').unwrap_or((line, line));
            binds.push((t.to_owned(), s.to_owned()));
        }
    }
    Ok(binds)
}

/// `canonPath` without resolving symlinks: absolute, no `.`, `..` or double slashes.
fn canon_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The chroot directory of a sandboxed build, deleted on drop.
#[derive(Debug)]
pub struct Chroot {
    /// `<real store dir>/<drv name>.chroot`.
    pub root: PathBuf,
    /// Target inside the sandbox → what is bind-mounted there (sorted, so parents
    /// are mounted before what is inside them).
    pub dirs: BTreeMap<String, BindSource>,
    /// The printed store dir (the fake store is `root` + this).
    pub store_dir: String,
    /// A fixed-output or impure derivation: host network, resolver files.
    pub host_network: bool,
    keep: bool,
}

fn path_in(root: &Path, abs: &str) -> PathBuf {
    let mut s = root.as_os_str().to_owned();
    s.push(abs);
    PathBuf::from(s)
}

fn chown(p: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<(), SandboxError> {
    nix::unistd::chown(
        p,
        uid.map(nix::unistd::Uid::from_raw),
        gid.map(nix::unistd::Gid::from_raw),
    )
    .map_err(|e| SandboxError::Sys {
        what: format!("cannot change ownership of '{}'", p.display()),
        source: e.into(),
    })
}

fn chmod(p: &Path, mode: u32) -> Result<(), SandboxError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(sys(format!("changing mode of '{}'", p.display())))
}

fn create_dirs(p: &Path) -> Result<(), SandboxError> {
    std::fs::create_dir_all(p).map_err(sys(format!("creating directory '{}'", p.display())))
}

fn write_file(p: &Path, contents: &str) -> Result<(), SandboxError> {
    std::fs::write(p, contents).map_err(sys(format!("writing to file '{}'", p.display())))
}

impl Chroot {
    /// Sets up the chroot of a build (step 1 of the module docs). `tmp_dir` is the
    /// build directory on the host; `build_gid` the build user's group.
    pub fn create(
        store: &LocalStore,
        ss: &SandboxSettings,
        spec: &super::BuildSpec,
        ty: DerivationType,
        tmp_dir: &Path,
        build_gid: Option<u32>,
    ) -> Result<Chroot, SandboxError> {
        let sd = store.store_dir();
        let drv_printed = sd.print(&spec.drv_path);
        let mut dirs = parse_sandbox_paths(&ss.paths);
        dirs.insert(
            ss.build_dir.clone(),
            BindSource {
                source: tmp_dir.display().to_string(),
                optional: false,
            },
        );
        // The closure of the store paths among the sources.
        let mut closure = crate::store_path::StorePathSet::new();
        for b in dirs.values() {
            if !sd.is_in_store(&b.source) {
                continue;
            }
            let Ok(p) = sd.parse_prefix(&b.source) else {
                continue;
            };
            match store.compute_closure(std::slice::from_ref(&p)) {
                Ok(c) => closure.extend(c),
                Err(StoreError::InvalidPath(_)) => {}
                Err(e) => {
                    return Err(SandboxError::Child(format!(
                        "{e}\n       while processing 'sandbox-paths'"
                    )))
                }
            }
        }
        for p in &closure {
            let printed = sd.print(p);
            dirs.insert(
                printed.clone(),
                BindSource {
                    source: printed,
                    optional: false,
                },
            );
        }
        for i in strings_attr(&spec.drv, "__impureHostDeps") {
            let canon = canon_path(&i);
            let found = ss.allowed_impure_host_deps.iter().any(|a| {
                let a = canon_path(a);
                canon == a || canon.starts_with(&format!("{}/", a.trim_end_matches('/')))
            });
            if !found {
                return Err(SandboxError::ImpureHostDep {
                    drv: drv_printed,
                    path: i,
                });
            }
            dirs.insert(
                i.clone(),
                BindSource {
                    source: i,
                    optional: true,
                },
            );
        }

        let mut root = store.real_path(&spec.drv_path).into_os_string();
        root.push(".chroot");
        let root = PathBuf::from(root);
        super::outputs::remove_tree(&root)?;
        let mut chroot = Chroot {
            root: root.clone(),
            dirs: BTreeMap::new(),
            store_dir: sd.as_str().to_owned(),
            host_network: !ty.is_sandboxed(),
            keep: false,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o750)
                .create(&root)
                .map_err(sys(format!("cannot create '{}'", root.display())))?;
        }
        chmod(&root, 0o750)?;
        if build_gid.is_some() {
            chown(&root, Some(0), build_gid)?;
        }
        let tmp = root.join("tmp");
        create_dirs(&tmp)?;
        chmod(&tmp, 0o1777)?;
        create_dirs(&root.join("etc"))?;
        write_file(
            &root.join("etc/group"),
            &format!("root:x:0:\nnixbld:!:{}:\nnogroup:x:65534:\n", SANDBOX_GID),
        )?;
        if ty.is_sandboxed() {
            write_file(
                &root.join("etc/hosts"),
                "127.0.0.1 localhost\n::1 localhost\n",
            )?;
        }
        let store_in_root = path_in(&root, sd.as_str());
        create_dirs(&store_in_root)?;
        chmod(&store_in_root, 0o1775)?;
        if build_gid.is_some() {
            chown(&store_in_root, Some(0), build_gid)?;
        }
        for p in &spec.input_closure {
            let printed = sd.print(p);
            let real = store.real_path(p);
            let meta = std::fs::symlink_metadata(&real)
                .map_err(sys(format!("getting status of '{}'", real.display())))?;
            if meta.is_dir() {
                dirs.insert(
                    printed,
                    BindSource {
                        source: real.display().to_string(),
                        optional: false,
                    },
                );
            } else {
                let dst = path_in(&root, &printed);
                if std::fs::hard_link(&real, &dst).is_err() {
                    std::fs::copy(&real, &dst).map_err(sys(format!(
                        "copying '{}' to '{}'",
                        real.display(),
                        dst.display()
                    )))?;
                }
            }
        }
        // Outputs being rebuilt must not be bind-mounted from the host.
        for (name, out) in &spec.drv.outputs {
            if let Some(p) = spec.output_paths.get(name).or_else(|| out.path()) {
                dirs.remove(&sd.print(p));
            }
        }
        chroot.dirs = dirs;
        Ok(chroot)
    }

    /// Runs `pre-build-hook` as Nix 2.8 does for sandboxed builds: with the `.drv`
    /// path and the chroot directory as arguments, its stderr passed through; its
    /// stdout may ask for more bind mounts ([`parse_hook_output`]).
    pub fn run_pre_build_hook(&mut self, hook: &str, drv_path: &str) -> Result<(), SandboxError> {
        let child = std::process::Command::new(hook)
            .arg(drv_path)
            .arg(&self.root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(sys(format!("executing '{hook}'")))?;
        let out = child
            .wait_with_output()
            .map_err(sys(format!("waiting for '{hook}'")))?;
        if !out.status.success() {
            return Err(SandboxError::HookFailed {
                program: hook.to_owned(),
                status: super::status_to_string(out.status),
            });
        }
        for (target, source) in parse_hook_output(&String::from_utf8_lossy(&out.stdout))? {
            self.dirs.insert(
                target,
                BindSource {
                    source,
                    optional: false,
                },
            );
        }
        Ok(())
    }

    /// Where `p` (a store path) is inside the chroot, seen from the host.
    pub fn real_path(&self, printed: &str) -> PathBuf {
        path_in(&self.root, printed)
    }

    /// Leaves the chroot in place (nothing does this yet but debugging).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        if !self.keep {
            let _ = super::outputs::remove_tree(&self.root);
        }
    }
}

/// The uid of the builder inside the user namespace.
pub const SANDBOX_UID: u32 = 1000;
/// The gid of the builder inside the user namespace.
pub const SANDBOX_GID: u32 = 100;

/// Everything the namespace child needs, computed before any process exists.
struct ChildPlan {
    root: CString,
    store_in_root: CString,
    /// (source, target in the chroot, optional), in mount order.
    binds: Vec<(CString, CString, bool)>,
    /// Files to create before the binds: `(path, contents)`.
    files: Vec<(CString, Vec<u8>)>,
    /// Symlinks to create: `(target, link)`.
    links: Vec<(CString, CString)>,
    dirs_to_make: Vec<CString>,
    private_network: bool,
    /// Mount a tmpfs on `/dev/shm` with these options (host has `/dev/shm`).
    shm: Option<(CString, CString)>,
    /// Mount a devpts on this path and link `/dev/ptmx` (at the second path) to it.
    devpts: Option<(CString, CString, CString)>,
    proc_dir: CString,
    build_dir: CString,
    builder: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    slave: RawFd,
    /// Fds of the parent the child must close at once (the other pipe ends).
    close: Vec<RawFd>,
    ns_sync: RawFd,
    status: RawFd,
    go: RawFd,
    /// With a user namespace: 1000:100; else the build user's ids.
    uid: u32,
    gid: u32,
    using_userns: bool,
    build_uid_gid: Option<(u32, u32)>,
    personality: libc::c_ulong,
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SandboxError> {
    CString::new(s.as_ref().to_vec()).map_err(|_| SandboxError::Sys {
        what: format!("path '{}'", String::from_utf8_lossy(s.as_ref())),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

fn cpath(p: &Path) -> Result<CString, SandboxError> {
    cstr(p.as_os_str().as_bytes())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SandboxError::Sys {
        what: "creating pipe".into(),
        source: e.into(),
    })
}

/// A sandboxed builder, set up and waiting in its namespaces for [`Self::spawn`].
#[derive(Debug)]
pub struct SandboxedBuilder {
    pid: libc::pid_t,
    state: Mutex<Option<(OwnedFd, OwnedFd)>>,
}

/// The pty master and slave, as [`super::spawn::builder_command`] makes them.
pub fn open_pty() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let se = |what: &str| {
        let what = what.to_owned();
        move |e: nix::Error| SandboxError::Sys {
            what,
            source: e.into(),
        }
    };
    let pty = nix::pty::openpty(None, None).map_err(se("opening pseudoterminal"))?;
    for fd in [&pty.master, &pty.slave] {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(se("setting up pseudoterminal"))?;
    }
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let mut t = tcgetattr(&pty.slave).map_err(se("getting pseudoterminal attributes"))?;
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t)
        .map_err(se("putting pseudoterminal into raw mode"))?;
    Ok((pty.master, pty.slave))
}

/// Gives the pty slave of `master` to the build user, mode 0600 (as Nix does).
pub fn chown_pty_slave(master: &OwnedFd, uid: u32) -> Result<(), SandboxError> {
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `buf.len()` bytes.
    let r = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        return Err(sys("getting the pseudoterminal slave name")(
            io::Error::from_raw_os_error(r),
        ));
    }
    // SAFETY: on success `buf` holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    let path = Path::new(std::ffi::OsStr::from_bytes(name.to_bytes()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(sys("changing mode of pseudoterminal slave"))?;
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(0)),
    )
    .map_err(|e| SandboxError::Sys {
        what: "changing owner of pseudoterminal slave".into(),
        source: e.into(),
    })
}

/// Whether user namespaces are enabled (`/proc/sys/user/max_user_namespaces` exists
/// and is not 0).
pub fn user_namespaces_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim() != "0")
        .unwrap_or(false)
}

/// Starts the namespace child of a sandboxed build (steps 2 and 3 of the module
/// docs) with its stdout/stderr on `slave`; it waits for [`SandboxedBuilder::spawn`].
/// `build_user` is `(uid, gid)` of the build user, if any.
pub fn start(
    chroot: &Chroot,
    ss: &SandboxSettings,
    benv: &BuilderEnv,
    system: &str,
    slave: &OwnedFd,
    build_user: Option<(u32, u32)>,
    drv_printed: &str,
) -> Result<SandboxedBuilder, SandboxError> {
    let root = &chroot.root;
    let rp = |p: &str| cpath(&path_in(root, p));
    let mut dirs = chroot.dirs.clone();
    let mut files: Vec<(CString, Vec<u8>)> = Vec::new();
    let mut links = Vec::new();
    let mut dirs_to_make = Vec::new();
    let mut extra: Vec<&str> = Vec::new();
    let own_dev = !dirs.contains_key("/dev");
    if own_dev {
        dirs_to_make.push(rp("/dev/shm")?);
        dirs_to_make.push(rp("/dev/pts")?);
        extra.push("/dev/full");
        if ss.kvm && Path::new("/dev/kvm").exists() {
            extra.push("/dev/kvm");
        }
        extra.extend([
            "/dev/null",
            "/dev/random",
            "/dev/tty",
            "/dev/urandom",
            "/dev/zero",
        ]);
        for (t, l) in [
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
        ] {
            links.push((cstr(t)?, rp(l)?));
        }
    }
    if chroot.host_network {
        files.push((
            rp("/etc/nsswitch.conf")?,
            b"hosts: files dns\nservices: files\n".to_vec(),
        ));
        for p in ["/etc/resolv.conf", "/etc/services", "/etc/hosts"] {
            if Path::new(p).exists() {
                extra.push(p);
            }
        }
    }
    for p in extra {
        dirs.entry(p.to_owned()).or_insert(BindSource {
            source: p.to_owned(),
            optional: false,
        });
    }
    let mut binds = Vec::new();
    for (target, b) in &dirs {
        if b.source == "/proc" {
            continue;
        }
        binds.push((cstr(&b.source)?, rp(target)?, b.optional));
    }
    let shm = if Path::new("/dev/shm").exists() {
        Some((rp("/dev/shm")?, cstr(format!("size={}", ss.dev_shm_size))?))
    } else {
        None
    };
    let devpts = if Path::new("/dev/pts/ptmx").exists()
        && !path_in(root, "/dev/ptmx").exists()
        && !dirs.contains_key("/dev/pts")
    {
        Some((rp("/dev/pts")?, rp("/dev/ptmx")?, rp("/dev/pts/ptmx")?))
    } else {
        None
    };
    let personality = {
        let machine = nix::sys::utsname::uname()
            .map(|u| u.machine().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut p: libc::c_ulong = 0;
        if (system == "i686-linux" && machine == "x86_64")
            || system == "armv7l-linux"
            || system == "armv6l-linux"
        {
            // PER_LINUX32 (0x0008) of <sys/personality.h>.
            p |= 0x0008;
        }
        p
    };
    let (ns_r, ns_w) = pipe()?;
    let (st_r, st_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (pid_r, pid_w) = pipe()?;
    let mut argv = vec![cstr(&benv.arg0)?];
    for a in &benv.args {
        argv.push(cstr(a)?);
    }
    let envp = benv
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut plan = ChildPlan {
        root: cpath(root)?,
        store_in_root: rp(&chroot.store_dir)?,
        binds,
        files,
        links,
        dirs_to_make,
        private_network: !chroot.host_network,
        shm,
        devpts,
        proc_dir: rp("/proc")?,
        build_dir: cstr(&ss.build_dir)?,
        builder: cstr(&benv.builder)?,
        argv,
        envp,
        slave: slave.as_raw_fd(),
        close: vec![
            ns_w.as_raw_fd(),
            st_r.as_raw_fd(),
            go_w.as_raw_fd(),
            pid_r.as_raw_fd(),
            pid_w.as_raw_fd(),
        ],
        ns_sync: ns_r.as_raw_fd(),
        status: st_w.as_raw_fd(),
        go: go_r.as_raw_fd(),
        uid: SANDBOX_UID,
        gid: SANDBOX_GID,
        using_userns: user_namespaces_enabled(),
        build_uid_gid: build_user,
        personality,
    };
    let mut flags = libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_PARENT
        | libc::SIGCHLD;
    if plan.private_network {
        flags |= libc::CLONE_NEWNET;
    }
    let fallback = ss.fallback;
    let pid_w_raw = pid_w.as_raw_fd();
    // SAFETY: the forked helper is single-threaded; it only clones, writes to a pipe
    // and exits with `_exit`, never returning into Rust code of the parent.
    let helper = unsafe { libc::fork() };
    if helper == -1 {
        return Err(sys("unable to fork")(io::Error::last_os_error()));
    }
    if helper == 0 {
        // SAFETY: see above; `plan` is this process's copy.
        unsafe { helper_main(&mut plan, flags, fallback, pid_w_raw) }
    }
    drop(pid_w);
    drop(ns_r);
    drop(st_w);
    drop(go_r);
    let helper_status = wait_raw(helper);
    let mut line = String::new();
    let _ = std::fs::File::from(pid_r).read_to_string(&mut line);
    // Any failure of the helper (it printed why) means no sandbox: fall back when
    // `sandbox-fallback` allows it, as Nix does.
    match helper_status {
        Some(0) => {}
        _ if fallback => return Err(SandboxError::Fallback),
        _ => return Err(SandboxError::StartFailed),
    }
    let mut words = line.split_whitespace();
    let using_userns = words.next() == Some("1");
    let pid: libc::pid_t = words
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or(SandboxError::StartFailed)?;
    let child = SandboxedBuilder {
        pid,
        state: Mutex::new(Some((go_w, st_r))),
    };
    let (uid, gid) = if using_userns {
        let (host_uid, host_gid) = build_user.unwrap_or_else(|| {
            (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            )
        });
        let proc = |f: &str| PathBuf::from(format!("/proc/{pid}/{f}"));
        write_file(&proc("uid_map"), &format!("{SANDBOX_UID} {host_uid} 1"))?;
        write_file(&proc("setgroups"), "deny")?;
        write_file(&proc("gid_map"), &format!("{SANDBOX_GID} {host_gid} 1"))?;
        (SANDBOX_UID, SANDBOX_GID)
    } else {
        match build_user {
            Some(ids) => ids,
            None => return Err(SandboxError::NoUserNamespaces),
        }
    };
    write_file(
        &root.join("etc/passwd"),
        &format!(
            "root:x:0:0:Nix build user:{b}:/noshell\nnixbld:x:{uid}:{gid}:Nix build user:{b}:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n",
            b = ss.build_dir
        ),
    )?;
    // Let the child go on; then wait for it to be ready (or to fail).
    std::fs::File::from(ns_w)
        .write_all(b"1")
        .map_err(sys("signalling the sandbox child"))?;
    let mut reply = Vec::new();
    let ready = {
        let guard = child.state.lock().unwrap_or_else(|e| e.into_inner());
        let (_, st) = guard.as_ref().ok_or(SandboxError::StartFailed)?;
        let mut byte = [0u8; 1];
        let mut f = std::mem::ManuallyDrop::new(
            // SAFETY: borrowed for reading only; ManuallyDrop keeps the fd open.
            unsafe { std::fs::File::from_raw_fd(st.as_raw_fd()) },
        );
        match f.read(&mut byte) {
            Ok(1) if byte[0] == b'R' => true,
            Ok(1) => {
                reply.push(byte[0]);
                let _ = f.read_to_end(&mut reply);
                false
            }
            _ => false,
        }
    };
    if ready {
        return Ok(child);
    }
    let status = child.reap();
    match reply.first() {
        Some(b'E') => Err(SandboxError::Child(
            String::from_utf8_lossy(&reply[1..]).into_owned(),
        )),
        _ => Err(SandboxError::ChildDied {
            drv: drv_printed.to_owned(),
            status: status
                .map(super::status_to_string)
                .unwrap_or_else(|| "unknown status".into()),
        }),
    }
}

/// `waitpid` for a child; its exit code (`None` when killed by a signal).
fn wait_raw(pid: libc::pid_t) -> Option<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only the status integer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
    }
}

impl SandboxedBuilder {
    /// The builder's pid (on the host).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Lets the waiting child `execve` the builder; its pid, or the `execve` error
    /// (the child is then reaped).
    pub fn spawn(&self) -> io::Result<u32> {
        let taken = self.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((go, st)) = taken else {
            return Err(io::Error::other("sandboxed builder already started"));
        };
        std::fs::File::from(go).write_all(b"g")?;
        let mut reply = Vec::new();
        let _ = std::fs::File::from(st).read_to_end(&mut reply);
        if reply.first() == Some(&b'X') && reply.len() >= 5 {
            let errno = i32::from_ne_bytes([reply[1], reply[2], reply[3], reply[4]]);
            let _ = wait_raw(self.pid);
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(self.pid as u32)
    }

    /// Kills and reaps a child that was never started.
    fn reap(&self) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        self.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        // SAFETY: plain syscalls on our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut status = 0;
            loop {
                let r = libc::waitpid(self.pid, &mut status, 0);
                if r == self.pid {
                    return Some(std::process::ExitStatus::from_raw(status));
                }
                if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    return None;
                }
            }
        }
    }
}

impl Drop for SandboxedBuilder {
    fn drop(&mut self) {
        let not_started = self.state.lock().map(|s| s.is_some()).unwrap_or(false);
        if not_started {
            self.reap();
        }
    }
}

/// The forked helper: clones the namespace child (retrying as Nix does) and reports
/// `"<using user namespace 0|1> <pid>\n"` on `pid_w`, or exits 1: without a message
/// when the kernel refused the namespaces and `sandbox-fallback` is set, else after
/// printing `error: …` on stderr (as Nix's helper, whose exit the parent answers
/// with the fallback when it is set).
unsafe fn helper_main(plan: &mut ChildPlan, mut flags: i32, fallback: bool, pid_w: RawFd) -> ! {
    // As Nix's helper: the `SysError` on stderr (colours included, whatever stderr
    // is), exit status 1; the parent then falls back or gives up.
    let fail = |what: &str| -> ! {
        let m = format!(
            "\x1b[31;1merror:\x1b[0m {what}: \x1b[35;1m{}\x1b[0m\n",
            strerror(&io::Error::last_os_error())
        );
        libc::write(2, m.as_ptr().cast(), m.len());
        libc::_exit(1)
    };
    if libc::getuid() == 0 && libc::setgroups(0, std::ptr::null()) == -1 {
        fail("setgroups failed");
    }
    const STACK: usize = 1024 * 1024;
    let stack = libc::mmap(
        std::ptr::null_mut(),
        STACK,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
        -1,
        0,
    );
    if stack == libc::MAP_FAILED {
        fail("allocating stack");
    }
    let top = (stack as *mut u8).add(STACK).cast::<libc::c_void>();
    let arg = (plan as *mut ChildPlan).cast::<libc::c_void>();
    if plan.using_userns {
        flags |= libc::CLONE_NEWUSER;
    }
    let mut child = libc::clone(child_entry, top, flags, arg);
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if child == -1 && errno() == libc::EINVAL {
        flags &= !libc::CLONE_NEWPID;
        child = libc::clone(child_entry, top, flags, arg);
    }
    if plan.using_userns && child == -1 && matches!(errno(), libc::EPERM | libc::EINVAL) {
        plan.using_userns = false;
        flags &= !libc::CLONE_NEWUSER;
        child = libc::clone(child_entry, top, flags, arg);
    }
    if child == -1 && matches!(errno(), libc::EPERM | libc::EINVAL) && fallback {
        libc::_exit(1);
    }
    if child == -1 {
        fail("cloning builder process");
    }
    let m = format!("{} {child}\n", u8::from(plan.using_userns));
    libc::write(pid_w, m.as_ptr().cast(), m.len());
    libc::_exit(0)
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the helper's `ChildPlan`, copied into this process by clone.
    let plan = unsafe { &*(arg as *const ChildPlan) };
    let status = plan.status;
    let err = match run_child(plan) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let msg = format!("E{err}");
    // SAFETY: plain syscalls; the process ends here.
    unsafe {
        libc::write(status, msg.as_ptr().cast(), msg.len());
        libc::_exit(1)
    }
}

fn last_err(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", strerror(&io::Error::last_os_error()))
}

fn check(r: libc::c_int, what: impl FnOnce() -> String) -> Result<(), String> {
    if r == -1 {
        Err(last_err(what()))
    } else {
        Ok(())
    }
}

fn show(c: &CString) -> String {
    c.to_string_lossy().into_owned()
}

enum Never {}

/// The namespace child (step 3 of the module docs); returns only with an error.
fn run_child(p: &ChildPlan) -> Result<Never, String> {
    // SAFETY: this process is single-threaded (a clone of the helper); every call
    // is a plain syscall wrapper on memory owned by `p` or locals.
    unsafe {
        // Drop every descriptor inherited from the parent but ours: other threads'
        // pipes must not be held open here (their ends would never see EOF).
        for fd in &p.close {
            libc::close(*fd);
        }
        close_all_but(&[p.slave, p.ns_sync, p.status, p.go]);
        check(libc::setsid(), || "creating a new session".into())?;
        check(libc::dup2(p.slave, 1), || {
            "cannot dup output pipe into stdout".into()
        })?;
        check(libc::dup2(p.slave, 2), || {
            "cannot dup output pipe into stderr".into()
        })?;
        libc::ioctl(1, libc::TIOCSCTTY as _, 0);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        check(null, || "cannot open '/dev/null'".into())?;
        check(libc::dup2(null, 0), || {
            "cannot dup null device into stdin".into()
        })?;
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // Wait for the parent to set up the user namespace.
        let mut buf = [0u8; 1];
        if libc::read(p.ns_sync, buf.as_mut_ptr().cast(), 1) != 1 || buf[0] != b'1' {
            return Err("user namespace initialisation failed".into());
        }
        libc::close(p.ns_sync);

        if p.private_network {
            let fd = libc::socket(libc::PF_INET, libc::SOCK_DGRAM, libc::IPPROTO_IP);
            check(fd, || "cannot open IP socket".into())?;
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo\0".iter().enumerate() {
                ifr.ifr_name[i] = *b as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as _;
            check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), || {
                "cannot set loopback interface flags".into()
            })?;
            libc::close(fd);
        }
        let host = b"localhost\0";
        check(libc::sethostname(host.as_ptr().cast(), host.len()), || {
            "cannot set host name".into()
        })?;
        let dom = b"(none)\0";
        check(libc::setdomainname(dom.as_ptr().cast(), dom.len()), || {
            "cannot set domain name".into()
        })?;
        let none = std::ptr::null::<libc::c_char>();
        check(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_PRIVATE | libc::MS_REC,
                std::ptr::null(),
            ),
            || "unable to make '/' private".into(),
        )?;
        check(
            libc::mount(
                p.root.as_ptr(),
                p.root.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ),
            || format!("unable to bind mount '{}'", show(&p.root)),
        )?;
        check(
            libc::mount(
                p.store_in_root.as_ptr(),
                p.store_in_root.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ),
            || "unable to bind mount the Nix store".into(),
        )?;
        check(
            libc::mount(
                none,
                p.store_in_root.as_ptr(),
                none,
                libc::MS_SHARED,
                std::ptr::null(),
            ),
            || format!("unable to make '{}' shared", show(&p.store_in_root)),
        )?;
        for d in &p.dirs_to_make {
            let path = Path::new(std::ffi::OsStr::from_bytes(d.as_bytes()));
            std::fs::create_dir_all(path).map_err(|e| {
                format!("creating directory '{}': {}", path.display(), strerror(&e))
            })?;
        }
        for (target, link) in &p.links {
            check(libc::symlink(target.as_ptr(), link.as_ptr()), || {
                format!(
                    "creating symlink from '{}' to '{}'",
                    show(link),
                    show(target)
                )
            })?;
        }
        for (path, contents) in &p.files {
            let path = Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
            std::fs::write(path, contents)
                .map_err(|e| format!("writing to file '{}': {}", path.display(), strerror(&e)))?;
        }
        for (source, target, optional) in &p.binds {
            bind(source, target, *optional)?;
        }
        create_dirs_c(&p.proc_dir)?;
        check(
            libc::mount(
                c"none".as_ptr(),
                p.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                0,
                std::ptr::null(),
            ),
            || "mounting /proc".into(),
        )?;
        if let Some((dir, opts)) = &p.shm {
            check(
                libc::mount(
                    c"none".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    opts.as_ptr().cast(),
                ),
                || "mounting /dev/shm".into(),
            )?;
        }
        if let Some((pts, ptmx, pts_ptmx)) = &p.devpts {
            let r = libc::mount(
                c"none".as_ptr(),
                pts.as_ptr(),
                c"devpts".as_ptr(),
                0,
                c"newinstance,mode=0620".as_ptr().cast(),
            );
            if r == 0 {
                check(
                    libc::symlink(c"/dev/pts/ptmx".as_ptr(), ptmx.as_ptr()),
                    || format!("creating symlink to '{}'", show(ptmx)),
                )?;
                check(libc::chmod(pts_ptmx.as_ptr(), 0o666), || {
                    format!("changing mode of '{}'", show(pts_ptmx))
                })?;
            } else {
                if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    return Err(last_err("mounting /dev/pts"));
                }
                bind(c"/dev/pts", pts, false)?;
                bind(c"/dev/ptmx", ptmx, false)?;
            }
        }
        check(libc::unshare(libc::CLONE_NEWNS), || {
            "unsharing mount namespace".into()
        })?;
        check(libc::chdir(p.root.as_ptr()), || {
            format!("cannot change directory to '{}'", show(&p.root))
        })?;
        check(libc::mkdir(c"real-root".as_ptr(), 0), || {
            "cannot create real-root directory".into()
        })?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c"real-root".as_ptr())
                as libc::c_int,
            || {
                format!(
                    "cannot pivot old root directory onto '{}/real-root'",
                    show(&p.root)
                )
            },
        )?;
        check(libc::chroot(c".".as_ptr()), || {
            format!("cannot change root directory to '{}'", show(&p.root))
        })?;
        check(
            libc::umount2(c"real-root".as_ptr(), libc::MNT_DETACH),
            || "cannot unmount real root filesystem".into(),
        )?;
        check(libc::rmdir(c"real-root".as_ptr()), || {
            "cannot remove real-root directory".into()
        })?;
        let (uid, gid) = if p.using_userns {
            (p.uid, p.gid)
        } else {
            p.build_uid_gid.unwrap_or((p.uid, p.gid))
        };
        check(libc::setgid(gid), || "setgid failed".into())?;
        check(libc::setuid(uid), || "setuid failed".into())?;
        check(libc::chdir(p.build_dir.as_ptr()), || {
            format!("changing into '{}'", show(&p.build_dir))
        })?;
        libc::umask(0o022);
        if p.personality != 0 {
            check(libc::personality(p.personality), || {
                "cannot set 32-bit personality".into()
            })?;
        }
        let cur = libc::personality(0xffffffff);
        if cur != -1 {
            libc::personality((cur as libc::c_ulong) | libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
        }
        let limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &limit);
        // Every descriptor but stdio closes at exec (the status pipe included).
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            for fd in 3..1024 {
                let fl = libc::fcntl(fd, libc::F_GETFD);
                if fl != -1 {
                    libc::fcntl(fd, libc::F_SETFD, fl | libc::FD_CLOEXEC);
                }
            }
        }
        // Ready: wait for the go.
        libc::write(p.status, b"R".as_ptr().cast(), 1);
        let mut go = [0u8; 1];
        if libc::read(p.go, go.as_mut_ptr().cast(), 1) != 1 || go[0] != b'g' {
            libc::_exit(1);
        }
        libc::close(p.go);
        let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = p.envp.iter().map(|a| a.as_ptr()).collect();
        envp.push(std::ptr::null());
        libc::execve(p.builder.as_ptr(), argv.as_ptr(), envp.as_ptr());
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut m = vec![b'X'];
        m.extend_from_slice(&errno.to_ne_bytes());
        libc::write(p.status, m.as_ptr().cast(), m.len());
        libc::_exit(1)
    }
}

/// Closes every descriptor from 3 up except those in `keep`.
unsafe fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|f| **f >= 3)
        .map(|f| *f as u32)
        .collect();
    keep.sort_unstable();
    let mut lo = 3u32;
    for k in keep.iter().copied().chain(std::iter::once(u32::MAX)) {
        if k > lo {
            let hi = k.saturating_sub(1);
            if libc::syscall(libc::SYS_close_range, lo, hi, 0u32) != 0 {
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
                let max = (rl.rlim_cur.min(65536) as u32).min(hi.saturating_add(1));
                for fd in lo..max {
                    libc::close(fd as i32);
                }
            }
        }
        lo = k.saturating_add(1);
    }
}

fn create_dirs_c(p: &CString) -> Result<(), String> {
    let path = Path::new(std::ffi::OsStr::from_bytes(p.as_bytes()));
    std::fs::create_dir_all(path)
        .map_err(|e| format!("creating directory '{}': {}", path.display(), strerror(&e)))
}

/// Nix's `doBind`: bind-mounts `source` (recursively) at `target`, creating a
/// directory or an empty file there first; a missing optional source is skipped.
fn bind(source: &std::ffi::CStr, target: &std::ffi::CStr, optional: bool) -> Result<(), String> {
    let src = Path::new(std::ffi::OsStr::from_bytes(source.to_bytes()));
    let tgt = Path::new(std::ffi::OsStr::from_bytes(target.to_bytes()));
    let meta = match std::fs::metadata(src) {
        Ok(m) => m,
        Err(e) if optional && e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(format!(
                "getting attributes of path '{}': {}",
                src.display(),
                strerror(&e)
            ))
        }
    };
    if meta.is_dir() {
        std::fs::create_dir_all(tgt)
            .map_err(|e| format!("creating directory '{}': {}", tgt.display(), strerror(&e)))?;
    } else {
        if let Some(parent) = tgt.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                format!(
                    "creating directory '{}': {}",
                    parent.display(),
                    strerror(&e)
                )
            })?;
        }
        std::fs::write(tgt, b"")
            .map_err(|e| format!("writing to file '{}': {}", tgt.display(), strerror(&e)))?;
    }
    // SAFETY: plain syscall on NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"".as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if r == -1 {
        return Err(last_err(format!(
            "bind mount from '{}' to '{}' failed",
            src.display(),
            tgt.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::DerivationOutput;
    use crate::store::LocalStore;

    fn drv(env: &[(&str, &str)]) -> Derivation {
        let mut d = Derivation::default();
        d.outputs.insert("out".into(), DerivationOutput::Deferred);
        for (k, v) in env {
            d.env.insert((*k).into(), (*v).into());
        }
        d
    }

    const IA: DerivationType = DerivationType::InputAddressed { deferred: false };
    const FOD: DerivationType = DerivationType::ContentAddressed { fixed: true };

    fn uc(
        mode: SandboxMode,
        drv: &Derivation,
        ty: DerivationType,
        p: &str,
    ) -> Result<bool, String> {
        use_chroot(mode, drv, ty, p).map_err(|e| e.to_string())
    }

    #[test]
    fn sandbox_paths_parse_as_nix() {
        let d = parse_sandbox_paths(&[
            "/bin/sh=/bin/busybox".into(),
            "/usr".into(),
            "/opt/x?".into(),
            "/a=/b?".into(),
            String::new(),
        ]);
        let b = |s: &str, o: bool| BindSource {
            source: s.into(),
            optional: o,
        };
        assert_eq!(d.len(), 4);
        assert_eq!(d["/bin/sh"], b("/bin/busybox", false));
        assert_eq!(d["/usr"], b("/usr", false));
        assert_eq!(d["/opt/x"], b("/opt/x", true));
        assert_eq!(d["/a"], b("/b", true));
    }

    #[test]
    fn chroot_holds_what_nix_puts_there() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::for_root(dir.path(), "").unwrap();
        let store = LocalStore::open(&settings).unwrap();
        let sd = store.store_dir().clone();
        let text = store
            .add_text_to_store("input.txt", b"hello", &Default::default())
            .unwrap();
        let src = dir.path().join("srcdir");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let tree = store.add_path_to_store(&src, "tree").unwrap();
        let out = sd
            .parse(&format!(
                "{}/00000000000000000000000000000000-out",
                sd.as_str()
            ))
            .unwrap();
        let drv_path = sd
            .parse(&format!(
                "{}/11111111111111111111111111111111-x.drv",
                sd.as_str()
            ))
            .unwrap();
        let mut d = Derivation::default();
        d.outputs.insert(
            "out".into(),
            DerivationOutput::InputAddressed { path: out.clone() },
        );
        let spec = super::super::BuildSpec {
            drv_path,
            drv: std::sync::Arc::new(d),
            output_paths: BTreeMap::from([("out".to_string(), out.clone())]),
            input_closure: [text.clone(), tree.clone()].into_iter().collect(),
            mode: super::super::BuildMode::Normal,
            keep_failed: false,
            round: Default::default(),
        };
        let mut ss = SandboxSettings::disabled();
        ss.paths = vec![
            "/bin/sh=/bin/busybox".into(),
            "/opt/none?".into(),
            // The output being built is never bind-mounted from the host.
            sd.print(&out),
        ];
        let tmp = dir.path().join("nix-build-x.drv-0");
        std::fs::create_dir_all(&tmp).unwrap();
        let ia = DerivationType::InputAddressed { deferred: false };
        let c = Chroot::create(&store, &ss, &spec, ia, &tmp, None).unwrap();
        let root = c.root.clone();
        assert_eq!(
            root,
            PathBuf::from(format!(
                "{}/11111111111111111111111111111111-x.drv.chroot",
                sd.as_str()
            ))
        );
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&root), 0o750);
        assert_eq!(mode(&root.join("tmp")), 0o1777);
        assert_eq!(mode(&c.real_path(sd.as_str())), 0o1775);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/group")).unwrap(),
            "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n::1 localhost\n"
        );
        // A file input is hard-linked, a directory input is bind-mounted.
        let linked = c.real_path(&sd.print(&text));
        assert_eq!(
            std::fs::metadata(&linked).unwrap().ino(),
            std::fs::metadata(store.real_path(&text)).unwrap().ino()
        );
        let b = |s: &str, o: bool| BindSource {
            source: s.into(),
            optional: o,
        };
        let expected: BTreeMap<String, BindSource> = [
            ("/bin/sh".to_string(), b("/bin/busybox", false)),
            ("/opt/none".to_string(), b("/opt/none", true)),
            ("/build".to_string(), b(tmp.to_str().unwrap(), false)),
            (
                sd.print(&tree),
                b(store.real_path(&tree).to_str().unwrap(), false),
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(c.dirs, expected);
        assert!(!c.host_network);
        drop(c);
        assert!(!root.exists(), "the chroot is deleted on drop");
        // A fixed-output derivation gets no /etc/hosts of ours.
        let fixed = DerivationType::ContentAddressed { fixed: true };
        let c = Chroot::create(&store, &ss, &spec, fixed, &tmp, None).unwrap();
        assert!(!c.root.join("etc/hosts").exists());
        assert!(c.host_network);
        // __impureHostDeps must be within allowed-impure-host-deps.
        let mut impure = (*spec.drv).clone();
        impure
            .env
            .insert("__impureHostDeps".into(), "/usr/lib/x".into());
        let spec2 = super::super::BuildSpec {
            drv: std::sync::Arc::new(impure),
            ..spec.clone()
        };
        drop(c);
        let e = Chroot::create(&store, &ss, &spec2, ia, &tmp, None).unwrap_err();
        assert!(
            e.to_string().ends_with(
                "requested impure path '/usr/lib/x', but it was not in allowed-impure-host-deps"
            ),
            "{e}"
        );
        ss.allowed_impure_host_deps = vec!["/usr/lib".into()];
        let c = Chroot::create(&store, &ss, &spec2, ia, &tmp, None).unwrap();
        assert_eq!(c.dirs["/usr/lib/x"], b("/usr/lib/x", true));
    }

    #[test]
    fn pre_build_hook_output() {
        let b = parse_hook_output(
            "extra-sandbox-paths\n/a=/b\n/c\n\nextra-chroot-dirs\n/d\n/ignored-no-newline",
        )
        .unwrap();
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(b, vec![s("/a", "/b"), s("/c", "/c"), s("/d", "/d")]);
        assert_eq!(
            parse_hook_output("bogus\n").unwrap_err().to_string(),
            "unknown pre-build hook command 'bogus'"
        );
        assert_eq!(
            parse_hook_output("\n").unwrap_err().to_string(),
            "unknown pre-build hook command ''"
        );
        assert!(parse_hook_output("").unwrap().is_empty());
    }

    #[test]
    fn canonical_paths() {
        assert_eq!(canon_path("/a//b/./c/../d/"), "/a/b/d");
        assert_eq!(canon_path("/.."), "/");
    }

    #[test]
    fn chroot_decision_follows_nix() {
        let plain = drv(&[]);
        let no_chroot = drv(&[("__noChroot", "1")]);
        assert_eq!(uc(SandboxMode::Enabled, &plain, IA, "/s/x.drv"), Ok(true));
        assert_eq!(uc(SandboxMode::Enabled, &plain, FOD, "/s/x.drv"), Ok(true));
        assert_eq!(
            uc(SandboxMode::Enabled, &no_chroot, IA, "/s/x.drv"),
            Err("derivation '/s/x.drv' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'".into())
        );
        assert_eq!(uc(SandboxMode::Disabled, &plain, IA, "/s/x.drv"), Ok(false));
        assert_eq!(uc(SandboxMode::Relaxed, &plain, IA, "/s/x.drv"), Ok(true));
        assert_eq!(uc(SandboxMode::Relaxed, &plain, FOD, "/s/x.drv"), Ok(false));
        assert_eq!(
            uc(SandboxMode::Relaxed, &no_chroot, IA, "/s/x.drv"),
            Ok(false)
        );
        // Only "1" is true without structured attributes.
        let other = drv(&[("__noChroot", "true")]);
        assert_eq!(uc(SandboxMode::Relaxed, &other, IA, "/s/x.drv"), Ok(true));
        let structured = drv(&[("__json", r#"{"__noChroot": true}"#)]);
        assert_eq!(
            uc(SandboxMode::Relaxed, &structured, IA, "/s/x.drv"),
            Ok(false)
        );
    }
}
