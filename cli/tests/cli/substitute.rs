//! `drover realise` fetching from a binary cache that Nix 2.8 wrote, instead of
//! building.

use std::path::Path;

use crate::drover;
use crate::http_server::HttpServer;
use crate::nix_env::TestRoot;

/// An input-addressed chain `a` ← `b` and a floating content-addressed `c` on top.
const EXPR: &str = r#"
let
  mk = args: derivation ({ system = builtins.currentSystem; builder = "/bin/sh"; } // args);
  a = mk { name = "a"; args = ["-c" "echo a > $out"]; };
  b = mk { name = "b"; inherit a; args = ["-c" "echo $a > $out"]; };
  c = mk { name = "c"; inherit b; __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; args = ["-c" "echo $b > $out"]; };
in { inherit a b c; }
"#;

/// Builds `attr` with Nix, copies it to a signed cache, then empties the store.
/// Returns the cache URL, the public key and the closure of the output.
pub(crate) fn cache_then_wipe(root: &TestRoot, attr: &str) -> (String, String, Vec<String>) {
    let expr = root.path().join("e.nix");
    std::fs::write(&expr, EXPR).unwrap();
    let drv = root.instantiate(&expr, Some(attr)).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let closure: Vec<String> = root
        .run("nix-store", &["-qR", &out])
        .lines()
        .map(str::to_owned)
        .collect();
    let (sk, pk) = (root.path().join("sk"), root.path().join("pk"));
    root.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "test-1",
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    );
    let cache = format!("file://{}", root.path().join("cache").display());
    root.run(
        "nix",
        &[
            "copy",
            "--to",
            &format!("{cache}?secret-key={}", sk.display()),
            "-f",
            expr.to_str().unwrap(),
            attr,
        ],
    );
    root.wipe_store();
    let pk = std::fs::read_to_string(pk).unwrap().trim().to_owned();
    (cache, pk, closure)
}

#[test]
fn realise_fetches_instead_of_building() {
    require_nix!();
    let root = TestRoot::new();
    let (cache, pk, closure) = cache_then_wipe(&root, "b");
    let expr = root.path().join("e.nix");
    let drv = root.instantiate(&expr, Some("b")).remove(0);
    let out = drover(&root)
        .args(["realise", "--plain", &drv])
        .args(["--option", "substituters", &cache])
        .args(["--option", "trusted-public-keys", &pk])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), closure[1]);
    assert!(
        stderr.contains("these 2 paths will be fetched ("),
        "{stderr}"
    );
    for p in &closure {
        assert!(
            stderr.contains(&format!("copying path '{p}' from '{cache}'...")),
            "{stderr}"
        );
    }
    assert!(!stderr.contains("building '"), "{stderr}");
    root.verify_store();
}

#[test]
fn realise_refuses_unsigned_substitutes_and_builds() {
    require_nix!();
    let root = TestRoot::new();
    let (cache, _pk, closure) = cache_then_wipe(&root, "b");
    let expr = root.path().join("e.nix");
    let drv = root.instantiate(&expr, Some("b")).remove(0);
    let out = drover(&root)
        .args(["realise", "--plain", &drv])
        .args(["--option", "substituters", &cache])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Nix 2.8's wording (Lix says "ignoring substitute for … as it's not signed").
    for p in &closure {
        let line = format!(
            "warning: the substitute for '{p}' from '{cache}' is not signed by any of the keys in 'trusted-public-keys'"
        );
        assert!(stderr.lines().any(|l| l == line), "{line}\n{stderr}");
    }
    assert!(!stderr.contains("copying path"), "{stderr}");
    assert!(stderr.contains("building '"), "{stderr}");
    root.verify_store();
}

#[test]
fn realise_substitutes_a_floating_ca_output_through_its_realisation() {
    require_nix!();
    let root = TestRoot::new();
    let (cache, pk, closure) = cache_then_wipe(&root, "c");
    let expr = root.path().join("e.nix");
    let drv = root.instantiate(&expr, Some("c")).remove(0);
    let out = drover(&root)
        .args(["realise", "--plain", &drv])
        .args(["--option", "substituters", &cache])
        .args(["--option", "trusted-public-keys", &pk])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        closure.last().unwrap()
    );
    assert!(!stderr.contains("building '"), "{stderr}");
    root.verify_store();
}

#[test]
fn realise_fetches_from_another_local_store() {
    require_nix!();
    let root = TestRoot::new();
    let expr = root.path().join("e.nix");
    std::fs::write(&expr, EXPR).unwrap();
    let drv = root.instantiate(&expr, Some("b")).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let other = root.path().join("other");
    root.run(
        "nix",
        &[
            "copy",
            "--no-check-sigs",
            "--to",
            &format!("local?root={}", other.display()),
            &out,
        ],
    );
    for url in [
        other.display().to_string(),
        format!("local?root={}", other.display()),
    ] {
        root.wipe_store();
        let drv = root.instantiate(&expr, Some("b")).remove(0);
        let o = drover(&root)
            .args(["realise", "--plain", &drv])
            .args(["--option", "substituters", &url])
            .args(["--option", "require-sigs", "false"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), out);
        assert!(
            stderr.contains(&format!("copying path '{out}' to 'local'...")),
            "{stderr}"
        );
        assert!(!stderr.contains("building '"), "{stderr}");
        root.verify_store();
    }
}

/// `drover realise` keeps what an HTTP cache answered in Nix 2.8's narinfo disk cache
/// (`$XDG_CACHE_HOME/nix/binary-cache-v6.sqlite`): after the store is wiped, a second
/// run asks the cache only for the NARs, no `nix-cache-info` and no narinfo; and it
/// does the same with the rows `nix-store --realise` wrote.
#[test]
fn realise_answers_from_the_narinfo_disk_cache() {
    require_nix!();
    let root = TestRoot::new();
    let (_, pk, closure) = cache_then_wipe(&root, "b");
    let server = HttpServer::start(root.path().join("cache"));
    let url = server.url();
    // `a` and `b`'s outputs: realised from the cache alone.
    let realise = |mut cmd: std::process::Command, xdg: &Path| {
        let out = cmd
            .env("XDG_CACHE_HOME", xdg)
            .args(["--option", "substituters", &url])
            .args(["--option", "trusted-public-keys", &pk])
            .args(&closure)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd:?}:\n{stderr}");
        assert!(!stderr.contains("building '"), "{stderr}");
        let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(printed, closure);
        root.verify_store();
    };
    let drover_realise = || {
        let mut c = drover(&root);
        c.args(["realise", "--plain"]);
        c
    };
    let nars: Vec<String> = closure
        .iter()
        .map(|p| {
            let hash = &Path::new(p).file_name().unwrap().to_str().unwrap()[..32];
            let info = root.path().join(format!("cache/{hash}.narinfo"));
            let info = std::fs::read_to_string(info).unwrap();
            let nar = info.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
            format!("GET /{nar}")
        })
        .collect();
    let only_nars = |mut asked: Vec<String>| {
        asked.sort();
        let mut want = nars.clone();
        want.sort();
        assert_eq!(asked, want, "only the NARs, once each");
    };

    // drover's first run asks for everything and records it.
    let xdg = root.path().join("xdg-drover");
    realise(drover_realise(), &xdg);
    let asked = server.take_requests();
    assert!(
        asked.contains(&"GET /nix-cache-info".to_owned()),
        "{asked:?}"
    );
    assert_eq!(
        asked.iter().filter(|r| r.ends_with(".narinfo")).count(),
        closure.len(),
        "{asked:?}"
    );
    assert!(xdg.join("nix/binary-cache-v6.sqlite").is_file());

    // Its second run, into an empty store, answers from its own rows.
    root.wipe_store();
    realise(drover_realise(), &xdg);
    only_nars(server.take_requests());

    // Rows Nix wrote serve as well.
    let xdg = root.path().join("xdg-nix");
    root.wipe_store();
    let mut nix = root.cmd("nix-store");
    nix.arg("--realise");
    realise(nix, &xdg);
    let asked = server.take_requests();
    assert!(asked.iter().any(|r| r.ends_with(".narinfo")), "{asked:?}");
    root.wipe_store();
    realise(drover_realise(), &xdg);
    only_nars(server.take_requests());
}
