//! The real binary on fresh loopback ports, with its log in a file: for the tests that
//! need the process itself (signals, the audit log it writes, mutual TLS).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use testkit::{DataverseHandle, IdpHandle, Scratch, Throttling};
use tokio::process::{Child, Command};

use crate::support::config_yaml;

pub struct Binary {
    pub child: Child,
    pub url: String,
    pub admin_url: String,
    /// The config file it was started with; rewrite it and send SIGHUP to reload.
    pub config: PathBuf,
    log: PathBuf,
    /// Holds the config and the log; removed after the process is killed.
    dir: Scratch,
}

impl Binary {
    /// GET the admin `/readyz`.
    pub async fn readyz(&self) -> reqwest::Response {
        super::readyz_at(&self.admin_url).await.unwrap()
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", name, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn standins() -> (IdpHandle, DataverseHandle) {
    super::stand_ins(Throttling::default()).await
}

/// The gateway config for the binary, on fresh ports.
pub fn binary_config(
    idp: &IdpHandle,
    dataverse: &DataverseHandle,
    identity: &str,
    ports: (u16, u16),
) -> String {
    binary_config_with_server(idp, dataverse, identity, "  shutdown_grace: 10s\n", ports)
}

/// [`binary_config`] with `server_extra` lines under `server:` instead of the default grace.
pub fn binary_config_with_server(
    idp: &IdpHandle,
    dataverse: &DataverseHandle,
    identity: &str,
    server_extra: &str,
    ports: (u16, u16),
) -> String {
    on_ports(
        &config_yaml(idp, &dataverse.url(), identity, server_extra, ""),
        ports,
    )
}

/// `yaml` (written with the placeholder ports 1 and 2) listening on `ports` (app, admin).
pub fn on_ports(yaml: &str, ports: (u16, u16)) -> String {
    yaml.replace(
        "listen: 127.0.0.1:1",
        &format!("listen: 127.0.0.1:{}", ports.0),
    )
    .replace(
        "admin_listen: 127.0.0.1:2",
        &format!("admin_listen: 127.0.0.1:{}", ports.1),
    )
}

pub async fn start_binary(yaml: &str, ports: (u16, u16)) -> Binary {
    start_binary_with_env(yaml, ports, &[]).await
}

/// [`start_binary`] with these environment variables set for the process.
pub async fn start_binary_with_env(
    yaml: &str,
    ports: (u16, u16),
    vars: &[(&str, String)],
) -> Binary {
    spawn(yaml, ports, vars, Stderr::File).await
}

/// [`start_binary`] with its stderr a pipe nobody reads: once the pipe's buffer is full,
/// every write to it blocks (a collector that stalls). `log()` is empty.
pub async fn start_binary_with_unread_stderr(yaml: &str, ports: (u16, u16)) -> Binary {
    spawn(yaml, ports, &[], Stderr::Unread).await
}

/// [`start_binary`] with its stderr a pipe whose reading end is closed: every write to it
/// fails. `log()` is empty.
pub async fn start_binary_with_closed_stderr(yaml: &str, ports: (u16, u16)) -> Binary {
    spawn(yaml, ports, &[], Stderr::Closed).await
}

/// Where the binary's stderr goes.
#[derive(PartialEq)]
enum Stderr {
    File,
    Unread,
    Closed,
}

async fn spawn(yaml: &str, ports: (u16, u16), vars: &[(&str, String)], to: Stderr) -> Binary {
    let dir = Scratch::new("dgw-life").unwrap();
    let config = dir.write("config.yaml", yaml).unwrap();
    let log = dir.join("stderr.log");
    let stderr = match to {
        Stderr::File => std::fs::File::create(&log).unwrap().into(),
        Stderr::Unread | Stderr::Closed => std::process::Stdio::piped(),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_dynamics-gateway"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    if to == Stderr::Closed {
        drop(child.stderr.take());
    }
    let binary = Binary {
        child,
        url: format!("http://127.0.0.1:{}", ports.0),
        admin_url: format!("http://127.0.0.1:{}", ports.1),
        config,
        log,
        dir,
    };
    for _ in 0..200 {
        if super::is_ready(&binary.admin_url).await {
            return binary;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("binary not ready: {}", binary.log());
}
