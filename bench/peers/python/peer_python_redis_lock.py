"""python-redis-lock's redis_lock.Lock (sync, one thread per concurrent client) under the bench
protocol."""

import math
import sys

import benchproto as bp

POOL_DEFAULT = 100  # redis-py ConnectionPool's default max_connections


def main():
    args = bp.parse_args()
    import redis
    import redis_lock

    changed = []
    pool_kw = {}
    if args.concurrency > POOL_DEFAULT:
        # A thread waiting in BLPOP holds a pooled connection; the default pool of 100 raises
        # "Too many connections" beyond that.
        pool_kw["max_connections"] = args.concurrency
        changed.append(f"connection pool max_connections {args.concurrency} (default {POOL_DEFAULT} is too small for {args.concurrency} threads)")
    client = redis.StrictRedis.from_url(args.url, **pool_kw)
    try:
        client.ping()
    except Exception as e:  # noqa: BLE001
        bp.die(f"cannot reach {args.url}: {e}")

    # The library takes whole seconds for the lock's expiry.
    expire_s = max(1, math.ceil(args.lease_ms / 1000))
    if expire_s * 1000 != args.lease_ms:
        changed.append(f"expire {expire_s} s (the library takes whole seconds; --lease-ms {args.lease_ms})")

    settings = (
        "redis_lock.Lock, one thread per client, one shared connection pool; "
        "a waiting acquire blocks in BLPOP on the lock's signal list (the release script "
        "pushes one element, waking one waiter), re-blocking for up to expire seconds per round "
        "(library default: no timeout, signal_expire 1000 ms); "
        f"expire {expire_s} s, auto_renewal off (library default); "
        "acquire first GETs the key to check it is not already held by this Lock; "
        "keys are lock:PREFIX:... and lock-signal:PREFIX:... (the library prepends lock:/lock-signal:)"
    )
    if changed:
        settings += "; changed: " + ", ".join(changed)

    def make_lock(key):
        return redis_lock.Lock(client, key, expire=expire_s, auto_renewal=False)

    def acquire(lk):
        return lk.acquire(blocking=True)

    def release(lk):
        lk.release()

    bp.run_threads(args, "python-redis-lock", bp.dist_version("python-redis-lock"), settings,
                   make_lock, acquire, release)


if __name__ == "__main__":
    sys.exit(main())
