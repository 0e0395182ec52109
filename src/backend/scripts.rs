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
pub(super) fn fenced_script(body: &str) -> Script {
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

/// `KEYS[1]` lock key, `KEYS[2]` waiter mark, `ARGV[1]` token, `ARGV[2]` the release
/// channel when it is not `KEYS[1]` with `:released` (a read/write lock's writer).
/// Deletes the lock only if the token holds it, and the mark with it (one `DEL`); if
/// there was a mark (another token's: a holder clears its own when it acquires),
/// publishes on the channel so that waiters wake at once. Three calls when nobody waits
/// (`EVALSHA`, `GET`, `DEL`). The channel is named here rather than sent: almost no
/// release publishes, and every argument costs the server a Lua string and the client
/// its writing.
///
/// Returns one integer (a table would cost the client an array to parse on every
/// release): `0` when the token did not hold the lock, `1` when it did and nobody had
/// marked, `2 + receivers` when a mark was there and the release was published to
/// `receivers` subscribers.
///
/// The publish is best effort (`pcall`): a user without permission on the channel (a
/// Redis 7 ACL user with `resetchannels`, the default) gets NOPERM from it after the
/// `DEL` has run, and the release must still count as one.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if redis.call('DEL', KEYS[1], KEYS[2]) == 1 then
  return 1
end
local receivers = redis.pcall('PUBLISH', ARGV[2] or (KEYS[1] .. ':released'), '')
if type(receivers) ~= 'number' then
  receivers = 0
end
return 2 + receivers
"#,
    )
});

/// `KEYS[1]` lock key, `ARGV[1]` token. Undoes a failed Redlock attempt: deletes the lock
/// only if the token holds it, and tells nobody and leaves the mark: nobody waited for
/// that grant, and the waiter undoing it would wake itself. Returns 1 when it deleted
/// the lock, 0 otherwise ([`RELEASE`]'s answer without a mark).
pub(super) static UNDO: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
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

/// What the fair-mode scripts share (DESIGN §5, fair mode). The line of key `k` is the list
/// `<prefix>{k}:queue` of `<token>:<lease ms>[:<grant channel>]` entries in arrival order, with each token's
/// deadline (server time, ms) in the sorted set `<prefix>{k}:timeouts`; both carry an
/// expiry no earlier than their last entry's deadline, so a line whose waiters all died
/// still disappears, and both are gone as soon as the line is empty.
///
/// `grant_next` gives the free lock to the first entry whose deadline has not passed,
/// dropping the expired ones in front of it: the lock's value becomes that waiter's token,
/// with its own lease and (with fencing, when `fence_retention` is given) a fresh fencing
/// token from [`FENCE_LUA`]'s `take_fence`, as the acquire script takes it, and the grant
/// is published, unless the grantee is the caller itself: on the grantee process's own
/// channel when its entry names one, as `<token> <server time ms> <fencing token or ->
/// <release channel>` (so one process wakes, not every process waiting on the key), and
/// otherwise on the release channel as `<token> <server time ms> [<fencing token>]`.
/// Returns the grantee's token and fencing token, or nothing when the line is empty.
macro_rules! fair_prelude {
    () => {
        r#"
local lock, fence, queue, timeouts, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = nil
local function clock()
  if not now then
    local time = redis.call('TIME')
    now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  end
  return now
end
local function grant_next(fence_retention, caller)
  local popped = false
  while true do
    local entry = redis.call('LPOP', queue)
    if not entry then
      if popped then
        redis.call('DEL', timeouts)
      end
      return nil
    end
    popped = true
    local sep = string.find(entry, ':', 1, true)
    local waiter, lease = string.sub(entry, 1, sep - 1), string.sub(entry, sep + 1)
    local to = nil
    local sep2 = string.find(lease, ':', 1, true)
    if sep2 then
      to = string.sub(lease, sep2 + 1)
      lease = string.sub(lease, 1, sep2 - 1)
    end
    local deadline = tonumber(redis.call('ZSCORE', timeouts, waiter))
    redis.call('ZREM', timeouts, waiter)
    if deadline and deadline > clock() then
      redis.call('SET', lock, waiter, 'PX', lease)
      local fenced = nil
      if fence_retention then
        fenced = take_fence(fence, fence_retention)
      end
      if waiter ~= caller then
        if to then
          -- The grantee's process alone hears it, on its own channel.
          redis.pcall('PUBLISH', to, waiter .. ' ' .. clock() .. ' ' .. (fenced or '-') .. ' ' .. channel)
        else
          local message = waiter .. ' ' .. clock()
          if fenced then
            message = message .. ' ' .. fenced
          end
          redis.pcall('PUBLISH', channel, message)
        end
      end
      return waiter, fenced
    end
  end
end
"#
    };
}

/// Fair mode's acquire (uncontended: `EXISTS` on the line, then `SET NX PX`). `KEYS[1]` lock key, `KEYS[2]` fence counter, `KEYS[3]` queue,
/// `KEYS[4]` timeouts, `KEYS[5]` release channel; `ARGV[1]` token, `ARGV[2]` lease in ms,
/// `ARGV[3]` `1` to take a fencing token, `ARGV[4]` how long the entry stays valid, in ms
/// (the waiter's remaining wait plus a margin), `ARGV[5]` the fence retention in ms,
/// `ARGV[6]` the process's grant channel, or empty to be told on the release channel.
///
/// Returns `{1}` (or `{1, fencing token}`) when the token holds the lock: it was granted
/// to it (the lease is reset and, with fencing, a new token taken, as the acquire script
/// does for a token that holds the lock already), or the lock was free and the token is
/// first in line (or the line empty). A free lock with a live waiter ahead (its holder's
/// lease ran out without a release) is granted to that waiter first. Otherwise the token
/// joins the back of the line, or keeps its place, its deadline renewed, and the reply is
/// `{0, pttl, server time ms}`: a grant published before that time is not this wait's.
pub(super) static FAIR_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    fenced_script(concat!(
        fair_prelude!(),
        r#"
local token, fencing = ARGV[1], ARGV[3] == '1'
local fence_retention = fencing and ARGV[5]
if redis.call('EXISTS', queue) == 0 and redis.call('SET', lock, token, 'NX', 'PX', ARGV[2]) then
  if fencing then
    return {1, take_fence(fence, fence_retention)}
  end
  return {1}
end
local holder = redis.call('GET', lock)
if holder == token then
  redis.call('PEXPIRE', lock, ARGV[2])
  if fencing then
    return {1, take_fence(fence, fence_retention)}
  end
  return {1}
end
if not holder then
  local granted, fenced = grant_next(fence_retention, token)
  if not granted then
    redis.call('SET', lock, token, 'PX', ARGV[2])
    if fencing then
      return {1, take_fence(fence, fence_retention)}
    end
    return {1}
  end
  if granted == token then
    if fencing then
      return {1, fenced}
    end
    return {1}
  end
end
local entry_ms = tonumber(ARGV[4])
if not redis.call('ZSCORE', timeouts, token) then
  local entry = token .. ':' .. ARGV[2]
  if ARGV[6] ~= '' then
    entry = entry .. ':' .. ARGV[6]
  end
  redis.call('RPUSH', queue, entry)
end
redis.call('ZADD', timeouts, clock() + entry_ms, token)
if redis.call('PTTL', queue) < entry_ms then
  redis.call('PEXPIRE', queue, entry_ms)
end
if redis.call('PTTL', timeouts) < entry_ms then
  redis.call('PEXPIRE', timeouts, entry_ms)
end
return {0, redis.call('PTTL', lock), clock()}
"#
    ))
});

/// Fair mode's release, which is also a waiter's cancellation. `KEYS[1..5]` as for
/// [`FAIR_ACQUIRE`], `KEYS[6]` the waiter mark; `ARGV[1]` token, `ARGV[2]` `1` with
/// fencing, `ARGV[3]` the fence retention in ms, `ARGV[4]` `1` to keep the lock when
/// nobody else waits (the end of a turn with more requests of the holder's process in
/// its local line).
///
/// Takes the token's entry out of the line if it has one (a waiter that gave up or was
/// dropped). Then, if the token holds the lock (a holder's release, or a grant that
/// crossed the waiter's cancellation), grants it to the next live waiter; with nobody in
/// line, leaves it held if asked to and no waiter of another mode left a mark, and
/// otherwise deletes it and wakes waiters of other modes as [`RELEASE`] does. Returns
/// `{was held, granted}`, granted being `2` for a lock kept.
pub(super) static FAIR_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    fenced_script(concat!(
        fair_prelude!(),
        r#"
local token = ARGV[1]
if redis.call('ZREM', timeouts, token) == 1 then
  local prefix = token .. ':'
  for _, entry in ipairs(redis.call('LRANGE', queue, 0, -1)) do
    if string.sub(entry, 1, #prefix) == prefix then
      redis.call('LREM', queue, 1, entry)
      break
    end
  end
end
if redis.call('GET', lock) ~= token then
  return {0, 0}
end
if grant_next(ARGV[2] == '1' and ARGV[3], nil) then
  return {1, 1}
end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[6]) == 0 then
  return {1, 2}
end
if redis.call('DEL', lock, KEYS[6]) == 2 then
  redis.pcall('PUBLISH', channel, '')
end
return {1, 0}
"#
    ))
});
