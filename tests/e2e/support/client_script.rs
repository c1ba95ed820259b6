//! Running a real client library's script (Node, Python) as a child process: installing
//! its pinned packages, keeping proxies out of its way, and reading its JSON summary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

/// Proxy variables are removed: clients honour lowercase `http_proxy` even for
/// 127.0.0.1 (some ignore `NO_PROXY`), which would send the caller's token elsewhere.
pub fn without_proxies(cmd: &mut Command) -> &mut Command {
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs a package installer (`npm ci`, `pip install`) to completion, or fails the test
/// with its output.
pub async fn install(mut cmd: Command, what: &str, timeout: Duration) {
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a client script and returns the JSON object on the last line it printed that
/// starts with `{`. Output is shown on failure with `secret` masked, in case anything
/// ever echoes it.
pub async fn run_summary(mut cmd: Command, what: &str, secret: &str, timeout: Duration) -> Value {
    without_proxies(&mut cmd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    let mask = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace(secret, "<token>");
    let (stdout, stderr) = (mask(&out.stdout), mask(&out.stderr));
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstderr:\n{stderr}\nstdout:\n{stdout}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{what} printed no JSON summary:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {line}"))
}
