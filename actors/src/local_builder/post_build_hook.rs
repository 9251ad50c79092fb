//! Running the `post-build-hook` as Nix 2.8 does (`runPostBuildHook`): the program
//! with the caller's environment plus `DRV_PATH` and `OUT_PATHS`, stdin
//! `/dev/null`, and its stdout and stderr merged into one pipe that is read line by
//! line. Nothing of it reaches our stdout, which carries only the output paths.
//!
//! Nix shows the hook as an activity, `running post-build-hook '<hook>'...`, and
//! each line of its output as `post-build-hook: <line>` on stderr, unless build
//! output is off (`-Q`); a last line without `\n` gets one appended before it is
//! shown (so it is followed by an empty line, as in Nix). Lines are printed through
//! the `drover::notice` log target, which the CLI shows verbatim.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use thiserror::Error;

/// Why the hook failed; the messages are Nix's.
#[derive(Debug, Error)]
pub enum PostBuildHookError {
    #[error("executing '{hook}': {source}")]
    Exec {
        hook: String,
        source: std::io::Error,
    },
    #[error("creating a pipe for '{hook}': {source}")]
    Pipe { hook: String, source: nix::Error },
    #[error("program '{hook}' failed with exit code {code}")]
    Failed { hook: String, code: i32 },
    #[error("program '{hook}' failed due to signal")]
    Signalled { hook: String },
}

/// Runs `hook` for a build of `drv_path` with outputs `out_paths` (space-separated);
/// each line it prints goes to `line` (with `print_logs`), after the activity line.
pub fn run_with(
    hook: &str,
    drv_path: &str,
    out_paths: &str,
    print_logs: bool,
    mut line: impl FnMut(&str),
) -> Result<(), PostBuildHookError> {
    line(&format!("running post-build-hook '{hook}'..."));
    let (read, write) = nix::unistd::pipe().map_err(|source| PostBuildHookError::Pipe {
        hook: hook.to_owned(),
        source,
    })?;
    let exec = |source| PostBuildHookError::Exec {
        hook: hook.to_owned(),
        source,
    };
    let write2 = write.try_clone().map_err(exec)?;
    let mut cmd = Command::new(hook);
    cmd.env("DRV_PATH", drv_path)
        .env("OUT_PATHS", out_paths)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2));
    let spawned = cmd.spawn();
    // Our copies of the write side go with the command: EOF comes when the hook
    // (and whatever it left running with the pipe) is done.
    drop(cmd);
    let mut child = spawned.map_err(exec)?;
    let mut reader = BufReader::new(std::fs::File::from(read));
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !print_logs {
            continue;
        }
        let text = String::from_utf8_lossy(&buf);
        match text.strip_suffix('\n') {
            Some(l) => line(&format!("post-build-hook: {l}")),
            None => line(&format!("post-build-hook: {text}\n")),
        }
    }
    let status = child.wait().map_err(exec)?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(PostBuildHookError::Failed {
            hook: hook.to_owned(),
            code,
        }),
        None => Err(PostBuildHookError::Signalled {
            hook: hook.to_owned(),
        }),
    }
}

/// [`run_with`], the lines shown through the `drover::notice` log target.
pub fn run(
    hook: &str,
    drv_path: &str,
    out_paths: &str,
    print_logs: bool,
) -> Result<(), PostBuildHookError> {
    run_with(
        hook,
        drv_path,
        out_paths,
        print_logs,
        |l| log::warn!(target: drover::binary_cache::NOTICE, "{l}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, body: &str) -> String {
        let p = dir.join("hook.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn output_is_merged_into_prefixed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(
            dir.path(),
            "echo \"out $DRV_PATH $OUT_PATHS\"; echo err >&2; printf partial",
        );
        let mut lines = Vec::new();
        run_with(&hook, "/s/d.drv", "/s/a /s/b", true, |l| {
            lines.push(l.to_owned())
        })
        .unwrap();
        assert_eq!(
            lines,
            vec![
                format!("running post-build-hook '{hook}'..."),
                "post-build-hook: out /s/d.drv /s/a /s/b".to_string(),
                "post-build-hook: err".to_string(),
                "post-build-hook: partial\n".to_string(),
            ]
        );
        // Without build output only the activity line.
        let mut lines = Vec::new();
        run_with(&hook, "d", "o", false, |l| lines.push(l.to_owned())).unwrap();
        assert_eq!(lines.len(), 1);
    }

    #[test]
    fn failures_are_nix_errors() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(dir.path(), "exit 3");
        let e = run_with(&hook, "d", "o", true, |_| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("program '{hook}' failed with exit code 3")
        );
        let e = run_with("/nonexistent/hook", "d", "o", true, |_| {}).unwrap_err();
        assert!(
            e.to_string().starts_with("executing '/nonexistent/hook': "),
            "{e}"
        );
    }
}
