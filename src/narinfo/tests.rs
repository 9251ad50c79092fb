//! Unit tests of narinfo parsing, printing, fingerprints and signatures. The test
//! vectors in `tests/data/narinfo/` were written by `nix copy` (Nix 2.8.0) with store
//! dir `/tmp/nexp/store` and the throwaway key `test-1`.

use super::*;
use crate::content_address::FileIngestionMethod;
use crate::hash::HashAlgo;
use crate::realisation::Realisation;
use crate::signature::{check_realisation_signatures, sign_realisation, PublicKey};
use proptest::prelude::*;

const SEC: &str = "test-1:Nvn6NRB7SAHVjEvqBqkeFyPFatKtlwQ4gSHv4gtbDZ0uM+PLlZ3Nz2SoWC20BCAHiyjXOUmXx2l8sz/WUZoNtQ==";

fn data(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/narinfo")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn sd() -> StoreDir {
    StoreDir::new("/tmp/nexp/store").unwrap()
}

fn pub_keys() -> PublicKeys {
    PublicKeys::parse_list(&data("test-1.pub")).unwrap()
}

const A: &str = "rl8l1ibjjkxk941ivp6kwvj3k8mxypgr";
const B: &str = "m261i4kd54vxdi0vmrv0rg0r31a7b532";
const C: &str = "i6k3ghpcd6shh28q8vvk5h06f1r3rdqd";

fn all_files() -> Vec<String> {
    let mut v = vec![];
    for p in [A, B, C] {
        for c in ["xz", "zstd", "bzip2", "none"] {
            v.push(format!("{p}-{c}.narinfo"));
        }
    }
    v
}

/// A minimal valid narinfo; tests replace one line to make it bad.
const MINIMAL: &str = "StorePath: /tmp/nexp/store/rl8l1ibjjkxk941ivp6kwvj3k8mxypgr-a
URL: nar/x.nar
NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h
NarSize: 120
";

fn with(line_from: &str, line_to: &str) -> String {
    assert!(MINIMAL.contains(line_from));
    MINIMAL.replace(line_from, line_to)
}

#[test]
fn nix_written_narinfos_round_trip() {
    for f in all_files() {
        let text = data(&f);
        let ni = NarInfo::parse(&text, &sd()).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(ni.to_string(&sd()), text, "{f}");
    }
}

#[test]
fn parsed_fields() {
    let ni = NarInfo::parse(&data(&format!("{C}-xz.narinfo")), &sd()).unwrap();
    assert_eq!(ni.store_path.base_name(), format!("{C}-c"));
    assert_eq!(ni.compression, "xz");
    assert_eq!(ni.file_size, Some(176));
    assert_eq!(ni.nar_size, 168);
    assert_eq!(
        ni.url,
        "nar/1449j0nd8a5fliiyifj8kqyyl9vnrx58vjcy91xn244b2gjhyzji.nar.xz"
    );
    assert_eq!(
        ni.references
            .iter()
            .map(|r| r.base_name())
            .collect::<Vec<_>>(),
        vec![format!("{B}-b")]
    );
    assert_eq!(
        ni.deriver.as_ref().map(|d| d.base_name()),
        Some("fpy29hqlir04zwpdnnyndakxmgfqmkay-c.drv")
    );
    assert!(matches!(
        ni.ca,
        Some(ContentAddress::Fixed(FileIngestionMethod::Recursive, _))
    ));
    assert_eq!(ni.signatures.len(), 1);
}

#[test]
fn fingerprint_known_answer() {
    let ni = NarInfo::parse(&data(&format!("{B}-xz.narinfo")), &sd()).unwrap();
    assert_eq!(
        ni.fingerprint(&sd()).unwrap(),
        "1;/tmp/nexp/store/m261i4kd54vxdi0vmrv0rg0r31a7b532-b;\
         sha256:101b019yl6jl7yf4cnxrwmszbcmgc0ny3xir7zpg6rga97cs3xdz;168;\
         /tmp/nexp/store/rl8l1ibjjkxk941ivp6kwvj3k8mxypgr-a"
    );
}

#[test]
fn fingerprint_prints_nar_hash_base32_even_if_read_base16() {
    let hex = HashAlgo::Sha256.digest(b"x");
    let text = with(
        "NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h",
        &format!("NarHash: {}", hex.to_typed_string(Encoding::Base16)),
    );
    let ni = NarInfo::parse(&text, &sd()).unwrap();
    assert_eq!(ni.nar_hash, hex);
    assert!(ni
        .fingerprint(&sd())
        .unwrap()
        .contains(&hex.to_typed_string(Encoding::Base32)));
    // …and the narinfo prints it in base 32, as Nix does.
    assert!(ni
        .to_string(&sd())
        .contains(&hex.to_typed_string(Encoding::Base32)));
}

#[test]
fn resigning_gives_nixs_signature() {
    let key = SecretKey::parse(SEC).unwrap();
    for f in all_files() {
        let signed = NarInfo::parse(&data(&f), &sd()).unwrap();
        let mut ni = signed.clone();
        ni.signatures.clear();
        ni.sign(&sd(), &key).unwrap();
        assert_eq!(ni.signatures, signed.signatures, "{f}");
    }
}

#[test]
fn signatures_verify_with_the_key_and_not_another() {
    let other: PublicKeys = [SecretKey::from_seed("test-1", &[9; 32])
        .unwrap()
        .to_public_key()]
    .into_iter()
    .collect();
    for f in all_files() {
        let ni = NarInfo::parse(&data(&f), &sd()).unwrap();
        assert_eq!(ni.valid_signatures(&sd(), &pub_keys()), Ok(1), "{f}");
        assert_eq!(ni.valid_signatures(&sd(), &other), Ok(0), "{f}");
        assert_eq!(ni.valid_signatures(&sd(), &PublicKeys::new()), Ok(0), "{f}");
    }
}

#[test]
fn tampered_narinfo_does_not_verify() {
    let mut ni = NarInfo::parse(&data(&format!("{A}-xz.narinfo")), &sd()).unwrap();
    ni.nar_size += 1;
    assert_eq!(ni.valid_signatures(&sd(), &pub_keys()), Ok(0));
}

#[test]
fn content_addressed_paths_need_no_signature() {
    let mut c = NarInfo::parse(&data(&format!("{C}-xz.narinfo")), &sd()).unwrap();
    c.signatures.clear();
    assert!(c.is_content_addressed(&sd()));
    assert_eq!(c.check_signatures(&sd(), &PublicKeys::new()), Ok(MAX_SIGS));
    assert_eq!(c.valid_signatures(&sd(), &PublicKeys::new()), Ok(0));
    // A CA claim that does not give the path is not believed.
    let mut a = NarInfo::parse(&data(&format!("{A}-xz.narinfo")), &sd()).unwrap();
    a.ca = c.ca.clone();
    assert!(!a.is_content_addressed(&sd()));
    assert_eq!(a.check_signatures(&sd(), &pub_keys()), Ok(1));
}

#[test]
fn bad_signature_from_trusted_key_is_an_error() {
    let mut ni = NarInfo::parse(&data(&format!("{A}-xz.narinfo")), &sd()).unwrap();
    ni.signatures.insert("test-1:AAAA".into());
    assert!(matches!(
        ni.valid_signatures(&sd(), &pub_keys()),
        Err(NarInfoError::Signature { .. })
    ));
    let mut ni2 = ni.clone();
    ni2.signatures = ["elsewhere:AAAA".to_string()].into();
    assert_eq!(ni2.valid_signatures(&sd(), &pub_keys()), Ok(0));
}

#[test]
fn realisation_signed_by_nix_verifies() {
    // Built with `secret-key-files` set, so Nix signed the realisation itself.
    let text = data("signed-c.doi");
    let r = Realisation::from_json(text.as_bytes()).unwrap();
    assert_eq!(r.to_json(), text);
    assert_eq!(check_realisation_signatures(&r, &pub_keys()), Ok(1));
    let mut unsigned = r.clone();
    unsigned.signatures.clear();
    sign_realisation(&mut unsigned, &SecretKey::parse(SEC).unwrap());
    assert_eq!(unsigned.signatures, r.signatures);
}

#[test]
fn minimal_defaults() {
    let ni = NarInfo::parse(MINIMAL, &sd()).unwrap();
    assert_eq!(ni.compression, "bzip2");
    assert_eq!(ni.file_hash, None);
    assert_eq!(ni.file_size, None);
    assert!(ni.references.is_empty());
    assert_eq!(ni.deriver, None);
    assert_eq!(ni.ca, None);
    assert_eq!(
        ni.to_string(&sd()),
        "StorePath: /tmp/nexp/store/rl8l1ibjjkxk941ivp6kwvj3k8mxypgr-a\n\
         URL: nar/x.nar\nCompression: bzip2\n\
         NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h\n\
         NarSize: 120\nReferences: \n"
    );
}

#[test]
fn empty_compression_means_bzip2() {
    let ni = NarInfo::parse(&format!("{MINIMAL}Compression: \n"), &sd()).unwrap();
    assert_eq!(ni.compression, "bzip2");
}

#[test]
fn unknown_fields_are_ignored() {
    let ni = NarInfo::parse(&format!("Frobnicate: yes\n{MINIMAL}X:\n"), &sd()).unwrap();
    assert_eq!(ni, NarInfo::parse(MINIMAL, &sd()).unwrap());
}

#[test]
fn system_field() {
    let text = format!("{MINIMAL}System: x86_64-linux\n");
    let ni = NarInfo::parse(&text, &sd()).unwrap();
    assert_eq!(ni.system.as_deref(), Some("x86_64-linux"));
    assert!(ni
        .to_string(&sd())
        .ends_with("References: \nSystem: x86_64-linux\n"));
}

#[test]
fn unknown_deriver_means_none() {
    let ni = NarInfo::parse(&format!("{MINIMAL}Deriver: unknown-deriver\n"), &sd()).unwrap();
    assert_eq!(ni.deriver, None);
}

#[test]
fn sigs_are_a_sorted_set() {
    let ni = NarInfo::parse(&format!("{MINIMAL}Sig: b:2\nSig: a:1\nSig: b:2\n"), &sd()).unwrap();
    assert_eq!(ni.signatures.iter().collect::<Vec<_>>(), ["a:1", "b:2"]);
    assert!(ni.to_string(&sd()).ends_with("Sig: a:1\nSig: b:2\n"));
}

#[test]
fn references_with_extra_spaces() {
    let refs = format!("References:  {B}-b  {A}-a \n");
    let ni = NarInfo::parse(&format!("{MINIMAL}{refs}"), &sd()).unwrap();
    assert_eq!(ni.references.len(), 2);
    // printed sorted by base name, single spaces
    assert!(ni
        .to_string(&sd())
        .contains(&format!("References: {B}-b {A}-a\n")));
}

#[test]
fn references_twice_is_an_error() {
    let text = format!("{MINIMAL}References: {A}-a\nReferences: {B}-b\n");
    assert_eq!(
        NarInfo::parse(&text, &sd()),
        Err(NarInfoError::DuplicateField {
            field: "References",
            line: 6
        })
    );
}

#[test]
fn empty_references_then_references_is_fine() {
    let text = format!("{MINIMAL}References: \nReferences: {B}-b\n");
    assert_eq!(NarInfo::parse(&text, &sd()).unwrap().references.len(), 1);
}

#[test]
fn ca_twice_is_an_error() {
    let ca = "CA: fixed:r:sha256:1skyqi2gdh672lqda1mwfl7y43mca9iwdkmlx2p6ffs7k187yfiy\n";
    assert!(matches!(
        NarInfo::parse(&format!("{MINIMAL}{ca}{ca}"), &sd()),
        Err(NarInfoError::DuplicateField { field: "CA", .. })
    ));
}

#[test]
fn empty_ca_means_none() {
    let ni = NarInfo::parse(&format!("{MINIMAL}CA: \n"), &sd()).unwrap();
    assert_eq!(ni.ca, None);
}

#[test]
fn bad_ca() {
    assert!(matches!(
        NarInfo::parse(&format!("{MINIMAL}CA: nonsense\n"), &sd()),
        Err(NarInfoError::BadCa { value, .. }) if value == "nonsense"
    ));
}

#[test]
fn missing_store_path() {
    let text = MINIMAL
        .lines()
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    assert_eq!(
        NarInfo::parse(&text, &sd()),
        Err(NarInfoError::MissingField("StorePath"))
    );
}

#[test]
fn missing_nar_hash() {
    assert_eq!(
        NarInfo::parse(
            &with(
                "NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h\n",
                ""
            ),
            &sd()
        ),
        Err(NarInfoError::MissingField("NarHash"))
    );
}

#[test]
fn missing_url() {
    assert_eq!(
        NarInfo::parse(&with("URL: nar/x.nar\n", ""), &sd()),
        Err(NarInfoError::MissingField("URL"))
    );
}

#[test]
fn empty_url() {
    assert_eq!(
        NarInfo::parse(&with("URL: nar/x.nar\n", "URL: \n"), &sd()),
        Err(NarInfoError::EmptyUrl)
    );
}

#[test]
fn missing_nar_size() {
    assert_eq!(
        NarInfo::parse(&with("NarSize: 120\n", ""), &sd()),
        Err(NarInfoError::MissingField("NarSize"))
    );
}

#[test]
fn zero_nar_size() {
    assert_eq!(
        NarInfo::parse(&with("NarSize: 120", "NarSize: 0"), &sd()),
        Err(NarInfoError::ZeroNarSize)
    );
}

#[test]
fn negative_nar_size() {
    assert_eq!(
        NarInfo::parse(&with("NarSize: 120", "NarSize: -1"), &sd()),
        Err(NarInfoError::BadNumber {
            field: "NarSize",
            value: "-1".into()
        })
    );
}

#[test]
fn overflowing_file_size() {
    assert!(matches!(
        NarInfo::parse(&format!("{MINIMAL}FileSize: 18446744073709551616\n"), &sd()),
        Err(NarInfoError::BadNumber {
            field: "FileSize",
            ..
        })
    ));
}

#[test]
fn bad_nar_hash() {
    assert!(matches!(
        NarInfo::parse(&with("sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h", "sha256:abc"), &sd()),
        Err(NarInfoError::BadHash { field: "NarHash", value, .. }) if value == "sha256:abc"
    ));
}

#[test]
fn bad_file_hash() {
    assert!(matches!(
        NarInfo::parse(&format!("{MINIMAL}FileHash: md6:00\n"), &sd()),
        Err(NarInfoError::BadHash {
            field: "FileHash",
            ..
        })
    ));
}

#[test]
fn store_path_outside_store_dir() {
    assert!(matches!(
        NarInfo::parse(&with("/tmp/nexp/store/", "/nix/store/"), &sd()),
        Err(NarInfoError::BadStorePath {
            field: "StorePath",
            ..
        })
    ));
}

#[test]
fn bad_reference() {
    assert!(matches!(
        NarInfo::parse(&format!("{MINIMAL}References: not-a-path\n"), &sd()),
        Err(NarInfoError::BadStorePath { field: "References", value, .. }) if value == "not-a-path"
    ));
}

#[test]
fn full_path_as_reference_is_an_error() {
    assert!(matches!(
        NarInfo::parse(
            &format!("{MINIMAL}References: /tmp/nexp/store/{A}-a\n"),
            &sd()
        ),
        Err(NarInfoError::BadStorePath {
            field: "References",
            ..
        })
    ));
}

#[test]
fn bad_deriver() {
    assert!(matches!(
        NarInfo::parse(&format!("{MINIMAL}Deriver: x.drv\n"), &sd()),
        Err(NarInfoError::BadStorePath {
            field: "Deriver",
            ..
        })
    ));
}

#[test]
fn line_without_colon() {
    assert_eq!(
        NarInfo::parse(&format!("{MINIMAL}garbage\n"), &sd()),
        Err(NarInfoError::MalformedLine {
            line: 5,
            text: "garbage".into()
        })
    );
}

#[test]
fn line_without_space_after_colon() {
    assert!(matches!(
        NarInfo::parse(&format!("{MINIMAL}URL:x\n"), &sd()),
        Err(NarInfoError::MalformedLine { line: 5, .. })
    ));
}

#[test]
fn last_line_without_newline() {
    assert_eq!(
        NarInfo::parse(MINIMAL.trim_end(), &sd()),
        Err(NarInfoError::MissingNewline {
            line: 4,
            text: "NarSize: 120".into()
        })
    );
}

#[test]
fn empty_input() {
    assert_eq!(
        NarInfo::parse("", &sd()),
        Err(NarInfoError::MissingField("StorePath"))
    );
}

#[test]
fn crlf_is_not_accepted_as_a_number() {
    assert!(NarInfo::parse(&MINIMAL.replace('\n', "\r\n"), &sd()).is_err());
}

#[test]
fn fingerprint_needs_nar_size() {
    let mut ni = NarInfo::parse(MINIMAL, &sd()).unwrap();
    ni.nar_size = 0;
    assert!(matches!(
        ni.fingerprint(&sd()),
        Err(NarInfoError::UnknownNarSize(_))
    ));
    assert!(ni.sign(&sd(), &SecretKey::parse(SEC).unwrap()).is_err());
}

#[test]
fn public_key_file_from_nix() {
    let k = PublicKey::parse(&data("test-1.pub")).unwrap();
    assert_eq!(k.to_string(), data("test-1.pub"));
}

fn arb_store_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9+._?=-]{1,20}")
        .prop_filter_map("valid name", |(d, n)| StorePath::from_digest(&d, &n).ok())
}

fn arb_hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(|d| Hash::new(HashAlgo::Sha256, &d).expect("32 bytes"))
}

prop_compose! {
    fn arb_narinfo()(
        store_path in arb_store_path(),
        url in "[a-z0-9/._-]{1,30}",
        compression in prop::sample::select(vec!["xz", "zstd", "bzip2", "none", "br", "gzip"]),
        file_hash in prop::option::of(arb_hash()),
        file_size in prop::option::of(any::<u64>()),
        nar_hash in arb_hash(),
        nar_size in 1..u64::MAX,
        references in prop::collection::btree_set(arb_store_path(), 0..4),
        deriver in prop::option::of(arb_store_path()),
        system in prop::option::of("[a-z0-9_-]{1,12}"),
        signatures in prop::collection::btree_set("[a-z0-9-]{1,8}:[A-Za-z0-9+/]{4,20}=?", 0..3),
        ca in prop::option::of(arb_hash().prop_map(|h| ContentAddress::Fixed(FileIngestionMethod::Recursive, h))),
    ) -> NarInfo {
        NarInfo {
            store_path, url, compression: compression.to_owned(), file_hash, file_size,
            nar_hash, nar_size, references, deriver, system, signatures, ca,
        }
    }
}

proptest! {
    #[test]
    fn generated_narinfo_round_trips(ni in arb_narinfo()) {
        let text = ni.to_string(&sd());
        let back = NarInfo::parse(&text, &sd()).unwrap();
        prop_assert_eq!(&back, &ni);
        prop_assert_eq!(back.to_string(&sd()), text);
    }

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC*") {
        let _ = NarInfo::parse(&s, &sd());
    }

    #[test]
    fn arbitrary_lines_never_panic(lines in prop::collection::vec(
        (prop::sample::select(vec!["StorePath", "URL", "Compression", "FileHash", "FileSize",
            "NarHash", "NarSize", "References", "Deriver", "System", "Sig", "CA", "X"]),
         "[ -~]{0,60}"),
        0..14,
    )) {
        let text: String = lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        if let Ok(ni) = NarInfo::parse(&format!("{MINIMAL}{text}"), &sd()) {
            let _ = ni.to_string(&sd());
            let _ = ni.check_signatures(&sd(), &pub_keys());
        }
    }

    #[test]
    fn signed_generated_narinfo_verifies(ni in arb_narinfo(), seed in any::<[u8; 32]>()) {
        let key = SecretKey::from_seed("gen-1", &seed).unwrap();
        let mut ni = ni;
        ni.signatures.clear();
        ni.sign(&sd(), &key).unwrap();
        let keys: PublicKeys = [key.to_public_key()].into_iter().collect();
        prop_assert_eq!(ni.valid_signatures(&sd(), &keys), Ok(1));
    }
}
