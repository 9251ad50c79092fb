//! Realisations: which store path an output of a content-addressed derivation got.
//!
//! A [`DrvOutput`] names an output by the derivation's hash modulo and the output
//! name, printed `sha256:<base16>!<output>` (the `.doi` file name in binary caches
//! uses the same string). A [`Realisation`] maps it to an output path, with
//! signatures and the realisations of its dependencies. The JSON form is Nix's:
//! `{"dependentRealisations":{…},"id":"…","outPath":"<base name>","signatures":[…]}`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hash::{Encoding, Hash, HashAlgo, HashError};
use crate::store_path::{StorePath, StorePathError};

/// Why a string or JSON value is not a realisation.
#[derive(Debug, Error, PartialEq)]
pub enum RealisationError {
    #[error("invalid derivation output id '{0}' (expected '<hash>!<output>')")]
    BadId(String),
    #[error("invalid derivation output id '{0}': {1}")]
    BadHash(String, HashError),
    #[error("realisation has an invalid output path '{0}': {1}")]
    BadOutPath(String, StorePathError),
    #[error("invalid realisation JSON: {0}")]
    Json(String),
}

/// An output of a derivation, named by the derivation's hash modulo.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrvOutput {
    /// The hash modulo of the derivation (sha256).
    pub drv_hash: Hash,
    /// The output name (`out`, `dev`, …).
    pub output: String,
}

impl fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}!{}",
            self.drv_hash.to_typed_string(Encoding::Base16),
            self.output
        )
    }
}

impl FromStr for DrvOutput {
    type Err = RealisationError;
    fn from_str(s: &str) -> Result<Self, RealisationError> {
        let (h, out) = s
            .split_once('!')
            .filter(|(h, o)| !h.is_empty() && !o.is_empty())
            .ok_or_else(|| RealisationError::BadId(s.to_owned()))?;
        let drv_hash = Hash::parse_with_algo(h, HashAlgo::Sha256)
            .map_err(|e| RealisationError::BadHash(s.to_owned(), e))?;
        Ok(DrvOutput {
            drv_hash,
            output: out.to_owned(),
        })
    }
}

/// A realised output of a content-addressed derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

#[derive(Serialize, Deserialize)]
struct RealisationJson {
    #[serde(rename = "dependentRealisations", default)]
    dependent_realisations: BTreeMap<String, String>,
    id: String,
    #[serde(rename = "outPath")]
    out_path: String,
    #[serde(default)]
    signatures: Vec<String>,
}

impl Realisation {
    /// The string a realisation signature signs: its JSON without signatures.
    pub fn fingerprint(&self) -> String {
        let mut unsigned = self.clone();
        unsigned.signatures.clear();
        unsigned.to_json()
    }

    /// Nix's JSON form (keys sorted, as nlohmann::json prints them).
    pub fn to_json(&self) -> String {
        let j = RealisationJson {
            dependent_realisations: self
                .dependent_realisations
                .iter()
                .map(|(k, v)| (k.to_string(), v.base_name().to_owned()))
                .collect(),
            id: self.id.to_string(),
            out_path: self.out_path.base_name().to_owned(),
            signatures: self.signatures.iter().cloned().collect(),
        };
        serde_json::to_string(&j).expect("realisation serialises")
    }

    /// Parses Nix's JSON form.
    pub fn from_json(s: &[u8]) -> Result<Realisation, RealisationError> {
        let j: RealisationJson =
            serde_json::from_slice(s).map_err(|e| RealisationError::Json(e.to_string()))?;
        let out_path = StorePath::from_base_name(&j.out_path)
            .map_err(|e| RealisationError::BadOutPath(j.out_path.clone(), e))?;
        let mut deps = BTreeMap::new();
        for (k, v) in j.dependent_realisations {
            let p = StorePath::from_base_name(&v)
                .map_err(|e| RealisationError::BadOutPath(v.clone(), e))?;
            deps.insert(k.parse()?, p);
        }
        Ok(Realisation {
            id: j.id.parse()?,
            out_path,
            signatures: j.signatures.into_iter().collect(),
            dependent_realisations: deps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad!out";

    #[test]
    fn drv_output_round_trip() {
        let o: DrvOutput = ID.parse().unwrap();
        assert_eq!(o.output, "out");
        assert_eq!(o.to_string(), ID);
        assert!(matches!(
            "nohash".parse::<DrvOutput>(),
            Err(RealisationError::BadId(_))
        ));
        assert!(matches!(
            "sha256:00!out".parse::<DrvOutput>(),
            Err(RealisationError::BadHash(..))
        ));
    }

    #[test]
    fn json_round_trip() {
        let json = format!(
            r#"{{"dependentRealisations":{{}},"id":"{ID}","outPath":"7h7qgvs4kgzsn8a6rb274saxyqh4jxlz-hello","signatures":[]}}"#
        );
        let r = Realisation::from_json(json.as_bytes()).unwrap();
        assert_eq!(r.to_json(), json);
        assert!(Realisation::from_json(b"{").is_err());
    }
}
