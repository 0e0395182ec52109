//! [`ResponseStore`] on [`RedisBackend`]: a record is the hash `<prefix>{<key>}:response`
//! beside the key's lock `<prefix>{<key>}` (same Cluster slot), read and written by Lua
//! scripts, one round trip each.

use std::{sync::LazyLock, time::Duration};

use deadpool_redis::redis::Script;
use uuid::Uuid;

use super::store::{
    Finished, Record, RecordState, ResponseStore, StoredResponse, Unreplayable, decode_headers,
    encode_headers,
};
use crate::{
    backend::{BackendError, RedisBackend},
    key::LockKey,
};

/// The record `KEYS[1]` as `{state, fingerprint, status, headers, body, reason, alive}`,
/// `alive` 1 when it is pending and its owner still holds the lock `KEYS[2]`; nil if none.
static LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'state', 'owner', 'fingerprint', 'status', 'headers', 'body', 'reason')
if not r[1] then return false end
local alive = 0
if r[1] == 'pending' and redis.call('GET', KEYS[2]) == r[2] then alive = 1 end
return {r[1], r[3] or '', r[4] or '0', r[5] or '', r[6] or '', r[7] or '', alive}
",
    )
});

/// Creates the pending record `KEYS[1]` (owner `ARGV[1]`, fingerprint `ARGV[2]`, expiry
/// `ARGV[3]` ms) unless one exists: 1 if created.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'pending', 'owner', ARGV[1], 'fingerprint', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// Ends the record `KEYS[1]` if it is pending and `ARGV[1]`'s: state `ARGV[3]`, status,
/// headers, body, reason `ARGV[4..7]`, expiry `ARGV[2]` ms. 1 if written.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'state', 'owner')
if r[1] ~= 'pending' or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'status', ARGV[4], 'headers', ARGV[5], 'body', ARGV[6], 'reason', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// Deletes the record `KEYS[1]` if it is pending and `ARGV[1]`'s: 1 if deleted.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'state', 'owner')
if r[1] ~= 'pending' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn owner_arg(owner: Uuid) -> String {
    owner.hyphenated().to_string()
}

fn corrupt(what: &str) -> BackendError {
    BackendError::Command(format!("malformed idempotency record: {what}").into())
}

type Fields = (String, String, String, Vec<u8>, Vec<u8>, String, i64);

impl ResponseStore for RedisBackend {
    async fn load(&self, key: &LockKey) -> Result<Option<Record>, BackendError> {
        let mut invocation = LOAD.prepare_invoke();
        invocation
            .key(self.response_key(key))
            .key(self.redis_key(key));
        let fields: Option<Fields> = self.run(invocation).await?;
        let Some((state, fingerprint, status, headers, body, reason, alive)) = fields else {
            return Ok(None);
        };
        let state = match state.as_str() {
            "pending" => RecordState::Pending {
                owner_alive: alive == 1,
            },
            "complete" => RecordState::Complete(StoredResponse {
                status: status.parse().map_err(|_| corrupt("status"))?,
                headers: decode_headers(&headers).ok_or_else(|| corrupt("headers"))?,
                body: body.into(),
            }),
            "unreplayable" => RecordState::Unreplayable(
                Unreplayable::from_name(&reason).ok_or_else(|| corrupt("reason"))?,
            ),
            _ => return Err(corrupt("state")),
        };
        Ok(Some(Record { fingerprint, state }))
    }

    async fn begin(
        &self,
        key: &LockKey,
        owner: Uuid,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let mut invocation = BEGIN.prepare_invoke();
        invocation
            .key(self.response_key(key))
            .arg(owner_arg(owner))
            .arg(fingerprint)
            .arg(millis(ttl));
        let created: i64 = self.run(invocation).await?;
        Ok(created == 1)
    }

    async fn finish(
        &self,
        key: &LockKey,
        owner: Uuid,
        finished: &Finished,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let mut invocation = FINISH.prepare_invoke();
        invocation
            .key(self.response_key(key))
            .arg(owner_arg(owner))
            .arg(millis(ttl));
        match finished {
            Finished::Complete(response) => invocation
                .arg("complete")
                .arg(response.status)
                .arg(encode_headers(&response.headers).as_ref())
                .arg(response.body.as_ref())
                .arg(""),
            Finished::Unreplayable(reason) => invocation
                .arg("unreplayable")
                .arg(0)
                .arg("")
                .arg("")
                .arg(reason.as_str()),
        };
        let written: i64 = self.run(invocation).await?;
        Ok(written == 1)
    }

    async fn forget(&self, key: &LockKey, owner: Uuid) -> Result<bool, BackendError> {
        let mut invocation = FORGET.prepare_invoke();
        invocation.key(self.response_key(key)).arg(owner_arg(owner));
        let deleted: i64 = self.run(invocation).await?;
        Ok(deleted == 1)
    }
}
