//! Unix domain sockets at paths of any length. `sun_path` holds 107 bytes, and
//! a deep state directory (a test root, say) gives a longer
//! `gc-socket/socket`; Nix binds and connects to such a path from inside its
//! directory. drover, with threads sharing one working directory, reaches it
//! instead through the directory opened as a file descriptor:
//! `/proc/self/fd/<fd>/<name>` names the same socket in a few bytes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The longest path `sun_path` takes (one byte is the terminating NUL).
const MAX_SUN_PATH: usize = 107;

/// Runs `f` on a path naming `path` short enough for `sun_path`.
fn with_short_path<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().as_bytes().len() <= MAX_SUN_PATH {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    let r = f(&short);
    drop(dir);
    r
}

/// `UnixListener::bind`, for a path of any length.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    with_short_path(path, |p| UnixListener::bind(p))
}

/// `UnixStream::connect`, for a path of any length.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    with_short_path(path, |p| UnixStream::connect(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_socket_deeper_than_sun_path_is_bound_and_reached() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("socket");
        assert!(UnixListener::bind(&path).is_err(), "too long for sun_path");
        let listener = bind(&path).unwrap();
        assert!(path.exists(), "bound at its real path");
        let mut client = connect(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }
}
