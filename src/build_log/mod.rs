//! Build logs: what Nix does with a builder's output.
//!
//! A builder's output reaches Nix as raw bytes (from the pseudo-terminal of a local
//! build, or from fd 4 of the build hook). Nix 2.8 does three things with them:
//!
//! * writes them **verbatim** to the log file `<log dir>/drvs/<xx>/<rest>[.bz2]`
//!   ([`file`](mod@file)), bzip2-compressed when `compress-build-log` is on (the default);
//! * assembles them into lines ([`lines`]): `\r` moves the write position back to the
//!   start of the line, `\n` ends the line, a partial last line is flushed at EOF;
//! * handles each line: an `@nix {…}` JSON message ([`json`]) becomes a log event and
//!   is left out of the tail; any other line goes into the tail of the last `log-lines`
//!   lines ([`tail`]) shown when the build fails, and is echoed by `nix-store`.
//!
//! What is echoed to stderr passes [`ansi`]'s filter first, as in Nix.
//!
//! [`read`] finds and decompresses a stored log, as `nix-store --read-log` does.
//!
//! Nothing here knows about actors or async runtimes; the compressing writer runs on
//! its own thread fed by a bounded channel ([`file::LogFileWriter`]), and compresses
//! blocks of a large log on several threads ([`blocks`]).

pub mod ansi;
pub mod blocks;
pub mod file;
pub mod json;
pub mod lines;
pub mod read;
pub mod tail;

pub use file::{log_file_path, LogFile, LogFileError, LogFileWriter};
pub use json::{parse_json_message, Field, JsonMessage, JsonMessageError};
pub use lines::LineAssembler;
pub use read::{find_build_log, read_build_log, ReadLogError, StoredLog};
pub use tail::LogTail;
