//! `builtin:unpack-channel`, the builder `nix-channel --update` uses
//! (`unpack-channel.nix`): unpacks the channel tarball `src` into `out` and names
//! its single top-level entry `channelName`.
//!
//! As Nix 2.8: the tarball may be compressed with gzip, bzip2, xz or zstd (told by
//! its first bytes, as libarchive tells them) or not at all; members whose path
//! leaves `out` (`..`) are refused, as libarchive's `SECURE_NODOTDOT` does; a
//! tarball with more than one top-level entry fails with `channel tarball '…'
//! contains more than one file`. Modes and times need not be kept: the output is
//! canonicalised when it is registered.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use super::{attr, hl, BuiltinError};

/// The decompression method of a file starting with `magic`.
fn compression_of(magic: &[u8]) -> &'static str {
    if magic.starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "xz"
    } else if magic.starts_with(b"BZh") {
        "bzip2"
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else {
        "none"
    }
}

/// Unpacks the (possibly compressed) tarball `src` into `dest`.
pub fn unpack_tarball(src: &Path, dest: &Path) -> Result<(), BuiltinError> {
    let f = std::fs::File::open(src).map_err(BuiltinError::io("opening file", src))?;
    let mut input = BufReader::new(f);
    let magic = input
        .fill_buf()
        .map_err(BuiltinError::io("reading file", src))?
        .to_vec();
    let reader: Box<dyn Read> =
        crate::binary_cache::compression::decompressor(compression_of(&magic), Box::new(input))
            .map_err(|e| BuiltinError::Other(format!("failed to open archive: {e}")))?;
    let mut archive = tar::Archive::new(reader);
    let bad = |e: std::io::Error| {
        BuiltinError::Other(format!(
            "failed to extract archive '{}': {e}",
            hl(src.display())
        ))
    };
    std::fs::create_dir_all(dest).map_err(BuiltinError::io("creating directory", dest))?;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path: PathBuf = entry.path().map_err(bad)?.into_owned();
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(BuiltinError::Other(format!(
                "Path contains '..': '{}'",
                hl(path.display())
            )));
        }
        // `unpack_in` keeps every member inside `dest` (absolute names included).
        entry.unpack_in(dest).map_err(bad)?;
    }
    Ok(())
}

/// Runs `builtin:unpack-channel` with the derivation's environment.
pub fn unpack_channel(env: &BTreeMap<String, String>) -> Result<(), BuiltinError> {
    let out = PathBuf::from(attr(env, "out")?);
    let channel_name = attr(env, "channelName")?;
    let src = attr(env, "src")?;
    std::fs::create_dir_all(&out).map_err(BuiltinError::io("creating directory", &out))?;
    unpack_tarball(Path::new(src), &out)?;
    let mut entries = Vec::new();
    for e in std::fs::read_dir(&out).map_err(BuiltinError::io("opening directory", &out))? {
        entries.push(
            e.map_err(BuiltinError::io("reading directory", &out))?
                .file_name(),
        );
    }
    if entries.len() != 1 {
        return Err(BuiltinError::Other(format!(
            "channel tarball '{}' contains more than one file",
            hl(src)
        )));
    }
    let from = out.join(&entries[0]);
    let to = out.join(channel_name);
    std::fs::rename(&from, &to).map_err(|e| {
        BuiltinError::Other(format!(
            "renaming channel directory: {}",
            super::strerror(&e)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path, top: &[&str], compress: bool) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for t in top {
            let mut h = tar::Header::new_gnu();
            let data = format!("{t} contents");
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("{t}/default.nix"), data.as_bytes())
                .unwrap();
        }
        let bytes = b.into_inner().unwrap();
        let path = dir.join(if compress { "c.tar.xz" } else { "c.tar" });
        let bytes = if compress {
            let mut xz = Vec::new();
            let mut w = liblzma::write::XzEncoder::new(&mut xz, 6);
            std::io::Write::write_all(&mut w, &bytes).unwrap();
            w.finish().unwrap();
            xz
        } else {
            bytes
        };
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn env(out: &Path, src: &Path) -> BTreeMap<String, String> {
        [
            ("out", out.to_str().unwrap()),
            ("src", src.to_str().unwrap()),
            ("channelName", "nixpkgs"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn unpacks_and_renames_the_single_entry() {
        let d = tempfile::tempdir().unwrap();
        for compress in [false, true] {
            let src = tarball(d.path(), &["nixpkgs-23.05"], compress);
            let out = d.path().join(format!("out-{compress}"));
            unpack_channel(&env(&out, &src)).unwrap();
            assert_eq!(
                std::fs::read_to_string(out.join("nixpkgs/default.nix")).unwrap(),
                "nixpkgs-23.05 contents"
            );
        }
        let src = tarball(d.path(), &["a", "b"], false);
        let e = unpack_channel(&env(&d.path().join("out2"), &src)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "channel tarball '{}' contains more than one file",
                hl(src.display())
            )
        );
    }
}
