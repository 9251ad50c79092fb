//! `@nix` JSON log messages (Nix's JSON logger protocol).
//!
//! A builder, a builtin builder or the build hook can send structured log messages as
//! single lines `@nix ` + a JSON object whose `action` says what it is:
//!
//! * `{"action":"msg","level":L,"msg":S}`: a message at verbosity `L` (0 error,
//!   1 warn, 2 notice, 3 info, 4 talkative, 5 chatty, 6 debug, 7 vomit);
//! * `{"action":"start","id":N,"level":L,"type":T,"text":S,"parent":P,"fields":[…]}`:
//!   an activity starts (types: 101 file transfer, 105 build, …);
//! * `{"action":"stop","id":N}`;
//! * `{"action":"result","id":N,"type":R,"fields":[…]}` (101 build log line,
//!   104 set phase, 105 progress, …);
//! * `{"action":"setPhase","phase":S}` (nixpkgs' stdenv prints these itself).
//!
//! Fields are unsigned integers or strings; a message without `fields` (Nix's logger
//! leaves out an empty list) has none. The prefix must be exactly `@nix ` at the
//! start of the line. Any other action is accepted and ignored, as Nix does.
//!
//! Errors, with Nix's wording: text after `@nix ` that is not JSON is
//! [`JsonMessageError::BadJson`] (Nix prints `bad JSON log message from builder: …`
//! and treats the line as plain text); JSON of the wrong shape is
//! [`JsonMessageError::Unhandled`] (`Unable to handle a JSON message from the
//! builder: …`). Nix 2.8 itself lets such a type error escape and aborts the whole
//! `nix-store` run with e.g. `error: [json.exception.type_error.302] type must be
//! string, but is null`, exit 1; later Nix and Lix warn and treat the line as plain
//! text, which is what drover's log collector does.

use serde_json::{Map, Value};

/// The prefix of a JSON log line.
pub const PREFIX: &[u8] = b"@nix ";

/// Activity type `fileTransfer`, the only one an (untrusted) builder may start.
pub const ACT_FILE_TRANSFER: u64 = 101;
/// Result type `buildLogLine`.
pub const RES_BUILD_LOG_LINE: u64 = 101;
/// Result type `setPhase`.
pub const RES_SET_PHASE: u64 = 104;

/// A field of an activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    String(String),
}

/// One `@nix` log message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonMessage {
    Start {
        id: u64,
        level: u64,
        activity_type: u64,
        text: String,
        parent: u64,
        fields: Vec<Field>,
    },
    Stop {
        id: u64,
    },
    Result {
        id: u64,
        result_type: u64,
        fields: Vec<Field>,
    },
    SetPhase {
        phase: String,
    },
    Msg {
        level: u64,
        msg: String,
    },
    /// Any other action: accepted and ignored.
    Other {
        action: String,
    },
}

/// Why an `@nix` line could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonMessageError {
    /// The text after `@nix ` is not JSON.
    #[error("bad JSON log message from builder: {error}")]
    BadJson { line: String, error: String },
    /// The JSON is not a message Nix can handle (missing or mistyped field).
    #[error("Unable to handle a JSON message from the builder: {reason}")]
    Unhandled { line: String, reason: String },
}

/// Parses a line: `None` when it is not an `@nix ` line (plain output), else the
/// message or why it is unusable.
pub fn parse_json_message(line: &[u8]) -> Option<Result<JsonMessage, JsonMessageError>> {
    let json = line.strip_prefix(PREFIX)?;
    let text = || String::from_utf8_lossy(line).into_owned();
    let value: Value = match serde_json::from_slice(json) {
        Ok(v) => v,
        Err(e) => {
            return Some(Err(JsonMessageError::BadJson {
                line: text(),
                error: e.to_string(),
            }))
        }
    };
    Some(
        message(&value).map_err(|reason| JsonMessageError::Unhandled {
            line: text(),
            reason,
        }),
    )
}

fn message(v: &Value) -> Result<JsonMessage, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("message is not an object: {v}"))?;
    let action = string(obj, "action")?;
    Ok(match action.as_str() {
        "start" => JsonMessage::Start {
            id: number(obj, "id")?,
            level: number(obj, "level")?,
            activity_type: number(obj, "type")?,
            text: string(obj, "text")?,
            parent: match obj.get("parent") {
                None | Some(Value::Null) => 0,
                Some(_) => number(obj, "parent")?,
            },
            fields: fields(obj)?,
        },
        "stop" => JsonMessage::Stop {
            id: number(obj, "id")?,
        },
        "result" => JsonMessage::Result {
            id: number(obj, "id")?,
            result_type: number(obj, "type")?,
            fields: fields(obj)?,
        },
        "setPhase" => JsonMessage::SetPhase {
            phase: string(obj, "phase")?,
        },
        "msg" => JsonMessage::Msg {
            level: number(obj, "level")?,
            msg: string(obj, "msg")?,
        },
        _ => JsonMessage::Other { action },
    })
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field '{key}' must be a string, but is {other}")),
        None => Err(format!("field '{key}' is missing")),
    }
}

fn number(obj: &Map<String, Value>, key: &str) -> Result<u64, String> {
    match obj.get(key) {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .or_else(|| n.as_f64().map(|f| f as u64))
            .ok_or_else(|| format!("field '{key}' is not a number: {n}")),
        Some(other) => Err(format!("field '{key}' must be a number, but is {other}")),
        None => Err(format!("field '{key}' is missing")),
    }
}

fn fields(obj: &Map<String, Value>) -> Result<Vec<Field>, String> {
    match obj.get("fields") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|f| match f {
                Value::String(s) => Ok(Field::String(s.clone())),
                Value::Number(n) if n.as_u64().is_some() => {
                    Ok(Field::Int(n.as_u64().unwrap_or_default()))
                }
                other => Err(format!("unsupported JSON type of field {other}")),
            })
            .collect(),
        // Nix's JSON logger leaves `fields` out when there are none (build-remote's
        // `copying 0 paths` activity has none), and Nix reads a missing or null
        // `fields` as no fields.
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(other) => Err(format!("field 'fields' must be an array, but is {other}")),
    }
}

impl JsonMessage {
    /// The message as an `@nix ` line (without the newline), as Nix's JSON logger
    /// writes it (an empty `fields` is left out).
    pub fn to_line(&self) -> String {
        use serde_json::json;
        let fields = |f: &[Field]| -> Vec<Value> {
            f.iter()
                .map(|f| match f {
                    Field::Int(i) => json!(i),
                    Field::String(s) => json!(s),
                })
                .collect()
        };
        let mut v = match self {
            JsonMessage::Start {
                id,
                level,
                activity_type,
                text,
                parent,
                fields: f,
            } => json!({"action": "start", "id": id, "level": level, "type": activity_type,
                        "text": text, "parent": parent, "fields": fields(f)}),
            JsonMessage::Stop { id } => json!({"action": "stop", "id": id}),
            JsonMessage::Result {
                id,
                result_type,
                fields: f,
            } => json!({"action": "result", "id": id, "type": result_type, "fields": fields(f)}),
            JsonMessage::SetPhase { phase } => json!({"action": "setPhase", "phase": phase}),
            JsonMessage::Msg { level, msg } => json!({"action": "msg", "level": level, "msg": msg}),
            JsonMessage::Other { action } => json!({ "action": action }),
        };
        if let Some(o) = v.as_object_mut() {
            if o.get("fields")
                .is_some_and(|f| f.as_array().is_some_and(Vec::is_empty))
            {
                o.remove("fields");
            }
        }
        format!("@nix {v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Option<Result<JsonMessage, JsonMessageError>> {
        parse_json_message(s.as_bytes())
    }

    #[test]
    fn plain_lines_are_not_messages() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse("@nix{\"action\":\"msg\"}"), None);
        assert_eq!(parse("  @nix {}"), None);
        assert_eq!(parse("@nix"), None);
    }

    #[test]
    fn parses_each_action() {
        assert_eq!(
            parse(r#"@nix {"action":"setPhase","phase":"buildPhase"}"#),
            Some(Ok(JsonMessage::SetPhase {
                phase: "buildPhase".into()
            }))
        );
        assert_eq!(
            parse(r#"@nix {"action":"msg","level":0,"msg":"hello"}"#),
            Some(Ok(JsonMessage::Msg {
                level: 0,
                msg: "hello".into()
            }))
        );
        assert_eq!(
            parse(
                r#"@nix {"action":"start","id":7,"level":3,"type":101,"text":"dl","parent":0,"fields":["u",2]}"#
            ),
            Some(Ok(JsonMessage::Start {
                id: 7,
                level: 3,
                activity_type: 101,
                text: "dl".into(),
                parent: 0,
                fields: vec![Field::String("u".into()), Field::Int(2)]
            }))
        );
        assert_eq!(
            parse(r#"@nix {"action":"result","id":7,"type":101,"fields":["a line"]}"#),
            Some(Ok(JsonMessage::Result {
                id: 7,
                result_type: 101,
                fields: vec![Field::String("a line".into())]
            }))
        );
        assert_eq!(
            parse(r#"@nix {"action":"stop","id":7}"#),
            Some(Ok(JsonMessage::Stop { id: 7 }))
        );
        assert_eq!(
            parse(r#"@nix {"action":"unknown"}"#),
            Some(Ok(JsonMessage::Other {
                action: "unknown".into()
            }))
        );
    }

    /// Lines Nix 2.8's `build-remote` writes (`copying 0 paths`, `copying path`):
    /// its JSON logger leaves out an empty `fields`.
    #[test]
    fn missing_or_null_fields_are_empty() {
        assert_eq!(
            parse(
                r#"@nix {"action":"start","id":1,"level":3,"text":"copying 0 paths","type":103}"#
            ),
            Some(Ok(JsonMessage::Start {
                id: 1,
                level: 3,
                activity_type: 103,
                text: "copying 0 paths".into(),
                parent: 0,
                fields: vec![]
            }))
        );
        assert_eq!(
            parse(r#"@nix {"action":"result","id":1,"type":105,"fields":null}"#),
            Some(Ok(JsonMessage::Result {
                id: 1,
                result_type: 105,
                fields: vec![]
            }))
        );
        let res = JsonMessage::Result {
            id: 2,
            result_type: 105,
            fields: vec![],
        };
        assert_eq!(
            res.to_line(),
            r#"@nix {"action":"result","id":2,"type":105}"#
        );
    }

    #[test]
    fn bad_json_is_reported_with_nix_wording() {
        let e = parse("@nix {bad json").unwrap().unwrap_err();
        assert!(matches!(e, JsonMessageError::BadJson { .. }));
        assert!(
            e.to_string()
                .starts_with("bad JSON log message from builder: "),
            "{e}"
        );
        assert!(matches!(
            parse_json_message(b"@nix \"\xff\""),
            Some(Err(JsonMessageError::BadJson { .. }))
        ));
    }

    #[test]
    fn wrong_shapes_are_unhandled() {
        for s in [
            r#"@nix {"action":"msg"}"#,
            r#"@nix 5"#,
            r#"@nix {"action":"msg","level":"x","msg":"m"}"#,
            r#"@nix {"action":"start","id":1,"level":0,"type":101,"text":"dl","parent":0,"fields":[1.5]}"#,
            r#"@nix {"action":"result","id":1,"type":101,"fields":[-1]}"#,
            r#"@nix {"level":1}"#,
            r#"@nix {"action":"result","id":1,"type":101,"fields":"x"}"#,
        ] {
            let e = parse(s).unwrap().unwrap_err();
            assert!(matches!(e, JsonMessageError::Unhandled { .. }), "{s}");
            assert!(e
                .to_string()
                .starts_with("Unable to handle a JSON message from the builder: "));
        }
    }

    fn field() -> BoxedStrategy<Field> {
        prop_oneof![
            any::<u64>().prop_map(Field::Int),
            ".*".prop_map(Field::String)
        ]
        .boxed()
    }

    fn message_strategy() -> impl Strategy<Value = JsonMessage> {
        let fields = proptest::collection::vec(field(), 0..4);
        prop_oneof![
            (
                any::<u64>(),
                0u64..8,
                any::<u64>(),
                ".*",
                any::<u64>(),
                fields.clone()
            )
                .prop_map(|(id, level, activity_type, text, parent, fields)| {
                    JsonMessage::Start {
                        id,
                        level,
                        activity_type,
                        text,
                        parent,
                        fields,
                    }
                }),
            any::<u64>().prop_map(|id| JsonMessage::Stop { id }),
            (any::<u64>(), any::<u64>(), fields).prop_map(|(id, result_type, fields)| {
                JsonMessage::Result {
                    id,
                    result_type,
                    fields,
                }
            }),
            ".*".prop_map(|phase| JsonMessage::SetPhase { phase }),
            (0u64..8, ".*").prop_map(|(level, msg)| JsonMessage::Msg { level, msg }),
            "[a-z]{1,8}"
                .prop_filter("not a known action", |a| ![
                    "start", "stop", "result", "setPhase", "msg"
                ]
                .contains(&a.as_str()))
                .prop_map(|action| JsonMessage::Other { action }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut line = PREFIX.to_vec();
            line.extend(&data);
            let _ = parse_json_message(&line);
            let _ = parse_json_message(&data);
        }

        #[test]
        fn messages_round_trip(m in message_strategy()) {
            prop_assert_eq!(parse_json_message(m.to_line().as_bytes()), Some(Ok(m)));
        }
    }
}
