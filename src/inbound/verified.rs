//! Tokens already verified, so a repeated token skips the signature check. Bounded and
//! keyed by the token's SHA-256 (the cache never holds a token); an entry lives no longer
//! than the token's own `exp`, and at most `MAX_TTL`, so a key withdrawn from the
//! issuer's JWKS stops being honoured soon after.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{digest, SHA256};
use moka::policy::Expiry;
use moka::sync::Cache;

use super::Caller;

/// Longest time a verified token is trusted without checking its signature again.
const MAX_TTL: Duration = Duration::from_secs(600);

type TokenHash = [u8; 32];

#[derive(Clone)]
struct Verified {
    caller: Caller,
    /// The token's `exp`, seconds since the epoch.
    exp: u64,
}

struct UntilExp;

impl Expiry<TokenHash, Verified> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &TokenHash,
        value: &Verified,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(value.exp.saturating_sub(now())).min(MAX_TTL))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hash(token: &str) -> TokenHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

/// The cache of verified tokens; `max_entries == 0` turns it off.
pub struct VerifiedTokens {
    cache: Option<Cache<TokenHash, Verified>>,
}

impl VerifiedTokens {
    pub fn new(max_entries: u64) -> Self {
        let cache = (max_entries > 0).then(|| {
            Cache::builder()
                .max_capacity(max_entries)
                .expire_after(UntilExp)
                .build()
        });
        Self { cache }
    }

    /// The caller of a token verified before and not yet expired.
    pub fn get(&self, token: &str) -> Option<Caller> {
        let hit = self.cache.as_ref()?.get(&hash(token))?;
        // Expiry is also enforced here, in case the cache's clock lags a little.
        (hit.exp > now()).then_some(hit.caller)
    }

    pub fn insert(&self, token: &str, caller: &Caller) {
        let Some(cache) = &self.cache else {
            return;
        };
        let Some(exp) = caller.claims.get("exp").and_then(serde_json::Value::as_u64) else {
            return;
        };
        cache.insert(
            hash(token),
            Verified {
                caller: caller.clone(),
                exp,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn caller(exp: u64) -> Caller {
        let claims = serde_json::json!({"exp": exp, "oid": "x"});
        Caller::new(
            Arc::from("https://issuer"),
            Arc::from("https://issuer"),
            super::super::CallerKind::User,
            claims.as_object().cloned().unwrap(),
        )
    }

    #[test]
    fn repeated_token_is_found_until_its_exp() {
        let cache = VerifiedTokens::new(10);
        cache.insert("a.b.c", &caller(now() + 60));
        assert_eq!(cache.get("a.b.c").unwrap().claim_str("oid"), Some("x"));
        assert!(cache.get("a.b.d").is_none());
        cache.insert("old.b.c", &caller(now() - 1));
        assert!(
            cache.get("old.b.c").is_none(),
            "an expired token is never served from the cache"
        );
    }

    #[test]
    fn zero_entries_turns_the_cache_off() {
        let cache = VerifiedTokens::new(0);
        cache.insert("a.b.c", &caller(now() + 60));
        assert!(cache.get("a.b.c").is_none());
    }
}
