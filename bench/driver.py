#!/usr/bin/env python3
"""Runs every benchmark of fenced in one go and writes BENCHMARKS.md (stdlib only).

Started by scripts/bench, which builds fenced-bench, installs the peers and starts a dedicated
Redis server (and 5 more as independent Redlock nodes, and a Redis Cluster of 3 primaries). Every
implementation is a command that follows bench/PROTOCOL.md: fenced and the raw floors
(`fenced-bench --impl fenced|floor`) on memory, SQLite and Redis, and the peer libraries in
bench/peers/bin/ on the same Redis server, in the same modes; fenced and the Redlock peers on 3
and on 5 Redlock nodes (no floor there); fenced and the floor on the Redis Cluster (latency and
throughput; no peer there).

Redis commands per acquisition come from `INFO commandstats` snapshots taken inside the measured
window (the driver's own INFO calls are left out; on the cluster, the sum over its primaries).
They count every command the server ran, including the ones run inside Lua scripts.
"""

import argparse
import collections
import csv
import datetime
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time

# The settings of a run that the report shows, saved with its results.
RENDER_SETTINGS = ["quick", "warmup", "duration", "lease_ms", "hold_ms", "memory_lease_ms", "rb_requests",
                   "pin_cpu", "sqlite_dir", "run_dir", "cluster_primaries"]
# Redlock backends: the number of independent Redis nodes each runs on (the first of
# --redlock-ports). No floor runs on them.
REDLOCK_NODES = {"redlock-3": 3, "redlock-5": 5}
# The peers that run Redlock over a list of nodes (bench/PROTOCOL.md, redlock:// URLs).
REDLOCK_PEERS = ["pottery-redlock", "node-redlock", "rslock"]
# Peer libraries per backend (each a command in bench/peers/bin following bench/PROTOCOL.md).
PEERS_BY_BACKEND = {
    "redis": ["redis-py-lock", "python-redis-lock", "pottery-redlock", "node-redlock", "rslock"],
    "etcd": ["etcdctl-lock"],
    "zookeeper": ["kazoo-lock"],
    **{b: REDLOCK_PEERS for b in REDLOCK_NODES},
}
PEERS = list(dict.fromkeys(p for ps in PEERS_BY_BACKEND.values() for p in ps))
# The Redis Cluster backend (the primaries of --cluster-ports): fenced and the floor, latency and
# throughput only (no peer command takes a cluster; no hand-off or memory runs).
CLUSTER = "redis-cluster"
# The backends whose servers' `INFO commandstats` give commands per acquisition.
COUNTED = ("redis", CLUSTER)
ALL_BACKENDS = ["memory", "sqlite", "redis", "etcd", "zookeeper", "postgres-lease", "postgres-session",
                "mysql-lease", "mysql-session"] + list(REDLOCK_NODES) + [CLUSTER]
# The backends of this run (etcd, ZooKeeper, PostgreSQL, MySQL and Redlock only when scripts/bench
# started their servers).
BACKENDS = list(ALL_BACKENDS)
# Runs on the Redlock backends: throughput tasks and hand-off layouts (processes, tasks), in the
# full and the quick run.
REDLOCK_THROUGHPUT_TASKS = [1, 16]
REDLOCK_HANDOFF_LAYOUTS = [(2, 8)]


def base_impls(backend):
    """fenced, and the floor where there is one (not on Redlock)."""
    return ["fenced"] if backend in REDLOCK_NODES else ["fenced", "floor"]


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- A minimal Redis client (RESP2) ---------------------------------------------------------


class Redis:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.file = self.sock.makefile("rb")

    def cmd(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def commandstats(self):
        """calls per command, leaving out the driver's own INFO calls."""
        text = self.cmd("INFO", "commandstats")
        calls = {}
        for m in re.finditer(r"^cmdstat_([^:]+):calls=(\d+)", text, re.M):
            if m.group(1) not in ("info", "flushdb", "config|resetstat"):
                calls[m.group(1)] = int(m.group(2))
        return calls

    def pid(self):
        """The server's process id (`INFO server`)."""
        m = re.search(r"^process_id:(\d+)", self.cmd("INFO", "server"), re.M)
        return int(m.group(1)) if m else 0


def commandstats(servers):
    """calls per command, summed over `servers`."""
    calls = collections.Counter()
    for server in servers:
        calls.update(server.commandstats())
    return dict(calls)


def diff_calls(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0) > 0}


# --- Running commands -------------------------------------------------------------------------


class Runner:
    def __init__(self, args):
        self.args = args
        self.run_dir = args.run_dir
        self.n = 0
        self.commands = []  # every command line run, for the report
        self.redis = Redis("127.0.0.1", args.redis_port) if args.redis_port else None
        self.redlock = [Redis("127.0.0.1", p) for p in args.redlock_ports]
        self.cluster = [Redis("127.0.0.1", p) for p in args.cluster_ports]

    def shown(self, argv):
        text = " ".join(shlex.quote(a) for a in argv)
        text = text.replace(self.run_dir, "$RUN").replace(self.args.root + "/", "")
        return scrub(self.args, text)

    def start(self, argv, tag):
        self.n += 1
        out = os.path.join(self.run_dir, f"{self.n:03d}-{tag}.out")
        err = os.path.join(self.run_dir, f"{self.n:03d}-{tag}.err")
        self.commands.append(self.shown(argv))
        p = subprocess.Popen(argv, stdout=open(out, "w"), stderr=open(err, "w"), cwd=self.args.root)
        return {"p": p, "out": out, "err": err, "spawned": time.monotonic_ns(), "argv": argv}

    def finish(self, proc, timeout):
        try:
            proc["p"].wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            proc["p"].kill()
            proc["p"].wait()
            return None, f"timed out after {timeout:.0f} s; stderr: {tail(proc['err'])}"
        if proc["p"].returncode != 0:
            return None, f"exit status {proc['p'].returncode}; stderr: {tail(proc['err'])}"
        lines = [l for l in open(proc["out"]).read().splitlines() if l.strip()]
        if not lines:
            return None, f"no JSON line on stdout; stderr: {tail(proc['err'])}"
        try:
            return json.loads(lines[-1]), None
        except json.JSONDecodeError as e:
            return None, f"stdout is not JSON ({e}): {lines[-1][:200]}"

    def measure(self, impl, backend, mode, procs, tasks):
        """One measurement: `procs` processes of `tasks` tasks each. Returns a result dict."""
        a = self.args
        warmup, duration = a.warmup, a.duration
        prefix = f"b{int(time.time() * 1000) % 10**9}{self.n}"
        url = self.url(backend, impl, prefix)
        res = {"impl": impl, "backend": backend, "mode": mode, "procs": procs, "tasks": tasks,
               "ok": False}
        self.flush(backend)
        started = []
        # Redlock runs are not pinned: N servers on one core would answer the fan-out one by one.
        pinning = mode == "latency" and backend not in REDLOCK_NODES
        pinned = pinning and self.pin(True, backend)
        for i in range(procs):
            argv = self.argv(impl, url, mode, tasks, prefix)
            if pinned:
                argv = ["taskset", "-c", "0"] + argv
            if mode == "handoff":
                argv += ["--events", os.path.join(self.run_dir, f"ev-{prefix}-{i}.txt")]
            started.append(self.start(argv, f"{impl}-{backend}-{mode}"))
        spawn_first = started[0]["spawned"]
        spawn_last = started[-1]["spawned"]
        margin = min(0.3, duration / 4)
        snap_a = spawn_last + int((warmup + margin) * 1e9)
        snap_b = spawn_first + int((warmup + duration - 0.1) * 1e9)
        snaps = None
        if backend in COUNTED and snap_b > snap_a:
            servers = self.cluster if backend == CLUSTER else [self.redis]
            sleep_until(snap_a)
            t_a, before = time.monotonic_ns(), commandstats(servers)
            sleep_until(snap_b)
            t_b, after = time.monotonic_ns(), commandstats(servers)
            snaps = (t_a, t_b, diff_calls(before, after))
        outs, errors = [], []
        for proc in started:
            timeout = (proc["spawned"] + int((warmup + duration) * 1e9) - time.monotonic_ns()) / 1e9 + 30
            out, err = self.finish(proc, timeout)
            if err:
                errors.append(err)
            else:
                outs.append(out)
        if pinning:
            self.pin(False, backend)
        if errors:
            res["error"] = errors[0]
            return res
        first = outs[0]
        res.update(ok=True, version=first.get("version", "?"), settings=first.get("settings", ""),
                   errors=sum(o.get("errors", 0) for o in outs))
        if mode == "handoff":
            window = (max(spawn_last + int((warmup + margin) * 1e9), 0),
                      spawn_first + int((warmup + duration) * 1e9))
            files = [p["argv"][p["argv"].index("--events") + 1] for p in started]
            res.update(handoff_stats(files, window))
            granted = sum(o.get("ops", 0) for o in outs)
            if not res["grants"] and granted:
                # The processes' own windows (counted from their start) and the driver's (from the
                # spawn) did not overlap: start-up took about as long as warm-up + measurement.
                res.update(ok=False, error=f"the processes reported {granted} grants, none inside the "
                                           "driver's window, which counts from the spawn (their start-up "
                                           "took about as long as warm-up + measurement)")
                return res
            res["ops_per_s"] = res.get("grants_per_s")
            if snaps and res.get("grant_times"):
                t_a, t_b, calls = snaps
                grants = sum(1 for g in res["grant_times"] if t_a <= g <= t_b)
                if grants:
                    res["cmds"] = {k: v / grants for k, v in calls.items()}
        else:
            ops = sum(o["ops"] for o in outs)
            elapsed = first.get("elapsed_s") or duration
            res["ops_per_s"] = ops / elapsed
            lat = first.get("lat_ns") or {}
            res.update(p50=lat.get("p50"), p99=lat.get("p99"), max=lat.get("max"))
            if snaps and res["ops_per_s"]:
                t_a, t_b, calls = snaps
                seconds = (t_b - t_a) / 1e9
                res["cmds"] = {k: v / seconds / res["ops_per_s"] for k, v in calls.items()}
        res.pop("grant_times", None)
        return res

    def flush(self, backend):
        """Empties the Redis server, the Redlock nodes or every primary of the cluster `backend`
        runs on."""
        if backend == "redis":
            self.redis.cmd("FLUSHDB")
        for node in self.redlock[:REDLOCK_NODES.get(backend, 0)]:
            node.cmd("FLUSHDB")
        if backend == CLUSTER:
            for node in self.cluster:
                node.cmd("FLUSHDB")

    def pin(self, on, backend="redis"):
        """Latency runs: the Redis server (on the cluster: every primary) on CPU 0 (the client is
        started on it too). On a VM, single-task latency across two cores varies 2-3x from run to
        run with where the scheduler puts the two; on one core it is stable."""
        if not self.args.pin_cpu:
            return False
        cpus = "0" if on else f"0-{os.cpu_count() - 1}"
        ok = True
        try:
            pids = [node.pid() for node in self.cluster] if backend == CLUSTER else [self.args.redis_pid]
        except (OSError, RuntimeError, ConnectionError):
            return False
        for pid in pids:
            try:
                subprocess.run(["taskset", "-p", "-c", cpus, str(pid)], check=True,
                               capture_output=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                ok = False
        return ok

    def url(self, backend, impl, prefix):
        if backend == "memory":
            return "memory://"
        if backend == "sqlite":
            return f"sqlite://{self.args.sqlite_dir}/{impl}-{prefix}.db"
        if backend == "etcd":
            return self.args.etcd_url
        if backend == "zookeeper":
            return self.args.zk_url
        if backend == "postgres-lease":
            return self.args.pg_url
        if backend == "postgres-session":
            return self.args.pg_url + "?mode=session"
        if backend == "mysql-lease":
            return self.args.mysql_url
        if backend == "mysql-session":
            return self.args.mysql_url + "?mode=session"
        if backend in REDLOCK_NODES:
            ports = self.args.redlock_ports[:REDLOCK_NODES[backend]]
            return "redlock://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/0"
        if backend == CLUSTER:
            return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.args.cluster_ports)
        return f"redis://127.0.0.1:{self.args.redis_port}/0"

    def argv(self, impl, url, mode, tasks, prefix):
        a = self.args
        common = ["--url", url, "--mode", mode, "--concurrency", str(tasks),
                  "--duration", str(a.duration), "--warmup", str(a.warmup),
                  "--prefix", prefix, "--lease-ms", str(a.lease_ms), "--hold-ms", str(a.hold_ms)]
        if impl in ("fenced", "floor"):
            return [a.bench_bin, "--impl", impl] + common
        return [os.path.join(a.root, "bench/peers/bin", impl)] + common

    def memory(self, backend, count):
        a = self.args
        prefix = f"m{int(time.time() * 1000) % 10**9}{self.n}"
        url = self.url(backend, "fenced", prefix)
        self.flush(backend)
        argv = [a.bench_bin, "--impl", "fenced", "--url", url, "--mode", "memory",
                "--count", str(count), "--lease-ms", str(a.memory_lease_ms),
                "--duration", str(a.memory_limit), "--prefix", prefix]
        proc = self.start(argv, f"memory-{backend}-{count}")
        out, err = self.finish(proc, 2 * a.memory_limit + a.memory_lease_ms / 1000 + 30)
        self.flush(backend)
        if err:
            return {"backend": backend, "count": count, "ok": False, "error": err}
        out.update(ok=True, backend=backend, count=count)
        return out


def scrub(args, text):
    """`text` with the SQL servers' URLs, which carry the test servers' passwords, as $PG_URL and
    $MYSQL_URL."""
    for attr, name in (("pg_url", "$PG_URL"), ("mysql_url", "$MYSQL_URL")):
        url = getattr(args, attr, "")
        if url:
            text = text.replace(url, name)
    return text


def tail(path, n=6):
    try:
        lines = open(path, errors="replace").read().strip().splitlines()
    except OSError:
        return "(no stderr)"
    text = " | ".join(lines[-n:])
    return text[-800:] if text else "(empty)"


def sleep_until(ns):
    delay = (ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[rank - 1]


def handoff_stats(files, window):
    """Hand-off latency = each grant minus the latest release before it (any process)."""
    events = []
    for proc, path in enumerate(files):
        try:
            for line in open(path):
                parts = line.split()
                if len(parts) == 2 and parts[0] in ("grant", "release"):
                    events.append((int(parts[1]), parts[0] == "grant", proc))
        except OSError:
            pass
    # Start no earlier than every process's first event (a late starter records nothing before).
    start, end = window
    for proc in range(len(files)):
        firsts = [ns for ns, _, p in events if p == proc]
        if firsts:
            start = max(start, min(firsts))
    events.sort()
    last_release = None
    lat, cross, grant_times = [], [], []
    per_proc = collections.Counter()
    for ns, grant, proc in events:
        if not grant:
            last_release = (ns, proc)
            continue
        if not start <= ns <= end:
            continue
        grant_times.append(ns)
        per_proc[proc] += 1
        if last_release and last_release[0] >= start - 10**9:
            d = ns - last_release[0]
            lat.append(d)
            if last_release[1] != proc:
                cross.append(d)
    lat.sort()
    cross.sort()
    seconds = max((end - start) / 1e9, 1e-9)
    shares = [per_proc.get(p, 0) for p in range(len(files))]
    total = sum(shares)
    return {
        "grants": total,
        "grants_per_s": total / seconds if total else 0.0,
        "ho_p50": percentile(lat, 50), "ho_p99": percentile(lat, 99),
        "cross_n": len(cross), "cross_p50": percentile(cross, 50), "cross_p99": percentile(cross, 99),
        "share_min": min(shares) / total if total else None,
        "share_max": max(shares) / total if total else None,
        "grant_times": grant_times,
    }


# --- redis-benchmark ------------------------------------------------------------------------

CAD = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"


def redis_benchmark(runner):
    a = runner.args
    sha = runner.redis.cmd("SCRIPT", "LOAD", CAD)
    n = str(a.rb_requests)
    base = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(a.redis_port), "-c", "1", "-n", n,
            "-r", "1000000", "--csv"]
    tests = [
        ("SET key value NX PX 10000", base + ["SET", "rb:__rand_int__", "v", "NX", "PX", "10000"]),
        ("EVALSHA compare-and-delete (key not held: GET + compare)", base + ["EVALSHA", sha, "1", "rb:__rand_int__", "v"]),
        ("EVAL of the same script (text sent each time)", base + ["EVAL", CAD, "1", "rb:__rand_int__", "v"]),
        ("PING (round trip)", base + ["PING"]),
    ]
    rows = []
    pinned = runner.pin(True)
    for name, argv in tests:
        if pinned:
            argv = ["taskset", "-c", "0"] + argv
        runner.commands.append(runner.shown(argv))
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            rows.append({"name": name, "error": str(e)})
            continue
        lines = list(csv.reader(l for l in out.splitlines() if l.startswith('"')))
        if len(lines) < 2:
            rows.append({"name": name, "error": out[-300:]})
            continue
        row = dict(zip(lines[0], lines[-1]))
        rows.append({"name": name, "rps": float(row.get("rps", 0)),
                     "p50_ms": float(row.get("p50_latency_ms", 0)),
                     "p99_ms": float(row.get("p99_latency_ms", 0))})
    if pinned:
        runner.pin(False)
    runner.redis.cmd("FLUSHDB")
    return rows


# --- pgbench ---------------------------------------------------------------------------------

# The floor's statements (crates/fenced-bench/src/floor/postgres.rs) as pgbench scripts, one
# acquire + release pair per transaction, on random keys.
PGBENCH_SCRIPTS = [
    ("lease mode: expiry upsert + owner-checked UPDATE", "postgres-lease",
     "\\set k random(1, 1000000)\n"
     "INSERT INTO floor_locks AS l (lock_key, owner, token, expires_at) VALUES ('pgbench:' || :k, 'pgbench', "
     "nextval('floor_tokens'), now() + 10000 * interval '1 millisecond') ON CONFLICT (lock_key) DO UPDATE SET "
     "owner = EXCLUDED.owner, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at "
     "WHERE l.owner IS NULL OR l.expires_at <= now() RETURNING token;\n"
     "UPDATE floor_locks SET owner = NULL, expires_at = now() WHERE lock_key = 'pgbench:' || :k AND owner = 'pgbench';\n"),
    ("session mode: pg_try_advisory_lock + pg_advisory_unlock", "postgres-session",
     "\\set k random(1, 1000000)\nSELECT pg_try_advisory_lock(:k);\nSELECT pg_advisory_unlock(:k);\n"),
]


def pgbench(runner):
    """pgbench -c 1 with the floor's statements: the server's own cost of one pair, as a bare
    libpq client sends them (prepared, one round trip per statement)."""
    a = runner.args
    rows = []
    for name, backend, script in PGBENCH_SCRIPTS:
        path = os.path.join(runner.run_dir, f"pgbench-{backend}.sql")
        with open(path, "w") as f:
            f.write(script)
        argv = ["pgbench", "-n", "-M", "prepared", "-c", "1", "-T", str(max(1, round(a.duration))),
                "-f", path, a.pg_url]
        runner.commands.append(runner.shown(argv))
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            rows.append({"name": name, "backend": backend, "error": str(e)})
            continue
        tps = re.search(r"^tps = ([0-9.]+)", p.stdout, re.M)
        lat = re.search(r"^latency average = ([0-9.]+) ms", p.stdout, re.M)
        if p.returncode != 0 or not tps or not lat:
            rows.append({"name": name, "backend": backend,
                         "error": scrub(a, (p.stderr or p.stdout).strip())[-300:]})
            continue
        rows.append({"name": name, "backend": backend, "tps": float(tps.group(1)),
                     "lat_avg_ns": float(lat.group(1)) * 1e6})
    return rows


# --- The machine ------------------------------------------------------------------------------


def first_line(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def machine(args):
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    try:
        out = subprocess.run(["df", "--output=fstype", args.sqlite_dir], capture_output=True, text=True)
        fs = out.stdout.split()[-1]
    except (OSError, IndexError):
        fs = "unknown"
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("RAM", mem),
        ("kernel", platform.release()),
        ("Redis", first_line(["redis-server", "--version"])),
        ("PostgreSQL", first_line(["pgbench", "--version"]).replace("pgbench", "pgbench/server")
         if any(b.startswith("postgres") for b in BACKENDS) else "not in this run"),
        ("MySQL", first_line(["mariadbd", "--version"])
         if any(b.startswith("mysql") for b in BACKENDS) else "not in this run"),
        ("rustc", first_line(["rustc", "--version"])),
        ("Python", platform.python_version()),
        ("Node", first_line(["node", "--version"])),
        ("SQLite files on", f"{fs} ({args.sqlite_dir.replace(args.run_dir, '$RUN')})"),
    ]


# --- Formatting -------------------------------------------------------------------------------


def us(ns):
    if ns is None:
        return "–"
    v = ns / 1000
    if v >= 1000:
        return f"{v / 1000:.2f} ms"
    if v >= 100:
        return f"{v:.0f} µs"
    if v >= 10:
        return f"{v:.1f} µs"
    return f"{v:.2f} µs"


def rate(x):
    if x is None:
        return "–"
    if x >= 1000:
        return f"{x / 1000:.1f}k"
    return f"{x:.0f}"


def ratio(x):
    if x is None:
        return "–"
    return f"{x:.2f}×"


def div(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def tasks_label(t):
    return f"{t} task" if t == 1 else f"{t} tasks"


def layout(r):
    return f"{r['procs']}×{r['tasks']}"


def cmds_total(r):
    c = r.get("cmds")
    return sum(c.values()) if c else None


def cmds_text(r, top=6):
    c = r.get("cmds")
    if not c:
        return "–"
    items = sorted(c.items(), key=lambda kv: -kv[1])
    parts = [f"{k} {v:.2f}" for k, v in items[:top] if v >= 0.005]
    if len(items) > top:
        rest = sum(v for _, v in items[top:])
        if rest >= 0.005:
            parts.append(f"others {rest:.2f}")
    return ", ".join(parts)


class Report:
    def __init__(self, args, results, memory, rb, peers_status, runner, started, wall, pgb=None):
        self.a = args
        self.pgb = pgb or []
        self.results = results
        self.memory = memory
        self.rb = rb
        self.peers_status = peers_status
        self.runner = runner
        self.started = started
        self.wall = wall
        self.behind = []
        self.ahead = []
        self.par = []

    def find(self, impl, backend, mode, tasks=None, procs=None):
        for r in self.results:
            if (r["impl"], r["backend"], r["mode"]) == (impl, backend, mode) and r["ok"] \
                    and (tasks is None or r["tasks"] == tasks) and (procs is None or r["procs"] == procs):
                return r
        return None

    def impls(self, backend):
        names = base_impls(backend)
        names += [p for p in PEERS_BY_BACKEND.get(backend, []) if self.peers_status.get(p) == "installed"]
        return names

    def judge(self, where, metric, fenced_v, other, other_v, lower_is_better, fmt):
        """Record a comparison of fenced with `other` for the summary sections."""
        if fenced_v is None or other_v is None or other_v == 0 or fenced_v == 0:
            return
        factor = fenced_v / other_v
        if lower_is_better:
            worse, better = factor > 1.1, factor < 1 / 1.1
        else:
            worse, better = factor < 1 / 1.1, factor > 1.1
        text = (f"{where}, {metric}: fenced {fmt(fenced_v)}, {other} {fmt(other_v)} "
                f"(fenced ÷ {other} = {factor:.2f}×)")
        if worse:
            self.behind.append((other, text))
        elif better:
            self.ahead.append((other, text))
        else:
            self.par.append((other, text))

    def write(self, path):
        a = self.a
        out = []
        w = out.append
        w("# fenced benchmarks\n")
        w(f"Generated by `scripts/bench{' --quick' if a.quick else ''}` on {self.started} "
          f"(the whole run took {self.wall / 60:.1f} min). Regenerate with:\n")
        w("```sh\nscripts/bench          # full run, about 5–8 minutes\n"
          "scripts/bench --quick  # smoke run, about a minute (numbers not for quoting; written to target/bench/BENCHMARKS.quick.md)\n```\n")
        if a.quick:
            w("**This is a quick smoke run: short windows, a subset of the modes. Do not quote these "
              "numbers.**\n")
        w("Every implementation is a command following [the bench protocol](bench/PROTOCOL.md), run by "
          "`bench/driver.py` one after the other on one machine, against servers started for the run "
          "on loopback: one Redis (no password, no persistence)"
          + (", one etcd node" if "etcd" in BACKENDS else "")
          + (", one ZooKeeper node" if "zookeeper" in BACKENDS else "")
          + (", one PostgreSQL server (fsync off, the test suite's)" if "postgres-lease" in BACKENDS else "")
          + (", one MariaDB server (the test suite's: InnoDB log flushed once a second, not at each commit)"
             if "mysql-lease" in BACKENDS else "")
          + (f", {max(REDLOCK_NODES[b] for b in BACKENDS if b in REDLOCK_NODES)} more Redis servers "
             "(the same settings) as independent Redlock nodes" if any(b in REDLOCK_NODES for b in BACKENDS) else "")
          + (f", a Redis Cluster of {a.cluster_primaries} primaries (no replicas, the same settings)"
             if CLUSTER in BACKENDS else "")
          + ". The benchmark processes and the servers share the same cores, so client CPU cost "
          "shows up as lower throughput.\n")
        w("- **fenced**: `fenced-bench --impl fenced`: the library as applications use it, one "
          "`Client` per process shared by its tasks, `lock_with` (wait up to 60 s) and "
          "`LockGuard::release`, lease renewed by the watchdog at its default (lease/3).\n"
          "- **floor**: `fenced-bench --impl floor`: the bare operations fenced needs, written directly "
          "with the same client library (redis-rs, rusqlite, tokio-postgres, mysql_async, a `Mutex<HashMap>`), with no fencing "
          "token on Redis, no renewal, no lost-lock signal, no retries. It is the cost of the store "
          "itself; what fenced adds on top is the price of its guarantees and of its code.\n"
          "- **peers**: other lock libraries, from `bench/peers/bin/` (see `bench/peers/README.md`), "
          "each on the store it is made for.\n")
        w(f"Settings: warm-up {a.warmup} s, measurement {a.duration} s per run, lease {a.lease_ms} ms, "
          f"hold {a.hold_ms} ms in hand-off runs. Latency = one acquire + release pair. "
          + ("Latency runs (1 task) pin the command and the Redis server to CPU 0 with `taskset`: on this "
             "VM, a single task talking to a server on the other core measured 2–3× slower in some runs "
             "than in others (the same binary, minutes apart); on one core the numbers repeat. "
             "Throughput and hand-off runs are not pinned. " if a.pin_cpu else "") +
          "Ratios are **fenced ÷ other**: for latencies above 1× means fenced is slower, for ops/s "
          "below 1× means fenced does less.\n")

        w("## Machine\n")
        w("| | |\n|---|---|")
        for k, v in machine(a):
            w(f"| {k} | {v} |")
        w("")

        for backend in BACKENDS:
            if backend not in REDLOCK_NODES and backend != CLUSTER:
                self.backend_section(w, backend)
        self.redlock_section(w)
        self.cluster_section(w)

        self.commands_section(w)
        self.rb_section(w)
        self.pgbench_section(w)
        self.memory_section(w)
        self.summary_section(w)
        self.settings_section(w)
        self.failures_section(w)
        w("## Commands run\n")
        w("`$RUN` is the run's scratch directory. Redis commands per acquisition: `INFO commandstats` "
          "before and after a stretch inside each measured window.\n")
        w("```text")
        for c in self.runner.commands:
            w(c)
        w("```\n")
        text = scrub(a, "\n".join(out))
        with open(path, "w") as f:
            f.write(text)

    def backend_section(self, w, backend, intro=None):
        title = {"memory": "In-process (memory://)", "sqlite": "SQLite (sqlite://, one file)",
                 "redis": "Redis (redis://, one server)", "etcd": "etcd (etcd://, one node)",
                 "zookeeper": "ZooKeeper (zk://, one node)",
                 "postgres-lease": "PostgreSQL, lease mode (postgres://, one server)",
                 "postgres-session": "PostgreSQL, session mode (postgres://…?mode=session, one server)",
                 "mysql-lease": "MySQL (MariaDB), lease mode (mysql://, one server)",
                 "mysql-session": "MySQL (MariaDB), session mode (mysql://…?mode=session, one server)",
                 "redlock-3": "Redlock over 3 nodes (redlock://, 3 independent Redis servers)",
                 "redlock-5": "Redlock over 5 nodes (redlock://, 5 independent Redis servers)",
                 CLUSTER: f"Redis Cluster ({self.a.cluster_primaries} primaries)"}[backend]
        w(f"## {title}\n")
        if intro:
            w(intro)
        tps = sorted({r["tasks"] for r in self.results if r["backend"] == backend and r["mode"] == "throughput"})
        impls = self.impls(backend)
        # Latency and throughput.
        w("*Latency*: one task, one key (" + ("not pinned" if backend in REDLOCK_NODES else
                                              "pinned to one core where noted above") +
          "). *N tasks*: throughput runs, each task over its own 16 keys, not pinned.\n")
        head = "| implementation | latency p50 | latency p99 | latency ops/s |" + "".join(
            f" {tasks_label(t)} ops/s | {tasks_label(t)} p99 |" for t in tps)
        if backend in COUNTED:
            head += " commands per acquisition |"
        w(head)
        w("|" + "---|" * (head.count("|") - 1))
        for impl in impls:
            lat = self.find(impl, backend, "latency")
            row = f"| {impl} | {us(lat and lat['p50'])} | {us(lat and lat['p99'])} | {rate(lat and lat['ops_per_s'])} |"
            for t in tps:
                r = self.find(impl, backend, "throughput", tasks=t)
                row += f" {rate(r and r['ops_per_s'])} | {us(r and r['p99'])} |"
            if backend in COUNTED:
                row += f" {cmds_total(lat) and f'{cmds_total(lat):.1f}' or '–'} |"
            w(row)
        w("")
        # Ratios.
        others = [i for i in impls if i != "fenced"]
        if others:
            head = "| fenced ÷ | latency p50 | latency p99 | latency ops/s |" + "".join(
                f" {tasks_label(t)} ops/s |" for t in tps)
            w(head)
            w("|" + "---|" * (head.count("|") - 1))
            f_lat = self.find("fenced", backend, "latency")
            for o in others:
                o_lat = self.find(o, backend, "latency")
                row = (f"| {o} | {ratio(div(f_lat and f_lat['p50'], o_lat and o_lat['p50']))} | "
                       f"{ratio(div(f_lat and f_lat['p99'], o_lat and o_lat['p99']))} | "
                       f"{ratio(div(f_lat and f_lat['ops_per_s'], o_lat and o_lat['ops_per_s']))} |")
                self.judge(f"{backend}, 1 task", "latency p50", f_lat and f_lat["p50"], o,
                           o_lat and o_lat["p50"], True, us)
                for t in tps:
                    f_r = self.find("fenced", backend, "throughput", tasks=t)
                    o_r = self.find(o, backend, "throughput", tasks=t)
                    row += f" {ratio(div(f_r and f_r['ops_per_s'], o_r and o_r['ops_per_s']))} |"
                    self.judge(f"{backend}, throughput {tasks_label(t)}", "ops/s", f_r and f_r["ops_per_s"], o,
                               o_r and o_r["ops_per_s"], False, lambda x: f"{rate(x)} ops/s")
                w(row)
            w("")
        # Hand-off.
        layouts = sorted({(r["procs"], r["tasks"]) for r in self.results
                          if r["backend"] == backend and r["mode"] == "handoff"}, key=lambda pt: pt[0] * pt[1])
        if not layouts:
            return
        if backend in REDLOCK_NODES:
            w("**Hand-off**: the same columns as on Redis above. A Redlock contender that gets fewer "
              "than a majority of the nodes gives back the ones it got and retries, so contenders can "
              "split the vote and all wait again.\n")
        else:
            w(f"**Hand-off** (processes × tasks on one key, each holding it {self.a.hold_ms} ms): hand-off "
              "latency is each grant minus the latest release before it, over all processes' events. "
              "*Cross-process* counts only grants whose previous holder was another process: the wake-up "
              "path through the store, without a task of the releasing process taking the lock again at "
              "once. *Grant share* is the smallest and largest share of the grants one process got.\n")
            w("With several tasks in one process, an implementation without a local FIFO queue (the "
              "floors, most peers) often gives the lock straight back to the task that just released it; "
              "its hand-off p50 then measures a re-acquire, not a waiter waking up, and the grant share "
              "shows whether other processes starve. fenced queues local waiters FIFO, so its hand-offs "
              "always go to another task. Compare the cross-process columns and grants/s. Grants/s is "
              "bounded by the hold (1 ms: at most about 1000/s); a command whose hold sleeps on Tokio's "
              "millisecond timer (`tokio::time::sleep`) holds close to 2 ms and shows about half.\n")
        if backend == "memory":
            w("The memory store lives inside one process, so all its waiters are tasks of one process "
              "and there are no cross-process hand-offs.\n")
        head = ("| implementation | waiters | grants/s | hand-off p50 | hand-off p99 | cross-process "
                "p50 | cross-process p99 | grant share |")
        if backend == "redis":
            head += " commands per grant |"
        w(head)
        w("|" + "---|" * (head.count("|") - 1))
        for pt in layouts:
            for impl in impls:
                r = self.find(impl, backend, "handoff", procs=pt[0], tasks=pt[1])
                if r is None:
                    failed = [x for x in self.results if (x["impl"], x["backend"], x["mode"], x["procs"], x["tasks"])
                              == (impl, backend, "handoff", pt[0], pt[1])]
                    if failed:
                        w(f"| {impl} | {pt[0]}×{pt[1]} | failed | | | | | |" + (" |" if backend == "redis" else ""))
                    continue
                share = "–" if r.get("share_min") is None or r["procs"] == 1 else \
                    f"{r['share_min'] * 100:.0f}–{r['share_max'] * 100:.0f}%"
                cross = f"{us(r['cross_p50'])} ({r['cross_n']})" if r["procs"] > 1 else "–"
                row = (f"| {impl} | {layout(r)} | {rate(r['grants_per_s'])} | {us(r['ho_p50'])} | "
                       f"{us(r['ho_p99'])} | {cross} | {us(r['cross_p99']) if r['procs'] > 1 else '–'} | {share} |")
                if backend == "redis":
                    row += f" {cmds_total(r) and f'{cmds_total(r):.1f}' or '–'} |"
                w(row)
        w("")
        w("Cross-process columns show the number of such hand-offs in brackets.\n")
        for pt in layouts:
            f_r = self.find("fenced", backend, "handoff", procs=pt[0], tasks=pt[1])
            for o in others:
                o_r = self.find(o, backend, "handoff", procs=pt[0], tasks=pt[1])
                where = f"{backend}, hand-off {pt[0]}×{pt[1]}"
                self.judge(where, "grants/s", f_r and f_r["grants_per_s"], o, o_r and o_r["grants_per_s"],
                           False, lambda x: f"{rate(x)}/s")
                # With several waiters in one process, an implementation without a local queue
                # mostly hands the lock back to the releasing task: its hand-off p50 is not a
                # wake-up and is not compared; cross-process hand-offs are.
                if pt[0] > 1 and f_r and o_r and f_r["cross_n"] >= 20 and o_r["cross_n"] >= 20:
                    self.judge(where, "cross-process hand-off p50", f_r["cross_p50"], o, o_r["cross_p50"], True, us)
                elif pt == (1, 1) and f_r and o_r:
                    self.judge(where, "release-to-grant p50", f_r["ho_p50"], o, o_r["ho_p50"], True, us)

    def redlock_section(self, w):
        """fenced on 3 and 5 Redlock nodes against its single-node Redis backend, then each
        Redlock backend's own section (fenced against the Redlock peers)."""
        backends = [b for b in BACKENDS if b in REDLOCK_NODES]
        if not backends:
            return
        w("## Redlock: fenced on several nodes against one node\n")
        w("fenced's Redlock backend (`redlock://127.0.0.1:P1,…/0`, URL defaults: `node_timeout` 100 ms) "
          "on 3 and on 5 independent Redis servers, against fenced's single-node Redis backend above. "
          "The goal: a grant costs about the slowest node's round trip, not the sum of them, so the "
          "ratios should stay near 1×, well below the node count. All nodes share this machine's "
          f"{os.cpu_count()} cores with the client, so their answers partly queue for a CPU; on separate "
          "machines the fan-out overlaps fully. Redlock latency runs are **not pinned** (N servers on "
          "one core would answer one after the other), the single-node latency run is (see above); "
          "the *1 task* row compares two unpinned runs (the single-node one only in a full run).\n")
        rows = [("latency p50", "latency", {}, "p50", us),
                ("latency p99", "latency", {}, "p99", us),
                ("1 task p50 (throughput run, 16 keys)", "throughput", {"tasks": 1}, "p50", us),
                ("16 tasks ops/s", "throughput", {"tasks": 16}, "ops_per_s", rate)]
        rows += [(f"hand-off {p}×{t} {label}", "handoff", {"procs": p, "tasks": t}, key, fmt)
                 for p, t in REDLOCK_HANDOFF_LAYOUTS
                 for label, key, fmt in (("grants/s", "grants_per_s", rate), ("cross-process p50", "cross_p50", us))]
        names = [f"Redlock, {REDLOCK_NODES[b]} nodes" for b in backends]
        head = "| fenced | Redis, 1 node | " + " | ".join(names) + " | " + " | ".join(
            f"{REDLOCK_NODES[b]} nodes ÷ 1 node" for b in backends) + " |"
        w(head)
        w("|" + "---|" * (head.count("|") - 1))
        for label, mode, where, key, fmt in rows:
            one = self.find("fenced", "redis", mode, **where)
            many = [self.find("fenced", b, mode, **where) for b in backends]
            w(f"| {label} | {fmt(one and one[key])} | " + " | ".join(fmt(r and r[key]) for r in many) + " | "
              + " | ".join(ratio(div(r and r[key], one and one[key])) for r in many) + " |")
        w("")
        for backend in backends:
            self.backend_section(w, backend)

    def cluster_section(self, w):
        """fenced and the floor on the Redis Cluster, then both against the single Redis server."""
        if CLUSTER not in BACKENDS:
            return
        n = self.a.cluster_primaries
        intro = (
            f"fenced's Redis Cluster backend (`redis+cluster://127.0.0.1:P1,…`, every primary a seed "
            f"node; cargo feature `redis-cluster`) and the floor on a cluster of {n} primaries without "
            "replicas, started for the run with the single Redis server's settings. The floor sends the "
            "single-node floor's bare commands (`SET key owner NX PX`, then the compare-and-delete "
            "`EVALSHA`) through redis-rs's async cluster connection, which routes each command to the "
            "primary of its key's slot. In the throughput runs each task goes over its own 16 keys, so "
            "the keys spread over the slots and every primary takes a share; the latency run uses one "
            f"key, so one primary. Latency runs pin the command and all {n} primaries to CPU 0 when "
            "`taskset` is there, like the single-node latency run; throughput runs are not pinned. "
            "Commands per acquisition are summed over the primaries.\n\n"
            f"**All {n} primaries share this {os.cpu_count()}-core machine with each other and with the "
            "benchmark process, so the cluster cannot show more aggregate throughput than one node "
            "here.** What these rows show is fenced's overhead on the cluster relative to the floor "
            "(fenced ÷ floor below), and what the cluster path costs against one server (the second "
            "table). None of the peers in bench/peers supports Redis Cluster (their commands connect "
            "to single servers by `redis://` URL), so there are no peer rows; no hand-off or memory "
            "runs on the cluster either.\n")
        self.backend_section(w, CLUSTER, intro)
        tps = sorted({r["tasks"] for r in self.results if r["backend"] == CLUSTER and r["mode"] == "throughput"})
        rows = [("latency p50", "latency", {}, "p50", us),
                ("latency ops/s", "latency", {}, "ops_per_s", rate)]
        for t in tps:
            rows += [(f"{tasks_label(t)} ops/s", "throughput", {"tasks": t}, "ops_per_s", rate),
                     (f"{tasks_label(t)} p99", "throughput", {"tasks": t}, "p99", us)]
        w("**On the cluster against one server.** *Cluster ÷ 1 node*: the same implementation on the "
          "cluster ÷ on the single Redis server above; for ops/s below 1× means less on the cluster.\n")
        head = ("| | fenced, 1 node | fenced, cluster | fenced: cluster ÷ 1 node | floor, 1 node | "
                "floor, cluster | floor: cluster ÷ 1 node |")
        w(head)
        w("|" + "---|" * (head.count("|") - 1))
        for label, mode, where, key, fmt in rows:
            row = f"| {label} |"
            for impl in ("fenced", "floor"):
                one = self.find(impl, "redis", mode, **where)
                many = self.find(impl, CLUSTER, mode, **where)
                row += (f" {fmt(one and one[key])} | {fmt(many and many[key])} | "
                        f"{ratio(div(many and many[key], one and one[key]))} |")
            w(row)
        row = "| commands per acquisition (latency run) |"
        for impl in ("fenced", "floor"):
            one, many = (cmds_total(r) if r else None for r in (self.find(impl, "redis", "latency"),
                                                                  self.find(impl, CLUSTER, "latency")))
            row += (f" {one and f'{one:.1f}' or '–'} | {many and f'{many:.1f}' or '–'} | "
                    f"{ratio(div(many, one))} |")
        w(row)
        w("")

    def commands_section(self, w):
        rows = [r for r in self.results if r["backend"] == "redis" and r["ok"] and r.get("cmds")]
        if not rows:
            return
        w("## Redis commands per acquisition\n")
        w("Every command the server ran per acquire + release pair (per grant in hand-off runs), "
          "including the commands run inside Lua scripts (`evalsha` is the script call itself; "
          "`hmget`, `set`, `del` … inside it count too). A count that grows with the number of "
          "waiters means waiting costs the server work (polling).\n")
        w("| implementation | run | total | breakdown |\n|---|---|---|---|")
        order = {n: i for i, n in enumerate(["fenced", "floor"] + PEERS)}
        rows.sort(key=lambda r: (order.get(r["impl"], 99), r["mode"], r["procs"] * r["tasks"]))
        for r in rows:
            run = r["mode"] if r["mode"] != "handoff" else f"hand-off {layout(r)}"
            if r["mode"] == "throughput":
                run = f"throughput {r['tasks']}"
            w(f"| {r['impl']} | {run} | {cmds_total(r):.2f} | {cmds_text(r)} |")
        w("")
        layouts = sorted({(r["procs"], r["tasks"]) for r in rows if r["mode"] == "handoff"},
                         key=lambda pt: pt[0] * pt[1])
        for pt in layouts[-1:]:
            f_r = self.find("fenced", "redis", "handoff", procs=pt[0], tasks=pt[1])
            for o in ["floor"] + PEERS:
                o_r = self.find(o, "redis", "handoff", procs=pt[0], tasks=pt[1])
                self.judge(f"redis, hand-off {pt[0]}×{pt[1]}", "server commands per grant",
                           cmds_total(f_r) if f_r else None, o, cmds_total(o_r) if o_r else None, True,
                           lambda x: f"{x:.1f}")
        f_lat = self.find("fenced", "redis", "latency")
        for o in ["floor"] + PEERS:
            o_lat = self.find(o, "redis", "latency")
            self.judge("redis, 1 task", "server commands per acquisition", cmds_total(f_lat) if f_lat else None, o,
                       cmds_total(o_lat) if o_lat else None, True, lambda x: f"{x:.1f}")

    def rb_section(self, w):
        if not self.rb:
            return
        w("## redis-benchmark on the same server\n")
        w(f"`redis-benchmark -c 1 -n {self.a.rb_requests} -r 1000000 --csv`: one client, one command "
          "at a time, random keys. A second floor: the server's own round trip for each bare command "
          "(an acquire + release pair needs at least a SET and a compare-and-delete). Pinned to one "
          "core with the server, like the latency runs, when `taskset` is there.\n")
        w("| command | requests/s | p50 | p99 |\n|---|---|---|---|")
        for r in self.rb:
            if "error" in r:
                w(f"| {r['name']} | failed: {r['error'][:80]} | | |")
            else:
                w(f"| {r['name']} | {rate(r['rps'])} | {r['p50_ms'] * 1000:.0f} µs | {r['p99_ms'] * 1000:.0f} µs |")
        w("")

    def pgbench_section(self, w):
        if not self.pgb:
            return
        w("## pgbench on the same server\n")
        w(f"`pgbench -n -M prepared -c 1 -T {max(1, round(self.a.duration))} -f SCRIPT`: one client, the "
          "floor's two statements per transaction on random keys (the scripts are `PGBENCH_SCRIPTS` in "
          "bench/driver.py). A second "
          "floor from PostgreSQL's own tool: one acquire + release pair as a bare libpq client sends it. "
          "Next to it the Rust floor's latency run (1 task, one key).\n")
        w("| statements | pgbench pairs/s | pgbench latency (mean) | floor ops/s | floor p50 | fenced ÷ pgbench, ops/s |")
        w("|---|---|---|---|---|---|")
        for r in self.pgb:
            if "error" in r:
                w(f"| {r['name']} | failed: {r['error'][:100]} | | | | |")
                continue
            fl = self.find("floor", r["backend"], "latency")
            fe = self.find("fenced", r["backend"], "latency")
            w(f"| {r['name']} | {rate(r['tps'])} | {us(r['lat_avg_ns'])} | {rate(fl and fl['ops_per_s'])} | "
              f"{us(fl and fl['p50'])} | {ratio(div(fe and fe['ops_per_s'], r['tps']))} |")
        w("")

    def memory_section(self, w):
        if not self.memory:
            return
        w("## Memory per held lock (fenced)\n")
        w(f"`fenced-bench --mode memory`: one client holds N locks on distinct keys with renewal on "
          f"(lease {self.a.memory_lease_ms} ms, renewed every lease/3), waits until every lock was "
          "renewed once, and compares the process's RSS (`VmRSS`) before and after. Includes the "
          "`LockGuard`s the application keeps. Each held lock has its own watchdog task.\n")
        w("| backend | locks | held | time to acquire all | renewed once | lost | RSS before | RSS after | bytes per lock | tokio tasks |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for m in self.memory:
            if not m.get("ok"):
                w(f"| {m['backend']} | {m['count']} | failed: {m.get('error', '')[:120]} | | | | | | | |")
                continue
            w(f"| {m['backend']} | {m['count']} | {m['held']} | {m['acquire_s']:.2f} s | {m['renewed']} "
              f"(after {m['renewal_wait_s']:.1f} s) | {m['lost']} | {m['rss_before_kib'] / 1024:.1f} MiB | "
              f"{m['rss_after_kib'] / 1024:.1f} MiB | {m['bytes_per_lock']} | {m['tokio_tasks_after']} |")
        w("")
        for m in self.memory:
            if m.get("ok") and (m["held"] < m["count"] or m["lost"] or m["renewed"] < m["held"]):
                w(f"- **{m['backend']}, {m['count']} locks: did not keep up**: {m['held']} of {m['count']} "
                  f"acquired within the time limit, {m['renewed']} renewed, {m['lost']} lost.")
        w("")

    def summary_section(self, w):
        w("## Where fenced is behind\n")
        w("Generated from the tables above: every comparison where fenced is more than 10% worse. "
          "Against the floor this is expected (the floor has no fencing token, renewal, lost signal "
          "or retries); the size of the gap is the point.\n")
        if not self.behind:
            w("- nowhere by more than 10%.\n")
        for other, text in self.behind:
            w(f"- {text}")
        w("")
        w("## Where fenced is ahead\n")
        if not self.ahead:
            w("- nowhere by more than 10%.\n")
        for other, text in self.ahead:
            w(f"- {text}")
        w("")
        if self.par:
            w("Within 10% of each other: " + "; ".join(t for _, t in self.par) + ".\n")

    def settings_section(self, w):
        w("## Settings of each implementation\n")
        w("As each command reported them (`settings` of its JSON line, first run on each backend).\n")
        seen = {}
        for r in self.results:
            if not r["ok"]:
                continue
            key = (r["impl"], r["backend"], r.get("settings", ""))
            seen.setdefault(key, []).append("hand-off" if r["mode"] == "handoff" else r["mode"])
            if len(seen[key]) == 1:
                seen[key].insert(0, r.get("version", "?"))
        for (impl, backend, settings), modes in seen.items():
            kinds = ", ".join(dict.fromkeys(modes[1:]))
            w(f"- **{impl}** on {backend} ({kinds}; version {modes[0]}): {settings}")
        w("")

    def failures_section(self, w):
        w("## Peers not installed, runs that failed\n")
        lines = []
        for p in PEERS:
            if self.peers_status.get(p) != "installed":
                lines.append(f"- {p}: {self.peers_status.get(p, 'not installed')}")
        for r in self.results:
            if not r["ok"]:
                lines.append(f"- {r['impl']} {r['backend']} {r['mode']} {layout(r)}: failed: {r.get('error', '')}")
        for m in self.memory:
            if not m.get("ok"):
                lines.append(f"- memory mode {m['backend']} {m['count']}: failed: {m.get('error', '')}")
        w("\n".join(lines) if lines else "- none: every peer was installed and every run completed.")
        w("")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True)
    ap.add_argument("--bench-bin", required=True)
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peers-install", default="", help="outcome of bench/peers/install")
    ap.add_argument("--redis-pid", type=int, default=0, help="pinned to CPU 0 during latency runs")
    ap.add_argument("--render", help="only write the report from this results.json of an earlier run")
    ap.add_argument("--etcd-url", default="", help="an etcd node for this run (no etcd rows without it)")
    ap.add_argument("--zk-url", default="", help="a ZooKeeper node for this run (no ZooKeeper rows without it)")
    ap.add_argument("--pg-url", default="",
                    help="postgres://user:pw@host:port/db of a PostgreSQL server for this run, without parameters "
                         "(no PostgreSQL rows without it); both modes run on it")
    ap.add_argument("--redlock-ports", default="",
                    help="P1,P2,P3,P4,P5: independent Redis servers on 127.0.0.1 without password for the "
                         "Redlock runs (redlock-3 on the first 3, redlock-5 on all 5; none without it)")
    ap.add_argument("--cluster-ports", default="",
                    help="P1,P2,P3: the primaries of a Redis Cluster on 127.0.0.1 without password and "
                         "without replicas (no Redis Cluster rows without it)")
    ap.add_argument("--mysql-url", default="",
                    help="mysql://user:pw@host:port/db of a MySQL or MariaDB server for this run, without "
                         "parameters (no MySQL rows without it); both modes run on it")
    args = ap.parse_args()
    args.redlock_ports = [int(p) for p in args.redlock_ports.split(",") if p.strip()]
    args.cluster_ports = [int(p) for p in args.cluster_ports.split(",") if p.strip()]
    args.cluster_primaries = len(args.cluster_ports)
    BACKENDS[:] = [b for b in ALL_BACKENDS if (b != "etcd" or args.etcd_url) and (b != "zookeeper" or args.zk_url)
                   and (not b.startswith("postgres") or args.pg_url)
                   and (not b.startswith("mysql") or args.mysql_url)
                   and len(args.redlock_ports) >= REDLOCK_NODES.get(b, 0)
                   and (b != CLUSTER or args.cluster_ports)]
    args.pin_cpu = bool(args.redis_pid) and (os.cpu_count() or 1) > 1 and \
        subprocess.run(["sh", "-c", "command -v taskset"], capture_output=True).returncode == 0
    args.sqlite_dir = os.path.join(args.run_dir, "sqlite")
    os.makedirs(args.sqlite_dir, exist_ok=True)
    args.lease_ms = 10000
    args.hold_ms = 1
    if args.quick:
        args.warmup, args.duration = 0.3, 1.0
        throughput_tasks = [16]
        handoff_layouts = [(2, 8)]
        memory_counts = [10000]
        args.memory_lease_ms, args.memory_limit = 3000, 20
        args.rb_requests = 5000
    else:
        args.warmup, args.duration = 1.0, 3.0
        throughput_tasks = [1, 16, 64]
        handoff_layouts = [(1, 1), (2, 8), (4, 64)]
        memory_counts = [10000, 100000]
        args.memory_lease_ms, args.memory_limit = 30000, 60
        args.rb_requests = 50000

    if args.render:
        # Writes the report again from a results.json of an earlier run (no measurement).
        saved = json.load(open(args.render))
        BACKENDS[:] = [b for b in ALL_BACKENDS if any(r["backend"] == b for r in saved["results"])]
        for k, v in saved["settings"].items():
            setattr(args, k, v)
        runner = Runner.__new__(Runner)
        runner.commands = saved["commands"]
        Report(args, saved["results"], saved["memory"], saved["redis_benchmark"], saved["peers_status"],
               runner, saved["started"], saved["wall"], saved.get("pgbench")).write(args.out)
        log(f"wrote {args.out} from {args.render}")
        return

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    runner = Runner(args)
    peers_status = {}
    for p in PEERS:
        path = os.path.join(args.root, "bench/peers/bin", p)
        if not os.access(path, os.X_OK):
            peers_status[p] = "not installed (no bench/peers/bin/%s)" % p
        elif args.peers_install.startswith("failed"):
            peers_status[p] = f"not installed: bench/peers/install {args.peers_install}"
        else:
            peers_status[p] = "installed"

    results = []

    def go(impl, backend, mode, procs, tasks):
        what = f"{impl} {backend} {mode} {procs}×{tasks}"
        r = runner.measure(impl, backend, mode, procs, tasks)
        if r["ok"]:
            extra = (f"p50 {us(r.get('p50'))}" if mode != "handoff" else
                     f"hand-off p50 {us(r.get('ho_p50'))}, cross {us(r.get('cross_p50'))}")
            cmds = f", {cmds_total(r):.1f} cmds/op" if r.get("cmds") else ""
            log(f"{what}: {rate(r['ops_per_s'])} ops/s, {extra}{cmds}")
        else:
            log(f"{what}: FAILED: {r['error']}")
        results.append(r)

    for backend in BACKENDS:
        impls = base_impls(backend)
        impls += [p for p in PEERS_BY_BACKEND.get(backend, []) if peers_status[p] == "installed"]
        layouts = [(1, p * t) for p, t in handoff_layouts] if backend == "memory" else handoff_layouts
        tps = throughput_tasks
        if backend in REDLOCK_NODES:
            tps, layouts = REDLOCK_THROUGHPUT_TASKS, REDLOCK_HANDOFF_LAYOUTS
        if backend == CLUSTER:
            layouts = []
        for impl in impls:
            go(impl, backend, "latency", 1, 1)
            for t in tps:
                go(impl, backend, "throughput", 1, t)
            for procs, tasks in layouts:
                go(impl, backend, "handoff", procs, tasks)

    log("redis-benchmark")
    rb = redis_benchmark(runner)
    pgb = []
    if args.pg_url:
        log("pgbench")
        pgb = pgbench(runner)
        for r in pgb:
            log(f"pgbench {r['name']}: " + (f"{rate(r['tps'])} pairs/s" if "tps" in r else f"FAILED: {r['error']}"))
    memory = []
    for backend in (b for b in BACKENDS if b not in REDLOCK_NODES and b != CLUSTER):
        # Consensus stores write every grant to a synced log: 100k grants take minutes there.
        counts = memory_counts if backend in ("memory", "sqlite", "redis") else memory_counts[:1]
        for count in counts:
            m = runner.memory(backend, count)
            log(f"memory {backend} {count}: " + (f"{m['bytes_per_lock']} bytes/lock, {m['held']} held, "
                                                 f"{m['renewed']} renewed, {m['lost']} lost" if m["ok"] else
                                                 f"FAILED: {m['error']}"))
            memory.append(m)

    wall = time.monotonic() - t0
    report = Report(args, results, memory, rb, peers_status, runner, started, wall, pgb)
    report.write(args.out)
    with open(os.path.join(args.run_dir, "results.json"), "w") as f:
        json.dump({"results": results, "memory": memory, "redis_benchmark": rb, "pgbench": pgb,
                   "peers_status": peers_status, "commands": runner.commands, "started": started,
                   "wall": wall, "settings": {k: getattr(args, k) for k in RENDER_SETTINGS}}, f, indent=1)
    log(f"wrote {args.out} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
