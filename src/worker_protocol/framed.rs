//! Framed streams (Nix's `FramedSource`/`FramedSink`, protocol 1.23 and later):
//! a payload of unknown length sent as frames, each a 64-bit length followed by
//! that many bytes (no padding), ended by a frame of length 0.
//!
//! [`FramedReader`] reads the frames straight into the caller's buffer, so no
//! frame is ever held in memory whole; a frame longer than [`MAX_FRAME_LEN`] is an
//! error. After the consumer is done, [`FramedReader::finish`] skips what it did
//! not read up to the end marker, as Nix's destructor does, so the connection
//! stays in step.

use std::io::{self, Read, Write};

use super::wire::{read_u64, write_u64};
use super::ProtocolError;

/// The longest frame accepted (Nix's sinks send frames of their 32 KiB buffer).
pub const MAX_FRAME_LEN: u64 = 16 << 20;

/// Reads a framed payload from `inner`.
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    /// Bytes of the current frame not yet read.
    left: u64,
    eof: bool,
}

impl<R: Read> FramedReader<R> {
    pub fn new(inner: R) -> FramedReader<R> {
        FramedReader {
            inner,
            left: 0,
            eof: false,
        }
    }

    /// Whether the end marker has been read.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Reads and discards the rest of the payload, through the end marker.
    pub fn finish(mut self) -> Result<R, ProtocolError> {
        io::copy(&mut self, &mut io::sink()).map_err(io_to_protocol)?;
        Ok(self.inner)
    }

    fn next_frame(&mut self) -> Result<(), ProtocolError> {
        let len = read_u64(&mut self.inner)?;
        if len > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLong(len));
        }
        if len == 0 {
            self.eof = true;
        }
        self.left = len;
        Ok(())
    }
}

/// Turns an I/O error of a [`FramedReader`] back into the protocol error it
/// carries, if it carries one.
pub fn io_to_protocol(e: io::Error) -> ProtocolError {
    if e.get_ref().is_some_and(|i| i.is::<ProtocolError>()) {
        let inner = e.into_inner().expect("checked");
        *inner.downcast::<ProtocolError>().expect("checked")
    } else if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::UnexpectedEof("a frame")
    } else {
        ProtocolError::Io("a frame", e)
    }
}

impl<R: Read> Read for FramedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while !self.eof && self.left == 0 {
            self.next_frame()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        if self.eof {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        self.inner.read_exact(&mut buf[..n]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    ProtocolError::UnexpectedEof("a frame"),
                )
            } else {
                e
            }
        })?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes a framed payload to `inner`: each `write` is one frame (an empty
/// write sends nothing); [`FramedWriter::finish`] sends the end marker.
#[derive(Debug)]
pub struct FramedWriter<W: Write> {
    inner: W,
}

impl<W: Write> FramedWriter<W> {
    pub fn new(inner: W) -> FramedWriter<W> {
        FramedWriter { inner }
    }

    /// Sends the end marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        write_u64(&mut self.inner, 0)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FramedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write_u64(&mut self.inner, buf.len() as u64)?;
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(chunks: &[&[u8]]) -> Vec<u8> {
        let mut w = FramedWriter::new(Vec::new());
        for c in chunks {
            w.write_all(c).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn frames_are_length_and_bytes_without_padding() {
        let v = framed(&[b"abc", b"de"]);
        assert_eq!(
            v,
            b"\x03\0\0\0\0\0\0\0abc\x02\0\0\0\0\0\0\0de\0\0\0\0\0\0\0\0".to_vec()
        );
    }

    #[test]
    fn reader_joins_frames_and_leaves_the_rest() {
        let mut v = framed(&[b"hello ", b"world"]);
        v.extend_from_slice(b"after");
        let mut r = FramedReader::new(&v[..]);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
        let rest = r.finish().unwrap();
        assert_eq!(rest, b"after");
    }

    #[test]
    fn finish_skips_unread_frames() {
        let mut v = framed(&[b"xxxxxxxx", b"yyyy"]);
        v.extend_from_slice(b"next");
        let mut r = FramedReader::new(&v[..]);
        let mut b = [0u8; 3];
        r.read_exact(&mut b).unwrap();
        assert_eq!(r.finish().unwrap(), b"next");
    }

    #[test]
    fn oversized_frame_is_an_error() {
        let v = (MAX_FRAME_LEN + 1).to_le_bytes();
        let mut r = FramedReader::new(&v[..]);
        let e = r.read(&mut [0u8; 10]).unwrap_err();
        assert!(matches!(io_to_protocol(e), ProtocolError::FrameTooLong(_)));
    }

    #[test]
    fn truncated_frame_is_eof() {
        let mut v = framed(&[b"abcdef"]);
        v.truncate(11);
        let r = FramedReader::new(&v[..]);
        assert!(matches!(r.finish(), Err(ProtocolError::UnexpectedEof(_))));
    }
}
