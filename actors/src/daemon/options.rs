//! `SetOptions`: which of a client's settings take effect, as Nix 2.8's
//! `ClientSettings::apply` decides (the fixed fields — keep-failed, keep-going,
//! fallback, max-jobs, max-silent-time, cores, substitute — for every client;
//! the overrides for trusted clients, and for the others only `timeout`,
//! `repeat`, `connect-timeout`, an empty `builders`, and `substituters` cut
//! down to those the daemon trusts), and what drover does with them.
//!
//! Nix's daemon forks per connection, so a client's settings are simply its
//! process's. drover's clients share one Worker: the connection's settings
//! ([`apply_client_options`]) travel with each of its runs
//! (`System::realise_run_with`) and the goals the run makes read them — keep-going,
//! keep-failed, fallback, repeat, the post-build hook, the signature checks of
//! substitutions (`require-sigs`, `trusted-public-keys`), and for local builds
//! `cores`, the sandbox settings, `timeout`, `max-silent-time`, the log limits,
//! `secret-key-files`, `auto-optimise-store`; substitutions use the substituters
//! of the client's `substituters` (opened once per list). `max-jobs` = 0 stops
//! the run's local builds; any other value is the daemon's, whose build slots
//! all runs share (warned about when it differs).
//!
//! A goal two runs share keeps the settings of the run that made it (and so do
//! the goals it waits for that it made): a client that asks for a derivation
//! another client is already building gets that build, with that client's
//! settings.
//!
//! A setting that is not applied (`builders`, `builders-use-substitutes`,
//! `keep-outputs`, …) is never dropped silently: when the client's value
//! differs from the daemon's, the client is warned that the daemon's value
//! holds. Values equal to the daemon's (the usual case: both read the same
//! `nix.conf`) say nothing.

use drover::config::Settings;
use drover::worker_protocol::ClientOptions;

/// Settings an untrusted client may set (Nix 2.8's list).
fn unrestricted(name: &str, value: &str) -> bool {
    matches!(
        name,
        "timeout" | "build-timeout" | "repeat" | "build-repeat" | "connect-timeout"
    ) || (name == "builders" && value.is_empty())
}

/// Settings the connection's runs (or the connection itself) apply, by their
/// canonical names (see the module docs for where each one is read).
fn applied(canonical: &str) -> bool {
    matches!(
        canonical,
        "keep-failed"
            | "keep-going"
            | "fallback"
            | "max-silent-time"
            | "cores"
            | "max-jobs"
            | "substitute"
            | "timeout"
            | "repeat"
            | "enforce-determinism"
            | "post-build-hook"
            | "secret-key-files"
            | "auto-optimise-store"
            | "sandbox"
            | "sandbox-paths"
            | "sandbox-fallback"
            | "sandbox-build-dir"
            | "sandbox-dev-shm-size"
            | "allowed-impure-host-deps"
            | "pre-build-hook"
            | "build-users-group"
            | "system"
            | "extra-platforms"
            | "system-features"
            | "build-poll-interval"
            | "log-lines"
            | "max-build-log-size"
            | "compress-build-log"
            | "require-sigs"
            | "trusted-public-keys"
            | "substituters"
            | "hashed-mirrors"
            | "connect-timeout"
            | "stalled-download-timeout"
            | "download-attempts"
            | "netrc-file"
            | "narinfo-cache-positive-ttl"
            | "narinfo-cache-negative-ttl"
    )
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
        let canonical = Settings::canonical_name(&name);
        if !(always || trusted || unrestricted(&name, &value)) {
            if canonical == Some("substituters") && !name.starts_with("extra-") {
                // Only the substituters the daemon trusts, as Nix.
                let allowed = trusted_substituters(daemon);
                let mut subs = Vec::new();
                for u in value.split_whitespace() {
                    if allowed.iter().any(|a| a == u) {
                        subs.push(u.to_owned());
                    } else if !u.ends_with('/') && allowed.iter().any(|a| *a == format!("{u}/")) {
                        subs.push(format!("{u}/"));
                    } else {
                        warnings.push(format!("ignoring untrusted substituter '{u}'"));
                    }
                }
                if let Err(e) = s.set("substituters", &subs.join(" ")) {
                    warnings.push(e.to_string());
                }
                continue;
            }
            log::debug!(
                "ignoring the client-specified setting '{name}', because it is a restricted setting and you are not a trusted user"
            );
            continue;
        }
        let Some(canonical) = canonical else {
            warnings.push(format!(
                "drover daemon: unknown setting '{name}' from the client"
            ));
            continue;
        };
        let current = daemon.get(canonical).unwrap_or_default();
        let appends = name.starts_with("extra-") && Settings::canonical_name(&name[6..]).is_some();
        if !appends && normalise(&current) == normalise(&value) {
            continue;
        }
        if name == "max-jobs" && value == daemon.max_jobs().to_string() {
            continue;
        }
        if !applied(canonical) {
            warnings.push(shared_warning(&name, &value, &current));
            continue;
        }
        if let Err(e) = s.set(&name, &value) {
            warnings.push(e.to_string());
            continue;
        }
        if canonical == "max-jobs" && s.max_jobs() != 0 && s.max_jobs() != daemon.max_jobs() {
            // 0 stops the run's local builds; the slots are the daemon's.
            warnings.push(shared_warning(
                &name,
                &value,
                &daemon.max_jobs().to_string(),
            ));
        }
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
    fn a_setting_not_applied_that_differs_is_warned_about() {
        let s = settings();
        let mut o = same_as(&s);
        o.overrides
            .insert("builders-use-substitutes".into(), "true".into());
        o.overrides.insert("keep-outputs".into(), "true".into());
        let (c, w) = apply_client_options(&s, &o, true);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("'builders-use-substitutes' = 'true'"),
            "{w:?}"
        );
        assert!(w[1].contains("'keep-outputs' = 'true'"), "{w:?}");
        assert_eq!(c.get("keep-outputs"), s.get("keep-outputs"));
    }

    #[test]
    fn a_trusted_clients_settings_are_its_runs() {
        let s = settings();
        let mut o = same_as(&s);
        o.keep_failed = !s.keep_failed();
        o.build_cores = 7;
        o.max_silent_time = 5;
        for (n, v) in [
            ("post-build-hook", "/bin/hook"),
            ("secret-key-files", "/k1"),
            ("auto-optimise-store", "true"),
            ("sandbox", "relaxed"),
            ("build-timeout", "9"),
            ("substituters", "file:///cache"),
            ("extra-trusted-public-keys", "k:AAAA"),
        ] {
            o.overrides.insert(n.into(), v.into());
        }
        let (c, w) = apply_client_options(&s, &o, true);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.keep_failed(), !s.keep_failed());
        assert_eq!(c.cores(), 7);
        assert_eq!(c.max_silent_time(), 5);
        assert_eq!(c.post_build_hook().as_deref(), Some("/bin/hook"));
        assert_eq!(c.secret_key_files(), [std::path::PathBuf::from("/k1")]);
        assert!(c.auto_optimise_store());
        assert_eq!(c.get("sandbox").as_deref(), Some("relaxed"));
        assert_eq!(c.timeout(), 9);
        assert_eq!(c.substituters(), ["file:///cache"]);
        assert!(c.trusted_public_keys().iter().any(|k| k == "k:AAAA"));
    }

    #[test]
    fn max_jobs_zero_is_applied_and_another_value_warned_about() {
        let s = settings();
        let mut o = same_as(&s);
        o.max_build_jobs = 0;
        let (c, w) = apply_client_options(&s, &o, false);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.max_jobs(), 0);
        o.max_build_jobs = s.max_jobs() + 5;
        let (_, w) = apply_client_options(&s, &o, false);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("'max-jobs'"), "{w:?}");
    }

    #[test]
    fn an_untrusted_client_gets_only_the_substituters_the_daemon_trusts() {
        let d = tempfile::tempdir().unwrap();
        let s = Settings::for_root(
            d.path(),
            "trusted-substituters = file:///ok/ http://also\nsubstituters =\n",
        )
        .unwrap();
        let mut o = same_as(&s);
        o.overrides.insert(
            "substituters".into(),
            "file:///ok http://also http://evil.example".into(),
        );
        o.overrides
            .insert("post-build-hook".into(), "/bin/hook".into());
        let (c, w) = apply_client_options(&s, &o, false);
        assert_eq!(w, ["ignoring untrusted substituter 'http://evil.example'"]);
        assert_eq!(c.substituters(), ["file:///ok/", "http://also"]);
        assert_eq!(c.post_build_hook(), s.post_build_hook());
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
