//! Signing keys and detached signatures as Nix writes them.
//!
//! Nix signs binary cache objects (narinfo fingerprints, realisations) with ed25519.
//! Everything is text of the form `<name>:<base64>`:
//!
//! * a **secret key** is the 64-byte keypair as libsodium stores it (32-byte seed
//!   followed by the 32-byte public key); `nix-store --generate-binary-cache-key NAME
//!   SEC PUB` writes it to `SEC` without a trailing newline;
//! * a **public key** is the 32-byte ed25519 public key (`PUB`, no trailing newline);
//! * a **signature** (`Sig:` in narinfo files, `signatures` in realisations) is the
//!   64-byte detached signature, named after the key that made it.
//!
//! The text is split at the first `:`; both halves must be non-empty. The base64 half
//! is decoded the way Nix 2.8's `base64Decode` does it: line feeds are skipped
//! (so a key file with a trailing newline is fine), decoding stops at the first `=`,
//! and any other character outside the base64 alphabet is an error.
//!
//! Verification follows Nix's `verifyDetached`: a signature whose key name is not in
//! the trusted set is simply not valid (`Ok(false)`), whereas a signature named after
//! a trusted key that does not decode to 64 bytes is an error. A narinfo or
//! realisation counts the signatures that are valid.
//!
//! Errors about secret keys never contain key material, only the key name.

use std::collections::BTreeMap;
use std::fmt;

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::realisation::Realisation;

/// Length of a libsodium secret key (seed and public key).
pub const SECRET_KEY_LEN: usize = 64;
/// Length of an ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why a key or signature is not usable.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum SignatureError {
    /// The secret key text is not `<name>:<base64>`. The text itself is not shown.
    #[error("secret key is corrupt: it is not of the form '<name>:<base64>' (contents not shown)")]
    SecretKeyCorrupt,
    /// The secret key's base64 part is bad or not 64 bytes; only the name is shown.
    #[error("secret key '{name}' is not valid: {reason}")]
    SecretKeyInvalid { name: String, reason: String },
    #[error("public key '{0}' is corrupt: it is not of the form '<name>:<base64>'")]
    PublicKeyCorrupt(String),
    #[error("public key '{key}' is not valid: {reason}")]
    PublicKeyInvalid { key: String, reason: String },
    #[error("signature '{0}' is corrupt: it is not of the form '<name>:<base64>'")]
    SignatureCorrupt(String),
    #[error("signature '{sig}' is not valid: {reason}")]
    SignatureInvalid { sig: String, reason: String },
    #[error("key name '{0}' is not valid: it must be non-empty and contain no ':'")]
    BadKeyName(String),
}

/// Splits `<name>:<rest>` at the first colon; `None` when either half is empty.
fn split_named(s: &str) -> Option<(&str, &str)> {
    s.split_once(':')
        .filter(|(name, rest)| !name.is_empty() && !rest.is_empty())
}

/// Decodes base64 the way Nix 2.8's `base64Decode` does (see the module docs).
/// On error returns the offending character.
fn nix_base64_decode(s: &str) -> Result<Vec<u8>, char> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.chars() {
        if c == '=' {
            break;
        }
        if c == '\n' {
            continue;
        }
        let digit = match c {
            'A'..='Z' => c as u32 - 'A' as u32,
            'a'..='z' => c as u32 - 'a' as u32 + 26,
            '0'..='9' => c as u32 - '0' as u32 + 52,
            '+' => 62,
            '/' => 63,
            _ => return Err(c),
        };
        acc = (acc << 6 | digit) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<(), SignatureError> {
    if name.is_empty() || name.contains(':') {
        return Err(SignatureError::BadKeyName(name.to_owned()));
    }
    Ok(())
}

/// An ed25519 secret key with its name (`nix-store --generate-binary-cache-key`).
///
/// Its `Debug` output hides the key material.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses `<name>:<base64 of 64 bytes>`, the contents of a secret key file
    /// (a trailing newline is accepted, as Nix does).
    pub fn parse(s: &str) -> Result<SecretKey, SignatureError> {
        let (name, b64) = split_named(s).ok_or(SignatureError::SecretKeyCorrupt)?;
        let invalid = |reason: String| SignatureError::SecretKeyInvalid {
            name: name.to_owned(),
            reason,
        };
        let bytes = nix_base64_decode(b64)
            .map_err(|c| invalid(format!("invalid character '{c}' in its base64 part")))?;
        let bytes: [u8; SECRET_KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "it is {} bytes long, expected {SECRET_KEY_LEN}",
                bytes.len()
            ))
        })?;
        let key = SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| invalid("its public half does not belong to its seed".into()))?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    /// A new random key pair named `name`, as `nix-store --generate-binary-cache-key`.
    pub fn generate(name: &str) -> Result<SecretKey, SignatureError> {
        check_name(name)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::generate(&mut rand_core::OsRng),
        })
    }

    /// A key from a 32-byte ed25519 seed (deterministic; for tests and tools).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<SecretKey, SignatureError> {
        check_name(name)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key file text `<name>:<base64>` (no trailing newline, as Nix writes it).
    /// This is secret material: do not log it.
    pub fn to_key_file(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }

    /// The matching public key, with the same name.
    pub fn to_public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Nix's `signDetached`: signs `data`, returning `<name>:<base64 signature>`.
    pub fn sign(&self, data: &[u8]) -> String {
        let sig = self.key.sign(data);
        format!("{}:{}", self.name, BASE64.encode(&sig.to_bytes()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<hidden>)", self.name)
    }
}

/// An ed25519 public key with its name, e.g. `cache.nixos.org-1:6NCH…`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `<name>:<base64 of 32 bytes>` (a trailing newline is accepted). Unlike
    /// Nix, which accepts any 32 bytes and then never verifies with them, bytes that
    /// are not an ed25519 point are an error.
    pub fn parse(s: &str) -> Result<PublicKey, SignatureError> {
        let (name, b64) =
            split_named(s).ok_or_else(|| SignatureError::PublicKeyCorrupt(s.to_owned()))?;
        let invalid = |reason: String| SignatureError::PublicKeyInvalid {
            key: s.to_owned(),
            reason,
        };
        let bytes = nix_base64_decode(b64)
            .map_err(|c| invalid(format!("invalid character '{c}' in its base64 part")))?;
        let bytes: [u8; PUBLIC_KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "it is {} bytes long, expected {PUBLIC_KEY_LEN}",
                bytes.len()
            ))
        })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| invalid("it is not a point on the ed25519 curve".into()))?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.key.as_bytes()
    }

    /// Whether `sig` is this key's signature of `data` (ignores the signature's name).
    pub fn verify(&self, data: &[u8], sig: &Signature) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(&sig.bytes);
        self.key.verify_strict(data, &sig).is_ok()
    }
}

/// `<name>:<base64>`, the public key file text (no trailing newline).
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<PublicKey, SignatureError> {
        PublicKey::parse(s)
    }
}

/// A detached signature `<key name>:<base64 of 64 bytes>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    name: String,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    /// Parses `<key name>:<base64>`; the signature must be 64 bytes.
    pub fn parse(s: &str) -> Result<Signature, SignatureError> {
        let (name, b64) =
            split_named(s).ok_or_else(|| SignatureError::SignatureCorrupt(s.to_owned()))?;
        let invalid = |reason: String| SignatureError::SignatureInvalid {
            sig: s.to_owned(),
            reason,
        };
        let bytes = nix_base64_decode(b64)
            .map_err(|c| invalid(format!("invalid character '{c}' in its base64 part")))?;
        let bytes: [u8; SIGNATURE_LEN] = bytes.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "it is {} bytes long, expected {SIGNATURE_LEN}",
                bytes.len()
            ))
        })?;
        Ok(Signature {
            name: name.to_owned(),
            bytes,
        })
    }

    /// The name of the key that made it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(&self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// A set of trusted public keys by name (Nix's `PublicKeys`, from the
/// `trusted-public-keys` setting). A later key with the same name does not replace
/// an earlier one, as with Nix's `emplace`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl PublicKeys {
    pub fn new() -> PublicKeys {
        PublicKeys::default()
    }

    /// Parses a whitespace-separated list of keys, as in `trusted-public-keys`.
    pub fn parse_list(s: &str) -> Result<PublicKeys, SignatureError> {
        let mut keys = PublicKeys::new();
        for k in s.split_ascii_whitespace() {
            keys.insert(PublicKey::parse(k)?);
        }
        Ok(keys)
    }

    /// Adds a key unless one with the same name is already trusted.
    pub fn insert(&mut self, key: PublicKey) {
        self.keys.entry(key.name.clone()).or_insert(key);
    }

    pub fn get(&self, name: &str) -> Option<&PublicKey> {
        self.keys.get(name)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Nix's `verifyDetached`: whether `sig` (`<name>:<base64>`) is a valid signature
    /// of `data` by a trusted key. Unknown or missing key names give `Ok(false)`; a
    /// signature named after a trusted key that is not 64 bytes of base64 is an error.
    pub fn verify(&self, data: &[u8], sig: &str) -> Result<bool, SignatureError> {
        let name = sig.split_once(':').map_or("", |(n, _)| n);
        let Some(key) = self.keys.get(name) else {
            return Ok(false);
        };
        let sig = Signature::parse(sig)?;
        Ok(key.verify(data, &sig))
    }

    /// How many of `sigs` are valid signatures of `data` by trusted keys.
    pub fn count_valid<'a>(
        &self,
        data: &[u8],
        sigs: impl IntoIterator<Item = &'a String>,
    ) -> Result<usize, SignatureError> {
        let mut good = 0;
        for s in sigs {
            if self.verify(data, s)? {
                good += 1;
            }
        }
        Ok(good)
    }
}

impl FromIterator<PublicKey> for PublicKeys {
    fn from_iter<I: IntoIterator<Item = PublicKey>>(iter: I) -> PublicKeys {
        let mut keys = PublicKeys::new();
        for k in iter {
            keys.insert(k);
        }
        keys
    }
}

/// Nix's `Realisation::sign`: adds `key`'s signature of the realisation's fingerprint.
pub fn sign_realisation(realisation: &mut Realisation, key: &SecretKey) {
    let sig = key.sign(realisation.fingerprint().as_bytes());
    realisation.signatures.insert(sig);
}

/// Nix's `Realisation::checkSignatures`: how many of its signatures are valid.
pub fn check_realisation_signatures(
    realisation: &Realisation,
    keys: &PublicKeys,
) -> Result<usize, SignatureError> {
    keys.count_valid(
        realisation.fingerprint().as_bytes(),
        &realisation.signatures,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A key pair made by `nix-store --generate-binary-cache-key test-1 sec pub`
    /// (Nix 2.8.0), a throwaway test key.
    const SEC: &str = "test-1:Nvn6NRB7SAHVjEvqBqkeFyPFatKtlwQ4gSHv4gtbDZ0uM+PLlZ3Nz2SoWC20BCAHiyjXOUmXx2l8sz/WUZoNtQ==";
    const PUB: &str = "test-1:LjPjy5Wdzc9kqFgttAQgB4so1zlJl8dpfLM/1lGaDbU=";

    #[test]
    fn public_key_round_trip() {
        let k = PublicKey::parse(PUB).unwrap();
        assert_eq!(k.name(), "test-1");
        assert_eq!(k.to_string(), PUB);
        assert_eq!(PublicKey::parse(&format!("{PUB}\n")).unwrap(), k);
    }

    #[test]
    fn secret_key_round_trip_and_public_half() {
        let k = SecretKey::parse(SEC).unwrap();
        assert_eq!(k.to_key_file(), SEC);
        assert_eq!(k.to_public_key().to_string(), PUB);
        assert_eq!(
            SecretKey::parse(&format!("{SEC}\n")).unwrap().to_key_file(),
            SEC
        );
    }

    #[test]
    fn secret_key_debug_hides_material() {
        let k = SecretKey::parse(SEC).unwrap();
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "SecretKey(test-1:<hidden>)");
    }

    #[test]
    fn sign_and_verify() {
        let k = SecretKey::parse(SEC).unwrap();
        let sig = k.sign(b"hello");
        let keys: PublicKeys = [k.to_public_key()].into_iter().collect();
        assert_eq!(keys.verify(b"hello", &sig), Ok(true));
        assert_eq!(keys.verify(b"hellO", &sig), Ok(false));
        assert_eq!(Signature::parse(&sig).unwrap().to_string(), sig);
    }

    #[test]
    fn signatures_are_deterministic() {
        let k = SecretKey::from_seed("k", &[7; 32]).unwrap();
        assert_eq!(k.sign(b"x"), k.sign(b"x"));
        let again = SecretKey::parse(&k.to_key_file()).unwrap();
        assert_eq!(again.sign(b"x"), k.sign(b"x"));
    }

    #[test]
    fn generated_keys_differ_and_work() {
        let a = SecretKey::generate("a-1").unwrap();
        let b = SecretKey::generate("a-1").unwrap();
        assert_ne!(a.to_public_key(), b.to_public_key());
        let parsed = SecretKey::parse(&a.to_key_file()).unwrap();
        let keys: PublicKeys = [parsed.to_public_key()].into_iter().collect();
        assert_eq!(keys.verify(b"d", &a.sign(b"d")), Ok(true));
        assert_eq!(keys.verify(b"d", &b.sign(b"d")), Ok(false));
    }

    #[test]
    fn untrusted_key_name_is_not_valid_not_an_error() {
        let keys = PublicKeys::parse_list(PUB).unwrap();
        assert_eq!(keys.verify(b"x", "other:AAAA"), Ok(false));
        assert_eq!(keys.verify(b"x", "no colon"), Ok(false));
        assert_eq!(keys.verify(b"x", ""), Ok(false));
    }

    #[test]
    fn trusted_name_with_bad_signature_is_an_error() {
        let keys = PublicKeys::parse_list(PUB).unwrap();
        assert!(matches!(
            keys.verify(b"x", "test-1:AAAA"),
            Err(SignatureError::SignatureInvalid { .. })
        ));
        assert!(matches!(
            keys.verify(b"x", "test-1:!!"),
            Err(SignatureError::SignatureInvalid { .. })
        ));
    }

    #[test]
    fn secret_key_without_colon() {
        assert_eq!(
            SecretKey::parse("abc").err(),
            Some(SignatureError::SecretKeyCorrupt)
        );
        assert_eq!(
            SecretKey::parse(":abc").err(),
            Some(SignatureError::SecretKeyCorrupt)
        );
        assert_eq!(
            SecretKey::parse("name:").err(),
            Some(SignatureError::SecretKeyCorrupt)
        );
    }

    #[test]
    fn secret_key_wrong_length_names_only_the_key() {
        let err = SecretKey::parse("k:c2VjcmV0c2VjcmV0").unwrap_err();
        assert!(matches!(&err, SignatureError::SecretKeyInvalid { name, .. } if name == "k"));
        assert!(!err.to_string().contains("c2VjcmV0c2VjcmV0"));
    }

    #[test]
    fn secret_key_bad_char_does_not_leak() {
        let err = SecretKey::parse("k:Nvn6NRB7SAHV$jEvq").unwrap_err();
        assert!(!err.to_string().contains("Nvn6NRB7"), "{err}");
    }

    #[test]
    fn secret_key_mismatched_halves() {
        let mut bytes = SecretKey::parse(SEC).unwrap().key.to_keypair_bytes();
        bytes[40] ^= 1;
        let s = format!("test-1:{}", BASE64.encode(&bytes));
        assert!(matches!(
            SecretKey::parse(&s),
            Err(SignatureError::SecretKeyInvalid { .. })
        ));
    }

    #[test]
    fn public_key_wrong_length() {
        assert!(matches!(
            PublicKey::parse("k:AAAA"),
            Err(SignatureError::PublicKeyInvalid { key, .. }) if key == "k:AAAA"
        ));
        assert!(matches!(
            PublicKey::parse("k"),
            Err(SignatureError::PublicKeyCorrupt(_))
        ));
    }

    #[test]
    fn bad_key_names() {
        assert!(SecretKey::generate("").is_err());
        assert!(SecretKey::generate("a:b").is_err());
    }

    #[test]
    fn first_key_with_a_name_wins() {
        let a = SecretKey::from_seed("n", &[1; 32]).unwrap();
        let b = SecretKey::from_seed("n", &[2; 32]).unwrap();
        let keys: PublicKeys = [a.to_public_key(), b.to_public_key()].into_iter().collect();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.get("n"), Some(&a.to_public_key()));
    }

    #[test]
    fn nix_base64_quirks() {
        assert_eq!(nix_base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(nix_base64_decode("aGk").unwrap(), b"hi");
        assert_eq!(nix_base64_decode("aG\nk=ignored!").unwrap(), b"hi");
        assert_eq!(nix_base64_decode("a Gk"), Err(' '));
    }

    proptest! {
        #[test]
        fn key_parsers_never_panic(s in "\\PC*") {
            let _ = SecretKey::parse(&s);
            let _ = PublicKey::parse(&s);
            let _ = Signature::parse(&s);
            let _ = PublicKeys::parse_list(&s);
        }

        #[test]
        fn named_base64_never_panics(name in "[a-z:.-]{0,8}", b in "[A-Za-z0-9+/=\n]{0,100}") {
            let s = format!("{name}:{b}");
            let _ = SecretKey::parse(&s);
            let _ = PublicKey::parse(&s);
            let keys = PublicKeys::parse_list(PUB).unwrap();
            let _ = keys.verify(b"x", &s);
        }

        #[test]
        fn sign_verify_round_trip(seed in any::<[u8; 32]>(), data in any::<Vec<u8>>()) {
            let k = SecretKey::from_seed("p", &seed).unwrap();
            let keys: PublicKeys = [k.to_public_key()].into_iter().collect();
            prop_assert_eq!(keys.verify(&data, &k.sign(&data)), Ok(true));
            let k2 = SecretKey::parse(&k.to_key_file()).unwrap();
            prop_assert_eq!(k2.to_key_file(), k.to_key_file());
        }
    }
}
