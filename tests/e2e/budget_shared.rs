//! The service-protection budget shared by replicas through a real `redis-server` (Debian's
//! `redis-server` package, started here on a free loopback port): two gateway processes
//! (the real binary) in front of one stand-in Dataverse, as two pods of a deployment.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;
use crate::support::binary;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use binary::{free_port, on_ports, start_binary, Binary};
use dynamics_gateway::config::BudgetStoreConfig;
use dynamics_gateway::metrics::Metrics;
use dynamics_gateway::secret::Secret;
use dynamics_gateway::upstream::budget::store::{Acquired, Store as SharedStore};
use dynamics_gateway::upstream::budget::ThrottleCode;
use support::{at_most, client, ALICE_OID};
use testkit::{gateway_config_yaml, ConfigParts, DataverseHandle, IdpHandle, Throttling};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const WHOAMI: &str = "/api/data/v9.2/WhoAmI";
/// The store's password: in the URL of the config, and never in a log line.
const PASSWORD: &str = "budget-store-pw-7f3a";
const LEASES: &str = "dynamics-gateway:budget:default:application:leases";

/// `redis-server` from PATH (or /usr/bin), or a failure that names the package.
fn redis_server_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "`redis-server` is not installed: install Debian's redis-server package \
             (`apt-get install -y --no-install-recommends redis-server`, as .ci/run does) to run this test"
        )
    })
}

/// A throwaway `redis-server`: no persistence, loopback only, killed on drop.
struct Store {
    port: u16,
    child: Option<Child>,
}

impl Store {
    async fn start() -> Self {
        let mut store = Store {
            port: free_port(),
            child: None,
        };
        store.restart().await;
        store
    }

    /// Starts it (again) on the same port, empty.
    async fn restart(&mut self) {
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--requirepass", PASSWORD])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        for _ in 0..200 {
            if self.try_command(&["PING"]).await.as_deref() == Some("+PONG") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    fn url(&self) -> String {
        format!("redis://:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// One command after AUTH; its one-line reply (`:2`, `+PONG`, ...).
    async fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let mut request = Vec::new();
        for command in [&["AUTH", PASSWORD][..], args] {
            request.extend_from_slice(format!("*{}\r\n", command.len()).as_bytes());
            for arg in command {
                request.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
            }
        }
        stream.write_all(&request).await.ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        while reply.windows(2).filter(|w| w == b"\r\n").count() < 2 {
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8(reply).ok()?;
        let mut lines = text.split("\r\n");
        (lines.next() == Some("+OK")).then_some(())?;
        lines.next().map(str::to_string)
    }

    async fn integer(&self, args: &[&str]) -> i64 {
        let reply = self.try_command(args).await.expect("the store answers");
        reply
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{args:?}: {reply}"))
    }

    /// Waits until no lease is left (each is removed just after its request ends).
    async fn until_no_leases(&self) {
        self.until_leases(LEASES, 0).await;
    }

    async fn until_leases(&self, key: &str, n: i64) {
        for _ in 0..200 {
            if self.integer(&["ZCARD", key]).await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("leases: {}", self.integer(&["ZCARD", key]).await);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
    }
}

struct Replicas {
    idp: IdpHandle,
    dataverse: DataverseHandle,
    a: Binary,
    b: Binary,
}

impl Replicas {
    fn token(&self) -> String {
        self.idp.token_for(ALICE_OID)
    }

    /// A WhoAmI as Alice through `replica`, not sent yet.
    fn whoami_request(&self, replica: &Binary) -> reqwest::RequestBuilder {
        client()
            .get(format!("{}{WHOAMI}", replica.url))
            .bearer_auth(self.token())
    }

    /// [`Self::whoami_request`], sent; its answer.
    async fn whoami(&self, replica: &Binary) -> reqwest::Response {
        self.whoami_request(replica).send().await.unwrap()
    }
}

/// Two replicas sharing a budget of `limit` through `store`.
async fn replicas(store: &Store, throttling: Throttling, limit: usize, extra: &str) -> Replicas {
    let (idp, dataverse) = support::stand_ins(throttling).await;
    let dynamics = format!(
        "  budget:\n    max_concurrency: {limit}\n    queue_timeout: 30s\n    store:\n      valkey:\n        url: {}\n        replicas: 2\n{extra}",
        store.url()
    );
    let parts = ConfigParts {
        identity: support::CALLER_OBJECT_ID.into(),
        server: "  shutdown_grace: 1s\n".into(),
        dynamics,
        ..ConfigParts::default()
    };
    let yaml = gateway_config_yaml(&idp, &dataverse.url(), &parts);
    let mut started = Vec::new();
    for _ in 0..2 {
        let ports = (free_port(), free_port());
        started.push(start_binary(&on_ports(&yaml, ports), ports).await);
    }
    let b = started.pop().unwrap();
    let a = started.pop().unwrap();
    Replicas {
        idp,
        dataverse,
        a,
        b,
    }
}

async fn scrape(replica: &Binary, series: &str) -> f64 {
    let text = support::metrics_text(&replica.admin_url).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} is not on /metrics"))
}

const DEGRADED: &str = "dynamics_gateway_budget_store_degraded ";
const LIMIT: &str =
    "dynamics_gateway_budget_limit{bucket=\"application\",environment=\"default\"} ";

/// Waits until the replica's budget store gauge reads `degraded` (its probe runs twice a second).
async fn until_degraded(replica: &Binary, degraded: f64) {
    for _ in 0..100 {
        if scrape(replica, DEGRADED).await == degraded {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{DEGRADED} never became {degraded}; log:\n{}",
        replica.log()
    );
}

/// `n` concurrent GETs, `n / 2` through each replica (`only_a`: all through the first).
async fn burst(r: &Replicas, n: usize, only_a: bool) -> Vec<u16> {
    let client = client();
    let token = r.token();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let to = if only_a || i % 2 == 0 { &r.a } else { &r.b };
            let request = client
                .get(format!("{}{WHOAMI}", to.url))
                .bearer_auth(&token);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

#[tokio::test]
async fn two_replicas_sharing_a_budget_of_4_never_have_more_than_4_in_flight() {
    let store = Store::start().await;
    let r = replicas(&store, at_most(4), 4, "").await;
    until_degraded(&r.a, 0.0).await;
    until_degraded(&r.b, 0.0).await;
    r.dataverse.set_delay(Duration::from_millis(40));
    // Each replica alone would allow 4: together, unshared, they would send 8.
    let statuses = burst(&r, 120, false).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        r.dataverse.max_in_flight() <= 4,
        "{} in flight",
        r.dataverse.max_in_flight()
    );
    assert!(
        r.dataverse.max_in_flight() >= 2,
        "the burst never overlapped"
    );
    assert_eq!(r.dataverse.throttled_count(), 0);
    assert_eq!(r.dataverse.request_count(), 120);
    // Every lease was given back, and the whole limit is each replica's to ask for.
    store.until_no_leases().await;
    assert_eq!(scrape(&r.a, LIMIT).await, 4.0);
    assert_eq!(scrape(&r.b, LIMIT).await, 4.0);
    for replica in [&r.a, &r.b] {
        assert!(!replica.log().contains(PASSWORD), "{}", replica.log());
    }
}

#[tokio::test]
async fn a_429_seen_by_one_replica_closes_the_bucket_for_the_other() {
    let store = Store::start().await;
    let r = replicas(&store, Throttling::default(), 52, "").await;
    until_degraded(&r.a, 0.0).await;
    until_degraded(&r.b, 0.0).await;
    r.dataverse.respond_next(
        1,
        429,
        vec![("Retry-After".into(), "5".into())],
        r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#,
    );
    let first = r.whoami(&r.a).await;
    assert_eq!(first.status(), 429);
    let other = r.whoami(&r.b).await;
    assert_eq!(other.status(), 429);
    let retry_after: u64 = other.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    let (status, code, message) = support::error_body(other).await;
    assert_eq!((status, code.as_str()), (429, "0x80072322"), "{message}");
    assert_eq!(
        r.dataverse.request_count(),
        1,
        "the other replica sent a request into the penalty"
    );
    let refused =
        "dynamics_gateway_budget_refused_total{environment=\"default\",reason=\"throttled\"} ";
    assert_eq!(scrape(&r.b, refused).await, 1.0);
    // Closed there too from now on, without asking the store again.
    let again = r.whoami(&r.b).await;
    assert_eq!(again.status(), 429);
    assert_eq!(r.dataverse.request_count(), 1);
}

#[tokio::test]
async fn with_the_store_killed_both_replicas_serve_under_their_local_shares_and_share_again_when_it_returns(
) {
    let mut store = Store::start().await;
    let r = replicas(&store, at_most(4), 4, "").await;
    until_degraded(&r.a, 0.0).await;
    until_degraded(&r.b, 0.0).await;
    r.dataverse.set_delay(Duration::from_millis(40));
    assert!(burst(&r, 20, false).await.iter().all(|s| *s == 200));
    store.until_no_leases().await;

    store.kill().await;
    r.dataverse.reset_max_in_flight();
    // Nobody is refused for the store's sake, and one replica alone keeps its share: 4 / 2.
    let statuses = burst(&r, 40, true).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        r.dataverse.max_in_flight() <= 2,
        "{} in flight through one replica",
        r.dataverse.max_in_flight()
    );
    let statuses = burst(&r, 60, false).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(r.dataverse.max_in_flight() <= 4);
    assert_eq!(r.dataverse.throttled_count(), 0);
    let fallbacks = "dynamics_gateway_budget_store_fallbacks_total ";
    let errors = "dynamics_gateway_budget_store_errors_total ";
    for replica in [&r.a, &r.b] {
        until_degraded(replica, 1.0).await;
        assert_eq!(scrape(replica, LIMIT).await, 2.0);
        assert_eq!(scrape(replica, fallbacks).await, 1.0);
        assert!(scrape(replica, errors).await >= 1.0);
        let log = replica.log();
        assert_eq!(
            log.matches("the budget store does not answer").count(),
            1,
            "said once: {log}"
        );
        assert!(!log.contains(PASSWORD), "{log}");
    }

    store.restart().await;
    until_degraded(&r.a, 0.0).await;
    until_degraded(&r.b, 0.0).await;
    r.dataverse.reset_max_in_flight();
    let statuses = burst(&r, 60, false).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(r.dataverse.max_in_flight() <= 4);
    assert_eq!(r.dataverse.throttled_count(), 0);
    for replica in [&r.a, &r.b] {
        assert_eq!(scrape(replica, LIMIT).await, 4.0);
        assert!(replica.log().contains("the budget store answers again"));
    }
    store.until_no_leases().await;
}

#[tokio::test]
async fn a_replica_killed_with_leases_held_frees_them_within_the_lease_ttl() {
    let store = Store::start().await;
    let mut r = replicas(&store, Throttling::default(), 2, "        lease_ttl: 2s\n").await;
    until_degraded(&r.a, 0.0).await;
    until_degraded(&r.b, 0.0).await;
    // Two requests through the first replica take the whole budget and stay.
    r.dataverse.set_delay(Duration::from_secs(60));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let request = r.whoami_request(&r.a);
            tokio::spawn(async move { request.send().await })
        })
        .collect();
    while r.dataverse.in_flight() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.integer(&["ZCARD", LEASES]).await, 2);
    r.a.child.start_kill().unwrap();
    r.a.child.wait().await.unwrap();
    for request in held {
        assert!(
            request.await.unwrap().is_err(),
            "the killed replica answered"
        );
    }
    // Its leases are still there, and go within the TTL: nothing renews them now.
    assert_eq!(store.integer(&["ZCARD", LEASES]).await, 2);
    let pttl = store.integer(&["PTTL", LEASES]).await;
    assert!((1..=2000).contains(&pttl), "leases expire in {pttl} ms");
    r.dataverse.set_delay(Duration::ZERO);
    let served = r.whoami(&r.b).await;
    assert_eq!(served.status(), 200);
    assert_eq!(r.dataverse.request_count(), 3);
    store.until_no_leases().await;
}

#[tokio::test]
async fn the_store_grants_up_to_the_limit_hands_leases_on_gives_them_back_and_closes() {
    let server = Store::start().await;
    let metrics = Metrics::new().unwrap();
    let config = BudgetStoreConfig {
        url: Secret::new(server.url()),
        replicas: 2,
        lease_ttl: Duration::from_secs(30),
        command_timeout: Duration::from_millis(500),
        key_prefix: "t".into(),
    };
    // Two replicas: each store connection has its own replica id.
    let a = SharedStore::new(&config, &metrics).unwrap();
    let b = SharedStore::new(&config, &metrics).unwrap();
    let bucket = "t:budget:x:application";
    let leases = "t:budget:x:application:leases";
    let granted = |answer: Acquired| match answer {
        Acquired::Granted(lease) => lease,
        _ => panic!("not granted"),
    };
    let first = granted(a.acquire(bucket, 2).await.unwrap());
    let second = granted(a.acquire(bucket, 2).await.unwrap());
    assert!(matches!(
        b.acquire(bucket, 2).await.unwrap(),
        Acquired::Full
    ));
    assert_eq!(server.integer(&["ZCARD", leases]).await, 2);
    // b is waiting: a's lease goes back to the store instead of to a's next request...
    assert!(matches!(
        a.adopt(bucket, first).await.unwrap(),
        Acquired::Full
    ));
    assert_eq!(server.integer(&["ZCARD", leases]).await, 1);
    let for_b = granted(b.acquire(bucket, 2).await.unwrap());
    // ...while a's own mark (a asked and found it full) does not stop a from handing on.
    assert!(matches!(
        a.acquire(bucket, 2).await.unwrap(),
        Acquired::Full
    ));
    let second = granted(a.adopt(bucket, second).await.unwrap());
    assert_eq!(server.integer(&["ZCARD", leases]).await, 2);

    a.close(bucket, Duration::from_secs(5), ThrottleCode::Requests)
        .await
        .unwrap();
    match b.acquire(bucket, 2).await.unwrap() {
        Acquired::Closed(retry_after, code) => {
            assert!(retry_after <= Duration::from_secs(5), "{retry_after:?}");
            assert_eq!(code, ThrottleCode::Requests);
        }
        _ => panic!("the bucket is not closed for the other replica"),
    }
    // A shorter closing does not shorten it.
    b.close(bucket, Duration::from_millis(10), ThrottleCode::Other)
        .await
        .unwrap();
    assert!(
        server
            .integer(&["PTTL", "t:budget:x:application:closed"])
            .await
            > 1000
    );
    // A lease handed on into a closed bucket is removed, not renewed.
    assert!(matches!(
        a.adopt(bucket, second).await.unwrap(),
        Acquired::Closed(_, ThrottleCode::Requests)
    ));
    assert_eq!(server.integer(&["ZCARD", leases]).await, 1);
    drop(for_b);
    server.until_leases(leases, 0).await;
}

#[tokio::test]
async fn an_endless_reply_from_the_store_is_cut_off_and_its_connection_dropped() {
    // Something posing as the store answers the first command of each connection with a
    // bulk string that never ends. Without a cap the gateway would buffer it for ever.
    const ENOUGH: u64 = 64 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let endless = tokio::spawn(async move {
        let mut sent_per_connection = Vec::new();
        for _ in 0..2 {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"$1000000000000\r\n").await;
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0u64;
            while sent < ENOUGH && socket.write_all(&chunk).await.is_ok() {
                sent += chunk.len() as u64;
            }
            sent_per_connection.push(sent);
        }
        sent_per_connection
    });
    let metrics = Metrics::new().unwrap();
    let config = BudgetStoreConfig {
        url: Secret::new(format!("redis://{addr}")),
        replicas: 2,
        lease_ttl: Duration::from_secs(30),
        command_timeout: Duration::from_secs(5),
        key_prefix: "t".into(),
    };
    let store = SharedStore::new(&config, &metrics).unwrap();
    let bucket = "t:budget:x:application";
    assert!(store.acquire(bucket, 2).await.is_err());
    // The connection that took the reply is gone: the next command connects again.
    assert!(store.acquire(bucket, 2).await.is_err());
    let sent_per_connection = tokio::time::timeout(Duration::from_secs(30), endless)
        .await
        .expect("a second connection was made")
        .unwrap();
    for sent in sent_per_connection {
        assert!(
            sent < ENOUGH,
            "{sent} bytes went into one connection without the gateway closing it"
        );
    }
    assert!(!store.is_up(), "the gate runs on its local share");
}

#[tokio::test]
async fn requests_admitted_on_the_local_shares_keep_the_shares_after_the_store_returns() {
    let mut store = Store::start().await;
    let r = replicas(&store, Throttling::default(), 4, "").await;
    until_degraded(&r.a, 0.0).await;
    until_degraded(&r.b, 0.0).await;
    store.kill().await;
    until_degraded(&r.a, 1.0).await;
    until_degraded(&r.b, 1.0).await;
    // Each replica its share (2) of long requests, admitted while the store is away: the
    // store holds no lease for them.
    r.dataverse.set_delay(Duration::from_secs(6));
    let long = {
        let (client, token) = (client(), r.token());
        (0..4)
            .map(|i| {
                let to = if i % 2 == 0 { &r.a } else { &r.b };
                let request = client
                    .get(format!("{}{WHOAMI}", to.url))
                    .bearer_auth(&token);
                tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
            })
            .collect::<Vec<_>>()
    };
    for _ in 0..100 {
        if r.dataverse.in_flight() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.dataverse.in_flight(), 4, "the long requests are running");
    store.restart().await;
    until_degraded(&r.a, 0.0).await;
    until_degraded(&r.b, 0.0).await;
    r.dataverse.set_delay(Duration::from_millis(100));
    let before = r.dataverse.request_count();
    // The store answers again, but counts none of the four: taking the whole limit from it
    // now would put 8 in flight. While they run, nothing more is sent.
    let (statuses, ()) = tokio::join!(burst(&r, 20, false), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(r.dataverse.in_flight(), 4, "the long requests still run");
        assert_eq!(
            r.dataverse.request_count(),
            before,
            "a replica took slots from the store on top of its unleased requests"
        );
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for request in long {
        assert_eq!(request.await.unwrap(), 200);
    }
    // Once they ended, the whole limit is shared again.
    assert!(burst(&r, 8, false).await.iter().all(|s| *s == 200));
    for replica in [&r.a, &r.b] {
        assert_eq!(scrape(replica, LIMIT).await, 4.0);
    }
}

/// A stand-in for a store that answers `PING` but refuses every write and script, as a
/// Redis replica does after a failover (`READONLY`); counts the commands it refused.
async fn read_only_store() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let refused = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let refused = counted.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                // RESP arrays of bulk strings: `*n`, then `$len` and the argument, n times.
                while let Ok(Some(line)) = lines.next_line().await {
                    let Some(n) = line.strip_prefix('*').and_then(|n| n.parse::<usize>().ok())
                    else {
                        return;
                    };
                    let mut args = Vec::new();
                    for _ in 0..n {
                        let _len = lines.next_line().await;
                        if let Ok(Some(arg)) = lines.next_line().await {
                            args.push(arg.to_ascii_uppercase());
                        }
                    }
                    let answer: &[u8] = match args.first().map(String::as_str) {
                        Some("PING") => b"+PONG\r\n",
                        Some("CLIENT" | "HELLO" | "SELECT" | "AUTH") => b"+OK\r\n",
                        _ => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            b"-READONLY You can't write against a read only replica.\r\n"
                        }
                    };
                    if write.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, refused)
}

#[tokio::test]
async fn a_store_that_answers_ping_but_refuses_writes_is_not_taken_back() {
    use std::sync::atomic::Ordering;
    let (url, refused) = read_only_store().await;
    let metrics = Metrics::new().unwrap();
    let config = BudgetStoreConfig {
        url: Secret::new(url),
        replicas: 2,
        lease_ttl: Duration::from_secs(30),
        command_timeout: Duration::from_millis(500),
        key_prefix: "t".into(),
    };
    let store = SharedStore::new(&config, &metrics).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(store.clone().probe(stop.clone()));
    assert!(store.acquire("t:budget:x:application", 2).await.is_err());
    // Three probe rounds (twice a second): each asks the store to write, and is refused.
    for _ in 0..200 {
        if refused.load(Ordering::SeqCst) >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused.load(Ordering::SeqCst) >= 4,
        "the probe asked {} times",
        refused.load(Ordering::SeqCst)
    );
    assert!(
        !store.is_up(),
        "a store that refuses writes was taken back because it answered"
    );
    stop.cancel();
}
