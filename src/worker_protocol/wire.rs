//! The primitive encodings of Nix's worker protocol (`serialise.hh`): 64-bit
//! little-endian integers, byte strings as a length, the bytes and zero padding to
//! a multiple of 8, and collections as a count followed by the elements.
//!
//! Every length and count read from the wire is checked against a limit before
//! anything is allocated, and strings are read in bounded chunks, so a client
//! announcing a huge string gets an error (or an end of file), never an
//! allocation of that size.

use std::io::{self, Read, Write};

use super::ProtocolError;

/// The longest string accepted from a client (`AddTextToStore` carries whole
/// files: 64 MiB is far above any `.drv` or `builtins.toFile` text).
pub const MAX_STRING_LEN: u64 = 64 << 20;

/// The most elements accepted in one collection (sets of paths, settings).
pub const MAX_COLLECTION_LEN: u64 = 1 << 24;

/// Bytes read at a time into a string, so that memory follows what arrived.
const CHUNK: usize = 64 << 10;

fn eof_or_io(e: io::Error, what: &'static str) -> ProtocolError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::UnexpectedEof(what)
    } else {
        ProtocolError::Io(what, e)
    }
}

/// Reads a 64-bit little-endian integer.
pub fn read_u64(r: &mut impl Read) -> Result<u64, ProtocolError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)
        .map_err(|e| eof_or_io(e, "an integer"))?;
    Ok(u64::from_le_bytes(b))
}

/// Reads an integer that must fit in a `u32` (Nix's `readInt`).
pub fn read_u32(r: &mut impl Read) -> Result<u32, ProtocolError> {
    let n = read_u64(r)?;
    u32::try_from(n).map_err(|_| ProtocolError::IntegerTooLarge(n))
}

/// Reads a boolean: any non-zero integer is true, as in Nix.
pub fn read_bool(r: &mut impl Read) -> Result<bool, ProtocolError> {
    Ok(read_u64(r)? != 0)
}

/// Reads a collection count, refusing more than [`MAX_COLLECTION_LEN`].
pub fn read_count(r: &mut impl Read) -> Result<u64, ProtocolError> {
    let n = read_u64(r)?;
    if n > MAX_COLLECTION_LEN {
        return Err(ProtocolError::CollectionTooLong(n));
    }
    Ok(n)
}

/// Reads the zero padding after `len` bytes.
fn read_padding(r: &mut impl Read, len: u64) -> Result<(), ProtocolError> {
    let pad = (8 - len % 8) % 8;
    if pad > 0 {
        let mut b = [0u8; 8];
        let b = &mut b[..pad as usize];
        r.read_exact(b).map_err(|e| eof_or_io(e, "padding"))?;
        if b.iter().any(|&c| c != 0) {
            return Err(ProtocolError::NonZeroPadding(b.to_vec()));
        }
    }
    Ok(())
}

/// Reads a byte string of at most `max` bytes.
pub fn read_bytes_max(r: &mut impl Read, max: u64) -> Result<Vec<u8>, ProtocolError> {
    let len = read_u64(r)?;
    if len > max {
        return Err(ProtocolError::StringTooLong { len, max });
    }
    let mut out = Vec::with_capacity((len as usize).min(CHUNK));
    let mut left = len as usize;
    let mut buf = [0u8; 4096];
    while left > 0 {
        let n = left.min(buf.len());
        r.read_exact(&mut buf[..n])
            .map_err(|e| eof_or_io(e, "a string"))?;
        out.extend_from_slice(&buf[..n]);
        left -= n;
    }
    read_padding(r, len)?;
    Ok(out)
}

/// Reads a byte string of at most [`MAX_STRING_LEN`] bytes.
pub fn read_bytes(r: &mut impl Read) -> Result<Vec<u8>, ProtocolError> {
    read_bytes_max(r, MAX_STRING_LEN)
}

/// Reads a string that must be UTF-8 (paths, names, settings).
pub fn read_string(r: &mut impl Read) -> Result<String, ProtocolError> {
    let b = read_bytes(r)?;
    String::from_utf8(b)
        .map_err(|e| ProtocolError::NotUtf8(String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Reads a list of strings (`readStrings`).
pub fn read_strings(r: &mut impl Read) -> Result<Vec<String>, ProtocolError> {
    let n = read_count(r)?;
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(read_string(r)?);
    }
    Ok(v)
}

/// Writes a 64-bit little-endian integer.
pub fn write_u64(w: &mut impl Write, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

/// Writes a boolean as 0 or 1.
pub fn write_bool(w: &mut impl Write, b: bool) -> io::Result<()> {
    write_u64(w, b as u64)
}

/// Writes a byte string with its length and padding.
pub fn write_bytes(w: &mut impl Write, b: &[u8]) -> io::Result<()> {
    write_u64(w, b.len() as u64)?;
    w.write_all(b)?;
    let pad = (8 - b.len() % 8) % 8;
    w.write_all(&[0u8; 8][..pad])
}

/// Writes a list of strings.
pub fn write_strings<S: AsRef<str>>(
    w: &mut impl Write,
    items: impl ExactSizeIterator<Item = S>,
) -> io::Result<()> {
    write_u64(w, items.len() as u64)?;
    for s in items {
        write_bytes(w, s.as_ref().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_is_length_bytes_and_padding() {
        let mut v = Vec::new();
        write_bytes(&mut v, b"abc").unwrap();
        assert_eq!(v, b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0");
        let mut v2 = Vec::new();
        write_bytes(&mut v2, b"12345678").unwrap();
        assert_eq!(v2.len(), 16);
        assert_eq!(read_bytes(&mut &v[..]).unwrap(), b"abc");
        assert_eq!(read_bytes(&mut &v2[..]).unwrap(), b"12345678");
    }

    #[test]
    fn empty_string_has_no_padding() {
        let mut v = Vec::new();
        write_bytes(&mut v, b"").unwrap();
        assert_eq!(v, [0u8; 8]);
    }

    #[test]
    fn huge_length_is_an_error_not_an_allocation() {
        let bytes = u64::MAX.to_le_bytes();
        match read_bytes(&mut &bytes[..]) {
            Err(ProtocolError::StringTooLong { len, .. }) => assert_eq!(len, u64::MAX),
            other => panic!("{other:?}"),
        }
        let bytes = (MAX_COLLECTION_LEN + 1).to_le_bytes();
        assert!(matches!(
            read_count(&mut &bytes[..]),
            Err(ProtocolError::CollectionTooLong(_))
        ));
    }

    #[test]
    fn truncated_string_is_eof() {
        let mut v = Vec::new();
        write_bytes(&mut v, b"hello world").unwrap();
        v.truncate(12);
        assert!(matches!(
            read_bytes(&mut &v[..]),
            Err(ProtocolError::UnexpectedEof(_))
        ));
    }

    #[test]
    fn nonzero_padding_is_refused() {
        let mut v = Vec::new();
        write_bytes(&mut v, b"a").unwrap();
        v[10] = 1;
        assert!(matches!(
            read_bytes(&mut &v[..]),
            Err(ProtocolError::NonZeroPadding(_))
        ));
    }

    #[test]
    fn int_over_u32_is_refused() {
        let b = (1u64 << 40).to_le_bytes();
        assert!(matches!(
            read_u32(&mut &b[..]),
            Err(ProtocolError::IntegerTooLarge(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn strings_round_trip(s in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            let mut v = Vec::new();
            write_bytes(&mut v, &s).unwrap();
            proptest::prop_assert_eq!(v.len() % 8, 0);
            proptest::prop_assert_eq!(read_bytes(&mut &v[..]).unwrap(), s);
        }
    }
}
