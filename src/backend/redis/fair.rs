//! Fair mode on one Redis (DESIGN §5): the line in Redis, the grant in the release
//! script, and the grantee told on its process's own grant channel, or on the release
//! channel before that channel is listened to (see `scripts::FAIR_ACQUIRE`).

use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::{
    super::{
        Acquire, BackendError, Released,
        fair::TurnEnd,
        scripts::{FAIR_ACQUIRE, FAIR_RELEASE},
    },
    RedisBackend, lease_millis,
};
use crate::key::LockKey;

/// The keys of a lock's line after the lock's own: the fence counter, the queue, the
/// timeouts and the release channel, in the scripts' order.
const LINE_KEYS: [&str; 4] = [":fence", ":queue", ":timeouts", ":released"];

impl RedisBackend {
    /// This backend with fair mode on or off: releases run the fair release script.
    pub(in crate::backend) fn fair_mode(mut self, on: bool) -> Self {
        std::sync::Arc::make_mut(&mut self.config).fair = on;
        self
    }

    pub(in crate::backend) fn is_fair(&self) -> bool {
        self.config.fair
    }

    /// One fair attempt (`FAIR_ACQUIRE`): the lock, or a place in line until `entry_for`
    /// from now, with the server's time of the refusal.
    pub(crate) async fn fair_attempt(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
        entry_for: Duration,
    ) -> Result<(Acquire, Option<u64>), BackendError> {
        let fencing = self.config.fencing;
        // Named in the line entry only once it is listened to: a grant published there
        // before the subscription would be lost (the release channel, listened to by the
        // wait that follows a refusal, is the fallback until then).
        let grants = self.notifier.as_ref().and_then(|notifier| {
            let channel = notifier.grant_channel(&self.config.prefix);
            notifier.listens_on(&channel).then_some(channel)
        });
        let mut buffer = Uuid::encode_buffer();
        let mut cmd = self.evalsha(&FAIR_ACQUIRE, key, &LINE_KEYS);
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer))
            .arg(lease_millis(ttl))
            .arg(if fencing { "1" } else { "0" })
            .arg(lease_millis(entry_for))
            .arg(self.config.fence_retention_ms)
            .arg(grants.as_deref().unwrap_or(""));
        let reply: Vec<i64> = self.query(&cmd, Some(&FAIR_ACQUIRE)).await?;
        match reply.as_slice() {
            [1] if !fencing => Ok((
                Acquire::Acquired {
                    fencing_token: None,
                },
                None,
            )),
            [1, fence] if fencing && *fence > 0 => Ok((
                Acquire::Acquired {
                    fencing_token: Some(fence.unsigned_abs()),
                },
                None,
            )),
            [0, pttl, now] => Ok((
                Acquire::Held {
                    remaining: u64::try_from(*pttl).ok().map(Duration::from_millis),
                },
                u64::try_from(*now).ok(),
            )),
            other => Err(BackendError::Command(
                format!("unexpected fair acquire reply {other:?}").into(),
            )),
        }
    }

    /// A fair release (`FAIR_RELEASE`), which is also a queued waiter's cancellation.
    /// With `keep_if_alone`, a lock nobody else waits for stays held ([`TurnEnd::Kept`]).
    pub(crate) async fn fair_release(
        &self,
        key: &LockKey,
        token: Uuid,
        keep_if_alone: bool,
    ) -> Result<TurnEnd, BackendError> {
        let mut buffer = Uuid::encode_buffer();
        let [fence, queue, timeouts, released] = LINE_KEYS;
        let mut cmd = self.evalsha(
            &FAIR_RELEASE,
            key,
            &[fence, queue, timeouts, released, ":waiters"],
        );
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer))
            .arg(if self.config.fencing { "1" } else { "0" })
            .arg(self.config.fence_retention_ms)
            .arg(if keep_if_alone { "1" } else { "0" });
        let (was_held, granted): (i64, i64) = self.query(&cmd, Some(&FAIR_RELEASE)).await?;
        if granted == 2 {
            return Ok(TurnEnd::Kept);
        }
        // A grant tells its grantee itself; nobody else needs to step aside or be told.
        Ok(TurnEnd::Released(Released::new(was_held == 1)))
    }

    /// Waits for a grant to `token` on the key's release channel, at most `timeout`.
    ///
    /// A grant published before the refusal at `refused_at` (server ms) belongs to an
    /// earlier wait of the token whose lease has ended since (the refusal found the lock
    /// someone else's), and is ignored: the lease floor the caller takes for a grant (the
    /// refusal's send time) only holds for a grant made after it. Grants to others wake
    /// the wait but do not end it: a fair waiter has nothing to try until its own turn.
    pub(crate) async fn wait_for_grant(
        &self,
        key: &LockKey,
        token: Uuid,
        mut epoch: u64,
        refused_at: Option<u64>,
        timeout: Duration,
    ) -> Option<Option<u64>> {
        let Some(notifier) = &self.notifier else {
            tokio::time::sleep(timeout).await;
            return None;
        };
        let channel = self.release_channel(key);
        let deadline = Instant::now() + timeout;
        // This process's grant channel, for its next entries in any line (once per
        // connection; a failure leaves grants on the release channel).
        let grants = notifier.grant_channel(&self.config.prefix);
        let _ = tokio::time::timeout(timeout, notifier.listen_for_grants(&grants)).await;
        let ours = |notifier: &super::Notifier| {
            let grant = notifier.take_grant(&channel, token)?;
            // Without the refusal's time (never, with our scripts) a grant is not trusted.
            (grant.server_ms >= refused_at?).then_some(grant.fencing_token)
        };
        loop {
            if let Some(grant) = ours(notifier) {
                return Some(grant);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            notifier.wait(&channel, epoch, left).await;
            if let Some(grant) = ours(notifier) {
                return Some(grant);
            }
            let heard = notifier.epoch(&channel);
            if heard == epoch {
                // The timeout, or a new subscription (a grant may have slipped by before
                // it): the caller checks.
                return None;
            }
            epoch = heard;
        }
    }
}
