//! Decompression of NARs by a narinfo's `Compression` field, as a stream.
//!
//! Nix 2.8 writes `xz` (the default, `.nar.xz`), `zstd` (`.nar.zst`), `bzip2`
//! (`.nar.bz2`), `br` (`.nar.br`), `none` (`.nar`) and `gzip` — the latter really
//! gzip-compressed but named `.nar` (a 2.8 quirk), so the method always comes from
//! the `Compression` field, never from the file name. Concatenated streams (multi-
//! member gzip, multi-stream xz/bzip2) are read through.

use std::io::{BufRead, BufReader, Read};

use super::BinaryCacheError;

/// Bytes read from the cache per `read` call. The readers' own defaults (8 KiB) made
/// one system call per 8 KiB of a NAR; this keeps big NARs to a few thousand.
pub const INPUT_BUF: usize = 256 * 1024;

/// Buffer between the decompressor and the NAR parser, which reads 8-byte tokens: they
/// come from memory, while file contents bigger than it bypass it.
pub const OUTPUT_BUF: usize = 64 * 1024;

/// The compression methods Nix knows, by their `Compression` name.
pub const METHODS: &[&str] = &["none", "xz", "zstd", "bzip2", "br", "gzip"];

/// Wraps `compressed` in a decoder for `method` (empty means `none`), buffered on both
/// sides.
///
/// The xz decoder skips the stream's own integrity check (CRC64/SHA-256 of the
/// uncompressed data): a copy checks the `NarHash` of every decompressed byte (and the
/// `FileHash` of every compressed one) before anything is registered, so the check
/// added nothing but a quarter of the CPU time of an xz substitution.
pub fn decompressor<'a>(
    method: &str,
    compressed: Box<dyn Read + 'a>,
) -> Result<Box<dyn Read + 'a>, BinaryCacheError> {
    let input = BufReader::with_capacity(INPUT_BUF, compressed);
    Ok(match decoder(method, input)? {
        Decoder::None(input) => Box::new(input),
        d => Box::new(BufReader::with_capacity(OUTPUT_BUF, d)),
    })
}

/// A decoder for one of [`METHODS`] over a buffered input, without buffers of its
/// own: [`Send`] when its input is (the pipelined unpacking runs it on a thread of
/// its own).
pub enum Decoder<R: BufRead> {
    None(R),
    Xz(liblzma::bufread::XzDecoder<R>),
    Bzip2(bzip2::bufread::MultiBzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
    Br(Box<brotli::Decompressor<R>>),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Decoder::None(r) => r.read(buf),
            Decoder::Xz(r) => r.read(buf),
            Decoder::Bzip2(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
            Decoder::Br(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
        }
    }
}

/// The decoder of `method` (empty means `none`) reading `input`; the xz decoder
/// skips the stream's own check, as [`decompressor`] says.
pub fn decoder<R: BufRead>(method: &str, input: R) -> Result<Decoder<R>, BinaryCacheError> {
    let failed = |e: &dyn std::fmt::Display| BinaryCacheError::Decompression {
        method: method.to_owned(),
        message: e.to_string(),
    };
    Ok(match method {
        "" | "none" => Decoder::None(input),
        "xz" => {
            let stream = liblzma::stream::Stream::new_stream_decoder(
                u64::MAX,
                liblzma::stream::CONCATENATED | liblzma::stream::IGNORE_CHECK,
            )
            .map_err(|e| failed(&e))?;
            Decoder::Xz(liblzma::bufread::XzDecoder::new_stream(input, stream))
        }
        "bzip2" => Decoder::Bzip2(bzip2::bufread::MultiBzDecoder::new(input)),
        "zstd" => {
            Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(input).map_err(|e| failed(&e))?)
        }
        "br" => Decoder::Br(Box::new(brotli::Decompressor::new(input, OUTPUT_BUF))),
        "gzip" => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(input)),
        other => return Err(BinaryCacheError::UnknownCompression(other.to_owned())),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Compresses `data` with `method`, for tests.
    pub(crate) fn compress(method: &str, data: &[u8]) -> Vec<u8> {
        match method {
            "none" => data.to_vec(),
            "xz" => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "bzip2" => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "zstd" => zstd::stream::encode_all(data, 3).unwrap(),
            "br" => {
                let mut out = Vec::new();
                {
                    let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    e.write_all(data).unwrap();
                }
                out
            }
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            m => panic!("no such method {m}"),
        }
    }

    fn decompress(method: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decompressor(method, Box::new(data))
            .unwrap()
            .read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn every_method_round_trips() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for m in METHODS {
            let c = compress(m, &data);
            assert_eq!(decompress(m, &c).unwrap(), data, "{m}");
        }
    }

    #[test]
    fn truncated_streams_fail() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect();
        for m in METHODS.iter().filter(|m| **m != "none") {
            let c = compress(m, &data);
            let cut = &c[..c.len() / 2];
            match decompress(m, cut) {
                Err(_) => {}
                Ok(d) => assert!(d.len() < data.len(), "{m} decompressed a truncated stream"),
            }
        }
    }

    #[test]
    fn unknown_method() {
        let e = decompressor("lz4", Box::new(&b""[..])).err().unwrap();
        assert_eq!(e.to_string(), "unknown compression method 'lz4'");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for m in METHODS.iter().filter(|m| **m != "none") {
            assert!(
                decompress(m, b"definitely not compressed data").is_err(),
                "{m}"
            );
        }
    }
}
