//! What the store knows about a valid path (`ValidPathInfo`), and its JSON form as
//! `nix path-info --json` prints it in Nix 2.8.
//!
//! JSON keys, in this order: `path`, `narHash` (SRI), `narSize`, `references` (full
//! paths, sorted), `ca` (when content-addressed), `deriver` (when known),
//! `registrationTime` (when non-zero), `ultimate` (only when true), `signatures`
//! (only when non-empty). An invalid path prints `{"path":…,"valid":false}`. The list
//! is sorted by store path.

use serde_json::{Map, Value};

use crate::content_address::ContentAddress;
use crate::hash::{Encoding, Hash};
use crate::store_path::{StoreDir, StorePath, StorePathSet};

/// The metadata of a valid store path (a row of `ValidPaths` plus its references).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    pub path: StorePath,
    /// The derivation that produced it (outputs only).
    pub deriver: Option<StorePath>,
    /// sha256 of the NAR serialisation.
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: StorePathSet,
    /// Seconds since the epoch; 0 means "now" when registering.
    pub registration_time: i64,
    /// Built locally (trusted without signatures).
    pub ultimate: bool,
    /// Signatures `<key name>:<base64>`.
    pub sigs: std::collections::BTreeSet<String>,
    pub ca: Option<ContentAddress>,
}

impl ValidPathInfo {
    /// A path info with only the required fields.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> ValidPathInfo {
        ValidPathInfo {
            path,
            deriver: None,
            nar_hash,
            nar_size,
            references: StorePathSet::new(),
            registration_time: 0,
            ultimate: false,
            sigs: Default::default(),
            ca: None,
        }
    }

    /// The JSON object `nix path-info --json` prints for this path.
    pub fn to_json(&self, store_dir: &StoreDir) -> Value {
        let mut m = Map::new();
        m.insert("path".into(), store_dir.print(&self.path).into());
        m.insert(
            "narHash".into(),
            self.nar_hash.to_typed_string(Encoding::Sri).into(),
        );
        m.insert("narSize".into(), self.nar_size.into());
        m.insert(
            "references".into(),
            Value::Array(
                self.references
                    .iter()
                    .map(|r| store_dir.print(r).into())
                    .collect(),
            ),
        );
        if let Some(ca) = &self.ca {
            m.insert("ca".into(), ca.to_string().into());
        }
        if let Some(d) = &self.deriver {
            m.insert("deriver".into(), store_dir.print(d).into());
        }
        if self.registration_time != 0 {
            m.insert("registrationTime".into(), self.registration_time.into());
        }
        if self.ultimate {
            m.insert("ultimate".into(), true.into());
        }
        if !self.sigs.is_empty() {
            m.insert(
                "signatures".into(),
                Value::Array(self.sigs.iter().map(|s| s.clone().into()).collect()),
            );
        }
        Value::Object(m)
    }
}

/// The JSON array `nix path-info --json` prints for `paths`: each path's info, or
/// `{"path":…,"valid":false}` when `info` is `None`; sorted by path.
pub fn path_infos_to_json(
    store_dir: &StoreDir,
    paths: &[(StorePath, Option<ValidPathInfo>)],
) -> Value {
    let mut sorted: Vec<&(StorePath, Option<ValidPathInfo>)> = paths.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    Value::Array(
        sorted
            .into_iter()
            .map(|(p, info)| match info {
                Some(i) => i.to_json(store_dir),
                None => {
                    let mut m = Map::new();
                    m.insert("path".into(), store_dir.print(p).into());
                    m.insert("valid".into(), false.into());
                    Value::Object(m)
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;

    #[test]
    fn json_field_order_and_omissions() {
        let sd = StoreDir::default();
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello").unwrap();
        let mut info = ValidPathInfo::new(p.clone(), HashAlgo::Sha256.digest(b""), 120);
        assert_eq!(
            info.to_json(&sd).to_string(),
            r#"{"path":"/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello","narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":120,"references":[]}"#
        );
        info.references.insert(p.clone());
        info.deriver =
            Some(StorePath::from_base_name("7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello.drv").unwrap());
        info.registration_time = 5;
        info.ultimate = true;
        info.sigs.insert("k:abc".into());
        info.ca = Some(ContentAddress::Text(HashAlgo::Sha256.digest(b"")));
        let keys: Vec<String> = info
            .to_json(&sd)
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            [
                "path",
                "narHash",
                "narSize",
                "references",
                "ca",
                "deriver",
                "registrationTime",
                "ultimate",
                "signatures"
            ]
        );
        let list = path_infos_to_json(&sd, &[(p.clone(), None)]);
        assert_eq!(
            list.to_string(),
            r#"[{"path":"/nix/store/7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello","valid":false}]"#
        );
    }
}
