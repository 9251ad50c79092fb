//! Nix 2.8's worker protocol, version 1.34: the wire format `nix-daemon` speaks
//! with its clients (`worker-protocol.hh`, `daemon.cc`, `remote-store.cc`).
//!
//! Pure code over `Read`/`Write`, no actors and no I/O of its own:
//!
//! * [`wire`]: integers, padded strings, collections, with limits on every
//!   length read;
//! * [`framed`]: `FramedSource`/`FramedSink`, the streams of `AddToStore`,
//!   `AddToStoreNar`, `AddMultipleToStore` and `AddBuildLog`;
//! * [`handshake`]: the greeting and version negotiation of a server;
//! * [`request`]: [`Request`], one value per operation, decoded from the wire
//!   (the framed payloads that follow some requests are read by the caller);
//! * [`reply`]: encoders of the values the server sends back (path infos,
//!   build results, realisations) and of the logger messages (`STDERR_*`).

pub mod framed;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod wire;

use thiserror::Error;

pub use handshake::{server_handshake, ClientHello};
pub use reply::{ActivityType, Field, LoggerMessage, ResultType, Verbosity};
pub use request::{ClientOptions, Op, Request, WireBuildMode};

/// The client's first word.
pub const WORKER_MAGIC_1: u64 = 0x6e697863;
/// The server's answer to it.
pub const WORKER_MAGIC_2: u64 = 0x6478696f;
/// The protocol version Nix 2.8 speaks: 1.34.
pub const PROTOCOL_VERSION: u64 = (1 << 8) | 34;
/// The oldest client version `nix-daemon` accepts (1.10).
pub const MIN_CLIENT_VERSION: u64 = 0x10a;
/// The daemon version string sent to clients of 1.33 and later.
pub const NIX_VERSION: &str = "2.8.0";

/// The major part of a protocol version.
pub fn major(version: u64) -> u64 {
    version & 0xff00
}

/// The minor part of a protocol version.
pub fn minor(version: u64) -> u64 {
    version & 0x00ff
}

/// Logger message tags.
pub mod stderr {
    pub const NEXT: u64 = 0x6f6c6d67;
    pub const READ: u64 = 0x64617461;
    pub const WRITE: u64 = 0x64617416;
    pub const LAST: u64 = 0x616c7473;
    pub const ERROR: u64 = 0x63787470;
    pub const START_ACTIVITY: u64 = 0x53545254;
    pub const STOP_ACTIVITY: u64 = 0x53544f50;
    pub const RESULT: u64 = 0x52534c54;
}

/// An argument highlighted as Nix's `hintfmt` prints it into error messages
/// (`ANSI_WARNING`, magenta bold); clients strip it when not on a terminal.
pub fn hl(s: impl std::fmt::Display) -> String {
    format!("\x1b[35;1m{s}\x1b[0m")
}

impl ProtocolError {
    /// The message Nix 2.8's daemon sends for this error, byte for byte where
    /// Nix has one (its `hintfmt` highlights included).
    pub fn nix_message(&self) -> String {
        use crate::store_path::StorePathError;
        match self {
            ProtocolError::UnexpectedEof(_) => "unexpected end-of-file".into(),
            ProtocolError::InvalidOperation(op) => format!("invalid operation {}", hl(op)),
            ProtocolError::StringTooLong { .. } => "string is too long".into(),
            ProtocolError::NonZeroPadding(_) => "non-zero padding".into(),
            ProtocolError::StorePath(StorePathError::NotInStore(p)) => {
                format!("path '{}' is not in the Nix store", hl(p))
            }
            e => e.to_string(),
        }
    }
}

/// Why bytes from a client are not a valid message.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("unexpected end-of-file while reading {0}")]
    UnexpectedEof(&'static str),
    #[error("reading {0} from the client: {1}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("string of {len} bytes is too long (the limit is {max})")]
    StringTooLong { len: u64, max: u64 },
    #[error("collection of {0} elements is too long")]
    CollectionTooLong(u64),
    #[error("frame of {0} bytes is too long")]
    FrameTooLong(u64),
    #[error("non-zero padding {0:?}")]
    NonZeroPadding(Vec<u8>),
    #[error("integer {0} is too large")]
    IntegerTooLarge(u64),
    #[error("string is not UTF-8: '{0}'")]
    NotUtf8(String),
    /// Nix's words for a wrong greeting.
    #[error("protocol mismatch")]
    BadMagic(u64),
    /// Nix's words for a client older than 1.10.
    #[error("the Nix client version is too old")]
    ClientTooOld(u64),
    /// Nix's words for an operation code it does not know.
    #[error("invalid operation {0}")]
    InvalidOperation(u64),
    /// An operation Nix 2.8 still serves for ancient clients that drover refuses.
    #[error("operation {name} ({code}) is obsolete and not supported by drover")]
    Obsolete { name: &'static str, code: u64 },
    /// A request form of a protocol version drover does not serve.
    #[error(
        "{op} from a client of protocol 1.{minor} is not supported by drover (it needs 1.{needs})"
    )]
    OldForm {
        op: &'static str,
        minor: u64,
        needs: u64,
    },
    #[error(transparent)]
    StorePath(#[from] crate::store_path::StorePathError),
    #[error(transparent)]
    DerivedPath(#[from] crate::derived_path::DerivedPathError),
    #[error(transparent)]
    Hash(#[from] crate::hash::HashError),
    #[error(transparent)]
    ContentAddress(#[from] crate::content_address::CaError),
    #[error(transparent)]
    Realisation(#[from] crate::realisation::RealisationError),
    #[error(transparent)]
    Derivation(#[from] crate::derivation::DerivationError),
    #[error("invalid content-address method '{0}'")]
    BadCaMethod(String),
    #[error("invalid build mode {0}")]
    BadBuildMode(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_messages_carry_hintfmt_highlights() {
        assert_eq!(
            ProtocolError::InvalidOperation(99).nix_message(),
            "invalid operation \x1b[35;1m99\x1b[0m"
        );
        assert_eq!(
            ProtocolError::UnexpectedEof("a string").nix_message(),
            "unexpected end-of-file"
        );
        let e: ProtocolError = crate::store_path::StorePathError::NotInStore("/x".into()).into();
        assert_eq!(
            e.nix_message(),
            "path '\x1b[35;1m/x\x1b[0m' is not in the Nix store"
        );
    }
}
