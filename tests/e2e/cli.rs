//! The command line, run as the real binary: `check` on good and bad configs, the
//! shipped example config, and `healthcheck` against a running gateway.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::process::{Command, Output};

use testkit::Scratch;

fn gateway_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamics-gateway"));
    cmd.env_remove("DYNAMICS_GATEWAY_CONFIG");
    cmd
}

/// Checks the command exited 0, showing its stderr if not.
fn assert_succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(yaml: &str, envs: &[(&str, &str)]) -> Output {
    let dir = Scratch::new("dgw-check").unwrap();
    let path = dir.write("config.yaml", yaml).unwrap();
    let mut cmd = gateway_command();
    cmd.arg("check").arg("--config").arg(&path);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

const GOOD: &str = r#"
inbound:
  issuers:
    - issuer: https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0
      audiences: [api://dynamics-gateway]
identity:
  mode: lookup
  lookup: { attribute: azureactivedirectoryobjectid }
dynamics:
  url: https://contoso.crm.dynamics.com
  tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: ${TEST_DGW_SECRET}
"#;

#[test]
fn check_prints_the_plan_without_the_secret() {
    let out = check(GOOD, &[("TEST_DGW_SECRET", "super-secret-value-123")]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("https://contoso.crm.dynamics.com"),
        "{stdout}"
    );
    assert!(stdout.contains("lookup"), "{stdout}");
    assert!(
        !stdout.contains("super-secret-value-123") && !stderr.contains("super-secret-value-123")
    );
}

#[test]
fn check_prints_the_budget_and_its_store_without_the_store_password() {
    let out = check(GOOD, &[("TEST_DGW_SECRET", "s")]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("budget:      52 in flight to Dataverse in one bucket (the application user); up to 1024 queued for 10s"),
        "{stdout}"
    );
    assert!(stdout.contains("budget store:  none"), "{stdout}");
    let shared = format!(
        "{GOOD}  budget:\n    bucket: impersonated_user\n    store:\n      valkey: {{ url: \"redis://:store-pw-91c2@valkey.internal:6390/1\", replicas: 3 }}\n"
    );
    let out = check(&shared, &[("TEST_DGW_SECRET", "s")]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("one bucket per impersonated user"),
        "{stdout}"
    );
    assert!(
        stdout.contains("budget store:  valkey at valkey.internal:6390 (credentials never shown), shared by 3 replicas"),
        "{stdout}"
    );
    assert!(!stdout.contains("store-pw-91c2") && !stderr.contains("store-pw-91c2"));
}

#[test]
fn check_prints_how_each_access_rule_is_read() {
    let yaml = format!(
        "{GOOD}access:
  default: deny
  metadata_file: {}/tests/fixtures/csdl.xml
  rules:
    - name: readers
      when: {{ roles: [Sales.Read] }}
      allow: {{ methods: [GET], entity_sets: [accounts], tables: {{ contacts: [read, associate] }}, functions: [WhoAmI] }}
    - name: batches
      when: {{ scp: [Dynamics.Write] }}
      allow: {{ batch: true }}
    - name: sync
      when: {{}}
      allow: {{ tables: {{ \"*\": [read] }} }}
      impersonation: app_only
",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = check(&yaml, &[("TEST_DGW_SECRET", "s")]);
    assert_succeeded(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    for line in [
        "access:        3 rules, first that grants every pair a request touches wins; else deny",
        "(5 entity sets)",
        "  rule readers: for callers with roles Sales.Read; as the caller's Dynamics user",
        "    GET requests: any operation on accounts (other tables they touch need their own grant)",
        "    read, associate: contacts",
        "    execute: WhoAmI",
        "  rule batches: for callers with scp Dynamics.Write;",
        "    $batch: the envelope only; each part is decided as a request of its own",
        "  rule sync: for every authenticated caller; as the application user, for app-only callers",
        "    read: every table, named or not",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from\n{stdout}");
    }
    let none = check(GOOD, &[("TEST_DGW_SECRET", "s")]);
    let stdout = String::from_utf8(none.stdout).unwrap();
    assert!(
        stdout.contains(
            "access:        no rules: every verified caller may make any Web API request"
        ),
        "{stdout}"
    );
}

#[test]
fn check_names_the_bad_key_and_exits_non_zero() {
    let cases = [
        (GOOD.replace("  client_id:", "  clientid:"), "clientid"),
        (GOOD.replace("mode: lookup", "mode: guess"), "identity.mode"),
        (
            GOOD.replace("https://contoso", "http://contoso"),
            "dynamics.url",
        ),
        (
            GOOD.replace(
                "identity:\n",
                "server:\n  request_timeout: \"30\"\nidentity:\n",
            ),
            "server.request_timeout",
        ),
    ];
    for (yaml, key) in cases {
        let out = check(&yaml, &[("TEST_DGW_SECRET", "super-secret-value-123")]);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{key}: should fail");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(!stderr.contains("super-secret-value-123"));
    }
    let out = check(GOOD, &[]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(
        stderr.contains("TEST_DGW_SECRET") && stderr.contains("dynamics.client_secret"),
        "{stderr}"
    );
}

#[test]
fn shipped_example_config_is_valid() {
    let out = gateway_command()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"),
        ])
        .env("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47")
        .env("DYNAMICS_CLIENT_ID", "11111111-2222-3333-4444-555555555555")
        .env("DYNAMICS_CLIENT_SECRET", "x")
        .output()
        .unwrap();
    assert_succeeded(&out);
}

#[tokio::test]
async fn healthcheck_exits_zero_only_when_ready() {
    let env = support::env().start().await;
    // tokio's Command, so the gateway on this runtime can answer while we wait.
    let ok = tokio::process::Command::from(gateway_command())
        .args(["healthcheck", "--url", &env.gateway.admin_url()])
        .output()
        .await
        .unwrap();
    assert_succeeded(&ok);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = gateway_command()
        .args(["healthcheck", "--url", &format!("http://{closed}")])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
}

#[tokio::test]
async fn demo_serves_whoami_for_alice_with_the_token_it_wrote() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    // The demo's admin port is the next one up: both must be free.
    let port = loop {
        let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = app.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            break port;
        }
    };
    let mut child = tokio::process::Command::from(gateway_command())
        .args(["demo", "--port", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut token_path = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.split(" is in ").nth(1) {
            token_path = Some(rest.trim_end_matches(". Try:").to_string());
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    let token = std::fs::read_to_string(token_path.expect("demo names its token file")).unwrap();
    let url = format!("http://127.0.0.1:{port}/api/data/v9.2/WhoAmI");
    let client = support::client();
    let mut status = 0;
    for _ in 0..100 {
        match client.get(&url).bearer_auth(&token).send().await {
            Ok(r) if r.status() != 503 => {
                status = r.status().as_u16();
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert_eq!(status, 200);
    let unauthenticated = client.get(&url).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    child.kill().await.unwrap();
}

#[test]
fn consent_url_names_the_environments_tenant_and_client() {
    let yaml = r#"
inbound:
  issuers:
    - issuer: https://login.microsoftonline.com/{tenantid}/v2.0
      audiences: [api://dynamics-gateway]
      tenants: [72f988bf-86f1-41af-91ab-2d7cd011db47, 0c0ffee0-0000-4000-8000-000000000001]
dynamics:
  routing: { by: tenant }
  environments:
    - { name: contoso, url: https://contoso.crm.dynamics.com, tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47, client_id: 11111111-2222-3333-4444-555555555555, client_secret: x }
    - { name: coffee, url: https://coffee.crm4.dynamics.com, tenant_id: 0c0ffee0-0000-4000-8000-000000000001, client_id: 11111111-2222-3333-4444-555555555555, client_secret: x }
"#;
    let dir = Scratch::new("dgw-consent").unwrap();
    let path = dir.write("config.yaml", yaml).unwrap();
    let out = gateway_command()
        .args([
            "consent-url",
            "--environment",
            "coffee",
            "--redirect-uri",
            "https://app.example/onboarded",
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_succeeded(&out);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "https://login.microsoftonline.com/0c0ffee0-0000-4000-8000-000000000001/adminconsent?client_id=11111111-2222-3333-4444-555555555555&redirect_uri=https%3A%2F%2Fapp.example%2Fonboarded"
    );
    let ambiguous = gateway_command()
        .args(["consent-url", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!ambiguous.status.success());
    assert!(String::from_utf8_lossy(&ambiguous.stderr).contains("contoso, coffee"));
    let empty = check(
        &yaml.replace(
            "tenants: [72f988bf-86f1-41af-91ab-2d7cd011db47, 0c0ffee0-0000-4000-8000-000000000001]",
            "tenants: []",
        ),
        &[],
    );
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("inbound.issuers[0].tenants"));
}
