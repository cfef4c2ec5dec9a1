"""kazoo's Lock recipe (ZooKeeper; sync, one thread per concurrent client, one KazooClient per
process) under the bench protocol."""

import sys

import benchproto as bp

SESSION_DEFAULT_S = 10.0  # KazooClient's default session timeout


def parse_args():
    """The protocol's arguments; the shared parser checks for redis:// URLs, so the zk:// URL is
    set aside while it runs."""
    argv = sys.argv[1:]
    url = None
    for i, a in enumerate(argv):
        if a == "--url" and i + 1 < len(argv):
            url, argv[i + 1] = argv[i + 1], "redis://placeholder"
        elif a.startswith("--url="):
            url, argv[i] = a[len("--url="):], "--url=redis://placeholder"
    args = bp.parse_args(argv)
    args.url = url
    return args


def kazoo_hosts(url):
    """zk://host:port[,host:port...][/chroot][?...] -> kazoo's "host:port,host:port/chroot"."""
    if not url or not url.startswith("zk://"):
        bp.die(f"kazoo-lock takes zk://host:port[/chroot], not {url}")
    hosts = url[len("zk://"):].split("?", 1)[0].rstrip("/")
    if not hosts or "@" in hosts:
        bp.die(f"kazoo-lock takes zk://host:port[,host:port...][/chroot] without credentials, not {url}")
    return hosts


def lock_path(key):
    """The key PREFIX:... as the top-level node /PREFIX:... ('%' and '/' percent-encoded)."""
    return "/" + key.replace("%", "%25").replace("/", "%2F")


def main():
    args = parse_args()
    hosts = kazoo_hosts(args.url)
    from kazoo.client import KazooClient

    session_s = args.lease_ms / 1000.0
    client = KazooClient(hosts=hosts, timeout=session_s)
    try:
        client.start(timeout=10)
    except Exception as e:  # noqa: BLE001
        bp.die(f"cannot reach {args.url} ({hosts}): {e!r}")

    changed = []
    if session_s != SESSION_DEFAULT_S:
        changed.append(f"session timeout {session_s:g} s from --lease-ms (default {SESSION_DEFAULT_S:g} s)")
    settings = (
        "kazoo.recipe.lock.Lock via client.Lock(path), one KazooClient (one session, default "
        "threading handler) per process shared by all threads, one Lock object per thread and key "
        "(a Lock object holds one contender node: threads sharing one would queue on its internal "
        "mutex rather than in ZooKeeper); "
        f"session timeout {session_s:g} s (KazooClient timeout, set from --lease-ms; the lock lives "
        "as long as the session); acquire = ensure_path once per Lock object, create "
        "EPHEMERAL_SEQUENTIAL <path>/<uuid>__lock__<seq>, getChildren, granted when lowest; from "
        "the second acquire of a Lock object on, a getChildren first looks for a node of its own "
        "left by an earlier try (library behaviour); waiting: getData with a watch on the "
        "predecessor node only (FIFO, one release wakes one waiter), the watch callback sets a "
        "threading.Event the waiting thread blocks on, then getChildren again; no timer; "
        "blocking=True, timeout=None (library default, waits until granted), KazooRetry without "
        "a try limit on connection loss (library default); release = delete the node; "
        "no fencing token; keys: the key PREFIX:... is the lock node /PREFIX:... under the URL's "
        "chroot"
    )
    if changed:
        settings += "; changed: " + ", ".join(changed)

    def make_lock(key):
        return client.Lock(lock_path(key))

    def acquire(lk):
        return lk.acquire(blocking=True)

    def release(lk):
        lk.release()

    bp.run_threads(args, "kazoo Lock", bp.dist_version("kazoo"), settings, make_lock, acquire, release)


if __name__ == "__main__":
    sys.exit(main())
