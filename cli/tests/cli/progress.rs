//! `drover realise`'s status line: on a terminal (a pty made by `script`) it shows
//! the paths and MiB copied and downloaded while a copy runs; on a pipe it prints
//! nothing but Nix's lines.

use std::path::Path;
use std::process::Command;

use drover::hash::{Encoding, HashAlgo};
use drover::narinfo::NarInfo;
use drover::store_path::{StoreDir, StorePath};

use crate::drover;
use crate::nix_env::TestRoot;

/// A `file://` cache in `root/cache` serving one uncompressed regular file of `size`
/// bytes (big enough that copying it takes a few ticks of the status line).
fn cache_with_a_big_file(root: &TestRoot, size: usize) -> (String, StorePath) {
    let sd = StoreDir::new(root.store_dir.clone()).unwrap();
    let dir = root.path().join("cache");
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(
        dir.join("nix-cache-info"),
        format!("StoreDir: {}\nPriority: 30\n", sd.as_str()),
    )
    .unwrap();
    // Cheap pseudo-random bytes (xorshift).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let contents: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = sd
        .text_path_of("big", &contents, &Default::default())
        .unwrap();
    let mut nar = Vec::new();
    drover::nar::dump_bytes(&contents, &mut nar).unwrap();
    let nar_hash = HashAlgo::Sha256.digest(&nar);
    let url = format!("nar/{}.nar", nar_hash.encode(Encoding::Base32));
    std::fs::write(dir.join(&url), &nar).unwrap();
    let info = NarInfo {
        store_path: path.clone(),
        url,
        compression: "none".into(),
        file_hash: Some(nar_hash.clone()),
        file_size: Some(nar.len() as u64),
        nar_hash,
        nar_size: nar.len() as u64,
        references: Default::default(),
        deriver: None,
        system: None,
        signatures: Default::default(),
        ca: None,
    };
    std::fs::write(
        dir.join(format!("{}.narinfo", path.hash_part())),
        info.to_string(&sd),
    )
    .unwrap();
    (format!("file://{}", dir.display()), path)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn script_available() -> bool {
    Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn status_line_shows_mib_copied_and_downloaded_on_a_terminal_only() {
    if !script_available() {
        eprintln!("SKIPPED status_line_shows_mib_copied_and_downloaded: no `script`");
        return;
    }
    let root = TestRoot::new();
    let (cache, path) = cache_with_a_big_file(&root, 16 << 20);
    let printed = format!("{}/{}", root.store_dir, path);
    let args = [
        "realise".to_owned(),
        printed.clone(),
        "--option".into(),
        "substituters".into(),
        cache.clone(),
        "--option".into(),
        "require-sigs".into(),
        "false".into(),
    ];
    // On a pty: the status line, with the copy's bytes.
    let line = std::iter::once(quote(env!("CARGO_BIN_EXE_drover")))
        .chain(args.iter().map(|a| quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"]);
    for (k, v) in root.env() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains(&format!("copying path '{printed}' from '{cache}'...")),
        "{tty}"
    );
    assert!(tty.contains("[0/0 built, 0/1 copied ("), "{tty:?}");
    assert!(tty.contains("/16.0 MiB), "), "{tty:?}");
    assert!(tty.contains("/16.0 MiB DL, "), "{tty:?}");
    assert!(Path::new(&printed).exists());

    // On a pipe (a fresh root): Nix's lines only.
    let root = TestRoot::new();
    let (cache, path) = cache_with_a_big_file(&root, 1000);
    let out = drover(&root)
        .args(["realise", &format!("{}/{}", root.store_dir, path)])
        .args(["--option", "substituters", &cache])
        .args(["--option", "require-sigs", "false"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    assert!(!stderr.contains("MiB DL"), "{stderr:?}");
}
