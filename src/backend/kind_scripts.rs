//! The Lua scripts of the shared kinds of lock (DESIGN §10): permits and read/write.
//!
//! Shares (permits, read shares) live in a sorted set of token → lease end, in ms of the
//! server's clock (`TIME`, so that the leases of every client are measured by one clock).
//! Each script first drops the shares whose lease has ended: a holder that crashed gives
//! its share back when its lease ends. The set's own expiry follows its longest lease, so
//! it vanishes with its last share. All keys of one lock share its hash slot
//! (`<prefix>{k}:…`).
//!
//! Waiting works as for the exclusive lock: a refused attempt leaves its token in the
//! `:waiters` mark, and a release that may let a waiter in publishes on `:released` only
//! when a mark is there.

use std::sync::LazyLock;

use deadpool_redis::redis::Script;

/// The Lua helpers every script of this file starts with: `now_ms()`, the server's clock
/// in ms; `int(x)`, a number as an integer argument (Lua 5.1 would write large numbers
/// with an exponent); `expire_to_last(set, now)`, the set's expiry moved to its longest
/// lease; `prune(set, now)`, the ended leases dropped.
macro_rules! shares_lua {
    ($body:literal) => {
        concat!(
            r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x)
  return string.format('%d', x)
end
local function expire_to_last(set, now)
  local last = redis.call('ZRANGE', set, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', set, int(math.max(tonumber(last[2]) - now, 1)))
  end
end
local function prune(set, now)
  redis.call('ZREMRANGEBYSCORE', set, '-inf', int(now))
end
local function mark_waiter(mark, token, wait)
  local ms = 60000
  if wait > 0 then
    ms = wait + 1000
  end
  redis.call('SET', mark, token, 'PX', int(ms))
end
"#,
            $body
        )
    };
}

/// Permits. `KEYS[1]` the shares (`:permits`), `KEYS[2]` the waiter mark; `ARGV[1]`
/// token, `ARGV[2]` lease in ms, `ARGV[3]` the number of permits.
///
/// Grants when the token holds a permit already (a retried attempt: its lease is reset)
/// or fewer than `n` are out; returns `{1}`. Otherwise marks the waiter and returns
/// `{0, ms until the first lease ends}`.
pub(super) static PERMIT_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(shares_lua!(
        r#"
local now = now_ms()
prune(KEYS[1], now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[2])), ARGV[1])
  expire_to_last(KEYS[1], now)
  if redis.call('GET', KEYS[2]) == ARGV[1] then
    redis.call('DEL', KEYS[2])
  end
  return {1}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(first[2]) - now
mark_waiter(KEYS[2], ARGV[1], wait)
return {0, wait}
"#
    ))
});

/// A reader. `KEYS[1]` the writer, `KEYS[2]` the read shares (`:readers`), `KEYS[3]` the
/// waiting-writer mark, `KEYS[4]` the waiter mark; `ARGV[1]` token, `ARGV[2]` lease in ms.
///
/// Grants when the token holds a share already, or when there is neither a writer nor a
/// waiting writer; returns `{1}`. Otherwise marks the waiter and returns `{0, the
/// writer's (or the waiting writer's mark's) PTTL}`: readers queue behind a waiting writer.
pub(super) static READ_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(shares_lua!(
        r#"
local now = now_ms()
prune(KEYS[2], now)
if redis.call('ZSCORE', KEYS[2], ARGV[1])
  or (redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 0) then
  redis.call('ZADD', KEYS[2], int(now + tonumber(ARGV[2])), ARGV[1])
  expire_to_last(KEYS[2], now)
  if redis.call('GET', KEYS[4]) == ARGV[1] then
    redis.call('DEL', KEYS[4])
  end
  return {1}
end
local wait = redis.call('PTTL', KEYS[1])
if wait < 0 then
  wait = redis.call('PTTL', KEYS[3])
end
mark_waiter(KEYS[4], ARGV[1], wait)
return {0, wait}
"#
    ))
});

/// A writer. `KEYS[1]` the writer (`:writer`, its value the holder's token), `KEYS[2]` the
/// read shares, `KEYS[3]` the waiting-writer mark, `KEYS[4]` the waiter mark, `KEYS[5]`
/// the fence counter; `ARGV[1]` token, `ARGV[2]` lease in ms, `ARGV[3]` `1` to take a
/// fencing token, `ARGV[4]` how long the waiting-writer mark lives, in ms, `ARGV[5]` the
/// fence retention in ms.
///
/// Grants when the token is the writer already (its lease is reset) or there is no writer
/// and no live read share; returns `{1}` or `{1, fencing token}` (the exclusive lock's
/// `take_fence` on the fence key, see `scripts::FENCE_LUA`). Otherwise sets the waiting-writer mark (new readers are
/// refused while it lives; the writer's every refused attempt renews it), marks the
/// waiter and returns `{0, ms until the writer's or the last reader's lease ends}`.
pub(super) static WRITE_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    super::scripts::fenced_script(shares_lua!(
        r#"
local now = now_ms()
prune(KEYS[2], now)
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or (not holder and redis.call('ZCARD', KEYS[2]) == 0) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if redis.call('GET', KEYS[3]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
  end
  if redis.call('GET', KEYS[4]) == ARGV[1] then
    redis.call('DEL', KEYS[4])
  end
  if ARGV[3] == '1' then
    return {1, take_fence(KEYS[5], ARGV[5])}
  end
  return {1}
end
local wait
if holder then
  wait = redis.call('PTTL', KEYS[1])
else
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  wait = tonumber(last[2]) - now
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
mark_waiter(KEYS[4], ARGV[1], wait)
return {0, wait}
"#
    ))
});

/// Gives a share back. `KEYS[1]` the shares, `KEYS[2]` the release channel, `KEYS[3]`
/// the waiter mark; `ARGV[1]` token, `ARGV[2]` `1` to tell waiters only once the last
/// share is gone (readers: only then can a writer get in), `0` at every release (permits).
///
/// Returns `{held, receivers, marked}`: `held` 1 when the token's lease was still running,
/// `{0, 0, 0}` when it had no share. Publishes only when a waiter left a mark, and
/// deletes the mark then.
pub(super) static SHARE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(shares_lua!(
        r#"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  return {0, 0, 0}
end
local now = now_ms()
local held = 0
if tonumber(score) > now then
  held = 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
prune(KEYS[1], now)
if ARGV[2] == '1' and redis.call('ZCARD', KEYS[1]) > 0 then
  expire_to_last(KEYS[1], now)
  return {held, 0, 0}
end
expire_to_last(KEYS[1], now)
if redis.call('DEL', KEYS[3]) == 0 then
  return {held, 0, 0}
end
local receivers = redis.pcall('PUBLISH', KEYS[2], '')
if type(receivers) ~= 'number' then
  receivers = 0
end
return {held, receivers, 1}
"#
    ))
});

/// Renews a share. `KEYS[1]` the shares; `ARGV[1]` token, `ARGV[2]` lease in ms. Returns
/// 1 when the token's lease was still running and now ends `ARGV[2]` ms from now, 0 when
/// it had ended or the token has no share.
pub(super) static SHARE_EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(shares_lua!(
        r#"
local now = now_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', int(now + tonumber(ARGV[2])), ARGV[1])
expire_to_last(KEYS[1], now)
return 1
"#
    ))
});

/// Several keys, all or none, on one server. `KEYS[1..n]` the locks (`<prefix>{k}`, the
/// exclusive locks of the keys), `KEYS[n+1..2n]` their waiter marks; `ARGV[1]` token,
/// `ARGV[2]` lease in ms, `ARGV[3]` `n`.
///
/// When every key is free or the token's own, takes (or refreshes) them all and returns
/// `{1}`; otherwise takes none, marks the first key held by another token and returns
/// `{0, its PTTL}`.
pub(super) static MANY_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(ARGV[3])
for i = 1, n do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= ARGV[1] then
    local pttl = redis.call('PTTL', KEYS[i])
    local mark_ms = 60000
    if pttl > 0 then
      mark_ms = pttl + 1000
    end
    redis.call('SET', KEYS[n + i], ARGV[1], 'PX', mark_ms)
    return {0, pttl}
  end
end
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
  if redis.call('GET', KEYS[n + i]) == ARGV[1] then
    redis.call('DEL', KEYS[n + i])
  end
end
return {1}
"#,
    )
});

/// Releases several keys. `KEYS[1..n]` the locks, `KEYS[n+1..2n]` their release channels,
/// `KEYS[2n+1..3n]` their waiter marks; `ARGV[1]` token, `ARGV[2]` `n`. Deletes each lock
/// the token holds, publishing on its channel when a waiter left a mark. Returns `{1 if
/// it held them all, receivers, 1 if any was marked}`.
pub(super) static MANY_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(ARGV[2])
local all, receivers, marked = 1, 0, 0
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    if redis.call('DEL', KEYS[2 * n + i]) == 1 then
      marked = 1
      local told = redis.pcall('PUBLISH', KEYS[n + i], '')
      if type(told) == 'number' then
        receivers = receivers + told
      end
    end
  else
    all = 0
  end
end
return {all, receivers, marked}
"#,
    )
});

/// Renews several keys. `KEYS` the locks; `ARGV[1]` token, `ARGV[2]` lease in ms. Extends
/// each the token holds; returns 1 when it held them all.
pub(super) static MANY_EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local all = 1
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    all = 0
  end
end
return all
"#,
    )
});
