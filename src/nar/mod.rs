//! NAR, the Nix ARchive format.
//!
//! A NAR serialises a file system object (regular file, executable flag, symlink or
//! directory) deterministically: no timestamps, owners or permissions beyond the
//! executable bit, directory entries sorted by name. Every token is a *string*: a
//! little-endian `u64` length, the bytes, zero padding to a multiple of 8.
//!
//! ```text
//! nar      = "nix-archive-1" node
//! node     = "(" "type" ( regular | symlink | directory ) ")"
//! regular  = "regular" [ "executable" "" ] "contents" <string>
//! symlink  = "symlink" "target" <string>
//! directory= "directory" { "entry" "(" "name" <string> "node" node ")" }
//! ```
//!
//! [`writer`] dumps a tree or a byte string; the store hashes what it writes through
//! [`crate::hash::HashSink`]. [`reader`] parses a NAR in one streaming pass into a
//! [`NarSink`] while computing its hash and size; [`mod@restore`] unpacks it into the
//! file system (`nix-store --restore`). Reference scanning and hash rewriting over NAR
//! streams are in [`crate::references`].

pub mod reader;
pub mod restore;
pub mod writer;

pub use reader::{
    copy_nar, parse, parse_counted, parse_embedded, validate, NarReadError, NarSink, NarSummary,
    NullSink,
};
pub use restore::{restore, RestoreSink};
pub use writer::{dump_bytes, dump_path, nar_hash_of_path, NarWriteError};
