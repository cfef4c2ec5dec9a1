# Starts a throwaway Redis on loopback: password auth on a plain port and TLS (own CA) on a
# second port. Exports FENCED_TEST_REDIS_URL and FENCED_TEST_REDISS_URL.
# shellcheck shell=bash

start_redis() {
  need_packages "redis-server:redis-server" "redis-cli:redis-tools" "openssl:openssl"
  local dir port tls_port password
  dir="$(run_dir)/redis"
  mkdir -p "$dir"
  password="$(openssl rand -hex 16)"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 \
      -subj "/CN=fenced test CA" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
      -subj "/CN=localhost" >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > san.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
      -days 2 -extfile san.ext >/dev/null 2>&1
  ) || die "could not create TLS certificates for Redis"
  local attempt
  for attempt in 1 2 3; do
    port="$(free_port)"; tls_port="$(free_port)"
    redis-server --bind 127.0.0.1 --port "$port" --tls-port "$tls_port" \
      --tls-cert-file "$dir/server.crt" --tls-key-file "$dir/server.key" \
      --tls-ca-cert-file "$dir/ca.crt" --tls-auth-clients no \
      --requirepass "$password" --save '' --appendonly no --dir "$dir" \
      --logfile "$dir/redis.log" --daemonize no &
    FENCED_PIDS+=("$!")
    if wait_for 10 redis-cli -h 127.0.0.1 -p "$port" --no-auth-warning -a "$password" ping; then
      break
    fi
    log "redis did not start on port $port (attempt $attempt); log: $(tail -3 "$dir/redis.log" 2>/dev/null)"
    port=""
  done
  [[ -n "$port" ]] || die "Redis did not start; see $dir/redis.log"
  export FENCED_TEST_REDIS_URL="redis://:${password}@127.0.0.1:${port}/0"
  export FENCED_TEST_REDISS_URL="rediss://:${password}@localhost:${tls_port}/0?tls_ca=${dir}/ca.crt"
  log "redis $(redis-server --version | awk '{print $3}') on 127.0.0.1:$port (TLS on $tls_port)"
}
