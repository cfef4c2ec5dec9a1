"""redis-py's Lock (redis.asyncio, one asyncio task per concurrent client) under the bench protocol."""

import sys

import benchproto as bp

POOL_DEFAULT = 100  # redis.asyncio ConnectionPool's default max_connections


def main():
    args = bp.parse_args()
    import redis.asyncio as aredis

    changed = []
    pool_kw = {}
    if args.concurrency > POOL_DEFAULT:
        # Each task holds one pooled connection while it runs a command; the default pool of 100
        # raises "Too many connections" beyond that.
        pool_kw["max_connections"] = args.concurrency
        changed.append(f"connection pool max_connections {args.concurrency} (default {POOL_DEFAULT} is too small for {args.concurrency} tasks)")
    client = aredis.Redis.from_url(args.url, **pool_kw)
    timeout_s = args.lease_ms / 1000.0

    settings = (
        "redis.asyncio Lock, one asyncio task per client, one shared connection pool; "
        "waiting acquire polls SET NX PX every 0.1 s (sleep=0.1, library default), "
        "blocking_timeout none (waits until granted); "
        f"timeout {timeout_s:g} s from --lease-ms; release is a Lua compare-and-delete"
    )
    if changed:
        settings += "; changed: " + ", ".join(changed)

    async def setup():
        try:
            await client.ping()
        except Exception as e:  # noqa: BLE001
            bp.die(f"cannot reach {args.url}: {e}")

    def make_lock(key):
        return client.lock(key, timeout=timeout_s, blocking=True, blocking_timeout=None)

    async def acquire(lk):
        return await lk.acquire()

    async def release(lk):
        await lk.release()

    bp.run_asyncio(args, "redis-py Lock", bp.dist_version("redis"), settings,
                   setup, make_lock, acquire, release)


if __name__ == "__main__":
    sys.exit(main())
