# Starts throwaway multi-node Redis set-ups on loopback (free ports, no persistence, data and logs
# in the run directory, one random password per set-up; the passwords are never logged):
#   - start_redlock_nodes: 5 independent servers for Redlock (tests take the first 3 for 3-node
#     runs):
#       FENCED_TEST_REDLOCK_URL         redlock://:PASSWORD@127.0.0.1:P1,127.0.0.1:P2,…,127.0.0.1:P5
#   - start_redis_cluster [--replicas N] [--no-password]: a Redis Cluster of 3 primaries with 1
#     replica each (N each with --replicas; 0 for none), seeded by the primaries; also sets
#     REDIS_HA_CLUSTER_PRIMARIES (the primaries' ports):
#       FENCED_TEST_REDIS_CLUSTER_URL   redis+cluster://:PASSWORD@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
#     (redis+cluster://127.0.0.1:P1,… with --no-password)
#   - start_redis_sentinel: a primary with 2 replicas, watched by 3 Sentinels under the name
#     `fenced` (quorum 2; the Sentinels themselves take no password):
#       FENCED_TEST_REDIS_SENTINEL_URL    redis+sentinel://:PASSWORD@127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/fenced
#       FENCED_TEST_REDIS_REPLICATED_URL  redis://:PASSWORD@127.0.0.1:PRIMARY/0 — that primary
# Needs common.sh. Set FENCED_KEEP_RUN_DIR=1 to keep the logs after the run.
# shellcheck shell=bash

# redis_ha_die <what> <log file> <message>: dies naming the server, its log and its last lines.
redis_ha_die() {
  local what="$1" logfile="$2" message="$3" last
  last="$(tail -n 8 "$logfile" 2>/dev/null | sed 's/^/    /' || true)"
  die "$what: $message; log: $logfile${last:+; last lines:
$last}"
}

# redis_ha_cli <port> <password> <redis-cli arguments…>: one command to 127.0.0.1:<port>
# (an empty password: no AUTH, as for Sentinels), given up after 5 s so that a hung server
# cannot hang the waits.
redis_ha_cli() {
  local port="$1" password="$2"; shift 2
  if [[ -n "$password" ]]; then
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" --no-auth-warning -a "$password" "$@"
  else
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@"
  fi
}

# redis_ha_field <port> <password> <INFO section> <field>: a field of INFO, without the \r.
redis_ha_field() {
  redis_ha_cli "$1" "$2" info "$3" 2>/dev/null | tr -d '\r' | sed -n "s/^$4://p"
}

# redis_ha_cluster_port: a free port on 127.0.0.1 whose cluster bus port (port + 10000) exists
# and is free as well.
redis_ha_cluster_port() {
  python3 - <<'PY'
import socket, sys
held = []
try:
    for _ in range(500):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        held.append(s)  # hold it, so that the next bind picks another port
        if port + 10000 > 65535:
            continue
        bus = socket.socket()
        try:
            bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        finally:
            bus.close()
        print(port)
        sys.exit(0)
    sys.exit(1)
finally:
    for s in held:
        s.close()
PY
}

# redis_ha_pong <pid> <port> <password>: the process is alive and answers PING with PONG; exits
# 2 (stop waiting) when the process is gone.
redis_ha_pong() {
  kill -0 "$1" 2>/dev/null || return 2
  [[ "$(redis_ha_cli "$2" "$3" ping 2>/dev/null)" == PONG ]]
}

# redis_ha_wait_up <seconds> <pid> <port> <password>: waits until the server answers, at most
# <seconds>, giving up at once when its process exits.
redis_ha_wait_up() {
  local seconds="$1" i rc
  for i in $(seq $((seconds * 10))); do
    rc=0; redis_ha_pong "$2" "$3" "$4" || rc=$?
    [[ $rc -eq 0 ]] && return 0
    [[ $rc -eq 2 ]] && return 1
    sleep 0.1
  done
  return 1
}

# redis_ha_stop <pid>: stops a server that did not come up, so that a retry can reuse its
# directory (a cluster node locks its config file).
redis_ha_stop() {
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}

# Nodes that are or may become primaries get --repl-diskless-sync-delay 0: by default a primary
# waits 5 s for more replicas before it starts a full sync, which would slow every start and
# every fail-over.

# redis_ha_node <dir> <what> <password> <cluster: yes|no> [redis-server arguments…]: starts one
# redis-server with its data and log (redis.log) in <dir>, on a free loopback port (with cluster
# yes, one whose bus port is free too); sets NODE_PORT and NODE_PID.
redis_ha_node() {
  local dir="$1" what="$2" password="$3" cluster="$4" attempt port pid
  shift 4
  mkdir -p "$dir"
  for attempt in 1 2 3; do
    if [[ "$cluster" == yes ]]; then
      port="$(redis_ha_cluster_port)" || die "$what: found no free port pair (port, port + 10000) on 127.0.0.1"
    else
      port="$(free_port)"
    fi
    rm -f "$dir/nodes.conf"
    redis-server --bind 127.0.0.1 --port "$port" --requirepass "$password" \
      --save '' --appendonly no --dir "$dir" --logfile "$dir/redis.log" --daemonize no "$@" \
      >>"$dir/redis.log" 2>&1 &
    pid=$!
    FENCED_PIDS+=("$pid")
    if redis_ha_wait_up 10 "$pid" "$port" "$password"; then
      NODE_PORT="$port"
      NODE_PID="$pid"
      return 0
    fi
    log "$what did not start on port $port (attempt $attempt): $(tail -n 3 "$dir/redis.log" 2>/dev/null)"
    redis_ha_stop "$pid"
  done
  redis_ha_die "$what" "$dir/redis.log" "did not start (3 attempts)"
}

redis_ha_version() { redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'; }

# ── Redlock ──────────────────────────────────────────────────────────────────────────────────

start_redlock_nodes() {
  need_packages "redis-server:redis-server" "redis-cli:redis-tools" "openssl:openssl"
  local password n ports=() seeds=() started=$SECONDS
  password="$(openssl rand -hex 16)"
  for n in 1 2 3 4 5; do
    redis_ha_node "$(run_dir)/redlock-$n" "redis (redlock node $n)" "$password" no
    ports+=("$NODE_PORT")
    seeds+=("127.0.0.1:$NODE_PORT")
  done
  export FENCED_TEST_REDLOCK_URL="redlock://:${password}@$(IFS=,; printf '%s' "${seeds[*]}")"
  log "redis $(redis_ha_version): 5 independent Redlock nodes on 127.0.0.1 ports ${ports[*]} ($((SECONDS - started))s)"
}

# ── Redis Cluster ────────────────────────────────────────────────────────────────────────────

# redis_ha_cluster_ready <password> <replicas per primary> <port…>: every node sees a healthy
# cluster of all the nodes given and every replica's link to its primary is up; otherwise sets
# REDIS_HA_NOT_READY (and REDIS_HA_BAD_PORT, the node at fault, if one is).
redis_ha_cluster_ready() {
  local password="$1" per="$2" port info role masters=0 replicas=0
  shift 2
  REDIS_HA_BAD_PORT=""
  for port in "$@"; do
    REDIS_HA_BAD_PORT="$port"
    info="$(redis_ha_cli "$port" "$password" cluster info 2>/dev/null | tr -d '\r')"
    if ! grep -qx 'cluster_state:ok' <<<"$info"; then
      REDIS_HA_NOT_READY="node 127.0.0.1:$port: $(grep -E '^cluster_state:' <<<"$info" || echo 'no answer to CLUSTER INFO')"
      return 1
    fi
    if ! grep -qx "cluster_known_nodes:$#" <<<"$info"; then
      REDIS_HA_NOT_READY="node 127.0.0.1:$port: $(grep -E '^cluster_known_nodes:' <<<"$info") (want $#)"
      return 1
    fi
    role="$(redis_ha_field "$port" "$password" replication role)"
    case "$role" in
      master) masters=$((masters + 1)) ;;
      slave)
        replicas=$((replicas + 1))
        if [[ "$(redis_ha_field "$port" "$password" replication master_link_status)" != up ]]; then
          REDIS_HA_NOT_READY="replica 127.0.0.1:$port: master_link_status is not up"
          return 1
        fi ;;
      *) REDIS_HA_NOT_READY="node 127.0.0.1:$port: role '$role'"; return 1 ;;
    esac
  done
  REDIS_HA_BAD_PORT=""
  if [[ $((masters * per)) -ne $replicas ]]; then
    REDIS_HA_NOT_READY="$masters primaries and $replicas replicas"
    return 1
  fi
}

start_redis_cluster() {
  need_packages "redis-server:redis-server" "redis-cli:redis-tools" "openssl:openssl"
  local password n dir ports=() nodes=() primaries=() replicas=() seeds=() port started=$SECONDS
  local per=1 auth=()
  password="$(openssl rand -hex 16)"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --replicas) per="$2"; shift 2 ;;
      --no-password) password=""; shift ;;
      *) die "start_redis_cluster: unknown argument $1" ;;
    esac
  done
  if [[ -n "$password" ]]; then auth=(--no-auth-warning -a "$password"); fi
  for n in $(seq $((3 * (per + 1)))); do
    dir="$(run_dir)/cluster-$n"
    redis_ha_node "$dir" "redis (cluster node $n)" "$password" yes \
      --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 2000 \
      --cluster-announce-ip 127.0.0.1 --masterauth "$password" --repl-diskless-sync-delay 0
    ports+=("$NODE_PORT")
    nodes+=("127.0.0.1:$NODE_PORT")
  done
  local create_log
  create_log="$(run_dir)/cluster-create.log"
  redis-cli "${auth[@]}" --cluster create "${nodes[@]}" \
    --cluster-replicas "$per" --cluster-yes >"$create_log" 2>&1 \
    || redis_ha_die "redis cluster (redis-cli --cluster create)" "$create_log" "could not create the cluster"
  # (The second check, after the wait, also names what is wrong.)
  if ! wait_for 30 redis_ha_cluster_ready "$password" "$per" "${ports[@]}" \
    && ! redis_ha_cluster_ready "$password" "$per" "${ports[@]}"; then
    local what="redis cluster" logfile="$create_log"
    for n in $(seq ${#ports[@]}); do
      if [[ "${ports[n - 1]}" == "$REDIS_HA_BAD_PORT" ]]; then
        what="redis (cluster node $n)"; logfile="$(run_dir)/cluster-$n/redis.log"
      fi
    done
    redis_ha_die "$what" "$logfile" "the cluster is not healthy within 30 s: $REDIS_HA_NOT_READY"
  fi
  for port in "${ports[@]}"; do
    if [[ "$(redis_ha_field "$port" "$password" replication role)" == master ]]; then
      primaries+=("$port")
      seeds+=("127.0.0.1:$port")
    else
      replicas+=("$port")
    fi
  done
  REDIS_HA_CLUSTER_PRIMARIES=("${primaries[@]}")
  export FENCED_TEST_REDIS_CLUSTER_URL="redis+cluster://${password:+:${password}@}$(IFS=,; printf '%s' "${seeds[*]}")"
  log "redis $(redis_ha_version) cluster on 127.0.0.1: primaries ${primaries[*]}, replicas ${replicas[*]:-none} (bus ports +10000; $((SECONDS - started))s)"
}

# ── Primary, replicas and Sentinels ──────────────────────────────────────────────────────────

# redis_ha_links_up <password> <port…>: every replica given has its link to the primary up.
redis_ha_links_up() {
  local password="$1" port
  shift
  for port in "$@"; do
    [[ "$(redis_ha_field "$port" "$password" replication master_link_status)" == up ]] || return 1
  done
}

# redis_ha_count_flags <flags>: reads redis-cli's flat output of SENTINEL replicas/sentinels and
# counts the entries whose flags are exactly <flags> (so none down or disconnected).
redis_ha_count_flags() {
  tr -d '\r' | awk -v want="$1" 'prev == "flags" && $0 == want { n++ } { prev = $0 } END { print n + 0 }'
}

# redis_ha_sentinels_ready <primary port> <sentinel port…>: every Sentinel names the primary,
# sees its 2 replicas and the other Sentinels; otherwise sets REDIS_HA_NOT_READY and
# REDIS_HA_BAD_PORT (the Sentinel at fault).
redis_ha_sentinels_ready() {
  local primary="$1" port addr n others
  shift
  others=$(($# - 1))
  for port in "$@"; do
    REDIS_HA_BAD_PORT="$port"
    addr="$(redis_ha_cli "$port" "" sentinel get-master-addr-by-name fenced 2>/dev/null | tr -d '\r' | paste -sd:)"
    if [[ "$addr" != "127.0.0.1:$primary" ]]; then
      REDIS_HA_NOT_READY="sentinel 127.0.0.1:$port names the primary '${addr}' (want 127.0.0.1:$primary)"
      return 1
    fi
    n="$(redis_ha_cli "$port" "" sentinel replicas fenced 2>/dev/null | redis_ha_count_flags slave)"
    if [[ "$n" != 2 ]]; then
      REDIS_HA_NOT_READY="sentinel 127.0.0.1:$port sees $n healthy replicas (want 2)"
      return 1
    fi
    n="$(redis_ha_cli "$port" "" sentinel sentinels fenced 2>/dev/null | redis_ha_count_flags sentinel)"
    if [[ "$n" != "$others" ]]; then
      REDIS_HA_NOT_READY="sentinel 127.0.0.1:$port sees $n other sentinels (want $others)"
      return 1
    fi
  done
}

# redis_ha_sentinel <dir> <what> <password> <primary port>: starts one redis-sentinel with its
# config (which Sentinel rewrites) and log in <dir>; sets NODE_PORT.
redis_ha_sentinel() {
  local dir="$1" what="$2" password="$3" primary="$4" attempt port pid
  mkdir -p "$dir"
  for attempt in 1 2 3; do
    port="$(free_port)"
    cat >"$dir/sentinel.conf" <<EOF
bind 127.0.0.1
port $port
daemonize no
dir $dir
logfile $dir/sentinel.log
sentinel resolve-hostnames no
sentinel monitor fenced 127.0.0.1 $primary 2
sentinel auth-pass fenced $password
sentinel down-after-milliseconds fenced 1000
sentinel failover-timeout fenced 5000
EOF
    chmod 600 "$dir/sentinel.conf"
    redis-sentinel "$dir/sentinel.conf" >>"$dir/sentinel.log" 2>&1 &
    pid=$!
    FENCED_PIDS+=("$pid")
    if redis_ha_wait_up 10 "$pid" "$port" ""; then
      NODE_PORT="$port"
      return 0
    fi
    log "$what did not start on port $port (attempt $attempt): $(tail -n 3 "$dir/sentinel.log" 2>/dev/null)"
    redis_ha_stop "$pid"
  done
  redis_ha_die "$what" "$dir/sentinel.log" "did not start (3 attempts)"
}

start_redis_sentinel() {
  need_packages "redis-server:redis-server" "redis-cli:redis-tools" "redis-sentinel:redis-sentinel" \
    "openssl:openssl"
  local password primary n replicas=() sentinels=() seeds=() started=$SECONDS
  password="$(openssl rand -hex 16)"
  redis_ha_node "$(run_dir)/replicated-primary" "redis (replicated primary)" "$password" no \
    --masterauth "$password" --repl-diskless-sync-delay 0
  primary="$NODE_PORT"
  for n in 1 2; do
    redis_ha_node "$(run_dir)/replicated-replica-$n" "redis (replica $n)" "$password" no \
      --masterauth "$password" --repl-diskless-sync-delay 0 --replicaof 127.0.0.1 "$primary"
    replicas+=("$NODE_PORT")
  done
  if ! wait_for 20 redis_ha_links_up "$password" "${replicas[@]}"; then
    for n in 1 2; do
      redis_ha_links_up "$password" "${replicas[n - 1]}" \
        || redis_ha_die "redis (replica $n)" "$(run_dir)/replicated-replica-$n/redis.log" \
          "its link to the primary (127.0.0.1:$primary) is not up within 20 s"
    done
  fi
  for n in 1 2 3; do
    redis_ha_sentinel "$(run_dir)/sentinel-$n" "redis-sentinel $n" "$password" "$primary"
    sentinels+=("$NODE_PORT")
    seeds+=("127.0.0.1:$NODE_PORT")
  done
  # Sentinels find the replicas through the primary's INFO and each other through hello messages
  # (every 2 s). (The second check, after the wait, also names what is wrong.)
  if ! wait_for 30 redis_ha_sentinels_ready "$primary" "${sentinels[@]}" \
    && ! redis_ha_sentinels_ready "$primary" "${sentinels[@]}"; then
    for n in 1 2 3; do
      [[ "${sentinels[n - 1]}" == "$REDIS_HA_BAD_PORT" ]] && break
    done
    redis_ha_die "redis-sentinel $n" "$(run_dir)/sentinel-$n/sentinel.log" \
      "the Sentinels did not agree within 30 s: $REDIS_HA_NOT_READY"
  fi
  export FENCED_TEST_REDIS_SENTINEL_URL="redis+sentinel://:${password}@$(IFS=,; printf '%s' "${seeds[*]}")/fenced"
  export FENCED_TEST_REDIS_REPLICATED_URL="redis://:${password}@127.0.0.1:${primary}/0"
  log "redis $(redis_ha_version): primary 127.0.0.1:$primary with replicas ${replicas[*]}, sentinels ${sentinels[*]} (master name fenced; $((SECONDS - started))s)"
}
