//! `drover realise` against `nix-store --realise` (Nix 2.8) when substitutes are
//! broken or missing, with and without `--fallback`.
//!
//! Each test writes a signed cache of the chain `a` ← `b` with Nix (see
//! `substitute::cache_then_wipe`), empties the store but for the `.drv`s and
//! snapshots it. Then for each tool in turn: the store and the cache are put back as
//! they were, the cache is damaged the same way, the tool realises `b.drv` (or `b`'s
//! output path), and the exit status, stdout, stderr and the valid paths afterwards
//! are recorded. Both must agree byte for byte, except for the few differences named
//! in [`KnownDifference`] (each a documented divergence of drover from Nix 2.8).
//!
//! What Nix 2.8 does (and drover with it):
//! * A NAR file missing from the cache (narinfo still there) is `SubstituteGone`:
//!   `error: file 'nar/….nar.xz' does not exist in binary cache` (a local cache; an
//!   HTTP cache adds `'<uri>'`), not counted as a failure, so the derivation is built
//!   even without `--fallback`.
//! * A NAR that arrives but is wrong (hash mismatch, truncated, HTTP 500) is a real
//!   failure: without `--fallback` exit 1 with `some substitutes for the outputs of
//!   derivation '…' failed …; try '--fallback' to build derivation from source`; with
//!   it the derivation is built.
//! * A missing narinfo in the middle of a closure is an incomplete closure: the
//!   holes are built, the rest substituted.
//! * Realising an output path (no derivation) can never build: exit 1 with
//!   `error: build of '<path>' failed`, `--fallback` or not.
//! * A floating content-addressed output whose realisation or NAR is missing is
//!   built after resolving its derivation; a broken NAR needs `--fallback`.
//! * `--repair` of valid but corrupted outputs: each is checked (`checking path
//!   '…'...`, `path '…' is corrupted or missing!`) and fetched again over the old
//!   copy.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::drover;
use crate::http_server::{Action, HttpServer};
use crate::nix_env::TestRoot;
use crate::realise::{restore, run, sh, snapshot, Run};
use crate::substitute::cache_then_wipe;

/// A signed cache of `a` ← `b` and a store holding only the derivations.
struct Fixture {
    root: TestRoot,
    /// `b.drv`.
    drv: String,
    /// The outputs of `a` and `b`.
    out_a: String,
    out_b: String,
    /// The output of the fixture's attribute (`b`, or `c` on top of `b`).
    out_top: String,
    /// `file://` URL of the cache directory.
    file_url: String,
    pk: String,
    snap: PathBuf,
    /// An untouched copy of the cache.
    pristine: PathBuf,
}

/// What one tool did.
struct Outcome {
    run: Run,
    /// Valid paths afterwards, sorted.
    valid: Vec<String>,
}

/// A way the cache is broken before a run.
type Damage<'a> = &'a dyn Fn(&Fixture);

impl Fixture {
    /// The cache holds the closure of `attr`'s output (`b`, or the floating
    /// content-addressed `c` on top of `b`).
    fn new(attr: &str) -> Fixture {
        let root = TestRoot::new();
        let (file_url, pk, closure) = cache_then_wipe(&root, attr);
        let drv = root
            .instantiate(&root.path().join("e.nix"), Some(attr))
            .remove(0);
        let snap = snapshot(&root);
        let pristine = root.path().join("cache.orig");
        sh(&format!(
            "cp -a {} {}",
            root.path().join("cache").display(),
            pristine.display()
        ));
        // `nix-store -qR` lists references first.
        let (out_a, out_b) = (closure[0].clone(), closure[1].clone());
        let out_top = closure.last().unwrap().clone();
        Fixture {
            root,
            drv,
            out_a,
            out_b,
            out_top,
            file_url,
            pk,
            snap,
            pristine,
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.root.path().join("cache")
    }

    /// The narinfo of a store path in the cache.
    fn narinfo(&self, path: &str) -> PathBuf {
        let base = Path::new(path).file_name().unwrap().to_str().unwrap();
        self.cache_dir().join(format!("{}.narinfo", &base[..32]))
    }

    /// The NAR file (relative to the cache) the narinfo of `path` names.
    fn nar_url(&self, path: &str) -> String {
        let info = std::fs::read_to_string(self.narinfo(path)).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned()
    }

    fn nar(&self, path: &str) -> PathBuf {
        self.cache_dir().join(self.nar_url(path))
    }

    /// Puts the store and the cache back, breaks the cache with `damage`, and
    /// realises `target` with one tool (`ours`: drover) from the cache at `url`.
    fn realise(
        &self,
        ours: bool,
        url: &str,
        flags: &[&str],
        target: &str,
        damage: Damage,
    ) -> Outcome {
        let root = &self.root;
        restore(root, &self.snap);
        let (cache, xdg) = (self.cache_dir(), root.path().join("xdg"));
        sh(&format!(
            "rm -rf {c} {x} && cp -a {p} {c}",
            c = cache.display(),
            x = xdg.display(),
            p = self.pristine.display()
        ));
        damage(self);
        let mut cmd = if ours {
            let mut c = drover(root);
            c.arg("realise");
            c
        } else {
            let mut c = root.cmd("nix-store");
            c.arg("--realise");
            c
        };
        // Nix keeps narinfos of HTTP caches in `~/.cache/nix`: one per run.
        cmd.env("XDG_CACHE_HOME", &xdg)
            .args(["--option", "substituters", url])
            .args(["--option", "trusted-public-keys", &self.pk])
            // Nix's HTTP retries: one, after a short random pause.
            .args(["--option", "download-attempts", "2"])
            .args(flags)
            .arg(target);
        let run = run(&mut cmd);
        root.verify_store();
        Outcome {
            run,
            valid: valid_paths(root),
        }
    }

    /// Both tools with the same flags and damage: the same exit status (`code`),
    /// stdout, stderr (after `known`) and valid paths. Returns Nix's stderr.
    #[track_caller]
    fn assert_same(
        &self,
        url: &str,
        flags: &[&str],
        target: &str,
        damage: Damage,
        code: i32,
        known: &[KnownDifference],
    ) -> String {
        let nix = self.realise(false, url, flags, target, damage);
        let ours = self.realise(true, url, flags, target, damage);
        let (n, o) = (&nix.run, &ours.run);
        assert_eq!(n.code, code, "nix {flags:?}:\n{}", n.stderr);
        assert_eq!(o.code, n.code, "drover {flags:?}:\n{}", o.stderr);
        assert_eq!(o.stdout, n.stdout, "{flags:?}");
        assert_eq!(
            normalise(&o.stderr, known),
            normalise(&n.stderr, known),
            "{flags:?}\ndrover:\n{}\nnix:\n{}",
            o.stderr,
            n.stderr
        );
        assert_eq!(ours.valid, nix.valid, "{flags:?}");
        nix.run.stderr
    }
}

/// `ValidPaths` of the root's database, sorted.
fn valid_paths(root: &TestRoot) -> Vec<String> {
    let conn = rusqlite::Connection::open_with_flags(
        root.state_dir.join("db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn
        .prepare("select path from ValidPaths order by path")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

/// Where drover's stderr still differs from Nix 2.8's (see the report in each
/// variant); the lines concerned are replaced by a placeholder in both.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KnownDifference {
    /// Nix decompresses through libarchive and prints its words (`Failed to open
    /// archive (Lzma library error:  No progress is possible)`); drover says `NAR for
    /// '…' fetched from '…' is corrupt or incomplete: …`.
    DecompressionMessage,
    /// Over HTTP both tools announce each retry after a random pause (`warning:
    /// error: unable to download '…': HTTP error 500 ('Internal Server Error');
    /// retrying in 293 ms`): the number of milliseconds differs.
    HttpFailure,
    /// A `.doi` that is not JSON: Nix prints the JSON library's exception as is,
    /// without `error: ` (`[json.exception.parse_error.101] parse error at line 1,
    /// column 1: syntax error while parsing value - invalid literal; last read:
    /// 'g'`); drover says `error: invalid realisation '<file>' in '<uri>': invalid
    /// realisation JSON: expected value at line 1 column 1`.
    RealisationJson,
}

fn normalise(stderr: &str, known: &[KnownDifference]) -> String {
    let mut out = String::new();
    let mut retry;
    for l in stderr.lines() {
        let line = if known.contains(&KnownDifference::DecompressionMessage)
            && (l.starts_with("error: Failed to open archive (")
                || (l.starts_with("error: NAR for '") && l.contains("is corrupt or incomplete")))
        {
            "error: <corrupt NAR>"
        } else if known.contains(&KnownDifference::RealisationJson)
            && (l.starts_with("[json.exception.")
                || l.starts_with("error: invalid realisation 'realisations/"))
        {
            "error: <invalid realisation>"
        } else if known.contains(&KnownDifference::HttpFailure)
            && l.starts_with("warning: error: unable to download '")
            && l.ends_with(" ms")
        {
            retry = match l.rfind("; retrying in ") {
                Some(i) => format!("{}; retrying in <N> ms", &l[..i]),
                None => l.to_owned(),
            };
            &retry
        } else {
            l
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn no_damage(_: &Fixture) {}

fn delete_nar(fx: &Fixture, path: &str) {
    std::fs::remove_file(fx.nar(path)).unwrap();
}

fn delete_nar_of_a(fx: &Fixture) {
    delete_nar(fx, &fx.out_a);
}

fn delete_narinfo_of_a(fx: &Fixture) {
    std::fs::remove_file(fx.narinfo(&fx.out_a)).unwrap();
}

fn delete_narinfo_of_b(fx: &Fixture) {
    std::fs::remove_file(fx.narinfo(&fx.out_b)).unwrap();
}

/// `a`'s NAR with one byte of its file changed, compressed again (same size, so
/// only `NarHash` tells).
fn change_nar_of_a(fx: &Fixture) {
    let f = fx.nar(&fx.out_a);
    let mut nar = Vec::new();
    xz_decode(&f, &mut nar);
    let i = nar.windows(2).rposition(|w| w == b"a\n").unwrap();
    nar[i] = b'b';
    xz_encode(&nar, &f);
}

/// A NAR file cut in half.
fn truncate_nar(fx: &Fixture, path: &str) {
    let f = fx.nar(path);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
}

fn truncate_nar_of_a(fx: &Fixture) {
    truncate_nar(fx, &fx.out_a);
}

/// `xz -dc` (the test crate has no xz library).
fn xz_decode(file: &Path, into: &mut Vec<u8>) {
    let out = std::process::Command::new("xz")
        .arg("-dc")
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success());
    *into = out.stdout;
}

fn xz_encode(data: &[u8], file: &Path) {
    let mut child = std::process::Command::new("xz")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    std::fs::write(file, out.stdout).unwrap();
}

fn lines_with<'a>(stderr: &'a str, needle: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.contains(needle)).collect()
}

const REFUSAL: &str = "try '--fallback' to build derivation from source";

/// A gone NAR is as if there were no substitute: both tools build `a` and fetch
/// `b`, with or without `--fallback`.
#[test]
fn gone_nar_is_built_instead() {
    require_nix!();
    let fx = Fixture::new("b");
    let url = fx.file_url.clone();
    for flags in [&[][..], &["--fallback"]] {
        let nix = fx.assert_same(&url, flags, &fx.drv, &delete_nar_of_a, 0, &[]);
        let gone = format!(
            "error: file '{}' does not exist in binary cache",
            fx.nar_url(&fx.out_a)
        );
        assert_eq!(lines_with(&nix, "does not exist"), [&gone, &gone], "{nix}");
        assert_eq!(lines_with(&nix, "building '").len(), 1, "{nix}");
    }
}

/// A NAR whose contents do not match `NarHash`: without `--fallback` both refuse to
/// build (exit 1); with it both build.
#[test]
fn corrupt_nar_needs_fallback() {
    require_nix!();
    let fx = Fixture::new("b");
    let url = fx.file_url.clone();
    let nix = fx.assert_same(&url, &[], &fx.drv, &change_nar_of_a, 1, &[]);
    assert!(nix.contains(&format!(
        "error: hash mismatch importing path '{}';",
        fx.out_a
    )));
    assert_eq!(lines_with(&nix, REFUSAL).len(), 1, "{nix}");
    let nix = fx.assert_same(&url, &["--fallback"], &fx.drv, &change_nar_of_a, 0, &[]);
    assert_eq!(lines_with(&nix, "building '").len(), 2, "{nix}");

    let known = [KnownDifference::DecompressionMessage];
    let nix = fx.assert_same(&url, &[], &fx.drv, &truncate_nar_of_a, 1, &known);
    assert_eq!(lines_with(&nix, REFUSAL).len(), 1, "{nix}");
    fx.assert_same(
        &url,
        &["--fallback"],
        &fx.drv,
        &truncate_nar_of_a,
        0,
        &known,
    );
}

/// A narinfo missing from the middle of the closure: `a` is built, `b` fetched.
#[test]
fn incomplete_closure_builds_the_hole() {
    require_nix!();
    let fx = Fixture::new("b");
    let url = fx.file_url.clone();
    for flags in [&[][..], &["--fallback"]] {
        let nix = fx.assert_same(&url, flags, &fx.drv, &delete_narinfo_of_a, 0, &[]);
        assert!(
            nix.contains("don't know how to build these paths:"),
            "{nix}"
        );
        assert!(
            nix.contains(&format!("copying path '{}' from", fx.out_b)),
            "{nix}"
        );
        // The top has no substitute: it is built, its input fetched.
        let nix = fx.assert_same(&url, flags, &fx.drv, &delete_narinfo_of_b, 0, &[]);
        assert!(
            nix.contains(&format!("copying path '{}' from", fx.out_a)),
            "{nix}"
        );
        assert_eq!(lines_with(&nix, "building '").len(), 1, "{nix}");
    }
}

/// Realising `b`'s output path itself: there is nothing to build from, so every
/// broken substitute fails the same way, `--fallback` or not.
#[test]
fn output_path_cannot_fall_back() {
    require_nix!();
    let fx = Fixture::new("b");
    let url = fx.file_url.clone();
    let failed = format!("error: build of '{}' failed", fx.out_b);
    let cases: [(Damage, i32); 5] = [
        (&no_damage, 0),
        (&delete_nar_of_a, 1),
        (&delete_narinfo_of_a, 1),
        (&delete_narinfo_of_b, 1),
        (&change_nar_of_a, 1),
    ];
    for (damage, code) in cases {
        for flags in [&[][..], &["--fallback"]] {
            let nix = fx.assert_same(&url, flags, &fx.out_b, damage, code, &[]);
            if code != 0 {
                assert_eq!(lines_with(&nix, "error: build of"), [&failed], "{nix}");
            }
        }
    }
}

/// The cache over HTTP answering 500 for NARs: a real failure, as a corrupt NAR.
#[test]
fn http_500_needs_fallback() {
    require_nix!();
    let fx = Fixture::new("b");
    let server = serve(fx.cache_dir(), |t| t.starts_with("/nar/"));
    let url = server.url();
    let known = [KnownDifference::HttpFailure];
    let nix = fx.assert_same(&url, &[], &fx.drv, &no_damage, 1, &known);
    let nar = format!("{url}/{}", fx.nar_url(&fx.out_a));
    assert!(
        nix.contains(&format!(
            "error: unable to download '{nar}': HTTP error 500"
        )),
        "{nix}"
    );
    assert_eq!(lines_with(&nix, REFUSAL).len(), 1, "{nix}");
    let nix = fx.assert_same(&url, &["--fallback"], &fx.drv, &no_damage, 0, &known);
    assert_eq!(lines_with(&nix, "building '").len(), 2, "{nix}");
    // A 404 is gone, and the message names the cache: `a` is built; `b`'s NAR
    // still fails, after that.
    let nix = fx.assert_same(&url, &[], &fx.drv, &delete_nar_of_a, 1, &known);
    let gone = format!(
        "error: file '{}' does not exist in binary cache '{url}'",
        fx.nar_url(&fx.out_a)
    );
    assert_eq!(lines_with(&nix, "does not exist"), [&gone, &gone], "{nix}");
}

/// Serves the cache in `dir` over HTTP, except that every file that exists and
/// `fails` (given the request path, `/nar/….nar.xz`) gets `500 Internal Server
/// Error`; a missing file is still `404`.
fn serve(dir: PathBuf, fails: impl Fn(&str) -> bool + Send + Sync + 'static) -> HttpServer {
    HttpServer::with_policy(dir, move |r| {
        if r.exists() && fails(&r.path) {
            Action::INTERNAL_SERVER_ERROR
        } else {
            Action::Serve
        }
    })
}

/// A floating content-addressed `c` on top of `b`: substituted through its
/// realisation; when that or its NAR is missing, both tools build it (after
/// resolving); a broken NAR or realisation needs `--fallback`; a hole deeper in the
/// closure is built as for input-addressed paths.
#[test]
fn floating_ca_output_falls_back_as_nix_does() {
    require_nix!();
    let fx = Fixture::new("c");
    let url = fx.file_url.clone();
    let gone_top = |fx: &Fixture| delete_nar(fx, &fx.out_top);
    let no_realisations = |fx: &Fixture| {
        let dir = fx.cache_dir().join("realisations");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
    };
    let truncated_top = |fx: &Fixture| truncate_nar(fx, &fx.out_top);
    let bad_realisations = |fx: &Fixture| {
        for e in std::fs::read_dir(fx.cache_dir().join("realisations")).unwrap() {
            std::fs::write(e.unwrap().path(), "garbage").unwrap();
        }
    };
    let known = [
        KnownDifference::DecompressionMessage,
        KnownDifference::RealisationJson,
    ];
    for flags in [&[][..], &["--fallback"]] {
        for damage in [&gone_top as Damage, &no_realisations, &delete_nar_of_a] {
            let nix = fx.assert_same(&url, flags, &fx.drv, damage, 0, &[]);
            assert_eq!(lines_with(&nix, "building '").len(), 1, "{nix}");
        }
        let code = if flags.is_empty() { 1 } else { 0 };
        for damage in [&truncated_top as Damage, &bad_realisations] {
            let nix = fx.assert_same(&url, flags, &fx.drv, damage, code, &known);
            assert_eq!(lines_with(&nix, REFUSAL).len(), code as usize, "{nix}");
        }
    }
}

/// A narinfo the HTTP cache answers with 500: without `--fallback` the plan cannot
/// be made and both stop before anything is done (exit 1). (With `--fallback` Nix 2.8
/// logs the error, disables the cache and then aborts with an uncaught
/// `SubstituterDisabled`, exit 134; drover builds what has no substitute.)
#[test]
fn http_500_for_a_narinfo_is_fatal() {
    require_nix!();
    let fx = Fixture::new("b");
    let a = fx.narinfo(&fx.out_a);
    let a_name = a.file_name().unwrap().to_str().unwrap().to_owned();
    let failing = format!("/{a_name}");
    let server = serve(fx.cache_dir(), move |t| t == failing);
    let url = server.url();
    let known = [KnownDifference::HttpFailure];
    let nix = fx.assert_same(&url, &[], &fx.drv, &no_damage, 1, &known);
    let a_url = format!("{url}/{a_name}");
    assert!(
        nix.contains(&format!(
            "error: unable to download '{a_url}': HTTP error 500"
        )),
        "{nix}"
    );
    assert!(!nix.contains("will be fetched"), "{nix}");
}

/// Two caches, the first broken, the second intact: a gone or missing substitute
/// falls through to the second; so does a broken NAR, but the failure is remembered
/// (Nix's `substituterFailed`) only when no cache succeeds.
#[test]
fn second_cache_takes_over() {
    require_nix!();
    let fx = Fixture::new("b");
    let both = format!("{} file://{}", fx.file_url, fx.pristine.display());
    let cases: [(Damage, i32); 4] = [
        (&delete_nar_of_a, 0),
        (&delete_narinfo_of_a, 0),
        (&change_nar_of_a, 0),
        (&truncate_nar_of_a, 0),
    ];
    let known = [KnownDifference::DecompressionMessage];
    for (damage, code) in cases {
        for flags in [&[][..], &["--fallback"]] {
            let nix = fx.assert_same(&both, flags, &fx.drv, damage, code, &known);
            assert!(!nix.contains("building '"), "{nix}");
        }
    }
}

/// The outputs substituted, then corrupted in the store: `--repair` reports and
/// fetches them again, in the closure too, exactly as Nix does.
#[test]
fn repair_fetches_corrupted_outputs_again() {
    require_nix!();
    let fx = Fixture::new("b");
    let url = fx.file_url.clone();
    let substitute_then_corrupt = |fx: &Fixture| {
        let mut c = fx.root.cmd("nix-store");
        c.args(["--realise", &fx.drv])
            .args(["--option", "substituters", &fx.file_url])
            .args(["--option", "trusted-public-keys", &fx.pk]);
        assert_eq!(run(&mut c).code, 0);
        for out in [&fx.out_a, &fx.out_b] {
            sh(&format!("chmod u+w {out} && echo corrupted > {out}"));
        }
    };
    let nix = fx.assert_same(
        &url,
        &["--repair"],
        &fx.drv,
        &substitute_then_corrupt,
        0,
        &[],
    );
    for out in [&fx.out_a, &fx.out_b] {
        assert_eq!(
            lines_with(&nix, &format!("path '{out}' is corrupted or missing!")).len(),
            1,
            "{nix}"
        );
        // (`realise` also ran `nix-store --verify --check-contents`.)
        assert_ne!(std::fs::read_to_string(out).unwrap(), "corrupted\n");
    }
}
