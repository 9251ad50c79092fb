//! A small HTTP/1.1 server on 127.0.0.1 for tests: it serves a directory (a binary
//! cache, usually) and misbehaves as a test scripts it.
//!
//! * [`HttpServer::start`] binds a free port and serves every file below a directory
//!   (`GET /nar/x.nar.xz` → `<dir>/nar/x.nar.xz`; `HEAD` gets the same headers without
//!   the body; a missing file is `404 Not Found`).
//! * A [`Policy`] (set at start with [`HttpServer::with_policy`] or later with
//!   [`HttpServer::set_policy`]) decides per [`Request`] what to do instead: an
//!   [`Action`] (serve, 404, any status, a body cut short, no answer at all, a
//!   body that stops halfway and hangs).
//! * Every request is logged as `"<METHOD> <path>"`, in the order the requests were
//!   read ([`HttpServer::take_requests`]), and counted ([`HttpServer::hits`]).
//! * Connections are kept alive (clients such as ureq reuse them) unless the request
//!   says `Connection: close` or [`HttpServer::set_keep_alive`] turned that off; a
//!   truncated body always ends its connection.
//! * Dropping the server stops it: the port is closed and every open connection
//!   (also one that hangs) is shut down.
//!
//! Used by the library's integration tests and, through `#[path]`, by the CLI tests
//! of the actor crate.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One request as the policy sees it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET` or `HEAD` (or whatever the client sent).
    pub method: String,
    /// The request target as sent, e.g. `/nix-cache-info` or `/nar/….nar.xz`.
    pub path: String,
    /// The file below the served directory that `path` names (without any query);
    /// it need not exist.
    pub file: PathBuf,
}

impl Request {
    /// Whether [`file`](Self::file) exists (and is a regular file).
    pub fn exists(&self) -> bool {
        self.file.is_file()
    }

    /// The size of [`file`](Self::file) in bytes (0 when it does not exist).
    pub fn file_len(&self) -> usize {
        std::fs::metadata(&self.file).map_or(0, |m| m.len() as usize)
    }
}

/// What the server does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `200 OK` with the file, or `404 Not Found` when there is none.
    Serve,
    /// `404 Not Found`, whether the file exists or not.
    NotFound,
    /// This status line (code and reason phrase) with an empty body.
    Status(u16, &'static str),
    /// `200 OK` announcing the whole file (`Content-Length`), but only its first
    /// bytes (at most this many) are sent before the connection is closed; `404`
    /// when there is no file.
    Truncate(usize),
    /// No answer: the connection stays open, silent, until the client gives up or
    /// the server is dropped.
    Hang,
    /// `200 OK` announcing the whole file, its first bytes (at most this many)
    /// sent, then silence as with [`Action::Hang`]: a client caught mid-download.
    Stall(usize),
}

impl Action {
    /// `500 Internal Server Error`.
    pub const INTERNAL_SERVER_ERROR: Action = Action::Status(500, "Internal Server Error");
}

/// Decides, per request, what the server does.
pub type Policy = Arc<dyn Fn(&Request) -> Action + Send + Sync>;

/// State shared by the server handle, the accept loop and the connections.
struct Shared {
    dir: PathBuf,
    policy: Mutex<Policy>,
    log: Mutex<Vec<String>>,
    hits: AtomicUsize,
    keep_alive: AtomicBool,
    stopping: AtomicBool,
    /// Clones of the open connections by number, shut down on drop.
    conns: Mutex<HashMap<usize, TcpStream>>,
}

/// A running server; see the module documentation. Stops when dropped.
pub struct HttpServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `dir` as it is ([`Action::Serve`] for every request).
    pub fn start(dir: impl Into<PathBuf>) -> HttpServer {
        HttpServer::with_policy(dir, |_| Action::Serve)
    }

    /// Serves `dir`, answering each request as `policy` says.
    pub fn with_policy(
        dir: impl Into<PathBuf>,
        policy: impl Fn(&Request) -> Action + Send + Sync + 'static,
    ) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            dir: dir.into(),
            policy: Mutex::new(Arc::new(policy)),
            log: Mutex::default(),
            hits: AtomicUsize::new(0),
            keep_alive: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            conns: Mutex::default(),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for (id, conn) in listener.incoming().enumerate() {
                if s.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if let Ok(clone) = conn.try_clone() {
                    s.conns.lock().unwrap().insert(id, clone);
                }
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve_connection(&conn, &s);
                    // The clone kept for `drop` must not keep the socket open.
                    let _ = conn.shutdown(Shutdown::Both);
                    s.conns.lock().unwrap().remove(&id);
                });
            }
        });
        HttpServer {
            shared,
            addr,
            accept: Some(accept),
        }
    }

    /// The base URL, `http://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the following requests as `policy` says.
    pub fn set_policy(&self, policy: impl Fn(&Request) -> Action + Send + Sync + 'static) {
        *self.shared.policy.lock().unwrap() = Arc::new(policy);
    }

    /// Whether responses keep their connection open (the default) or say
    /// `Connection: close` and close it.
    pub fn set_keep_alive(&self, keep_alive: bool) {
        self.shared.keep_alive.store(keep_alive, Ordering::SeqCst);
    }

    /// The requests logged since the last call (or the start), oldest first, each
    /// as `"<METHOD> <path>"` (`GET /nix-cache-info`).
    pub fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.shared.log.lock().unwrap())
    }

    /// How many requests were read since the start (not reset by
    /// [`take_requests`](Self::take_requests)).
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in self.shared.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Answers the requests of one connection until it is closed.
fn serve_connection(conn: &TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or("GET").to_owned();
        let path = words.next().unwrap_or("/").to_owned();
        let mut client_closes = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                client_closes |= name.trim().eq_ignore_ascii_case("connection")
                    && value.trim().eq_ignore_ascii_case("close");
            }
        }
        if s.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let relative = path.split('?').next().unwrap_or("").trim_start_matches('/');
        let request = Request {
            file: s.dir.join(relative),
            method,
            path,
        };
        s.log
            .lock()
            .unwrap()
            .push(format!("{} {}", request.method, request.path));
        s.hits.fetch_add(1, Ordering::SeqCst);
        let policy = s.policy.lock().unwrap().clone();
        let keep_alive = s.keep_alive.load(Ordering::SeqCst) && !client_closes;
        let head = request.method == "HEAD";
        let action = policy(&request);
        let file = || std::fs::read(&request.file).ok();
        let not_found = || respond(conn, (404, "Not Found"), &[], 0, head, keep_alive);
        let closes = match action {
            Action::Hang => {
                // Read (and ignore) until the client or the server's drop closes it.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                return Ok(());
            }
            Action::Serve => match file() {
                Some(body) => respond(conn, (200, "OK"), &body, body.len(), head, keep_alive)?,
                None => not_found()?,
            },
            Action::NotFound => not_found()?,
            Action::Status(code, reason) => {
                respond(conn, (code, reason), &[], 0, head, keep_alive)?
            }
            Action::Stall(n) => match file() {
                Some(body) => {
                    let sent = &body[..n.min(body.len())];
                    respond(conn, (200, "OK"), sent, body.len(), head, true)?;
                    let _ = std::io::copy(&mut reader, &mut std::io::sink());
                    return Ok(());
                }
                None => not_found()?,
            },
            Action::Truncate(n) => match file() {
                Some(body) => {
                    let sent = &body[..n.min(body.len())];
                    respond(conn, (200, "OK"), sent, body.len(), head, keep_alive)?;
                    true
                }
                None => not_found()?,
            },
        };
        if closes {
            return Ok(());
        }
    }
}

/// Writes a response announcing `length` bytes and sending `body` (nothing for
/// `HEAD`); returns whether the connection is to be closed.
fn respond(
    mut conn: &TcpStream,
    (code, reason): (u16, &str),
    body: &[u8],
    length: usize,
    head: bool,
    keep_alive: bool,
) -> std::io::Result<bool> {
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let mut out =
        format!("HTTP/1.1 {code} {reason}\r\nContent-Length: {length}\r\n{connection}\r\n")
            .into_bytes();
    if !head {
        out.extend_from_slice(body);
    }
    conn.write_all(&out)?;
    conn.flush()?;
    Ok(!keep_alive)
}

/// Reads a whole response from a fresh connection (for this module's own tests).
fn fetch(url: &str, method: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut c = TcpStream::connect(addr).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// The directory a test serves: `a.txt` holding `hello`.
fn served_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "hello").unwrap();
    dir
}

#[test]
fn serves_files_heads_and_logs_in_order() {
    let dir = served_dir();
    let server = HttpServer::start(dir.path());
    let url = server.url();
    assert_eq!(
        fetch(&url, "GET", "/a.txt"),
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    assert_eq!(
        fetch(&url, "HEAD", "/a.txt"),
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    );
    assert!(fetch(&url, "GET", "/b.txt").starts_with("HTTP/1.1 404 Not Found\r\n"));
    assert_eq!(
        server.take_requests(),
        ["GET /a.txt", "HEAD /a.txt", "GET /b.txt"]
    );
    assert_eq!(server.take_requests(), Vec::<String>::new());
    assert_eq!(server.hits(), 3);
}

#[test]
fn keeps_connections_alive_and_follows_the_policy() {
    let dir = served_dir();
    let server = HttpServer::with_policy(dir.path(), |r| match r.path.as_str() {
        "/fail" => Action::INTERNAL_SERVER_ERROR,
        "/a.txt" if r.method == "HEAD" => Action::NotFound,
        _ => Action::Truncate(2),
    });
    let mut c = TcpStream::connect(server.url().trim_start_matches("http://")).unwrap();
    // Three requests on one connection; the truncated body ends it.
    c.write_all(
        b"GET /fail HTTP/1.1\r\n\r\nHEAD /a.txt HTTP/1.1\r\n\r\nGET /a.txt HTTP/1.1\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert_eq!(
        out,
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n\
         HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe"
    );
    server.set_policy(|_| Action::Serve);
    server.set_keep_alive(false);
    let mut c = TcpStream::connect(server.url().trim_start_matches("http://")).unwrap();
    c.write_all(b"GET /a.txt HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.ends_with("Connection: close\r\n\r\nhello"), "{out}");
    assert_eq!(server.hits(), 4);
}

#[test]
fn a_hanging_server_stops_on_drop() {
    let dir = served_dir();
    let server = HttpServer::with_policy(dir.path(), |_| Action::Hang);
    let mut c = TcpStream::connect(server.url().trim_start_matches("http://")).unwrap();
    c.write_all(b"GET /a.txt HTTP/1.1\r\n\r\n").unwrap();
    while server.hits() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(server);
    // The hanging connection is closed without an answer. (Whether the port is closed
    // cannot be checked: another server, of this or a concurrent test process, may
    // have been given the freed port at once.)
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    assert!(out.is_empty());
}
