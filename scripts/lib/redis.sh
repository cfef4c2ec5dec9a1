# Starts throwaway Redis servers on loopback (password auth, no persistence, data in the run
# directory):
#   - the main server, with TLS (own CA) on a second port:
#       FENCED_TEST_REDIS_URL, FENCED_TEST_REDISS_URL
#   - a second server used only by checks that count server commands (run one at a time):
#       FENCED_TEST_REDIS_COUNTING_URL
# shellcheck shell=bash

# redis_instance <name> <tls: yes|no> <password>: starts one server; sets REDIS_PORT and
# REDIS_TLS_PORT.
redis_instance() {
  local name="$1" tls="$2" password="$3" dir attempt
  dir="$(run_dir)/redis-$name"
  mkdir -p "$dir"
  [[ "$tls" == yes ]] && tls_material "$dir" "redis"
  REDIS_PORT=""
  for attempt in 1 2 3; do
    local port tls_port tls_args=()
    port="$(free_port)"
    REDIS_TLS_PORT=""
    if [[ "$tls" == yes ]]; then
      tls_port="$(free_port)"
      REDIS_TLS_PORT="$tls_port"
      tls_args=(--tls-port "$tls_port" --tls-cert-file "$dir/server.crt" --tls-key-file "$dir/server.key"
        --tls-ca-cert-file "$dir/ca.crt" --tls-auth-clients no)
    fi
    redis-server --bind 127.0.0.1 --port "$port" "${tls_args[@]}" \
      --requirepass "$password" --save '' --appendonly no --dir "$dir" \
      --logfile "$dir/redis.log" --daemonize no &
    FENCED_PIDS+=("$!")
    if wait_for 10 redis-cli -h 127.0.0.1 -p "$port" --no-auth-warning -a "$password" ping; then
      REDIS_PORT="$port"
      return 0
    fi
    log "redis ($name) did not start on port $port (attempt $attempt): $(tail -3 "$dir/redis.log" 2>/dev/null)"
  done
  die "Redis ($name) did not start; see $dir/redis.log"
}

start_redis() {
  need_packages "redis-server:redis-server" "redis-cli:redis-tools" "openssl:openssl"
  local password dir
  password="$(openssl rand -hex 16)"
  redis_instance main yes "$password"
  dir="$(run_dir)/redis-main"
  export FENCED_TEST_REDIS_URL="redis://:${password}@127.0.0.1:${REDIS_PORT}/0"
  export FENCED_TEST_REDISS_URL="rediss://:${password}@localhost:${REDIS_TLS_PORT}/0?tls_ca=${dir}/ca.crt"
  log "redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$REDIS_PORT (TLS on $REDIS_TLS_PORT)"
  redis_instance counting no "$password"
  export FENCED_TEST_REDIS_COUNTING_URL="redis://:${password}@127.0.0.1:${REDIS_PORT}/0"
  log "redis for command-counting checks on 127.0.0.1:$REDIS_PORT"
}
