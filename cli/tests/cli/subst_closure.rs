//! A closure substituted by naming its root only (the case `bench_substitute`
//! times at 1,001 paths), beside Nix 2.8 in the same root: drover fetches paths
//! ahead of their references but registers every path only after its references,
//! as Nix does; a path of the middle of the closure that cannot be copied leaves
//! nothing invalid behind and gives Nix's exit status and messages.

use std::collections::BTreeSet;

use crate::drover;
use crate::nix_env::TestRoot;
use crate::realise::{db_rows, restore, run, snapshot, Run};

/// `LAYERS` layers of `WIDTH` trivial derivations, each output naming three
/// outputs of the layer below, and a root naming the top layer (bench_substitute's
/// `closure` case, smaller).
const LAYERS: usize = 3;
const WIDTH: usize = 4;

fn expression() -> String {
    format!(
        r#"let
  width = {WIDTH};
  mk = l: i: deps: derivation {{
    name = "closure-${{toString l}}-${{toString i}}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{toString l}} ${{toString i}} ${{toString deps}} > $out" ];
  }};
  below = l: j: builtins.elemAt (builtins.elemAt layers (l - 1)) (j - width * (j / width));
  layers = builtins.genList (l: builtins.genList (i:
    mk l i (if l == 0 then [ ] else [ (below l i) (below l (i + 1)) (below l (i + 3)) ])
  ) width) {LAYERS};
in mk {LAYERS} 0 (builtins.elemAt layers ({LAYERS} - 1))
"#
    )
}

/// Builds the closure with Nix, copies it to a signed `file://` cache (zstd), and
/// empties the store. Returns the root's output path, its closure, the cache
/// directory and the `--option`s naming the cache and its key.
fn cache_of_closure(root: &TestRoot) -> (String, Vec<String>, std::path::PathBuf, Vec<String>) {
    let file = root.path().join("closure.nix");
    std::fs::write(&file, expression()).unwrap();
    let drv = root.instantiate(&file, None).remove(0);
    let out = root.realise(&[&drv]).remove(0);
    let closure: Vec<String> = root
        .run("nix-store", &["-qR", &out])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(closure.len(), LAYERS * WIDTH + 1);
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
    let dir = root.path().join("cache");
    root.run(
        "nix",
        &[
            "copy",
            "--to",
            &format!(
                "file://{}?compression=zstd&secret-key={}",
                dir.display(),
                sk.display()
            ),
            &out,
        ],
    );
    root.wipe_store();
    // An empty store and database, the state both runs start from.
    root.run("nix-store", &["--init"]);
    let pk = std::fs::read_to_string(pk).unwrap().trim().to_owned();
    let options = vec![
        "--option".into(),
        "substituters".into(),
        format!("file://{}", dir.display()),
        "--option".into(),
        "trusted-public-keys".into(),
        pk,
    ];
    (out, closure, dir, options)
}

/// `(referrer, reference)` pairs of the `Refs` table (self-references left out)
/// where the reference's row id is not below the referrer's: a reference registered
/// after its referrer.
fn registered_out_of_order(root: &TestRoot) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open_with_flags(
        root.state_dir.join("db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn
        .prepare(
            "select a.path, b.path from Refs r join ValidPaths a on r.referrer = a.id \
             join ValidPaths b on r.reference = b.id where a.id != b.id and b.id > a.id",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Entries of the store directory other than lock files and `.links`.
fn store_entries(root: &TestRoot) -> BTreeSet<String> {
    std::fs::read_dir(&root.store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock") && n != ".links")
        .collect()
}

/// The valid paths' base names.
fn valid_entries(root: &TestRoot) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open_with_flags(
        root.state_dir.join("db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn.prepare("select path from ValidPaths").unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|p| p.unwrap().rsplit('/').next().unwrap().to_owned())
        .collect()
}

/// What both tools are compared on after a run.
struct After {
    run: Run,
    db: String,
    out_of_order: Vec<(String, String)>,
    entries: BTreeSet<String>,
    valid: BTreeSet<String>,
}

fn after(root: &TestRoot, run: Run) -> After {
    After {
        run,
        db: db_rows(root),
        out_of_order: registered_out_of_order(root),
        entries: store_entries(root),
        valid: valid_entries(root),
    }
}

/// Realises `args` with Nix, then (from the same store) with drover.
fn both(root: &TestRoot, args: &[String]) -> (After, After) {
    let snap = snapshot(root);
    let nix = run(root.cmd("nix-store").arg("--realise").args(args));
    let nix = after(root, nix);
    restore(root, &snap);
    let ours = run(drover(root).arg("realise").args(args));
    let ours = after(root, ours);
    (nix, ours)
}

/// The sorted lines of stderr without the `--add-root` warning.
fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .filter(|l| !l.starts_with("warning: you did not specify"))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
fn a_closure_by_its_root_is_registered_references_first_as_by_nix() {
    require_nix!();
    let root = TestRoot::new();
    let (out, closure, _dir, mut args) = cache_of_closure(&root);
    args.extend(["--max-jobs".into(), "0".into(), out.clone()]);
    let (nix, ours) = both(&root, &args);
    assert_eq!(
        (nix.run.code, ours.run.code),
        (0, 0),
        "{}\n{}",
        nix.run.stderr,
        ours.run.stderr
    );
    assert_eq!(nix.run.stdout, ours.run.stdout);
    assert_eq!(lines(&nix.run.stderr), lines(&ours.run.stderr));
    for p in &closure {
        assert!(
            ours.run
                .stderr
                .contains(&format!("copying path '{p}' from 'file://")),
            "{}",
            ours.run.stderr
        );
    }
    assert_eq!(nix.db, ours.db);
    // Every reference has a lower row id than its referrer: it was registered first.
    assert!(nix.out_of_order.is_empty(), "{:?}", nix.out_of_order);
    assert!(ours.out_of_order.is_empty(), "{:?}", ours.out_of_order);
    assert_eq!(nix.entries, ours.entries);
    assert_eq!(ours.entries, ours.valid);
    root.verify_store();
}

/// One path of the middle layer has a corrupt NAR (the file of another path of the
/// cache in its place, so it unpacks but its NAR hash is wrong; a file that does
/// not decompress gives Nix's libarchive wording, see fallback.rs): with `--keep-going` every path that
/// does not need it is substituted, every path above it fails, and no invalid path
/// is left in the store — with the same exit status, messages and rows as Nix.
#[test]
fn a_corrupt_nar_in_the_middle_of_a_closure_leaves_no_invalid_path_as_nix() {
    require_nix!();
    let root = TestRoot::new();
    let (out, closure, dir, mut args) = cache_of_closure(&root);
    let victim = closure
        .iter()
        .find(|p| p.ends_with(&format!("-closure-{}-1", LAYERS / 2)))
        .unwrap()
        .clone();
    let nar_of = |p: &str| {
        let hash = p.rsplit('/').next().unwrap().split('-').next().unwrap();
        let narinfo = std::fs::read_to_string(dir.join(format!("{hash}.narinfo"))).unwrap();
        dir.join(
            narinfo
                .lines()
                .find_map(|l| l.strip_prefix("URL: "))
                .unwrap(),
        )
    };
    let other = closure
        .iter()
        .find(|p| p.ends_with("-closure-0-0"))
        .unwrap();
    std::fs::copy(nar_of(other), nar_of(&victim)).unwrap();
    args.extend([
        "--max-jobs".into(),
        "0".into(),
        "--keep-going".into(),
        out.clone(),
    ]);
    let (nix, ours) = both(&root, &args);
    assert_ne!(nix.run.code, 0, "{}", nix.run.stderr);
    assert_eq!(
        nix.run.code, ours.run.code,
        "{}\n{}",
        nix.run.stderr, ours.run.stderr
    );
    assert_eq!(nix.run.stdout, ours.run.stdout);
    assert_eq!(lines(&nix.run.stderr), lines(&ours.run.stderr));
    assert!(
        nix.run
            .stderr
            .contains("error: hash mismatch importing path '"),
        "{}",
        nix.run.stderr
    );
    assert_eq!(nix.db, ours.db);
    assert!(ours.out_of_order.is_empty(), "{:?}", ours.out_of_order);
    // Nothing but valid paths in drover's store: the copy that failed its check and
    // the paths fetched ahead above it were deleted. Nix 2.8 unpacks in place and
    // leaves the failed copy there, invalid, for the collector: that is the one
    // difference.
    let victim = victim.rsplit('/').next().unwrap().to_owned();
    assert_eq!(ours.entries, ours.valid);
    assert_eq!(nix.valid, ours.valid);
    assert!(!ours.entries.contains(&victim));
    let nix_leftovers: Vec<&String> = nix.entries.difference(&nix.valid).collect();
    assert_eq!(nix_leftovers, [&victim]);
    root.verify_store();
}
