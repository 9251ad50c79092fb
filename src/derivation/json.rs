//! The JSON form of derivations, as `nix show-derivation` of Nix 2.8 prints it.
//!
//! `nix show-derivation` prints one object `{"<drv path>": <derivation>, …}`; a
//! derivation is an object with, in this order:
//!
//! ```text
//! "outputs":   { "<name>": <output>, … }
//! "inputSrcs": [ "<store path>", … ]
//! "inputDrvs": { "<drv path>": [ "<output name>", … ], … }
//! "system", "builder": strings;  "args": [strings];  "env": { "<key>": "<value>", … }
//! ```
//!
//! and an output is, by kind: input-addressed `{"path"}`; fixed-output
//! `{"path","hashAlgo","hash"}` (`hashAlgo` like `r:sha256`, `hash` in base 16);
//! floating `{"hashAlgo"}`; deferred `{}`; impure `{"hashAlgo","impure":true}`.
//! Nix 2.8 prints no `name`; [`from_json`] accepts a top-level `name` (as later Nix
//! versions print) and otherwise uses `env.name`.
//!
//! [`from_json`] also accepts output `path`s that are absent or empty (deferred until
//! [`Derivation::with_output_paths`] computes them; a fixed output's path is
//! computed right away from the name). [`to_nix_json_string`] prints a value with the
//! layout of Nix's JSON writer (2-space indentation, `"key": value`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::aterm::output_from_fields;
use super::{Derivation, DerivationError, DerivationOutput};
use crate::hash::Encoding;
use crate::store_path::{StoreDir, StorePath, StorePathSet};

/// The inner value of one entry of `nix show-derivation`.
pub fn to_json_value(drv: &Derivation, store_dir: &StoreDir) -> Value {
    let mut outputs = Map::new();
    for (name, out) in &drv.outputs {
        let mut o = Map::new();
        if let Some(p) = out.path() {
            o.insert("path".into(), store_dir.print(p).into());
        }
        match out {
            DerivationOutput::CAFixed { ca, .. } => {
                o.insert("hashAlgo".into(), out.hash_algo_field().into());
                o.insert("hash".into(), ca.hash().encode(Encoding::Base16).into());
            }
            DerivationOutput::CAFloating { .. } => {
                o.insert("hashAlgo".into(), out.hash_algo_field().into());
            }
            DerivationOutput::Impure { .. } => {
                o.insert("hashAlgo".into(), out.hash_algo_field().into());
                o.insert("impure".into(), true.into());
            }
            DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred => {}
        }
        outputs.insert(name.clone(), o.into());
    }
    let input_drvs: Map<String, Value> = drv
        .input_drvs
        .iter()
        .map(|(p, outs)| {
            (
                store_dir.print(p),
                outs.iter().cloned().map(Value::from).collect(),
            )
        })
        .collect();
    let env: Map<String, Value> = drv
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let mut m = Map::new();
    m.insert("outputs".into(), outputs.into());
    m.insert(
        "inputSrcs".into(),
        drv.input_srcs
            .iter()
            .map(|p| Value::from(store_dir.print(p)))
            .collect(),
    );
    m.insert("inputDrvs".into(), input_drvs.into());
    m.insert("system".into(), drv.system.clone().into());
    m.insert("builder".into(), drv.builder.clone().into());
    m.insert(
        "args".into(),
        drv.args.iter().cloned().map(Value::from).collect(),
    );
    m.insert("env".into(), env.into());
    Value::Object(m)
}

/// `{"<drv path>": <derivation>}`, one entry of `nix show-derivation`'s output.
pub fn to_json(drv_path: &StorePath, drv: &Derivation, store_dir: &StoreDir) -> Value {
    let mut m = Map::new();
    m.insert(store_dir.print(drv_path), to_json_value(drv, store_dir));
    Value::Object(m)
}

fn jerr(field: impl Into<String>, reason: impl Into<String>) -> DerivationError {
    DerivationError::Json {
        field: field.into(),
        reason: reason.into(),
    }
}

fn as_str<'v>(v: &'v Value, field: &str) -> Result<&'v str, DerivationError> {
    v.as_str()
        .ok_or_else(|| jerr(field, format!("expected a string, found {v}")))
}

fn as_object<'v>(v: &'v Value, field: &str) -> Result<&'v Map<String, Value>, DerivationError> {
    v.as_object()
        .ok_or_else(|| jerr(field, format!("expected an object, found {v}")))
}

fn as_array<'v>(v: &'v Value, field: &str) -> Result<&'v Vec<Value>, DerivationError> {
    v.as_array()
        .ok_or_else(|| jerr(field, format!("expected an array, found {v}")))
}

fn path(store_dir: &StoreDir, s: &str, field: &str) -> Result<StorePath, DerivationError> {
    store_dir
        .parse(s)
        .map_err(|source| DerivationError::InvalidStorePath {
            at: format!("JSON field '{field}'"),
            path: s.to_owned(),
            source,
        })
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, DerivationError> {
    as_array(v, field)?
        .iter()
        .enumerate()
        .map(|(i, s)| as_str(s, &format!("{field}[{i}]")).map(str::to_owned))
        .collect()
}

fn string_set(
    v: &Value,
    field: &str,
    what: &'static str,
) -> Result<BTreeSet<String>, DerivationError> {
    let mut set = BTreeSet::new();
    for s in strings(v, field)? {
        if !set.insert(s.clone()) {
            return Err(DerivationError::DuplicateKey {
                at: format!("JSON field '{field}'"),
                what,
                key: s,
            });
        }
    }
    Ok(set)
}

/// The derivation name a JSON derivation states: a top-level `name`, else `env.name`.
pub fn name_from_json(value: &Value) -> Option<&str> {
    value
        .get("name")
        .and_then(Value::as_str)
        .or_else(|| value.get("env")?.get("name")?.as_str())
}

/// Parses the inner value of one `nix show-derivation` entry. The name is `name`
/// when given, else [`name_from_json`]; it is returned with the derivation.
/// Output paths may be absent or empty: input-addressed ones then come back as
/// [`DerivationOutput::Deferred`] and a fixed output's path is computed; call
/// [`Derivation::with_output_paths`] to compute and check them all.
pub fn from_json(
    value: &Value,
    store_dir: &StoreDir,
    name: Option<&str>,
) -> Result<(String, Derivation), DerivationError> {
    let obj = as_object(value, "<derivation>")?;
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "name" | "outputs" | "inputSrcs" | "inputDrvs" | "system" | "builder" | "args" | "env"
        ) {
            return Err(jerr(k.as_str(), "unknown field"));
        }
    }
    let field = |k: &str| obj.get(k).ok_or_else(|| jerr(k, "missing"));
    let name = match name {
        Some(n) => n.to_owned(),
        None => match obj.get("name") {
            Some(v) => as_str(v, "name")?.to_owned(),
            None => name_from_json(value)
                .ok_or(DerivationError::MissingName)?
                .to_owned(),
        },
    };

    let mut env = BTreeMap::new();
    for (k, v) in as_object(field("env")?, "env")? {
        env.insert(k.clone(), as_str(v, &format!("env.{k}"))?.to_owned());
    }

    let mut outputs = BTreeMap::new();
    for (o, v) in as_object(field("outputs")?, "outputs")? {
        let f = format!("outputs.{o}");
        let ov = as_object(v, &f)?;
        let get = |k: &str| -> Result<Option<&Value>, DerivationError> { Ok(ov.get(k)) };
        for k in ov.keys() {
            if !matches!(k.as_str(), "path" | "hashAlgo" | "hash" | "impure") {
                return Err(jerr(format!("{f}.{k}"), "unknown field"));
            }
        }
        let p = match get("path")? {
            None => None,
            Some(v) => {
                let s = as_str(v, &format!("{f}.path"))?;
                if s.is_empty() {
                    None
                } else {
                    Some(path(store_dir, s, &format!("{f}.path"))?)
                }
            }
        };
        let hash_algo = match get("hashAlgo")? {
            None => "",
            Some(v) => as_str(v, &format!("{f}.hashAlgo"))?,
        };
        let impure = match get("impure")? {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                jerr(
                    format!("{f}.impure"),
                    format!("expected a boolean, found {v}"),
                )
            })?,
        };
        let hash = match get("hash")? {
            None => "",
            Some(v) => {
                let s = as_str(v, &format!("{f}.hash"))?;
                if impure && !s.is_empty() {
                    return Err(jerr(format!("{f}.hash"), "an impure output has no hash"));
                }
                s
            }
        };
        if impure && hash_algo.is_empty() {
            return Err(jerr(
                format!("{f}.hashAlgo"),
                "an impure output needs a hash algorithm",
            ));
        }
        let at = format!("JSON field '{f}'");
        let hash = if impure { "impure" } else { hash };
        let out = output_from_fields(&at, o, p, hash_algo, hash, |ca| {
            super::fixed_output_path(store_dir, &name, o, ca)
        })?;
        outputs.insert(o.clone(), out);
    }

    let mut input_srcs = StorePathSet::new();
    for (i, s) in strings(field("inputSrcs")?, "inputSrcs")?
        .iter()
        .enumerate()
    {
        let f = format!("inputSrcs[{i}]");
        if !input_srcs.insert(path(store_dir, s, &f)?) {
            return Err(DerivationError::DuplicateKey {
                at: format!("JSON field '{f}'"),
                what: "input sources",
                key: s.clone(),
            });
        }
    }
    let mut input_drvs = BTreeMap::new();
    for (k, v) in as_object(field("inputDrvs")?, "inputDrvs")? {
        let f = format!("inputDrvs.{k}");
        input_drvs.insert(
            path(store_dir, k, &f)?,
            string_set(v, &f, "output names of an input derivation")?,
        );
    }
    let drv = Derivation {
        outputs,
        input_drvs,
        input_srcs,
        system: as_str(field("system")?, "system")?.to_owned(),
        builder: as_str(field("builder")?, "builder")?.to_owned(),
        args: strings(field("args")?, "args")?,
        env,
    };
    Ok((name, drv))
}

/// All of `drover derivation add`: parses one derivation's JSON ([`from_json`], name
/// from a top-level `name`, else `env.name`), computes and checks its output paths
/// ([`Derivation::with_output_paths`]) and computes its `.drv` path. Write
/// `drv.to_aterm_bytes(store_dir)` there with references `drv.drv_references()`.
pub fn from_json_with_paths<F, E>(
    value: &Value,
    store_dir: &StoreDir,
    input_hash: F,
) -> Result<(StorePath, Derivation), E>
where
    F: FnMut(&StorePath) -> Result<super::DrvHash, E>,
    E: From<DerivationError>,
{
    let (name, drv) = from_json(value, store_dir, None)?;
    let drv = drv.with_output_paths(store_dir, &name, input_hash)?;
    let drv_path = drv.drv_path(store_dir, &name)?;
    Ok((drv_path, drv))
}

/// Parses the whole output of `nix show-derivation`: `.drv` path → derivation, each
/// named after its path.
pub fn from_json_map(
    value: &Value,
    store_dir: &StoreDir,
) -> Result<BTreeMap<StorePath, Derivation>, DerivationError> {
    let mut res = BTreeMap::new();
    for (k, v) in as_object(value, "<root>")? {
        let p = path(store_dir, k, k)?;
        let name = super::name_from_drv_path(&p)?.to_owned();
        let (_, drv) = from_json(v, store_dir, Some(&name))?;
        res.insert(p, drv);
    }
    Ok(res)
}

/// Prints a JSON value the way Nix 2.8's JSON writer does with indentation (as in
/// `nix show-derivation`): two spaces per level, `"key": value`, empty containers as
/// `{}`/`[]`, control characters other than `\n\r\t` as `\u00XX`, non-ASCII as is.
/// No trailing newline.
pub fn to_nix_json_string(value: &Value) -> String {
    let mut s = String::new();
    write_value(&mut s, value, 0);
    s
}

fn indent(s: &mut String, depth: usize) {
    s.push('\n');
    s.push_str(&"  ".repeat(depth));
}

fn write_value(s: &mut String, v: &Value, depth: usize) {
    match v {
        Value::Object(m) => {
            s.push('{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                indent(s, depth + 1);
                write_string(s, k);
                s.push_str(": ");
                write_value(s, v, depth + 1);
            }
            if !m.is_empty() {
                indent(s, depth);
            }
            s.push('}');
        }
        Value::Array(a) => {
            s.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                indent(s, depth + 1);
                write_value(s, v, depth + 1);
            }
            if !a.is_empty() {
                indent(s, depth);
            }
            s.push(']');
        }
        Value::String(x) => write_string(s, x),
        other => s.push_str(&other.to_string()),
    }
}

fn write_string(s: &mut String, x: &str) {
    s.push('"');
    for c in x.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 32 => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push('"');
}
