'use strict';
// npm redlock under the bench protocol (bench/PROTOCOL.md): one ioredis client for the one server
// of a redis:// URL, or one per node of a redlock://host:port,host:port,.../db URL (Redlock over
// all of them). Concurrency is N async loops on the one event loop, all sharing the client
// connections.
//
// Measured window: --warmup seconds after the loops start, then --duration seconds. An
// acquire+release pair counts when it starts and ends inside the window; no new pair starts
// after it. In handoff, grants are written (and counted) inside the window; releases are written
// for the whole run, so every grant in the window finds the release before it.

const fs = require('fs');
const path = require('path');

const GRACE_MS = 1000; // after the window, waiters get this long to come out, then we exit

function die(msg, code = 1) {
  process.stderr.write(`error: ${msg}\n`);
  process.exit(code);
}

function usage(msg) {
  die(`${msg}\nusage: node-redlock --url URL --mode latency|throughput|handoff --concurrency N ` +
    '--duration SECS --prefix PREFIX [--warmup SECS] [--lease-ms MS] [--hold-ms MS] [--events FILE]', 2);
}

function parseArgs(argv) {
  const a = { concurrency: 1, warmup: 1, leaseMs: 10000, holdMs: 1 };
  const names = {
    '--url': 'url', '--mode': 'mode', '--concurrency': 'concurrency', '--duration': 'duration',
    '--prefix': 'prefix', '--warmup': 'warmup', '--lease-ms': 'leaseMs', '--hold-ms': 'holdMs',
    '--events': 'events',
  };
  const numeric = new Set(['concurrency', 'duration', 'warmup', 'leaseMs', 'holdMs']);
  for (let i = 0; i < argv.length; i++) {
    let flag = argv[i];
    let value;
    const eq = flag.indexOf('=');
    if (eq >= 0) { value = flag.slice(eq + 1); flag = flag.slice(0, eq); }
    const name = names[flag];
    if (!name) usage(`unknown argument ${flag}`);
    if (value === undefined) {
      if (i + 1 >= argv.length) usage(`${flag} needs a value`);
      value = argv[++i];
    }
    if (numeric.has(name)) {
      const v = Number(value);
      if (!Number.isFinite(v)) usage(`${flag}: not a number: ${value}`);
      a[name] = v;
    } else {
      a[name] = value;
    }
  }
  for (const req of ['url', 'mode', 'duration', 'prefix']) {
    if (a[req] === undefined) usage(`--${req} is required`);
  }
  if (!['latency', 'throughput', 'handoff'].includes(a.mode)) usage(`unknown mode ${a.mode}`);
  if (!(a.concurrency >= 1 && a.duration > 0 && a.warmup >= 0 && a.leaseMs > 0 && a.holdMs >= 0)) {
    usage('--concurrency, --duration and --lease-ms must be positive, --warmup and --hold-ms not negative');
  }
  if (a.url.startsWith('redlock://')) {
    a.nodeUrls = redlockNodeUrls(a.url);
  } else if (a.url.startsWith('redis://')) {
    a.nodeUrls = [a.url];
  } else {
    usage('only redis:// and redlock://host:port,host:port,.../db URLs are supported');
  }
  if (a.mode === 'handoff' && !a.events) usage('--mode handoff needs --events FILE');
  if (a.mode === 'latency') a.concurrency = 1;
  a.concurrency = Math.floor(a.concurrency);
  return a;
}

// redlock://[cred@]h:p,[cred@]h:p,.../db[?params] -> one redis://[cred@]h:p/db per node (the query,
// fenced's parameters, is ignored).
function redlockNodeUrls(url) {
  const rest = url.slice('redlock://'.length).split('?')[0];
  const slash = rest.indexOf('/');
  const nodes = slash >= 0 ? rest.slice(0, slash) : rest;
  const db = (slash >= 0 ? rest.slice(slash + 1) : '') || '0';
  return nodes.split(',').filter((n) => n).map((n) => `redis://${n}/${db}`);
}

function pkgVersion(name) {
  // the package.json of the module actually loaded
  let dir = path.dirname(require.resolve(name));
  for (;;) {
    const p = path.join(dir, 'package.json');
    if (fs.existsSync(p)) {
      const pkg = JSON.parse(fs.readFileSync(p, 'utf8'));
      if (pkg.name === name) return pkg.version;
    }
    const up = path.dirname(dir);
    if (up === dir) return 'unknown';
    dir = up;
  }
}

const nowNs = () => process.hrtime.bigint(); // CLOCK_MONOTONIC
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function percentile(sorted, q) {
  if (sorted.length === 0) return 0;
  const rank = Math.ceil(q * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const Redis = require('ioredis');
  const Redlock = require('redlock');

  let lastError = null;
  const clients = [];
  for (const url of a.nodeUrls) {
    const client = new Redis(url, { lazyConnect: true });
    client.on('error', (e) => { lastError = e; });
    try {
      await client.connect();
      await client.ping();
    } catch (e) {
      die(`cannot reach ${url}: ${e.message}`);
    }
    clients.push(client);
  }

  const handoff = a.mode === 'handoff';
  const redlock = new Redlock(clients, handoff ? { retryCount: -1 } : {});
  const nodes = clients.length;
  const settings =
    (nodes === 1
      ? `redlock with one ioredis client (one connection shared by ${a.concurrency} async loops); `
      : `redlock over ${nodes} nodes (quorum ${Math.floor(nodes / 2) + 1}), one ioredis client per node ` +
        `(each one connection shared by ${a.concurrency} async loops); `) +
    `a waiting acquire retries the lock script after retryDelay ${redlock.retryDelay} ms ` +
    `+/- retryJitter ${redlock.retryJitter} ms (library defaults), driftFactor ${redlock.driftFactor}; ` +
    (handoff
      ? 'changed: retryCount -1 (unlimited; the default of 10 tries gives up after about 2 s); '
      : `retryCount ${redlock.retryCount} (library default; uncontended here); `) +
    `ttl ${a.leaseMs} ms from --lease-ms; a failed try also runs the unlock script`;

  const n = a.concurrency;
  const hold = a.holdMs;
  const ms = nowNs() + BigInt(Math.round(a.warmup * 1e9));
  const me = ms + BigInt(Math.round(a.duration * 1e9));
  const lat = [];
  const events = []; // [ns bigint, 'grant' | 'release']
  let errors = 0;
  let grants = 0;
  const fail = (e) => {
    if (nowNs() >= ms) errors++;
    lastError = e;
  };
  redlock.on('clientError', fail);

  function keysFor(i) {
    if (a.mode === 'latency') return [`${a.prefix}:lat`];
    if (a.mode === 'throughput') return Array.from({ length: 16 }, (_, k) => `${a.prefix}:tp:${i}:${k}`);
    return [`${a.prefix}:handoff`];
  }

  async function pairLoop(i) {
    const keys = keysFor(i);
    for (let k = 0; ; k++) {
      const t0 = nowNs();
      if (t0 >= me) return;
      let lock;
      try {
        lock = await redlock.lock(keys[k % keys.length], a.leaseMs);
      } catch (e) { fail(e); continue; }
      try {
        await lock.unlock();
      } catch (e) { fail(e); continue; }
      const t1 = nowNs();
      if (t0 >= ms && t1 <= me) lat.push(Number(t1 - t0));
    }
  }

  async function handoffLoop(i) {
    const key = keysFor(i)[0];
    while (nowNs() < me) {
      let lock;
      try {
        lock = await redlock.lock(key, a.leaseMs);
      } catch (e) { fail(e); continue; }
      const g = nowNs();
      if (g <= me) {
        if (g >= ms) { events.push([g, 'grant']); grants++; }
        if (hold > 0) await sleep(hold);
      }
      events.push([nowNs(), 'release']);
      try {
        await lock.unlock();
      } catch (e) { fail(e); }
    }
  }

  const loops = Array.from({ length: n }, (_, i) => (handoff ? handoffLoop(i) : pairLoop(i)));
  const leftMs = Math.max(0, Number(me - nowNs()) / 1e6) + GRACE_MS;
  let timer;
  const incomplete = await Promise.race([
    Promise.all(loops).then(() => false),
    new Promise((r) => { timer = setTimeout(() => r(true), leftMs); }),
  ]);
  clearTimeout(timer);

  lat.sort((x, y) => x - y);
  const ops = handoff ? grants : lat.length;
  const out = {
    impl: 'node-redlock', version: pkgVersion('redlock'), mode: a.mode, concurrency: n,
    ops, errors, elapsed_s: Number(me - ms) / 1e9,
  };
  if (!handoff) {
    out.lat_ns = {
      p50: percentile(lat, 0.5), p99: percentile(lat, 0.99), max: lat.length ? lat[lat.length - 1] : 0,
      mean: lat.length ? Math.round(lat.reduce((s, x) => s + x, 0) / lat.length) : 0,
    };
  }
  out.settings = settings + `; ioredis ${pkgVersion('ioredis')}`;

  let code = 0;
  if (handoff) {
    events.sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0));
    try {
      fs.writeFileSync(a.events, events.map(([ns, kind]) => `${kind} ${ns}\n`).join(''));
    } catch (e) {
      process.stderr.write(`error: cannot write events file ${a.events}: ${e.message}\n`);
      code = 1;
    }
  }
  // In a hand-off run, a process the lock never reached is a result (starvation), not a failure.
  if (ops === 0 && (a.mode !== 'handoff' || errors > 0)) {
    process.stderr.write('error: no operation completed in the measured window' +
      (lastError ? ` (last error: ${lastError.message || lastError})` : '') + '\n');
    code = 1;
  }
  if (incomplete) {
    process.stderr.write('note: some loops were still waiting in acquire after the grace period; exiting anyway\n');
  }
  // Loops still waiting in acquire (retry timers) must not keep the process alive.
  process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(code));
}

main().catch((e) => die(e && e.stack ? e.stack : String(e)));
