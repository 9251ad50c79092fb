//! The store `drover daemon` serves, from a store URI as Nix 2.8's `openStore`
//! reads it (the global `--store` option, which `nix-daemon --stdio --store …`
//! gets from an `ssh-ng://…?remote-store=…` client, or the `store` setting).
//!
//! Nix's forms of a local store: `auto` (or empty) and `local`, both with
//! `?name=value` parameters, or a path with a `/` in it (relative ones made
//! absolute), which is `local?root=<path>`. The parameters of a local store
//! are `root` (its directories under `<root>/nix/…`), `state`, `log`, `real`
//! (where its files are) and `store` (its store directory); each not given is
//! derived as Nix derives it. `auto` is the local store here, as for a daemon
//! that can write its state directory.
//!
//! What drover cannot serve is refused with a clear error rather than served
//! as something else: a store whose files are not in its store directory (a
//! "diverted" store, `<root>/nix/store` for a store directory elsewhere: Nix
//! builds in one only inside its sandbox's mount namespace), the daemon's
//! socket (`daemon`, `unix://…`: `nix-daemon --stdio` forwards to it), and the
//! stores of other schemes (binary caches, `ssh://`). A URI no store has is
//! Nix's `don't know how to open Nix store '…'`.

use std::path::{Component, Path, PathBuf};

use drover::binary_cache::StoreUrl;
use drover::config::Settings;
use drover::store_path::StoreDir;

/// Why a store URI cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreUriError {
    /// No kind of store has this URI (Nix's message).
    #[error("don't know how to open Nix store '{0}'")]
    Unknown(String),
    /// A store of a kind Nix has and drover does not serve.
    #[error("drover daemon cannot serve the store '{uri}': {reason}")]
    Unsupported { uri: String, reason: String },
    /// A local store whose files are not in its store directory.
    #[error(
        "drover daemon cannot serve the store '{uri}': its store directory is '{store}' \
         but its files are in '{real}' (a diverted store)"
    )]
    Diverted {
        uri: String,
        store: String,
        real: String,
    },
    /// A parameter's value is not a usable path.
    #[error("store '{uri}': {reason}")]
    BadParameter { uri: String, reason: String },
}

/// What was made of a store URI: the settings of the store to serve, and the
/// warnings Nix gives for it (unknown parameters).
#[derive(Debug)]
pub struct ServedStore {
    pub settings: Settings,
    pub warnings: Vec<String>,
}

/// The parameters of a local store drover knows.
const LOCAL_PARAMS: &[&str] = &["root", "state", "log", "real", "store"];
/// Parameters Nix's local store has that change nothing drover does here (the
/// daemon itself sets `path-info-cache-size`; the rest concern substituters).
const INERT_PARAMS: &[&str] = &["path-info-cache-size", "priority", "want-mass-query"];
/// Parameters of Nix's local store that drover's does not take per store.
const UNSUPPORTED_PARAMS: &[&str] = &["require-sigs", "system-features", "trusted"];

/// Nix's `absPath` without following symlinks: `p` against the working
/// directory, `.` and `..` resolved.
fn abs_path(p: &str) -> Result<PathBuf, std::io::Error> {
    let joined = if p.starts_with('/') {
        PathBuf::from(p)
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

/// The settings of the store `uri` names, from the daemon's `settings`.
pub fn served_store(settings: &Settings, uri: &str) -> Result<ServedStore, StoreUriError> {
    let url = StoreUrl::parse(uri);
    let base = url.base.as_str();
    if let Some((scheme, _)) = base.split_once("://") {
        let reason = match scheme {
            "unix" => "it is a daemon's socket; drover serves only local stores",
            "file" | "http" | "https" | "s3" => {
                "it is a binary cache; drover serves only local stores"
            }
            "ssh" | "ssh-ng" => "it is a remote store; drover serves only local stores",
            _ => return Err(StoreUriError::Unknown(uri.to_owned())),
        };
        return Err(StoreUriError::Unsupported {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        });
    }
    let mut params = url.params.clone();
    match base {
        "" | "auto" | "local" => {}
        "daemon" => {
            return Err(StoreUriError::Unsupported {
                uri: uri.to_owned(),
                reason: "it is the daemon's socket; drover serves only local stores".into(),
            })
        }
        p if p.contains('/') => {
            let root = abs_path(p).map_err(|e| StoreUriError::BadParameter {
                uri: uri.to_owned(),
                reason: format!("getting the current directory: {e}"),
            })?;
            params.insert("root".into(), root.display().to_string());
        }
        _ => return Err(StoreUriError::Unknown(uri.to_owned())),
    }
    let mut warnings = Vec::new();
    for name in params.keys() {
        let name = name.as_str();
        if UNSUPPORTED_PARAMS.contains(&name) {
            warnings.push(format!(
                "drover daemon ignores the store setting '{name}': the global setting applies"
            ));
        } else if !LOCAL_PARAMS.contains(&name) && !INERT_PARAMS.contains(&name) {
            warnings.push(format!("unknown setting '{name}'"));
        }
    }
    let path_param = |name: &str| -> Result<Option<PathBuf>, StoreUriError> {
        match params.get(name).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(v) if v.starts_with('/') => {
                Ok(Some(abs_path(v).unwrap_or_else(|_| PathBuf::from(v))))
            }
            Some(v) => Err(StoreUriError::BadParameter {
                uri: uri.to_owned(),
                reason: format!("setting '{name}' is a path and must be absolute, not '{v}'"),
            }),
        }
    };
    let root = path_param("root")?;
    let under_root = |rel: &str, default: &Path| match &root {
        Some(r) => r.join(rel),
        None => default.to_owned(),
    };
    let store = match path_param("store")? {
        Some(s) => s,
        None => settings.store_dir().as_path().to_owned(),
    };
    let state =
        path_param("state")?.unwrap_or_else(|| under_root("nix/var/nix", settings.state_dir()));
    let log =
        path_param("log")?.unwrap_or_else(|| under_root("nix/var/log/nix", settings.log_dir()));
    let real = path_param("real")?.unwrap_or_else(|| under_root("nix/store", &store));
    if real != store {
        return Err(StoreUriError::Diverted {
            uri: uri.to_owned(),
            store: store.display().to_string(),
            real: real.display().to_string(),
        });
    }
    let store_dir =
        StoreDir::new(store.display().to_string()).map_err(|e| StoreUriError::BadParameter {
            uri: uri.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(ServedStore {
        settings: settings.for_local_store(store_dir, state, log),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> Settings {
        Settings::for_root(dir, "").unwrap()
    }

    #[test]
    fn auto_and_local_are_the_settings_store() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(t.path());
        for uri in ["", "auto", "local", "local?path-info-cache-size=0"] {
            let served = served_store(&s, uri).unwrap();
            assert_eq!(served.settings.store_dir(), s.store_dir(), "{uri}");
            assert_eq!(served.settings.state_dir(), s.state_dir(), "{uri}");
            assert_eq!(served.settings.log_dir(), s.log_dir(), "{uri}");
            assert!(served.warnings.is_empty(), "{uri}");
        }
    }

    #[test]
    fn state_and_log_parameters_move_the_store_s_state() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(t.path());
        let uri = format!(
            "local?state={0}/other/state&log={0}/other/log",
            t.path().display()
        );
        let served = served_store(&s, &uri).unwrap();
        assert_eq!(served.settings.store_dir(), s.store_dir());
        assert_eq!(served.settings.state_dir(), t.path().join("other/state"));
        assert_eq!(served.settings.log_dir(), t.path().join("other/log"));
    }

    #[test]
    fn a_root_whose_nix_store_is_the_store_directory_is_served_under_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        let env: drover::config::Env = [
            (
                "NIX_STORE_DIR",
                root.join("nix/store").display().to_string(),
            ),
            (
                "NIX_STATE_DIR",
                t.path().join("state").display().to_string(),
            ),
            ("NIX_CONF_DIR", t.path().join("etc").display().to_string()),
            ("NIX_USER_CONF_FILES", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let s = Settings::load(&env, &[]).unwrap();
        for uri in [
            root.display().to_string(),
            format!("local?root={}", root.display()),
        ] {
            let served = served_store(&s, &uri).unwrap();
            assert_eq!(served.settings.store_dir(), s.store_dir(), "{uri}");
            assert_eq!(
                served.settings.state_dir(),
                root.join("nix/var/nix"),
                "{uri}"
            );
            assert_eq!(
                served.settings.log_dir(),
                root.join("nix/var/log/nix"),
                "{uri}"
            );
        }
    }

    #[test]
    fn what_cannot_be_served_is_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(t.path());
        assert_eq!(
            served_store(&s, "foo://bar").unwrap_err(),
            StoreUriError::Unknown("foo://bar".into())
        );
        assert_eq!(
            served_store(&s, "relpath").unwrap_err().to_string(),
            "don't know how to open Nix store 'relpath'"
        );
        for uri in [
            "daemon",
            "unix:///x/socket",
            "file:///cache",
            "ssh-ng://host",
        ] {
            assert!(
                matches!(
                    served_store(&s, uri),
                    Err(StoreUriError::Unsupported { .. })
                ),
                "{uri}"
            );
        }
        // `<root>/nix/store` is not the store directory: a diverted store.
        let other = t.path().join("other");
        let err = served_store(&s, other.to_str().unwrap()).unwrap_err();
        assert_eq!(
            err,
            StoreUriError::Diverted {
                uri: other.display().to_string(),
                store: s.store_dir().as_str().to_owned(),
                real: other.join("nix/store").display().to_string(),
            }
        );
        assert!(matches!(
            served_store(&s, "local?state=rel"),
            Err(StoreUriError::BadParameter { .. })
        ));
    }

    #[test]
    fn unknown_parameters_are_warned_about_as_nix_does() {
        let t = tempfile::tempdir().unwrap();
        let s = settings(t.path());
        let served = served_store(&s, "local?bogus=1").unwrap();
        assert_eq!(served.warnings, vec!["unknown setting 'bogus'".to_owned()]);
    }
}
