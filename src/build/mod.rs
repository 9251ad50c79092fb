//! Local builds: the primitives of Nix 2.8's `LocalDerivationGoal`.
//!
//! A local build goes through these steps, each a blocking function here (the actor
//! side runs them on blocking threads and owns the process):
//!
//! 1. [`prepare`]: take a build user when running as root ([`users`]), choose the
//!    scratch path of every output ([`outputs::scratch_outputs`]:
//!    the final path when it can be written directly, else a `rewrite:` fallback path
//!    plus hash rewriting), delete stale invalid outputs, create the build directory
//!    ([`dir`]), compute the builder's environment and files ([`mod@env`], plus the
//!    `exportReferencesGraph` closures), write them,
//!    and make the builder [`std::process::Command`] attached to a fresh pseudo-terminal
//!    ([`spawn`]). A sandboxed build ([`sandbox::use_chroot`]) instead sets up its
//!    chroot and starts the builder in its namespaces up to the `execve`
//!    ([`sandbox`]); falling back to an unsandboxed build when the kernel refuses
//!    the namespaces and `sandbox-fallback` is set.
//! 2. The caller spawns the command, reads the pty master until EOF ([`spawn::read_pty`])
//!    and waits for the exit status (killing the process group on cancel or timeout,
//!    [`spawn::kill_process_group`]).
//! 3. [`finish`]: classify the exit status as Nix's `buildDone` does, register the
//!    outputs ([`outputs::register_outputs`]: canonicalise, scan references, hash,
//!    verify fixed-output hashes, move content-addressed outputs to their address,
//!    compare in check mode) and remove or keep the build directory.
//!
//! The result is a [`BuildOutcome`]: a [`BuildResult`] with Nix's message, the hash
//! mismatch flag and the registered output paths.

pub mod builtins;
pub mod dir;
pub mod done;
pub mod env;
pub mod outputs;
pub mod recursive_nix;
pub mod sandbox;
pub mod spawn;
pub mod users;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;

use thiserror::Error;

use crate::build_result::{BuildResult, BuildStatus};
use crate::config::{Env, Settings};
use crate::derivation::{name_from_drv_path, Derivation, DerivationError};
use crate::realisation::{DrvOutput, Realisation};
use crate::store::{LocalStore, StoreError, ValidPathInfo};
use crate::store_path::{StorePath, StorePathSet};

pub use dir::BuildDir;
pub use env::{builder_env, BuilderEnv, EnvError, EnvInputs};
pub use outputs::{register_outputs, BuildRound, OutputsError, Registered, ScratchOutputs};
pub use spawn::{builder_command, kill_process_group, read_pty, SpawnError};

/// Deletes a file or tree as Nix's `deletePath` does: directories are made
/// writable (and searchable) before their entries are removed, so a read-only
/// output (canonicalised, or `chmod -w` by its builder) can be deleted by a user
/// who is not root. A missing path is fine.
pub fn delete_path(path: &Path) -> Result<(), StoreError> {
    outputs::remove_tree(path)
}

/// How a derivation is built (Nix's `BuildMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildMode {
    Normal,
    /// Rebuild outputs that are missing or corrupt, replacing valid ones.
    Repair,
    /// Rebuild valid outputs and compare (`--check`).
    Check,
}

/// What to build: the derivation, its outputs and the inputs it may refer to.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// The `.drv` path (for a resolved CA derivation: the resolved one).
    pub drv_path: StorePath,
    pub drv: Arc<Derivation>,
    /// Output name → its final path where statically known (input-addressed, fixed).
    pub output_paths: BTreeMap<String, StorePath>,
    /// The closure of all inputs: reference-scanning candidates besides the outputs.
    pub input_closure: StorePathSet,
    pub mode: BuildMode,
    /// Keep the build directory (and `.check` outputs) on failure.
    pub keep_failed: bool,
    /// The round of a repeated build (`repeat`); one round by default.
    pub round: outputs::BuildRound,
}

/// The settings a local build uses, read once from [`Settings`].
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// `NIX_BUILD_CORES` (`cores`).
    pub cores: u64,
    /// Where build directories go (`$TMPDIR`, else `/tmp`).
    pub build_dir_root: PathBuf,
    /// `ca-derivations` is enabled: register realisations for every built output.
    pub ca_derivations: bool,
    /// The caller's environment, for `impureEnvVars` of fixed-output derivations.
    pub caller_env: Env,
    /// `build-users-group`: builds run as a member of it when drover runs as root.
    pub build_users_group: Option<String>,
    /// The state dir (`userpool/` holds the build user locks).
    pub state_dir: PathBuf,
    /// What `builtin:` builders need (`hashed-mirrors`, HTTP options).
    pub builtins: builtins::BuiltinSettings,
    /// `enforce-determinism`: a round of `repeat` that differs fails the build
    /// (else it is reported and the build ends with that round).
    pub enforce_determinism: bool,
    /// `sandbox` and the settings of the sandbox.
    pub sandbox: sandbox::SandboxSettings,
    /// `secret-key-files`: the built outputs (and their realisations) are signed
    /// with these keys (read at each signing, as Nix does).
    pub secret_key_files: Vec<PathBuf>,
    /// `auto-optimise-store`: the built outputs are hard-linked through `.links`.
    pub auto_optimise_store: bool,
    /// The `recursive-nix` experimental feature is enabled: a derivation that
    /// requires the `recursive-nix` system feature gets a daemon socket.
    pub recursive_nix: bool,
}

impl BuildSettings {
    /// The build settings of `settings`, with the process environment as caller env.
    pub fn from_settings(settings: &Settings) -> BuildSettings {
        BuildSettings {
            cores: settings.cores(),
            build_dir_root: settings.build_dir().to_owned(),
            ca_derivations: settings.is_experimental_feature_enabled("ca-derivations"),
            caller_env: std::env::vars().collect(),
            build_users_group: settings.build_users_group(),
            state_dir: settings.state_dir().to_owned(),
            builtins: builtins::BuiltinSettings::from_settings(settings),
            enforce_determinism: settings.get("enforce-determinism").as_deref() != Some("false"),
            sandbox: sandbox::SandboxSettings::from_settings(settings),
            secret_key_files: settings.secret_key_files(),
            auto_optimise_store: settings.auto_optimise_store(),
            recursive_nix: settings.is_experimental_feature_enabled("recursive-nix"),
        }
    }
}

/// A local build could not be set up or finished (not a builder failure: those are
/// [`BuildOutcome`]s).
#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Outputs(#[from] OutputsError),
    #[error("creating build directory in '{path}': {source}")]
    BuildDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing '{path}': {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    ExportReferencesGraph(String),
    #[error(transparent)]
    User(#[from] users::UserError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// Every build user is busy: wait and try again (`waiting for a free build user
    /// ID for '…'`).
    #[error("waiting for a free build user ID for '{0}'")]
    AllBuildUsersBusy(String),
    #[error("changing ownership of '{path}': {source}")]
    Chown { path: PathBuf, source: nix::Error },
    #[error("home directory '{0}' exists; please remove it to assure purity of builds without sandboxing")]
    HomeExists(String),
    /// A derivation requires `recursive-nix` but the experimental feature is off.
    #[error(transparent)]
    MissingFeature(#[from] crate::config::MissingExperimentalFeature),
    /// The caller could not serve the recursive Nix socket.
    #[error("{0}")]
    RecursiveDaemon(String),
    #[error("creating the recursive Nix socket '{path}': {source}")]
    RecursiveSocket {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl BuildError {
    /// The status of a build whose set-up failed: Nix 2.8 gives `InputRejected` for
    /// its `BuildError`s (bad `exportReferencesGraph`), anything else aborts the goal
    /// (`MiscFailure` here).
    pub fn status(&self) -> BuildStatus {
        match self {
            BuildError::ExportReferencesGraph(_) => BuildStatus::InputRejected,
            _ => BuildStatus::MiscFailure,
        }
    }
}

/// A build set up by [`prepare`]: what [`finish`] needs.
#[derive(Debug)]
pub struct PreparedBuild {
    pub build_dir: BuildDir,
    pub scratch: ScratchOutputs,
    /// The build user the builder runs as (held until the build is finished).
    pub build_user: Option<users::BuildUser>,
    /// A sandboxed build's chroot (deleted when dropped, after registration).
    pub chroot: Option<sandbox::Chroot>,
    /// A `recursive-nix` build's daemon socket (`<build dir>/.nix-socket`,
    /// listening before the builder starts): the caller serves it while the
    /// builder runs ([`recursive_nix`]).
    pub recursive_socket: Option<std::os::unix::net::UnixListener>,
}

/// A builder started without `std::process::Command`: its pid is waited for with
/// [`spawn::wait_pid`] and its process group killed with [`kill_process_group`].
#[derive(Debug)]
pub enum DirectSpawn {
    /// Unsandboxed, no build user: `posix_spawn` ([`spawn::FastSpawn`]).
    Posix(spawn::FastSpawn),
    /// Sandboxed: the namespace child, set up and waiting ([`sandbox::start`]).
    Sandboxed(sandbox::SandboxedBuilder),
}

impl DirectSpawn {
    /// Starts the builder; its pid, or the `execve` error as `Command::spawn` gives.
    pub fn spawn(&self) -> std::io::Result<u32> {
        match self {
            DirectSpawn::Posix(f) => f.spawn(),
            DirectSpawn::Sandboxed(s) => s.spawn(),
        }
    }
}

/// The builder process of a prepared build, not yet spawned.
#[derive(Debug)]
pub struct BuilderProcess {
    /// Its stdout/stderr are the pty slave: drop the command once spawned, so the
    /// master sees EOF when the builder (and everything it started) is gone.
    pub command: std::process::Command,
    /// The pty master: read the builder's output from it ([`read_pty`]).
    pub pty_master: std::os::fd::OwnedFd,
    /// The builder program, for [`exec_failure_log`].
    pub builder: String,
    /// The builder started without `command`: a `posix_spawn` (no fork of this
    /// process) when that applies ([`spawn::fast_spawn_plan`]), and always for
    /// sandboxed builds (then `command` only holds the pty slave). Spawn this rather
    /// than `command` when present, and drop `command` afterwards.
    pub fast: Option<DirectSpawn>,
}

/// What Nix 2.8's forked child writes to the pty when `execve` fails (it then exits
/// 1): `\1\n` and the serialised error (`Error`, level 0, name `Error`, the message
/// `executing '<builder>': <reason>` with Nix's magenta highlighting, no position, no
/// traces), strings as `u64 length, bytes, zero padding to 8`. It is part of the log.
pub fn exec_failure_log(builder: &str, err: &std::io::Error) -> Vec<u8> {
    let reason = match err.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => err.to_string(),
    };
    let msg = format!("executing '\x1b[35;1m{builder}\x1b[0m': \x1b[35;1m{reason}\x1b[0m");
    let mut out = b"\x01\n".to_vec();
    let put_u64 = |out: &mut Vec<u8>, n: u64| out.extend_from_slice(&n.to_le_bytes());
    let put_str = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    };
    put_str(&mut out, b"Error");
    put_u64(&mut out, 0);
    put_str(&mut out, b"Error");
    put_str(&mut out, msg.as_bytes());
    put_u64(&mut out, 0);
    put_u64(&mut out, 0);
    out
}

/// The status of a builder that could not be executed (exit code 1, as Nix's child).
pub fn exec_failure_status() -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus::from_raw(1 << 8)
}

/// Runs a whole build on this thread (prepare, spawn, read the log into `log`, wait,
/// finish): for tests and simple callers. No timeouts apply.
pub fn build_blocking(
    store: &LocalStore,
    settings: &BuildSettings,
    spec: &BuildSpec,
    mut log: impl FnMut(&[u8]),
) -> Result<BuildOutcome, BuildError> {
    let (prepared, process) = prepare(store, settings, spec)?;
    let BuilderProcess {
        mut command,
        pty_master,
        builder,
        fast,
    } = process;
    if spec.drv.is_builtin() {
        drop((command, pty_master));
        let env = builtins::builtin_env(&spec.drv, &prepared.scratch);
        let status = builtins::run_builtin(&spec.drv.builder, &env, &settings.builtins, &mut log);
        return Ok(finish(store, settings, spec, prepared, status, None));
    }
    let spawned = match &fast {
        Some(DirectSpawn::Sandboxed(s)) => s.spawn().map(|pid| (pid, None)),
        _ => command.spawn().map(|c| (c.id(), Some(c))),
    };
    drop(command);
    let status = match spawned {
        Ok((pid, child)) => {
            let _ = read_pty(pty_master, &mut log);
            let waited = match child {
                Some(mut c) => c.wait(),
                None => spawn::wait_pid(pid),
            };
            let status = waited.map_err(|source| BuildError::WriteFile {
                path: builder.clone().into(),
                source,
            })?;
            kill_process_group(pid);
            status
        }
        Err(e) => {
            log(&exec_failure_log(&builder, &e));
            exec_failure_status()
        }
    };
    Ok(finish(store, settings, spec, prepared, status, None))
}

/// Sets up a local build (Nix's `startBuilder` up to the fork; for a sandboxed
/// build up to the `execve`, see [`sandbox`]).
pub fn prepare(
    store: &LocalStore,
    settings: &BuildSettings,
    spec: &BuildSpec,
) -> Result<(PreparedBuild, BuilderProcess), BuildError> {
    let drv_printed = store.store_dir().print(&spec.drv_path);
    let ty = spec.drv.derivation_type()?;
    let chroot = sandbox::use_chroot(settings.sandbox.mode, &spec.drv, ty, &drv_printed)?;
    match prepare_with(store, settings, spec, chroot) {
        // The kernel refused the namespaces and `sandbox-fallback` is set: as Nix,
        // build again from scratch without the sandbox.
        Err(BuildError::Sandbox(sandbox::SandboxError::Fallback)) => {
            log::debug!("sandbox unavailable for '{drv_printed}'; building without it");
            prepare_with(store, settings, spec, false)
        }
        r => r,
    }
}

fn prepare_with(
    store: &LocalStore,
    settings: &BuildSettings,
    spec: &BuildSpec,
    use_chroot: bool,
) -> Result<(PreparedBuild, BuilderProcess), BuildError> {
    let drv_printed = store.store_dir().print(&spec.drv_path);
    let ty = spec.drv.derivation_type()?;
    if !use_chroot && Path::new(env::HOME_DIR).exists() {
        return Err(BuildError::HomeExists(env::HOME_DIR.into()));
    }
    let build_user = if users::use_build_users(settings.build_users_group.as_deref()) {
        let group = settings.build_users_group.as_deref().unwrap_or_default();
        match users::acquire(&settings.state_dir, group)? {
            Some(u) => {
                users::kill_user(u.uid);
                Some(u)
            }
            None => return Err(BuildError::AllBuildUsersBusy(drv_printed)),
        }
    } else {
        None
    };
    let drv_file = spec.drv_path.name().to_owned();
    let build_dir = BuildDir::create(&settings.build_dir_root, &drv_file).map_err(|source| {
        BuildError::BuildDir {
            path: settings.build_dir_root.clone(),
            source,
        }
    })?;
    let owner = build_user.as_ref().map(|u| (u.uid, u.gid));
    let chown = |p: &Path| -> Result<(), BuildError> {
        if let Some((uid, gid)) = owner {
            nix::unistd::chown(
                p,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|source| BuildError::Chown {
                path: p.to_owned(),
                source,
            })?;
        }
        Ok(())
    };
    chown(build_dir.path())?;
    // Outputs about to be (re)built at their final path: remove stale leftovers.
    let chroot = if use_chroot {
        let mut c = sandbox::Chroot::create(
            store,
            &settings.sandbox,
            spec,
            ty,
            build_dir.path(),
            owner.map(|(_, g)| g),
        )?;
        if let Some(hook) = &settings.sandbox.pre_build_hook {
            c.run_pre_build_hook(hook, &drv_printed)?;
        }
        Some(c)
    } else {
        None
    };
    let scratch = outputs::scratch_outputs(store, spec, chroot.as_ref().map(|c| c.root.as_path()))?;
    // Every path the builder writes is a temporary root before it exists, so Nix's
    // collector leaves it (and its `.lock`) alone.
    let roots: Vec<_> = scratch.scratch.values().cloned().collect();
    store.add_temp_roots(&roots)?;
    // Outputs about to be (re)built at their final path: remove stale leftovers.
    for p in scratch.scratch.values() {
        if scratch.fallback.contains(p) || !store.is_valid_path(p)? {
            outputs::remove_tree(&store.real_path(p))?;
        }
    }
    let structured_extra = structured_export_references_graph(store, spec)?;
    let sandbox_top = PathBuf::from(&settings.sandbox.build_dir);
    let benv = builder_env(&EnvInputs {
        drv: &spec.drv,
        store_dir: store.store_dir(),
        cores: settings.cores,
        build_top: if use_chroot {
            &sandbox_top
        } else {
            build_dir.path()
        },
        caller_env: &settings.caller_env,
        scratch_outputs: &scratch.scratch,
        input_rewrites: &scratch.input_rewrites,
        structured_extra: &structured_extra,
    })?;
    let mut benv = benv;
    let recursive_socket = if recursive_nix::required(&spec.drv) {
        let top = if use_chroot {
            sandbox_top.as_path()
        } else {
            build_dir.path()
        };
        let (listener, remote) = recursive_nix::listen(settings, build_dir.path(), top)?;
        chown(&build_dir.path().join(recursive_nix::SOCKET_NAME))?;
        benv.env.insert("NIX_REMOTE".to_owned(), remote);
        Some(listener)
    } else {
        None
    };
    let mut files = benv.files.clone();
    if !benv.env.contains_key("NIX_ATTRS_JSON_FILE") {
        files.extend(export_references_graph(store, spec)?);
    }
    for (file, contents) in &files {
        let p = build_dir.path().join(file);
        write_new_file(&p, contents).map_err(|source| BuildError::WriteFile {
            path: p.clone(),
            source,
        })?;
        chown(&p)?;
    }
    if let Some(chroot) = chroot {
        let (pty_master, slave) = sandbox::open_pty()?;
        if let Some((uid, _)) = owner {
            sandbox::chown_pty_slave(&pty_master, uid)?;
        }
        let child = sandbox::start(
            &chroot,
            &settings.sandbox,
            &benv,
            &spec.drv.system,
            &slave,
            owner,
            &drv_printed,
        )?;
        // The command is never run: it holds our copy of the slave until the
        // caller drops it after the spawn, as with the other paths.
        let mut command = std::process::Command::new(&benv.builder);
        command.stdout(std::process::Stdio::from(slave));
        return Ok((
            PreparedBuild {
                build_dir,
                scratch,
                build_user,
                chroot: Some(chroot),
                recursive_socket,
            },
            BuilderProcess {
                command,
                pty_master,
                builder: benv.builder,
                fast: Some(DirectSpawn::Sandboxed(child)),
            },
        ));
    }
    let creds = build_user.as_ref().map(|u| spawn::Credentials {
        uid: u.uid,
        gid: u.gid,
        groups: u.groups.clone(),
    });
    let (command, pty_master) = builder_command(&benv, build_dir.path(), creds.clone())?;
    let fast = spawn::fast_spawn_plan(&benv, build_dir.path(), creds.as_ref(), &pty_master)
        .map(DirectSpawn::Posix);
    Ok((
        PreparedBuild {
            build_dir,
            scratch,
            build_user,
            chroot: None,
            recursive_socket,
        },
        BuilderProcess {
            command,
            pty_master,
            builder: benv.builder,
            fast,
        },
    ))
}

/// `exportReferencesGraph` (without structured attributes): pairs `name path`; each
/// `name` file gets the closure of `path` (which must be in the input closure; the
/// outputs of derivations in it are added) in `nix-store --register-validity` form
/// without hashes or derivers.
fn export_references_graph(
    store: &LocalStore,
    spec: &BuildSpec,
) -> Result<Vec<(String, Vec<u8>)>, BuildError> {
    let Some(v) = spec.drv.env.get("exportReferencesGraph") else {
        return Ok(Vec::new());
    };
    let sd = store.store_dir();
    let tokens: Vec<&str> = v
        .split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .collect();
    if !tokens.chunks_exact(2).remainder().is_empty() {
        return Err(BuildError::ExportReferencesGraph(format!(
            "odd number of tokens in 'exportReferencesGraph': '{v}'"
        )));
    }
    let mut files = Vec::new();
    for pair in tokens.chunks(2) {
        let (name, path) = (pair[0], pair[1]);
        let ok_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok_name {
            return Err(BuildError::ExportReferencesGraph(format!(
                "invalid file name '{name}' in 'exportReferencesGraph'"
            )));
        }
        let sp = sd.parse_prefix(path).map_err(|_| {
            BuildError::ExportReferencesGraph(format!(
                "'exportReferencesGraph' contains a non-store path '{path}'"
            ))
        })?;
        let closure = export_references(store, spec, &[sp])?;
        let mut text = String::new();
        for p in &closure {
            let info = store
                .query_path_info(p)?
                .ok_or_else(|| StoreError::InvalidPath(sd.print(p)))?;
            text.push_str(&format!("{}\n\n{}\n", sd.print(p), info.references.len()));
            for r in &info.references {
                text.push_str(&sd.print(r));
                text.push('\n');
            }
        }
        files.push((name.to_owned(), text.into_bytes()));
    }
    Ok(files)
}

/// Nix's `exportReferences`: the closure of `paths` (each must be in the input
/// closure), plus the closures of the valid outputs of derivations in it.
fn export_references(
    store: &LocalStore,
    spec: &BuildSpec,
    paths: &[StorePath],
) -> Result<StorePathSet, BuildError> {
    let sd = store.store_dir();
    if let Some(p) = paths.iter().find(|p| !spec.input_closure.contains(*p)) {
        return Err(BuildError::ExportReferencesGraph(format!(
            "cannot export references of path '{}' because it is not in the input closure of the derivation",
            sd.print(p)
        )));
    }
    let mut closure = store.compute_closure(paths)?;
    for d in closure.clone().iter().filter(|p| p.is_derivation()) {
        let drv = store.read_derivation(d)?;
        let outs: Vec<StorePath> = drv
            .outputs
            .values()
            .filter_map(|o| o.path().cloned())
            .collect();
        let valid: Vec<StorePath> = store.query_valid_paths(&outs)?.into_iter().collect();
        closure.extend(store.compute_closure(&valid)?);
    }
    Ok(closure)
}

/// `exportReferencesGraph` with structured attributes: an object of name → store
/// paths; each name gets the closure as Nix's `pathInfoToJSON` (without impure
/// fields, with `closureSize`, hashes in `sha256:<base32>`), sorted by path.
fn structured_export_references_graph(
    store: &LocalStore,
    spec: &BuildSpec,
) -> Result<serde_json::Map<String, serde_json::Value>, BuildError> {
    use serde_json::{json, Map, Value};
    let mut extra = Map::new();
    let Some(attrs) = env::structured_attrs(&spec.drv)? else {
        return Ok(extra);
    };
    let Some(Value::Object(graphs)) = attrs.get("exportReferencesGraph") else {
        return Ok(extra);
    };
    let sd = store.store_dir();
    for (name, paths) in graphs {
        let mut roots = Vec::new();
        for p in paths.as_array().into_iter().flatten() {
            let s = p.as_str().unwrap_or_default();
            roots.push(sd.parse(s).map_err(|_| {
                BuildError::ExportReferencesGraph(format!(
                    "'exportReferencesGraph' contains a non-store path '{s}'"
                ))
            })?);
        }
        let closure = export_references(store, spec, &roots)?;
        let mut infos = BTreeMap::new();
        for p in &closure {
            let info = store
                .query_path_info(p)?
                .ok_or_else(|| StoreError::InvalidPath(sd.print(p)))?;
            infos.insert(p.clone(), info);
        }
        let mut list = Vec::new();
        for (p, info) in &infos {
            let mut size = 0u64;
            for q in store.compute_closure(std::slice::from_ref(p))? {
                size += match infos.get(&q) {
                    Some(i) => i.nar_size,
                    None => store.query_path_info(&q)?.map(|i| i.nar_size).unwrap_or(0),
                };
            }
            let mut o = json!({
                "closureSize": size,
                "narHash": info.nar_hash.to_typed_string(crate::hash::Encoding::Base32),
                "narSize": info.nar_size,
                "path": sd.print(p),
                "references": info.references.iter().map(|r| sd.print(r)).collect::<Vec<_>>(),
            });
            if let Some(ca) = &info.ca {
                o["ca"] = ca.to_string().into();
            }
            list.push(o);
        }
        extra.insert(name.clone(), Value::Array(list));
    }
    Ok(extra)
}

fn write_new_file(p: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(p)?;
    f.write_all(contents)
}

/// Why the builder process ended before registration, when it did not simply exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// `max-silent-time` (seconds).
    Silence(u64),
    /// `timeout` (seconds).
    Timeout(u64),
    /// `max-build-log-size` (bytes).
    LogLimit(u64),
    /// Cancelled by the caller.
    Cancelled,
}

/// What a finished local build reports.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub result: BuildResult,
    /// A fixed-output hash mismatch (exit-status bit 2).
    pub hash_mismatch: bool,
    /// Output name → registered path (success only).
    pub outputs: BTreeMap<String, StorePath>,
    /// The build directory, when it was kept (`keep-failed`): print
    /// `note: keeping build directory '…'`.
    pub kept_build_dir: Option<PathBuf>,
    /// A round of a repeated build that is not the last: the outputs' infos for the
    /// next round (nothing is registered yet).
    pub round_infos: BTreeMap<String, ValidPathInfo>,
}

/// Nix's `statusToString`: `failed with exit code N`, `failed due to signal N (<name>)`.
pub fn status_to_string(status: ExitStatus) -> String {
    done::BuilderExit::from(status).describe()
}

/// Finishes a build after the builder exited (Nix's `buildDone`): classifies the exit
/// status, registers the outputs and cleans up. `killed` says why the caller killed
/// the builder, if it did. Statuses and messages are [`done`]'s; a kill names the
/// goal as one for all outputs (`…!*`), and the message of a builder failure is
/// Nix's first line (`builder for '…' failed with exit code N`): a caller that knows
/// the goal's outputs and the log's tail completes them with [`done`].
pub fn finish(
    store: &LocalStore,
    settings: &BuildSettings,
    spec: &BuildSpec,
    prepared: PreparedBuild,
    status: ExitStatus,
    killed: Option<KillReason>,
) -> BuildOutcome {
    let PreparedBuild {
        build_dir,
        scratch,
        build_user,
        chroot,
        // Served and closed by the caller while the builder ran.
        recursive_socket: _,
    } = prepared;
    // Nothing of the build user may survive the build (Nix kills it after the build).
    let build_uid = build_user.as_ref().map(|u| u.uid);
    if let Some(uid) = build_uid {
        users::kill_user(uid);
    }
    let drv_printed = store.store_dir().print(&spec.drv_path);
    let fail = |status: BuildStatus, msg: String, build_dir: BuildDir, scratch: &ScratchOutputs| {
        scratch.remove_redirected(store);
        if chroot.is_some() && spec.mode == BuildMode::Normal {
            // As Nix: move what the builder left of unregistered outputs out of the
            // chroot, for inspection.
            for p in scratch.scratch.values() {
                let inside = scratch.actual_path(store, p);
                if !scratch.fallback.contains(p)
                    && !store.is_valid_path(p).unwrap_or(true)
                    && std::fs::symlink_metadata(&inside).is_ok()
                {
                    let _ = std::fs::rename(&inside, store.real_path(p));
                }
            }
        }
        let kept = build_dir.finish(spec.keep_failed && !spec.drv.is_builtin());
        BuildOutcome {
            result: BuildResult::failure(status, msg),
            hash_mismatch: false,
            outputs: BTreeMap::new(),
            kept_build_dir: kept,
            round_infos: BTreeMap::new(),
        }
    };
    if let Some(k) = killed {
        let goal = done::goal_name(&drv_printed, "*");
        let (st, msg) = done::killed(k, &goal, &drv_printed);
        return fail(st, msg, build_dir, &scratch);
    }
    if !status.success() {
        let sandboxed = spec
            .drv
            .derivation_type()
            .map(|t| t.is_sandboxed())
            .unwrap_or(true);
        let builder = done::Builder::Local { sandboxed };
        let (st, msg) = done::failed_exit(&drv_printed, status.into(), builder, None);
        return fail(st, msg, build_dir, &scratch);
    }
    let drv_name = match name_from_drv_path(&spec.drv_path) {
        Ok(n) => n.to_owned(),
        Err(e) => return fail(BuildStatus::MiscFailure, e.to_string(), build_dir, &scratch),
    };
    match register_outputs(store, settings, spec, &drv_name, &scratch, build_uid) {
        Ok(reg) => {
            let kept = build_dir.finish(false);
            let mut result = BuildResult::new(BuildStatus::Built);
            result.built_outputs = reg.realisations.into();
            result.is_non_deterministic = reg.non_deterministic;
            BuildOutcome {
                result,
                hash_mismatch: false,
                outputs: reg.outputs,
                kept_build_dir: kept,
                round_infos: reg.round_infos,
            }
        }
        Err(e) => {
            let hash_mismatch = e.is_hash_mismatch();
            let st = e.status();
            let msg = e.to_string();
            let mut o = fail(st, msg, build_dir, &scratch);
            o.hash_mismatch = hash_mismatch;
            o
        }
    }
}

/// The realisation ids of a derivation's outputs (`DrvOutput{static hash, name}`),
/// with the hashes of input derivations from the store's memo ([`LocalStore::drv_hash`]:
/// each input `.drv` is read once per process, not once per build above it).
pub fn drv_output_ids(
    store: &LocalStore,
    drv: &Derivation,
) -> Result<BTreeMap<String, DrvOutput>, BuildError> {
    let sd = store.store_dir().clone();
    let hashes = drv.static_output_hashes(&sd, |p: &StorePath| store.drv_hash(p))?;
    Ok(hashes
        .into_iter()
        .map(|(o, h)| {
            (
                o.clone(),
                DrvOutput {
                    drv_hash: h,
                    output: o,
                },
            )
        })
        .collect())
}

/// Realisations for `outputs` (no signatures, no dependent realisations).
pub(crate) fn realisations_for(
    ids: &BTreeMap<String, DrvOutput>,
    outputs: &BTreeMap<String, StorePath>,
    only: &BTreeSet<String>,
) -> BTreeMap<DrvOutput, Realisation> {
    outputs
        .iter()
        .filter(|(n, _)| only.contains(*n))
        .filter_map(|(n, p)| {
            let id = ids.get(n)?.clone();
            Some((
                id.clone(),
                Realisation {
                    id,
                    out_path: p.clone(),
                    signatures: BTreeSet::new(),
                    dependent_realisations: BTreeMap::new(),
                },
            ))
        })
        .collect()
}
