//! The server side of the greeting (`processConnection`): magic numbers, the
//! server's version, the client's version, the obsolete CPU-affinity and
//! `reserveSpace` fields, and the daemon's version string for clients of 1.33
//! and later. Protocol 1.34 has no trusted flag (that is 1.35). The caller then
//! sends `STDERR_LAST` (or an error) to finish the greeting.

use std::io::{Read, Write};

use super::wire::{read_u64, write_bytes, write_u64};
use super::{
    minor, ProtocolError, MIN_CLIENT_VERSION, NIX_VERSION, PROTOCOL_VERSION, WORKER_MAGIC_1,
    WORKER_MAGIC_2,
};

/// What the client said in the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// The client's protocol version (`0x122` for Nix 2.8).
    pub version: u64,
    /// The obsolete CPU the client asked to be pinned to, if any.
    pub cpu_affinity: Option<u64>,
}

impl ClientHello {
    /// The version both sides speak: the lower of the two.
    pub fn minor(&self) -> u64 {
        minor(self.version.min(PROTOCOL_VERSION))
    }
}

/// Runs the server's half of the greeting on `r`/`w`.
pub fn server_handshake(
    r: &mut impl Read,
    w: &mut impl Write,
) -> Result<ClientHello, ProtocolError> {
    let magic = read_u64(r)?;
    if magic != WORKER_MAGIC_1 {
        return Err(ProtocolError::BadMagic(magic));
    }
    let io = |e| ProtocolError::Io("the greeting", e);
    write_u64(w, WORKER_MAGIC_2).map_err(io)?;
    write_u64(w, PROTOCOL_VERSION).map_err(io)?;
    w.flush().map_err(io)?;
    let version = read_u64(r)?;
    if version < MIN_CLIENT_VERSION {
        return Err(ProtocolError::ClientTooOld(version));
    }
    let m = minor(version);
    let mut cpu_affinity = None;
    if m >= 14 && read_u64(r)? != 0 {
        cpu_affinity = Some(read_u64(r)?);
    }
    if m >= 11 {
        read_u64(r)?; // obsolete reserveSpace
    }
    if m >= 33 {
        write_bytes(w, NIX_VERSION.as_bytes()).map_err(io)?;
    }
    Ok(ClientHello {
        version,
        cpu_affinity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_bytes(version: u64, affinity: Option<u64>) -> Vec<u8> {
        let mut v = Vec::new();
        write_u64(&mut v, WORKER_MAGIC_1).unwrap();
        write_u64(&mut v, version).unwrap();
        match affinity {
            Some(a) => {
                write_u64(&mut v, 1).unwrap();
                write_u64(&mut v, a).unwrap();
            }
            None => write_u64(&mut v, 0).unwrap(),
        }
        write_u64(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn nix_2_8_greeting_byte_for_byte() {
        let input = client_bytes(0x122, None);
        let mut out = Vec::new();
        let hello = server_handshake(&mut &input[..], &mut out).unwrap();
        assert_eq!(hello.version, 0x122);
        assert_eq!(hello.minor(), 34);
        let mut expected = Vec::new();
        write_u64(&mut expected, 0x6478696f).unwrap();
        write_u64(&mut expected, 0x122).unwrap();
        write_bytes(&mut expected, b"2.8.0").unwrap();
        assert_eq!(out, expected);
    }

    #[test]
    fn affinity_is_read_and_newer_client_speaks_1_34() {
        let input = client_bytes(0x123, Some(3));
        let mut out = Vec::new();
        let hello = server_handshake(&mut &input[..], &mut out).unwrap();
        assert_eq!(hello.cpu_affinity, Some(3));
        assert_eq!(hello.minor(), 34);
    }

    #[test]
    fn old_client_gets_no_version_string() {
        let input = client_bytes(0x120, None);
        let mut out = Vec::new();
        server_handshake(&mut &input[..], &mut out).unwrap();
        assert_eq!(out.len(), 16);
    }

    #[test]
    fn bad_magic_and_too_old() {
        let mut v = Vec::new();
        write_u64(&mut v, 42).unwrap();
        let e = server_handshake(&mut &v[..], &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "protocol mismatch");
        let input = client_bytes(0x109, None);
        let e = server_handshake(&mut &input[..], &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "the Nix client version is too old");
    }
}
