//! `SetOptions`: which of a client's settings take effect, as Nix 2.8's
//! `ClientSettings::apply` decides (trusted clients may set anything; others
//! only `timeout`, `repeat`, `connect-timeout`, an empty `builders`, and
//! substituters the daemon already trusts), and what drover does with them.
//!
//! One Worker serves every client, so a setting that changes how builds run
//! (`max-jobs`, `keep-going`, `sandbox`, …) cannot be given to one client's
//! builds only. Such a setting is never dropped silently: when the client's
//! value differs from the daemon's, the client is warned that the daemon's value
//! holds. Values equal to the daemon's (the usual case: both read the same
//! `nix.conf`) say nothing. What the connection itself uses — `substitute` for
//! substitutable-path queries, the verbosity of its messages — is applied, and
//! so is `keep-going`, which the Worker takes per run: a client without it has
//! its run end at its first failure (only the goals no other client needs are
//! cancelled), one with it has its run go on; a goal both share goes on while
//! any run needs it.

use drover::config::Settings;
use drover::worker_protocol::ClientOptions;

/// Settings an untrusted client may set (Nix 2.8's list).
fn unrestricted(name: &str, value: &str) -> bool {
    matches!(
        name,
        "timeout" | "build-timeout" | "repeat" | "build-repeat" | "connect-timeout"
    ) || (name == "builders" && value.is_empty())
}

/// Settings the connection applies to itself (or to its runs).
fn per_connection(name: &str) -> bool {
    matches!(name, "substitute" | "build-use-substitutes" | "keep-going")
}

fn shared_warning(name: &str, value: &str, daemon: &str) -> String {
    format!(
        "drover daemon: the client's setting '{name}' = '{value}' is not applied (builds are shared between clients); the daemon's '{daemon}' holds"
    )
}

/// The connection's settings after the client's options, and the warnings to
/// send it.
pub fn apply_client_options(
    daemon: &Settings,
    o: &ClientOptions,
    trusted: bool,
) -> (Settings, Vec<String>) {
    let mut s = daemon.clone();
    let mut warnings = Vec::new();
    let b = |v: bool| if v { "true" } else { "false" }.to_owned();
    let fixed = [
        ("keep-failed", b(o.keep_failed)),
        ("keep-going", b(o.keep_going)),
        ("fallback", b(o.try_fallback)),
        ("max-jobs", o.max_build_jobs.to_string()),
        ("max-silent-time", o.max_silent_time.to_string()),
        ("cores", o.build_cores.to_string()),
        ("substitute", b(o.use_substitutes)),
    ];
    // The fixed fields are applied by Nix for every client, trusted or not.
    let mut asked: Vec<(String, String, bool)> = fixed
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v, true))
        .collect();
    for (name, value) in &o.overrides {
        asked.push((name.clone(), value.clone(), false));
    }
    for (name, value, always) in asked {
        if name == "ssh-auth-sock" {
            continue; // obsolete, as in Nix
        }
        if name == "experimental-features" {
            if daemon.get(&name).as_deref() != Some(value.as_str()) {
                log::debug!("Ignoring the client-specified experimental features");
            }
            continue;
        }
        if name == "substituters" || name == "extra-substituters" {
            if !trusted {
                let allowed = trusted_substituters(daemon);
                for u in value.split_whitespace() {
                    if !allowed.iter().any(|a| a == u || *a == format!("{u}/")) {
                        warnings.push(format!("ignoring untrusted substituter '{u}'"));
                    }
                }
            }
            if daemon.get(&name).as_deref() != Some(value.as_str()) {
                let d = daemon.get(&name).unwrap_or_default();
                warnings.push(shared_warning(&name, &value, &d));
            }
            continue;
        }
        if !(always || trusted || unrestricted(&name, &value)) {
            log::debug!(
                "ignoring the client-specified setting '{name}', because it is a restricted setting and you are not a trusted user"
            );
            continue;
        }
        let Some(current) = daemon.get(&name) else {
            warnings.push(format!(
                "drover daemon: unknown setting '{name}' from the client"
            ));
            continue;
        };
        if normalise(&current) == normalise(&value) {
            continue;
        }
        if per_connection(&name) {
            if let Err(e) = s.set(&name, &value) {
                warnings.push(e.to_string());
            }
            continue;
        }
        if name == "max-jobs" && value == daemon.max_jobs().to_string() {
            continue;
        }
        if name == "cores" && value == daemon.cores().to_string() {
            continue;
        }
        warnings.push(shared_warning(&name, &value, &current));
    }
    (s, warnings)
}

fn trusted_substituters(s: &Settings) -> Vec<String> {
    let mut v: Vec<String> = s
        .get("trusted-substituters")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    v.extend(s.substituters());
    v
}

fn normalise(v: &str) -> String {
    match v {
        "yes" | "1" => "true".into(),
        "no" | "0" => "false".into(),
        _ => v.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let d = tempfile::tempdir().unwrap();
        Settings::for_root(d.path(), "keep-going = false\n").unwrap()
    }

    fn same_as(s: &Settings) -> ClientOptions {
        ClientOptions {
            keep_failed: s.keep_failed(),
            keep_going: s.keep_going(),
            try_fallback: s.fallback(),
            verbosity: 3,
            max_build_jobs: s.max_jobs(),
            max_silent_time: s.max_silent_time() as u64,
            verbose_build: true,
            build_cores: s.cores(),
            use_substitutes: true,
            overrides: Default::default(),
        }
    }

    #[test]
    fn equal_values_say_nothing() {
        let s = settings();
        let (_, w) = apply_client_options(&s, &same_as(&s), true);
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn a_shared_setting_that_differs_is_warned_about() {
        let s = settings();
        let mut o = same_as(&s);
        o.keep_failed = !s.keep_failed();
        o.overrides.insert("sandbox".into(), "relaxed".into());
        let (_, w) = apply_client_options(&s, &o, true);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("'keep-failed' = "), "{w:?}");
        assert!(w[1].contains("'sandbox' = 'relaxed'"));
    }

    #[test]
    fn keep_going_is_applied_to_the_connections_runs() {
        let s = settings();
        let mut o = same_as(&s);
        o.keep_going = true;
        let (c, w) = apply_client_options(&s, &o, false);
        assert!(w.is_empty(), "{w:?}");
        assert!(c.keep_going());
        o.keep_going = false;
        let (c, _) = apply_client_options(&s, &o, false);
        assert!(!c.keep_going());
    }

    #[test]
    fn substitute_is_applied_to_the_connection() {
        let s = settings();
        let mut o = same_as(&s);
        o.use_substitutes = false;
        let (c, w) = apply_client_options(&s, &o, true);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.get("substitute").as_deref(), Some("false"));
    }

    #[test]
    fn untrusted_restricted_settings_are_ignored_as_nix_does() {
        let s = settings();
        let mut o = same_as(&s);
        o.overrides.insert("sandbox".into(), "relaxed".into());
        o.overrides
            .insert("substituters".into(), "http://evil.example".into());
        let (_, w) = apply_client_options(&s, &o, false);
        assert!(
            w.iter()
                .any(|x| x == "ignoring untrusted substituter 'http://evil.example'"),
            "{w:?}"
        );
        assert!(!w.iter().any(|x| x.contains("sandbox")), "{w:?}");
    }
}
