"""pottery's Redlock (sync, one thread per concurrent client; masters: the one server of a
redis:// URL, or every node of a redlock:// URL) under the bench protocol."""

import sys

import benchproto as bp

POOL_DEFAULT = 100  # redis-py ConnectionPool's default max_connections


def main():
    args = bp.parse_args(redlock=True)
    import redis
    from pottery import Redlock

    changed = []
    pool_kw = {}
    if args.concurrency > POOL_DEFAULT:
        pool_kw["max_connections"] = args.concurrency
        changed.append(f"connection pool max_connections {args.concurrency} (default {POOL_DEFAULT} is too small for {args.concurrency} threads)")
    masters = []
    for url in args.node_urls:
        client = redis.Redis.from_url(url, **pool_kw)
        try:
            client.ping()
        except Exception as e:  # noqa: BLE001
            bp.die(f"cannot reach {url}: {e}")
        masters.append(client)
    auto_release_s = args.lease_ms / 1000.0

    n = len(masters)
    settings = (
        ("pottery Redlock, masters = the one server, one thread per client, one shared connection pool; "
         if n == 1 else
         f"pottery Redlock, masters = the {n} nodes (quorum {n // 2 + 1}), one thread per client, one "
         "shared connection pool per node; ") +
        "a waiting acquire retries SET NX PX after a random sleep of 0-0.2 s (library default "
        "retry delay), timeout -1 (waits until granted); every acquire and release runs its "
        "Redis calls in a fresh thread pool (the library's quorum executor); "
        f"auto_release_time {auto_release_s:g} s from --lease-ms; "
        "keys are redlock:PREFIX:... (the library prepends redlock:)"
    )
    if changed:
        settings += "; changed: " + ", ".join(changed)

    def make_lock(key):
        return Redlock(key=key, masters=set(masters), auto_release_time=auto_release_s)

    def acquire(lk):
        return lk.acquire(blocking=True, timeout=-1)

    def release(lk):
        lk.release()

    bp.run_threads(args, "pottery Redlock", bp.dist_version("pottery"), settings,
                   make_lock, acquire, release)


if __name__ == "__main__":
    sys.exit(main())
