//! Tokens already verified, so a repeated token skips the signature check. Bounded and
//! keyed by the token's SHA-256 (the cache never holds a token); an entry is honoured no
//! longer than the token's own `exp`, and at most `MAX_TTL` after it was verified, so a
//! key withdrawn from the issuer's JWKS stops being honoured soon after. Both are checked
//! on every read; an entry past either is removed then, and capacity evicts the rest.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{digest, SHA256};
use quick_cache::sync::Cache;

use super::Caller;

/// Longest time a verified token is trusted without checking its signature again.
const MAX_TTL: Duration = Duration::from_secs(600);

/// The SHA-256 of a token: what the cache is keyed by. Computed once per request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
        Self(out)
    }
}

#[derive(Clone)]
struct Verified {
    caller: Caller,
    /// The token's `exp`, seconds since the epoch.
    exp: u64,
    verified_at: Instant,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The cache of verified tokens; `max_entries == 0` turns it off.
pub struct VerifiedTokens {
    cache: Option<Cache<TokenHash, Verified>>,
}

impl VerifiedTokens {
    pub fn new(max_entries: u64) -> Self {
        let cache = (max_entries > 0)
            .then(|| Cache::new(usize::try_from(max_entries).unwrap_or(usize::MAX)));
        Self { cache }
    }

    /// The caller of a token verified before, not yet expired and verified within `MAX_TTL`.
    pub fn get(&self, token: TokenHash) -> Option<Caller> {
        let cache = self.cache.as_ref()?;
        let hit = cache.get(&token)?;
        if hit.exp > now() && hit.verified_at.elapsed() < MAX_TTL {
            return Some(hit.caller);
        }
        cache.remove(&token);
        None
    }

    pub fn insert(&self, token: TokenHash, caller: &Caller) {
        let Some(cache) = &self.cache else {
            return;
        };
        let Some(exp) = caller.claims.get("exp").and_then(serde_json::Value::as_u64) else {
            return;
        };
        if exp <= now() {
            return;
        }
        cache.insert(
            token,
            Verified {
                caller: caller.clone(),
                exp,
                verified_at: Instant::now(),
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
        cache.insert(TokenHash::of("a.b.c"), &caller(now() + 60));
        let hit = cache.get(TokenHash::of("a.b.c"));
        assert_eq!(hit.unwrap().claim_str("oid"), Some("x"));
        assert!(cache.get(TokenHash::of("a.b.d")).is_none());
        cache.insert(TokenHash::of("old.b.c"), &caller(now() - 1));
        assert!(
            cache.get(TokenHash::of("old.b.c")).is_none(),
            "an expired token is never served from the cache"
        );
    }

    #[test]
    fn zero_entries_turns_the_cache_off() {
        let cache = VerifiedTokens::new(0);
        cache.insert(TokenHash::of("a.b.c"), &caller(now() + 60));
        assert!(cache.get(TokenHash::of("a.b.c")).is_none());
    }
}
