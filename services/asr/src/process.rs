//! This process's peak memory, and child processes run by the benchmarks.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// VmHWM of this process (0 where /proc is missing).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs `command` with `input` on its stdin and returns its stdout. With `show_stderr` the
/// child's stderr goes to ours (the progress of a long run); otherwise it is captured and
/// quoted when the child fails.
pub fn run_child(
    command: &mut Command,
    input: Option<&str>,
    show_stderr: bool,
) -> anyhow::Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(if show_stderr {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let output = child.wait_with_output()?;
    if !output.status.success() {
        if show_stderr {
            bail!("{command:?} failed ({})", output.status);
        }
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
