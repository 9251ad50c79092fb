//! The builtin builders (`builtin:fetchurl`, `builtin:buildenv`,
//! `builtin:unpack-channel`) under `drover realise` and `nix-store --realise`.
//!
//! Each scenario is instantiated once, then built by each tool from the same
//! snapshot of the root: exit status, stdout (the output paths), stderr, and the
//! output's NAR hash, references and `ca` must be the same, and the store must pass
//! `nix-store --verify --check-contents` after drover's build.

use crate::drover;
use crate::http_server::Action;
use crate::nix_env::TestRoot;
use crate::realise::{restore, run, sh, snapshot, Run};

/// The NAR hash, references and `ca` of each path, as the store records them.
fn path_facts(root: &TestRoot, paths: &[String]) -> Vec<String> {
    paths
        .iter()
        .map(|p| {
            let q = |flag: &str| root.run("nix-store", &["-q", flag, p]);
            let info = root.run(
                "nix",
                &[
                    "--extra-experimental-features",
                    "nix-command",
                    "path-info",
                    "--json",
                    p,
                ],
            );
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            format!(
                "{p} hash={} refs={} ca={}",
                q("--hash").trim(),
                q("--references").trim(),
                v[0]["ca"]
            )
        })
        .collect()
}

/// Builds with each tool from the same snapshot and asserts that exit status,
/// stdout, stderr and the outputs' store facts agree; returns Nix's run.
#[track_caller]
fn assert_same(root: &TestRoot, args: &[&str]) -> Run {
    let snap = snapshot(root);
    let mut outcomes = Vec::new();
    for tool in ["nix", "drover"] {
        let r = if tool == "nix" {
            run(root.cmd("nix-store").arg("--realise").args(args))
        } else {
            run(drover(root).arg("realise").args(args))
        };
        let paths: Vec<String> = r.stdout.lines().map(str::to_owned).collect();
        let facts = if r.code == 0 {
            if tool == "drover" {
                root.verify_store();
            }
            path_facts(root, &paths)
        } else {
            Vec::new()
        };
        outcomes.push((r, facts));
        restore(root, &snap);
    }
    std::fs::remove_dir_all(&snap).unwrap();
    let (d, d_facts) = outcomes.pop().unwrap();
    let (n, n_facts) = outcomes.pop().unwrap();
    assert_eq!(
        (n.code, &n.stdout, &n.stderr),
        (d.code, &d.stdout, &d.stderr),
        "{args:?}"
    );
    assert_eq!(n_facts, d_facts, "{args:?}");
    n
}

fn fetchurl(root: &TestRoot, args: &[&str]) -> String {
    let mut a = vec!["--expr", "import <nix/fetchurl.nix>"];
    a.extend_from_slice(args);
    root.run("nix-instantiate", &a).trim().to_owned()
}

fn hash(root: &TestRoot, args: &[&str]) -> String {
    root.run("nix-hash", args).trim().to_owned()
}

#[test]
fn fetchurl_file_urls_hashes_unpack_and_executable() {
    require_nix!();
    let root = TestRoot::new();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("fetched.sh");
    std::fs::write(&file, "#! /bin/sh\necho fetched\n").unwrap();
    let url = format!("file://{}", file.display());
    let f = file.to_str().unwrap();

    let sha256 = hash(&root, &["--flat", "--type", "sha256", f]);
    let drv = fetchurl(
        &root,
        &["--argstr", "url", &url, "--argstr", "sha256", &sha256],
    );
    let r = assert_same(&root, &[&drv]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // SHA-512 in base 64, an SRI hash, executable.
    let sha512 = root
        .run(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "hash",
                "file",
                "--type",
                "sha512",
                "--base64",
                f,
            ],
        )
        .trim()
        .to_owned();
    let drv = fetchurl(
        &root,
        &["--argstr", "url", &url, "--argstr", "sha512", &sha512],
    );
    assert_eq!(assert_same(&root, &[&drv]).code, 0);
    let sri = root
        .run(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "hash",
                "file",
                f,
            ],
        )
        .trim()
        .to_owned();
    // An executable output is a NAR of an executable file (hash mode `recursive`).
    let exe = data.join("exe");
    std::fs::copy(&file, &exe).unwrap();
    sh(&format!("chmod +x {}", exe.display()));
    let sri_exec = root
        .run(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "hash",
                "path",
                exe.to_str().unwrap(),
            ],
        )
        .trim()
        .to_owned();
    let drv = fetchurl(&root, &["--argstr", "url", &url, "--argstr", "hash", &sri]);
    assert_eq!(assert_same(&root, &[&drv]).code, 0);
    let drv = fetchurl(
        &root,
        &[
            "--argstr",
            "url",
            &url,
            "--argstr",
            "hash",
            &sri_exec,
            "--arg",
            "executable",
            "true",
        ],
    );
    assert_eq!(assert_same(&root, &[&drv]).code, 0);

    // A NAR, plain and xz-compressed, unpacked.
    let tree = data.join("archive");
    sh(&format!(
        "mkdir -p {t} && cp {f} {t}/ && chmod +x {t}/fetched.sh && ln -s foo {t}/symlink",
        t = tree.display()
    ));
    let nar = data.join("archive.nar");
    let dumped = root
        .cmd("nix-store")
        .args(["--dump", tree.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::write(&nar, dumped.stdout).unwrap();
    sh(&format!("xz --keep {}", nar.display()));
    let nar_hash = hash(
        &root,
        &["--flat", "--type", "sha256", nar.to_str().unwrap()],
    );
    for name in ["archive.nar", "archive.nar.xz"] {
        let u = format!("file://{}/{name}", data.display());
        let drv = fetchurl(
            &root,
            &[
                "--argstr", "url", &u, "--argstr", "sha256", &nar_hash, "--arg", "unpack", "true",
                "--argstr", "name", "xyzzy",
            ],
        );
        let r = assert_same(&root, &[&drv]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
}

#[test]
fn fetchurl_failures() {
    require_nix!();
    let root = TestRoot::new();
    let file = root.path().join("hello.txt");
    std::fs::write(&file, "hello file\n").unwrap();
    let sha256 = hash(
        &root,
        &["--flat", "--type", "sha256", file.to_str().unwrap()],
    );
    // A file that is not there: the builtin's error, then the builder failure (1).
    let missing = format!("file://{}/nonexistent.txt", root.path().display());
    let drv = fetchurl(
        &root,
        &["--argstr", "url", &missing, "--argstr", "sha256", &sha256],
    );
    let r = assert_same(&root, &[&drv]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!(
            "error: unable to download '{missing}': Couldn't read a file:// file (37)\n"
        )),
        "{}",
        r.stderr
    );
    // The wrong hash: Nix's hash mismatch (102).
    let url = format!("file://{}", file.display());
    let zero = "0".repeat(52);
    let drv = fetchurl(
        &root,
        &["--argstr", "url", &url, "--argstr", "sha256", &zero],
    );
    let r = assert_same(&root, &[&drv]);
    assert_eq!(r.code, 102);
    assert!(r
        .stderr
        .contains("hash mismatch in fixed-output derivation"));
}

/// Three packages and a profile of them as `nix-env` makes it (Nix's
/// `buildenv.nix`): `a` propagates `c` and has a dangling symlink, `a` and `b`
/// both have `bin/same` (priorities 5 and `prioB`).
const PROFILE: &str = r#"
{ prioB ? 4, activeB ? "true" }:
let
  mk = name: script: derivation {
    inherit name; PATH = "/usr/bin:/bin"; system = builtins.currentSystem;
    builder = "/bin/sh"; args = ["-c" script];
  };
  c = mk "pkg-c" "mkdir -p $out/bin; echo c > $out/bin/c";
  a = derivation {
    name = "pkg-a"; inherit c; PATH = "/usr/bin:/bin"; system = builtins.currentSystem; builder = "/bin/sh";
    args = ["-c" "mkdir -p $out/bin $out/share/doc/a $out/nix-support; echo a > $out/bin/a; echo a > $out/bin/same; echo doc > $out/share/doc/a/README; echo $c > $out/nix-support/propagated-user-env-packages; ln -s /nonexistent $out/bin/dangling; echo x > $out/.hidden"];
  };
  b = mk "pkg-b" "mkdir -p $out/bin $out/lib; echo b > $out/bin/b; echo b > $out/bin/same; echo lib > $out/lib/libb";
  manifest = builtins.toFile "env-manifest.nix" "[ ]";
in {
  pkgs = [ a b ];
  env = derivation {
    name = "user-environment";
    system = "builtin";
    builder = "builtin:buildenv";
    inherit manifest;
    derivations = [ "true" 5 1 a activeB prioB 1 b ];
    preferLocalBuild = true;
    allowSubstitutes = false;
  };
}
"#;

#[test]
fn buildenv_profiles_priorities_and_collisions() {
    require_nix!();
    let root = TestRoot::new();
    let expr = root.path().join("profile.nix");
    std::fs::write(&expr, PROFILE).unwrap();
    // The packages are built first (by Nix), so both tools build only the profile.
    let pkgs = root.instantiate(&expr, Some("pkgs"));
    let pkgs: Vec<&str> = pkgs.iter().map(String::as_str).collect();
    root.realise(&pkgs);
    for (args, code) in [
        (vec![], 0),
        (vec!["--arg", "prioB", "6"], 0),
        (vec!["--argstr", "activeB", "false"], 0),
        (vec!["--arg", "prioB", "5"], 100),
    ] {
        let mut a = vec![expr.to_str().unwrap(), "-A", "env"];
        a.extend(args.iter().copied());
        let drv = root.run("nix-instantiate", &a).trim().to_owned();
        let r = assert_same(&root, &[&drv]);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("warning: skipping dangling symlink '"),
            "{}",
            r.stderr
        );
        if code == 100 {
            assert!(r.stderr.contains("have the same priority 5; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME'"), "{}", r.stderr);
        }
    }
}

#[test]
fn unpack_channel_of_a_tarball() {
    require_nix!();
    let root = TestRoot::new();
    let data = root.path().join("chan");
    sh(&format!(
        "mkdir -p {d}/nixpkgs-23.05/lib && echo '{{ }}' > {d}/nixpkgs-23.05/default.nix && echo x > {d}/nixpkgs-23.05/lib/x \
         && tar -C {d} -cJf {d}/../chan.tar.xz nixpkgs-23.05 \
         && mkdir -p {d}/two/a {d}/two/b && tar -C {d}/two -cf {d}/../two.tar a b",
        d = data.display()
    ));
    for (tarball, code) in [("chan.tar.xz", 0), ("two.tar", 100)] {
        let src = root.path().join(tarball);
        let e = format!(
            "derivation {{ name = \"nixpkgs\"; channelName = \"nixpkgs\"; src = {}; builder = \"builtin:unpack-channel\"; system = \"builtin\"; preferLocalBuild = true; }}",
            src.display()
        );
        let drv = root
            .run("nix-instantiate", &["--expr", &e])
            .trim()
            .to_owned();
        let r = assert_same(&root, &[&drv]);
        assert_eq!(r.code, code, "{}", r.stderr);
        if code == 0 {
            assert!(r.stdout.trim().ends_with("-nixpkgs"), "{}", r.stdout);
        } else {
            assert!(
                r.stderr.contains("contains more than one file"),
                "{}",
                r.stderr
            );
        }
    }
}

#[test]
fn fetchurl_over_http() {
    require_nix!();
    let root = TestRoot::new();
    let dir = root.path().join("served");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hello.txt"), "hello over http\n").unwrap();
    let server = crate::http_server::HttpServer::with_policy(&dir, |r| {
        if r.path.contains("forbidden") {
            Action::Status(403, "Forbidden")
        } else {
            Action::Serve
        }
    });
    let sha256 = hash(
        &root,
        &[
            "--flat",
            "--type",
            "sha256",
            dir.join("hello.txt").to_str().unwrap(),
        ],
    );
    for (name, code) in [("hello.txt", 0), ("missing.txt", 1), ("forbidden.txt", 1)] {
        let url = format!("{}/{name}", server.url());
        let drv = fetchurl(
            &root,
            &["--argstr", "url", &url, "--argstr", "sha256", &sha256],
        );
        let r = assert_same(&root, &[&drv]);
        assert_eq!(r.code, code, "{name}: {}", r.stderr);
    }
}

#[test]
fn fetchurl_tries_hashed_mirrors_first() {
    require_nix!();
    let root = TestRoot::new();
    let data = b"from the mirror\n";
    let file = root.path().join("m.txt");
    std::fs::write(&file, data).unwrap();
    let base16 = hash(
        &root,
        &["--flat", "--type", "sha256", file.to_str().unwrap()],
    );
    let dir = root.path().join("mirror/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::rename(&file, dir.join(&base16)).unwrap();
    let mirror = format!("file://{}/mirror", root.path().display());
    // The URL does not exist: only the mirror can give the file.
    let drv = fetchurl(
        &root,
        &[
            "--argstr",
            "url",
            "file:///no-such-dir/m.txt",
            "--argstr",
            "sha256",
            &base16,
        ],
    );
    let r = assert_same(&root, &["--option", "hashed-mirrors", &mirror, &drv]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Without the mirror it fails, in both.
    let r = assert_same(&root, &[&drv]);
    assert_eq!(r.code, 1, "{}", r.stderr);
}
