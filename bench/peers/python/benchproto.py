"""The bench protocol (bench/PROTOCOL.md) for the Python peers.

Each peer module supplies how to make a lock for a key, acquire it (waiting) and release it; this
module parses the arguments, runs the three modes with threads or asyncio tasks, keeps the measured
window, writes the hand-off events and prints the one JSON line.

Measured window: `--warmup` seconds after the tasks start, then `--duration` seconds. An
acquire+release pair counts when it starts and ends inside the window; no new pair starts after
the window. In `handoff`, grants are written (and counted) when they fall inside the window;
releases are written for the whole run, so the first grant of the window, and grants of other
processes whose windows end a little later, always find the release that came before them.
"""

import argparse
import asyncio
import json
import math
import os
import sys
import threading
import time
from importlib import metadata

now_ns = time.monotonic_ns  # CLOCK_MONOTONIC

# After the window ends, tasks still waiting in acquire get this long to come out (they release
# at once if granted); then the process exits regardless.
GRACE_S = 1.0


def parse_args(argv=None, redlock=False):
    """The protocol's arguments. With `redlock`, the URL may also name several nodes,
    `redlock://host:port,host:port,.../db`; `node_urls` is then one `redis://host:port/db` per
    node (for a `redis://` URL, that URL alone)."""
    p = argparse.ArgumentParser(description="bench protocol peer (see bench/PROTOCOL.md)")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", required=True, choices=["latency", "throughput", "handoff"])
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--lease-ms", type=int, default=10000)
    p.add_argument("--hold-ms", type=float, default=1.0)
    p.add_argument("--events")
    a = p.parse_args(argv)
    if a.concurrency < 1 or a.duration <= 0 or a.warmup < 0 or a.lease_ms <= 0 or a.hold_ms < 0:
        p.error("--concurrency, --duration and --lease-ms must be positive, --warmup and --hold-ms not negative")
    if redlock and a.url.startswith("redlock://"):
        a.node_urls = redlock_node_urls(a.url)
    elif a.url.startswith("redis://"):
        a.node_urls = [a.url]
    else:
        p.error("only redis:// URLs are supported" + (" (and redlock://h:p,h:p,.../db)" if redlock else ""))
    if a.mode == "handoff" and not a.events:
        p.error("--mode handoff needs --events FILE")
    if a.mode == "latency":
        a.concurrency = 1
    return a


def redlock_node_urls(url):
    """`redlock://[cred@]h:p,[cred@]h:p,.../db[?params]` -> one `redis://[cred@]h:p/db` per node
    (the query, fenced's parameters, is ignored)."""
    nodes, _, db = url[len("redlock://"):].split("?", 1)[0].partition("/")
    return [f"redis://{node}/{db or '0'}" for node in nodes.split(",") if node]


def dist_version(name):
    return metadata.version(name)


def die(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(1)


class Window:
    def __init__(self, args):
        self.ms = now_ns() + int(args.warmup * 1e9)
        self.me = self.ms + int(args.duration * 1e9)


class TaskResult:
    __slots__ = ("lat", "errors", "grants", "events", "last_error")

    def __init__(self):
        self.lat = []
        self.errors = 0
        self.grants = 0
        self.events = []  # (ns, "grant" | "release")
        self.last_error = None

    def error(self, w, exc):
        if now_ns() >= w.ms:
            self.errors += 1
        self.last_error = exc


def keys_for(args, i):
    if args.mode == "latency":
        return [f"{args.prefix}:lat"]
    if args.mode == "throughput":
        return [f"{args.prefix}:tp:{i}:{k}" for k in range(16)]
    return [f"{args.prefix}:handoff"]


def percentile(sorted_vals, q):
    # nearest rank
    if not sorted_vals:
        return 0
    idx = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[idx]


def finish(args, impl, version, settings, results, w, incomplete=False):
    lat = sorted(x for r in results for x in r.lat)
    errors = sum(r.errors for r in results)
    out = {
        "impl": impl,
        "version": version,
        "mode": args.mode,
        "concurrency": args.concurrency,
        "ops": sum(r.grants for r in results) if args.mode == "handoff" else len(lat),
        "errors": errors,
        "elapsed_s": round((w.me - w.ms) / 1e9, 6),
    }
    if args.mode != "handoff":
        out["lat_ns"] = {
            "p50": percentile(lat, 0.50),
            "p99": percentile(lat, 0.99),
            "max": lat[-1] if lat else 0,
            "mean": int(sum(lat) / len(lat)) if lat else 0,
        }
    out["settings"] = settings
    code = 0
    if args.mode == "handoff":
        evs = sorted(e for r in results for e in r.events)
        try:
            with open(args.events, "w") as f:
                f.write("".join(f"{kind} {ns}\n" for ns, kind in evs))
        except OSError as e:
            print(f"error: cannot write events file {args.events}: {e}", file=sys.stderr)
            code = 1
    # In a hand-off run, a process the lock never reached is a result (starvation), not a failure.
    if out["ops"] == 0 and (args.mode != "handoff" or errors > 0):
        last = next((r.last_error for r in results if r.last_error is not None), None)
        print(f"error: no operation completed in the measured window"
              + (f" (last error: {last!r})" if last is not None else ""), file=sys.stderr)
        code = 1
    if incomplete:
        print("note: some tasks were still waiting in acquire after the grace period; exiting anyway",
              file=sys.stderr)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads blocked in the library (BLPOP, sleeps) must not keep the process alive.
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# threads (sync libraries)


def run_threads(args, impl, version, settings, make_lock, acquire, release):
    """make_lock(key) -> lock; acquire(lock) blocks until granted (returns False on give-up);
    release(lock)."""
    hold_s = args.hold_ms / 1000.0
    n = args.concurrency
    results = [TaskResult() for _ in range(n)]
    locks = [[make_lock(k) for k in keys_for(args, i)] for i in range(n)]
    start = threading.Barrier(n + 1)
    box = {}

    def pair_loop(i):
        r, mine = results[i], locks[i]
        start.wait()
        w = box["w"]
        k = 0
        while True:
            lk = mine[k % len(mine)]
            k += 1
            t0 = now_ns()
            if t0 >= w.me:
                return
            try:
                if not acquire(lk):
                    r.error(w, "acquire gave up")
                    continue
            except Exception as e:  # noqa: BLE001
                r.error(w, e)
                continue
            try:
                release(lk)
            except Exception as e:  # noqa: BLE001
                r.error(w, e)
                continue
            t1 = now_ns()
            if t0 >= w.ms and t1 <= w.me:
                r.lat.append(t1 - t0)

    def handoff_loop(i):
        r, lk = results[i], locks[i][0]
        start.wait()
        w = box["w"]
        while now_ns() < w.me:
            try:
                if not acquire(lk):
                    r.error(w, "acquire gave up")
                    continue
            except Exception as e:  # noqa: BLE001
                r.error(w, e)
                continue
            g = now_ns()
            if g <= w.me:
                if g >= w.ms:
                    r.events.append((g, "grant"))
                    r.grants += 1
                if hold_s > 0:
                    time.sleep(hold_s)
            r.events.append((now_ns(), "release"))
            try:
                release(lk)
            except Exception as e:  # noqa: BLE001
                r.error(w, e)

    body = handoff_loop if args.mode == "handoff" else pair_loop
    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    box["w"] = w = Window(args)
    start.wait()
    deadline = None
    for t in threads:
        while t.is_alive():
            t.join(0.05)
            if now_ns() >= w.me:
                deadline = deadline or time.monotonic() + GRACE_S
                if time.monotonic() >= deadline:
                    break
    incomplete = any(t.is_alive() for t in threads)
    finish(args, impl, version, settings, results, w, incomplete)


# ---------------------------------------------------------------------------------------------
# asyncio tasks


def run_asyncio(args, impl, version, settings, setup, make_lock, acquire, release):
    """setup() -> awaitable run once in the loop first; make_lock(key) -> lock;
    await acquire(lock) waits until granted (returns False on give-up); await release(lock)."""
    asyncio.run(_run_asyncio(args, impl, version, settings, setup, make_lock, acquire, release))


async def _run_asyncio(args, impl, version, settings, setup, make_lock, acquire, release):
    await setup()
    hold_s = args.hold_ms / 1000.0
    n = args.concurrency
    results = [TaskResult() for _ in range(n)]
    locks = [[make_lock(k) for k in keys_for(args, i)] for i in range(n)]
    w = Window(args)

    async def pair_loop(i):
        r, mine = results[i], locks[i]
        k = 0
        while True:
            lk = mine[k % len(mine)]
            k += 1
            t0 = now_ns()
            if t0 >= w.me:
                return
            try:
                if not await acquire(lk):
                    r.error(w, "acquire gave up")
                    continue
            except Exception as e:  # noqa: BLE001
                r.error(w, e)
                continue
            try:
                await release(lk)
            except Exception as e:  # noqa: BLE001
                r.error(w, e)
                continue
            t1 = now_ns()
            if t0 >= w.ms and t1 <= w.me:
                r.lat.append(t1 - t0)

    async def handoff_loop(i):
        r, lk = results[i], locks[i][0]
        while now_ns() < w.me:
            try:
                if not await acquire(lk):
                    r.error(w, "acquire gave up")
                    continue
            except Exception as e:  # noqa: BLE001
                r.error(w, e)
                continue
            g = now_ns()
            if g <= w.me:
                if g >= w.ms:
                    r.events.append((g, "grant"))
                    r.grants += 1
                if hold_s > 0:
                    await asyncio.sleep(hold_s)
            r.events.append((now_ns(), "release"))
            try:
                await release(lk)
            except Exception as e:  # noqa: BLE001
                r.error(w, e)

    body = handoff_loop if args.mode == "handoff" else pair_loop
    tasks = [asyncio.create_task(body(i)) for i in range(n)]
    left = max(0.0, (w.me - now_ns()) / 1e9) + GRACE_S
    _done, pending = await asyncio.wait(tasks, timeout=left)
    finish(args, impl, version, settings, results, w, incomplete=bool(pending))
