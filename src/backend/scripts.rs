//! The Lua scripts of the one-Redis protocol (DESIGN §3).
//!
//! Each runs atomically on the server in one round trip. `Script` hashes its source once;
//! `invoke_async` sends `EVALSHA` and, on `NOSCRIPT` (a restarted or flushed server),
//! loads the script and retries.

use std::sync::LazyLock;

use deadpool_redis::redis::Script;

/// The one formula for fencing tokens, spliced at the top of every script that takes one
/// (DESIGN §4): `take_fence(counter_key, retention_ms)` returns the next token of the
/// counter and leaves it behind with an expiry of `retention_ms`.
///
/// A token is a hybrid logical clock: `max(stored + 1, server time in µs)`, the server
/// time from `TIME`. While the counter lives, tokens grow by at least one per acquisition;
/// once it has expired (`retention_ms` after its last use, by the server's wall clock),
/// the next token starts from the clock, which by then has passed every token the counter
/// gave, unless the server clock stepped back by more than the retention since (a token
/// runs ahead of the clock only by what the clock stepped back, or by one per acquisition
/// faster than one a microsecond). So counters need not be kept forever.
///
/// Exact in Lua: numbers are doubles, and µs since 1970 (about 1.8·10¹⁵ in 2027) stay far
/// below 2⁵³ (9·10¹⁵, the year 2255); the value is written with `%.0f` (never in
/// exponent form) and returned as an integer reply. An old `INCR` counter (a small number)
/// is simply overtaken by the clock.
///
/// `TIME` is non-deterministic: before Redis 7, a script that calls it and then writes
/// must replicate its effects rather than itself (`redis.replicate_commands()`, the
/// default since Redis 5, called anyway in case `lua-replicate-commands` was turned off;
/// it must come before the script's first write, hence at the top). Redis 7 and Valkey
/// always replicate effects and keep the call as a no-op.
pub(super) const FENCE_LUA: &str = r#"
if redis.replicate_commands then
  redis.replicate_commands()
end
local function take_fence(counter_key, retention_ms)
  local time = redis.call('TIME')
  local token = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local stored = tonumber(redis.call('GET', counter_key) or '0') or 0
  if stored + 1 > token then
    token = stored + 1
  end
  redis.call('SET', counter_key, string.format('%.0f', token), 'PX', retention_ms)
  return token
end
"#;

/// A script that takes fencing tokens: [`FENCE_LUA`] and then `body`, which calls
/// `take_fence`.
fn fenced_script(body: &str) -> Script {
    Script::new(&format!("{FENCE_LUA}{body}"))
}

/// `KEYS[1]` lock key, `KEYS[2]` fence counter, `KEYS[3]` waiter mark, `ARGV[1]` token,
/// `ARGV[2]` lease in ms, `ARGV[3]` `1` to take a fencing token, `ARGV[4]` `1` when this
/// token may have left a mark before (an earlier attempt of it was refused), `ARGV[5]`
/// how long the fence counter outlives its last use, in ms (see [`FENCE_LUA`]).
///
/// Returns `{1}` (or `{1, fencing token}`) when the token now holds the lock, `{0, pttl}`
/// when another token does. Without fencing, the first attempt is a plain `SET NX PX`
/// sent by the client (no script at all when it succeeds); this script runs when that was
/// refused, for every later attempt of the same token, and for every attempt with fencing.
///
/// A refused attempt leaves a mark (its token) saying someone waits, so that the release
/// tells waiters only when there are any, and a holder that hands the lock down its local
/// line knows when to let others in. The mark outlives the waiter's next attempt, which
/// comes by the end of the holder's lease at the latest. A token that takes the lock
/// clears its own mark (`ARGV[4]`), so a mark found by a release is always another
/// token's. When `SET NX` fails, a value equal to our own token means we hold the lock
/// already (an earlier attempt landed but its reply was lost, or the lock was handed to a
/// new holder in our process): the lease is reset and the attempt succeeds, with a fresh
/// fencing token so that each holder's is larger than its predecessor's.
pub(super) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    fenced_script(
        r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[4] == '1' and redis.call('GET', KEYS[3]) == ARGV[1] then
    redis.call('DEL', KEYS[3])
  end
  if ARGV[3] == '1' then
    return {1, take_fence(KEYS[2], ARGV[5])}
  end
  return {1}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if ARGV[3] == '1' then
    return {1, take_fence(KEYS[2], ARGV[5])}
  end
  return {1}
end
local pttl = redis.call('PTTL', KEYS[1])
local mark_ms = 60000
if pttl > 0 then
  mark_ms = pttl + 1000
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', mark_ms)
return {0, pttl}
"#,
    )
});

/// `KEYS[1]` lock key, `KEYS[2]` release channel, `KEYS[3]` waiter mark, `ARGV[1]` token,
/// `ARGV[2]` `1` to tell waiters. Deletes the lock only if the token holds it, and the
/// mark with it (one `DEL`); if there was a mark (another token's: a holder clears its
/// own when it acquires), publishes on the channel so that waiters wake at once. Returns
/// `{1, receivers, marked}` when it deleted, `{0, 0, 0}` otherwise: three calls when
/// nobody waits (`EVALSHA`, `GET`, `DEL`). Undoing a failed Redlock attempt tells nobody
/// and leaves the mark: nobody waited for that grant, and the waiter undoing it would wake
/// itself.
///
/// The publish is best effort (`pcall`): a user without permission on the channel (a
/// Redis 7 ACL user with `resetchannels`, the default) gets NOPERM from it after the
/// `DEL` has run, and the release must still count as one.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0, 0, 0}
end
if ARGV[2] ~= '1' then
  redis.call('DEL', KEYS[1])
  return {1, 0, 0}
end
if redis.call('DEL', KEYS[1], KEYS[3]) == 1 then
  return {1, 0, 0}
end
local receivers = redis.pcall('PUBLISH', KEYS[2], '')
if type(receivers) ~= 'number' then
  receivers = 0
end
return {1, receivers, 1}
"#,
    )
});

/// `KEYS[1]` lock key, `ARGV[1]` token, `ARGV[2]` lease in ms. Resets the lease only if
/// the token holds the lock; returns 1 when it did, 0 otherwise.
pub(super) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#,
    )
});
