//! The budget shared by every replica, in Valkey (or Redis): a bucket's slots are leases
//! in a sorted set scored by their expiry, granted by one script (one round trip) that
//! also answers whether another replica saw a 429 that closed the bucket. A lease is
//! renewed while its request runs and removed when it ends (or handed, with one round trip
//! that checks the bucket again, to the next request queued in the same replica, unless
//! another replica marked the bucket wanted); a replica that dies stops renewing, and its
//! leases expire after `lease_ttl`. Expiry is the server's clock, so the replicas' clocks
//! never have to agree.
//!
//! The store is a helper, never a dependency: when it does not answer, each replica keeps
//! `limit / replicas` locally (see `Gate`), and a probe switches back once it answers.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use redis::aio::MultiplexedConnection;
use redis::{IntoConnectionInfo, Script};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::connection::StoreConnection;
use super::ThrottleCode;
use crate::config::BudgetStoreConfig;
use crate::metrics::Metrics;

/// How often the store is probed (and its way back noticed) while the gate runs locally.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// How long a replica's "I am waiting for a slot" mark lasts: a few of its asks.
const WANTED_MS: u64 = 100;

/// Grants a lease if the bucket is open and has room; when it is full, marks the bucket
/// wanted by this replica, so that others give their leases back instead of handing them
/// on. KEYS: leases, closed, wanted. ARGV: limit, ttl in ms, lease id, replica, wanted ms.
/// Answers `{1}` granted, `{0}` full, `{2, pttl, code}` closed.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local closed = redis.call('PTTL', KEYS[2])
if closed > 0 then
  return {2, closed, redis.call('GET', KEYS[2]) or ''}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  local ttl = tonumber(ARGV[2])
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {1, 0, ''}
end
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
return {0, 0, ''}
";

/// Takes over a lease handed from a request that ended to the next one in the same replica:
/// renewed if still live, the bucket open and no other replica waiting; else removed.
/// KEYS: leases, closed, wanted. ARGV: ttl in ms, lease id, replica. Answers as `ACQUIRE`,
/// `{0}` full (given back to a waiting replica), `{3}` expired (ask anew).
const ADOPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local closed = redis.call('PTTL', KEYS[2])
if closed > 0 then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return {2, closed, redis.call('GET', KEYS[2]) or ''}
end
local wanted = redis.call('GET', KEYS[3])
if wanted and wanted ~= ARGV[3] then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return {0, 0, ''}
end
local ttl = tonumber(ARGV[1])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if expiry and tonumber(expiry) > now then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {1, 0, ''}
end
return {3, 0, ''}
";

/// Pushes a live lease's expiry out again; a lease already expired stays gone (its slot may
/// have been granted to another request since). KEYS: leases. ARGV: ttl in ms, lease id.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
";

/// Closes the bucket for every replica, keeping the later of two closings. KEYS: closed.
/// ARGV: ms, Dataverse's code.
const CLOSE: &str = r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 1
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL never reaches this message: it may carry the password.
    #[error("the budget store URL is not usable ({0:?})")]
    Url(redis::ErrorKind),
    #[error("the budget store failed a command ({0:?})")]
    Command(redis::ErrorKind),
    #[error("the budget store did not answer in time")]
    Timeout,
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        // Only the kind: a connection error's text may echo the address it was given.
        Self::Command(e.kind())
    }
}

/// The scripts' `{answer, pttl, code}` as an [`Acquired`]; `lease` only when granted.
fn answered((answer, pttl, code): (i64, i64, String), lease: impl FnOnce() -> Lease) -> Acquired {
    match answer {
        1 => Acquired::Granted(lease()),
        2 => Acquired::Closed(
            Duration::from_millis(pttl.max(1) as u64),
            ThrottleCode::from_code(Some(&code)),
        ),
        3 => Acquired::Lost,
        _ => Acquired::Full,
    }
}

/// What the store answered to a request for a slot.
pub enum Acquired {
    Granted(Lease),
    Full,
    /// Another replica (or this one) saw a 429: closed for this long, with this code.
    Closed(Duration, ThrottleCode),
    /// The lease handed on had expired: ask for a new one at once.
    Lost,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

struct Inner {
    connection: StoreConnection,
    config: BudgetStoreConfig,
    /// `UNKNOWN` until the first answer; the gate shares only while `UP`.
    state: AtomicU8,
    replica: String,
    next_lease: AtomicU64,
    acquire: Script,
    adopt: Script,
    renew: Script,
    close: Script,
    degraded: IntGauge,
    errors: IntCounter,
    fallbacks: IntCounter,
}

/// The connection to the shared store; one per gateway, shared by every environment's gate.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// A slot held in the store; dropping it removes the lease (its expiry covers a removal
/// that never arrives).
pub struct Lease {
    _held: oneshot::Sender<()>,
    id: String,
}

impl Store {
    /// Connects lazily: a store that is not there yet makes the gateway start on the
    /// local shares, not fail.
    pub fn new(config: &BudgetStoreConfig, metrics: &Metrics) -> Result<Self, StoreError> {
        let info = config
            .url
            .expose()
            .into_connection_info()
            .map_err(|e| StoreError::Url(e.kind()))?;
        let connection = StoreConnection::new(info, config.command_timeout);
        // Local shares until the first answer.
        metrics.budget_store_degraded.set(1);
        Ok(Self {
            inner: Arc::new(Inner {
                connection,
                config: config.clone(),
                state: AtomicU8::new(UNKNOWN),
                replica: uuid::Uuid::new_v4().simple().to_string(),
                next_lease: AtomicU64::new(0),
                acquire: Script::new(ACQUIRE),
                adopt: Script::new(ADOPT),
                renew: Script::new(RENEW),
                close: Script::new(CLOSE),
                degraded: metrics.budget_store_degraded.clone(),
                errors: metrics.budget_store_errors_total.clone(),
                fallbacks: metrics.budget_store_fallbacks_total.clone(),
            }),
        })
    }

    pub fn is_up(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == UP
    }

    pub fn replicas(&self) -> usize {
        self.inner.config.replicas
    }

    pub fn key_prefix(&self) -> &str {
        &self.inner.config.key_prefix
    }

    /// Counts a failed command; the first after a success switches to the local shares,
    /// and says so once.
    pub fn failed(&self, error: &StoreError) {
        self.inner.errors.inc();
        if self.inner.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            self.inner.fallbacks.inc();
            self.inner.degraded.set(1);
            tracing::warn!(
                error = %error,
                replicas = self.inner.config.replicas,
                "the budget store does not answer; each replica keeps limit / replicas until it does"
            );
        }
    }

    fn answered(&self) {
        match self.inner.state.swap(UP, Ordering::AcqRel) {
            UP => {}
            previous => {
                self.inner.degraded.set(0);
                if previous == DOWN {
                    tracing::info!(
                        "the budget store answers again; the budget is shared across replicas"
                    );
                } else {
                    tracing::info!(
                        "the budget store answers; the budget is shared across replicas"
                    );
                }
            }
        }
    }

    /// A command within `command_timeout`, its failure counted (and switching to local).
    /// A connection that failed or did not answer in time is dropped, with whatever it
    /// had buffered: the next command connects again.
    async fn run<T, F, Fut>(&self, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let connection = self.inner.connection.get().await?;
            command(connection).await
        };
        let result = match tokio::time::timeout(self.inner.config.command_timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.inner.connection.reset().await;
                }
                Err(StoreError::from(e))
            }
            Err(_) => {
                self.inner.connection.reset().await;
                Err(StoreError::Timeout)
            }
        };
        match &result {
            Ok(_) => self.answered(),
            Err(e) => self.failed(e),
        }
        result
    }

    /// One round trip: a lease in `bucket` if it is open and holds fewer than `limit`.
    pub async fn acquire(&self, bucket: &str, limit: usize) -> Result<Acquired, StoreError> {
        let ttl_ms = self.inner.config.lease_ttl.as_millis() as u64;
        let id = format!(
            "{}:{}",
            self.inner.replica,
            self.inner.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let leases = format!("{bucket}:leases");
        let mut acquire = self.inner.acquire.key(&leases);
        acquire
            .key(format!("{bucket}:closed"))
            .key(format!("{bucket}:wanted"))
            .arg(limit)
            .arg(ttl_ms)
            .arg(&id)
            .arg(&self.inner.replica)
            .arg(WANTED_MS);
        let answer = self
            .run(|mut c| async move { acquire.invoke_async(&mut c).await })
            .await?;
        Ok(answered(answer, || self.hold(leases, id)))
    }

    /// One round trip: `lease`, handed on by a request that ended, for the next one.
    pub async fn adopt(&self, bucket: &str, lease: Lease) -> Result<Acquired, StoreError> {
        let ttl_ms = self.inner.config.lease_ttl.as_millis() as u64;
        let mut adopt = self.inner.adopt.key(format!("{bucket}:leases"));
        adopt
            .key(format!("{bucket}:closed"))
            .key(format!("{bucket}:wanted"))
            .arg(ttl_ms)
            .arg(&lease.id)
            .arg(&self.inner.replica);
        let answer = self
            .run(|mut c| async move { adopt.invoke_async(&mut c).await })
            .await?;
        // Not granted: dropping the lease removes what is left of it.
        Ok(answered(answer, || lease))
    }

    /// Renews the lease every third of its time to live until it is dropped, then removes it.
    fn hold(&self, leases: String, id: String) -> Lease {
        let (held, mut released) = oneshot::channel::<()>();
        let store = self.clone();
        let lease_id = id.clone();
        tokio::spawn(async move {
            let every = store.inner.config.lease_ttl / 3;
            let ttl_ms = store.inner.config.lease_ttl.as_millis() as u64;
            let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = &mut released => break,
                    _ = renewals.tick() => {
                        let mut renew = store.inner.renew.key(&leases);
                        renew.arg(ttl_ms).arg(&lease_id);
                        let _ = store
                            .run(|mut c| async move { renew.invoke_async::<i64>(&mut c).await })
                            .await;
                    }
                }
            }
            let mut remove = redis::cmd("ZREM");
            remove.arg(&leases).arg(&lease_id);
            let _ = store
                .run(|mut c| async move { remove.query_async::<i64>(&mut c).await })
                .await;
        });
        Lease { _held: held, id }
    }

    /// Closes `bucket` for every replica for `retry_after`.
    pub async fn close(
        &self,
        bucket: &str,
        retry_after: Duration,
        code: ThrottleCode,
    ) -> Result<(), StoreError> {
        let ms = retry_after.as_millis().max(1) as u64;
        let mut close = self.inner.close.key(format!("{bucket}:closed"));
        close.arg(ms).arg(code.as_str());
        self.run(|mut c| async move { close.invoke_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// Probes the store until `stop`: the first answer turns sharing on, and the first
    /// answer after a failure turns it back on. The probe is a lease script's write on a
    /// key of its own, not a `PING`: a store that answers `PING` but refuses writes or
    /// scripts (a replica after a failover: `READONLY`; `OOM`; `NOPERM`) is not back.
    pub async fn probe(self, stop: CancellationToken) {
        let probe_key = format!("{}:probe", self.inner.config.key_prefix);
        let ttl_ms = self.inner.config.lease_ttl.as_millis() as u64;
        loop {
            let mut renew = self.inner.renew.key(&probe_key);
            renew.arg(ttl_ms).arg("probe");
            let _ = self
                .run(|mut c| async move { renew.invoke_async::<i64>(&mut c).await })
                .await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
        }
    }
}
