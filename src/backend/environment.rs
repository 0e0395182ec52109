//! What the server must give the locks (DESIGN §11), checked once per backend when its
//! first connection is made, and reported in the log.
//!
//! Lock keys carry a TTL, so a `volatile-*` eviction policy picks them first when memory
//! runs out: a held lock vanishes and a second holder gets in. `allkeys-*` policies may
//! evict fencing counters (tokens restart) and locks too, though less eagerly. Nothing is
//! refused: the server may be shared, and the operator decides; but it is said loudly.

use deadpool_redis::redis::{self, aio::ConnectionLike};

/// Reads the eviction settings over `conn` and warns about those that break locks.
/// Failures (a user without `INFO` permission, say) are logged at debug level only.
pub(super) async fn check(mut conn: impl ConnectionLike + Send) {
    let info: String = match redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
    {
        Ok(info) => info,
        Err(err) => {
            tracing::debug!(error = %err, "could not read the server's eviction policy");
            return;
        }
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let (Some(policy), maxmemory) = (field("maxmemory_policy"), field("maxmemory")) else {
        return;
    };
    // Without a memory limit nothing is evicted.
    if maxmemory.is_some_and(|limit| limit == "0") {
        return;
    }
    if let Some(warning) = eviction_warning(policy) {
        tracing::warn!(maxmemory_policy = policy, "{warning}");
    }
}

/// What `policy` can do to locks, if anything.
fn eviction_warning(policy: &str) -> Option<&'static str> {
    if policy.starts_with("volatile-") {
        Some(
            "Redis evicts keys with a TTL first under this maxmemory-policy: held locks can \
             vanish when memory runs out, letting a second holder in; use noeviction",
        )
    } else if policy.starts_with("allkeys-") {
        Some(
            "Redis may evict any key under this maxmemory-policy, held locks and fencing \
             counters included; use noeviction (or keep ample memory headroom)",
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::eviction_warning;

    #[test]
    fn policies_that_evict_locks_are_named() {
        assert!(
            eviction_warning("volatile-lru")
                .unwrap()
                .contains("TTL first")
        );
        assert!(eviction_warning("volatile-ttl").is_some());
        assert!(eviction_warning("allkeys-lru").unwrap().contains("fencing"));
        assert_eq!(eviction_warning("noeviction"), None);
    }
}
