//! The build's side of the `recursive-nix` experimental feature (Nix 2.8's
//! `startDaemon`, the part before the daemon's thread): a derivation whose
//! `requiredSystemFeatures` has `recursive-nix` gets a daemon socket at
//! `<build dir>/.nix-socket`, mode 0600, and `NIX_REMOTE=unix://<build dir as
//! the builder sees it>/.nix-socket` (inside a sandbox the build dir is
//! `/build`, where the same socket is). Serving the socket is the caller's
//! (the actor system's restricted daemon); this module only makes it.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use super::{BuildError, BuildSettings};
use crate::config::MissingExperimentalFeature;
use crate::derivation::Derivation;

/// The socket's name in the build directory, as Nix names it.
pub const SOCKET_NAME: &str = ".nix-socket";

/// The system feature (and experimental feature) of recursive Nix.
pub const FEATURE: &str = "recursive-nix";

/// Whether the derivation asks for recursive Nix (`requiredSystemFeatures`
/// contains `recursive-nix`, read as Nix's `getStringsAttr` reads it: from the
/// structured attributes when the derivation has them).
pub fn required(drv: &Derivation) -> bool {
    super::env::required_system_features(drv).contains(FEATURE)
}

/// Creates the listening socket in `build_dir` and returns it with the value of
/// `NIX_REMOTE` for the builder (`top`: the build dir as the builder sees it).
/// Without the experimental feature this is Nix's error.
pub fn listen(
    settings: &BuildSettings,
    build_dir: &Path,
    top: &Path,
) -> Result<(UnixListener, String), BuildError> {
    if !settings.recursive_nix {
        return Err(MissingExperimentalFeature(FEATURE.to_owned()).into());
    }
    let path = build_dir.join(SOCKET_NAME);
    let fail = |source| BuildError::RecursiveSocket {
        path: path.clone(),
        source,
    };
    let listener = crate::store::unix_socket::bind(&path).map_err(fail)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    let remote = format!("unix://{}/{SOCKET_NAME}", top.display());
    Ok((listener, remote))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(features: Option<&str>) -> Derivation {
        let mut d = Derivation::default();
        if let Some(f) = features {
            d.env
                .insert("requiredSystemFeatures".to_owned(), f.to_owned());
        }
        d
    }

    #[test]
    fn required_only_when_the_feature_is_listed() {
        assert!(required(&drv(Some("kvm recursive-nix"))));
        assert!(!required(&drv(Some("kvm recursive-nixx"))));
        assert!(!required(&drv(None)));
    }

    #[test]
    fn listens_in_the_build_dir_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let s =
            crate::config::Settings::for_root(root.path(), "experimental-features = recursive-nix")
                .unwrap();
        let settings = BuildSettings::from_settings(&s);
        assert!(settings.recursive_nix);
        let (_l, remote) = listen(&settings, dir.path(), Path::new("/build")).unwrap();
        assert_eq!(remote, "unix:///build/.nix-socket");
        let meta = std::fs::metadata(dir.path().join(SOCKET_NAME)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        crate::store::unix_socket::connect(&dir.path().join(SOCKET_NAME)).unwrap();
    }

    #[test]
    fn refused_without_the_experimental_feature() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::config::Settings::for_root(dir.path(), "").unwrap();
        let settings = BuildSettings::from_settings(&s);
        let e = listen(&settings, dir.path(), dir.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "experimental Nix feature 'recursive-nix' is disabled; use '--extra-experimental-features recursive-nix' to override"
        );
        assert!(!dir.path().join(SOCKET_NAME).exists());
    }
}
