//! `netrc` files: the credentials Nix 2.8 hands to curl for HTTP(S) caches.
//!
//! Nix 2.8 points curl at its `netrc-file` setting (default
//! `$NIX_CONF_DIR/netrc`, i.e. `/etc/nix/netrc`) with `CURL_NETRC_OPTIONAL`: a
//! missing file means no credentials, and credentials in the URL win. curl then
//! sends HTTP Basic authentication for a request whose host matches an entry.
//!
//! The format, as curl 7.x reads it:
//!
//! * The file is a stream of tokens separated by any whitespace (spaces, tabs,
//!   newlines): an entry may span lines, and several entries may share one.
//! * `machine <host>` starts an entry for `<host>` (compared without regard to
//!   case); `default` starts the entry for every host no `machine` entry matched.
//! * Inside an entry, `login <name>` and `password <secret>` set the credentials;
//!   `account <x>` is read and ignored.
//! * `macdef <name>` starts a macro definition: everything up to the next empty
//!   line is skipped.
//! * A token may be quoted (`"a secret"`, curl ≥ 7.84): inside the quotes `\"`,
//!   `\\`, `\n`, `\r` and `\t` are escapes and whitespace is part of the token.
//! * Other tokens outside an entry are ignored, as curl ignores them.
//!
//! The first `machine` entry naming the host wins; the `default` entry applies
//! otherwise. A file that breaks off inside a quote or right after a keyword is an
//! error naming the file and line.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a netrc file could not be read.
#[derive(Debug, Error)]
pub enum NetrcError {
    #[error("reading netrc file '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("netrc file '{path}', line {line}: unterminated quoted string")]
    UnterminatedQuote { path: PathBuf, line: usize },
    #[error("netrc file '{path}', line {line}: '{keyword}' without a value")]
    MissingValue {
        path: PathBuf,
        line: usize,
        keyword: String,
    },
}

/// The user name and password of one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub login: String,
    pub password: String,
}

/// One entry: `machine <host>` or `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetrcEntry {
    /// `None` for the `default` entry.
    pub machine: Option<String>,
    pub credentials: Credentials,
}

/// The entries of a netrc file, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Netrc {
    pub entries: Vec<NetrcEntry>,
}

/// A token and the (1-based) line it starts on.
struct Token {
    text: String,
    line: usize,
}

/// Splits `text` into tokens, skipping `macdef` bodies.
fn tokenize(path: &Path, text: &str) -> Result<Vec<Token>, NetrcError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    // After `macdef <name>`: skip to the first empty line.
    let mut skip_macro = false;
    loop {
        if skip_macro {
            // Skip the rest of the `macdef` line, then lines up to an empty one.
            let mut at_line_start = false;
            loop {
                match chars.next() {
                    None => break,
                    Some('\n') => {
                        line += 1;
                        if at_line_start {
                            break;
                        }
                        at_line_start = true;
                    }
                    Some(_) => at_line_start = false,
                }
            }
            skip_macro = false;
            continue;
        }
        let c = match chars.next() {
            None => break,
            Some(c) => c,
        };
        if c == '\n' {
            line += 1;
            continue;
        }
        if c.is_whitespace() {
            continue;
        }
        let start = line;
        let mut tok = String::new();
        if c == '"' {
            loop {
                match chars.next() {
                    None => {
                        return Err(NetrcError::UnterminatedQuote {
                            path: path.to_owned(),
                            line: start,
                        })
                    }
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => tok.push('\n'),
                        Some('r') => tok.push('\r'),
                        Some('t') => tok.push('\t'),
                        Some(e) => {
                            if e == '\n' {
                                line += 1;
                            }
                            tok.push(e)
                        }
                        None => {
                            return Err(NetrcError::UnterminatedQuote {
                                path: path.to_owned(),
                                line: start,
                            })
                        }
                    },
                    Some(ch) => {
                        if ch == '\n' {
                            line += 1;
                        }
                        tok.push(ch)
                    }
                }
            }
        } else {
            tok.push(c);
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                tok.push(ch);
                chars.next();
            }
        }
        let is_macdef = tokens
            .last()
            .is_some_and(|t: &Token| t.text == "macdef" && c != '"');
        tokens.push(Token {
            text: tok,
            line: start,
        });
        // `macdef <name>`: the name was just read; its body follows.
        if is_macdef {
            skip_macro = true;
        }
    }
    Ok(tokens)
}

impl Netrc {
    /// Parses the text of a netrc file; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Netrc, NetrcError> {
        let tokens = tokenize(path, text)?;
        let mut entries: Vec<NetrcEntry> = Vec::new();
        let mut in_entry = false;
        let mut it = tokens.iter();
        while let Some(t) = it.next() {
            let mut value = |keyword: &str| {
                it.next()
                    .map(|v| v.text.clone())
                    .ok_or_else(|| NetrcError::MissingValue {
                        path: path.to_owned(),
                        line: t.line,
                        keyword: keyword.to_owned(),
                    })
            };
            match t.text.as_str() {
                "machine" => {
                    let host = value("machine")?;
                    entries.push(NetrcEntry {
                        machine: Some(host),
                        credentials: Credentials::default(),
                    });
                    in_entry = true;
                }
                "default" => {
                    entries.push(NetrcEntry {
                        machine: None,
                        credentials: Credentials::default(),
                    });
                    in_entry = true;
                }
                "login" | "password" | "account" => {
                    let keyword = t.text.clone();
                    let v = value(&keyword)?;
                    if let (true, Some(e)) = (in_entry, entries.last_mut()) {
                        match keyword.as_str() {
                            "login" => e.credentials.login = v,
                            "password" => e.credentials.password = v,
                            _ => {}
                        }
                    }
                }
                // `macdef <name>`: the tokenizer already skipped the body.
                "macdef" => {
                    value("macdef")?;
                }
                _ => {}
            }
        }
        Ok(Netrc { entries })
    }

    /// Reads the netrc file at `path`; `Ok(None)` when it does not exist (as curl's
    /// `CURL_NETRC_OPTIONAL`).
    pub fn read(path: &Path) -> Result<Option<Netrc>, NetrcError> {
        match std::fs::read(path) {
            Ok(bytes) => Netrc::parse(path, &String::from_utf8_lossy(&bytes)).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NetrcError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The credentials for `host`: the first `machine` entry naming it (ignoring
    /// case), else the `default` entry.
    pub fn lookup(&self, host: &str) -> Option<&Credentials> {
        self.entries
            .iter()
            .find(|e| {
                e.machine
                    .as_deref()
                    .is_some_and(|m| m.eq_ignore_ascii_case(host))
            })
            .or_else(|| self.entries.iter().find(|e| e.machine.is_none()))
            .map(|e| &e.credentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Netrc {
        Netrc::parse(Path::new("/etc/nix/netrc"), text).unwrap()
    }

    fn creds(login: &str, password: &str) -> Credentials {
        Credentials {
            login: login.into(),
            password: password.into(),
        }
    }

    #[test]
    fn one_line_entry() {
        let n = parse("machine cache.example.org login alice password s3cret\n");
        assert_eq!(
            n.lookup("cache.example.org"),
            Some(&creds("alice", "s3cret"))
        );
        assert_eq!(
            n.lookup("CACHE.example.org"),
            Some(&creds("alice", "s3cret"))
        );
        assert_eq!(n.lookup("other.org"), None);
    }

    #[test]
    fn tokens_across_lines_and_several_entries() {
        let n = parse(
            "machine a.org\n  login\talice\n  password pa\n\nmachine b.org login bob\npassword pb account x machine a.org login late password no",
        );
        assert_eq!(n.lookup("a.org"), Some(&creds("alice", "pa")));
        assert_eq!(n.lookup("b.org"), Some(&creds("bob", "pb")));
    }

    #[test]
    fn default_applies_to_unmatched_hosts() {
        let n = parse("default login anon password guest\nmachine a.org login alice password pa\n");
        assert_eq!(n.lookup("a.org"), Some(&creds("alice", "pa")));
        assert_eq!(n.lookup("b.org"), Some(&creds("anon", "guest")));
    }

    #[test]
    fn macdef_body_is_skipped() {
        let n = parse(
            "macdef init\ncd /pub\nmachine evil.org login x password y\n\nmachine a.org login alice password pa\n",
        );
        assert_eq!(n.lookup("evil.org"), None);
        assert_eq!(n.lookup("a.org"), Some(&creds("alice", "pa")));
    }

    #[test]
    fn quoted_tokens() {
        let n = parse("machine a.org login \"al ice\" password \"p\\\"w\\\\d\\n\"\n");
        assert_eq!(n.lookup("a.org"), Some(&creds("al ice", "p\"w\\d\n")));
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = Netrc::parse(Path::new("/n"), "machine a.org\nlogin \"x\n\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "netrc file '/n', line 2: unterminated quoted string"
        );
        let e = Netrc::parse(Path::new("/n"), "machine a.org\n\nlogin alice password").unwrap_err();
        assert_eq!(
            e.to_string(),
            "netrc file '/n', line 3: 'password' without a value"
        );
    }

    #[test]
    fn missing_file_is_no_credentials() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Netrc::read(&d.path().join("netrc")).unwrap(), None);
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(n) = Netrc::parse(Path::new("/n"), &text) {
                let _ = n.lookup("a.org");
            }
        }

        #[test]
        fn netrc_like_input_never_panics(
            words in proptest::collection::vec(
                prop_oneof![
                    Just("machine".to_owned()), Just("default".to_owned()),
                    Just("login".to_owned()), Just("password".to_owned()),
                    Just("macdef".to_owned()), Just("\"".to_owned()),
                    Just("\n".to_owned()), Just("\\".to_owned()), "[a-z\" \\\\]{0,4}",
                ],
                0..40,
            )
        ) {
            let text = words.join(" ");
            let _ = Netrc::parse(Path::new("/n"), &text);
        }
    }
}
