//! What the access rules cost per request, with the CSDL fixture: the decision for a plain
//! GET, a 3-level `$expand` and a `$filter` path; a `POST accounts` body with deep inserts
//! and binds read as it streams (against the same body only link-rewritten); and a
//! 100-part `$batch`, each part decided on its own, against the same batch only checked
//! for headers and URLs. And the CSDL map of a large organisation: a generated 3,000-table
//! CSDL (about 48 MB, Dataverse's shapes) parsed as it streams, its time and the bytes the
//! parsed map keeps (its own account of its heap, and the growth of resident memory over
//! the parse, printed once before the timed runs).
//!
//! Run: `cargo bench --bench access` (`-- csdl` for the large CSDL alone).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dynamics_gateway::access::{AccessPolicy, AccessRequest, Grant, Metadata, RawAccess, Target};
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
        target: &'a Target,
        query: &'a str,
    ) -> AccessRequest<'a> {
        AccessRequest {
            method,
            path,
            query,
            target,
            metadata: Some(&self.metadata),
            claims: &self.claims,
            issuer: "https://issuer.example",
            tenant: Some("t"),
            kind: CallerKind::User,
            stored_query_table: None,
        }
    }

    fn grant(&self, method: &Method, path: &str) -> Grant {
        let target = Target::from_path(path);
        self.policy
            .decide(&self.request(method, path, &target, ""))
            .unwrap()
    }
}

/// This process's resident memory in bytes (`/proc/self/statm`), 0 where there is none.
/// The crate forbids `unsafe`, so no counting global allocator: the resident growth over a
/// parse is measured instead, next to the map's own account of its heap
/// ([`Metadata::heap_bytes`]).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Tables in the generated CSDL, and per table its columns and navigation properties
/// (Dataverse's own tables average about this many; custom ones have fewer).
const TABLES: usize = 3000;
const COLUMNS: usize = 70;
const NAVIGATIONS: usize = 20;

/// A CSDL in Dataverse's shapes: `TABLES` entity types deriving from `crmbaseentity`, each
/// with columns, lookups (N:1, with their `_x_value` column and referential constraint)
/// and 1:N collections to other tables, an entity set with navigation bindings, and a
/// function per ten tables with an entity parameter.
fn large_csdl() -> String {
    let mut x = String::with_capacity(40 << 20);
    x.push_str(r#"<?xml version="1.0" encoding="utf-8"?><edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices><Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">"#);
    x.push_str("\n<EntityType Name=\"crmbaseentity\" Abstract=\"true\"/>\n");
    let target = |t: usize, k: usize| (t * 7 + k * 13 + 1) % TABLES;
    for t in 0..TABLES {
        x.push_str(&format!("<EntityType Name=\"new_table{t}\" BaseType=\"mscrm.crmbaseentity\">\n<Key><PropertyRef Name=\"new_table{t}id\"/></Key>\n<Property Name=\"new_table{t}id\" Type=\"Edm.Guid\"/>\n"));
        for c in 0..COLUMNS {
            x.push_str(&format!("<Property Name=\"new_column{c}_t{t}\" Type=\"Edm.String\" Unicode=\"false\"><Annotation Term=\"Org.OData.Core.V1.Computed\" Bool=\"false\"/></Property>\n"));
        }
        for k in 0..NAVIGATIONS {
            let to = target(t, k);
            if k % 2 == 0 {
                x.push_str(&format!("<Property Name=\"_new_lookup{k}_value\" Type=\"Edm.Guid\"/>\n<NavigationProperty Name=\"new_lookup{k}_t{t}\" Type=\"mscrm.new_table{to}\" Nullable=\"false\" Partner=\"new_table{t}_lookup{k}\"><ReferentialConstraint Property=\"_new_lookup{k}_value\" ReferencedProperty=\"new_table{to}id\"/></NavigationProperty>\n"));
            } else {
                x.push_str(&format!("<NavigationProperty Name=\"new_table{t}_new_table{to}_{k}\" Type=\"Collection(mscrm.new_table{to})\" Partner=\"new_back{k}_t{to}\"/>\n"));
            }
        }
        x.push_str("</EntityType>\n");
        if t % 10 == 0 {
            x.push_str(&format!("<Function Name=\"new_Summary{t}\"><Parameter Name=\"Record\" Type=\"mscrm.new_table{t}\" Nullable=\"false\"/><ReturnType Type=\"Edm.String\" Unicode=\"false\"/></Function>\n"));
        }
    }
    x.push_str("<EntityContainer Name=\"System\">\n");
    for t in 0..TABLES {
        x.push_str(&format!("<EntitySet Name=\"new_table{t}s\" EntityType=\"Microsoft.Dynamics.CRM.new_table{t}\">\n"));
        for k in 0..NAVIGATIONS {
            let to = target(t, k);
            x.push_str(&format!("<NavigationPropertyBinding Path=\"new_lookup{k}_t{t}\" Target=\"new_table{to}s\"/>\n"));
        }
        x.push_str("</EntitySet>\n");
    }
    x.push_str("</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>\n");
    x
}

/// Parses the large CSDL once outside the timed runs and prints what the map keeps.
fn measure_large_csdl(csdl: &str) {
    let before = resident_bytes();
    let started = Instant::now();
    let metadata = Metadata::from_reader(csdl.as_bytes()).unwrap();
    let took = started.elapsed();
    let grown = resident_bytes().saturating_sub(before);
    assert_eq!(metadata.set_count(), TABLES);
    assert_eq!(
        metadata.navigation_target("new_table5s", "new_lookup2_t5"),
        Some(format!("new_table{}s", (5 * 7 + 2 * 13 + 1) % TABLES).as_str())
    );
    let mib = |b: usize| b as f64 / f64::from(1 << 20);
    eprintln!(
        "csdl: {TABLES} tables, {:.1} MB of XML parsed in {:.0} ms; the map's heap {:.1} MiB ({} bytes); resident memory grew {:.1} MiB",
        csdl.len() as f64 / 1e6,
        took.as_secs_f64() * 1e3,
        mib(metadata.heap_bytes()),
        metadata.heap_bytes(),
        mib(grown),
    );
    drop(metadata);
}

fn large(c: &mut Criterion) {
    let csdl = large_csdl();
    measure_large_csdl(&csdl);
    let mut group = c.benchmark_group("csdl");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(csdl.len() as u64));
    group.bench_function("parse_3000_tables", |b| {
        b.iter(|| black_box(Metadata::from_reader(black_box(csdl.as_bytes())).unwrap()))
    });
    group.finish();
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
        let target = Target::from_path(accounts);
        let request = fx.request(&Method::GET, accounts, &target, query);
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
    let target = Target::from_path(accounts);
    let request = fx.request(&post, accounts, &target, "");
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
    let batch_target = Target::from_path(batch_path);
    let envelope = fx.request(&post, batch_path, &batch_target, "");
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

criterion_group!(access, benches, large);
criterion_main!(access);
