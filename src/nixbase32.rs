//! Nix's base-32 encoding.
//!
//! Nix prints hashes in store paths and `sha256:…` strings in its own base 32:
//! the alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `t`, `u`) and the
//! bytes read from the *end* of the digest, least significant bits first. An
//! `n`-byte digest encodes to `ceil(n * 8 / 5)` characters.

use thiserror::Error;

/// The 32 characters Nix uses, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not the nix base-32 form of a digest.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid character {0:?} in nix base-32 string")]
    InvalidChar(char),
    #[error("nix base-32 string {0:?} does not encode a whole number of bytes")]
    TrailingBits(String),
}

/// Number of characters that encode `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Number of bytes encoded by `len` characters, when `len` is a valid length.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

/// Encodes `bytes` in nix base 32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = (bytes[i] as u16) >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes a nix base-32 string into its bytes.
pub fn decode(s: &str) -> Result<Vec<u8>, Base32Error> {
    let s = s.as_bytes();
    let size = decoded_len(s.len());
    let mut out = vec![0u8; size];
    for (n, &c) in s.iter().rev().enumerate() {
        let d = digit(c).ok_or(Base32Error::InvalidChar(c as char))? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let v = d << j;
        if i < size {
            out[i] |= (v & 0xff) as u8;
        } else if v & 0xff != 0 {
            return Err(Base32Error::TrailingBits(String::from_utf8_lossy(s).into()));
        }
        let carry = (v >> 8) as u8;
        if carry != 0 {
            if i + 1 < size {
                out[i + 1] |= carry;
            } else {
                return Err(Base32Error::TrailingBits(String::from_utf8_lossy(s).into()));
            }
        }
    }
    Ok(out)
}

/// Whether `c` is a character of the nix base-32 alphabet.
pub fn is_valid_char(c: u8) -> bool {
    digit(c).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty() {
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn sha256_of_empty_string() {
        // `nix-hash --type sha256 --to-base32 e3b0c442…`
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).unwrap();
        let s = encode(&bytes);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(&s).unwrap(), bytes);
    }

    #[test]
    fn rejects_bad_char() {
        assert_eq!(decode("e0"), Err(Base32Error::InvalidChar('e')));
    }

    #[test]
    fn rejects_trailing_bits() {
        // Two characters carry 10 bits for one byte: the top two must be zero.
        assert!(decode("zz").is_err());
        assert!(decode("07").is_ok());
    }

    #[test]
    fn round_trip_lengths() {
        for len in 0..70 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode(&encode(&bytes)).unwrap(), bytes, "len {len}");
        }
    }
}
