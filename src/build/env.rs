//! The builder's environment, as Nix 2.8 sets it up without a sandbox (`initEnv`).
//!
//! In this order (later entries override earlier ones):
//! `PATH=/path-not-set`, `HOME=/homeless-shelter`, `NIX_STORE=<store dir>`,
//! `NIX_BUILD_CORES=<cores>`; then, unless the derivation uses structured attributes,
//! every derivation environment variable, except those named in `passAsFile`, which
//! are written to `<build top>/.attr-<nixbase32(sha256(name))>` and passed as
//! `<name>Path`; then `NIX_BUILD_TOP`, `TMPDIR`, `TEMPDIR`, `TMP`, `TEMP`, `PWD` =
//! the build directory; `NIX_OUTPUT_CHECKED=1` for fixed-output derivations; for
//! fixed-output and impure derivations each variable named in `impureEnvVars`,
//! copied from the caller's environment (unset → empty); `NIX_LOG_FD=2`,
//! `TERM=xterm-256color`. With `__structuredAttrs` (env `__json`), the attributes go
//! to `.attrs.json` (the `__json` object with `outputs` = output name → path, keys
//! sorted, compact) and `.attrs.sh` (bash `declare`s of the representable values),
//! named by `NIX_ATTRS_JSON_FILE` and `NIX_ATTRS_SH_FILE`.
//!
//! Output paths the builder writes to are *scratch* paths: hash placeholders of every
//! output, and the hash parts of redirected outputs, are rewritten
//! (`inputRewrites`, [`rewrite_strings`]) in the environment (names and values), the
//! arguments, and the files written. The builder path itself is not rewritten (Nix
//! 2.8 `execve`s `drv.builder` as is); `argv[0]` is its base name.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use thiserror::Error;

use crate::derivation::{Derivation, DerivationError};
use crate::hash::{Encoding, HashAlgo};
use crate::store_path::{StoreDir, StorePath};

/// The fake home directory of builders.
pub const HOME_DIR: &str = "/homeless-shelter";

/// Why the environment could not be computed.
#[derive(Debug, Error)]
pub enum EnvError {
    #[error("derivation's '__json' attribute is not a JSON object: {0}")]
    BadStructuredAttrs(String),
    #[error("build directory '{0}' is not valid UTF-8")]
    BadBuildTop(String),
    #[error(transparent)]
    Derivation(#[from] DerivationError),
}

/// What [`builder_env`] needs.
#[derive(Debug, Clone, Copy)]
pub struct EnvInputs<'a> {
    pub drv: &'a Derivation,
    pub store_dir: &'a StoreDir,
    pub cores: u64,
    /// The build directory (`NIX_BUILD_TOP`).
    pub build_top: &'a Path,
    /// The caller's environment, for `impureEnvVars`.
    pub caller_env: &'a BTreeMap<String, String>,
    /// Output name → the path the builder writes it to.
    pub scratch_outputs: &'a BTreeMap<String, StorePath>,
    /// `inputRewrites`: placeholder or hash part → replacement.
    pub input_rewrites: &'a BTreeMap<String, String>,
    /// Attributes added to the structured-attrs JSON (the closures that
    /// `exportReferencesGraph` asks for); ignored without structured attributes.
    pub structured_extra: &'a serde_json::Map<String, Value>,
}

/// The builder's process set-up: environment (rewritten), files to create in the
/// build directory (file name → contents), and the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderEnv {
    pub env: BTreeMap<String, String>,
    pub files: Vec<(String, Vec<u8>)>,
    /// The program (`drv.builder`).
    pub builder: String,
    /// `argv[0]`: the base name of the builder.
    pub arg0: String,
    /// The arguments after `argv[0]` (rewritten).
    pub args: Vec<String>,
}

/// Nix's `rewriteStrings`: applies every rewrite, in key order, to the whole string.
pub fn rewrite_strings(s: &str, rewrites: &BTreeMap<String, String>) -> String {
    let mut s = s.to_owned();
    for (from, to) in rewrites {
        if !from.is_empty() && s.contains(from.as_str()) {
            s = s.replace(from.as_str(), to);
        }
    }
    s
}

/// The file name of a `passAsFile` attribute: `.attr-<nixbase32(sha256(name))>`.
pub fn pass_as_file_name(attr: &str) -> String {
    format!(
        ".attr-{}",
        HashAlgo::Sha256.digest(attr).encode(Encoding::Base32)
    )
}

/// Nix's `shellEscape`: single quotes, with `'` as `'\''`.
fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sh_simple(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(shell_escape(s)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i.to_string())
            } else if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else {
                let f = n.as_f64()?;
                (f.ceil() == f).then(|| format!("{}", f as i64))
            }
        }
        Value::Null => Some("''".into()),
        Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
        _ => None,
    }
}

fn is_sh_var_name(k: &str) -> bool {
    let mut cs = k.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `.attrs.sh` Nix 2.8 writes for a structured-attrs JSON object: for each key
/// (sorted) that is a shell variable name, `declare k=v` for strings, integers,
/// Booleans (`1`/empty) and null (`''`), `declare -a k=(v v )` for arrays and
/// `declare -A k=(['k']=v )` for objects of such values; anything else is omitted.
pub fn structured_attrs_sh(json: &serde_json::Map<String, Value>) -> String {
    let mut keys: Vec<&String> = json.keys().collect();
    keys.sort();
    let mut out = String::new();
    for k in keys {
        if !is_sh_var_name(k) {
            continue;
        }
        let v = &json[k];
        if let Some(s) = sh_simple(v) {
            out.push_str(&format!("declare {k}={s}\n"));
        } else if let Value::Array(items) = v {
            let parts: Option<Vec<String>> = items.iter().map(sh_simple).collect();
            if let Some(parts) = parts {
                let body: String = parts.iter().map(|p| format!("{p} ")).collect();
                out.push_str(&format!("declare -a {k}=({body})\n"));
            }
        } else if let Value::Object(m) = v {
            let mut ks: Vec<&String> = m.keys().collect();
            ks.sort();
            let parts: Option<Vec<String>> = ks
                .iter()
                .map(|k2| sh_simple(&m[*k2]).map(|s| format!("[{}]={s} ", shell_escape(k2))))
                .collect();
            if let Some(parts) = parts {
                out.push_str(&format!("declare -A {k}=({})\n", parts.concat()));
            }
        }
    }
    out
}

/// Sorts object keys recursively (nlohmann's `json::dump` order).
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        v => v.clone(),
    }
}

/// A derivation attribute as a list of strings (`getStringsAttr`): a JSON array of
/// strings with structured attributes, else the variable split on whitespace.
pub fn strings_attr(
    drv: &Derivation,
    structured: Option<&serde_json::Map<String, Value>>,
    name: &str,
) -> Vec<String> {
    match structured {
        Some(m) => match m.get(name) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        },
        None => drv
            .env
            .get(name)
            .map(|v| {
                v.split([' ', '\t', '\n', '\r'])
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// `requiredSystemFeatures` as Nix 2.8's `getRequiredSystemFeatures` reads it (before
/// adding `ca-derivations`): with structured attributes, the strings of the JSON
/// array, else the variable split on whitespace. An unparsable `__json` yields none
/// here; building such a derivation fails on it anyway ([`builder_env`]).
pub fn required_system_features(drv: &Derivation) -> std::collections::BTreeSet<String> {
    let structured = if drv.env.contains_key("__json") {
        match structured_attrs(drv) {
            Ok(Some(m)) => Some(m),
            _ => return Default::default(),
        }
    } else {
        None
    };
    strings_attr(drv, structured.as_ref(), "requiredSystemFeatures")
        .into_iter()
        .collect()
}

/// The parsed `__json` attribute, if the derivation uses structured attributes.
pub fn structured_attrs(
    drv: &Derivation,
) -> Result<Option<serde_json::Map<String, Value>>, EnvError> {
    match drv.env.get("__json") {
        None => Ok(None),
        Some(j) => match serde_json::from_str::<Value>(j) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(_) => Err(EnvError::BadStructuredAttrs(j.clone())),
            Err(e) => Err(EnvError::BadStructuredAttrs(e.to_string())),
        },
    }
}

/// Computes the builder's environment, files and command line (a pure function).
pub fn builder_env(i: &EnvInputs<'_>) -> Result<BuilderEnv, EnvError> {
    let drv = i.drv;
    let ty = drv.derivation_type()?;
    let top = i
        .build_top
        .to_str()
        .ok_or_else(|| EnvError::BadBuildTop(i.build_top.display().to_string()))?
        .to_owned();
    let rw = |s: &str| rewrite_strings(s, i.input_rewrites);
    let structured = structured_attrs(drv)?;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    env.insert("PATH".into(), "/path-not-set".into());
    env.insert("HOME".into(), HOME_DIR.into());
    env.insert("NIX_STORE".into(), i.store_dir.as_str().into());
    env.insert("NIX_BUILD_CORES".into(), i.cores.to_string());
    if structured.is_none() {
        let pass_as_file: Vec<String> = strings_attr(drv, None, "passAsFile");
        for (k, v) in &drv.env {
            if pass_as_file.iter().any(|p| p == k) {
                let fname = pass_as_file_name(k);
                files.push((fname.clone(), rw(v).into_bytes()));
                env.insert(format!("{k}Path"), format!("{top}/{fname}"));
            } else {
                env.insert(k.clone(), v.clone());
            }
        }
    }
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        env.insert(k.into(), top.clone());
    }
    if ty.is_fixed() {
        env.insert("NIX_OUTPUT_CHECKED".into(), "1".into());
    }
    if !ty.is_sandboxed() {
        for v in strings_attr(drv, structured.as_ref(), "impureEnvVars") {
            let val = i.caller_env.get(&v).cloned().unwrap_or_default();
            env.insert(v, val);
        }
    }
    env.insert("NIX_LOG_FD".into(), "2".into());
    env.insert("TERM".into(), "xterm-256color".into());
    if let Some(mut json) = structured {
        let outputs: serde_json::Map<String, Value> = drv
            .outputs
            .keys()
            .map(|o| {
                let p = i
                    .scratch_outputs
                    .get(o)
                    .map(|p| i.store_dir.print(p))
                    .unwrap_or_else(|| crate::derivation::hash_placeholder(o));
                (o.clone(), Value::String(p))
            })
            .collect();
        json.insert("outputs".into(), Value::Object(outputs));
        for (k, v) in i.structured_extra {
            json.insert(k.clone(), v.clone());
        }
        let sh = structured_attrs_sh(&json);
        files.push((".attrs.sh".into(), rw(&sh).into_bytes()));
        let dumped = sorted(&Value::Object(json)).to_string();
        files.push((".attrs.json".into(), rw(&dumped).into_bytes()));
        env.insert("NIX_ATTRS_SH_FILE".into(), format!("{top}/.attrs.sh"));
        env.insert("NIX_ATTRS_JSON_FILE".into(), format!("{top}/.attrs.json"));
    }
    // The child applies the rewrites to every `name=value` string.
    let env = env.into_iter().map(|(k, v)| (rw(&k), rw(&v))).collect();
    let arg0 = drv
        .builder
        .rsplit('/')
        .next()
        .unwrap_or(&drv.builder)
        .to_owned();
    Ok(BuilderEnv {
        env,
        files,
        builder: drv.builder.clone(),
        arg0,
        args: drv.args.iter().map(|a| rw(a)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::{hash_placeholder, DerivationOutput};

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    fn drv(env: &[(&str, &str)]) -> Derivation {
        let out = sp("4cp24yy841mmxlkk4adr2sfgzd5m5ybs-x");
        Derivation {
            outputs: [("out".into(), DerivationOutput::InputAddressed { path: out })].into(),
            system: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), "true".into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn run(d: &Derivation, caller: &[(&str, &str)]) -> BuilderEnv {
        let sd = StoreDir::new("/s").unwrap();
        let scratch: BTreeMap<String, StorePath> = d
            .outputs
            .iter()
            .map(|(n, o)| {
                (
                    n.clone(),
                    o.path()
                        .cloned()
                        .unwrap_or_else(|| sp("00000000000000000000000000000000-scratch")),
                )
            })
            .collect();
        let rewrites: BTreeMap<String, String> = scratch
            .iter()
            .map(|(n, p)| (hash_placeholder(n), sd.print(p)))
            .collect();
        let caller = caller
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        builder_env(&EnvInputs {
            drv: d,
            store_dir: &sd,
            cores: 3,
            build_top: Path::new("/t/nix-build-x.drv-0"),
            caller_env: &caller,
            scratch_outputs: &scratch,
            input_rewrites: &rewrites,
            structured_extra: &serde_json::Map::new(),
        })
        .unwrap()
    }

    #[test]
    fn plain_env_and_overrides() {
        let d = drv(&[
            ("name", "x"),
            ("out", "/s/4cp24yy841mmxlkk4adr2sfgzd5m5ybs-x"),
            ("PATH", "/bin"),
            ("TMPDIR", "/nope"),
            ("TERM", "dumb"),
        ]);
        let e = run(&d, &[("SECRET", "x")]);
        assert_eq!(e.env["PATH"], "/bin");
        assert_eq!(e.env["TMPDIR"], "/t/nix-build-x.drv-0");
        assert_eq!(e.env["PWD"], "/t/nix-build-x.drv-0");
        assert_eq!(e.env["TERM"], "xterm-256color");
        assert_eq!(e.env["NIX_BUILD_CORES"], "3");
        assert_eq!(e.env["NIX_STORE"], "/s");
        assert_eq!(e.env["HOME"], "/homeless-shelter");
        assert_eq!(e.env["NIX_LOG_FD"], "2");
        assert!(!e.env.contains_key("SECRET"));
        assert!(!e.env.contains_key("NIX_OUTPUT_CHECKED"));
        assert_eq!(e.arg0, "sh");
        assert!(e.files.is_empty());
        let d = drv(&[("name", "x")]);
        assert_eq!(run(&d, &[]).env["PATH"], "/path-not-set");
    }

    #[test]
    fn pass_as_file() {
        let d = drv(&[("big", "line1\nline2"), ("passAsFile", "big")]);
        let e = run(&d, &[]);
        // the file name Nix's pass-as-file test expects for `foo`, and the observed one for `big`
        assert_eq!(
            pass_as_file_name("foo"),
            ".attr-1bp7cri8hplaz6hbz0v4f0nl44rl84q1sg25kgwqzipzd1mv89ic"
        );
        let f = ".attr-1lak0mvllw8rv9i9ygkglvhqsq19qi9ynl4bi7gbf69ab5nzw89a";
        assert_eq!(e.files, vec![(f.to_string(), b"line1\nline2".to_vec())]);
        assert_eq!(e.env["bigPath"], format!("/t/nix-build-x.drv-0/{f}"));
        assert!(!e.env.contains_key("big"));
        assert_eq!(e.env["passAsFile"], "big");
    }

    #[test]
    fn fixed_output_impure_vars() {
        let mut d = drv(&[("impureEnvVars", "MY_VAR  UNSET_VAR")]);
        d.outputs = [(
            "out".into(),
            DerivationOutput::CAFixed {
                ca: crate::content_address::ContentAddress::Fixed(
                    crate::content_address::FileIngestionMethod::Flat,
                    HashAlgo::Sha256.digest(b"hello"),
                ),
                path: sp("4cp24yy841mmxlkk4adr2sfgzd5m5ybs-x"),
            },
        )]
        .into();
        let e = run(&d, &[("MY_VAR", "v"), ("OTHER", "o")]);
        assert_eq!(e.env["MY_VAR"], "v");
        assert_eq!(e.env["UNSET_VAR"], "");
        assert_eq!(e.env["NIX_OUTPUT_CHECKED"], "1");
        assert!(!e.env.contains_key("OTHER"));
        // not for input-addressed derivations
        let d = drv(&[("impureEnvVars", "MY_VAR")]);
        assert!(!run(&d, &[("MY_VAR", "v")]).env.contains_key("MY_VAR"));
    }

    #[test]
    fn placeholders_are_rewritten() {
        let mut d = drv(&[]);
        d.outputs = [(
            "out".into(),
            DerivationOutput::CAFloating {
                method: crate::content_address::ContentAddressMethod::Fixed(
                    crate::content_address::FileIngestionMethod::Recursive,
                ),
                algo: HashAlgo::Sha256,
            },
        )]
        .into();
        let ph = hash_placeholder("out");
        d.env.insert("out".into(), ph.clone());
        d.env.insert("big".into(), format!("x {ph}"));
        d.env.insert("passAsFile".into(), "big".into());
        d.args.push(ph.clone());
        let e = run(&d, &[]);
        let scratch = "/s/00000000000000000000000000000000-scratch";
        assert_eq!(e.env["out"], scratch);
        assert_eq!(e.args[2], scratch);
        assert_eq!(e.files[0].1, format!("x {scratch}").into_bytes());
    }

    #[test]
    fn structured_attrs_files() {
        // The observed Nix 2.8 output for these attributes (see tests/data/nix/env.nix).
        let json = r#"{"aBool":false,"aList":[1,"two",true,null],"anAttrset":{"nested":{"x":1},"s":"q"},"bad-name":"x","builder":"/bin/sh","f":1.5,"flat":{"a":"x","b":2,"c":true},"i":7,"n":null,"name":"env-structured","outputs":["out"],"s":"it's","strList":["a","b c"],"system":"x86_64-linux","t":true}"#;
        let d = drv(&[
            ("__json", json),
            ("out", "/s/4cp24yy841mmxlkk4adr2sfgzd5m5ybs-x"),
        ]);
        let e = run(&d, &[]);
        assert!(!e.env.contains_key("out"));
        assert!(!e.env.contains_key("__json"));
        assert_eq!(e.env["PATH"], "/path-not-set");
        assert_eq!(e.env["NIX_ATTRS_SH_FILE"], "/t/nix-build-x.drv-0/.attrs.sh");
        assert_eq!(
            e.env["NIX_ATTRS_JSON_FILE"],
            "/t/nix-build-x.drv-0/.attrs.json"
        );
        let sh = String::from_utf8(e.files[0].1.clone()).unwrap();
        assert_eq!(
            sh,
            "declare aBool=\ndeclare -a aList=(1 'two' 1 '' )\ndeclare builder='/bin/sh'\n\
             declare -A flat=(['a']='x' ['b']=2 ['c']=1 )\ndeclare i=7\ndeclare n=''\n\
             declare name='env-structured'\n\
             declare -A outputs=(['out']='/s/4cp24yy841mmxlkk4adr2sfgzd5m5ybs-x' )\n\
             declare s='it'\\''s'\ndeclare -a strList=('a' 'b c' )\n\
             declare system='x86_64-linux'\ndeclare t=1\n"
        );
        let js = String::from_utf8(e.files[1].1.clone()).unwrap();
        assert!(js.contains(r#""outputs":{"out":"/s/4cp24yy841mmxlkk4adr2sfgzd5m5ybs-x"}"#));
        assert!(js.starts_with(r#"{"aBool":false,"aList":[1,"two",true,null],"anAttrset":{"nested":{"x":1},"s":"q"},"bad-name":"x""#));
    }
}
