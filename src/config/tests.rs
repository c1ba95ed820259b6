use std::num::NonZeroUsize;

use super::inbound::is_entra_issuer;
use super::*;
use crate::body::MinBodyRate;
use crate::upstream::credential::Credential;

const MINIMAL: &str = r#"
inbound:
  issuers:
    - issuer: https://login.microsoftonline.com/t/v2.0
      audiences: [api://dynamics-gateway]
dynamics:
  url: https://contoso.crm.dynamics.com
  tenant_id: t
  client_id: c
  client_secret: ${SECRET}
"#;

fn env(name: &str) -> Option<String> {
    (name == "SECRET").then(|| "s3cr3t-value".to_string())
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(text, &env)
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.request_timeout, Duration::from_secs(120));
    assert_eq!(c.server.max_request_body, 128 << 20);
    assert_eq!(c.inbound.leeway, Duration::from_secs(60));
    assert_eq!(c.identity.mode, IdentityMode::CallerObjectId);
    assert_eq!(c.identity.claim, "oid");
    let env = &c.dynamics.environments[0];
    assert_eq!(c.dynamics.routing, Routing::Single);
    assert_eq!(env.name, "default");
    assert_eq!(env.scope, "https://contoso.crm.dynamics.com/.default");
    assert_eq!(
        env.token_url.as_str(),
        "https://login.microsoftonline.com/t/oauth2/v2.0/token"
    );
    assert!(matches!(&env.credential, Credential::ClientSecret(s) if s.expose() == "s3cr3t-value"));
    assert_eq!(env.tenants, Some(vec!["t".to_string()]));
    assert_eq!(
        c.inbound.issuers[0].discovery_url.as_str(),
        "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration"
    );
}

#[test]
fn unknown_key_is_named() {
    let text = MINIMAL
        .replace("  leeway", "x")
        .replace("dynamics:\n", "dynamics:\n  clientsecret: x\n");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("clientsecret"), "{err}");
    assert!(err.starts_with("dynamics"), "{err}");
}

#[test]
fn unset_variable_is_named_with_its_key() {
    let text = MINIMAL.replace("${SECRET}", "${NOT_SET_ANYWHERE}");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("dynamics.client_secret"), "{err}");
    assert!(err.contains("NOT_SET_ANYWHERE"), "{err}");
}

#[test]
fn duration_without_unit_is_refused() {
    let text = MINIMAL.replace("inbound:\n", "inbound:\n  leeway: \"30\"\n");
    let err = load(&text).unwrap_err().to_string();
    assert!(
        err.contains("inbound.leeway") && err.contains("no unit"),
        "{err}"
    );
}

#[test]
fn keywords_and_units_are_refused_under_their_own_key_with_what_was_expected() {
    let cases = [
            (
                format!("{MINIMAL}identity:\n  mode: admin\n"),
                "identity.mode: \"admin\" is not a mode; use caller_object_id, lookup or static",
            ),
            (
                format!("{MINIMAL}identity:\n  mode: lookup\n  lookup: {{ attribute: fullname }}\n"),
                "identity.lookup.attribute: \"fullname\" is not supported; use azureactivedirectoryobjectid, internalemailaddress or domainname",
            ),
            (
                MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  budget: { bucket: user }\n"),
                "dynamics.budget.bucket: \"user\" is not a bucket; use application or impersonated_user",
            ),
            (
                MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  upstream_http: h3\n"),
                "dynamics.upstream_http: \"h3\" is not an HTTP version; use auto, http1 or http2",
            ),
            (
                MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  routing: { by: host }\n"),
                "dynamics.routing.by: \"host\" is not a routing rule; use path_prefix or tenant",
            ),
            (
                MINIMAL.replace("audiences: [api://dynamics-gateway]", "audiences: [a]\n      algorithms: [RS256, HS256]"),
                "inbound.issuers[0].algorithms[1]: algorithm \"HS256\" is not allowed; use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA",
            ),
            (
                format!("server:\n  max_request_body: 12 parsecs\n{MINIMAL}"),
                "server.max_request_body: unknown size unit \"parsecs\"; use B, KiB, MiB, GiB, KB, MB or GB",
            ),
            (
                MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  budget:\n    store: { valkey: { url: \"redis://127.0.0.1:1\", replicas: 1, lease_ttl: \"9\" } }\n"),
                "dynamics.budget.store.valkey.lease_ttl: \"9\" has no unit; use e.g. \"9s\"",
            ),
        ];
    for (text, expected) in cases {
        assert_eq!(load(&text).unwrap_err().to_string(), expected);
    }
}

#[test]
fn max_batch_part_defaults_to_4_mib_and_must_hold_a_request_line() {
    assert_eq!(load(MINIMAL).unwrap().server.max_batch_part, 4 << 20);
    let text = format!("server:\n  max_batch_part: 16KiB\n{MINIMAL}");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("server.max_batch_part"), "{err}");
}

#[test]
fn plain_http_is_refused_unless_loopback() {
    let text = MINIMAL.replace("https://contoso", "http://contoso");
    let err = load(&text).unwrap_err().to_string();
    assert!(
        err.contains("dynamics.url") && err.contains("http://"),
        "{err}"
    );
    let text = MINIMAL.replace("https://contoso.crm.dynamics.com", "http://127.0.0.1:9");
    assert!(load(&text).is_ok());
}

#[test]
fn hmac_and_none_algorithms_are_refused() {
    for alg in ["HS256", "none"] {
        let text = MINIMAL.replace(
            "audiences: [api://dynamics-gateway]",
            &format!("audiences: [a]\n      algorithms: [{alg}]"),
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("algorithms") && err.contains(alg), "{err}");
    }
}

#[test]
fn errors_never_contain_the_secret() {
    let text = MINIMAL.replace("tenant_id: t", "tenant_id: \"\"");
    let err = load(&text).unwrap_err().to_string();
    assert!(!err.contains("s3cr3t"), "{err}");
    let dbg = format!("{:?}", load(MINIMAL).unwrap());
    assert!(!dbg.contains("s3cr3t"), "{dbg}");
}

#[test]
fn environments_need_a_routing_rule_and_unique_names() {
    let envs = |routing: &str| {
        [
                "inbound:",
                "  issuers:",
                "    - issuer: https://i.example/",
                "      audiences: [a]",
                "      tenants: [t1, t2]",
                "dynamics:",
                routing,
                "  environments:",
                "    - { name: contoso, url: https://contoso.crm.dynamics.com, tenant_id: t1, client_id: c, client_secret: s }",
                "    - { name: fabrikam, url: https://fabrikam.crm4.dynamics.com, tenant_id: t2, client_id: c, client_secret: s }",
            ]
            .join("\n")
    };
    let err = load(&envs("")).unwrap_err().to_string();
    assert!(err.starts_with("dynamics.routing"), "{err}");
    let c = load(&envs("  routing: { by: tenant }")).unwrap();
    assert_eq!(c.dynamics.routing, Routing::Tenant);
    assert_eq!(
        c.dynamics.environments[1].tenants,
        Some(vec!["t2".to_string()])
    );
    let dup = envs("  routing: { by: path_prefix }").replace("name: fabrikam", "name: contoso");
    assert!(load(&dup).unwrap_err().to_string().contains("listed twice"));
    // "none" is the metrics' environment of requests refused before routing.
    for reserved in ["api", crate::metrics::NO_ENVIRONMENT] {
        let named = envs("  routing: { by: path_prefix }")
            .replace("name: fabrikam", &format!("name: {reserved}"));
        let err = load(&named).unwrap_err().to_string();
        assert!(err.contains("is not a valid name"), "{reserved}: {err}");
    }
    let both = envs("  url: https://x.crm.dynamics.com\n  routing: { by: tenant }");
    assert!(load(&both).unwrap_err().to_string().contains("not both"));
}

#[test]
fn exactly_one_credential_per_environment() {
    let two = MINIMAL.replace(
        "  client_secret: ${SECRET}",
        "  client_secret: ${SECRET}\n  managed_identity: {}",
    );
    let err = load(&two).unwrap_err().to_string();
    assert!(err.contains("exactly one credential"), "{err}");
    let none = MINIMAL.replace("  client_secret: ${SECRET}\n", "");
    assert!(load(&none)
        .unwrap_err()
        .to_string()
        .contains("exactly one credential"));
    let mi = MINIMAL.replace(
        "  client_secret: ${SECRET}",
        "  managed_identity: { endpoint: http://127.0.0.1:9/token }",
    );
    let c = load(&mi).unwrap();
    assert_eq!(
        c.dynamics.environments[0].credential.kind(),
        "managed_identity"
    );
}

#[test]
fn admin_consent_url_uses_the_token_authority_and_tenant() {
    let c = load(MINIMAL).unwrap();
    let url = c.dynamics.environments[0].admin_consent_url(Some("https://app.example/onboarded"));
    assert_eq!(
            url,
            "https://login.microsoftonline.com/t/adminconsent?client_id=c&redirect_uri=https%3A%2F%2Fapp.example%2Fonboarded"
        );
}

#[test]
fn with_several_environments_every_issuer_names_its_tenants() {
    let two_envs = |tenants: &str| {
        format!(
                "inbound:\n  issuers:\n    - issuer: https://login.microsoftonline.com/{{tenantid}}/v2.0\n      audiences: [a]\n      tenants: [t1, t2]\n    - issuer: https://keycloak.example/realms/r\n      audiences: [a]\n{tenants}\
dynamics:\n  routing: {{ by: tenant }}\n  environments:\n    \
- {{ name: contoso, url: https://contoso.crm.dynamics.com, tenant_id: t1, client_id: c, client_secret: s }}\n    \
- {{ name: fabrikam, url: https://fabrikam.crm4.dynamics.com, tenant_id: t2, client_id: c, client_secret: s }}\n"
            )
    };
    let err = load(&two_envs("")).unwrap_err().to_string();
    assert!(
        err.starts_with("inbound.issuers[1].tenants")
            && err.contains("https://keycloak.example/realms/r"),
        "{err}"
    );
    assert!(load(&two_envs("      tenants: [t2]\n")).is_ok());
    // One environment serving a second tenant is several tenants too.
    let text = MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  tenants: [t, u]\n");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.starts_with("inbound.issuers[0].tenants"), "{err}");
    // The old single-issuer single-tenant form still loads without a list, and so does
    // one issuer serving any tenant (nothing to confuse it with).
    assert!(load(MINIMAL).is_ok());
    let any = MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  tenants: [\"*\"]\n");
    assert!(load(&any).is_ok());
    let two = any.replace(
            "      audiences: [api://dynamics-gateway]\n",
            "      audiences: [api://dynamics-gateway]\n    - issuer: https://other.example/\n      audiences: [a]\n",
        );
    let err = load(&two).unwrap_err().to_string();
    assert!(err.starts_with("inbound.issuers[0].tenants"), "{err}");
}

#[test]
fn app_only_evidence_defaults_to_entra_only_for_entra_hosts() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(
        c.inbound.issuers[0].app_only_evidence,
        AppOnlyEvidence::Entra
    );
    let other = MINIMAL.replace(
        "https://login.microsoftonline.com/t/v2.0",
        "https://login.microsoftonline.com.evil.example/t/v2.0",
    );
    let c = load(&other).unwrap();
    assert_eq!(
        c.inbound.issuers[0].app_only_evidence,
        AppOnlyEvidence::Never
    );
    assert!(is_entra_issuer(
        "https://login.microsoftonline.com/{tenantid}/v2.0"
    ));
    assert!(is_entra_issuer("https://contoso.ciamlogin.com/t/v2.0"));
    assert!(!is_entra_issuer(
        "https://evil.example/login.microsoftonline.com/"
    ));
    let claim = MINIMAL.replace(
            "audiences: [api://dynamics-gateway]",
            "audiences: [a]\n      app_only_evidence: { claim: token_use, value: service }\n      token_types: [application/AT+JWT]",
        );
    let c = load(&claim).unwrap();
    assert_eq!(
        c.inbound.issuers[0].app_only_evidence,
        AppOnlyEvidence::Claim {
            name: "token_use".into(),
            value: "service".into()
        }
    );
    assert_eq!(
        c.inbound.issuers[0].token_types,
        Some(vec!["at+jwt".to_string()])
    );
    let bad = MINIMAL.replace(
        "audiences: [api://dynamics-gateway]",
        "audiences: [a]\n      app_only_evidence: always",
    );
    let err = load(&bad).unwrap_err().to_string();
    assert!(
        err.contains("inbound.issuers[0].app_only_evidence"),
        "{err}"
    );
}

#[test]
fn lookup_by_email_is_refused() {
    let text = format!("{MINIMAL}identity:\n  mode: lookup\n  claim: email\n  lookup: {{ attribute: internalemailaddress }}\n");
    let err = load(&text).unwrap_err().to_string();
    assert!(
        err.starts_with("identity.claim") && err.contains("mutable"),
        "{err}"
    );
}

#[test]
fn static_entries_name_their_issuer_when_there_are_several() {
    let id = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
    let c = load(&format!(
        "{MINIMAL}identity:\n  mode: static\n  static:\n    alice: {id}\n"
    ))
    .unwrap();
    let IdentityMode::Static(users) = &c.identity.mode else {
        panic!("static mode")
    };
    assert_eq!(users[0].issuer, "https://login.microsoftonline.com/t/v2.0");
    let two = MINIMAL.replace(
            "      audiences: [api://dynamics-gateway]\n",
            "      audiences: [api://dynamics-gateway]\n    - issuer: https://other.example/\n      audiences: [a]\n",
        );
    let err = load(&format!(
        "{two}identity:\n  mode: static\n  static:\n    alice: {id}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("identity.static.alice") && err.contains("name the one it trusts"),
        "{err}"
    );
    let named = format!("{two}identity:\n  mode: static\n  static:\n    alice: {{ systemuserid: {id}, issuer: https://other.example/ }}\n");
    let c = load(&named).unwrap();
    let IdentityMode::Static(users) = &c.identity.mode else {
        panic!("static mode")
    };
    assert_eq!(users[0].issuer, "https://other.example/");
    let unknown = named.replace(
        "issuer: https://other.example/ }",
        "issuer: https://nowhere.example/ }",
    );
    let err = load(&unknown).unwrap_err().to_string();
    assert!(err.starts_with("identity.static.alice.issuer"), "{err}");
}

#[test]
fn guests_cannot_be_allowed_in_caller_object_id_mode() {
    let text = MINIMAL.replace(
        "tenant_id: t\n",
        "tenant_id: t\n  allow_guest_tenants: true\n",
    );
    let err = load(&text).unwrap_err().to_string();
    assert!(err.starts_with("dynamics.allow_guest_tenants"), "{err}");
    let lookup = format!("{text}identity:\n  mode: lookup\n");
    assert!(load(&lookup).unwrap().dynamics.environments[0].allow_guest_tenants);
    assert_eq!(
        load(&lookup).unwrap().identity.unknown_user_cache_ttl,
        Duration::from_secs(60)
    );
}

#[test]
fn static_mode_requires_guid_values() {
    let text = format!("{MINIMAL}identity:\n  mode: static\n  static:\n    alice: not-a-guid\n");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("identity.static.alice"), "{err}");
}

#[test]
fn token_pacing_keys_have_defaults_and_bounds() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.dynamics.token_replace_interval, Duration::from_secs(5));
    assert_eq!(c.dynamics.token_retry_max_wait, Duration::from_secs(300));
    let text = MINIMAL.replace(
        "  client_secret: ${SECRET}\n",
        "  client_secret: ${SECRET}\n  token_replace_interval: 250ms\n  token_retry_max_wait: 2s\n",
    );
    let c = load(&text).unwrap();
    assert_eq!(
        c.dynamics.token_replace_interval,
        Duration::from_millis(250)
    );
    assert_eq!(c.dynamics.token_retry_max_wait, Duration::from_secs(2));
    let err = load(&text.replace("max_wait: 2s", "max_wait: 0s"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dynamics.token_retry_max_wait"), "{err}");
    let err = load(&text.replace("interval: 250ms", "interval: \"5\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dynamics.token_replace_interval"), "{err}");
}

#[test]
fn the_token_timeout_defaults_to_15s_and_carries_a_unit() {
    assert_eq!(
        load(MINIMAL).unwrap().dynamics.token_timeout,
        Duration::from_secs(15)
    );
    let with = |value: &str| {
        MINIMAL.replace(
            "  client_secret: ${SECRET}\n",
            &format!("  client_secret: ${{SECRET}}\n  token_timeout: {value}\n"),
        )
    };
    let c = load(&with("500ms")).unwrap();
    assert_eq!(c.dynamics.token_timeout, Duration::from_millis(500));
    for bad in ["\"15\"", "10ms"] {
        let err = load(&with(bad)).unwrap_err().to_string();
        assert!(err.contains("dynamics.token_timeout"), "{bad}: {err}");
    }
    assert_eq!(
        load(&with("5m")).unwrap().dynamics.token_timeout,
        Duration::from_secs(300)
    );
    for absurd in ["301s", "10d", "1000000h"] {
        let err = load(&with(absurd)).unwrap_err().to_string();
        assert!(
            err.contains("dynamics.token_timeout") && err.contains("at most 5m"),
            "{absurd}: {err}"
        );
    }
}

#[test]
fn connection_and_body_limits_have_documented_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.server.http2_keep_alive_interval, Duration::from_secs(30));
    assert_eq!(c.server.http2_keep_alive_timeout, Duration::from_secs(10));
    assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
    assert_eq!(c.server.exchange_timeout, Duration::from_secs(600));
    assert_eq!(c.server.max_connections_per_peer, NonZeroUsize::new(1000));
}

#[test]
fn per_peer_cap_defaults_to_a_tenth_zero_is_off_and_above_the_total_is_refused() {
    let with = |extra: &str| format!("server:\n{extra}{MINIMAL}");
    let c = load(&with("  max_connections: 5\n")).unwrap();
    assert_eq!(c.server.max_connections_per_peer, NonZeroUsize::new(1));
    let c = load(&with("  max_connections_per_peer: 0\n")).unwrap();
    assert_eq!(c.server.max_connections_per_peer, None);
    let c = load(&with("  max_connections_per_peer: 7\n")).unwrap();
    assert_eq!(c.server.max_connections_per_peer, NonZeroUsize::new(7));
    let err = load(&with(
        "  max_connections: 10\n  max_connections_per_peer: 11\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("server.max_connections_per_peer:"), "{err}");
}

#[test]
fn connection_and_body_timeouts_must_be_positive_and_the_exchange_covers_the_answer() {
    for key in [
        "idle_timeout",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "body_read_timeout",
        "exchange_timeout",
        "min_body_rate_window",
    ] {
        for value in ["0s", "100years"] {
            let text = format!("server:\n  {key}: {value}\n{MINIMAL}");
            let err = load(&text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("server.{key}:")), "{err}");
        }
    }
    let text = format!("server:\n  request_timeout: 2m\n  exchange_timeout: 1m\n{MINIMAL}");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.starts_with("server.exchange_timeout:"), "{err}");
    let text = format!("server:\n  body_read_timeout: \"30\"\n{MINIMAL}");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("server.body_read_timeout"), "{err}");
    // With the rate off, its window is not read.
    let text = format!("server:\n  min_body_rate: 0\n  min_body_rate_window: 0s\n{MINIMAL}");
    assert_eq!(load(&text).unwrap().server.min_body_rate, None);
    assert_eq!(
        load(MINIMAL).unwrap().server.min_body_rate,
        Some(MinBodyRate {
            bytes_per_second: 240,
            window: Duration::from_secs(5)
        })
    );
}

#[test]
fn inline_and_listed_environments_refuse_unknown_keys_naming_the_known_ones() {
    let text = MINIMAL.replace("dynamics:\n", "dynamics:\n  clientsecret: x\n");
    assert_eq!(
        load(&text).unwrap_err().to_string(),
        "dynamics.clientsecret: unknown field `clientsecret`, expected one of `url`, `tenant_id`, `client_id`, `client_secret`, `certificate`, `workload_identity`, `managed_identity`, `token_url`, `scope`, `tenants`, `allow_guest_tenants`, `url_aliases`, `forward_cookies`, `environments`, `routing`, `retry_throttled`, `budget`, `token_replace_interval`, `token_retry_max_wait`, `token_timeout`, `upstream_http`"
    );
    let listed = [
        "inbound:",
        "  issuers:",
        "    - { issuer: https://i.example/, audiences: [a] }",
        "dynamics:",
        "  environments:",
        "    - { name: contoso, url: https://contoso.crm.dynamics.com, tenant_id: t1, client_id: c, client_secret: s, routing: x }",
    ]
    .join("\n");
    assert_eq!(
        load(&listed).unwrap_err().to_string(),
        "dynamics.environments[0].routing: unknown field `routing`, expected one of `name`, `url`, `tenant_id`, `client_id`, `client_secret`, `certificate`, `workload_identity`, `managed_identity`, `token_url`, `scope`, `tenants`, `allow_guest_tenants`, `url_aliases`, `forward_cookies`, `budget`"
    );
    let wrong_type = MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  forward_cookies: [yes]\n");
    let err = load(&wrong_type).unwrap_err().to_string();
    assert!(err.starts_with("dynamics.forward_cookies: "), "{err}");
}

/// A config naming a token file and a CSDL file under a directory that does not exist.
fn naming_absent_files() -> (String, &'static str, &'static str) {
    let token = "/nonexistent/dynamics-gateway-test/token";
    let csdl = "/nonexistent/dynamics-gateway-test/csdl.xml";
    let yaml = MINIMAL.replace(
        "  client_secret: ${SECRET}\n",
        &format!(
            "  workload_identity: {{ token_file: {token}, authority_host: https://login.microsoftonline.com }}\naccess:\n  metadata_file: {csdl}\n  rules:\n    - {{ name: r, when: {{}}, allow: {{ methods: [GET], entity_sets: [accounts] }} }}\n"
        ),
    );
    (yaml, token, csdl)
}

#[test]
fn validation_takes_the_files_from_loaded_files_and_never_from_disk() {
    let (yaml, token, csdl) = naming_absent_files();
    let mut files = LoadedFiles::default();
    files.insert(token, "header.payload.signature\n");
    files.insert(
        csdl,
        &include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/csdl.xml"
        ))[..],
    );
    let c = Config::validate(Config::parse(&yaml, &env).unwrap(), &files).unwrap();
    assert_eq!(
        c.dynamics.environments[0].credential.describe(),
        format!("workload_identity (token file {token})")
    );
    // The CSDL came from the bytes given: no fetch is needed, and other bytes are parsed.
    assert!(!c.access.fetches_metadata());
    files.insert(csdl, "<edmx:Edmx></edmx:Edmx>");
    let (key, message) = Config::validate(Config::parse(&yaml, &env).unwrap(), &files)
        .unwrap_err()
        .into_parts();
    assert_eq!(key, "access.metadata_file");
    assert!(message.contains("no entity sets"), "{message}");
}

#[test]
fn a_file_that_cannot_be_read_is_an_error_naming_its_key_and_path() {
    let (yaml, token, csdl) = naming_absent_files();
    let (key, message) = load(&yaml).unwrap_err().into_parts();
    assert_eq!(key, "dynamics.workload_identity.token_file");
    assert!(
        message.starts_with(&format!("cannot read {token}: ")),
        "{message}"
    );

    // The CSDL read (and not found) as `Config::load` reads it, the token file given.
    let mut files = LoadedFiles::read([Path::new(csdl)]);
    files.insert(token, "header.payload.signature\n");
    let (key, message) = Config::validate(Config::parse(&yaml, &env).unwrap(), &files)
        .unwrap_err()
        .into_parts();
    assert_eq!(key, "access.metadata_file");
    assert!(
        message.starts_with(&format!("cannot read {csdl}: ")),
        "{message}"
    );
    assert!(
        message.ends_with("give the environment's $metadata saved as a file"),
        "{message}"
    );
}
