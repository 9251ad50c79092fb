//! Unit tests of the collector state machine (no actix system).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

fn drv() -> StorePath {
    StorePath::from_base_name("n1hrl2abbi4wf021psnzrg57vsdg0pfm-logt.drv").unwrap()
}

fn config() -> LogConfig {
    LogConfig {
        drv_path: drv(),
        log_dir: PathBuf::new(),
        compress: true,
        tail_lines: 10,
        max_log_size: 0,
        max_silent_time: None,
        timeout: None,
        echo: false,
    }
}

fn run(config: &LogConfig, chunks: &[&[u8]]) -> (Vec<Effect>, Vec<String>) {
    let now = Instant::now();
    let mut s = CollectorState::new(config, DEFAULT_VERBOSITY, true, now);
    let mut fx = Vec::new();
    for c in chunks {
        s.bytes(c.to_vec(), now, &mut fx);
    }
    let (tail, _) = s.eof(&mut fx);
    (fx, tail)
}

fn file_bytes(fx: &[Effect]) -> Vec<u8> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::File(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn stderr(fx: &[Effect]) -> String {
    let b: Vec<u8> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Stderr(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    String::from_utf8(b).unwrap()
}

fn events(fx: &[Effect]) -> Vec<BuildLogEvent> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Event(ev) => Some(ev.clone()),
            _ => None,
        })
        .collect()
}

const SAMPLE: &[u8] = b"line1\nabcdef\rXY\n@nix {\"action\":\"setPhase\",\"phase\":\"buildPhase\"}\n@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"hello from msg\"}\n@nix {bad json\n@nix {\"action\":\"unknown\"}\npartial";

#[test]
fn behaves_like_nix_on_the_observed_sample() {
    let mut c = config();
    c.echo = true;
    let (fx, tail) = run(&c, &[SAMPLE]);
    // Observed with `nix-store -Q`: last 4 log lines.
    assert_eq!(tail, ["line1", "XYcdef", "@nix {bad json", "partial"]);
    // The file gets everything verbatim.
    assert_eq!(file_bytes(&fx), SAMPLE);
    // Observed `nix-store` stderr (without -Q), builder part.
    let err = stderr(&fx);
    let expected_prefix = "line1\nXYcdef\nhello from msg\nbad JSON log message from builder: ";
    assert!(err.starts_with(expected_prefix), "{err}");
    assert!(err.ends_with("\n@nix {bad json\npartial\n"), "{err}");
    assert_eq!(
        events(&fx),
        [
            BuildLogEvent::Line {
                drv_path: drv(),
                line: "line1".into()
            },
            BuildLogEvent::Line {
                drv_path: drv(),
                line: "XYcdef".into()
            },
            BuildLogEvent::Phase {
                drv_path: drv(),
                phase: "buildPhase".into()
            },
            BuildLogEvent::Message {
                drv_path: drv(),
                level: 0,
                msg: "hello from msg".into()
            },
            BuildLogEvent::Line {
                drv_path: drv(),
                line: "@nix {bad json".into()
            },
            BuildLogEvent::Line {
                drv_path: drv(),
                line: "partial".into()
            },
        ]
    );
}

#[test]
fn without_echo_only_messages_are_printed() {
    let (fx, _) = run(&config(), &[SAMPLE]);
    let err = stderr(&fx);
    assert!(
        err.starts_with("hello from msg\nbad JSON log message from builder: "),
        "{err}"
    );
    assert!(!err.contains("line1"));
}

#[test]
fn quiet_messages_and_malformed_json() {
    let (fx, tail) = run(
        &config(),
        &[b"@nix {\"action\":\"msg\",\"level\":9,\"msg\":\"quiet\"}\n@nix {\"action\":\"msg\"}\n"],
    );
    let err = stderr(&fx);
    assert!(!err.contains("quiet"));
    assert!(
        err.starts_with("warning: Unable to handle a JSON message from the builder: "),
        "{err}"
    );
    // An unusable message is kept as a plain line.
    assert_eq!(tail, ["@nix {\"action\":\"msg\"}"]);
}

#[test]
fn tail_keeps_log_lines() {
    let mut c = config();
    c.tail_lines = 2;
    let (_, tail) = run(&c, &[b"a\nb\nc\nd"]);
    assert_eq!(tail, ["c", "d"]);
}

#[test]
fn builder_may_only_start_file_transfers() {
    let (fx, tail) = run(
        &config(),
        &[
            b"@nix {\"action\":\"start\",\"id\":1,\"level\":3,\"type\":105,\"text\":\"\",\"parent\":0,\"fields\":[]}\n",
            b"@nix {\"action\":\"result\",\"id\":1,\"type\":101,\"fields\":[\"ignored\"]}\n",
            b"@nix {\"action\":\"start\",\"id\":2,\"level\":3,\"type\":101,\"text\":\"\",\"parent\":0,\"fields\":[]}\n",
            b"@nix {\"action\":\"result\",\"id\":2,\"type\":101,\"fields\":[\"shown\"]}\n",
        ],
    );
    assert!(tail.is_empty());
    // The accepted activity is forwarded to the listener, the refused one is not.
    assert_eq!(
        events(&fx),
        [
            BuildLogEvent::Activity {
                drv_path: drv(),
                message: drover::build_log::JsonMessage::Start {
                    id: 2,
                    level: 3,
                    activity_type: 101,
                    text: String::new(),
                    parent: 0,
                    fields: Vec::new(),
                },
            },
            BuildLogEvent::Line {
                drv_path: drv(),
                line: "shown".into()
            }
        ]
    );
}

#[test]
fn log_limit_drops_the_offending_chunk_and_alarms_once() {
    let mut c = config();
    c.max_log_size = 11;
    let (fx, tail) = run(&c, &[b"12345\n", b"6789\n", b"abc\n", b"more\n"]);
    assert_eq!(file_bytes(&fx), b"12345\n6789\n");
    assert_eq!(tail, ["12345", "6789"]);
    let alarms: Vec<_> = fx
        .iter()
        .filter(|e| matches!(e, Effect::Alarm(_)))
        .collect();
    assert_eq!(alarms, [&Effect::Alarm(LogAlarm::LogLimit(11))]);
}

#[test]
fn timers_fire_once() {
    let mut c = config();
    c.max_silent_time = Some(Duration::from_secs(5));
    c.timeout = Some(Duration::from_secs(8));
    let t0 = Instant::now();
    let mut s = CollectorState::new(&c, 3, false, t0);
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(5)));
    let mut fx = Vec::new();
    s.bytes(b"x".to_vec(), t0 + Duration::from_secs(4), &mut fx);
    s.check_timers(t0 + Duration::from_secs(6), &mut fx);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Alarm(_))));
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(8)));
    s.check_timers(t0 + Duration::from_secs(8), &mut fx);
    s.check_timers(t0 + Duration::from_secs(20), &mut fx);
    let alarms: Vec<_> = fx
        .iter()
        .filter(|e| matches!(e, Effect::Alarm(_)))
        .collect();
    assert_eq!(
        alarms,
        [&Effect::Alarm(LogAlarm::Timeout(Duration::from_secs(8)))]
    );
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn silence_is_checked_first_and_hook_lines_count_as_activity() {
    let mut c = config();
    c.max_silent_time = Some(Duration::from_secs(2));
    let t0 = Instant::now();
    let mut s = CollectorState::new(&c, 3, false, t0);
    let mut fx = Vec::new();
    s.hook_line("something", t0 + Duration::from_secs(1), &mut fx);
    s.check_timers(t0 + Duration::from_secs(2), &mut fx);
    assert!(fx.is_empty());
    s.check_timers(t0 + Duration::from_secs(3), &mut fx);
    assert_eq!(
        fx,
        [Effect::Alarm(LogAlarm::Silent(Duration::from_secs(2)))]
    );
}

#[test]
fn hook_lines_are_trusted_json_and_log_lines_reach_the_file() {
    let now = Instant::now();
    let mut c = config();
    c.echo = true;
    let mut s = CollectorState::new(&c, 3, true, now);
    let mut fx = Vec::new();
    s.hook_line("plain hook chatter", now, &mut fx);
    assert!(fx.is_empty());
    // Observed with Nix 2.8 and a hook printing these after `# accept`.
    s.hook_line(
        r#"@nix {"action":"start","id":5,"level":3,"type":105,"text":"b","parent":0,"fields":[]}"#,
        now,
        &mut fx,
    );
    s.hook_line(
        r#"@nix {"action":"result","id":5,"type":101,"fields":["remote line"]}"#,
        now,
        &mut fx,
    );
    s.hook_line(
        r#"@nix {"action":"result","id":5,"type":104,"fields":["installPhase"]}"#,
        now,
        &mut fx,
    );
    s.hook_line(
        r#"@nix {"action":"msg","level":1,"msg":"warned"}"#,
        now,
        &mut fx,
    );
    assert_eq!(file_bytes(&fx), b"remote line\n");
    assert_eq!(stderr(&fx), "b...\nremote line\nwarned\n");
    assert_eq!(
        events(&fx),
        [
            BuildLogEvent::Activity {
                drv_path: drv(),
                message: drover::build_log::JsonMessage::Start {
                    id: 5,
                    level: 3,
                    activity_type: 105,
                    text: "b".into(),
                    parent: 0,
                    fields: Vec::new(),
                },
            },
            BuildLogEvent::Line {
                drv_path: drv(),
                line: "remote line".into()
            },
            BuildLogEvent::Phase {
                drv_path: drv(),
                phase: "installPhase".into()
            },
            BuildLogEvent::Message {
                drv_path: drv(),
                level: 1,
                msg: "warned".into()
            },
        ]
    );
    // Not counted as builder output, not in the tail.
    let (tail, bytes) = s.eof(&mut fx);
    assert!(tail.is_empty());
    assert_eq!(bytes, 0);
}

#[test]
fn input_after_eof_is_ignored() {
    let now = Instant::now();
    let mut s = CollectorState::new(&config(), 3, true, now);
    let mut fx = Vec::new();
    s.bytes(b"a".to_vec(), now, &mut fx);
    s.eof(&mut fx);
    fx.clear();
    s.bytes(b"b\n".to_vec(), now, &mut fx);
    s.hook_line(
        "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"x\"}",
        now,
        &mut fx,
    );
    assert!(fx.is_empty());
    assert!(s.is_finished());
}

proptest! {
    #[test]
    fn chunking_gives_the_same_effects(
        data in proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'@'), Just(b'x'), any::<u8>()], 0..400),
        cuts in proptest::collection::vec(0usize..400, 0..8),
    ) {
        let mut c = config();
        c.echo = true;
        c.tail_lines = 3;
        let (whole_fx, whole_tail) = run(&c, &[&data]);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|x| x.min(data.len())).collect();
        cuts.sort();
        let mut chunks = Vec::new();
        let mut start = 0;
        for x in cuts.into_iter().chain([data.len()]) {
            chunks.push(&data[start..x]);
            start = x;
        }
        let (fx, tail) = run(&c, &chunks);
        prop_assert_eq!(tail, whole_tail);
        prop_assert_eq!(file_bytes(&fx), file_bytes(&whole_fx));
        prop_assert_eq!(stderr(&fx), stderr(&whole_fx));
        prop_assert_eq!(events(&fx), events(&whole_fx));
    }
}
