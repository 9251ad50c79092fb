//! The output paths a finished goal reports ([`OutputPaths`]), kept compact.
//!
//! A run keeps every requested goal's outcome until it ends (the results of its
//! requests), and most goals have a single output. A `BTreeMap<String, StorePath>`
//! of one entry allocates a whole node (eleven keys and values, about 0.5 KB); a
//! sorted boxed slice takes one pair.

use std::collections::BTreeMap;

use drover::store_path::StorePath;

/// Output name → store path, sorted by name, at most one path per name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputPaths {
    sorted: Box<[(String, StorePath)]>,
}

impl OutputPaths {
    pub fn new() -> OutputPaths {
        OutputPaths::default()
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.sorted.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// Sets the path of `name`; the path it had before is returned.
    pub fn insert(&mut self, name: String, path: StorePath) -> Option<StorePath> {
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.sorted[i].1, path)),
            Err(i) => {
                let mut v = std::mem::take(&mut self.sorted).into_vec();
                v.insert(i, (name, path));
                self.sorted = v.into_boxed_slice();
                None
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&StorePath> {
        self.position(name).ok().map(|i| &self.sorted[i].1)
    }

    /// `(name, path)` in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &StorePath)> {
        self.sorted.iter().map(|(n, p)| (n, p))
    }

    /// The same as a map (for a goal that goes on with them).
    pub fn to_map(&self) -> BTreeMap<String, StorePath> {
        self.sorted.iter().cloned().collect()
    }
}

impl From<BTreeMap<String, StorePath>> for OutputPaths {
    fn from(map: BTreeMap<String, StorePath>) -> OutputPaths {
        // A map's entries are sorted and unique already.
        OutputPaths {
            sorted: map.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    const A: &str = "7rjj86a15146cq1d3qy068lml7n8ykzm-a";
    const B: &str = "0aqc2dbxwqrpcx3c2wmnqdmm1m2jl0wv-b";

    #[test]
    fn a_map_from_name_to_path_in_name_order() {
        let mut o = OutputPaths::new();
        assert!(o.is_empty());
        assert_eq!(o.insert("out".into(), path(A)), None);
        assert_eq!(o.insert("dev".into(), path(B)), None);
        assert_eq!(o.insert("bin".into(), path(A)), None);
        let names: Vec<&str> = o.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bin", "dev", "out"]);
        assert_eq!(o.insert("out".into(), path(B)), Some(path(A)));
        assert_eq!(o.len(), 3);
        assert_eq!(o.get("out"), Some(&path(B)));
        assert_eq!(o.get("lib"), None);
        let map = o.to_map();
        assert_eq!(map.len(), 3);
        assert_eq!(OutputPaths::from(map), o);
    }
}
