//! What the access rules cost per request, with the CSDL fixture: the decision for a plain
//! GET, a 3-level `$expand` and a `$filter` path; a `POST accounts` body with deep inserts
//! and binds read as it streams (against the same body only link-rewritten); and a
//! 100-part `$batch`, each part decided on its own, against the same batch only checked
//! for headers and URLs.
//!
//! Run: `cargo bench --bench access`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dynamics_gateway::access::{AccessPolicy, AccessRequest, Grant, Metadata, RawAccess};
use dynamics_gateway::inbound::CallerKind;
use dynamics_gateway::upstream::batch_parts::PartRules;
use dynamics_gateway::upstream::odata_links::{
    BatchLinkRewriter, JsonKeys, JsonLinkRewriter, LinkRewrite,
};
use http::Method;
use serde_json::{json, Map, Value};

const POLICY: &str = "
default: deny
rules:
  - name: other-team
    when: { roles: [Other] }
    allow: { methods: [GET], entity_sets: [systemusers] }
  - name: batches
    when: { roles: [Sales] }
    allow: { batch: true }
  - name: sales
    when: { roles: [Sales] }
    allow:
      methods: [GET, POST, PATCH]
      entity_sets: [accounts]
      tables: { contacts: [read, create, associate], systemusers: [read], new_projects: [read] }
";

struct Fixture {
    policy: AccessPolicy,
    metadata: Arc<Metadata>,
    claims: Map<String, Value>,
}

impl Fixture {
    fn new() -> Self {
        let raw: RawAccess = serde_norway::from_str(POLICY).unwrap();
        let metadata =
            Metadata::from_reader(include_str!("../tests/fixtures/csdl.xml").as_bytes()).unwrap();
        let Value::Object(claims) = json!({ "roles": ["Sales"], "tid": "t", "oid": "o" }) else {
            unreachable!()
        };
        Self {
            policy: AccessPolicy::from_raw(raw, "access").unwrap(),
            metadata: Arc::new(metadata),
            claims,
        }
    }

    fn request<'a>(
        &'a self,
        method: &'a Method,
        path: &'a str,
        query: &'a str,
    ) -> AccessRequest<'a> {
        AccessRequest {
            method,
            path,
            query,
            metadata: Some(&self.metadata),
            claims: &self.claims,
            issuer: "https://issuer.example",
            kind: CallerKind::User,
            stored_query_table: None,
        }
    }

    fn grant(&self, method: &Method, path: &str) -> Grant {
        self.policy.decide(&self.request(method, path, "")).unwrap()
    }
}

fn benches(c: &mut Criterion) {
    let fx = Fixture::new();
    let accounts = "/api/data/v9.2/accounts";
    for (name, query) in [
        ("decide/plain_get", "$select=name,revenue&$top=10"),
        (
            "decide/expand_3_levels",
            "$select=name&$expand=primarycontactid($select=fullname;$expand=parentcustomerid_account($select=name;$expand=owninguser($select=fullname)))",
        ),
        ("decide/filter_path", "$filter=primarycontactid/fullname eq 'a/b' and revenue gt 10"),
    ] {
        let request = fx.request(&Method::GET, accounts, query);
        assert!(fx.policy.decide(&request).is_ok(), "{name}");
        c.bench_function(name, |b| b.iter(|| black_box(fx.policy.decide(black_box(&request)))));
    }

    // A create with 20 contacts inserted deep, each bound to an owner.
    let contacts: Vec<Value> = (0..20)
        .map(|i| json!({ "lastname": format!("c{i}"), "description": "x".repeat(200), "parentcustomerid_account@odata.bind": "accounts(00000000-0000-0000-0000-000000000001)" }))
        .collect();
    let body = serde_json::to_vec(&json!({
        "name": "x",
        "description": "y".repeat(2000),
        "primarycontactid@odata.bind": "http://127.0.0.1:8080/api/data/v9.2/contacts(00000000-0000-0000-0000-000000000002)",
        "contact_customer_accounts": contacts,
    }))
    .unwrap();
    let rewrite = LinkRewrite::new("http://127.0.0.1:8080", "https://contoso.crm.dynamics.com");
    let post = Method::POST;
    let request = fx.request(&post, accounts, "");
    let grant = fx.policy.decide(&request).unwrap();
    let access = fx.policy.body_access(&request, &grant).unwrap();
    let mut group = c.benchmark_group("body");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("deep_insert_rewritten_only", |b| {
        b.iter(|| {
            let mut r = JsonLinkRewriter::new(rewrite.clone(), JsonKeys::RequestBinds);
            let mut out = Vec::with_capacity(body.len());
            r.push(&body, &mut out);
            r.finish(&mut out);
            black_box(out)
        })
    });
    group.bench_function("deep_insert_rewritten_and_decided", |b| {
        b.iter(|| {
            let mut r = JsonLinkRewriter::inspected(rewrite.clone(), access.inspector().unwrap());
            let mut out = Vec::with_capacity(body.len());
            r.push(&body, &mut out);
            assert!(r.refusal().is_none());
            r.finish(&mut out);
            black_box(out)
        })
    });
    group.finish();

    // 100 parts: reads with an expand, and creates with a bind, half in one change set.
    let mut batch = String::new();
    for i in 0..50 {
        batch.push_str(&format!("--batch\r\nContent-Type: application/http\r\nContent-ID: g{i}\r\n\r\nGET /api/data/v9.2/accounts?$select=name&$expand=primarycontactid($select=fullname) HTTP/1.1\r\nAccept: application/json\r\n\r\n"));
    }
    batch.push_str("--batch\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n");
    for i in 0..50 {
        batch.push_str(&format!("--cs\r\nContent-Type: application/http\r\nContent-ID: {i}\r\n\r\nPOST /api/data/v9.2/contacts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"lastname\":\"c{i}\",\"parentcustomerid_account@odata.bind\":\"accounts(00000000-0000-0000-0000-000000000001)\"}}\r\n"));
    }
    batch.push_str("--cs--\r\n--batch--\r\n");
    let batch_path = "/api/data/v9.2/$batch";
    let envelope = fx.request(&post, batch_path, "");
    let batch_grant = fx.grant(&post, batch_path);
    let batch_access = fx.policy.body_access(&envelope, &batch_grant).unwrap();
    let mut group = c.benchmark_group("batch_100_parts");
    group.throughput(Throughput::Elements(100));
    for (name, decided) in [("checked_only", false), ("each_part_decided", true)] {
        let rules = PartRules::new(batch_grant.clone(), b"batch".to_vec(), 1 << 20)
            .with_access(decided.then(|| batch_access.batch().unwrap()));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut r = BatchLinkRewriter::request(rewrite.clone(), rules.clone());
                let mut out = Vec::with_capacity(batch.len());
                r.push(batch.as_bytes(), &mut out).unwrap();
                r.finish(&mut out).unwrap();
                black_box(out)
            })
        });
    }
    group.finish();
}

criterion_group!(access, benches);
criterion_main!(access);
