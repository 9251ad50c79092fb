//! The actor system's events as the activities Nix 2.8's daemon sends during a
//! build (`Worker`: `actRealise`, `actBuilds`, `actCopyPaths` with their
//! progress; `DerivationGoal::started`: `actBuild` with `[drv, machine, round,
//! rounds]` and `resBuildLogLine`/`resSetPhase`; `PathSubstitutionGoal`:
//! `actSubstitute` `[path, uri]` around `copyStorePath`'s `actCopyPath`
//! `[path, uri, "local"]`), so a client's progress bar, `-L` and
//! `--log-format internal-json` show a drover build as they show Nix's. The
//! builder's own `@nix` activities that Nix accepts (`handleJSONLogMessage`:
//! file transfers of a builder, any of the hook's) are forwarded as children of
//! the build's activity under ids of the daemon's, as Nix re-creates them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use drover::store_path::{StoreDir, StorePath};
use drover::worker_protocol::{ActivityType, Field, LoggerMessage, ResultType, Verbosity};

use drover::build_log::{Field as JsonField, JsonMessage};

use crate::messages::BuildLogEvent;
use crate::progress::ProgressEvent;
use crate::SystemEvent;

/// Activity ids as Nix makes them: the process id in the high half.
pub fn next_activity_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(1);
    ((std::process::id() as u64) << 32) + N.fetch_add(1, Ordering::Relaxed)
}

/// One realisation's activities.
pub struct Activities {
    store_dir: StoreDir,
    realise: u64,
    builds: u64,
    copy_paths: u64,
    building: BTreeMap<StorePath, u64>,
    /// (actSubstitute, actCopyPath) of each substitution.
    substituting: BTreeMap<StorePath, (u64, u64)>,
    /// Whether the Worker's `queryMissing` activity is still to be sent (it
    /// comes after the first progress report when substitutes are used).
    query_missing_pending: bool,
    /// Builds that finished: Nix stops their activity when the goal goes, after
    /// the progress report of its end.
    pending_stops: Vec<u64>,
    /// A substitution's activities wait for the progress report that counts it
    /// as running, which Nix sends first.
    pending_starts: Vec<LoggerMessage>,
    /// The last progress report, while nothing else was sent after it: an
    /// identical one is not repeated.
    last_counters: Option<crate::progress::Counters>,
    /// The narinfo queries of the Worker's `queryMissing` (path, substituter).
    queries: Vec<(String, String)>,
    /// The forwarded `@nix` activities: (derivation, the sender's id) → ours.
    forwarded: BTreeMap<(StorePath, u64), u64>,
}

fn start(
    kind: ActivityType,
    level: Verbosity,
    text: String,
    fields: Vec<Field>,
    parent: u64,
) -> (u64, LoggerMessage) {
    let id = next_activity_id();
    (
        id,
        LoggerMessage::StartActivity {
            id,
            level,
            kind,
            text,
            fields,
            parent,
        },
    )
}

impl Activities {
    /// Starts the Worker's three activities.
    pub fn start(
        store_dir: StoreDir,
        use_substitutes: bool,
        queries: Vec<(String, String)>,
        out: &mut dyn FnMut(LoggerMessage),
    ) -> Activities {
        let mut ids = [0; 3];
        for (i, t) in [
            ActivityType::Realise,
            ActivityType::Builds,
            ActivityType::CopyPaths,
        ]
        .into_iter()
        .enumerate()
        {
            let (id, m) = start(t, Verbosity::Error, String::new(), Vec::new(), 0);
            ids[i] = id;
            out(m);
        }
        Activities {
            store_dir,
            realise: ids[0],
            builds: ids[1],
            copy_paths: ids[2],
            building: BTreeMap::new(),
            substituting: BTreeMap::new(),
            query_missing_pending: use_substitutes,
            pending_stops: Vec::new(),
            pending_starts: Vec::new(),
            last_counters: None,
            queries,
            forwarded: BTreeMap::new(),
        }
    }

    /// Translates one event.
    pub fn event(&mut self, ev: SystemEvent, out: &mut dyn FnMut(LoggerMessage)) {
        let is_counters = matches!(ev, SystemEvent::Progress(ProgressEvent::Counters(_)));
        let starts_substitution = matches!(
            ev,
            SystemEvent::Progress(ProgressEvent::SubstitutionStarted { .. })
        );
        if !is_counters {
            self.last_counters = None;
            if !starts_substitution {
                for m in std::mem::take(&mut self.pending_starts) {
                    out(m);
                }
            }
        }
        let sd = &self.store_dir;
        match ev {
            SystemEvent::Progress(p) => match p {
                ProgressEvent::Counters(c) => {
                    if self.last_counters == Some(c) && self.pending_starts.is_empty() {
                        return;
                    }
                    self.last_counters = Some(c);
                    let int = Field::Int;
                    out(LoggerMessage::Result {
                        id: self.builds,
                        kind: ResultType::Progress,
                        fields: vec![
                            int(c.done_builds),
                            int(c.expected_builds + c.done_builds),
                            int(c.running_builds),
                            int(c.failed_builds),
                        ],
                    });
                    out(LoggerMessage::Result {
                        id: self.copy_paths,
                        kind: ResultType::Progress,
                        fields: vec![
                            int(c.done_substitutions),
                            int(c.expected_substitutions + c.done_substitutions),
                            int(c.running_substitutions),
                            int(c.failed_substitutions),
                        ],
                    });
                    out(LoggerMessage::Result {
                        id: self.realise,
                        kind: ResultType::SetExpected,
                        fields: vec![
                            int(ActivityType::FileTransfer as u64),
                            int(c.expected_download_size + c.done_download_size),
                        ],
                    });
                    out(LoggerMessage::Result {
                        id: self.realise,
                        kind: ResultType::SetExpected,
                        fields: vec![
                            int(ActivityType::CopyPath as u64),
                            int(c.expected_nar_size + c.done_nar_size),
                        ],
                    });
                    for id in std::mem::take(&mut self.pending_stops) {
                        out(LoggerMessage::StopActivity(id));
                    }
                    for m in std::mem::take(&mut self.pending_starts) {
                        out(m);
                        self.last_counters = None;
                    }
                    if std::mem::take(&mut self.query_missing_pending) {
                        // `Worker::run`'s `queryMissing` of the top goals.
                        let (id, m) = start(
                            ActivityType::Unknown,
                            Verbosity::Debug,
                            "querying info about missing paths".into(),
                            Vec::new(),
                            0,
                        );
                        out(m);
                        for (path, uri) in std::mem::take(&mut self.queries) {
                            let (q, m) = start(
                                ActivityType::QueryPathInfo,
                                Verbosity::Talkative,
                                format!("querying info about '{path}' on '{uri}'"),
                                vec![Field::String(path), Field::String(uri)],
                                id,
                            );
                            out(m);
                            out(LoggerMessage::StopActivity(q));
                        }
                        out(LoggerMessage::StopActivity(id));
                        self.last_counters = None;
                    }
                }
                ProgressEvent::BuildStarted {
                    drv_path,
                    machine,
                    verb,
                    round,
                } => {
                    let (r, n) = round.unwrap_or((1, 1));
                    let mut text = format!("{verb} '{}'", sd.print(&drv_path));
                    if n > 1 && verb == "building" {
                        text.push_str(&format!(" (round {r}/{n})"));
                    }
                    if let Some(m) = &machine {
                        text.push_str(&format!(" on '{m}'"));
                    }
                    let fields = vec![
                        Field::String(sd.print(&drv_path)),
                        Field::String(machine.unwrap_or_default()),
                        Field::Int(r as u64),
                        Field::Int(n as u64),
                    ];
                    let (id, m) = start(ActivityType::Build, Verbosity::Info, text, fields, 0);
                    out(m);
                    if let Some(old) = self.building.insert(drv_path, id) {
                        out(LoggerMessage::StopActivity(old));
                    }
                }
                ProgressEvent::BuildFinished { drv_path, .. } => {
                    // The goal's forwarded activities end with it.
                    self.stop_forwarded(Some(&drv_path), out);
                    if let Some(id) = self.building.remove(&drv_path) {
                        self.pending_stops.push(id);
                    }
                }
                ProgressEvent::SubstitutionStarted { path, uri, .. } => {
                    let p = sd.print(&path);
                    let (sub, m) = start(
                        ActivityType::Substitute,
                        Verbosity::Error,
                        String::new(),
                        vec![Field::String(p.clone()), Field::String(uri.clone())],
                        0,
                    );
                    self.pending_starts.push(m);
                    let (copy, m) = start(
                        ActivityType::CopyPath,
                        Verbosity::Info,
                        format!("copying path '{p}' from '{uri}'"),
                        vec![
                            Field::String(p),
                            Field::String(uri),
                            Field::String("local".into()),
                        ],
                        sub,
                    );
                    self.pending_starts.push(m);
                    if let Some((a, b)) = self.substituting.insert(path, (sub, copy)) {
                        out(LoggerMessage::StopActivity(b));
                        out(LoggerMessage::StopActivity(a));
                    }
                }
                ProgressEvent::SubstitutionFinished { path, .. }
                | ProgressEvent::SubstitutionCancelled { path } => {
                    if let Some((a, b)) = self.substituting.remove(&path) {
                        out(LoggerMessage::StopActivity(b));
                        out(LoggerMessage::StopActivity(a));
                    }
                }
                // A dependency's error, logged as Nix's daemon logs it.
                ProgressEvent::Message(m) => {
                    out(LoggerMessage::Next(match m.strip_prefix("error: ") {
                        Some(e) => super::session::logged_error(e),
                        None => m,
                    }))
                }
                ProgressEvent::GoalStarted { .. }
                | ProgressEvent::GoalFinished { .. }
                | ProgressEvent::Scheduled { .. }
                | ProgressEvent::Waiting { .. }
                | ProgressEvent::SubstitutionSizes { .. }
                | ProgressEvent::Estimates(_) => {}
            },
            SystemEvent::Log(l) => match l {
                BuildLogEvent::Line { drv_path, line } => {
                    if let Some(&id) = self.building.get(&drv_path) {
                        out(LoggerMessage::Result {
                            id,
                            kind: ResultType::BuildLogLine,
                            fields: vec![Field::String(line)],
                        });
                    }
                }
                BuildLogEvent::Phase { drv_path, phase } => {
                    if let Some(&id) = self.building.get(&drv_path) {
                        out(LoggerMessage::Result {
                            id,
                            kind: ResultType::SetPhase,
                            fields: vec![Field::String(phase)],
                        });
                    }
                }
                BuildLogEvent::Message { msg, .. } => out(LoggerMessage::Next(msg)),
                BuildLogEvent::Activity { drv_path, message } => {
                    self.forward(drv_path, message, out);
                }
            },
        }
    }

    /// One `@nix` start/stop/result the log collector accepted: Nix makes a
    /// new `Activity` (its own id, the build's as parent) for a start, and
    /// sends results and the stop under that id. A type Nix 2.8 does not
    /// define cannot be sent through the typed logger: it is dropped.
    fn forward(
        &mut self,
        drv_path: StorePath,
        message: JsonMessage,
        out: &mut dyn FnMut(LoggerMessage),
    ) {
        let fields = |fs: Vec<JsonField>| -> Vec<Field> {
            fs.into_iter()
                .map(|f| match f {
                    JsonField::Int(i) => Field::Int(i),
                    JsonField::String(s) => Field::String(s),
                })
                .collect()
        };
        match message {
            JsonMessage::Start {
                id,
                level,
                activity_type,
                text,
                fields: fs,
                ..
            } => {
                let Some(kind) = ActivityType::from_code(activity_type) else {
                    return;
                };
                let parent = self
                    .building
                    .get(&drv_path)
                    .copied()
                    .unwrap_or(self.realise);
                let (new, m) = start(kind, Verbosity::from_code(level), text, fields(fs), parent);
                if let Some(old) = self.forwarded.insert((drv_path, id), new) {
                    out(LoggerMessage::StopActivity(old));
                }
                out(m);
            }
            JsonMessage::Result {
                id,
                result_type,
                fields: fs,
            } => {
                let (Some(&new), Some(kind)) = (
                    self.forwarded.get(&(drv_path, id)),
                    ResultType::from_code(result_type),
                ) else {
                    return;
                };
                out(LoggerMessage::Result {
                    id: new,
                    kind,
                    fields: fields(fs),
                });
            }
            JsonMessage::Stop { id } => {
                if let Some(new) = self.forwarded.remove(&(drv_path, id)) {
                    out(LoggerMessage::StopActivity(new));
                }
            }
            JsonMessage::SetPhase { .. } | JsonMessage::Msg { .. } | JsonMessage::Other { .. } => {}
        }
    }

    /// Stops the forwarded activities of one derivation (all with `None`).
    fn stop_forwarded(&mut self, drv_path: Option<&StorePath>, out: &mut dyn FnMut(LoggerMessage)) {
        let keys: Vec<(StorePath, u64)> = self
            .forwarded
            .keys()
            .filter(|(d, _)| drv_path.is_none_or(|p| p == d))
            .cloned()
            .collect();
        for k in keys {
            if let Some(id) = self.forwarded.remove(&k) {
                out(LoggerMessage::StopActivity(id));
            }
        }
    }

    /// Stops whatever is still running, then the Worker's activities.
    pub fn finish(mut self, out: &mut dyn FnMut(LoggerMessage)) {
        self.stop_forwarded(None, out);
        for m in self.pending_starts {
            out(m);
        }
        for id in self.pending_stops {
            out(LoggerMessage::StopActivity(id));
        }
        for (_, id) in self.building {
            out(LoggerMessage::StopActivity(id));
        }
        for (_, (a, b)) in self.substituting {
            out(LoggerMessage::StopActivity(b));
            out(LoggerMessage::StopActivity(a));
        }
        for id in [self.copy_paths, self.builds, self.realise] {
            out(LoggerMessage::StopActivity(id));
        }
    }

    /// The store path an event is about, for fanning events out to the clients
    /// whose requests they serve (`None`: every client).
    pub fn subject(ev: &SystemEvent) -> Option<&StorePath> {
        match ev {
            SystemEvent::Progress(p) => match p {
                ProgressEvent::BuildStarted { drv_path, .. }
                | ProgressEvent::BuildFinished { drv_path, .. } => Some(drv_path),
                ProgressEvent::SubstitutionStarted { path, .. }
                | ProgressEvent::SubstitutionFinished { path, .. }
                | ProgressEvent::SubstitutionCancelled { path } => Some(path),
                _ => None,
            },
            SystemEvent::Log(l) => match l {
                BuildLogEvent::Line { drv_path, .. }
                | BuildLogEvent::Phase { drv_path, .. }
                | BuildLogEvent::Message { drv_path, .. }
                | BuildLogEvent::Activity { drv_path, .. } => Some(drv_path),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Counters;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn kinds(ms: &[LoggerMessage]) -> Vec<String> {
        ms.iter()
            .map(|m| match m {
                LoggerMessage::StartActivity { kind, text, .. } => format!("start {kind:?} {text}"),
                LoggerMessage::StopActivity(_) => "stop".into(),
                LoggerMessage::Result { kind, fields, .. } => format!("result {kind:?} {fields:?}"),
                LoggerMessage::Next(s) => format!("next {s}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_build_as_nix_daemon_reports_it() {
        let drv = sd()
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a.drv")
            .unwrap();
        let mut out = Vec::new();
        let mut push = |m| out.push(m);
        let mut a = Activities::start(sd(), true, Vec::new(), &mut push);
        let counters = Counters {
            expected_builds: 1,
            ..Default::default()
        };
        a.event(
            SystemEvent::Progress(ProgressEvent::Counters(counters)),
            &mut push,
        );
        a.event(
            SystemEvent::Progress(ProgressEvent::BuildStarted {
                drv_path: drv.clone(),
                machine: None,
                verb: "building",
                round: None,
            }),
            &mut push,
        );
        a.event(
            SystemEvent::Log(BuildLogEvent::Line {
                drv_path: drv.clone(),
                line: "hello".into(),
            }),
            &mut push,
        );
        a.event(
            SystemEvent::Progress(ProgressEvent::BuildFinished {
                drv_path: drv.clone(),
                status: drover::build_result::BuildStatus::Built,
            }),
            &mut push,
        );
        let done = Counters {
            done_builds: 1,
            ..Default::default()
        };
        a.event(
            SystemEvent::Progress(ProgressEvent::Counters(done)),
            &mut push,
        );
        a.finish(&mut push);
        let k = kinds(&out);
        assert_eq!(k[0], "start Realise ");
        assert_eq!(k[1], "start Builds ");
        assert_eq!(k[2], "start CopyPaths ");
        assert_eq!(k[3], "result Progress [Int(0), Int(1), Int(0), Int(0)]");
        assert_eq!(k[7], "start Unknown querying info about missing paths");
        assert_eq!(k[8], "stop");
        assert_eq!(
            k[9],
            "start Build building '/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a.drv'"
        );
        assert_eq!(k[10], "result BuildLogLine [String(\"hello\")]");
        // The build's activity stops after the progress report of its end.
        assert_eq!(k[11], "result Progress [Int(1), Int(1), Int(0), Int(0)]");
        assert_eq!(k[15], "stop");
        assert_eq!(k[16..], ["stop", "stop", "stop"]);
        assert_eq!(k.len(), 19);
    }

    #[test]
    fn a_builders_activities_are_children_of_its_build_under_new_ids() {
        use drover::build_log::{Field as JF, JsonMessage as J};
        let drv = sd()
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a.drv")
            .unwrap();
        let mut out = Vec::new();
        let mut push = |m| out.push(m);
        let mut a = Activities::start(sd(), false, Vec::new(), &mut push);
        a.event(
            SystemEvent::Progress(ProgressEvent::BuildStarted {
                drv_path: drv.clone(),
                machine: None,
                verb: "building",
                round: None,
            }),
            &mut push,
        );
        let msg = |message| {
            SystemEvent::Log(BuildLogEvent::Activity {
                drv_path: drv.clone(),
                message,
            })
        };
        a.event(
            msg(J::Start {
                id: 7,
                level: 3,
                activity_type: 101,
                text: "fetching".into(),
                parent: 0,
                fields: vec![JF::String("file:///x".into())],
            }),
            &mut push,
        );
        a.event(
            msg(J::Result {
                id: 7,
                result_type: 105,
                fields: vec![JF::Int(1), JF::Int(4)],
            }),
            &mut push,
        );
        // A result type Nix 2.8 does not define is dropped; so is an unknown id.
        a.event(
            msg(J::Result {
                id: 7,
                result_type: 999,
                fields: vec![],
            }),
            &mut push,
        );
        a.event(
            msg(J::Result {
                id: 9,
                result_type: 105,
                fields: vec![],
            }),
            &mut push,
        );
        // Started again before it stopped: the first goes at the goal's end.
        a.event(
            msg(J::Start {
                id: 8,
                level: 3,
                activity_type: 101,
                text: "second".into(),
                parent: 0,
                fields: vec![],
            }),
            &mut push,
        );
        a.event(msg(J::Stop { id: 7 }), &mut push);
        a.event(msg(J::Stop { id: 7 }), &mut push);
        a.event(
            SystemEvent::Progress(ProgressEvent::BuildFinished {
                drv_path: drv.clone(),
                status: drover::build_result::BuildStatus::Built,
            }),
            &mut push,
        );
        a.finish(&mut push);
        let LoggerMessage::StartActivity { id: build, .. } = &out[3] else {
            panic!("{:?}", out[3])
        };
        let LoggerMessage::StartActivity {
            id: fetch,
            parent,
            kind,
            level,
            text,
            fields,
        } = &out[4]
        else {
            panic!("{:?}", out[4])
        };
        assert_eq!(
            (parent, kind, level, text.as_str()),
            (
                build,
                &ActivityType::FileTransfer,
                &Verbosity::Info,
                "fetching"
            )
        );
        assert_ne!(fetch, &7, "the daemon's own id");
        assert_eq!(fields, &vec![Field::String("file:///x".into())]);
        assert_eq!(
            out[5],
            LoggerMessage::Result {
                id: *fetch,
                kind: ResultType::Progress,
                fields: vec![Field::Int(1), Field::Int(4)],
            }
        );
        let LoggerMessage::StartActivity { id: second, .. } = &out[6] else {
            panic!("{:?}", out[6])
        };
        assert_eq!(out[7], LoggerMessage::StopActivity(*fetch));
        // The goal's end stops the other before the build's own stop.
        assert_eq!(out[8], LoggerMessage::StopActivity(*second));
        assert_eq!(out[9], LoggerMessage::StopActivity(*build));
        assert_eq!(out.len(), 13);
    }

    #[test]
    fn a_substitution_nests_copy_path_in_substitute_after_its_progress() {
        let p = sd()
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a")
            .unwrap();
        let mut out = Vec::new();
        let mut push = |m| out.push(m);
        let queries = vec![(sd().print(&p), "file:///cache".to_owned())];
        let mut a = Activities::start(sd(), true, queries, &mut push);
        let c0 = Counters {
            expected_substitutions: 1,
            ..Default::default()
        };
        a.event(
            SystemEvent::Progress(ProgressEvent::Counters(c0)),
            &mut push,
        );
        a.event(
            SystemEvent::Progress(ProgressEvent::Counters(c0)),
            &mut push,
        );
        a.event(
            SystemEvent::Progress(ProgressEvent::SubstitutionStarted {
                path: p.clone(),
                uri: "file:///cache".into(),
                transfer: Default::default(),
            }),
            &mut push,
        );
        let c1 = Counters {
            expected_substitutions: 1,
            running_substitutions: 1,
            ..Default::default()
        };
        a.event(
            SystemEvent::Progress(ProgressEvent::Counters(c1)),
            &mut push,
        );
        let k = kinds(&out);
        assert_eq!(k[7], "start Unknown querying info about missing paths");
        assert_eq!(
            k[8],
            "start QueryPathInfo querying info about '/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a' on 'file:///cache'"
        );
        assert_eq!(k[9..11], ["stop", "stop"]);
        // The repeated report is not sent again; the running one precedes the
        // substitution's activities.
        assert_eq!(k[12], "result Progress [Int(0), Int(1), Int(0), Int(0)]");
        assert_eq!(k[16], "result Progress [Int(0), Int(1), Int(1), Int(0)]");
        assert_eq!(k[19], "start Substitute ");
        let LoggerMessage::StartActivity { id: sub, .. } = &out[19] else {
            panic!()
        };
        let LoggerMessage::StartActivity {
            parent,
            text,
            fields,
            ..
        } = &out[20]
        else {
            panic!("{:?}", out[20])
        };
        assert_eq!(parent, sub);
        assert_eq!(
            text,
            "copying path '/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a' from 'file:///cache'"
        );
        assert_eq!(fields[2], Field::String("local".into()));
        assert_eq!(k.len(), 21);
    }
}
