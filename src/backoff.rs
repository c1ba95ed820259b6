//! Retry delays for the background refreshers: exponential, capped, with jitter so a
//! fleet of sidecars that lost the identity provider together do not return in lockstep.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// `base + after`, checked: a sum past the clock's range becomes a day after `base`
/// (callers clamp what they add, so this is a last line of defence, not a policy).
pub fn instant_after(base: Instant, after: Duration) -> Instant {
    base.checked_add(after)
        .or_else(|| base.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(base)
}

/// Delays of `base * 2^n`, capped at `max`, each scaled by a random factor in [0.5, 1.0].
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(self.max);
        capped.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// After a success the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] <= Duration::from_secs(1) && d[0] >= Duration::from_millis(500));
        assert!(d[3] >= Duration::from_secs(4));
        assert!(d[5] <= Duration::from_secs(8));
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn instants_never_overflow() {
        let now = Instant::now();
        assert_eq!(
            instant_after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = instant_after(now, Duration::MAX);
        assert!(far > now);
    }
}
