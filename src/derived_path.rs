//! Derived paths: what a build request names (Nix's `DerivedPath`).
//!
//! * an opaque store path, `/nix/store/…-hello` (realised by substitution or by
//!   being valid already);
//! * outputs of a derivation, `/nix/store/…-hello.drv^out,dev` or `…drv^*` for all
//!   of them. Nix 2.8's `nix-store -r` spelling `…drv!out` is accepted on input.
//!
//! Printing always uses `^`, output names sorted and comma-separated.

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

use crate::store_path::{StoreDir, StorePath, StorePathError};

/// Why a string is not a derived path.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DerivedPathError {
    #[error("invalid derived path '{path}': {source}")]
    BadStorePath {
        path: String,
        source: StorePathError,
    },
    #[error("invalid derived path '{0}': empty output name")]
    EmptyOutputName(String),
    #[error("invalid derived path '{0}': only derivations ('.drv') have outputs")]
    NotADerivation(String),
}

/// Which outputs of a derivation are wanted (Nix's `OutputsSpec`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OutputsSpec {
    /// `*`: every output.
    All,
    /// These names (never empty when parsed).
    Names(BTreeSet<String>),
}

impl OutputsSpec {
    /// One output name.
    pub fn name(name: impl Into<String>) -> OutputsSpec {
        OutputsSpec::Names(BTreeSet::from([name.into()]))
    }

    pub fn contains(&self, output: &str) -> bool {
        match self {
            OutputsSpec::All => true,
            OutputsSpec::Names(n) => n.contains(output),
        }
    }

    /// The union of two specs.
    pub fn union(&self, other: &OutputsSpec) -> OutputsSpec {
        match (self, other) {
            (OutputsSpec::Names(a), OutputsSpec::Names(b)) => {
                OutputsSpec::Names(a.union(b).cloned().collect())
            }
            _ => OutputsSpec::All,
        }
    }

    /// Whether every output of `self` is in `other`.
    pub fn is_subset_of(&self, other: &OutputsSpec) -> bool {
        match (self, other) {
            (_, OutputsSpec::All) => true,
            (OutputsSpec::All, OutputsSpec::Names(_)) => false,
            (OutputsSpec::Names(a), OutputsSpec::Names(b)) => a.is_subset(b),
        }
    }

    /// Parses `*` or `out,dev`.
    pub fn parse(s: &str) -> Option<OutputsSpec> {
        if s == "*" {
            return Some(OutputsSpec::All);
        }
        let names: BTreeSet<String> = s.split(',').map(str::to_owned).collect();
        if names.iter().any(String::is_empty) {
            return None;
        }
        Some(OutputsSpec::Names(names))
    }
}

impl fmt::Display for OutputsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputsSpec::All => f.write_str("*"),
            OutputsSpec::Names(n) => {
                f.write_str(&n.iter().map(String::as_str).collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// A build request: an opaque path or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv_path: StorePath,
        outputs: OutputsSpec,
    },
}

impl DerivedPath {
    /// Parses `path`, `drv^out,dev`, `drv^*` (or `drv!out`).
    pub fn parse(store_dir: &StoreDir, s: &str) -> Result<DerivedPath, DerivedPathError> {
        let split = s.rfind(['^', '!']);
        let (path, outputs) = match split {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let sp = store_dir
            .parse(path)
            .map_err(|source| DerivedPathError::BadStorePath {
                path: s.to_owned(),
                source,
            })?;
        match outputs {
            None => Ok(DerivedPath::Opaque(sp)),
            Some(o) => {
                if !sp.is_derivation() {
                    return Err(DerivedPathError::NotADerivation(s.to_owned()));
                }
                let outputs = OutputsSpec::parse(o)
                    .ok_or_else(|| DerivedPathError::EmptyOutputName(s.to_owned()))?;
                Ok(DerivedPath::Built {
                    drv_path: sp,
                    outputs,
                })
            }
        }
    }

    /// Prints with the store directory: `/nix/store/…drv^out`.
    pub fn print(&self, store_dir: &StoreDir) -> String {
        match self {
            DerivedPath::Opaque(p) => store_dir.print(p),
            DerivedPath::Built { drv_path, outputs } => {
                format!("{}^{}", store_dir.print(drv_path), outputs)
            }
        }
    }

    /// The store path the request is about (the `.drv` for built paths).
    pub fn base_path(&self) -> &StorePath {
        match self {
            DerivedPath::Opaque(p) => p,
            DerivedPath::Built { drv_path, .. } => drv_path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DRV: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-hello.drv";
    const OUT: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-hello";

    #[test]
    fn parse_and_print() {
        let sd = StoreDir::default();
        let p = DerivedPath::parse(&sd, &format!("{DRV}^out,dev")).unwrap();
        assert_eq!(p.print(&sd), format!("{DRV}^dev,out"));
        let p = DerivedPath::parse(&sd, &format!("{DRV}^*")).unwrap();
        assert!(matches!(
            p,
            DerivedPath::Built {
                outputs: OutputsSpec::All,
                ..
            }
        ));
        let p = DerivedPath::parse(&sd, &format!("{DRV}!out")).unwrap();
        assert_eq!(p.print(&sd), format!("{DRV}^out"));
        let p = DerivedPath::parse(&sd, OUT).unwrap();
        assert_eq!(p, DerivedPath::Opaque(sd.parse(OUT).unwrap()));
        assert_eq!(p.print(&sd), OUT);
    }

    #[test]
    fn errors() {
        let sd = StoreDir::default();
        assert!(matches!(
            DerivedPath::parse(&sd, &format!("{DRV}^")),
            Err(DerivedPathError::EmptyOutputName(_))
        ));
        assert!(matches!(
            DerivedPath::parse(&sd, &format!("{DRV}^out,,dev")),
            Err(DerivedPathError::EmptyOutputName(_))
        ));
        assert!(matches!(
            DerivedPath::parse(&sd, &format!("{OUT}^out")),
            Err(DerivedPathError::NotADerivation(_))
        ));
        assert!(matches!(
            DerivedPath::parse(&sd, "/tmp/x"),
            Err(DerivedPathError::BadStorePath { .. })
        ));
    }

    #[test]
    fn spec_algebra() {
        let out = OutputsSpec::name("out");
        let dev = OutputsSpec::name("dev");
        let both = out.union(&dev);
        assert!(out.is_subset_of(&both));
        assert!(!both.is_subset_of(&out));
        assert!(both.is_subset_of(&OutputsSpec::All));
        assert!(!OutputsSpec::All.is_subset_of(&both));
        assert_eq!(out.union(&OutputsSpec::All), OutputsSpec::All);
        assert!(OutputsSpec::All.contains("x"));
        assert!(!out.contains("dev"));
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = DerivedPath::parse(&StoreDir::default(), &s);
        }

        #[test]
        fn round_trip(names in proptest::collection::btree_set("[a-z]{1,5}", 1..4)) {
            let sd = StoreDir::default();
            let p = DerivedPath::Built {
                drv_path: sd.parse(DRV).unwrap(),
                outputs: OutputsSpec::Names(names),
            };
            prop_assert_eq!(DerivedPath::parse(&sd, &p.print(&sd)).unwrap(), p);
        }
    }
}
