//! `--log-format`: how `drover realise` writes its stderr, as `nix-store` 2.8 does.
//!
//! Nix 2.8 has five log formats (`parseLogFormat`); what each does for
//! `nix-store --realise`, observed:
//!
//! * `raw`: plain messages, builder output *not* echoed, so a failure carries the
//!   log tail (as with `-Q`);
//! * `raw-with-logs`: plain messages and builder output (what drover does without
//!   `--log-format`, as `nix-store` without the flag);
//! * `bar`: the progress bar on a terminal (drover's status line), otherwise as
//!   `raw`;
//! * `bar-with-logs`: as `bar`, and each builder line printed as `<name>> <line>`
//!   (`<name>` the derivation name), failures without the tail;
//! * `internal-json`: every log call as one `@nix <json>` line (Nix's `JSONLogger`),
//!   written by [`JsonLogger`] here.
//!
//! Any other value is refused with `option 'log-format' has an invalid value '…'`.
//!
//! The JSON lines are Nix's: objects with their keys in sorted order (nlohmann's
//! `std::map`), `action` one of `msg`, `start`, `stop`, `result`; activities are
//! numbered `(pid << 32) + n` as Nix numbers them, `parent` is never written (Nix 2.8
//! leaves it out), and `fields` is left out when empty. The activity types and result
//! types are those of Nix 2.8's `logging.hh` ([`act`], [`res`]).

use std::collections::BTreeMap;
use std::str::FromStr;

use drover::build_log::{Field, JsonMessage};
use drover::store_path::{StoreDir, StorePath};
use drover_actors::progress::Counters;
use serde_json::{json, Map, Value};
use thiserror::Error;

/// Nix 2.8's activity types (`ActivityType`).
pub mod act {
    pub const UNKNOWN: u64 = 0;
    pub const COPY_PATH: u64 = 100;
    pub const FILE_TRANSFER: u64 = 101;
    pub const REALISE: u64 = 102;
    pub const COPY_PATHS: u64 = 103;
    pub const BUILDS: u64 = 104;
    pub const BUILD: u64 = 105;
    pub const SUBSTITUTE: u64 = 108;
    pub const QUERY_PATH_INFO: u64 = 109;
}

/// Nix 2.8's result types (`ResultType`).
pub mod res {
    pub const BUILD_LOG_LINE: u64 = 101;
    pub const SET_PHASE: u64 = 104;
    pub const PROGRESS: u64 = 105;
    pub const SET_EXPECTED: u64 = 106;
}

/// Nix's verbosity levels used here.
pub mod lvl {
    pub const ERROR: u64 = 0;
    pub const WARN: u64 = 1;
    pub const INFO: u64 = 3;
    pub const TALKATIVE: u64 = 4;
    pub const DEBUG: u64 = 6;
}

/// One of Nix 2.8's `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Raw,
    RawWithLogs,
    InternalJson,
    Bar,
    BarWithLogs,
}

/// A `--log-format` value Nix does not know.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("option 'log-format' has an invalid value '{0}'")]
pub struct BadLogFormat(pub String);

impl FromStr for LogFormat {
    type Err = BadLogFormat;
    fn from_str(s: &str) -> Result<LogFormat, BadLogFormat> {
        Ok(match s {
            "raw" => LogFormat::Raw,
            "raw-with-logs" => LogFormat::RawWithLogs,
            "internal-json" => LogFormat::InternalJson,
            "bar" => LogFormat::Bar,
            "bar-with-logs" => LogFormat::BarWithLogs,
            _ => return Err(BadLogFormat(s.to_owned())),
        })
    }
}

impl LogFormat {
    /// Whether builder output is echoed verbatim by the log collector (Nix's
    /// `isVerbose()` for the plain loggers). With `false` a failure message carries
    /// the log tail; JSON and `bar-with-logs` show the lines through events instead.
    pub fn echo(self) -> bool {
        matches!(self, LogFormat::RawWithLogs)
    }

    /// Whether failures leave out the log tail (the logger shows the whole log).
    pub fn shows_logs(self) -> bool {
        matches!(
            self,
            LogFormat::RawWithLogs | LogFormat::InternalJson | LogFormat::BarWithLogs
        )
    }

    /// Whether a status line may be drawn (on a terminal).
    pub fn bar(self) -> bool {
        matches!(self, LogFormat::Bar | LogFormat::BarWithLogs)
    }
}

/// One JSON object with its keys sorted, as nlohmann writes it.
fn sorted(pairs: Vec<(&str, Value)>) -> Value {
    let mut pairs = pairs;
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let mut m = Map::new();
    for (k, v) in pairs {
        m.insert(k.to_owned(), v);
    }
    Value::Object(m)
}

fn line_of(v: &Value) -> String {
    format!("@nix {v}\n")
}

/// Nix's `ANSI_WARNING`/`ANSI_RED` + bold prefixes of warnings and errors.
const WARNING_PREFIX: &str = "\x1b[35;1mwarning:\x1b[0m ";
const ERROR_PREFIX: &str = "\x1b[31;1merror:\x1b[0m ";

/// The state of the JSON logger: activity ids and the activities still open.
#[derive(Debug)]
pub struct JsonLogger {
    store_dir: StoreDir,
    next_id: u64,
    realise: Option<u64>,
    builds: Option<u64>,
    copy_paths: Option<u64>,
    building: BTreeMap<StorePath, u64>,
    /// A substitution's `actSubstitute` and its `actCopyPath`.
    substituting: BTreeMap<StorePath, (u64, u64)>,
    /// Bytes written to the logger that are not yet a whole line.
    partial: Vec<u8>,
    /// Builds that finished: Nix updates the progress before their activity ends.
    pending_stops: Vec<u64>,
    /// Activities of builders and hooks (their id) → the id they are shown under.
    forwarded: BTreeMap<(StorePath, u64), u64>,
}

impl JsonLogger {
    /// A logger numbering activities from `(pid << 32) + 0`, as Nix does.
    pub fn new(store_dir: StoreDir) -> JsonLogger {
        JsonLogger::with_first_id(store_dir, u64::from(std::process::id()) << 32)
    }

    pub fn with_first_id(store_dir: StoreDir, first: u64) -> JsonLogger {
        JsonLogger {
            store_dir,
            next_id: first,
            realise: None,
            builds: None,
            copy_paths: None,
            building: BTreeMap::new(),
            substituting: BTreeMap::new(),
            partial: Vec::new(),
            pending_stops: Vec::new(),
            forwarded: BTreeMap::new(),
        }
    }

    fn start(&mut self, level: u64, ty: u64, text: &str, fields: Vec<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut pairs = vec![
            ("action", json!("start")),
            ("id", json!(id)),
            ("level", json!(level)),
            ("text", json!(text)),
            ("type", json!(ty)),
        ];
        if !fields.is_empty() {
            pairs.push(("fields", Value::Array(fields)));
        }
        (id, line_of(&sorted(pairs)))
    }

    fn stop(id: u64) -> String {
        line_of(&sorted(vec![("action", json!("stop")), ("id", json!(id))]))
    }

    fn result(id: u64, ty: u64, fields: Vec<Value>) -> String {
        line_of(&sorted(vec![
            ("action", json!("result")),
            ("fields", Value::Array(fields)),
            ("id", json!(id)),
            ("type", json!(ty)),
        ]))
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// Starts an activity the caller stops with [`stop_activity`](Self::stop_activity).
    pub fn start_activity(
        &mut self,
        level: u64,
        ty: u64,
        text: &str,
        fields: Vec<Value>,
    ) -> (u64, String) {
        self.start(level, ty, text, fields)
    }

    pub fn stop_activity(id: u64) -> String {
        Self::stop(id)
    }

    /// The Worker starts: `actRealise`, `actBuilds`, `actCopyPaths`.
    pub fn worker_started(&mut self) -> String {
        let mut out = String::new();
        for (slot, ty) in [(0, act::REALISE), (1, act::BUILDS), (2, act::COPY_PATHS)] {
            let (id, s) = self.start(lvl::ERROR, ty, "", Vec::new());
            out.push_str(&s);
            match slot {
                0 => self.realise = Some(id),
                1 => self.builds = Some(id),
                _ => self.copy_paths = Some(id),
            }
        }
        out
    }

    /// Nix's `Worker::updateProgress`: progress of builds and copies, expected bytes.
    pub fn counters(&mut self, c: &Counters) -> String {
        let (Some(r), Some(b), Some(p)) = (self.realise, self.builds, self.copy_paths) else {
            return String::new();
        };
        let mut out = Self::result(
            b,
            res::PROGRESS,
            vec![
                json!(c.done_builds),
                json!(c.expected_builds + c.done_builds),
                json!(c.running_builds),
                json!(c.failed_builds),
            ],
        );
        out += &Self::result(
            p,
            res::PROGRESS,
            vec![
                json!(c.done_substitutions),
                json!(c.expected_substitutions + c.done_substitutions),
                json!(c.running_substitutions),
                json!(c.failed_substitutions),
            ],
        );
        out += &Self::result(
            r,
            res::SET_EXPECTED,
            vec![
                json!(act::FILE_TRANSFER),
                json!(c.expected_download_size + c.done_download_size),
            ],
        );
        out += &Self::result(
            r,
            res::SET_EXPECTED,
            vec![
                json!(act::COPY_PATH),
                json!(c.expected_nar_size + c.done_nar_size),
            ],
        );
        out + &self.flush_stops()
    }

    fn flush_stops(&mut self) -> String {
        std::mem::take(&mut self.pending_stops)
            .into_iter()
            .map(Self::stop)
            .collect()
    }

    /// `DerivationGoal::started`: `actBuild` with `[drv, machine, round, rounds]`.
    pub fn build_started(&mut self, drv: &StorePath, text: &str, machine: &str) -> String {
        let fields = vec![
            json!(self.store_dir.print(drv)),
            json!(machine),
            json!(1),
            json!(1),
        ];
        let (id, s) = self.start(lvl::INFO, act::BUILD, text, fields);
        if let Some(old) = self.building.insert(drv.clone(), id) {
            return Self::stop(old) + &s;
        }
        s
    }

    /// A line of the build's log (`resBuildLogLine`).
    pub fn build_log_line(&mut self, drv: &StorePath, line: &str) -> String {
        match self.building.get(drv) {
            Some(id) => Self::result(*id, res::BUILD_LOG_LINE, vec![json!(line)]),
            None => String::new(),
        }
    }

    /// `@nix {"action":"setPhase",…}` from the builder (`resSetPhase`).
    pub fn build_phase(&mut self, drv: &StorePath, phase: &str) -> String {
        match self.building.get(drv) {
            Some(id) => Self::result(*id, res::SET_PHASE, vec![json!(phase)]),
            None => String::new(),
        }
    }

    /// The build's activity stops after the next progress update (as in Nix, where
    /// the goal's `done` updates the progress and then drops the activity).
    pub fn build_finished(&mut self, drv: &StorePath) -> String {
        if let Some(id) = self.building.remove(drv) {
            self.pending_stops.push(id);
        }
        String::new()
    }

    /// An activity of the build's builder or hook (`handleJSONLogMessage`): shown
    /// under an id of this logger's, with the sender's level, type, text, fields
    /// and results.
    pub fn forwarded_activity(&mut self, drv: &StorePath, m: &JsonMessage) -> String {
        let value = |f: &Field| match f {
            Field::Int(i) => json!(i),
            Field::String(s) => json!(s),
        };
        match m {
            JsonMessage::Start {
                id,
                level,
                activity_type,
                text,
                fields,
                ..
            } => {
                let fields = fields.iter().map(value).collect();
                let (new, s) = self.start(*level, *activity_type, text, fields);
                self.forwarded.insert((drv.clone(), *id), new);
                s
            }
            JsonMessage::Result {
                id,
                result_type,
                fields,
            } => match self.forwarded.get(&(drv.clone(), *id)) {
                Some(new) => Self::result(*new, *result_type, fields.iter().map(value).collect()),
                None => String::new(),
            },
            JsonMessage::Stop { id } => self
                .forwarded
                .remove(&(drv.clone(), *id))
                .map(Self::stop)
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// `PathSubstitutionGoal::tryToRun` (`actSubstitute`, fields `[path, uri]`) and
    /// `copyStorePath` (`actCopyPath`, `[path, uri, "local"]`).
    pub fn substitution_started(&mut self, path: &StorePath, uri: &str, text: &str) -> String {
        let mut out = self.substitution_finished(path);
        let p = self.store_dir.print(path);
        let (sub, s) = self.start(lvl::ERROR, act::SUBSTITUTE, "", vec![json!(p), json!(uri)]);
        out += &s;
        let (copy, s) = self.start(
            lvl::INFO,
            act::COPY_PATH,
            text,
            vec![json!(p), json!(uri), json!("local")],
        );
        out += &s;
        self.substituting.insert(path.clone(), (sub, copy));
        out
    }

    pub fn substitution_finished(&mut self, path: &StorePath) -> String {
        match self.substituting.remove(path) {
            Some((sub, copy)) => Self::stop(copy) + &Self::stop(sub),
            None => String::new(),
        }
    }

    /// The Worker is done: every activity still open stops, the top ones last.
    pub fn worker_finished(&mut self) -> String {
        let mut out = self.flush_stops();
        for id in std::mem::take(&mut self.building).into_values() {
            out += &Self::stop(id);
        }
        for (sub, copy) in std::mem::take(&mut self.substituting).into_values() {
            out += &(Self::stop(copy) + &Self::stop(sub));
        }
        for id in [
            self.copy_paths.take(),
            self.builds.take(),
            self.realise.take(),
        ]
        .into_iter()
        .flatten()
        {
            out += &Self::stop(id);
        }
        out
    }

    /// A message line as drover prints it (`error: …`, `warning: …`, or plain), as
    /// Nix's JSON logger writes it: errors as `logEI` (level 0, `raw_msg`, no
    /// position), warnings at level 1, everything else at `lvlInfo`.
    pub fn message(&self, line: &str) -> String {
        if let Some(e) = line.strip_prefix("error: ") {
            let raw = e.replace("\n       ", "\n");
            let raw = self.highlight(&raw);
            let shown = format!("{ERROR_PREFIX}{}", raw.replace('\n', "\n       "));
            line_of(&sorted(vec![
                ("action", json!("msg")),
                ("column", Value::Null),
                ("file", Value::Null),
                ("level", json!(lvl::ERROR)),
                ("line", Value::Null),
                ("msg", json!(shown)),
                ("raw_msg", json!(raw)),
            ]))
        } else if let Some(w) = line.strip_prefix("warning: ") {
            self.msg(lvl::WARN, &format!("{WARNING_PREFIX}{w}"))
        } else {
            self.msg(lvl::INFO, line)
        }
    }

    fn msg(&self, level: u64, text: &str) -> String {
        line_of(&sorted(vec![
            ("action", json!("msg")),
            ("level", json!(level)),
            ("msg", json!(text)),
        ]))
    }

    /// Bytes written as text (hook output, collector messages): each whole line is
    /// a [`message`](Self::message); a partial line waits for its end.
    pub fn write(&mut self, bytes: &[u8]) -> String {
        self.partial.extend_from_slice(bytes);
        let mut out = String::new();
        while let Some(nl) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            out += &self.message(&text);
        }
        out
    }

    /// Nix's error formatting highlights the store paths it names (`'%s'` with
    /// `yellowtxt`, bold magenta): `'<store path>'` in a message gets the same.
    fn highlight(&self, msg: &str) -> String {
        let prefix = format!("'{}/", self.store_dir.as_str());
        let mut out = String::with_capacity(msg.len());
        let mut rest = msg;
        while let Some(at) = rest.find(&prefix) {
            let after = &rest[at + 1..];
            match after.find('\'') {
                Some(end) => {
                    out.push_str(&rest[..at + 1]);
                    out.push_str("\x1b[35;1m");
                    out.push_str(&after[..end]);
                    out.push_str("\x1b[0m'");
                    rest = &after[end + 1..];
                }
                None => break,
            }
        }
        out.push_str(rest);
        out
    }
}

/// Nix's `filterANSIEscapes` as a stream (the library's: one implementation for
/// the log collectors and the display).
pub use drover::build_log::ansi::AnsiFilter;

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn drv() -> StorePath {
        sd().parse(&format!("/nix/store/{}-a.drv", "a".repeat(32)))
            .unwrap()
    }

    #[test]
    fn ansi_filter_as_nix_2_8_filters_a_builder_line() {
        // Observed: `printf 'a\tb\033[1mbold\033[0m\033]0;title\007x\ty'` in a
        // builder, echoed by nix-store off a terminal and on one.
        let line = b"a\tb\x1b[1mbold\x1b[0m\x1b]0;title\x07x\ty\nab\tc\x07\n";
        assert_eq!(
            AnsiFilter::new(true).filter(line),
            b"a       bbold0;titlex   y\nab      c\n"
        );
        let mut tty = AnsiFilter::new(false);
        assert_eq!(
            tty.filter(b"a\tb\x1b[1mbold\x1b[0m\x1b]0;x"),
            b"a       b\x1b[1mbold\x1b[0m0;x".to_vec()
        );
        // The column carries over between writes; UTF-8 counts per character.
        let mut f = AnsiFilter::new(true);
        assert_eq!(f.filter("é".as_bytes()), "é".as_bytes());
        assert_eq!(f.filter(b"\tx\n\ty"), b"       x\n        y");
    }

    #[test]
    fn formats_nix_accepts_and_the_error_for_others() {
        for (s, f) in [
            ("raw", LogFormat::Raw),
            ("raw-with-logs", LogFormat::RawWithLogs),
            ("internal-json", LogFormat::InternalJson),
            ("bar", LogFormat::Bar),
            ("bar-with-logs", LogFormat::BarWithLogs),
        ] {
            assert_eq!(s.parse::<LogFormat>(), Ok(f));
        }
        assert_eq!(
            "json".parse::<LogFormat>().unwrap_err().to_string(),
            "option 'log-format' has an invalid value 'json'"
        );
        assert!(!LogFormat::Raw.echo() && !LogFormat::Raw.shows_logs());
        assert!(LogFormat::BarWithLogs.shows_logs() && !LogFormat::BarWithLogs.echo());
    }

    #[test]
    fn a_build_as_nix_writes_it() {
        let mut j = JsonLogger::with_first_id(sd(), 10);
        let p = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv";
        let mut s = j.worker_started();
        s += &j.counters(&Counters {
            expected_builds: 1,
            ..Default::default()
        });
        s += &j.build_started(&drv(), &format!("building '{p}'"), "");
        s += &j.build_log_line(&drv(), "hello \x1b[1m\"é\"");
        s += &j.build_phase(&drv(), "unpackPhase");
        s += &j.build_finished(&drv());
        s += &j.build_log_line(&drv(), "late");
        s += &j.counters(&Counters {
            done_builds: 1,
            ..Default::default()
        });
        s += &j.worker_finished();
        let want = format!(
            r#"@nix {{"action":"start","id":10,"level":0,"text":"","type":102}}
@nix {{"action":"start","id":11,"level":0,"text":"","type":104}}
@nix {{"action":"start","id":12,"level":0,"text":"","type":103}}
@nix {{"action":"result","fields":[0,1,0,0],"id":11,"type":105}}
@nix {{"action":"result","fields":[0,0,0,0],"id":12,"type":105}}
@nix {{"action":"result","fields":[101,0],"id":10,"type":106}}
@nix {{"action":"result","fields":[100,0],"id":10,"type":106}}
@nix {{"action":"start","fields":["{p}","",1,1],"id":13,"level":3,"text":"building '{p}'","type":105}}
@nix {{"action":"result","fields":["hello \u001b[1m\"é\""],"id":13,"type":101}}
@nix {{"action":"result","fields":["unpackPhase"],"id":13,"type":104}}
@nix {{"action":"result","fields":[1,1,0,0],"id":11,"type":105}}
@nix {{"action":"result","fields":[0,0,0,0],"id":12,"type":105}}
@nix {{"action":"result","fields":[101,0],"id":10,"type":106}}
@nix {{"action":"result","fields":[100,0],"id":10,"type":106}}
@nix {{"action":"stop","id":13}}
@nix {{"action":"stop","id":12}}
@nix {{"action":"stop","id":11}}
@nix {{"action":"stop","id":10}}
"#
        );
        assert_eq!(s, want);
    }

    #[test]
    fn a_builders_file_transfer_is_shown_under_a_new_id() {
        let mut j = JsonLogger::with_first_id(sd(), 7);
        let start = JsonMessage::Start {
            id: 99,
            level: 4,
            activity_type: 101,
            text: "downloading 'file:///x'".into(),
            parent: 0,
            fields: vec![Field::String("file:///x".into())],
        };
        assert_eq!(
            j.forwarded_activity(&drv(), &start),
            "@nix {\"action\":\"start\",\"fields\":[\"file:///x\"],\"id\":7,\"level\":4,\"text\":\"downloading 'file:///x'\",\"type\":101}\n"
        );
        let progress = JsonMessage::Result {
            id: 99,
            result_type: 105,
            fields: vec![Field::Int(3), Field::Int(3), Field::Int(0), Field::Int(0)],
        };
        assert_eq!(
            j.forwarded_activity(&drv(), &progress),
            "@nix {\"action\":\"result\",\"fields\":[3,3,0,0],\"id\":7,\"type\":105}\n"
        );
        let stop = JsonMessage::Stop { id: 99 };
        assert_eq!(
            j.forwarded_activity(&drv(), &stop),
            "@nix {\"action\":\"stop\",\"id\":7}\n"
        );
        assert_eq!(j.forwarded_activity(&drv(), &stop), "");
        assert_eq!(j.forwarded_activity(&drv(), &progress), "");
    }

    #[test]
    fn a_substitution_opens_two_activities() {
        let mut j = JsonLogger::with_first_id(sd(), 0);
        let path = sd()
            .parse(&format!("/nix/store/{}-x", "b".repeat(32)))
            .unwrap();
        let s = j.substitution_started(&path, "file:///c", "copying path 'x' from 'file:///c'");
        assert!(s.contains(r#""fields":["/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x","file:///c"],"id":0,"level":0,"text":"","type":108"#), "{s}");
        assert!(s.contains(r#""fields":["/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x","file:///c","local"],"id":1,"level":3,"text":"copying path 'x' from 'file:///c'","type":100"#), "{s}");
        assert_eq!(
            j.substitution_finished(&path),
            "@nix {\"action\":\"stop\",\"id\":1}\n@nix {\"action\":\"stop\",\"id\":0}\n"
        );
        assert_eq!(j.substitution_finished(&path), "");
    }

    #[test]
    fn messages_warnings_and_errors() {
        let mut j = JsonLogger::with_first_id(sd(), 0);
        assert_eq!(
            j.message("these 2 paths will be fetched"),
            "@nix {\"action\":\"msg\",\"level\":3,\"msg\":\"these 2 paths will be fetched\"}\n"
        );
        assert_eq!(
            j.message("warning: you did not specify '--add-root'"),
            "@nix {\"action\":\"msg\",\"level\":1,\"msg\":\"\\u001b[35;1mwarning:\\u001b[0m you did not specify '--add-root'\"}\n"
        );
        let p = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a.drv";
        let e = j.message(&format!(
            "error: builder for '{p}' failed with exit code 3\n       more"
        ));
        assert_eq!(
            e,
            format!(
                "@nix {{\"action\":\"msg\",\"column\":null,\"file\":null,\"level\":0,\"line\":null,\
                 \"msg\":\"\\u001b[31;1merror:\\u001b[0m builder for '\\u001b[35;1m{p}\\u001b[0m' failed with exit code 3\\n       more\",\
                 \"raw_msg\":\"builder for '\\u001b[35;1m{p}\\u001b[0m' failed with exit code 3\\nmore\"}}\n"
            )
        );
        // Text written in pieces becomes one message per whole line.
        assert_eq!(j.write(b"half"), "");
        assert_eq!(
            j.write(b" line\nnext"),
            "@nix {\"action\":\"msg\",\"level\":3,\"msg\":\"half line\"}\n"
        );
    }
}
