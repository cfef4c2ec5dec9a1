//! The Lua scripts that make every lock operation one atomic step on the server.
//!
//! Every script touches only the keys it is given (`KEYS`), and all keys of one lock share a hash
//! tag, so the scripts also run unchanged on a Redis Cluster node. Replies are flat arrays whose
//! first element is a status code:
//!
//! | script | reply |
//! |---|---|
//! | acquire | `{1, token}` granted (new or refreshed) · `{0, owner, token, label, pttl}` held by another |
//! | extend, release | `{1}` done · `{0}` not held by anyone · `{2, owner, token, label, pttl}` held by another |
//! | holder | `{0}` free · `{1, owner, token, label, pttl}` |
//! | force release | `{0}` free · `{1, owner, token, label, pttl}` what was broken |
//!
//! `pttl` is the server's `PTTL` of the lock key in milliseconds (negative when the key has no
//! expiry). Tokens come from `INCRBY` on the fence key, which has no expiry and is never
//! deleted, so a key's tokens keep increasing across grants, releases and forced releases; each
//! new token is also at least the server's time in microseconds (see [`ACQUIRE`]).

use std::sync::LazyLock;

use redis::Script;

/// `KEYS[1]` lock hash, `KEYS[2]` fence counter; `ARGV[1]` owner, `ARGV[2]` lease in ms,
/// `ARGV[3]` label.
///
/// A new token is `max(last + 1, server time in µs)`: it is above the last token of this counter,
/// and also above every token issued before by a counter that was since lost (a restart without
/// persistence, a failover to a replica that missed the last increments, a flush), as long as
/// the server's clock did not go back. `replicate_commands` (needed before a write that follows
/// `TIME` on Redis before 5; a no-op since) is called only where it exists.
const ACQUIRE_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label')
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
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'label', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, token}
end
if lock[1] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(lock[2])}
end
return {0, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1])}
";
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_LUA));

/// `KEYS[1]` lock hash; `ARGV[1]` owner, `ARGV[2]` lease in ms.
const EXTEND_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label')
if not lock[1] then
    return {0}
end
if lock[1] == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1}
end
return {2, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1])}
";
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(EXTEND_LUA));

/// `KEYS[1]` lock hash; `ARGV[1]` owner, `ARGV[2]` release channel.
const RELEASE_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label')
if not lock[1] then
    return {0}
end
if lock[1] == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], lock[2] or '')
    return {1}
end
return {2, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1])}
";
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));

/// `KEYS[1]` lock hash.
const HOLDER_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label')
if not lock[1] then
    return {0}
end
return {1, lock[1], lock[2], lock[3], redis.call('PTTL', KEYS[1])}
";
pub(crate) static HOLDER: LazyLock<Script> = LazyLock::new(|| Script::new(HOLDER_LUA));

/// `KEYS[1]` lock hash; `ARGV[1]` release channel. Keeps the fence counter.
const FORCE_RELEASE_LUA: &str = r"
local lock = redis.call('HMGET', KEYS[1], 'owner', 'token', 'label')
if not lock[1] then
    return {0}
end
local pttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], lock[2] or '')
return {1, lock[1], lock[2], lock[3], pttl}
";
pub(crate) static FORCE_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(FORCE_RELEASE_LUA));
