//! The `dynamics-gateway` command: run the gateway, check a config, run the demo, or
//! probe a running gateway's readiness (for a distroless image's HEALTHCHECK).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

// Opt-in (`--features mimalloc`): measured faster than glibc's allocator but holding about
// twice the memory, and memory is what a sidecar in every pod pays for (README, Performance).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(feature = "demo")]
mod demo;

use dynamics_gateway::config::{BudgetBucket, Config, IdentityMode};
use dynamics_gateway::telemetry::{Telemetry, TelemetryError, SPAN_TARGET};

#[derive(Parser)]
#[command(
    name = "dynamics-gateway",
    version,
    about = "Authenticating sidecar for the Dynamics 365 / Dataverse Web API"
)]
struct Cli {
    /// Path of the configuration file.
    #[arg(
        long,
        global = true,
        env = "DYNAMICS_GATEWAY_CONFIG",
        default_value = "./config.yaml"
    )]
    config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Load and validate the config, print what the gateway would do, and exit.
    Check,
    /// Run the gateway against a built-in identity provider and stand-in Dataverse on loopback
    /// (builds with the `demo` feature, the default; release images have no demo).
    Demo {
        /// Port for the gateway (the admin port is the next one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Print the admin-consent URL a customer administrator opens to onboard an environment.
    ConsentUrl {
        /// The environment's name (default: the only one).
        #[arg(long)]
        environment: Option<String>,
        /// Where Azure AD sends the administrator afterwards (must be a redirect URI of the app).
        #[arg(long)]
        redirect_uri: Option<String>,
    },
    /// GET the admin /readyz of a running gateway; exit 0 when ready, 1 otherwise.
    Healthcheck {
        /// Base URL of the admin listener; default from the config's server.admin_listen.
        #[arg(long)]
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of `main`: dropping it writes out the buffered log lines.
    let (log, _log_flushed_at_exit) = match dynamics_gateway::log_writer::stderr() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("error: cannot start the log writer thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match init_tracing(cli.log_format, log) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {}", dynamics_gateway::error::chain(&e));
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    // `run` reads its config before the runtime starts, to fail fast on a bad file.
    let config = match command {
        Command::Run => match load(&cli.config) {
            Some(config) => Some(config),
            None => return ExitCode::from(2),
        },
        _ => None,
    };
    // Requests run on the gateway's own request threads (`server.worker_threads`); this
    // runtime has the accept loops, the admin port and the background refreshers.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match (command, config) {
            (Command::Run, Some(config)) => run(&cli.config, config).await,
            (Command::Run, None) => ExitCode::from(2),
            (Command::Check, _) => check(&cli.config),
            (Command::Demo { port }, _) => demo(port).await,
            (Command::Healthcheck { url }, _) => healthcheck(&cli.config, url).await,
            (
                Command::ConsentUrl {
                    environment,
                    redirect_uri,
                },
                _,
            ) => consent_url(&cli.config, environment.as_deref(), redirect_uri.as_deref()),
        }
    });
    // After the runtime: the exporter's last batch goes out on its own thread.
    drop(runtime);
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    code
}

/// The log on stderr, and span export when `OTEL_EXPORTER_OTLP_ENDPOINT` asks for it.
fn init_tracing(
    format: LogFormat,
    writer: dynamics_gateway::log_writer::LogWriter,
) -> Result<Option<Telemetry>, TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hyper=warn,reqwest=warn"));
    // The stage spans are for export only, whatever RUST_LOG says.
    if let Ok(off) = format!("{SPAN_TARGET}=off").parse() {
        filter = filter.add_directive(off);
    }
    // Colours only for a terminal: log files and collectors get plain text.
    use std::io::IsTerminal;
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let log = match format {
        LogFormat::Text => log.with_filter(filter).boxed(),
        LogFormat::Json => log.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let telemetry = Telemetry::from_env()?;
    // Without export no layer listens to the stage spans, so they are never built (an
    // `Option` layer would count as listening).
    let registry = tracing_subscriber::registry().with(log);
    match &telemetry {
        Some(telemetry) => registry.with(telemetry.layer()).init(),
        None => registry.init(),
    }
    Ok(telemetry)
}

fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!(
                "error: {}: {}",
                path.display(),
                dynamics_gateway::error::chain(&e)
            );
            None
        }
    }
}

async fn run(path: &std::path::Path, config: Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: cannot listen on server.listen {}: {e}",
                config.server.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let admin = match tokio::net::TcpListener::bind(config.server.admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: cannot listen on server.admin_listen {}: {e}",
                config.server.admin_listen
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(listen = %config.server.listen, admin = %config.server.admin_listen, environments = config.dynamics.environments.len(), "dynamics-gateway starting");
    let reloads = reload_on_sighup(path.to_path_buf());
    match dynamics_gateway::run_with_reloads(config, listener, admin, shutdown_signal(), reloads)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", dynamics_gateway::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Re-reads the config file on each SIGHUP; a file that does not load is rejected here,
/// with a log line, and the running configuration stays in force.
fn reload_on_sighup(path: PathBuf) -> dynamics_gateway::Reloads {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; configuration reload is off");
            return;
        };
        while hangup.recv().await.is_some() {
            // File reads and certificate parsing block: off the runtime's threads.
            let file = path.clone();
            let loaded = match tokio::task::spawn_blocking(move || Config::load(&file)).await {
                Ok(loaded) => loaded,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "SIGHUP: reading the configuration failed; the previous configuration stays in force");
                    continue;
                }
            };
            match loaded {
                Ok(config) => {
                    tracing::info!(path = %path.display(), "SIGHUP: reloading configuration");
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %dynamics_gateway::error::chain(&e), "SIGHUP: reload rejected; the previous configuration stays in force")
                }
            }
        }
    });
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `check`: what the gateway would do with this config; never a secret.
fn check(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(2);
    };
    let mut out = String::new();
    out.push_str(&format!("config {} is valid\n", path.display()));
    out.push_str(&format!("listen:        {}\n", config.server.listen));
    out.push_str(&format!(
        "admin_listen:  {} (/healthz /readyz /metrics)\n",
        config.server.admin_listen
    ));
    for issuer in &config.inbound.issuers {
        let keys = issuer
            .jwks_uri
            .as_ref()
            .map(|u| format!("keys from {u}"))
            .unwrap_or_else(|| format!("keys via discovery {}", issuer.discovery_url));
        out.push_str(&format!(
            "issuer:        {} audiences {:?} algorithms {:?}; {keys}\n",
            issuer.issuer, issuer.audiences, issuer.algorithms
        ));
    }
    let mode = match &config.identity.mode {
        IdentityMode::CallerObjectId => format!(
            "caller_object_id: claim {} sent as CallerObjectId",
            config.identity.claim
        ),
        IdentityMode::Lookup(attr) => format!(
            "lookup: claim {} matched against systemusers.{}, sent as MSCRMCallerID (cached {:?})",
            config.identity.claim,
            attr.name(),
            config.identity.cache_ttl
        ),
        IdentityMode::Static(map) => format!(
            "static: {} mapped callers by claim {}, sent as MSCRMCallerID",
            map.len(),
            config.identity.claim
        ),
    };
    out.push_str(&format!("identity:      {mode}\n"));
    out.push_str(&format!("routing:       {:?}\n", config.dynamics.routing));
    for env in &config.dynamics.environments {
        let tenants = env
            .tenants
            .as_ref()
            .map(|t| t.join(", "))
            .unwrap_or_else(|| "any".into());
        out.push_str(&format!(
            "environment:   {} -> {}/api/data/ (timeout {:?}); callers of tenant {tenants}\n",
            env.name,
            env.origin(),
            config.server.request_timeout
        ));
        out.push_str(&format!(
            "  s2s token:   client {} from {} scope {}; credential {} (never shown)\n",
            env.client_id,
            env.token_url,
            env.scope,
            env.credential.describe()
        ));
        let budget = &env.budget;
        let bucket = match budget.bucket {
            BudgetBucket::Application => "one bucket (the application user)",
            BudgetBucket::ImpersonatedUser => "one bucket per impersonated user",
        };
        out.push_str(&format!(
            "  budget:      {} in flight to Dataverse in {bucket}; up to {} queued for {}; a 429 closes it for up to {}\n",
            budget.max_concurrency,
            budget.max_queue,
            humantime::format_duration(budget.queue_timeout),
            humantime::format_duration(budget.max_retry_after),
        ));
    }
    if let Some(retry) = config.dynamics.retry_throttled {
        out.push_str(&format!(
            "retry 429s:    idempotent requests wait out Retry-After, {} at most in all\n",
            humantime::format_duration(retry)
        ));
    }
    match &config.dynamics.budget_store {
        None => out.push_str("budget store:  none; each gateway keeps its budget alone\n"),
        Some(store) => out.push_str(&format!(
            "budget store:  valkey at {} (credentials never shown), shared by {} replicas (each keeps limit / {} while it is away); leases live {}, commands wait {}\n",
            store.address(),
            store.replicas,
            store.replicas,
            humantime::format_duration(store.lease_ttl),
            humantime::format_duration(store.command_timeout),
        )),
    }
    for line in config.access.describe() {
        out.push_str(&line);
        out.push('\n');
    }
    use std::io::Write;
    let _ = std::io::stdout().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

fn consent_url(
    path: &std::path::Path,
    environment: Option<&str>,
    redirect_uri: Option<&str>,
) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(2);
    };
    let envs = &config.dynamics.environments;
    let chosen = match environment {
        Some(name) => envs.iter().find(|e| e.name == name),
        None if envs.len() == 1 => envs.first(),
        None => None,
    };
    let Some(env) = chosen else {
        let names: Vec<&str> = envs.iter().map(|e| e.name.as_str()).collect();
        match environment {
            Some(name) => eprintln!(
                "error: there is no environment named {name:?}; configured: {}",
                names.join(", ")
            ),
            None => eprintln!(
                "error: name one environment with --environment; configured: {}",
                names.join(", ")
            ),
        }
        return ExitCode::from(2);
    };
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{}", env.admin_consent_url(redirect_uri));
    ExitCode::SUCCESS
}

async fn healthcheck(path: &std::path::Path, url: Option<String>) -> ExitCode {
    let base = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let admin = Config::load(path)
                .map(|c| c.server.admin_listen)
                .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 9090)));
            let host = if admin.ip().is_unspecified() {
                std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), admin.port())
            } else {
                admin
            };
            format!("http://{host}")
        }
    };
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(_) => return ExitCode::FAILURE,
    };
    match client.get(format!("{base}/readyz")).send().await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("not ready: {}", r.text().await.unwrap_or_default().trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("not ready: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "demo")]
async fn demo(port: u16) -> ExitCode {
    match demo::run(port, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", dynamics_gateway::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// What `demo` says in a build without the stand-ins (release images): there is no
/// identity provider in it to run, and this is how to get one that has it.
// Compiled in every build so its test runs with the default features too.
#[cfg_attr(feature = "demo", allow(dead_code))]
const NO_DEMO: &str = "this build has no demo: it was built without the `demo` feature (release images leave out the stand-in identity provider and Dataverse). Build with the feature, which is on by default: `cargo run --release -- demo` from a checkout, or `cargo build --release --features demo`";

#[cfg(not(feature = "demo"))]
async fn demo(_port: u16) -> ExitCode {
    eprintln!("error: {NO_DEMO}");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_no_demo_message_names_the_feature_and_the_command() {
        assert!(super::NO_DEMO.contains("`demo` feature"));
        assert!(super::NO_DEMO.contains("--features demo"));
        assert!(super::NO_DEMO.contains("cargo run --release -- demo"));
    }
}
