//! The build-hook wire protocol of Nix 2.8.0: what Nix writes to the hook's stdin and
//! how it reads the hook's answers. Bytes in, values out (no processes here; the hook
//! process lives in `drover-actors`' `hook` module). The one exception is
//! [`hook_settings`], which probes the host for Nix's machine-dependent defaults
//! (CPU levels via `cpuid`, `/proc/sys/kernel/osrelease`,
//! `/sys/devices/system/cpu/online`, whether channel directories exist).
//!
//! # Requests (Nix → hook, fd 0)
//!
//! Integers are u64 little-endian; a string is its length (u64), its bytes and zero
//! padding up to a multiple of 8; a string set is a count (u64) then the strings in
//! sorted order.
//!
//! 1. The **settings preamble**, once when the hook starts: for every setting Nix 2.8
//!    knows (all 91, set or not, names sorted) `u64 1, string name, string value`, then
//!    `u64 0`. Values are in their config-file text form (lists joined by one space,
//!    sets sorted). [`hook_settings`] computes that table from drover's
//!    [`Settings`]; [`encode_settings`] frames it.
//! 2. A **`try` request** per offered derivation ([`TryRequest`]):
//!    `string "try", u64 amWilling, string system, string drvPath,
//!    string-set requiredSystemFeatures`.
//! 3. After `# accept` and the machine line: `string-set inputs` (full store paths),
//!    `string-set missingOutputs` (output names), then Nix closes the pipe
//!    ([`encode_accept_follow_up`]).
//!
//! # Replies (hook → Nix, fds 1 and 2, one pipe)
//!
//! Nix reads lines ([`classify_line`]): `@nix {json}` is a log message, a line starting
//! with `# ` is a reply (the rest of the line, see [`parse_reply`]), anything else is
//! copied to stderr. Replies: `accept` (then one more line, the machine name),
//! `decline`, `decline-permanently`, `postpone`; anything else is the error
//! `bad hook reply '<rest>'`. End of file before a complete line is the error
//! `unexpected EOF reading a line`.
//!
//! # How Nix 2.8 starts the hook (observed with `nix-store --realise` and a recording hook, `tests/data/hooks/record.py`; Nix's `src/libstore/build/hook-instance.cc`)
//!
//! The `build-hook` setting is a *path* (canonicalised, not split on whitespace):
//! `build-hook = /x/hook extra` makes Nix try to execute the file `/x/hook extra`
//! (`error: executing '/x/hook extra': No such file or directory`, then
//! `error: unexpected EOF reading a line`, exit 1). argv is exactly
//! `[basename(path), "<verbosity>"]` ([`hook_argv`]). With `build-hook =` (empty)
//! Nix 2.8 still starts a hook: `execv("")` fails and every build that would consult
//! the hook fails the same way (`executing ''`, then `unexpected EOF reading a line`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use thiserror::Error;

use crate::config::{Env, Settings};

/// Why hook-protocol bytes or lines could not be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HookProtocolError {
    /// A reply line other than the four known words (the text after `# `).
    #[error("bad hook reply '{0}'")]
    BadReply(String),
    /// The input ended inside a field.
    #[error("unexpected end of input reading {what} at byte {offset}")]
    Truncated { what: &'static str, offset: usize },
    /// A string's padding was not zero.
    #[error("non-zero padding after string at byte {offset}")]
    BadPadding { offset: usize },
    /// A string that must be UTF-8 was not.
    #[error("string at byte {offset} is not valid UTF-8")]
    NotUtf8 { offset: usize },
    /// A length or count that cannot fit in memory.
    #[error("length {len} at byte {offset} is too large")]
    TooLong { len: u64, offset: usize },
    /// The settings preamble had a flag other than 0 or 1.
    #[error("bad settings flag {flag} at byte {offset}")]
    BadFlag { flag: u64, offset: usize },
    /// The first string of a request was not `try`.
    #[error("expected 'try', got '{0}'")]
    NotTry(String),
}

// ---------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------

/// Appends a u64, little-endian.
pub fn write_int(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends a string: length, bytes, zero padding to a multiple of 8.
pub fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    write_int(out, s.len() as u64);
    out.extend_from_slice(s);
    let pad = (8 - s.len() % 8) % 8;
    out.extend(std::iter::repeat_n(0u8, pad));
}

/// Appends a string set: count, then the strings sorted (bytewise, as `std::set`).
pub fn write_string_set<I, S>(out: &mut Vec<u8>, items: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<[u8]>,
{
    let mut v: Vec<S> = items.into_iter().collect();
    v.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
    v.dedup_by(|a, b| a.as_ref() == b.as_ref());
    write_int(out, v.len() as u64);
    for s in &v {
        write_string(out, s.as_ref());
    }
}

/// Reads the framing back (for tests, recorders and hooks written in Rust).
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The bytes not consumed yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HookProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(HookProtocolError::Truncated {
                what,
                offset: self.pos,
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn read_int(&mut self) -> Result<u64, HookProtocolError> {
        let b = self.take(8, "an integer")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn read_bytes(&mut self) -> Result<&'a [u8], HookProtocolError> {
        let offset = self.pos;
        let len = self.read_int()?;
        let n = usize::try_from(len)
            .ok()
            .filter(|n| *n <= self.bytes.len())
            .ok_or(HookProtocolError::TooLong { len, offset })?;
        let s = self.take(n, "a string")?;
        let pad_at = self.pos;
        let pad = self.take((8 - n % 8) % 8, "string padding")?;
        if pad.iter().any(|b| *b != 0) {
            return Err(HookProtocolError::BadPadding { offset: pad_at });
        }
        Ok(s)
    }

    pub fn read_string(&mut self) -> Result<String, HookProtocolError> {
        let offset = self.pos;
        let b = self.read_bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| HookProtocolError::NotUtf8 { offset })
    }

    pub fn read_string_set(&mut self) -> Result<BTreeSet<String>, HookProtocolError> {
        let offset = self.pos;
        let count = self.read_int()?;
        // Each string takes at least 8 bytes: refuse counts the input cannot hold.
        if count > (self.bytes.len() / 8) as u64 {
            return Err(HookProtocolError::TooLong { len: count, offset });
        }
        (0..count).map(|_| self.read_string()).collect()
    }

    /// Reads a settings preamble up to and including its terminating `0`.
    pub fn read_settings(&mut self) -> Result<Vec<(String, String)>, HookProtocolError> {
        let mut out = Vec::new();
        loop {
            let offset = self.pos;
            match self.read_int()? {
                0 => return Ok(out),
                1 => {
                    let name = self.read_string()?;
                    let value = self.read_string()?;
                    out.push((name, value));
                }
                flag => return Err(HookProtocolError::BadFlag { flag, offset }),
            }
        }
    }

    /// Reads one `try` request.
    pub fn read_try(&mut self) -> Result<TryRequest, HookProtocolError> {
        let word = self.read_string()?;
        if word != "try" {
            return Err(HookProtocolError::NotTry(word));
        }
        Ok(TryRequest {
            am_willing: self.read_int()? != 0,
            system: self.read_string()?,
            drv_path: self.read_string()?,
            required_features: self.read_string_set()?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Settings preamble
// ---------------------------------------------------------------------------------------

/// Every setting Nix 2.8.0 sends to its hook, in the order sent (sorted by name).
/// Recorded from `nix-store --realise` with a recording hook; `nix show-config` lists
/// the same 91 names.
pub const NIX_2_8_HOOK_SETTINGS: [&str; 91] = [
    "accept-flake-config",
    "access-tokens",
    "allow-dirty",
    "allow-import-from-derivation",
    "allow-new-privileges",
    "allow-symlinked-store",
    "allow-unsafe-native-code-during-evaluation",
    "allowed-impure-host-deps",
    "allowed-uris",
    "allowed-users",
    "auto-optimise-store",
    "bash-prompt",
    "bash-prompt-suffix",
    "build-hook",
    "build-poll-interval",
    "build-users-group",
    "builders",
    "builders-use-substitutes",
    "commit-lockfile-summary",
    "compress-build-log",
    "connect-timeout",
    "cores",
    "diff-hook",
    "download-attempts",
    "enforce-determinism",
    "eval-cache",
    "experimental-features",
    "extra-platforms",
    "fallback",
    "filter-syscalls",
    "flake-registry",
    "fsync-metadata",
    "gc-reserved-space",
    "hashed-mirrors",
    "http-connections",
    "http2",
    "ignored-acls",
    "impersonate-linux-26",
    "keep-build-log",
    "keep-derivations",
    "keep-env-derivations",
    "keep-failed",
    "keep-going",
    "keep-outputs",
    "log-lines",
    "max-build-log-size",
    "max-free",
    "max-jobs",
    "max-silent-time",
    "min-free",
    "min-free-check-interval",
    "nar-buffer-size",
    "narinfo-cache-negative-ttl",
    "narinfo-cache-positive-ttl",
    "netrc-file",
    "nix-path",
    "plugin-files",
    "post-build-hook",
    "pre-build-hook",
    "preallocate-contents",
    "print-missing",
    "pure-eval",
    "repeat",
    "require-sigs",
    "restrict-eval",
    "run-diff-hook",
    "sandbox",
    "sandbox-build-dir",
    "sandbox-dev-shm-size",
    "sandbox-fallback",
    "sandbox-paths",
    "secret-key-files",
    "show-trace",
    "stalled-download-timeout",
    "store",
    "substitute",
    "substituters",
    "sync-before-registering",
    "system",
    "system-features",
    "tarball-ttl",
    "timeout",
    "trace-function-calls",
    "trusted-public-keys",
    "trusted-substituters",
    "trusted-users",
    "use-case-hack",
    "use-registries",
    "use-sqlite-wal",
    "user-agent-suffix",
    "warn-dirty",
];

/// The x86-64 micro-architecture levels of this CPU as Nix 2.8 computes them with
/// libcpuid (`x86_64-v1` … `x86_64-v4`), each a superset of the one before.
#[cfg(target_arch = "x86_64")]
fn x86_64_levels() -> Vec<&'static str> {
    use std::arch::is_x86_feature_detected as has;
    let mut levels = Vec::new();
    // v1: cmov, cx8, fpu, fxsr, mmx, sse, sse2 (every x86-64 CPU; the detectable part).
    if !(has!("fxsr") && has!("sse") && has!("sse2")) {
        return levels;
    }
    levels.push("x86_64-v1");
    // v2: cx16, lahf_lm, popcnt, sse3, ssse3, sse4.1, sse4.2.
    if !(has!("cmpxchg16b")
        && has!("popcnt")
        && has!("sse3")
        && has!("ssse3")
        && has!("sse4.1")
        && has!("sse4.2")
        && lahf_lm())
    {
        return levels;
    }
    levels.push("x86_64-v2");
    // v3: avx, avx2, f16c, fma, lzcnt (abm), movbe.
    if !(has!("avx")
        && has!("avx2")
        && has!("f16c")
        && has!("fma")
        && has!("lzcnt")
        && has!("movbe"))
    {
        return levels;
    }
    levels.push("x86_64-v3");
    // v4: avx512f, avx512bw, avx512cd, avx512dq, avx512vl. libcpuid 0.6.2 (what
    // Debian's Nix 2.8 links) decodes those bits of CPUID leaf 7 in its Intel code
    // only, straight from the register (no check that the OS saves the ZMM state):
    // so an AMD CPU with AVX-512 stops at v3 and an Intel one reaches v4. Nix 2.8 is
    // the oracle, so drover reads the same bits the same way.
    if is_genuine_intel() && leaf7_ebx_has_avx512_v4() {
        levels.push("x86_64-v4");
    }
    levels
}

/// The CPU's vendor string (CPUID leaf 0) is `GenuineIntel`.
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `__cpuid` became safe to call in newer Rust
fn is_genuine_intel() -> bool {
    // SAFETY: CPUID is available on every x86-64 CPU.
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &vendor == b"GenuineIntel"
}

/// CPUID leaf 7 (sub-leaf 0) EBX has the AVX-512 bits of x86-64-v4: F (16), DQ (17),
/// CD (28), BW (30), VL (31).
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `__cpuid_count` became safe to call in newer Rust
fn leaf7_ebx_has_avx512_v4() -> bool {
    // SAFETY: CPUID is available on every x86-64 CPU.
    let max = unsafe { std::arch::x86_64::__cpuid(0) }.eax;
    if max < 7 {
        return false;
    }
    // SAFETY: as above; the leaf is supported (checked against the maximum).
    let ebx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.ebx;
    let bits = [16, 17, 28, 30, 31];
    bits.iter().all(|b| ebx >> b & 1 == 1)
}

/// `LAHF/SAHF` in 64-bit mode: CPUID 0x8000_0001, ECX bit 0.
#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `__cpuid` became safe to call in newer Rust
fn lahf_lm() -> bool {
    // SAFETY: CPUID is available on every x86-64 CPU.
    let max = unsafe { std::arch::x86_64::__cpuid(0x8000_0000) }.eax;
    if max < 0x8000_0001 {
        return false;
    }
    // SAFETY: as above; the leaf is supported (checked against the maximum).
    let r = unsafe { std::arch::x86_64::__cpuid(0x8000_0001) };
    r.ecx & 1 == 1
}

/// Nix 2.8's default `extra-platforms` for the machine drover runs on.
pub fn default_extra_platforms() -> BTreeSet<String> {
    let mut p = BTreeSet::new();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let wsl1 = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.contains("-Microsoft"))
            .unwrap_or(false);
        if !wsl1 {
            p.insert("i686-linux".to_owned());
        }
        for l in x86_64_levels() {
            p.insert(format!("{l}-linux"));
        }
    }
    p
}

/// Nix's `canonPath` (no symlinks resolved); relative values are returned unchanged.
fn canon_path(p: &str) -> String {
    if !p.starts_with('/') {
        return p.to_owned();
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The values Nix 2.8 would send for its 91 settings, from drover's settings and the
/// environment the settings were loaded from.
///
/// Values of settings drover models come from [`Settings::get`] (which gives Nix's
/// defaults for unset ones). Where 2.8's default depends on things
/// [`Settings`] does not keep, this function supplies it when the setting is unset:
///
/// | setting | Nix 2.8 default |
/// |---|---|
/// | `store` | `$NIX_REMOTE`, else `auto` |
/// | `nix-path` | `$NIX_PATH` split on `:`, else the existing ones of `~/.nix-defexpr/channels`, `nixpkgs=<state>/profiles/per-user/root/channels/nixpkgs`, `<state>/profiles/per-user/root/channels` |
/// | `extra-platforms` | [`default_extra_platforms`] (`i686-linux` and the x86-64 levels) |
/// | `allow-symlinked-store` | `true` iff `NIX_IGNORE_SYMLINK_STORE=1` |
/// | `cores` | the number of online CPUs ([`online_cpus`]; C++'s `hardware_concurrency`, which ignores affinity and cgroup quotas) |
///
/// `build-hook` is sent canonicalised (`//` and `.` removed), as Nix stores paths.
pub fn hook_settings(settings: &Settings, env: &Env) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in NIX_2_8_HOOK_SETTINGS {
        let set = settings.is_set(name);
        let value = match name {
            "store" if !set => env.get("NIX_REMOTE").cloned().unwrap_or("auto".into()),
            "nix-path" if !set => default_nix_path(settings, env).join(" "),
            "extra-platforms" if !set => default_extra_platforms()
                .into_iter()
                .collect::<Vec<_>>()
                .join(" "),
            "allow-symlinked-store"
                if env.get("NIX_IGNORE_SYMLINK_STORE").map(String::as_str) == Some("1") =>
            {
                "true".into()
            }
            "cores" if !set => online_cpus()
                .map(|n| n.to_string())
                .or_else(|| settings.get(name))
                .unwrap_or_default(),
            "build-hook" => canon_path(&settings.get(name).unwrap_or_default()),
            _ => settings.get(name).unwrap_or_default(),
        };
        out.insert(name.to_owned(), value);
    }
    out
}

/// The number of online CPUs as glibc's `get_nprocs` counts them (the ranges in
/// `/sys/devices/system/cpu/online`, e.g. `0-3,6`); `None` if that cannot be read.
pub fn online_cpus() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    parse_cpu_list(&text)
}

/// Counts the CPUs in a kernel CPU list (`0-3,6`).
fn parse_cpu_list(text: &str) -> Option<u64> {
    let mut n = 0u64;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
            }
            None => {
                part.parse::<u64>().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    (n > 0).then_some(n)
}

fn default_nix_path(settings: &Settings, env: &Env) -> Vec<String> {
    if let Some(v) = env.get("NIX_PATH") {
        return v
            .split(':')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    let mut res = Vec::new();
    let state = settings.state_dir().display().to_string();
    if let Some(home) = env.get("HOME") {
        let p = format!("{home}/.nix-defexpr/channels");
        if Path::new(&p).exists() {
            res.push(p);
        }
    }
    let p = format!("{state}/profiles/per-user/root/channels/nixpkgs");
    if Path::new(&p).exists() {
        res.push(format!("nixpkgs={p}"));
    }
    let p = format!("{state}/profiles/per-user/root/channels");
    if Path::new(&p).exists() {
        res.push(p);
    }
    res
}

/// Frames a settings preamble: `1, name, value` per entry (in the map's order, i.e.
/// sorted), then `0`.
pub fn encode_settings<K: AsRef<str>, V: AsRef<str>>(
    settings: impl IntoIterator<Item = (K, V)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in settings {
        write_int(&mut out, 1);
        write_string(&mut out, k.as_ref().as_bytes());
        write_string(&mut out, v.as_ref().as_bytes());
    }
    write_int(&mut out, 0);
    out
}

/// The preamble Nix 2.8 would send to a hook with these settings.
pub fn settings_preamble(settings: &Settings, env: &Env) -> Vec<u8> {
    encode_settings(&hook_settings(settings, env))
}

/// argv of the hook process as Nix 2.8 builds it: the base name of the `build-hook`
/// path, then the verbosity (3 = info, the default).
pub fn hook_argv(build_hook: &str, verbosity: u32) -> [String; 2] {
    let base = build_hook.rsplit('/').next().unwrap_or(build_hook);
    [base.to_owned(), verbosity.to_string()]
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

/// One `try` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// Whether Nix would build it locally now (local builds < max-jobs).
    pub am_willing: bool,
    /// The derivation's `system`.
    pub system: String,
    /// The full `.drv` path.
    pub drv_path: String,
    /// `requiredSystemFeatures` (plus `ca-derivations` for floating outputs).
    pub required_features: BTreeSet<String>,
}

impl TryRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_string(&mut out, b"try");
        write_int(&mut out, u64::from(self.am_willing));
        write_string(&mut out, self.system.as_bytes());
        write_string(&mut out, self.drv_path.as_bytes());
        write_string_set(&mut out, &self.required_features);
        out
    }
}

/// What Nix sends after the machine line of an accepted job: the input paths (full
/// store paths) and the names of the missing outputs, as sorted sets.
pub fn encode_accept_follow_up<I, S, O, T>(inputs: I, missing_outputs: O) -> Vec<u8>
where
    I: IntoIterator<Item = S>,
    S: AsRef<[u8]>,
    O: IntoIterator<Item = T>,
    T: AsRef<[u8]>,
{
    let mut out = Vec::new();
    write_string_set(&mut out, inputs);
    write_string_set(&mut out, missing_outputs);
    out
}

// ---------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------

/// What one line from the hook's stderr is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookLine {
    /// `# <reply>`: the text after `# `.
    Reply(String),
    /// `@nix <json>`: a JSON log message (the whole line is kept).
    Json(String),
    /// Anything else: copied to stderr.
    Other(String),
}

/// Classifies one line (without its `\n`), as Nix does while waiting for a reply.
pub fn classify_line(line: &str) -> HookLine {
    if line.starts_with("@nix ") {
        HookLine::Json(line.to_owned())
    } else if let Some(r) = line.strip_prefix("# ") {
        HookLine::Reply(r.to_owned())
    } else {
        HookLine::Other(line.to_owned())
    }
}

/// A known reply word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Accept,
    Decline,
    DeclinePermanently,
    Postpone,
}

/// Parses the text of a reply (after `# `).
pub fn parse_reply(reply: &str) -> Result<ReplyKind, HookProtocolError> {
    match reply {
        "accept" => Ok(ReplyKind::Accept),
        "decline" => Ok(ReplyKind::Decline),
        "decline-permanently" => Ok(ReplyKind::DeclinePermanently),
        "postpone" => Ok(ReplyKind::Postpone),
        other => Err(HookProtocolError::BadReply(other.to_owned())),
    }
}

/// The `msg` of an `@nix {"action":"msg",…}` line, which Nix prints; `None` for other
/// actions or unparsable JSON.
pub fn json_message_text(line: &str) -> Option<String> {
    let json = line.strip_prefix("@nix ")?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    if v.get("action")?.as_str()? != "msg" {
        return None;
    }
    Some(v.get("msg")?.as_str()?.to_owned())
}

/// The message Nix 2.8 gives when the hook's reply pipe ends before a full line.
pub const UNEXPECTED_EOF: &str = "unexpected EOF reading a line";

/// The line Nix prints after an error that carries a trace, without
/// `--show-trace` (Nix 2.8 adds a trace to errors reading the hook's reply or
/// machine name: `while reading the response from the build hook`).
pub const SHOW_TRACE_HINT: &str = "(use '--show-trace' to show detailed location information)";

/// [`UNEXPECTED_EOF`] as the run's error: the message, a newline, then
/// [`SHOW_TRACE_HINT`], which Nix prints on a line of its own, not indented.
pub fn unexpected_eof() -> String {
    format!("{UNEXPECTED_EOF}\n{SHOW_TRACE_HINT}")
}

impl std::fmt::Display for ReplyKind {
    /// The reply word (`accept`, `decline`, `decline-permanently`, `postpone`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplyKind::Accept => "accept",
            ReplyKind::Decline => "decline",
            ReplyKind::DeclinePermanently => "decline-permanently",
            ReplyKind::Postpone => "postpone",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn first_112_bytes_of_the_preamble() {
        // The first 112 bytes Nix 2.8 sends, as a recording hook saw them.
        let mut expected = Vec::new();
        expected.extend(hex("0100000000000000 1300000000000000"));
        expected.extend(b"accept-flake-config\0\0\0\0\0");
        expected.extend(hex("0500000000000000"));
        expected.extend(b"false\0\0\0");
        expected.extend(hex("0100000000000000 0d00000000000000"));
        expected.extend(b"access-tokens\0\0\0");
        expected.extend(hex("0000000000000000"));
        expected.extend(hex("0100000000000000 0b00000000000000"));
        assert_eq!(expected.len(), 112);
        let enc = encode_settings([
            ("accept-flake-config", "false"),
            ("access-tokens", ""),
            ("allow-dirty", "true"),
        ]);
        assert_eq!(&enc[..112], &expected[..]);
        assert_eq!(&enc[112..123], b"allow-dirty");
        let env = Env::new();
        let s = Settings::defaults(&env).unwrap();
        assert_eq!(&settings_preamble(&s, &env)[..112], &expected[..]);
    }

    #[test]
    fn try_request_example() {
        let req = TryRequest {
            am_willing: true,
            system: "x86_64-linux".into(),
            drv_path: "@STORE@/m8c3xxxxxxxxxxxxxxxxxxxxxxxxxxxx-hook-feat.drv".into(),
            required_features: ["kvm".to_owned(), "big-parallel".to_owned()].into(),
        };
        assert_eq!(req.drv_path.len(), 0x36);
        let mut e = hex("0300000000000000 7472790000000000 0100000000000000");
        e.extend(hex("0c00000000000000 7838365f36342d6c696e7578 00000000"));
        e.extend(hex("3600000000000000"));
        e.extend(req.drv_path.as_bytes());
        e.extend(hex("0000"));
        e.extend(hex("0200000000000000 0c00000000000000"));
        e.extend(b"big-parallel\0\0\0\0");
        e.extend(hex("0300000000000000"));
        e.extend(b"kvm\0\0\0\0\0");
        assert_eq!(req.encode(), e);
        assert_eq!(Reader::new(&e).read_try().unwrap(), req);
    }

    #[test]
    fn follow_up_with_no_inputs() {
        let e = encode_accept_follow_up(Vec::<String>::new(), ["out"]);
        assert_eq!(
            e,
            hex("0000000000000000 0100000000000000 0300000000000000 6f75740000000000")
        );
        let e = encode_accept_follow_up(["/s/b", "/s/a", "/s/a"], ["out", "dev"]);
        let mut r = Reader::new(&e);
        assert_eq!(
            r.read_string_set().unwrap().into_iter().collect::<Vec<_>>(),
            ["/s/a", "/s/b"]
        );
        assert_eq!(
            r.read_string_set().unwrap().into_iter().collect::<Vec<_>>(),
            ["dev", "out"]
        );
        assert!(r.rest().is_empty());
    }

    #[test]
    fn preamble_has_all_91_sorted() {
        let mut sorted = NIX_2_8_HOOK_SETTINGS.to_vec();
        sorted.sort();
        assert_eq!(sorted, NIX_2_8_HOOK_SETTINGS);
        let mut env = Env::new();
        env.insert("NIX_CONF_DIR".into(), "/c".into());
        env.insert("NIX_REMOTE".into(), "daemon".into());
        env.insert("NIX_PATH".into(), "a=/x:/y".into());
        let mut s = Settings::defaults(&env).unwrap();
        s.apply_config("build-hook = /h//x/./hook\nmax-jobs = 4\n", "t")
            .unwrap();
        let bytes = settings_preamble(&s, &env);
        let got = Reader::new(&bytes).read_settings().unwrap();
        assert_eq!(got.len(), 91);
        let m: BTreeMap<_, _> = got.into_iter().collect();
        assert_eq!(m["builders"], "@/c/machines");
        assert_eq!(m["build-hook"], "/h/x/hook");
        assert_eq!(m["max-jobs"], "4");
        assert_eq!(m["store"], "daemon");
        assert_eq!(m["nix-path"], "a=/x /y");
        assert_eq!(m["netrc-file"], "/c/netrc");
        assert_eq!(m["trusted-users"], "root");
    }

    #[test]
    fn replies() {
        assert_eq!(classify_line("# accept"), HookLine::Reply("accept".into()));
        assert_eq!(
            classify_line("@nix {\"action\":\"msg\"}"),
            HookLine::Json("@nix {\"action\":\"msg\"}".into())
        );
        assert_eq!(classify_line("#accept"), HookLine::Other("#accept".into()));
        assert_eq!(classify_line("hello"), HookLine::Other("hello".into()));
        assert_eq!(parse_reply("accept"), Ok(ReplyKind::Accept));
        assert_eq!(parse_reply("decline"), Ok(ReplyKind::Decline));
        assert_eq!(
            parse_reply("decline-permanently"),
            Ok(ReplyKind::DeclinePermanently)
        );
        assert_eq!(parse_reply("postpone"), Ok(ReplyKind::Postpone));
        let e = parse_reply("nonsense").unwrap_err();
        assert_eq!(e.to_string(), "bad hook reply 'nonsense'");
        assert_eq!(
            parse_reply("accept ").unwrap_err().to_string(),
            "bad hook reply 'accept '"
        );
        assert_eq!(
            json_message_text(r#"@nix {"action":"msg","level":3,"msg":"hi"}"#).as_deref(),
            Some("hi")
        );
        assert_eq!(json_message_text(r#"@nix {"action":"start"}"#), None);
        assert_eq!(json_message_text("@nix {bad"), None);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,6\n"), Some(5));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn hook_argv_is_basename_and_verbosity() {
        assert_eq!(
            hook_argv("/usr/libexec/nix/build-remote", 3),
            ["build-remote", "3"]
        );
        assert_eq!(hook_argv("hook", 4), ["hook", "4"]);
    }

    #[test]
    fn reader_errors() {
        assert!(matches!(
            Reader::new(&[1, 0]).read_int(),
            Err(HookProtocolError::Truncated { .. })
        ));
        let mut b = Vec::new();
        write_int(&mut b, 3);
        b.extend(b"abc\0\0\0\0\x01");
        assert_eq!(
            Reader::new(&b).read_string(),
            Err(HookProtocolError::BadPadding { offset: 11 })
        );
        let mut b = Vec::new();
        write_int(&mut b, u64::MAX);
        assert!(matches!(
            Reader::new(&b).read_string(),
            Err(HookProtocolError::TooLong { .. })
        ));
        assert!(matches!(
            Reader::new(&b).read_string_set(),
            Err(HookProtocolError::TooLong { .. })
        ));
        let mut b = Vec::new();
        write_int(&mut b, 2);
        assert!(matches!(
            Reader::new(&b).read_settings(),
            Err(HookProtocolError::BadFlag { flag: 2, .. })
        ));
        let mut b = Vec::new();
        write_string(&mut b, b"tri");
        assert_eq!(
            Reader::new(&b).read_try(),
            Err(HookProtocolError::NotTry("tri".into()))
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Reader::new(&b).read_settings();
            let _ = Reader::new(&b).read_try();
            let _ = Reader::new(&b).read_string_set();
        }

        #[test]
        fn try_round_trip(
            am_willing: bool,
            system in "[a-z0-9_-]{0,20}",
            drv in "/[a-z0-9./-]{0,60}",
            features in proptest::collection::btree_set("[a-z-]{0,12}", 0..5),
        ) {
            let req = TryRequest { am_willing, system, drv_path: drv, required_features: features };
            let bytes = req.encode();
            proptest::prop_assert_eq!(bytes.len() % 8, 0);
            let mut r = Reader::new(&bytes);
            proptest::prop_assert_eq!(r.read_try().unwrap(), req);
            proptest::prop_assert!(r.rest().is_empty());
        }

        #[test]
        fn settings_round_trip(m in proptest::collection::btree_map("[a-z-]{1,20}", ".{0,30}", 0..10)) {
            let bytes = encode_settings(&m);
            let got: BTreeMap<String, String> = Reader::new(&bytes).read_settings().unwrap().into_iter().collect();
            proptest::prop_assert_eq!(got, m);
        }
    }
}
