"""`etcdctl lock <name> <command>` (etcd's own lock recipe, from its command-line client) under the
bench protocol: one etcdctl process per acquisition, one thread per concurrent client."""

import os
import shutil
import subprocess
import sys
import tempfile

import benchproto as bp


class Lock:
    """One lock name; `proc` is the etcdctl process while it holds the lock."""

    def __init__(self, key, fifo):
        self.key = key
        self.fifo = fifo
        self.proc = None


def parse_args():
    """The protocol's arguments; the shared parser checks for redis:// URLs, so the etcd URL is
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


def main():
    args = parse_args()
    if not args.url.startswith("etcd://"):
        bp.die(f"etcdctl-lock takes etcd://host:port, not {args.url}")
    endpoint = args.url[len("etcd://"):].split("/")[0].split("?")[0]
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        bp.die("etcdctl is not installed (Debian package etcd-client)")
    version = subprocess.run([etcdctl, "version"], capture_output=True, text=True,
                             env={"ETCDCTL_API": "3"}).stdout.split("\n")[0].replace("etcdctl version: ", "")
    ttl = max(2, -(-args.lease_ms // 1000))
    base = [etcdctl, f"--endpoints={endpoint}", "lock", f"--ttl={ttl}"]
    settings = (
        "etcdctl lock NAME COMMAND (etcd's concurrency.Mutex: a session lease per process, the waiter "
        "watches its predecessor key); every acquisition spawns one etcdctl process, which connects, "
        "grants its session lease, locks, runs the command (here: a shell that prints when granted and exits on a line "
        "from this driver through a FIFO), then unlocks and revokes the lease on "
        f"exit; process start-up and connection are inside every measured pair; --ttl {ttl} s from "
        "--lease-ms (rounded up, at least 2 s); one thread per concurrent client"
    )

    scratch = tempfile.mkdtemp(prefix="etcdctl-lock-")
    made = []

    def make_lock(key):
        # The command under the lock cannot read etcdctl's stdin, so it waits on a FIFO.
        fifo = os.path.join(scratch, f"release-{len(made)}")
        os.mkfifo(fifo)
        made.append(fifo)
        return Lock(key, fifo)

    def acquire(lk):
        lk.proc = subprocess.Popen(
            base + [lk.key, "--", "sh", "-c", 'echo granted; read line < "$0"', lk.fifo],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}, text=True)
        line = lk.proc.stdout.readline()
        if line.strip() != "granted":
            err = lk.proc.stderr.read()
            lk.proc.wait()
            lk.proc = None
            raise RuntimeError(f"etcdctl lock failed: {err.strip() or line.strip()}")
        return True

    def release(lk):
        proc, lk.proc = lk.proc, None
        with open(lk.fifo, "w") as release_line:
            release_line.write("\n")
        code = proc.wait()
        if code != 0:
            raise RuntimeError(f"etcdctl lock exited with {code}: {proc.stderr.read().strip()}")

    try:
        bp.run_threads(args, "etcdctl lock", version, settings, make_lock, acquire, release)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
