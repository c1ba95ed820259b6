//! End to end with a real client: the npm `dynamics-web-api` library (pinned in
//! tests/e2e-node/package.json) talks to the gateway as its `serverUrl`, and the stand-in
//! Dataverse records what the gateway sent on. The Node script asserts what the client
//! sees; this test asserts what Dataverse saw.
//!
//! Node is part of CI's machine, so a missing `node` fails the test rather than skipping
//! it; the node modules are installed here (`npm ci`) when absent, so plain `cargo test`
//! works on a fresh checkout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;
use crate::support::client_script;

use std::path::{Path, PathBuf};
use std::time::Duration;

use client_script::{install, run_summary};
use serde_json::Value;
use support::{env, ALICE_OID};
use tokio::process::Command;

/// Longest the client script may run; it makes a few dozen local requests.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// `npm ci` downloads a handful of small packages from the registry.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e-node")
}

async fn require_node() {
    let found = Command::new("node").arg("--version").output().await;
    match found {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`node --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "this test needs Node.js (`node` and `npm` on PATH) to run the dynamics-web-api \
             client; install it (e.g. `apt-get install nodejs npm`): {e}"
        ),
    }
}

/// Runs `npm ci` when the pinned client is not installed yet.
async fn ensure_node_modules(dir: &Path) {
    if dir
        .join("node_modules/dynamics-web-api/package.json")
        .exists()
    {
        return;
    }
    let mut cmd = Command::new("npm");
    cmd.args(["ci", "--no-audit", "--no-fund"]).current_dir(dir);
    install(cmd, &format!("`npm ci` in {}", dir.display()), NPM_TIMEOUT).await;
}

/// Runs client.mjs and returns its JSON summary line.
async fn run_client(gateway_url: &str, caller_token: &str) -> Value {
    let dir = e2e_dir();
    require_node().await;
    ensure_node_modules(&dir).await;
    let mut cmd = Command::new("node");
    cmd.arg("client.mjs")
        .current_dir(&dir)
        .env("GATEWAY_URL", gateway_url)
        .env("CALLER_TOKEN", caller_token);
    run_summary(cmd, "client.mjs", caller_token, SCRIPT_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dynamics_web_api_npm_client_works_through_the_gateway_and_dataverse_sees_only_dataverse_urls(
) {
    let env = env().start().await;
    let gw = env.gateway.url();
    let dv = env.dataverse.url();
    let caller_token = env.idp.token_for(ALICE_OID);

    let summary = run_client(&gw, &caller_token).await;

    // What the client saw, as the script reported it.
    assert_eq!(summary["ok"], true, "{summary}");
    let context = summary["created"]["context"].as_str().unwrap();
    assert!(
        context.starts_with(&format!("{gw}/api/data/v9.2/$metadata#accounts")),
        "{context}"
    );
    assert_eq!(summary["update"]["staleStatus"], 412, "{summary}");
    // Dataverse's own error code came through with the status.
    assert_eq!(summary["update"]["staleCode"], "0x80060882", "{summary}");
    assert!(
        summary["paging"]["pages"].as_u64().unwrap() >= 3,
        "{summary}"
    );
    assert_eq!(
        summary["paging"]["rows"], summary["paging"]["count"],
        "{summary}"
    );
    assert!(
        summary["longQuery"]["filterLength"].as_u64().unwrap() > 2000,
        "{summary}"
    );
    assert_eq!(summary["longQuery"]["rows"], 2, "{summary}");
    assert_eq!(summary["batch"]["retrievedRows"], 2, "{summary}");
    let created_id = summary["created"]["id"].as_str().unwrap();
    let contact_id = summary["bind"]["contactId"].as_str().unwrap();

    // What Dataverse saw: every request impersonates Alice with the gateway's S2S token.
    let requests = env.dataverse.requests();
    assert!(requests.len() >= 15, "{} requests", requests.len());
    let s2s = support::s2s_bearers(&env.idp);
    assert!(!s2s.is_empty());
    let gw_authority = env.gateway.addr.to_string();
    for r in &requests {
        let line = format!("{} {}", r.method, r.path_and_query);
        assert_eq!(r.header("callerobjectid"), Some(ALICE_OID), "{line}");
        let auth = r.header("authorization").unwrap_or_default();
        assert!(s2s.iter().any(|t| t == auth), "{line}: not an S2S bearer");
        let body = r.body_text();
        assert!(
            !format!("{:?}", r.headers).contains(&caller_token) && !body.contains(&caller_token),
            "{line}: the caller's token reached Dataverse"
        );
        assert!(!r.path_and_query.contains(&gw_authority), "{line}");
        assert!(
            !body.contains(&gw_authority),
            "{line}: the body names the gateway:\n{body}"
        );
    }

    // The nextLinks were followed as given: pages 2.. reached Dataverse with a $skiptoken
    // the stand-in issued (it answers 400 to any other, which the script would have seen),
    // and with the client's Prefer header intact.
    let paged: Vec<_> = requests
        .iter()
        .filter(|r| r.path_and_query.contains("$skiptoken="))
        .collect();
    assert!(paged.len() >= 2, "{} nextLink requests", paged.len());
    for r in paged {
        let prefer = r.header("prefer").unwrap_or_default();
        assert!(prefer.contains("odata.maxpagesize=2"), "{prefer}");
        assert!(
            prefer.contains(
                "odata.include-annotations=\"OData.Community.Display.V1.FormattedValue\""
            ),
            "{prefer}"
        );
    }

    // The long GET arrived as a batch whose one GET part names Dataverse.
    let batches: Vec<String> = requests
        .iter()
        .filter(|r| r.path_and_query.ends_with("/$batch"))
        .map(|r| r.body_text())
        .collect();
    let long = batches
        .iter()
        .find(|b| b.contains("absent-0"))
        .expect("the long query was sent as a $batch");
    assert!(
        long.contains(&format!("GET {dv}/api/data/v9.2/accounts?")),
        "{long}"
    );

    // The explicit batch: change-set create, associate with an absolute @odata.id, and a
    // GET part, all naming Dataverse.
    let explicit = batches
        .iter()
        .find(|b| b.contains("/$ref"))
        .expect("the explicit batch reached Dataverse");
    assert!(explicit.contains("changeset_"), "{explicit}");
    assert!(
        explicit.contains(&format!("POST {dv}/api/data/v9.2/accounts HTTP/1.1")),
        "{explicit}"
    );
    assert!(
        explicit.contains(&format!(
            "\"@odata.id\":\"{dv}/api/data/v9.2/contacts({contact_id})\""
        )),
        "{explicit}"
    );
    // The raw space in the GET part's request line survived (split at first/last space).
    assert!(
        explicit.contains(&format!("GET {dv}/api/data/v9.2/accounts?")),
        "{explicit}"
    );
    assert!(
        explicit.contains("$orderby=name asc HTTP/1.1"),
        "{explicit}"
    );

    // Stored references name Dataverse: the @odata.bind of the contact and the association.
    let contacts = env.dataverse.records("contacts");
    let contact = contacts
        .iter()
        .find(|c| c["contactid"] == contact_id)
        .expect("contact stored");
    assert_eq!(
        contact["parentcustomerid_account@odata.bind"],
        format!("{dv}/api/data/v9.2/accounts({created_id})")
    );
    let accounts = env.dataverse.records("accounts");
    let account = accounts
        .iter()
        .find(|a| a["accountid"] == created_id)
        .expect("account stored");
    assert_eq!(
        account["contact_customer_accounts@odata.id"],
        format!("{dv}/api/data/v9.2/contacts({contact_id})")
    );
}
