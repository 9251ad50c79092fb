//! Store objects written into place before they are registered: the first half of
//! [`LocalStore::add_object_with`] on its own, so that a substitution can download
//! and unpack a path while the paths it refers to are still being fetched, and
//! register it once they are valid (Nix's rule: a path becomes valid only after its
//! references).
//!
//! [`LocalStore::write_unregistered`] does what Nix 2.8's `LocalStore::addToStore`
//! does before `registerValidPath`: temporary root, `<path>.lock` (waiting for
//! another holder), contents written under `<path>.drover-tmp`, canonicalised,
//! renamed to the final location, optimised. The returned [`UnregisteredObject`]
//! keeps the lock, so no other process (Nix included) touches the path meanwhile;
//! [`LocalStore::register_unregistered`] registers any number of them in one
//! transaction and releases their locks. An object dropped unregistered (a reference
//! failed, the run stopped) deletes its files before the lock goes.
//!
//! Crash safety is Nix's: the path stays invalid until the transaction commits; what
//! a killed process left is an invalid path under the store, which the next holder
//! of the lock (drover's `add_object_with`, Nix's `addToStore`) deletes before
//! writing, as does the garbage collector once the dead process's temporary roots
//! are gone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::super::canonicalise::canonicalise_path_meta_data;
use super::super::locks::PathLocks;
use super::super::path_info::ValidPathInfo;
use super::super::StoreError;
use super::{remove_tree, LocalStore, RepairFlag};
use crate::store_path::StorePath;

/// A path whose contents are in place and canonical, locked by this process, and
/// not registered yet. Dropping it unregistered deletes the contents.
#[derive(Debug)]
pub struct UnregisteredObject {
    info: ValidPathInfo,
    real: PathBuf,
    locks: PathLocks,
    registered: bool,
}

impl UnregisteredObject {
    /// What will be registered.
    pub fn info(&self) -> &ValidPathInfo {
        &self.info
    }

    pub fn path(&self) -> &StorePath {
        &self.info.path
    }
}

impl Drop for UnregisteredObject {
    fn drop(&mut self) {
        if !self.registered {
            if let Err(e) = remove_tree(&self.real) {
                log::warn!(
                    "cannot delete the unregistered path '{}': {e}",
                    self.real.display()
                );
            }
        }
        // The lock goes after the contents (field order would do it too; explicit).
        self.locks.unlock();
    }
}

impl LocalStore {
    /// Writes `info.path` into place without registering it: `write` fills a
    /// temporary path, which is canonicalised, renamed to the final location and
    /// optimised. `None` when the path is valid already (nothing written). The
    /// references of `info` need not be valid yet; they must be when the object is
    /// registered.
    pub fn write_unregistered(
        &self,
        info: &ValidPathInfo,
        write: impl FnOnce(&Path) -> Result<(), StoreError>,
    ) -> Result<Option<UnregisteredObject>, StoreError> {
        self.add_temp_root(&info.path)?;
        let (tmp, old) = self.temp_names_for(&info.path);
        let leftovers = || tmp.symlink_metadata().is_ok() || old.symlink_metadata().is_ok();
        if self.is_valid_path(&info.path)? && !leftovers() {
            return Ok(None);
        }
        let real = self.real_path(&info.path);
        let locks = PathLocks::lock(&BTreeSet::from([real.clone()]))?;
        let valid = self.is_valid_path(&info.path)?;
        // What a killed process left, as in `add_object_with`.
        remove_tree(&tmp)?;
        if std::fs::symlink_metadata(&old).is_ok() {
            if valid && std::fs::symlink_metadata(&real).is_err() {
                std::fs::rename(&old, &real).map_err(StoreError::io("moving back", &old))?;
            } else {
                remove_tree(&old)?;
            }
        }
        if valid {
            return Ok(None);
        }
        remove_tree(&real)?;
        let object = UnregisteredObject {
            info: info.clone(),
            real,
            locks,
            registered: false,
        };
        let r = (|| {
            write(&tmp)?;
            canonicalise_path_meta_data(&tmp, None)?;
            std::fs::rename(&tmp, &object.real)
                .map_err(StoreError::io("renaming into place", &object.real))
        })();
        if let Err(e) = r {
            let _ = remove_tree(&tmp);
            return Err(e);
        }
        // From here on, dropping `object` deletes the final path.
        self.optimise_path(&object.real, RepairFlag::NoRepair)?;
        Ok(Some(object))
    }

    /// Registers `objects` in one transaction (their references must be valid or
    /// among them) and releases their locks. On an error nothing is registered and
    /// the objects, dropped, delete their contents.
    pub fn register_unregistered(
        &self,
        mut objects: Vec<UnregisteredObject>,
    ) -> Result<(), StoreError> {
        self.try_register_unregistered(&mut objects)
    }

    /// [`LocalStore::register_unregistered`], leaving the objects to the caller: on
    /// an error they are still in place, locked and unregistered (so they can be
    /// registered otherwise, e.g. one at a time); once registered, dropping them
    /// releases their locks.
    pub fn try_register_unregistered(
        &self,
        objects: &mut [UnregisteredObject],
    ) -> Result<(), StoreError> {
        let infos: Vec<ValidPathInfo> = objects.iter().map(|o| o.info.clone()).collect();
        self.register_valid_paths(&infos)?;
        for o in objects {
            o.registered = true;
            o.locks.set_deletion(true);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;
    use crate::nar;

    fn store(dir: &Path) -> LocalStore {
        let s = crate::config::Settings::for_root(dir, "").unwrap();
        LocalStore::open(&s).unwrap()
    }

    fn object(
        store: &LocalStore,
        name: &str,
        contents: &[u8],
        refs: &[&StorePath],
    ) -> ValidPathInfo {
        let mut sink = crate::hash::HashSink::new(HashAlgo::Sha256);
        nar::dump_bytes(contents, &mut sink).unwrap();
        let (h, n) = sink.finish();
        let sd = store.store_dir();
        let digest = HashAlgo::Sha256.digest(name.as_bytes());
        let hash = crate::nixbase32::encode(&digest.digest()[..20]);
        let path = sd.parse(&format!("{}/{hash}-{name}", sd.as_str())).unwrap();
        let mut info = ValidPathInfo::new(path, h, n);
        info.references = refs.iter().map(|r| (*r).clone()).collect();
        info
    }

    fn write(contents: &'static [u8]) -> impl FnOnce(&Path) -> Result<(), StoreError> {
        move |tmp| std::fs::write(tmp, contents).map_err(StoreError::io("writing", tmp))
    }

    #[test]
    fn a_referrer_is_written_before_its_reference_and_registered_after_it() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let dep = object(&s, "dep", b"dep", &[]);
        let top = object(&s, "top", b"top", &[&dep.path]);
        let top_obj = s.write_unregistered(&top, write(b"top")).unwrap().unwrap();
        // In place, not valid; its reference not even written.
        assert!(s.real_path(&top.path).exists());
        assert!(!s.is_valid_path(&top.path).unwrap());
        // Registering it before its reference fails and keeps nothing.
        let dep_obj = s.write_unregistered(&dep, write(b"dep")).unwrap().unwrap();
        s.register_unregistered(vec![dep_obj]).unwrap();
        assert!(s.is_valid_path(&dep.path).unwrap());
        s.register_unregistered(vec![top_obj]).unwrap();
        assert!(s.is_valid_path(&top.path).unwrap());
        assert_eq!(std::fs::read(s.real_path(&top.path)).unwrap(), b"top");
        // Lock files are deleted after registration, as `add_object_with` does.
        assert!(!crate::store::locks::lock_path_of(&s.real_path(&top.path)).exists());
        // Valid now: nothing to write.
        assert!(s.write_unregistered(&top, write(b"top")).unwrap().is_none());
    }

    #[test]
    fn a_dropped_object_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let info = object(&s, "dropped", b"x", &[]);
        let o = s.write_unregistered(&info, write(b"x")).unwrap().unwrap();
        assert!(s.real_path(&info.path).exists());
        drop(o);
        assert!(!s.real_path(&info.path).exists());
        assert!(!s.is_valid_path(&info.path).unwrap());
        // The lock is free again.
        let again = s.write_unregistered(&info, write(b"x")).unwrap().unwrap();
        s.register_unregistered(vec![again]).unwrap();
        assert!(s.is_valid_path(&info.path).unwrap());
    }

    #[test]
    fn a_failed_write_or_registration_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let s = store(t.path());
        let info = object(&s, "fails", b"x", &[]);
        let e = s
            .write_unregistered(&info, |tmp| {
                std::fs::write(tmp, b"partial").unwrap();
                Err(StoreError::InvalidPath("broken".into()))
            })
            .unwrap_err();
        assert!(e.to_string().contains("broken"), "{e}");
        let real = s.real_path(&info.path);
        let leftovers: Vec<_> = std::fs::read_dir(s.store_dir().as_str())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(info.path.hash_part()) && !n.ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // A reference that is not valid: the transaction fails, the object is
        // deleted.
        let missing = object(&s, "missing", b"m", &[]);
        let top = object(&s, "top2", b"t", &[&missing.path]);
        let o = s.write_unregistered(&top, write(b"t")).unwrap().unwrap();
        assert!(s.register_unregistered(vec![o]).is_err());
        assert!(!s.is_valid_path(&top.path).unwrap());
        assert!(!real.exists() && !s.real_path(&top.path).exists());
    }
}
