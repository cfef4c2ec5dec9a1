//! The Lua scripts that make every lock operation one atomic step on the server.
//!
//! Every script touches only the keys it is given (`KEYS`), and all keys of one lock share a hash
//! tag, so the scripts also run unchanged on a Redis Cluster node. Replies are flat arrays whose
//! first element is a status code:
//!
//! | script | reply |
//! |---|---|
//! | acquire | `{1, token}` granted (new or refreshed) · `{0, owner, token, label, pttl, age}` held by another |
//! | extend, release | `{1}` done · `{0}` not held by anyone · `{2, owner, token, label, pttl, age}` held by another |
//! | holder | `{0}` free · `{1, owner, token, label, pttl, age, waiters}` |
//! | force release | `{0}` free · `{1, owner, token, label, pttl, age, waiters}` what was broken |
//!
//! `pttl` is the server's `PTTL` of the lock key in milliseconds (negative when the key has no
//! expiry). `age` is how long ago the grant was made, in whole milliseconds of the server's
//! clock (`TIME` now minus the `granted` field the acquire script stored, in microseconds), or
//! nil for a lock written by a version that did not store it. `waiters` is `PUBSUB NUMSUB` (on a
//! cluster `PUBSUB SHARDNUMSUB`) of the key's release channel (clients subscribed), or nil when the Redis user may not run it;
//! only the administrative scripts ask for it, so the hot paths run no extra command. Tokens
//! come from `INCRBY` on the fence key, which has no expiry and is never deleted, so a key's
//! tokens keep increasing across grants, releases and forced releases; each new token is also
//! at least the server's time in microseconds (see [`ACQUIRE`]).

use std::sync::LazyLock;

use redis::Script;

/// Lua functions shared by the scripts that report a holder (prepended to their source).
///
/// `age_ms(granted)`: milliseconds since `granted` (server microseconds), rounded down, never
/// negative (the server's clock may have been set back); `false` (nil) when unknown.
/// `waiters(channel, sharded)`: subscribers of `channel`, or `false` when `PUBSUB NUMSUB` (with
/// `sharded` = `'1'`: `PUBSUB SHARDNUMSUB`) is refused (an ACL user without it): the count is
/// optional, the lock operation must not fail for it.
/// `announce(channel, message, sharded)`: `PUBLISH`, or with `sharded` = `'1'` `SPUBLISH`
/// (Redis Cluster: the message goes to the subscribers of the channel's shard only, where the
/// waiters `SSUBSCRIBE`, instead of being broadcast to every node).
const HOLDER_FUNCTIONS: &str = r"
local function age_ms(granted)
    local since = tonumber(granted)
    if not since then
        return false
    end
    local now = redis.call('TIME')
    local age = math.floor((tonumber(now[1]) * 1000000 + tonumber(now[2]) - since) / 1000)
    if age < 0 then
        return 0
    end
    return age
end
local function waiters(channel, sharded)
    local numsub = 'NUMSUB'
    if sharded == '1' then
        numsub = 'SHARDNUMSUB'
    end
    local reply = redis.pcall('PUBSUB', numsub, channel)
    if type(reply) == 'table' and type(reply[2]) == 'number' then
        return reply[2]
    end
    return false
end
local function announce(channel, message, sharded)
    if sharded == '1' then
        redis.call('SPUBLISH', channel, message)
    else
        redis.call('PUBLISH', channel, message)
    end
end
";

/// A script made of [`HOLDER_FUNCTIONS`] and `body`, with its full source for `SCRIPT LOAD`.
pub(crate) struct Lua {
    pub(crate) source: String,
    pub(crate) script: Script,
}

impl Lua {
    fn with_functions(body: &str) -> Lua {
        let source = format!("{HOLDER_FUNCTIONS}{body}");
        let script = Script::new(&source);
        Lua { source, script }
    }
}

impl std::ops::Deref for Lua {
    type Target = Script;
    fn deref(&self) -> &Script {
        &self.script
    }
}

/// `KEYS[1]` lock hash, `KEYS[2]` fence counter; `ARGV[1]` owner, `ARGV[2]` lease in ms,
/// `ARGV[3]` label. A new grant stores the server time in microseconds as `granted`; a refresh
/// by the same owner keeps it.
///
/// A new token is `max(last + 1, server time in µs)`: it is above the last token of this counter,
/// and also above every token issued before by a counter that was since lost (a restart without
/// persistence, a failover to a replica that missed the last increments, a flush), as long as
/// the server's clock did not go back. `replicate_commands` (needed before a write that follows
/// `TIME` on Redis before 5; a no-op since) is called only where it exists.
const ACQUIRE_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label', 'granted')
if not lock[1] then
    if redis.replicate_commands then
        redis.replicate_commands()
    end
    local now = redis.call('TIME')
    local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
    local last = redis.call('INCRBY', KEYS[2], 0)
    local step = 1
    if micros > last + 1 then
        step = micros - last
    end
    local token = redis.call('INCRBY', KEYS[2], step)
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'label', ARGV[3], 'granted', micros)
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token}
end
if lock[1] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(lock[2])}
end
return {0, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1]), age_ms(lock[4])}
";
pub(crate) static ACQUIRE: LazyLock<Lua> = LazyLock::new(|| Lua::with_functions(ACQUIRE_LUA));

/// `KEYS[1]` lock hash; `ARGV[1]` owner, `ARGV[2]` lease in ms.
const EXTEND_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label', 'granted')
if not lock[1] then
    return {0}
end
if lock[1] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1}
end
return {2, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1]), age_ms(lock[4])}
";
pub(crate) static EXTEND: LazyLock<Lua> = LazyLock::new(|| Lua::with_functions(EXTEND_LUA));

/// `KEYS[1]` lock hash; `ARGV[1]` owner, `ARGV[2]` release channel, `ARGV[3]` `'1'` to announce
/// with `SPUBLISH` (cluster), else `PUBLISH`.
const RELEASE_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label', 'granted')
if not lock[1] then
    return {0}
end
if lock[1] == ARGV[1] then
    redis.call('DEL', KEYS[1])
    announce(ARGV[2], lock[2] or '', ARGV[3])
    return {1}
end
return {2, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1]), age_ms(lock[4])}
";
pub(crate) static RELEASE: LazyLock<Lua> = LazyLock::new(|| Lua::with_functions(RELEASE_LUA));

/// `KEYS[1]` lock hash; `ARGV[1]` release channel, `ARGV[2]` `'1'` when the waiters subscribe
/// sharded (cluster). Read-only; also used by `list`.
const HOLDER_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label', 'granted')
if not lock[1] then
    return {0}
end
return {1, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1]), age_ms(lock[4]), waiters(ARGV[1], ARGV[2])}
";
pub(crate) static HOLDER: LazyLock<Lua> = LazyLock::new(|| Lua::with_functions(HOLDER_LUA));

/// `KEYS[1]` lock hash; `ARGV[1]` release channel, `ARGV[2]` `'1'` for sharded pub/sub
/// (cluster). Keeps the fence counter. `TIME` and
/// `PUBSUB` come before the writes, so commands are replicated as effects (see [`ACQUIRE`]).
const FORCE_RELEASE_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label', 'granted')
if not lock[1] then
    return {0}
end
if redis.replicate_commands then
    redis.replicate_commands()
end
local pttl = redis.call('PTTL', KEYS[1])
local age = age_ms(lock[4])
local waiting = waiters(ARGV[1], ARGV[2])
redis.call('DEL', KEYS[1])
announce(ARGV[1], lock[2] or '', ARGV[2])
return {1, lock[1], lock[2], lock[3], pttl, age, waiting}
";
pub(crate) static FORCE_RELEASE: LazyLock<Lua> =
    LazyLock::new(|| Lua::with_functions(FORCE_RELEASE_LUA));

/// Redlock's per-node grant (see the Redlock backend's docs). `KEYS[1]` lock hash, `KEYS[2]`
/// fence counter; `ARGV[1]` owner, `ARGV[2]` lease in ms, `ARGV[3]` label. Reply as [`ACQUIRE`].
///
/// The counter steps by one, so nodes that took part in every grant keep equal counters and a
/// grant needs no second round. A counter that does not exist yet (a new key, or a node that
/// restarted empty) starts at the server's time in microseconds, which is above every token
/// handed out before as long as the node's clock is not behind the clock that started the
/// key's counter on another node.
#[cfg(feature = "redlock")]
const REDLOCK_ACQUIRE_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label', 'granted')
if not lock[1] then
    if redis.replicate_commands then
        redis.replicate_commands()
    end
    local now = redis.call('TIME')
    local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
    redis.call('SET', KEYS[2], micros, 'NX')
    local token = redis.call('INCR', KEYS[2])
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'label', ARGV[3], 'granted', micros)
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token}
end
if lock[1] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(lock[2])}
end
return {0, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1]), age_ms(lock[4])}
";
#[cfg(feature = "redlock")]
pub(crate) static REDLOCK_ACQUIRE: LazyLock<Lua> =
    LazyLock::new(|| Lua::with_functions(REDLOCK_ACQUIRE_LUA));

/// Redlock's second round: raises a node's grant to the token chosen over the granting
/// majority. `KEYS[1]` lock hash, `KEYS[2]` fence counter; `ARGV[1]` owner, `ARGV[2]` token.
/// Only while `ARGV[1]` still holds the lock on this node: `{1}` raised (the counter is then at
/// least the token), `{0}` not held by that owner.
#[cfg(feature = "redlock")]
const REDLOCK_RAISE_LUA: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner ~= ARGV[1] then
    return {0}
end
local token = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'token', ARGV[2])
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
if counter < token then
    redis.call('SET', KEYS[2], ARGV[2])
end
return {1}
";
#[cfg(feature = "redlock")]
pub(crate) static REDLOCK_RAISE: LazyLock<Lua> =
    LazyLock::new(|| Lua::with_functions(REDLOCK_RAISE_LUA));
