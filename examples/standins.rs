//! The gateway's two upstreams for load benchmarks (`benches/load.sh`): the testkit's
//! local identity provider and stand-in Dataverse on fixed 127.0.0.1 ports.
//!
//! It writes into `--out DIR`:
//! - `caller.token`: an RS256 caller token (valid for one hour) for the gateway;
//! - `standins.env`: `KEY=value` lines the script turns into the gateway's config;
//! - `ready`: written last, once both servers accept connections;
//!
//! then serves until SIGTERM or Ctrl-C. The stand-in Dataverse accepts any bearer token
//! (no S2S registry), knows the caller's object id as a user (so `CallerObjectId`
//! impersonation works) and does not record requests (so a long run keeps its memory flat).
//!
//! `cargo run --release --example standins -- --idp-port 18081 --dataverse-port 18082 --out /tmp/x`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::Parser;
use testkit::{Dataverse, DirectoryUser, Idp};
use tokio::net::TcpListener;

/// The object id of the caller the token is for.
const CALLER_OID: &str = "9f2c4c1e-5d7a-4b8e-a6c3-0d1e2f3a4b5c";

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 18081)]
    idp_port: u16,
    #[arg(long, default_value_t = 18082)]
    dataverse_port: u16,
    /// Directory for caller.token, standins.env and ready.
    #[arg(long)]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let idp_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.idp_port)).await?;
    let dv_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.dataverse_port)).await?;
    let idp = Idp::builder().start_on(idp_listener).await?;
    let dataverse = Dataverse::builder()
        .user(DirectoryUser::new(CALLER_OID, "alice@contoso.example"))
        .record_requests(false)
        .start_on(dv_listener)
        .await?;

    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("caller.token"), idp.token_for(CALLER_OID))?;
    let env = format!(
        "ISSUER={}\nAUDIENCE={}\nTENANT_ID={}\nCLIENT_ID={}\nCLIENT_SECRET={}\nTOKEN_URL={}\nDATAVERSE_URL={}\n",
        idp.issuer(),
        idp.audience(),
        idp.tenant_id(),
        idp.client_id(),
        idp.client_secret(),
        idp.token_url(),
        dataverse.url(),
    );
    std::fs::write(args.out.join("standins.env"), env)?;
    std::fs::write(args.out.join("ready"), "")?;

    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    drop((idp, dataverse));
    Ok(())
}
