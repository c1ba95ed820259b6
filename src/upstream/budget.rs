//! Dataverse's service-protection budget, kept by the gateway for every app behind it: a
//! concurrency gate per (environment, bucket). At most `limit` requests are in flight to
//! Dataverse per bucket; more wait in a bounded queue with a deadline. A 429 closes the
//! bucket until its `Retry-After` has passed, so requests that would only extend the
//! penalty are answered by the gateway instead of sent. `limit` follows `x-ms-dop-hint`
//! (never above the configured maximum) and halves on a concurrency 429, growing back by
//! one per `limit` answers (additive increase, multiplicative decrease).
//!
//! With a shared store (`dynamics.budget.store`, [`store`]) the slots are also leases in
//! the store, so the replicas together keep the limit: a request queues here as before,
//! and once it has a local slot takes a lease (or learns that another replica closed the
//! bucket). While the store does not answer, each replica keeps `limit / replicas`.
//!
//! All buckets of an environment share one mutex: every operation is a few field updates,
//! and one lock makes "the bucket exists exactly once" and the queue bound trivially true.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::core::{Atomic, AtomicF64, AtomicI64, GenericGauge, GenericGaugeVec};
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use self::store::{Acquired, Lease, Store};
use super::headers;
use crate::body::{self, BoxError, GatewayBody, PrefixedBody};
use crate::config::{BudgetBucket, BudgetConfig};
use crate::identity::Impersonation;
use crate::metrics::Metrics;

mod connection;
pub mod store;

/// Longest pause between two asks for a lease while the shared bucket is full (randomised
/// below it, so replicas do not ask in step).
const LEASE_POLL: Duration = Duration::from_millis(20);

const DOP_HINT: &str = "x-ms-dop-hint";
const BURST_REMAINING: &str = "x-ms-ratelimit-burst-remaining-xrm-requests";
const TIME_REMAINING: &str = "x-ms-ratelimit-time-remaining-xrm-requests";

/// Most bytes of a 429 body read to find Dataverse's error code (its bodies are ~200 B).
const THROTTLE_BODY_PEEK: usize = 8 * 1024;
/// Longest wait for those bytes: the body follows the head at once, or the code is "other".
const THROTTLE_BODY_WAIT: Duration = Duration::from_secs(1);

/// Which Dataverse limit a 429 reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleCode {
    /// `0x80072322`: number of requests in the window.
    Requests,
    /// `0x80072321`: combined execution time in the window.
    ExecutionTime,
    /// `0x80072326`: concurrent requests.
    Concurrency,
    /// No code, or one not listed above.
    Other,
}

impl ThrottleCode {
    pub(crate) fn from_code(code: Option<&str>) -> Self {
        match code.map(|c| c.trim().to_ascii_lowercase()).as_deref() {
            Some("0x80072322") => Self::Requests,
            Some("0x80072321") => Self::ExecutionTime,
            Some("0x80072326") => Self::Concurrency,
            _ => Self::Other,
        }
    }

    /// The metric label and, but for `Other`, Dataverse's own code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "0x80072322",
            Self::ExecutionTime => "0x80072321",
            Self::Concurrency => "0x80072326",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why the gateway answered a request itself instead of sending it to Dataverse.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("Dynamics throttled this environment (code {}); the gateway sends none of its requests until Retry-After has passed, {}s from now", .code.as_str(), retry_after_secs(*.retry_after))]
    Throttled {
        retry_after: Duration,
        code: ThrottleCode,
    },
    #[error("the request waited {}s for one of the concurrent request slots Dynamics allows; retry shortly", .waited.as_secs())]
    QueueTimeout { waited: Duration },
    #[error("{0} requests are already waiting for the concurrent request slots Dynamics allows; retry shortly")]
    QueueFull(usize),
}

impl BudgetError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "throttled",
            Self::QueueTimeout { .. } => "queue_timeout",
            Self::QueueFull(_) => "queue_full",
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up so a caller never comes back early.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Whose budget a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketKey {
    Application,
    User(Uuid),
}

impl BucketKey {
    /// Index of the metric label: `application` or `users` (never the user id).
    fn label(self) -> usize {
        match self {
            Self::Application => 0,
            Self::User(_) => 1,
        }
    }
}

struct Bucket {
    in_flight: usize,
    /// The AIMD limit, at most the configured maximum; the effective limit is also capped
    /// by the environment's dop hint.
    aimd_limit: usize,
    /// Answers since the last additive increase.
    answers: usize,
    closed_until: Option<Instant>,
    closed_code: ThrottleCode,
    waiters: VecDeque<(u64, oneshot::Sender<Handed>)>,
}

impl Bucket {
    fn new(max: usize) -> Self {
        Self {
            in_flight: 0,
            aimd_limit: max,
            answers: 0,
            closed_until: None,
            closed_code: ThrottleCode::Other,
            waiters: VecDeque::new(),
        }
    }

    fn closed_for(&self, now: Instant) -> Option<Duration> {
        self.closed_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// What a waiter in the queue is told.
enum Handed {
    /// A slot; with the lease of the request that just ended, when the store granted it
    /// one, so the slot changes hands without the store seeing it free (and another
    /// replica taking it in between).
    Slot(Option<Lease>),
    /// Dataverse closed the bucket.
    Closed,
}

struct State {
    buckets: HashMap<BucketKey, Bucket>,
    /// `min(max_concurrency, x-ms-dop-hint)`.
    ceiling: usize,
    queued: usize,
    next_waiter: u64,
    in_flight_by_label: [i64; 2],
    /// 1, or `replicas` while a configured store does not answer (this replica's share).
    divisor: usize,
    /// Requests in flight (or about to be) that hold no lease although a store is
    /// configured. The store does not count them: until they end, this replica keeps its
    /// share even once the store answers again, or it would take the whole limit from the
    /// store on top of them.
    unleased: usize,
}

impl State {
    fn limit(&self, bucket: &Bucket) -> usize {
        effective_limit(bucket.aimd_limit, self.ceiling, self.divisor)
    }
}

/// The limit a bucket grants now: its AIMD limit under the dop hint, this replica's share
/// of it when the store is away, and never 0 (a gate must not refuse everything).
fn effective_limit(aimd_limit: usize, ceiling: usize, divisor: usize) -> usize {
    (aimd_limit.min(ceiling) / divisor.max(1)).max(1)
}

/// Metric handles resolved once per environment, so the hot path does no label lookups.
struct GateMetrics {
    in_flight: [IntGauge; 2],
    limit: [IntGauge; 2],
    queue: IntGauge,
    wait: Histogram,
    refused: [IntCounter; 3],
    throttled: [IntCounter; 4],
    burst_remaining: Reported<AtomicI64>,
    time_remaining: Reported<AtomicF64>,
}

/// A gauge of what Dataverse reports about its budget, made on its first plausible report:
/// read as 0 before Dataverse said anything, it would look like an exhausted budget.
struct Reported<P: Atomic> {
    gauges: GenericGaugeVec<P>,
    environment: String,
    /// Reports outside `0..=max` (a broken or hostile answer) are not recorded.
    max: f64,
    gauge: OnceLock<GenericGauge<P>>,
}

impl<P: Atomic> Reported<P> {
    fn new(gauges: &GenericGaugeVec<P>, environment: &str, max: f64) -> Self {
        Self {
            gauges: gauges.clone(),
            environment: environment.to_owned(),
            max,
            gauge: OnceLock::new(),
        }
    }

    fn record(&self, value: f64, to: impl FnOnce(f64) -> P::T) {
        if !(0.0..=self.max).contains(&value) {
            return;
        }
        self.gauge
            .get_or_init(|| self.gauges.with_label_values(&[&self.environment]))
            .set(to(value));
    }
}

impl GateMetrics {
    fn new(metrics: &Metrics, environment: &str) -> Self {
        let labels = ["application", "users"];
        Self {
            in_flight: labels.map(|b| {
                metrics
                    .budget_in_flight
                    .with_label_values(&[environment, b])
            }),
            limit: labels.map(|b| metrics.budget_limit.with_label_values(&[environment, b])),
            queue: metrics.budget_queue_depth.with_label_values(&[environment]),
            wait: metrics
                .budget_wait_seconds
                .with_label_values(&[environment]),
            refused: ["throttled", "queue_timeout", "queue_full"].map(|r| {
                metrics
                    .budget_refused_total
                    .with_label_values(&[environment, r])
            }),
            throttled: [
                ThrottleCode::Requests,
                ThrottleCode::ExecutionTime,
                ThrottleCode::Concurrency,
                ThrottleCode::Other,
            ]
            .map(|c| {
                metrics
                    .upstream_throttled_total
                    .with_label_values(&[environment, c.as_str()])
            }),
            // Dataverse allows 6,000 requests and 20 minutes per window; far beyond either
            // is not a report.
            burst_remaining: Reported::new(
                &metrics.dataverse_burst_remaining_requests,
                environment,
                1e6,
            ),
            time_remaining: Reported::new(&metrics.dataverse_time_remaining_ms, environment, 1e9),
        }
    }

    fn refused(&self, error: &BudgetError) {
        let i = match error {
            BudgetError::Throttled { .. } => 0,
            BudgetError::QueueTimeout { .. } => 1,
            BudgetError::QueueFull(_) => 2,
        };
        self.refused[i].inc();
    }
}

struct Inner {
    config: BudgetConfig,
    state: Mutex<State>,
    metrics: GateMetrics,
    shared: Option<Shared>,
}

/// The store and this environment's key in it.
struct Shared {
    store: Store,
    /// `<prefix>:budget:<environment>`; the bucket follows.
    key: String,
}

impl Shared {
    fn bucket_key(&self, bucket: BucketKey) -> String {
        match bucket {
            BucketKey::Application => format!("{}:application", self.key),
            BucketKey::User(id) => format!("{}:user:{id}", self.key),
        }
    }
}

/// The gate of one environment. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

/// A slot in flight to Dataverse; dropping it frees the slot for the next waiter.
pub struct Permit {
    inner: Arc<Inner>,
    key: BucketKey,
    /// The slot in the shared store, when it granted one: handed to the next waiter here
    /// with the local slot, or given back to the store.
    lease: Option<Lease>,
    /// Granted under this replica's share while a configured store was away: the store
    /// does not count it, so the share holds until it ends (see `State::unleased`).
    unleased: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner
            .release(self.key, self.lease.take(), self.unleased);
    }
}

/// A request in the queue; dropping it (deadline, caller gone) leaves the queue, and
/// frees a slot granted in the same instant.
struct Waiter {
    inner: Arc<Inner>,
    key: BucketKey,
    id: u64,
    rx: oneshot::Receiver<Handed>,
    settled: bool,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let granted = {
            let mut state = self.inner.lock();
            let State {
                buckets, queued, ..
            } = &mut *state;
            let left = buckets.get_mut(&self.key).and_then(|b| {
                let at = b.waiters.iter().position(|(id, _)| *id == self.id)?;
                b.waiters.remove(at)
            });
            if left.is_some() {
                *queued -= 1;
                self.inner.metrics.queue.set(*queued as i64);
            }
            if left.is_none() {
                match self.rx.try_recv() {
                    Ok(Handed::Slot(lease)) => Some(lease),
                    _ => None,
                }
            } else {
                None
            }
        };
        if let Some(lease) = granted {
            self.inner.release(self.key, lease, false);
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state stays consistent at every await-free step, so a panic elsewhere leaves it usable.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn release(&self, key: BucketKey, mut lease: Option<Lease>, unleased: bool) {
        let mut state = self.lock();
        if unleased {
            state.unleased = state.unleased.saturating_sub(1);
        }
        self.follow_store(&mut state);
        let max = self.config.max_concurrency;
        let ceiling = state.ceiling;
        let divisor = state.divisor;
        let State {
            buckets,
            queued,
            in_flight_by_label,
            ..
        } = &mut *state;
        let Some(bucket) = buckets.get_mut(&key) else {
            return;
        };
        bucket.in_flight = bucket.in_flight.saturating_sub(1);
        in_flight_by_label[key.label()] -= 1;
        let limit = effective_limit(bucket.aimd_limit, ceiling, divisor);
        let granted = grant(bucket, limit, queued, &mut lease);
        in_flight_by_label[key.label()] += granted as i64;
        let idle = bucket.in_flight == 0
            && bucket.waiters.is_empty()
            && bucket.aimd_limit == max
            && bucket.closed_for(Instant::now()).is_none();
        // Per-user buckets exist only while they hold something, so their number is bounded
        // by the requests in flight and queued, not by the users ever seen.
        if idle && key != BucketKey::Application {
            buckets.remove(&key);
        }
        self.publish(&state);
    }

    /// Applies the store's state to the local limits: the share while it is away, the
    /// whole limit (and the waiters that now fit) once it answers.
    fn follow_store(&self, state: &mut State) {
        let Some(shared) = &self.shared else {
            return;
        };
        let divisor = if shared.store.is_up() && state.unleased == 0 {
            1
        } else {
            shared.store.replicas()
        };
        if divisor == state.divisor {
            return;
        }
        let wider = divisor < state.divisor;
        state.divisor = divisor;
        if wider {
            let (ceiling, divisor) = (state.ceiling, state.divisor);
            let State {
                buckets,
                queued,
                in_flight_by_label,
                ..
            } = &mut *state;
            for (key, bucket) in buckets.iter_mut() {
                let limit = effective_limit(bucket.aimd_limit, ceiling, divisor);
                in_flight_by_label[key.label()] += grant(bucket, limit, queued, &mut None) as i64;
            }
        }
        self.publish(state);
    }

    /// Closes a bucket until `retry_after` from now (a later closing wins) and answers
    /// its waiters, who would only be sent into the penalty.
    fn close(&self, state: &mut State, key: BucketKey, retry_after: Duration, code: ThrottleCode) {
        let max = self.config.max_concurrency;
        let State {
            buckets, queued, ..
        } = state;
        let bucket = buckets.entry(key).or_insert_with(|| Bucket::new(max));
        let until = Instant::now() + retry_after.min(self.config.max_retry_after);
        if bucket.closed_until.is_none_or(|t| t < until) {
            bucket.closed_until = Some(until);
            bucket.closed_code = code;
        }
        for (_, tx) in bucket.waiters.drain(..) {
            *queued -= 1;
            let _ = tx.send(Handed::Closed);
        }
    }

    fn publish(&self, state: &State) {
        let m = &self.metrics;
        for (gauge, value) in m.in_flight.iter().zip(state.in_flight_by_label) {
            gauge.set(value);
        }
        let app_limit = state
            .buckets
            .get(&BucketKey::Application)
            .map_or(state.ceiling, |b| state.limit(b));
        m.limit[0].set(app_limit as i64);
        m.limit[1].set(effective_limit(state.ceiling, state.ceiling, state.divisor) as i64);
        m.queue.set(state.queued as i64);
    }
}

/// Hands free slots to waiters in arrival order, the first with `lease` if there is one;
/// returns how many were handed.
fn grant(
    bucket: &mut Bucket,
    limit: usize,
    queued: &mut usize,
    lease: &mut Option<Lease>,
) -> usize {
    let mut granted = 0;
    while bucket.in_flight < limit {
        let Some((_, tx)) = bucket.waiters.pop_front() else {
            break;
        };
        *queued -= 1;
        // A waiter in the queue is alive (it leaves under this lock when dropped).
        match tx.send(Handed::Slot(lease.take())) {
            Ok(()) => {
                bucket.in_flight += 1;
                granted += 1;
            }
            Err(Handed::Slot(back)) => *lease = back,
            Err(Handed::Closed) => {}
        }
    }
    granted
}

impl Gate {
    pub fn new(config: &BudgetConfig, environment: &str, metrics: &Metrics) -> Self {
        Self::build(config, environment, metrics, None)
    }

    /// A gate whose slots the replicas share through `store`.
    pub fn shared(
        config: &BudgetConfig,
        environment: &str,
        metrics: &Metrics,
        store: Store,
    ) -> Self {
        let key = format!("{}:budget:{environment}", store.key_prefix());
        Self::build(config, environment, metrics, Some(Shared { store, key }))
    }

    fn build(
        config: &BudgetConfig,
        environment: &str,
        metrics: &Metrics,
        shared: Option<Shared>,
    ) -> Self {
        // Until the store has answered, the share: never more than the limit in all.
        let divisor = shared.as_ref().map_or(1, |s| s.store.replicas());
        let gate = Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                state: Mutex::new(State {
                    buckets: HashMap::new(),
                    ceiling: config.max_concurrency,
                    queued: 0,
                    next_waiter: 0,
                    in_flight_by_label: [0; 2],
                    divisor,
                    unleased: 0,
                }),
                metrics: GateMetrics::new(metrics, environment),
                shared,
            }),
        };
        gate.inner.publish(&gate.inner.lock());
        gate
    }

    /// The bucket a request spends, by the configured rule.
    pub(crate) fn bucket_for(&self, impersonation: &Impersonation) -> BucketKey {
        match (self.inner.config.bucket, impersonation) {
            (BudgetBucket::Application, _) | (_, Impersonation::ApplicationUser) => {
                BucketKey::Application
            }
            (
                BudgetBucket::ImpersonatedUser,
                Impersonation::CallerObjectId(id) | Impersonation::SystemUserId(id),
            ) => BucketKey::User(*id),
        }
    }

    #[cfg(test)]
    fn bucket_count(&self) -> usize {
        self.inner.lock().buckets.len()
    }

    /// The effective limit of a bucket now.
    pub fn limit(&self, key: BucketKey) -> usize {
        let mut state = self.inner.lock();
        self.inner.follow_store(&mut state);
        state.buckets.get(&key).map_or(
            effective_limit(state.ceiling, state.ceiling, state.divisor),
            |b| state.limit(b),
        )
    }

    /// Waits for a slot: at once if one is free and nobody is queued, else in the queue
    /// until `queue_timeout`. A closed bucket answers at once. With a store that answers,
    /// the slot is also a lease there, asked for until the same deadline.
    pub async fn acquire(&self, key: BucketKey) -> Result<Permit, BudgetError> {
        let started = Instant::now();
        let mut permit = self.acquire_local(key).await?;
        let Some(shared) = &self.inner.shared else {
            return Ok(permit);
        };
        if !shared.store.is_up() {
            permit.unleased = true;
            self.inner.lock().unleased += 1;
            return Ok(permit);
        }
        let bucket = shared.bucket_key(key);
        // A lease handed on with the local slot is taken over (and the bucket's closing
        // checked) in the same one round trip: no other replica can take the slot between
        // two requests of this one. Unless another replica is waiting: then it goes back,
        // and this request asks like any other, so no replica starves the others.
        let mut handed = permit.lease.take();
        loop {
            let limit = {
                let state = self.inner.lock();
                state
                    .buckets
                    .get(&key)
                    .map_or(1, |b| effective_limit(b.aimd_limit, state.ceiling, 1))
            };
            let answer = match handed.take() {
                Some(lease) => shared.store.adopt(&bucket, lease).await,
                None => shared.store.acquire(&bucket, limit).await,
            };
            match answer {
                Ok(Acquired::Granted(lease)) => {
                    permit.lease = Some(lease);
                    return Ok(permit);
                }
                Ok(Acquired::Closed(retry_after, code)) => {
                    // Closed here first: the slot given back below goes to no waiter.
                    let mut state = self.inner.lock();
                    self.inner.close(&mut state, key, retry_after, code);
                    self.inner.publish(&state);
                    drop(state);
                    drop(permit);
                    let e = BudgetError::Throttled { retry_after, code };
                    self.inner.metrics.refused(&e);
                    return Err(e);
                }
                Ok(Acquired::Lost) => {}
                Ok(Acquired::Full) => {
                    let waited = started.elapsed();
                    if waited >= self.inner.config.queue_timeout {
                        let e = BudgetError::QueueTimeout { waited };
                        self.inner.metrics.refused(&e);
                        return Err(e);
                    }
                    let pause = LEASE_POLL.mul_f64(rand::random_range(0.25..1.0));
                    tokio::time::sleep(pause).await;
                }
                Err(_) => {
                    // Counted and logged by the store. The slot in hand was granted under
                    // the whole limit: queue again under this replica's share, counted as
                    // unleased before it queues, so the share holds even if the store
                    // seems to answer again meanwhile.
                    drop(permit);
                    self.inner.lock().unleased += 1;
                    return match self.acquire_local(key).await {
                        Ok(mut permit) => {
                            permit.unleased = true;
                            Ok(permit)
                        }
                        Err(e) => {
                            let mut state = self.inner.lock();
                            state.unleased = state.unleased.saturating_sub(1);
                            self.inner.follow_store(&mut state);
                            Err(e)
                        }
                    };
                }
            }
        }
    }

    async fn acquire_local(&self, key: BucketKey) -> Result<Permit, BudgetError> {
        let queued = {
            let mut state = self.inner.lock();
            self.inner.follow_store(&mut state);
            match self.try_acquire(&mut state, key) {
                Ok(Some(permit)) => {
                    self.inner.publish(&state);
                    return Ok(permit);
                }
                Ok(None) => {}
                Err(e) => {
                    drop(state);
                    self.inner.metrics.refused(&e);
                    return Err(e);
                }
            }
            if state.queued >= self.inner.config.max_queue {
                let e = BudgetError::QueueFull(state.queued);
                drop(state);
                self.inner.metrics.refused(&e);
                return Err(e);
            }
            let id = state.next_waiter;
            state.next_waiter += 1;
            let (tx, rx) = oneshot::channel();
            let max = self.inner.config.max_concurrency;
            state
                .buckets
                .entry(key)
                .or_insert_with(|| Bucket::new(max))
                .waiters
                .push_back((id, tx));
            state.queued += 1;
            self.inner.metrics.queue.set(state.queued as i64);
            Waiter {
                inner: self.inner.clone(),
                key,
                id,
                rx,
                settled: false,
            }
        };
        let mut waiter = queued;
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.inner.config.queue_timeout, &mut waiter.rx).await;
        self.inner
            .metrics
            .wait
            .observe(started.elapsed().as_secs_f64());
        let result = match outcome {
            Ok(Ok(Handed::Slot(lease))) => {
                waiter.settled = true;
                Ok(Permit {
                    inner: self.inner.clone(),
                    key,
                    lease,
                    unleased: false,
                })
            }
            Ok(Ok(Handed::Closed)) => {
                waiter.settled = true;
                let state = self.inner.lock();
                let bucket = state.buckets.get(&key);
                Err(BudgetError::Throttled {
                    retry_after: bucket
                        .and_then(|b| b.closed_for(Instant::now()))
                        .unwrap_or(Duration::from_secs(1)),
                    code: bucket.map_or(ThrottleCode::Other, |b| b.closed_code),
                })
            }
            // Deadline passed (the waiter's drop leaves the queue or frees a late grant).
            Ok(Err(_)) | Err(_) => Err(BudgetError::QueueTimeout {
                waited: started.elapsed(),
            }),
        };
        if let Err(e) = &result {
            self.inner.metrics.refused(e);
        }
        result
    }

    /// A slot now if the bucket is open, has room and nobody waits; `Ok(None)`: queue.
    fn try_acquire(
        &self,
        state: &mut State,
        key: BucketKey,
    ) -> Result<Option<Permit>, BudgetError> {
        let max = self.inner.config.max_concurrency;
        let ceiling = state.ceiling;
        // A bucket is made only for a request that goes or waits, never for one refused.
        let has_room = match state.buckets.get(&key) {
            Some(bucket) => {
                if let Some(retry_after) = bucket.closed_for(Instant::now()) {
                    return Err(BudgetError::Throttled {
                        retry_after,
                        code: bucket.closed_code,
                    });
                }
                bucket.in_flight < state.limit(bucket) && bucket.waiters.is_empty()
            }
            None => effective_limit(max, ceiling, state.divisor) >= 1,
        };
        if has_room {
            let bucket = state.buckets.entry(key).or_insert_with(|| Bucket::new(max));
            bucket.in_flight += 1;
            state.in_flight_by_label[key.label()] += 1;
            return Ok(Some(Permit {
                inner: self.inner.clone(),
                key,
                lease: None,
                unleased: false,
            }));
        }
        Ok(None)
    }

    /// Waits until the bucket is open again, at most `at_most` (a retry of a throttled
    /// request waits here rather than on its own clock).
    pub(crate) async fn wait_open(&self, key: BucketKey, at_most: Duration) {
        let closed_for = {
            let state = self.inner.lock();
            state
                .buckets
                .get(&key)
                .and_then(|b| b.closed_for(Instant::now()))
        };
        if let Some(d) = closed_for {
            tokio::time::sleep(d.min(at_most)).await;
        }
    }

    /// What Dataverse's answer says about the budget: its dop hint, its remaining budget,
    /// and whether it throttled (`code` from the 429 body, if read). A 429 that closed the
    /// bucket is returned, for [`Gate::share_closed`].
    pub fn observe(
        &self,
        key: BucketKey,
        status: StatusCode,
        headers: &HeaderMap,
        code: Option<&str>,
    ) -> Option<(Duration, ThrottleCode)> {
        let m = &self.inner.metrics;
        if let Some(v) = header_number(headers, BURST_REMAINING) {
            m.burst_remaining.record(v, |v| v as i64);
        }
        if let Some(v) = header_number(headers, TIME_REMAINING) {
            m.time_remaining.record(v, |v| v);
        }
        let dop = header_number(headers, DOP_HINT)
            .filter(|v| *v >= 1.0)
            .map(|v| v as usize);
        let throttle = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
            let code = ThrottleCode::from_code(code);
            m.throttled[code.index()].inc();
            (code, headers::retry_after(headers))
        });
        let max = self.inner.config.max_concurrency;
        let mut state = self.inner.lock();
        self.inner.follow_store(&mut state);
        if let Some(hint) = dop {
            state.ceiling = hint.min(max);
        }
        let (ceiling, divisor) = (state.ceiling, state.divisor);
        let mut closed = None;
        {
            let State {
                buckets,
                queued,
                in_flight_by_label,
                ..
            } = &mut *state;
            let bucket = buckets.entry(key).or_insert_with(|| Bucket::new(max));
            // AIMD works on the whole limit; the share is taken of it.
            let limit = bucket.aimd_limit.min(ceiling).max(1);
            match throttle {
                Some((code, retry_after)) => {
                    if code == ThrottleCode::Concurrency {
                        bucket.aimd_limit = (limit / 2).max(1);
                        bucket.answers = 0;
                    }
                    closed = retry_after.map(|after| (after, code));
                }
                None => {
                    bucket.answers += 1;
                    if bucket.aimd_limit < max && bucket.answers >= limit {
                        bucket.aimd_limit += 1;
                        bucket.answers = 0;
                    }
                    let limit = effective_limit(bucket.aimd_limit, ceiling, divisor);
                    in_flight_by_label[key.label()] +=
                        grant(bucket, limit, queued, &mut None) as i64;
                }
            }
        }
        if let Some((after, code)) = closed {
            self.inner.close(&mut state, key, after, code);
        }
        self.inner.publish(&state);
        closed.map(|(after, code)| (after.min(self.inner.config.max_retry_after), code))
    }

    /// Tells the other replicas that Dataverse closed this bucket (a no-op without a store,
    /// or while it does not answer: each replica then learns from its own 429).
    pub(crate) async fn share_closed(&self, key: BucketKey, closed: (Duration, ThrottleCode)) {
        let Some(shared) = &self.inner.shared else {
            return;
        };
        if shared.store.is_up() {
            let _ = shared
                .store
                .close(&shared.bucket_key(key), closed.0, closed.1)
                .await;
        }
    }
}

/// A numeric header as Dataverse writes them (`1,200,000.00`).
fn header_number(headers: &HeaderMap, name: &str) -> Option<f64> {
    let text = headers.get(name)?.to_str().ok()?;
    let n: f64 = text.trim().replace(',', "").parse().ok()?;
    n.is_finite().then_some(n)
}

/// The response with its body boxed; for a 429 in plain JSON, also Dataverse's error code,
/// read from the first bytes of the body (which then still go to the caller unchanged).
pub(crate) async fn read_throttle_code(
    response: Response<Incoming>,
) -> (Response<GatewayBody>, Option<String>) {
    let (parts, incoming) = response.into_parts();
    let incoming: GatewayBody = body::boxed(incoming.map_err(|e| -> BoxError { Box::new(e) }));
    let plain = parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if parts.status != StatusCode::TOO_MANY_REQUESTS || !plain {
        return (Response::from_parts(parts, incoming), None);
    }
    let mut rest = incoming;
    let mut head = BytesMut::new();
    let mut failed: Option<BoxError> = None;
    let _ = tokio::time::timeout(THROTTLE_BODY_WAIT, async {
        while head.len() < THROTTLE_BODY_PEEK {
            match rest.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        head.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
    })
    .await;
    let head: Bytes = head.freeze();
    let code = serde_json::from_slice::<serde_json::Value>(&head)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    let rest = match failed {
        // The error still reaches the caller where it happened: after the bytes read.
        Some(e) => body::boxed(http_body_util::StreamBody::new(futures_util::stream::once(
            async move { Err::<http_body::Frame<Bytes>, BoxError>(e) },
        ))),
        None => rest,
    };
    let body = body::boxed(PrefixedBody::new(head, rest));
    (Response::from_parts(parts, body), code)
}

/// The response body holding its permit until it ends (or is dropped): Dataverse is still
/// writing the answer while it streams, so it still counts against its concurrency.
pub(crate) fn hold_until_end(body: GatewayBody, permit: Permit) -> GatewayBody {
    body::boxed(PermitBody {
        inner: body,
        permit: Some(permit),
    })
}

struct PermitBody {
    inner: GatewayBody,
    permit: Option<Permit>,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
