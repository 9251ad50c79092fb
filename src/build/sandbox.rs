//! The Linux build sandbox (Nix 2.8's `useChroot` builds): whether a build is
//! sandboxed ([`use_chroot`]) and the settings it reads ([`SandboxSettings`]).
//!
//! drover does not set up the sandbox yet, so a build the settings want sandboxed is
//! refused with [`SandboxError::Unsupported`] rather than run on the host: a silently
//! unsandboxed build would let the builder read the user's files, reach the network
//! and write anywhere the user can.

use thiserror::Error;

use crate::config::{SandboxMode, Settings};
use crate::derivation::{Derivation, DerivationType};

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
}

impl SandboxSettings {
    pub fn from_settings(s: &Settings) -> SandboxSettings {
        SandboxSettings {
            mode: s.sandbox(),
            fallback: s.sandbox_fallback(),
            paths: s.sandbox_paths(),
            build_dir: s.sandbox_build_dir(),
            dev_shm_size: s.sandbox_dev_shm_size(),
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
        }
    }
}

/// Why a build cannot run as the sandbox settings ask.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SandboxError {
    #[error(
        "derivation '{0}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"
    )]
    NoChrootNotAllowed(String),
    #[error("cannot build '{0}' in a sandbox: drover does not implement sandboxed builds yet; set 'sandbox = false' (or 'sandbox = relaxed' with '__noChroot') to build without one")]
    Unsupported(String),
}

/// A boolean derivation attribute as Nix's `ParsedDerivation::getBoolAttr`: with
/// structured attributes a JSON `true`, else the environment value `1`.
pub fn bool_attr(drv: &Derivation, name: &str) -> bool {
    match super::env::structured_attrs(drv) {
        Ok(Some(m)) => m.get(name).and_then(|v| v.as_bool()).unwrap_or(false),
        _ => drv.env.get(name).is_some_and(|v| v == "1"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::DerivationOutput;

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

    #[test]
    fn chroot_decision_follows_nix() {
        let plain = drv(&[]);
        let no_chroot = drv(&[("__noChroot", "1")]);
        assert_eq!(
            use_chroot(SandboxMode::Enabled, &plain, IA, "/s/x.drv"),
            Ok(true)
        );
        assert_eq!(
            use_chroot(SandboxMode::Enabled, &plain, FOD, "/s/x.drv"),
            Ok(true)
        );
        assert_eq!(
            use_chroot(SandboxMode::Enabled, &no_chroot, IA, "/s/x.drv"),
            Err(SandboxError::NoChrootNotAllowed("/s/x.drv".into()))
        );
        assert_eq!(
            use_chroot(SandboxMode::Disabled, &plain, IA, "/s/x.drv"),
            Ok(false)
        );
        assert_eq!(
            use_chroot(SandboxMode::Relaxed, &plain, IA, "/s/x.drv"),
            Ok(true)
        );
        assert_eq!(
            use_chroot(SandboxMode::Relaxed, &plain, FOD, "/s/x.drv"),
            Ok(false)
        );
        assert_eq!(
            use_chroot(SandboxMode::Relaxed, &no_chroot, IA, "/s/x.drv"),
            Ok(false)
        );
        // Only "1" is true without structured attributes.
        let other = drv(&[("__noChroot", "true")]);
        assert_eq!(
            use_chroot(SandboxMode::Relaxed, &other, IA, "/s/x.drv"),
            Ok(true)
        );
        let structured = drv(&[("__json", r#"{"__noChroot": true}"#)]);
        assert_eq!(
            use_chroot(SandboxMode::Relaxed, &structured, IA, "/s/x.drv"),
            Ok(false)
        );
    }
}
