//! The operations of the worker protocol (`WorkerOp`) and the typed [`Request`]
//! each is decoded into, in the forms a client of the negotiated version sends.
//!
//! A request is everything the client sends before the server starts work. The
//! framed payloads that follow `AddToStore`, `AddToStoreNar`,
//! `AddMultipleToStore` and `AddBuildLog` are not part of it: the server reads
//! them from the connection with [`super::framed::FramedReader`] while it works.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use super::wire::{
    read_bool, read_bytes, read_count, read_string, read_strings, read_u64, write_bytes,
    write_strings, write_u64,
};
use super::ProtocolError;
use crate::content_address::{ContentAddress, ContentAddressMethod, FileIngestionMethod};
use crate::derivation::{aterm::output_from_fields, Derivation, DerivationError};
use crate::derived_path::DerivedPath;
use crate::hash::{Hash, HashAlgo};
use crate::realisation::{DrvOutput, Realisation};
use crate::store::ValidPathInfo;
use crate::store_path::{StoreDir, StorePath, StorePathSet};

macro_rules! ops {
    ($($name:ident = $code:expr),* $(,)?) => {
        /// A worker operation code (`WorkerOp`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Op { $($name = $code),* }

        impl Op {
            /// The operation with this code, if Nix 2.8 has one.
            pub fn from_code(code: u64) -> Option<Op> {
                match code { $($code => Some(Op::$name),)* _ => None }
            }

            /// Nix's name without the `wop` prefix.
            pub fn name(self) -> &'static str {
                match self { $(Op::$name => stringify!($name)),* }
            }
        }
    };
}

ops! {
    IsValidPath = 1,
    HasSubstitutes = 3,
    QueryPathHash = 4,
    QueryReferences = 5,
    QueryReferrers = 6,
    AddToStore = 7,
    AddTextToStore = 8,
    BuildPaths = 9,
    EnsurePath = 10,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    SyncWithGC = 13,
    FindRoots = 14,
    ExportPath = 16,
    QueryDeriver = 18,
    SetOptions = 19,
    CollectGarbage = 20,
    QuerySubstitutablePathInfo = 21,
    QueryDerivationOutputs = 22,
    QueryAllValidPaths = 23,
    QueryFailedPaths = 24,
    ClearFailedPaths = 25,
    QueryPathInfo = 26,
    ImportPaths = 27,
    QueryDerivationOutputNames = 28,
    QueryPathFromHashPart = 29,
    QuerySubstitutablePathInfos = 30,
    QueryValidPaths = 31,
    QuerySubstitutablePaths = 32,
    QueryValidDerivers = 33,
    OptimiseStore = 34,
    VerifyStore = 35,
    BuildDerivation = 36,
    AddSignatures = 37,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    AddBuildLog = 45,
    BuildPathsWithResults = 46,
}

/// Nix's `BuildMode` on the wire: 0 normal, 1 repair, 2 check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireBuildMode {
    Normal = 0,
    Repair = 1,
    Check = 2,
}

impl WireBuildMode {
    pub fn from_code(c: u64) -> Result<WireBuildMode, ProtocolError> {
        match c {
            0 => Ok(WireBuildMode::Normal),
            1 => Ok(WireBuildMode::Repair),
            2 => Ok(WireBuildMode::Check),
            _ => Err(ProtocolError::BadBuildMode(c)),
        }
    }
}

/// The settings a client sends with `SetOptions` (Nix's `ClientSettings`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientOptions {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    /// Nix's `Verbosity` (0 error … 7 vomit).
    pub verbosity: u64,
    pub max_build_jobs: u64,
    pub max_silent_time: u64,
    /// The client's `verboseBuild` (its build-output level was `lvlError`).
    pub verbose_build: bool,
    pub build_cores: u64,
    pub use_substitutes: bool,
    /// `overrides`: the settings the client changed, by name.
    pub overrides: BTreeMap<String, String>,
}

/// How `AddToStore` (1.25+) asks for the content to be addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaMethodAlgo {
    pub method: ContentAddressMethod,
    pub algo: HashAlgo,
}

/// Parses `text:sha256`, `fixed:r:sha256` or `fixed:sha1` (Nix's
/// `parseContentAddressMethod`).
pub fn parse_ca_method(s: &str) -> Result<CaMethodAlgo, ProtocolError> {
    let bad = || ProtocolError::BadCaMethod(s.to_owned());
    let (method, algo) = if let Some(a) = s.strip_prefix("text:") {
        (ContentAddressMethod::Text, a)
    } else if let Some(rest) = s.strip_prefix("fixed:") {
        match rest.strip_prefix("r:") {
            Some(a) => (
                ContentAddressMethod::Fixed(FileIngestionMethod::Recursive),
                a,
            ),
            None => (ContentAddressMethod::Fixed(FileIngestionMethod::Flat), rest),
        }
    } else {
        return Err(bad());
    };
    let algo: HashAlgo = algo.parse().map_err(|_| bad())?;
    Ok(CaMethodAlgo { method, algo })
}

/// One request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    IsValidPath(StorePath),
    QueryValidPaths {
        paths: StorePathSet,
        substitute: bool,
    },
    HasSubstitutes(StorePath),
    QuerySubstitutablePaths(StorePathSet),
    QueryPathHash(StorePath),
    QueryReferences(StorePath),
    QueryReferrers(StorePath),
    QueryValidDerivers(StorePath),
    QueryDerivationOutputs(StorePath),
    QueryDerivationOutputNames(StorePath),
    QueryDerivationOutputMap(StorePath),
    QueryDeriver(StorePath),
    QueryPathFromHashPart(String),
    /// Followed by the framed contents (a NAR, or the flat file / text).
    AddToStore {
        name: String,
        method: CaMethodAlgo,
        references: StorePathSet,
        repair: bool,
    },
    AddTextToStore {
        name: String,
        text: Vec<u8>,
        references: StorePathSet,
    },
    /// Followed by framed `count, (path info, NAR)*`.
    AddMultipleToStore {
        repair: bool,
        dont_check_sigs: bool,
    },
    BuildPaths {
        paths: Vec<DerivedPath>,
        mode: WireBuildMode,
    },
    BuildPathsWithResults {
        paths: Vec<DerivedPath>,
        mode: WireBuildMode,
    },
    BuildDerivation {
        drv_path: StorePath,
        drv: Box<Derivation>,
        mode: WireBuildMode,
    },
    EnsurePath(StorePath),
    AddTempRoot(StorePath),
    AddIndirectRoot(String),
    SyncWithGC,
    FindRoots,
    CollectGarbage {
        action: u64,
        paths: StorePathSet,
        ignore_liveness: bool,
        max_freed: u64,
    },
    SetOptions(ClientOptions),
    QuerySubstitutablePathInfo(StorePath),
    QuerySubstitutablePathInfos(BTreeMap<StorePath, Option<ContentAddress>>),
    QueryAllValidPaths,
    QueryPathInfo(StorePath),
    OptimiseStore,
    VerifyStore {
        check_contents: bool,
        repair: bool,
    },
    AddSignatures {
        path: StorePath,
        sigs: BTreeSet<String>,
    },
    NarFromPath(StorePath),
    /// Followed by the framed NAR.
    AddToStoreNar {
        info: Box<ValidPathInfo>,
        repair: bool,
        dont_check_sigs: bool,
    },
    QueryMissing(Vec<DerivedPath>),
    RegisterDrvOutput(Realisation),
    QueryRealisation(DrvOutput),
    /// Followed by the framed log.
    AddBuildLog(StorePath),
}

/// Reads a store path printed with the store dir.
pub fn read_store_path(r: &mut impl Read, sd: &StoreDir) -> Result<StorePath, ProtocolError> {
    Ok(sd.parse(&read_string(r)?)?)
}

/// Reads a store path or the empty string (`std::optional<StorePath>`).
pub fn read_opt_store_path(
    r: &mut impl Read,
    sd: &StoreDir,
) -> Result<Option<StorePath>, ProtocolError> {
    let s = read_string(r)?;
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(sd.parse(&s)?))
    }
}

/// Reads a set of store paths.
pub fn read_store_paths(r: &mut impl Read, sd: &StoreDir) -> Result<StorePathSet, ProtocolError> {
    let n = read_count(r)?;
    let mut s = StorePathSet::new();
    for _ in 0..n {
        s.insert(read_store_path(r, sd)?);
    }
    Ok(s)
}

/// Parses a derived path as Nix 2.8 prints it on the wire: `path` or `drv!outs`.
pub fn parse_wire_derived_path(sd: &StoreDir, s: &str) -> Result<DerivedPath, ProtocolError> {
    // Nix 2.8 splits at the first '!'; drover's parser also takes '^'.
    Ok(DerivedPath::parse(sd, s)?)
}

/// Prints a derived path as Nix 2.8 does on the wire: `drv!out,dev`, `drv!*`.
pub fn print_wire_derived_path(sd: &StoreDir, p: &DerivedPath) -> String {
    match p {
        DerivedPath::Opaque(p) => sd.print(p),
        DerivedPath::Built { drv_path, outputs } => format!("{}!{}", sd.print(drv_path), outputs),
    }
}

fn read_derived_paths(
    r: &mut impl Read,
    sd: &StoreDir,
    minor: u64,
) -> Result<Vec<DerivedPath>, ProtocolError> {
    let n = read_count(r)?;
    let mut v = Vec::new();
    for _ in 0..n {
        // From 1.30 a `DerivedPath`, before it a path with outputs: both are
        // `path` or `drv!out1,out2` on the wire.
        let _ = minor;
        v.push(parse_wire_derived_path(sd, &read_string(r)?)?);
    }
    Ok(v)
}

/// Reads a path info in the `ValidPathInfo::read` form of protocol 1.16+ after
/// its path: deriver, NAR hash, references, registration time, NAR size,
/// ultimate, signatures, ca.
pub fn read_path_info_after_path(
    r: &mut impl Read,
    sd: &StoreDir,
    path: StorePath,
) -> Result<ValidPathInfo, ProtocolError> {
    let deriver = read_opt_store_path(r, sd)?;
    let nar_hash = Hash::parse(&read_string(r)?, Some(HashAlgo::Sha256))?;
    let references = read_store_paths(r, sd)?;
    let registration_time = read_u64(r)? as i64;
    let nar_size = read_u64(r)?;
    let ultimate = read_bool(r)?;
    let sigs = read_strings(r)?.into_iter().collect();
    let ca = read_string(r)?;
    let ca = if ca.is_empty() {
        None
    } else {
        Some(ca.parse::<ContentAddress>()?)
    };
    Ok(ValidPathInfo {
        path,
        deriver,
        nar_hash,
        nar_size,
        references,
        registration_time,
        ultimate,
        sigs,
        ca,
    })
}

/// Reads a `BasicDerivation` (`readDerivation`): outputs, input sources,
/// platform, builder, arguments, environment. It has no input derivations.
pub fn read_basic_derivation(
    r: &mut impl Read,
    sd: &StoreDir,
    drv_path: &StorePath,
) -> Result<Derivation, ProtocolError> {
    let at = sd.print(drv_path);
    let n = read_count(r)?;
    let mut outputs = BTreeMap::new();
    for _ in 0..n {
        let name = read_string(r)?;
        let path = read_opt_store_path(r, sd)?;
        let hash_algo = read_string(r)?;
        let hash = read_string(r)?;
        let out = output_from_fields(&at, &name, path, &hash_algo, &hash, |_| {
            Err(DerivationError::InvalidOutput {
                at: at.clone(),
                output: name.clone(),
                reason: "fixed output without a path".into(),
            })
        })?;
        outputs.insert(name, out);
    }
    let input_srcs = read_store_paths(r, sd)?;
    let system = read_string(r)?;
    let builder = read_string(r)?;
    let args = read_strings(r)?;
    let n = read_count(r)?;
    let mut env = BTreeMap::new();
    for _ in 0..n {
        let k = read_string(r)?;
        let v = read_string(r)?;
        env.insert(k, v);
    }
    Ok(Derivation {
        outputs,
        input_drvs: BTreeMap::new(),
        input_srcs,
        system,
        builder,
        args,
        env,
    })
}

/// Writes a `BasicDerivation` (`writeDerivation`), for clients and tests.
pub fn write_basic_derivation(
    w: &mut impl Write,
    sd: &StoreDir,
    drv: &Derivation,
) -> std::io::Result<()> {
    use crate::derivation::DerivationOutput as O;
    use crate::hash::Encoding;
    write_u64(w, drv.outputs.len() as u64)?;
    for (name, out) in &drv.outputs {
        write_bytes(w, name.as_bytes())?;
        let (path, algo, hash) = match out {
            O::InputAddressed { path } => (sd.print(path), String::new(), String::new()),
            O::CAFixed { ca, path } => (
                sd.print(path),
                out.hash_algo_field(),
                ca.hash().encode(Encoding::Base16),
            ),
            O::CAFloating { .. } => (String::new(), out.hash_algo_field(), String::new()),
            O::Deferred => (String::new(), String::new(), String::new()),
            O::Impure { .. } => (String::new(), out.hash_algo_field(), "impure".into()),
        };
        write_bytes(w, path.as_bytes())?;
        write_bytes(w, algo.as_bytes())?;
        write_bytes(w, hash.as_bytes())?;
    }
    write_strings(w, drv.input_srcs.iter().map(|p| sd.print(p)))?;
    write_bytes(w, drv.system.as_bytes())?;
    write_bytes(w, drv.builder.as_bytes())?;
    write_strings(w, drv.args.iter())?;
    write_u64(w, drv.env.len() as u64)?;
    for (k, v) in &drv.env {
        write_bytes(w, k.as_bytes())?;
        write_bytes(w, v.as_bytes())?;
    }
    Ok(())
}

impl Request {
    /// Reads the operation code and the request's arguments as a client of
    /// protocol 1.`minor` sends them.
    pub fn read(r: &mut impl Read, sd: &StoreDir, minor: u64) -> Result<Request, ProtocolError> {
        let code = read_u64(r)?;
        Self::read_op(r, sd, minor, code)
    }

    /// Reads the arguments of the operation `code` (already read).
    pub fn read_op(
        r: &mut impl Read,
        sd: &StoreDir,
        minor: u64,
        code: u64,
    ) -> Result<Request, ProtocolError> {
        let op = Op::from_code(code).ok_or(ProtocolError::InvalidOperation(code))?;
        let old = |needs: u64| {
            if minor < needs {
                Err(ProtocolError::OldForm {
                    op: op.name(),
                    minor,
                    needs,
                })
            } else {
                Ok(())
            }
        };
        let path = |r: &mut _| read_store_path(r, sd);
        Ok(match op {
            Op::IsValidPath => Request::IsValidPath(path(r)?),
            Op::QueryValidPaths => {
                let paths = read_store_paths(r, sd)?;
                let substitute = if minor >= 27 { read_bool(r)? } else { false };
                Request::QueryValidPaths { paths, substitute }
            }
            Op::HasSubstitutes => Request::HasSubstitutes(path(r)?),
            Op::QuerySubstitutablePaths => {
                Request::QuerySubstitutablePaths(read_store_paths(r, sd)?)
            }
            Op::QueryPathHash => Request::QueryPathHash(path(r)?),
            Op::QueryReferences => Request::QueryReferences(path(r)?),
            Op::QueryReferrers => Request::QueryReferrers(path(r)?),
            Op::QueryValidDerivers => Request::QueryValidDerivers(path(r)?),
            Op::QueryDerivationOutputs => Request::QueryDerivationOutputs(path(r)?),
            Op::QueryDerivationOutputNames => Request::QueryDerivationOutputNames(path(r)?),
            Op::QueryDerivationOutputMap => Request::QueryDerivationOutputMap(path(r)?),
            Op::QueryDeriver => Request::QueryDeriver(path(r)?),
            Op::QueryPathFromHashPart => Request::QueryPathFromHashPart(read_string(r)?),
            Op::AddToStore => {
                old(25)?;
                let name = read_string(r)?;
                let method = parse_ca_method(&read_string(r)?)?;
                let references = read_store_paths(r, sd)?;
                let repair = read_bool(r)?;
                Request::AddToStore {
                    name,
                    method,
                    references,
                    repair,
                }
            }
            Op::AddTextToStore => Request::AddTextToStore {
                name: read_string(r)?,
                text: read_bytes(r)?,
                references: read_store_paths(r, sd)?,
            },
            Op::AddMultipleToStore => Request::AddMultipleToStore {
                repair: read_bool(r)?,
                dont_check_sigs: read_bool(r)?,
            },
            Op::BuildPaths => {
                let paths = read_derived_paths(r, sd, minor)?;
                let mode = if minor >= 15 {
                    WireBuildMode::from_code(read_u64(r)?)?
                } else {
                    WireBuildMode::Normal
                };
                Request::BuildPaths { paths, mode }
            }
            Op::BuildPathsWithResults => {
                let paths = read_derived_paths(r, sd, minor)?;
                let mode = WireBuildMode::from_code(read_u64(r)?)?;
                Request::BuildPathsWithResults { paths, mode }
            }
            Op::BuildDerivation => {
                let drv_path = path(r)?;
                let drv = read_basic_derivation(r, sd, &drv_path)?;
                let mode = WireBuildMode::from_code(read_u64(r)?)?;
                Request::BuildDerivation {
                    drv_path,
                    drv: Box::new(drv),
                    mode,
                }
            }
            Op::EnsurePath => Request::EnsurePath(path(r)?),
            Op::AddTempRoot => Request::AddTempRoot(path(r)?),
            Op::AddIndirectRoot => Request::AddIndirectRoot(read_string(r)?),
            Op::SyncWithGC => Request::SyncWithGC,
            Op::FindRoots => Request::FindRoots,
            Op::CollectGarbage => {
                let action = read_u64(r)?;
                let paths = read_store_paths(r, sd)?;
                let ignore_liveness = read_bool(r)?;
                let max_freed = read_u64(r)?;
                for _ in 0..3 {
                    read_u64(r)?; // obsolete fields
                }
                Request::CollectGarbage {
                    action,
                    paths,
                    ignore_liveness,
                    max_freed,
                }
            }
            Op::SetOptions => {
                let mut o = ClientOptions {
                    keep_failed: read_bool(r)?,
                    keep_going: read_bool(r)?,
                    try_fallback: read_bool(r)?,
                    verbosity: read_u64(r)?,
                    max_build_jobs: read_u64(r)?,
                    max_silent_time: read_u64(r)?,
                    ..Default::default()
                };
                read_u64(r)?; // obsolete useBuildHook
                o.verbose_build = read_u64(r)? == 0; // lvlError
                read_u64(r)?; // obsolete logType
                read_u64(r)?; // obsolete printBuildTrace
                o.build_cores = read_u64(r)?;
                o.use_substitutes = read_bool(r)?;
                if minor >= 12 {
                    let n = read_count(r)?;
                    for _ in 0..n {
                        let k = read_string(r)?;
                        let v = read_string(r)?;
                        o.overrides.insert(k, v);
                    }
                }
                Request::SetOptions(o)
            }
            Op::QuerySubstitutablePathInfo => Request::QuerySubstitutablePathInfo(path(r)?),
            Op::QuerySubstitutablePathInfos => {
                let mut m = BTreeMap::new();
                if minor < 22 {
                    for p in read_store_paths(r, sd)? {
                        m.insert(p, None);
                    }
                } else {
                    let n = read_count(r)?;
                    for _ in 0..n {
                        let p = path(r)?;
                        let ca = read_string(r)?;
                        let ca = if ca.is_empty() {
                            None
                        } else {
                            Some(ca.parse::<ContentAddress>()?)
                        };
                        m.insert(p, ca);
                    }
                }
                Request::QuerySubstitutablePathInfos(m)
            }
            Op::QueryAllValidPaths => Request::QueryAllValidPaths,
            Op::QueryPathInfo => {
                old(17)?;
                Request::QueryPathInfo(path(r)?)
            }
            Op::OptimiseStore => Request::OptimiseStore,
            Op::VerifyStore => Request::VerifyStore {
                check_contents: read_bool(r)?,
                repair: read_bool(r)?,
            },
            Op::AddSignatures => Request::AddSignatures {
                path: path(r)?,
                sigs: read_strings(r)?.into_iter().collect(),
            },
            Op::NarFromPath => Request::NarFromPath(path(r)?),
            Op::AddToStoreNar => {
                let p = path(r)?;
                let info = read_path_info_after_path(r, sd, p)?;
                let repair = read_bool(r)?;
                let dont_check_sigs = read_bool(r)?;
                old(23)?;
                Request::AddToStoreNar {
                    info: Box::new(info),
                    repair,
                    dont_check_sigs,
                }
            }
            Op::QueryMissing => Request::QueryMissing(read_derived_paths(r, sd, minor)?),
            Op::RegisterDrvOutput => {
                old(31)?;
                Request::RegisterDrvOutput(Realisation::from_json(&read_bytes(r)?)?)
            }
            Op::QueryRealisation => Request::QueryRealisation(read_string(r)?.parse()?),
            Op::AddBuildLog => Request::AddBuildLog(StorePath::from_base_name(
                // Nix reads a bare `StorePath{readString}`: the base name.
                &read_string(r)?,
            )?),
            Op::ExportPath | Op::ImportPaths => {
                return Err(ProtocolError::Obsolete {
                    name: op.name(),
                    code,
                })
            }
            Op::QueryFailedPaths | Op::ClearFailedPaths => {
                // Nix 2.8 has the codes but no longer serves them.
                return Err(ProtocolError::InvalidOperation(code));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker_protocol::wire::write_bool;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    const P: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12";

    fn s(w: &mut Vec<u8>, x: &str) {
        write_bytes(w, x.as_bytes()).unwrap();
    }
    fn n(w: &mut Vec<u8>, x: u64) {
        write_u64(w, x).unwrap();
    }

    #[test]
    fn query_path_info() {
        let mut v = Vec::new();
        n(&mut v, 26);
        s(&mut v, P);
        let r = Request::read(&mut &v[..], &sd(), 34).unwrap();
        assert_eq!(r, Request::QueryPathInfo(sd().parse(P).unwrap()));
    }

    #[test]
    fn set_options_as_nix_2_8_sends_it() {
        let mut v = Vec::new();
        n(&mut v, 19);
        for x in [0, 1, 0, 3, 4, 0, 0, 0, 0, 0, 2, 1] {
            n(&mut v, x);
        }
        n(&mut v, 2);
        s(&mut v, "sandbox");
        s(&mut v, "false");
        s(&mut v, "timeout");
        s(&mut v, "10");
        let mut rd = &v[..];
        let r = Request::read(&mut rd, &sd(), 34).unwrap();
        assert!(rd.is_empty());
        let Request::SetOptions(o) = r else { panic!() };
        assert!(o.keep_going && !o.keep_failed && o.use_substitutes && o.verbose_build);
        assert_eq!((o.verbosity, o.max_build_jobs, o.build_cores), (3, 4, 2));
        assert_eq!(o.overrides["timeout"], "10");
    }

    #[test]
    fn add_to_store_nar_header() {
        let mut v = Vec::new();
        n(&mut v, 39);
        s(&mut v, P);
        s(&mut v, "");
        s(
            &mut v,
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        );
        n(&mut v, 1);
        s(&mut v, P);
        n(&mut v, 1700000000);
        n(&mut v, 120);
        write_bool(&mut v, true).unwrap();
        n(&mut v, 0);
        s(&mut v, "");
        n(&mut v, 0);
        n(&mut v, 1);
        let Request::AddToStoreNar {
            info,
            repair,
            dont_check_sigs,
        } = Request::read(&mut &v[..], &sd(), 34).unwrap()
        else {
            panic!()
        };
        assert!(!repair && dont_check_sigs && info.ultimate);
        assert_eq!(info.nar_size, 120);
        assert!(info.references.contains(&sd().parse(P).unwrap()));
    }

    #[test]
    fn basic_derivation_round_trip() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/drv");
        let mut seen = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().and_then(|x| x.to_str()) != Some("drv") {
                continue;
            }
            let text = std::fs::read(&path).unwrap();
            let gd = StoreDir::new("/tmp/drover-golden/store").unwrap();
            let drv = Derivation::from_aterm_bytes(&text, &gd).unwrap();
            let mut basic = drv.clone();
            basic.input_drvs.clear();
            let mut v = Vec::new();
            write_basic_derivation(&mut v, &gd, &basic).unwrap();
            let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv").unwrap();
            let back = read_basic_derivation(&mut &v[..], &gd, &p).unwrap();
            assert_eq!(back, basic, "{}", path.display());
            seen += 1;
        }
        assert!(seen > 5);
    }

    #[test]
    fn unknown_and_retired_ops_are_nix_errors() {
        for code in [0, 2, 24, 25, 99, u64::MAX] {
            let v = code.to_le_bytes();
            let e = Request::read(&mut &v[..], &sd(), 34).unwrap_err();
            assert_eq!(e.to_string(), format!("invalid operation {code}"));
        }
        let v = 16u64.to_le_bytes();
        assert!(matches!(
            Request::read(&mut &v[..], &sd(), 34),
            Err(ProtocolError::Obsolete { .. })
        ));
    }

    #[test]
    fn ca_methods() {
        let t = parse_ca_method("text:sha256").unwrap();
        assert_eq!(t.method, ContentAddressMethod::Text);
        let r = parse_ca_method("fixed:r:sha256").unwrap();
        assert_eq!(
            r.method,
            ContentAddressMethod::Fixed(FileIngestionMethod::Recursive)
        );
        let f = parse_ca_method("fixed:sha1").unwrap();
        assert_eq!(f.algo, HashAlgo::Sha1);
        assert!(parse_ca_method("r:sha256").is_err());
        assert!(parse_ca_method("fixed:md7").is_err());
    }

    #[test]
    fn derived_paths_print_with_bang() {
        let d = DerivedPath::Built {
            drv_path: sd()
                .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a.drv")
                .unwrap(),
            outputs: crate::derived_path::OutputsSpec::All,
        };
        let printed = print_wire_derived_path(&sd(), &d);
        assert_eq!(
            printed,
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a.drv!*"
        );
        assert_eq!(parse_wire_derived_path(&sd(), &printed).unwrap(), d);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = Request::read(&mut &bytes[..], &sd(), 34);
        }

        #[test]
        fn arbitrary_args_of_every_op_never_panic(
            op in 0u64..50,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let _ = Request::read_op(&mut &bytes[..], &sd(), 34, op);
        }
    }
}
