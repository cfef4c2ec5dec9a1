# Shared helpers for the fenced scripts. Source this file; do not run it.
# shellcheck shell=bash

FENCED_RUN_DIR="${FENCED_RUN_DIR:-}"
FENCED_PIDS=()

log() { printf '[fenced-scripts] %s\n' "$*" >&2; }
die() { printf '[fenced-scripts] ERROR: %s\n' "$*" >&2; exit 1; }

# A scratch directory for this run, removed on exit.
run_dir() {
  if [[ -z "$FENCED_RUN_DIR" ]]; then
    FENCED_RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/fenced-run.XXXXXX")"
  fi
  printf '%s' "$FENCED_RUN_DIR"
}

# Stops every server this run started and removes the scratch directory.
cleanup() {
  local pid
  for pid in "${FENCED_PIDS[@]:-}"; do
    [[ -n "$pid" ]] || continue
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${FENCED_PIDS[@]:-}"; do
    [[ -n "$pid" ]] || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ -n "$FENCED_RUN_DIR" && -d "$FENCED_RUN_DIR" && -z "${FENCED_KEEP_RUN_DIR:-}" ]]; then
    rm -rf "$FENCED_RUN_DIR"
  fi
}

install_cleanup_trap() {
  # Create the scratch directory here, in the main shell: `$(run_dir)` runs in a subshell and
  # could not set FENCED_RUN_DIR for later calls.
  FENCED_RUN_DIR="$(run_dir)"
  trap cleanup EXIT
  trap 'log "interrupted"; exit 130' INT
  trap 'log "terminated"; exit 143' TERM
}

# A TCP port that is free on 127.0.0.1 right now.
free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

# Installs the Debian packages named, if a command they provide is missing.
# Usage: need_packages "cmd:package" ...
need_packages() {
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd="${pair%%:*}"; pkg="${pair#*:}"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ "$(id -u)" != 0 ]]; then
    die "missing packages: ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "could not install ${missing[*]}"
  fi
}

# Waits until the command succeeds, at most $1 seconds.
wait_for() {
  local seconds="$1"; shift
  local i
  for i in $(seq $((seconds * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

# tls_material <dir> <server name>: a throwaway CA and a server certificate for
# localhost/127.0.0.1 in <dir> (ca.crt, server.crt, server.key).
tls_material() {
  local dir="$1" what="$2"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 \
      -subj "/CN=fenced $what test CA" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
      -subj "/CN=localhost" >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
      -days 2 -extfile san.ext >/dev/null 2>&1
  ) || die "could not create TLS certificates for $what in $dir"
}
