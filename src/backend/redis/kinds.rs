//! The shared kinds of lock on one Redis (see `backend::kind_scripts`): permits and
//! read/write, one script per operation, every key in the lock's hash slot.

use std::time::Duration;

use deadpool_redis::redis::{Cmd, Script};
use uuid::Uuid;

use super::{RedisBackend, lease_millis};
use crate::{
    backend::{
        Acquire, BackendError, Released,
        kind_scripts::{
            MANY_ACQUIRE, MANY_EXTEND, MANY_RELEASE, PERMIT_ACQUIRE, READ_ACQUIRE, SHARE_EXTEND,
            SHARE_RELEASE, WRITE_ACQUIRE,
        },
        one_at_a_time,
        scripts::{EXTEND, RELEASE},
    },
    key::LockKey,
    kind::LockKind,
};

/// How long a refused writer's mark refuses new readers (ms). Each refused attempt of the
/// writer renews it, and a waiting writer tries again at least every backoff (250 ms by
/// default) or on a release notification; a writer that gave up stops blocking readers
/// this long after its last attempt.
const WRITER_WAITING_MS: u64 = 1000;

impl RedisBackend {
    /// `EVALSHA <script>` on the lock's keys `<prefix>{<key>}<suffix>`, one per suffix.
    fn kind_cmd(&self, script: &Script, key: &LockKey, suffixes: &[&'static str]) -> Cmd {
        let mut cmd = Cmd::new();
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(suffixes.len());
        for suffix in suffixes {
            cmd.arg(self.key_arg(key, suffix));
        }
        cmd
    }

    pub(super) async fn acquire_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        if matches!(kind, LockKind::Exclusive | LockKind::Several) {
            // Several keys come through `try_acquire_many`, never here.
            return self.attempt(key, token, ttl, false).await;
        }
        let mut buffer = Uuid::encode_buffer();
        let token = &*token.hyphenated().encode_lower(&mut buffer);
        let lease = lease_millis(ttl);
        let (script, cmd, fencing): (&'static Script, Cmd, bool) = match kind {
            LockKind::Exclusive | LockKind::Several => unreachable!("taken above"),
            LockKind::Permits(n) => {
                let mut cmd = self.kind_cmd(&PERMIT_ACQUIRE, key, &[":permits", ":waiters"]);
                cmd.arg(token).arg(lease).arg(n.get());
                (&PERMIT_ACQUIRE, cmd, false)
            }
            LockKind::Read => {
                let suffixes = [":writer", ":readers", ":writer_waiting", ":waiters"];
                let mut cmd = self.kind_cmd(&READ_ACQUIRE, key, &suffixes);
                cmd.arg(token).arg(lease);
                (&READ_ACQUIRE, cmd, false)
            }
            LockKind::Write => {
                let suffixes = [
                    ":writer",
                    ":readers",
                    ":writer_waiting",
                    ":waiters",
                    ":fence",
                ];
                let mut cmd = self.kind_cmd(&WRITE_ACQUIRE, key, &suffixes);
                let fencing = self.config.fencing;
                cmd.arg(token)
                    .arg(lease)
                    .arg(if fencing { "1" } else { "0" })
                    .arg(WRITER_WAITING_MS)
                    .arg(self.config.fence_retention_ms);
                (&WRITE_ACQUIRE, cmd, fencing)
            }
        };
        let reply: Vec<i64> = self.query(&cmd, Some(script)).await?;
        acquire_reply(&reply, fencing, kind)
    }

    pub(super) async fn release_kind_script(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
    ) -> Result<Released, BackendError> {
        let mut buffer = Uuid::encode_buffer();
        let token_text = &*token.hyphenated().encode_lower(&mut buffer);
        let (script, cmd): (&'static Script, Cmd) = match kind {
            LockKind::Exclusive | LockKind::Several => {
                return crate::backend::LockBackend::release(self, key, token).await;
            }
            LockKind::Permits(_) | LockKind::Read => {
                let set = if kind == LockKind::Read {
                    ":readers"
                } else {
                    ":permits"
                };
                let mut cmd = self.kind_cmd(&SHARE_RELEASE, key, &[set, ":released", ":waiters"]);
                cmd.arg(token_text)
                    .arg(if kind == LockKind::Read { "1" } else { "0" });
                (&SHARE_RELEASE, cmd)
            }
            LockKind::Write => {
                // The writer is an exclusive lock under another name: the exclusive
                // release script, always telling waiters.
                let mut cmd = self.kind_cmd(&RELEASE, key, &[":writer", ":waiters"]);
                cmd.arg(token_text).arg(self.release_channel(key));
                let reply: u64 = self.query(&cmd, Some(&RELEASE)).await?;
                return Ok(self.release_reply(key, reply));
            }
        };
        let (held, receivers, marked): (i64, u64, i64) = self.query(&cmd, Some(script)).await?;
        Ok(self.released(Some(key), held == 1, receivers, marked == 1))
    }

    pub(super) async fn extend_kind_script(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let mut buffer = Uuid::encode_buffer();
        let token_text = &*token.hyphenated().encode_lower(&mut buffer);
        let (script, suffix): (&'static Script, &'static str) = match kind {
            LockKind::Exclusive | LockKind::Several => {
                return crate::backend::LockBackend::extend(self, key, token, ttl).await;
            }
            LockKind::Permits(_) => (&SHARE_EXTEND, ":permits"),
            LockKind::Read => (&SHARE_EXTEND, ":readers"),
            // The writer is an exclusive lock under another name.
            LockKind::Write => (&EXTEND, ":writer"),
        };
        let mut cmd = self.kind_cmd(script, key, &[suffix]);
        cmd.arg(token_text).arg(lease_millis(ttl));
        let extended: i64 = self.query(&cmd, Some(script)).await?;
        Ok(extended == 1)
    }
}

/// Several keys at once: one script on one server; one key at a time in the keys' order
/// on a Cluster, where keys of different slots cannot meet in one script.
impl RedisBackend {
    fn many_cmd(&self, script: &Script, keys: &[LockKey], suffixes: &[&'static str]) -> Cmd {
        let mut cmd = Cmd::new();
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(keys.len() * suffixes.len());
        for suffix in suffixes {
            for key in keys {
                cmd.arg(self.key_arg(key, suffix));
            }
        }
        cmd
    }

    pub(super) async fn acquire_many(
        &self,
        keys: &[LockKey],
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        if self.connection.is_cluster() {
            return one_at_a_time::acquire(self, keys, token, ttl).await;
        }
        let mut buffer = Uuid::encode_buffer();
        let mut cmd = self.many_cmd(&MANY_ACQUIRE, keys, &["", ":waiters"]);
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer))
            .arg(lease_millis(ttl))
            .arg(keys.len());
        let reply: Vec<i64> = self.query(&cmd, Some(&MANY_ACQUIRE)).await?;
        acquire_reply(&reply, false, LockKind::Several)
    }

    pub(super) async fn release_many_script(
        &self,
        keys: &[LockKey],
        token: Uuid,
    ) -> Result<Released, BackendError> {
        if self.connection.is_cluster() {
            return one_at_a_time::release(self, keys, token).await;
        }
        let mut buffer = Uuid::encode_buffer();
        let mut cmd = self.many_cmd(&MANY_RELEASE, keys, &["", ":released", ":waiters"]);
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer))
            .arg(keys.len());
        let (all, receivers, marked): (i64, u64, i64) =
            self.query(&cmd, Some(&MANY_RELEASE)).await?;
        // Several channels: our own subscriber may listen on none of them.
        Ok(self.released(None, all == 1, receivers, marked == 1))
    }

    pub(super) async fn extend_many_script(
        &self,
        keys: &[LockKey],
        token: Uuid,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        if self.connection.is_cluster() {
            return one_at_a_time::extend(self, keys, token, ttl).await;
        }
        let mut buffer = Uuid::encode_buffer();
        let mut cmd = self.many_cmd(&MANY_EXTEND, keys, &[""]);
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer))
            .arg(lease_millis(ttl));
        let all: i64 = self.query(&cmd, Some(&MANY_EXTEND)).await?;
        Ok(all == 1)
    }
}

/// An acquire script's reply: `{1}` (or `{1, fencing token}` when `fencing`) granted,
/// `{0, ms}` refused (a non-positive `ms` says nothing of when the hold ends).
fn acquire_reply(reply: &[i64], fencing: bool, kind: LockKind) -> Result<Acquire, BackendError> {
    match reply {
        [1] if !fencing => Ok(Acquire::Acquired {
            fencing_token: None,
        }),
        [1, fence] if fencing && *fence > 0 => Ok(Acquire::Acquired {
            fencing_token: Some(fence.unsigned_abs()),
        }),
        [0, wait] => Ok(Acquire::Held {
            remaining: u64::try_from(*wait)
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
        }),
        other => Err(BackendError::Command(
            format!("unexpected {kind} acquire reply {other:?}").into(),
        )),
    }
}
