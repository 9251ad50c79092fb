//! Build results and `nix-store --realise`'s exit status.
//!
//! A [`BuildResult`] is what a goal reports when it is done (Nix's `BuildResult`):
//! a [`BuildStatus`], an error message, how often it was built, and for derivations
//! the realisations of the outputs it made. The numeric status codes are Nix 2.8's
//! (`build-result.hh`); they travel over `nix-store --serve` and the daemon protocol,
//! so they never change and new ones are only appended.
//!
//! [`realise_exit_status`] turns a run's results into the exit status of
//! `nix-store --realise` (Nix's `Worker::exitStatus`): 0 when everything succeeded;
//! otherwise `0x60 | bits` with `0x04` for every failed build (builder failure,
//! rejected inputs, timeouts and hash mismatches), `0x01` for a timeout, `0x02` for a
//! fixed-output hash mismatch, `0x08` for a `--check` that found non-determinism;
//! and 1 when something failed without setting a bit (missing outputs, log limit,
//! substitution failures, transient failures, dependency failures alone).
//!
//! [`BuiltOutputs`] holds a result's realisations as a sorted boxed slice rather
//! than a `BTreeMap`: a run keeps one result per requested goal until it ends, most
//! of them with a single output, and a `BTreeMap` of one entry allocates a whole
//! node (about 2 KB here) where the slice takes one `Realisation`.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use crate::realisation::{DrvOutput, Realisation};

/// Why a number is not a build status.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum BuildResultError {
    #[error("unknown build status code {0}")]
    UnknownStatus(u64),
}

/// How a goal ended, with Nix 2.8's numeric codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    /// Possibly transient (a remote or hook build failing, a fixed-output builder failing).
    TransientFailure = 6,
    /// No longer used by Nix.
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    /// Every status, in code order.
    pub const ALL: [BuildStatus; 15] = [
        BuildStatus::Built,
        BuildStatus::Substituted,
        BuildStatus::AlreadyValid,
        BuildStatus::PermanentFailure,
        BuildStatus::InputRejected,
        BuildStatus::OutputRejected,
        BuildStatus::TransientFailure,
        BuildStatus::CachedFailure,
        BuildStatus::TimedOut,
        BuildStatus::MiscFailure,
        BuildStatus::DependencyFailed,
        BuildStatus::LogLimitExceeded,
        BuildStatus::NotDeterministic,
        BuildStatus::ResolvesToAlreadyValid,
        BuildStatus::NoSubstituters,
    ];

    /// The numeric code on the wire.
    pub fn code(self) -> u64 {
        self as u64
    }

    pub fn from_code(code: u64) -> Result<BuildStatus, BuildResultError> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or(BuildResultError::UnknownStatus(code))
    }

    /// Whether the wanted outputs are now valid.
    pub fn success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }

    /// Nix's name for the status (`PermanentFailure`).
    pub fn name(self) -> &'static str {
        match self {
            BuildStatus::Built => "Built",
            BuildStatus::Substituted => "Substituted",
            BuildStatus::AlreadyValid => "AlreadyValid",
            BuildStatus::PermanentFailure => "PermanentFailure",
            BuildStatus::InputRejected => "InputRejected",
            BuildStatus::OutputRejected => "OutputRejected",
            BuildStatus::TransientFailure => "TransientFailure",
            BuildStatus::CachedFailure => "CachedFailure",
            BuildStatus::TimedOut => "TimedOut",
            BuildStatus::MiscFailure => "MiscFailure",
            BuildStatus::DependencyFailed => "DependencyFailed",
            BuildStatus::LogLimitExceeded => "LogLimitExceeded",
            BuildStatus::NotDeterministic => "NotDeterministic",
            BuildStatus::ResolvesToAlreadyValid => "ResolvesToAlreadyValid",
            BuildStatus::NoSubstituters => "NoSubstituters",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of building or substituting one thing (Nix's `BuildResult`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    /// Empty on success.
    pub error_msg: String,
    /// How many times the derivation was built (more than once with `--check`/rounds).
    pub times_built: u32,
    /// With `times_built > 1`: whether the rounds gave different results.
    pub is_non_deterministic: bool,
    /// For derivations, the realisations of the wanted outputs.
    pub built_outputs: BuiltOutputs,
    /// Start and stop of the build (Unix seconds; 0 when not built).
    pub start_time: i64,
    pub stop_time: i64,
}

impl BuildResult {
    /// A result with this status and nothing else set.
    pub fn new(status: BuildStatus) -> BuildResult {
        BuildResult {
            status,
            error_msg: String::new(),
            times_built: 0,
            is_non_deterministic: false,
            built_outputs: BuiltOutputs::new(),
            start_time: 0,
            stop_time: 0,
        }
    }

    /// A failure with its message.
    pub fn failure(status: BuildStatus, error_msg: impl Into<String>) -> BuildResult {
        BuildResult {
            error_msg: error_msg.into(),
            ..BuildResult::new(status)
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl Default for BuildResult {
    /// Nix's default status is `MiscFailure`.
    fn default() -> BuildResult {
        BuildResult::new(BuildStatus::MiscFailure)
    }
}

/// Nix's `BuildResult::toString`: `Status` or `Status : message`.
impl fmt::Display for BuildResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.status.name())?;
        if !self.error_msg.is_empty() {
            write!(f, " : {}", self.error_msg)?;
        }
        Ok(())
    }
}

/// The realisations of a result's outputs, ordered by their [`DrvOutput`] (the
/// order of Nix's `std::map<DrvOutput, Realisation>`), at most one per id. A sorted
/// boxed slice: results have a handful of outputs, and a run keeps thousands of
/// results at once (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuiltOutputs {
    sorted: Box<[Realisation]>,
}

impl BuiltOutputs {
    pub fn new() -> BuiltOutputs {
        BuiltOutputs::default()
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    fn position(&self, id: &DrvOutput) -> Result<usize, usize> {
        self.sorted.binary_search_by(|r| r.id.cmp(id))
    }

    /// Adds a realisation under its own id; one already there under that id is
    /// replaced and returned.
    pub fn insert(&mut self, realisation: Realisation) -> Option<Realisation> {
        match self.position(&realisation.id) {
            Ok(i) => Some(std::mem::replace(&mut self.sorted[i], realisation)),
            Err(i) => {
                let mut v = std::mem::take(&mut self.sorted).into_vec();
                v.insert(i, realisation);
                self.sorted = v.into_boxed_slice();
                None
            }
        }
    }

    pub fn get(&self, id: &DrvOutput) -> Option<&Realisation> {
        self.position(id).ok().map(|i| &self.sorted[i])
    }

    pub fn contains_key(&self, id: &DrvOutput) -> bool {
        self.position(id).is_ok()
    }

    /// `(id, realisation)` in id order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&DrvOutput, &Realisation)> {
        self.sorted.iter().map(|r| (&r.id, r))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &DrvOutput> {
        self.sorted.iter().map(|r| &r.id)
    }

    pub fn values(&self) -> std::slice::Iter<'_, Realisation> {
        self.sorted.iter()
    }

    pub fn clear(&mut self) {
        self.sorted = Box::default();
    }

    /// Keeps the realisations for which `keep` says so.
    pub fn retain(&mut self, mut keep: impl FnMut(&DrvOutput, &Realisation) -> bool) {
        if self.sorted.iter().all(|r| keep(&r.id, r)) {
            return;
        }
        let mut v = std::mem::take(&mut self.sorted).into_vec();
        v.retain(|r| keep(&r.id, r));
        self.sorted = v.into_boxed_slice();
    }
}

impl FromIterator<Realisation> for BuiltOutputs {
    /// The realisations sorted by id; of several with one id, the last is kept
    /// (as repeated `insert`s would).
    fn from_iter<I: IntoIterator<Item = Realisation>>(iter: I) -> BuiltOutputs {
        let mut v: Vec<Realisation> = iter.into_iter().collect();
        // Stable, so equal ids keep their order and the last one wins below.
        v.sort_by(|a, b| a.id.cmp(&b.id));
        let mut out: Vec<Realisation> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if last.id == r.id => *last = r,
                _ => out.push(r),
            }
        }
        BuiltOutputs {
            sorted: out.into_boxed_slice(),
        }
    }
}

impl From<BTreeMap<DrvOutput, Realisation>> for BuiltOutputs {
    /// The map's values (each realisation is kept under its own id).
    fn from(map: BTreeMap<DrvOutput, Realisation>) -> BuiltOutputs {
        map.into_values().collect()
    }
}

impl<'a> IntoIterator for &'a BuiltOutputs {
    type Item = (&'a DrvOutput, &'a Realisation);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, Realisation>,
        fn(&'a Realisation) -> (&'a DrvOutput, &'a Realisation),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.sorted.iter().map(|r| (&r.id, r))
    }
}

impl IntoIterator for BuiltOutputs {
    type Item = Realisation;
    type IntoIter = std::vec::IntoIter<Realisation>;
    fn into_iter(self) -> Self::IntoIter {
        self.sorted.into_vec().into_iter()
    }
}

/// The failure bits of one run (Nix's `Worker` flags), for the exit status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureFlags {
    /// A builder failed (or its inputs were rejected).
    pub permanent_failure: bool,
    pub timed_out: bool,
    /// A fixed-output derivation produced the wrong hash.
    pub hash_mismatch: bool,
    /// `--check` found a different output.
    pub check_mismatch: bool,
}

impl FailureFlags {
    /// Records one goal's result. `hash_mismatch` says whether its failure was a
    /// fixed-output hash mismatch (a detail of an `OutputRejected` result).
    pub fn record(&mut self, result: &BuildResult, hash_mismatch: bool) {
        match result.status {
            BuildStatus::PermanentFailure | BuildStatus::InputRejected => {
                self.permanent_failure = true
            }
            BuildStatus::TimedOut => self.timed_out = true,
            // NotDeterministic is a check mismatch only after `--check` (Nix sets
            // `checkMismatch` there); a differing round of `repeat` is the same
            // status without the bit. The caller knows which.
            _ => {}
        }
        if hash_mismatch {
            self.hash_mismatch = true;
        }
    }

    /// The bits: 0x04 build failure (any of permanent/timeout/hash), 0x01 timeout,
    /// 0x02 hash mismatch, 0x08 check mismatch.
    pub fn mask(&self) -> i32 {
        let mut mask = 0;
        if self.permanent_failure || self.timed_out || self.hash_mismatch {
            mask |= 0x04;
        }
        if self.timed_out {
            mask |= 0x01;
        }
        if self.hash_mismatch {
            mask |= 0x02;
        }
        if self.check_mismatch {
            mask |= 0x08;
        }
        mask
    }

    /// The exit status after a failed run: `0x60 | mask`, or 1 without any bit.
    pub fn failing_exit_status(&self) -> i32 {
        match self.mask() {
            0 => 1,
            m => 0x60 | m,
        }
    }
}

/// The exit status of `nix-store --realise --check` for these results, each with
/// whether its failure was a hash mismatch: 0 when all succeeded, else
/// [`FailureFlags::failing_exit_status`] (NotDeterministic counts as a check
/// mismatch here).
pub fn realise_exit_status<'a>(results: impl IntoIterator<Item = (&'a BuildResult, bool)>) -> i32 {
    let mut flags = FailureFlags::default();
    let mut failed = false;
    for (r, hash_mismatch) in results {
        if !r.success() {
            failed = true;
        }
        flags.record(r, hash_mismatch);
        if r.status == BuildStatus::NotDeterministic {
            flags.check_mismatch = true;
        }
    }
    if failed {
        flags.failing_exit_status()
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BuildStatus::*;

    #[test]
    fn codes_are_nix_2_8s() {
        let expected = [
            (Built, 0),
            (Substituted, 1),
            (AlreadyValid, 2),
            (PermanentFailure, 3),
            (InputRejected, 4),
            (OutputRejected, 5),
            (TransientFailure, 6),
            (CachedFailure, 7),
            (TimedOut, 8),
            (MiscFailure, 9),
            (DependencyFailed, 10),
            (LogLimitExceeded, 11),
            (NotDeterministic, 12),
            (ResolvesToAlreadyValid, 13),
            (NoSubstituters, 14),
        ];
        for (s, c) in expected {
            assert_eq!(s.code(), c);
            assert_eq!(BuildStatus::from_code(c), Ok(s));
        }
        assert_eq!(
            BuildStatus::from_code(15),
            Err(BuildResultError::UnknownStatus(15))
        );
        assert!(BuildStatus::from_code(u64::MAX).is_err());
    }

    #[test]
    fn success_statuses() {
        let ok: Vec<_> = BuildStatus::ALL
            .into_iter()
            .filter(|s| s.success())
            .collect();
        assert_eq!(
            ok,
            [Built, Substituted, AlreadyValid, ResolvesToAlreadyValid]
        );
    }

    #[test]
    fn display_like_to_string() {
        assert_eq!(BuildResult::new(Built).to_string(), "Built");
        assert_eq!(
            BuildResult::failure(PermanentFailure, "builder failed").to_string(),
            "PermanentFailure : builder failed"
        );
        assert_eq!(BuildResult::default().status, MiscFailure);
    }

    fn exit(rs: &[(BuildStatus, bool)]) -> i32 {
        let results: Vec<_> = rs.iter().map(|(s, h)| (BuildResult::new(*s), *h)).collect();
        realise_exit_status(results.iter().map(|(r, h)| (r, *h)))
    }

    #[test]
    fn not_deterministic_is_a_check_mismatch_only_when_the_caller_says() {
        // a differing round of `repeat`: exit 1, as Nix 2.8
        let mut f = FailureFlags::default();
        f.record(&BuildResult::new(NotDeterministic), false);
        assert_eq!(f.failing_exit_status(), 1);
        // `--check`: the goal sets the bit
        f.check_mismatch = true;
        assert_eq!(f.failing_exit_status(), 104);
    }

    fn realisation(hash: &str, output: &str, path: &str) -> Realisation {
        Realisation {
            id: format!("sha256:{}!{output}", hash.repeat(32))
                .parse()
                .unwrap(),
            out_path: crate::store_path::StorePath::from_base_name(path).unwrap(),
            signatures: Default::default(),
            dependent_realisations: BTreeMap::new(),
        }
    }

    const P1: &str = "7rjj86a15146cq1d3qy068lml7n8ykzm-a";
    const P2: &str = "0aqc2dbxwqrpcx3c2wmnqdmm1m2jl0wv-b";

    #[test]
    fn built_outputs_are_a_map_by_id_in_id_order() {
        let mut b = BuiltOutputs::new();
        assert!(b.is_empty());
        assert_eq!(b.insert(realisation("cd", "out", P1)), None);
        assert_eq!(b.insert(realisation("ab", "out", P1)), None);
        assert_eq!(b.insert(realisation("ab", "dev", P1)), None);
        let ids: Vec<String> = b.keys().map(|k| k.to_string()).collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|s| s.parse::<DrvOutput>().unwrap());
        assert_eq!(ids, sorted, "ids in DrvOutput order");
        assert_eq!(b.len(), 3);
        // the same id replaces, as BTreeMap::insert
        let old = b.insert(realisation("ab", "dev", P2)).unwrap();
        assert_eq!(old.out_path.to_string(), P1);
        assert_eq!(b.len(), 3);
        let dev = realisation("ab", "dev", P2);
        assert_eq!(b.get(&dev.id), Some(&dev));
        assert!(b.contains_key(&dev.id));
        assert!(b.iter().all(|(id, r)| *id == r.id));
        b.retain(|id, _| id.output == "out");
        assert_eq!(b.len(), 2);
        assert!(b.get(&dev.id).is_none());
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn built_outputs_from_a_map_or_an_iterator_agree() {
        let rs = [
            realisation("cd", "out", P1),
            realisation("ab", "out", P1),
            realisation("cd", "out", P2),
        ];
        let map: BTreeMap<DrvOutput, Realisation> =
            rs.iter().map(|r| (r.id.clone(), r.clone())).collect();
        let from_map = BuiltOutputs::from(map.clone());
        let from_iter: BuiltOutputs = rs.iter().cloned().collect();
        assert_eq!(from_map, from_iter);
        // the last of one id wins, as in the map
        let pairs: Vec<_> = from_iter
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(pairs, map.into_iter().collect::<Vec<_>>());
        let mut inserted = BuiltOutputs::new();
        for r in rs {
            inserted.insert(r);
        }
        assert_eq!(inserted, from_iter);
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit(&[]), 0);
        assert_eq!(exit(&[(Built, false), (Substituted, false)]), 0);
        assert_eq!(exit(&[(PermanentFailure, false)]), 100);
        assert_eq!(
            exit(&[(PermanentFailure, false), (DependencyFailed, false)]),
            100
        );
        assert_eq!(exit(&[(InputRejected, false)]), 100);
        assert_eq!(exit(&[(TimedOut, false)]), 101);
        assert_eq!(exit(&[(OutputRejected, true)]), 102);
        assert_eq!(exit(&[(NotDeterministic, false)]), 104);
        assert_eq!(exit(&[(TimedOut, false), (OutputRejected, true)]), 103);
        assert_eq!(
            exit(&[(NotDeterministic, false), (PermanentFailure, false)]),
            108
        );
        assert_eq!(exit(&[(OutputRejected, false)]), 1);
        assert_eq!(exit(&[(LogLimitExceeded, false)]), 1);
        assert_eq!(exit(&[(TransientFailure, false)]), 1);
        assert_eq!(exit(&[(NoSubstituters, false)]), 1);
        assert_eq!(exit(&[(DependencyFailed, false), (Built, false)]), 1);
    }
}
