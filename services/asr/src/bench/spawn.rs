//! The services as child processes of a benchmark: this build's sibling binaries, started on
//! 127.0.0.1:0, their address read from their JSON log, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// A child service, killed when dropped.
pub struct Service(pub Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a sibling binary on 127.0.0.1:0 and returns it with the address it logged.
pub fn start(binary: &str, args: &[&str]) -> anyhow::Result<(Service, String)> {
    let dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("the asr binary has no directory")?;
    let mut child = Command::new(dir.join(binary))
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} (build it with cargo build --release)", binary))?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = entry["fields"]["address"].as_str() {
                    let _ = tx.send(addr.to_string());
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .with_context(|| format!("{binary} did not start"))?;
    Ok((Service(child), format!("http://{addr}")))
}

impl Service {
    /// Resident memory now, in bytes (Linux; 0 where /proc cannot say).
    pub fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024)
    }
}
