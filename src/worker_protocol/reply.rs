//! What the server sends: the values of replies (store paths, path infos,
//! build results, realisations) and the logger messages (`STDERR_*`) that come
//! before each reply, byte for byte as Nix 2.8's daemon writes them.

use std::io::{self, Write};

use super::request::print_wire_derived_path;
use super::stderr;
use super::wire::{write_bool, write_bytes, write_strings, write_u64};
use crate::build_result::{BuildResult, BuiltOutputs};
use crate::derived_path::DerivedPath;
use crate::hash::Encoding;
use crate::store::ValidPathInfo;
use crate::store_path::{StoreDir, StorePath, StorePathSet};

/// Nix's `Verbosity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Error = 0,
    Warn = 1,
    Notice = 2,
    Info = 3,
    Talkative = 4,
    Chatty = 5,
    Debug = 6,
    Vomit = 7,
}

impl Verbosity {
    /// The level of a wire value; above 7 is `Vomit`.
    pub fn from_code(c: u64) -> Verbosity {
        match c {
            0 => Verbosity::Error,
            1 => Verbosity::Warn,
            2 => Verbosity::Notice,
            3 => Verbosity::Info,
            4 => Verbosity::Talkative,
            5 => Verbosity::Chatty,
            6 => Verbosity::Debug,
            _ => Verbosity::Vomit,
        }
    }
}

/// Nix's `ActivityType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivityType {
    Unknown = 0,
    CopyPath = 100,
    FileTransfer = 101,
    Realise = 102,
    CopyPaths = 103,
    Builds = 104,
    Build = 105,
    OptimiseStore = 106,
    VerifyPaths = 107,
    Substitute = 108,
    QueryPathInfo = 109,
    PostBuildHook = 110,
    BuildWaiting = 111,
}

impl ActivityType {
    /// The type of a wire (or `@nix` JSON) code; `None` for a code Nix 2.8
    /// does not define.
    pub fn from_code(c: u64) -> Option<ActivityType> {
        use ActivityType::*;
        Some(match c {
            0 => Unknown,
            100 => CopyPath,
            101 => FileTransfer,
            102 => Realise,
            103 => CopyPaths,
            104 => Builds,
            105 => Build,
            106 => OptimiseStore,
            107 => VerifyPaths,
            108 => Substitute,
            109 => QueryPathInfo,
            110 => PostBuildHook,
            111 => BuildWaiting,
            _ => return None,
        })
    }
}

/// Nix's `ResultType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultType {
    FileLinked = 100,
    BuildLogLine = 101,
    UntrustedPath = 102,
    CorruptedPath = 103,
    SetPhase = 104,
    Progress = 105,
    SetExpected = 106,
    PostBuildLogLine = 107,
}

impl ResultType {
    /// The type of a wire (or `@nix` JSON) code; `None` for a code Nix 2.8
    /// does not define.
    pub fn from_code(c: u64) -> Option<ResultType> {
        use ResultType::*;
        Some(match c {
            100 => FileLinked,
            101 => BuildLogLine,
            102 => UntrustedPath,
            103 => CorruptedPath,
            104 => SetPhase,
            105 => Progress,
            106 => SetExpected,
            107 => PostBuildLogLine,
            _ => return None,
        })
    }
}

/// A field of an activity or result: an integer (type 0) or a string (type 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(String),
}

/// One message of the logger protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggerMessage {
    /// A line of text (Nix adds the newline).
    Next(String),
    StartActivity {
        id: u64,
        level: Verbosity,
        kind: ActivityType,
        text: String,
        fields: Vec<Field>,
        parent: u64,
    },
    StopActivity(u64),
    Result {
        id: u64,
        kind: ResultType,
        fields: Vec<Field>,
    },
    /// The operation failed: the message of the error (Nix's `Error` at
    /// `lvlError` with no position and no traces) and, before 1.26, its exit
    /// status.
    Error {
        message: String,
        status: u64,
    },
    /// The operation's work is done; its reply follows.
    Last,
}

fn write_fields(w: &mut impl Write, fields: &[Field]) -> io::Result<()> {
    write_u64(w, fields.len() as u64)?;
    for f in fields {
        match f {
            Field::Int(i) => {
                write_u64(w, 0)?;
                write_u64(w, *i)?;
            }
            Field::String(s) => {
                write_u64(w, 1)?;
                write_bytes(w, s.as_bytes())?;
            }
        }
    }
    Ok(())
}

impl LoggerMessage {
    /// Writes the message as a client of protocol 1.`minor` reads it (before
    /// 1.20 activities are lines or nothing, as in Nix's `TunnelLogger`).
    pub fn write(&self, w: &mut impl Write, minor: u64) -> io::Result<()> {
        match self {
            LoggerMessage::Next(s) => {
                write_u64(w, stderr::NEXT)?;
                let mut line = s.clone();
                line.push('\n');
                write_bytes(w, line.as_bytes())
            }
            LoggerMessage::StartActivity {
                id,
                level,
                kind,
                text,
                fields,
                parent,
            } => {
                if minor < 20 {
                    if text.is_empty() {
                        return Ok(());
                    }
                    return LoggerMessage::Next(format!("{text}...")).write(w, minor);
                }
                write_u64(w, stderr::START_ACTIVITY)?;
                write_u64(w, *id)?;
                write_u64(w, *level as u64)?;
                write_u64(w, *kind as u64)?;
                write_bytes(w, text.as_bytes())?;
                write_fields(w, fields)?;
                write_u64(w, *parent)
            }
            LoggerMessage::StopActivity(id) => {
                if minor < 20 {
                    return Ok(());
                }
                write_u64(w, stderr::STOP_ACTIVITY)?;
                write_u64(w, *id)
            }
            LoggerMessage::Result { id, kind, fields } => {
                if minor < 20 {
                    return Ok(());
                }
                write_u64(w, stderr::RESULT)?;
                write_u64(w, *id)?;
                write_u64(w, *kind as u64)?;
                write_fields(w, fields)
            }
            LoggerMessage::Error { message, status } => {
                write_u64(w, stderr::ERROR)?;
                if minor >= 26 {
                    write_bytes(w, b"Error")?;
                    write_u64(w, Verbosity::Error as u64)?;
                    write_bytes(w, b"Error")?; // the removed name
                    write_bytes(w, message.as_bytes())?;
                    write_u64(w, 0)?; // no position
                    write_u64(w, 0) // no traces
                } else {
                    write_bytes(w, message.as_bytes())?;
                    write_u64(w, *status)
                }
            }
            LoggerMessage::Last => write_u64(w, stderr::LAST),
        }
    }
}

/// Writes a store path.
pub fn write_store_path(w: &mut impl Write, sd: &StoreDir, p: &StorePath) -> io::Result<()> {
    write_bytes(w, sd.print(p).as_bytes())
}

/// Writes a store path or the empty string.
pub fn write_opt_store_path(
    w: &mut impl Write,
    sd: &StoreDir,
    p: Option<&StorePath>,
) -> io::Result<()> {
    match p {
        Some(p) => write_store_path(w, sd, p),
        None => write_bytes(w, b""),
    }
}

/// Writes a set of store paths (sorted, as Nix's `std::set` is).
pub fn write_store_paths(w: &mut impl Write, sd: &StoreDir, s: &StorePathSet) -> io::Result<()> {
    write_u64(w, s.len() as u64)?;
    for p in s {
        write_store_path(w, sd, p)?;
    }
    Ok(())
}

/// Writes a path info (`ValidPathInfo::write` without the path): deriver, NAR
/// hash in base 16 without its algorithm, references, registration time, NAR
/// size and, from 1.16, ultimate, signatures and ca.
pub fn write_path_info(
    w: &mut impl Write,
    sd: &StoreDir,
    info: &ValidPathInfo,
    minor: u64,
) -> io::Result<()> {
    write_opt_store_path(w, sd, info.deriver.as_ref())?;
    write_bytes(w, info.nar_hash.encode(Encoding::Base16).as_bytes())?;
    write_store_paths(w, sd, &info.references)?;
    write_u64(w, info.registration_time as u64)?;
    write_u64(w, info.nar_size)?;
    if minor >= 16 {
        write_bool(w, info.ultimate)?;
        write_strings(w, info.sigs.iter())?;
        let ca = info.ca.as_ref().map(|c| c.to_string()).unwrap_or_default();
        write_bytes(w, ca.as_bytes())?;
    }
    Ok(())
}

/// Writes a map of realisations (`DrvOutputs`): each id and its JSON.
pub fn write_drv_outputs(w: &mut impl Write, outs: &BuiltOutputs) -> io::Result<()> {
    write_u64(w, outs.len() as u64)?;
    for (id, r) in outs {
        write_bytes(w, id.to_string().as_bytes())?;
        write_bytes(w, r.to_json().as_bytes())?;
    }
    Ok(())
}

/// Writes a `BuildResult` as `BuildPathsWithResults` sends it (with its path).
pub fn write_build_result(
    w: &mut impl Write,
    sd: &StoreDir,
    path: &DerivedPath,
    res: &BuildResult,
) -> io::Result<()> {
    write_bytes(w, print_wire_derived_path(sd, path).as_bytes())?;
    write_u64(w, res.status.code())?;
    write_bytes(w, res.error_msg.as_bytes())?;
    write_u64(w, res.times_built as u64)?;
    write_bool(w, res.is_non_deterministic)?;
    write_u64(w, res.start_time as u64)?;
    write_u64(w, res.stop_time as u64)?;
    write_drv_outputs(w, &res.built_outputs)
}

/// Writes the reply of `BuildDerivation` for a client of 1.`minor`.
pub fn write_build_derivation_result(
    w: &mut impl Write,
    res: &BuildResult,
    minor: u64,
) -> io::Result<()> {
    write_u64(w, res.status.code())?;
    write_bytes(w, res.error_msg.as_bytes())?;
    if minor >= 29 {
        write_u64(w, res.times_built as u64)?;
        write_bool(w, res.is_non_deterministic)?;
        write_u64(w, res.start_time as u64)?;
        write_u64(w, res.stop_time as u64)?;
    }
    if minor >= 28 {
        write_drv_outputs(w, &res.built_outputs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{Hash, HashAlgo};

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn s(w: &mut Vec<u8>, x: &str) {
        write_bytes(w, x.as_bytes()).unwrap();
    }
    fn n(w: &mut Vec<u8>, x: u64) {
        write_u64(w, x).unwrap();
    }

    #[test]
    fn error_at_1_34_is_nix_error_info() {
        let mut got = Vec::new();
        LoggerMessage::Error {
            message: "invalid operation 99".into(),
            status: 1,
        }
        .write(&mut got, 34)
        .unwrap();
        let mut want = Vec::new();
        n(&mut want, 0x63787470);
        s(&mut want, "Error");
        n(&mut want, 0);
        s(&mut want, "Error");
        s(&mut want, "invalid operation 99");
        n(&mut want, 0);
        n(&mut want, 0);
        assert_eq!(got, want);
        let mut old = Vec::new();
        LoggerMessage::Error {
            message: "x".into(),
            status: 1,
        }
        .write(&mut old, 25)
        .unwrap();
        let mut want = Vec::new();
        n(&mut want, 0x63787470);
        s(&mut want, "x");
        n(&mut want, 1);
        assert_eq!(old, want);
    }

    #[test]
    fn activity_messages() {
        let mut got = Vec::new();
        LoggerMessage::StartActivity {
            id: 7,
            level: Verbosity::Info,
            kind: ActivityType::Build,
            text: "building 'x'".into(),
            fields: vec![Field::String("x".into()), Field::Int(1)],
            parent: 0,
        }
        .write(&mut got, 34)
        .unwrap();
        let mut want = Vec::new();
        for x in [0x53545254, 7, 3, 105] {
            n(&mut want, x);
        }
        s(&mut want, "building 'x'");
        n(&mut want, 2);
        n(&mut want, 1);
        s(&mut want, "x");
        n(&mut want, 0);
        n(&mut want, 1);
        n(&mut want, 0);
        assert_eq!(got, want);
        let mut old = Vec::new();
        LoggerMessage::StopActivity(7).write(&mut old, 19).unwrap();
        assert!(old.is_empty());
        let mut next = Vec::new();
        LoggerMessage::Next("hi".into())
            .write(&mut next, 34)
            .unwrap();
        let mut want = Vec::new();
        n(&mut want, 0x6f6c6d67);
        s(&mut want, "hi\n");
        assert_eq!(next, want);
    }

    #[test]
    fn path_info_as_valid_path_info_write() {
        let p = sd()
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello")
            .unwrap();
        let h = HashAlgo::Sha256.digest(b"x");
        let mut info = ValidPathInfo::new(p.clone(), h.clone(), 96);
        info.references.insert(p.clone());
        info.registration_time = 5;
        info.sigs.insert("k:abc".into());
        let mut got = Vec::new();
        write_path_info(&mut got, &sd(), &info, 34).unwrap();
        let mut want = Vec::new();
        s(&mut want, "");
        s(&mut want, &h.encode(Encoding::Base16));
        n(&mut want, 1);
        s(&mut want, &sd().print(&p));
        n(&mut want, 5);
        n(&mut want, 96);
        n(&mut want, 0);
        n(&mut want, 1);
        s(&mut want, "k:abc");
        s(&mut want, "");
        assert_eq!(got, want);
        // And it reads back as `AddToStoreNar`/`AddMultipleToStore` read it.
        let back =
            crate::worker_protocol::request::read_path_info_after_path(&mut &got[..], &sd(), p)
                .unwrap();
        assert_eq!(back, info);
        let _ = Hash::parse(&h.encode(Encoding::Base16), Some(HashAlgo::Sha256)).unwrap();
    }

    #[test]
    fn build_result_fields_in_order() {
        let p = sd()
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello")
            .unwrap();
        let mut r = BuildResult::new(crate::build_result::BuildStatus::Built);
        r.times_built = 1;
        r.start_time = 10;
        r.stop_time = 12;
        let mut got = Vec::new();
        write_build_result(&mut got, &sd(), &DerivedPath::Opaque(p.clone()), &r).unwrap();
        let mut want = Vec::new();
        s(&mut want, &sd().print(&p));
        for x in [0, 0] {
            n(&mut want, x);
        }
        want.truncate(want.len() - 8);
        s(&mut want, "");
        for x in [1, 0, 10, 12, 0] {
            n(&mut want, x);
        }
        assert_eq!(got, want);
    }
}
