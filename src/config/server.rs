//! `server`: listeners, connection and body limits, TLS.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::raw::{RawServer, RawTls};
use super::{invalid, ConfigError, MAX_CONNECTION_TIMEOUT};
use crate::body::MinBodyRate;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Without trailing slash.
    pub public_url: Option<String>,
    pub trust_forwarded_headers: bool,
    pub request_timeout: Duration,
    pub max_request_body: u64,
    pub max_decoded_response_body: u64,
    pub max_batch_part: u64,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
    pub body_read_timeout: Duration,
    /// `None`: `server.min_body_rate: 0`.
    pub min_body_rate: Option<MinBodyRate>,
    pub exchange_timeout: Duration,
    pub max_connections: usize,
    /// `None`: no per-address cap.
    pub max_connections_per_peer: Option<NonZeroUsize>,
    pub max_in_flight: usize,
    pub shutdown_grace: Duration,
    /// `None`: one per core.
    pub worker_threads: Option<usize>,
    pub tls: Option<TlsConfig>,
}

impl ServerConfig {
    /// How many request threads serve the app port.
    pub fn request_threads(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// The keys that differ in `new` but are fixed when the listeners start, so a reload
    /// cannot apply them: an operator who tightens one by SIGHUP is told it is not in force.
    pub fn restart_only_changes(&self, new: &ServerConfig) -> Vec<&'static str> {
        [
            ("server.listen", self.listen != new.listen),
            ("server.admin_listen", self.admin_listen != new.admin_listen),
            (
                "server.max_connections",
                self.max_connections != new.max_connections,
            ),
            (
                "server.max_connections_per_peer",
                self.max_connections_per_peer != new.max_connections_per_peer,
            ),
            (
                "server.max_in_flight",
                self.max_in_flight != new.max_in_flight,
            ),
            (
                "server.worker_threads",
                self.worker_threads != new.worker_threads,
            ),
            (
                "server.header_read_timeout",
                self.header_read_timeout != new.header_read_timeout,
            ),
            ("server.idle_timeout", self.idle_timeout != new.idle_timeout),
            (
                "server.http2_keep_alive_interval",
                self.http2_keep_alive_interval != new.http2_keep_alive_interval,
            ),
            (
                "server.http2_keep_alive_timeout",
                self.http2_keep_alive_timeout != new.http2_keep_alive_timeout,
            ),
            (
                "server.shutdown_grace",
                self.shutdown_grace != new.shutdown_grace,
            ),
            ("server.tls", self.tls != new.tls),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

/// `server.tls`: the files the app port's TLS is built from (read at start and every
/// `reload_interval`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub reload_interval: Duration,
}

/// The validated `server` section.
pub(super) fn server_config(s: RawServer) -> Result<ServerConfig, ConfigError> {
    let public_url = match s.public_url {
        Some(u) => {
            let url = Url::parse(u.trim()).map_err(|e| {
                invalid(
                    "server.public_url",
                    format!("\"{u}\" is not an absolute URL ({e})"),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(
                    "server.public_url",
                    "must be an http:// or https:// URL",
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(invalid(
                    "server.public_url",
                    "must not have a query or fragment",
                ));
            }
            Some(url.as_str().trim_end_matches('/').to_string())
        }
        None => None,
    };
    let server = ServerConfig {
        listen: parse_addr("server.listen", &s.listen)?,
        admin_listen: parse_addr("server.admin_listen", &s.admin_listen)?,
        public_url,
        trust_forwarded_headers: s.trust_forwarded_headers,
        request_timeout: s.request_timeout.0,
        max_request_body: s.max_request_body.0,
        max_decoded_response_body: s.max_decoded_response_body.0,
        max_batch_part: s.max_batch_part.0,
        header_read_timeout: s.header_read_timeout.0,
        idle_timeout: s.idle_timeout.0,
        http2_keep_alive_interval: s.http2_keep_alive_interval.0,
        http2_keep_alive_timeout: s.http2_keep_alive_timeout.0,
        body_read_timeout: s.body_read_timeout.0,
        min_body_rate: match s.min_body_rate {
            0 => None,
            bytes_per_second => Some(MinBodyRate {
                bytes_per_second,
                window: s.min_body_rate_window.0,
            }),
        },
        exchange_timeout: s.exchange_timeout.0,
        max_connections: s.max_connections,
        max_connections_per_peer: match s.max_connections_per_peer {
            None => NonZeroUsize::new((s.max_connections / 10).max(1)),
            Some(n) if n > s.max_connections => {
                return Err(invalid(
                    "server.max_connections_per_peer",
                    format!(
                    "{n} is more than server.max_connections ({}); use 0 for no per-address cap",
                    s.max_connections
                ),
                ))
            }
            Some(n) => NonZeroUsize::new(n),
        },
        max_in_flight: s.max_in_flight,
        shutdown_grace: s.shutdown_grace.0,
        worker_threads: match s.worker_threads {
            Some(0) => return Err(invalid("server.worker_threads", "must be at least 1")),
            other => other,
        },
        tls: match s.tls {
            None => None,
            Some(t) => Some(tls_config(t)?),
        },
    };
    if server.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    if server.max_in_flight == 0 {
        return Err(invalid("server.max_in_flight", "must be at least 1"));
    }
    if server.max_batch_part < 64 * 1024 {
        return Err(invalid(
            "server.max_batch_part",
            "must be at least 64KiB (a part's headers and request line are held whole)",
        ));
    }
    for (key, value) in [
        ("server.header_read_timeout", server.header_read_timeout),
        ("server.idle_timeout", server.idle_timeout),
        (
            "server.http2_keep_alive_interval",
            server.http2_keep_alive_interval,
        ),
        (
            "server.http2_keep_alive_timeout",
            server.http2_keep_alive_timeout,
        ),
        ("server.body_read_timeout", server.body_read_timeout),
        ("server.exchange_timeout", server.exchange_timeout),
    ]
    .into_iter()
    .chain(
        server
            .min_body_rate
            .map(|rate| ("server.min_body_rate_window", rate.window)),
    ) {
        if value.is_zero() {
            return Err(invalid(key, "must be more than 0s"));
        }
        // Deadlines are computed as now + value; a day is far beyond any sane limit.
        if value > MAX_CONNECTION_TIMEOUT {
            return Err(invalid(key, "must be at most 24h"));
        }
    }
    if server.exchange_timeout < server.request_timeout {
        return Err(invalid(
            "server.exchange_timeout",
            "must be at least server.request_timeout, or Dataverse's answer would be cut short",
        ));
    }
    if server.listen == server.admin_listen {
        return Err(invalid(
            "server.admin_listen",
            "must differ from server.listen",
        ));
    }
    Ok(server)
}

fn tls_config(t: RawTls) -> Result<TlsConfig, ConfigError> {
    let reload_interval = t.reload_interval.0;
    if reload_interval.is_zero() {
        return Err(invalid(
            "server.tls.reload_interval",
            "must be more than 0s",
        ));
    }
    let path = |key: &str, text: String| {
        if text.trim().is_empty() {
            Err(invalid(key, "must name a PEM file"))
        } else {
            Ok(PathBuf::from(text))
        }
    };
    Ok(TlsConfig {
        certificate: path("server.tls.certificate", t.certificate)?,
        private_key: path("server.tls.private_key", t.private_key)?,
        client_ca: t
            .client_ca
            .map(|ca| path("server.tls.client_ca", ca))
            .transpose()?,
        reload_interval,
    })
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("\"{text}\" is not an address; use e.g. \"0.0.0.0:8080\""),
        )
    })
}
