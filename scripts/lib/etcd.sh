# Starts throwaway single-node etcd servers on loopback (free client and peer ports, data in the
# run directory) and exports:
#   FENCED_TEST_ETCD_URL    etcd://127.0.0.1:PORT?session_ttl=3s — plain, no authentication
#   FENCED_TEST_ETCDS_URL   etcds://fenced:PASSWORD@localhost:PORT?tls_ca=…&session_ttl=3s — a second
#                           server with TLS (own CA) and authentication on, the user `fenced`
#                           allowed to read and write under `fenced/` only (a separate server,
#                           because authentication on the main one would break the other tests)
# shellcheck shell=bash

# etcd_instance <name> <tls: yes|no>: starts one member; sets ETCD_PORT and ETCD_CTL (the
# etcdctl arguments that reach it).
etcd_instance() {
  local name="$1" tls="$2" dir attempt
  dir="$(run_dir)/etcd-$name"
  mkdir -p "$dir"
  [[ "$tls" == yes ]] && tls_material "$dir" "etcd"
  ETCD_PORT=""
  for attempt in 1 2 3; do
    local port peer scheme=http tls_args=() ctl_tls=()
    port="$(free_port)"
    peer="$(free_port)"
    if [[ "$tls" == yes ]]; then
      scheme=https
      tls_args=(--cert-file "$dir/server.crt" --key-file "$dir/server.key")
      ctl_tls=(--cacert "$dir/ca.crt")
    fi
    rm -rf "$dir/data"
    etcd --name "fenced-$name" --data-dir "$dir/data" \
      --listen-client-urls "$scheme://127.0.0.1:$port" \
      --advertise-client-urls "$scheme://localhost:$port" \
      --listen-peer-urls "http://127.0.0.1:$peer" \
      --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "fenced-$name=http://127.0.0.1:$peer" \
      --initial-cluster-state new "${tls_args[@]}" \
      --log-level error --logger zap >"$dir/etcd.log" 2>&1 &
    FENCED_PIDS+=("$!")
    ETCD_CTL=(--endpoints "$scheme://localhost:$port" "${ctl_tls[@]}")
    if wait_for 20 etcdctl "${ETCD_CTL[@]}" endpoint health; then
      ETCD_PORT="$port"
      return 0
    fi
    log "etcd ($name) did not start on port $port (attempt $attempt): $(tail -3 "$dir/etcd.log" 2>/dev/null)"
  done
  die "etcd ($name) did not start; see $dir/etcd.log"
}

# Installs etcd, etcdctl and what building the etcd client needs (protoc and its descriptors).
need_etcd() {
  need_packages "etcd:etcd-server" "etcdctl:etcd-client" "protoc:protobuf-compiler" "openssl:openssl"
  [[ -f /usr/include/google/protobuf/descriptor.proto ]] || need_packages "libprotobuf-dev:libprotobuf-dev"
  [[ -f /usr/include/google/protobuf/descriptor.proto ]] \
    || die "protoc cannot find google/protobuf/descriptor.proto; install libprotobuf-dev"
}

start_etcd() {
  need_etcd
  export ETCDCTL_API=3
  etcd_instance main no
  export FENCED_TEST_ETCD_URL="etcd://127.0.0.1:${ETCD_PORT}?session_ttl=3s"
  log "etcd $(etcd --version | sed -n 's/^etcd Version: //p') on 127.0.0.1:$ETCD_PORT"

  local password dir
  password="$(openssl rand -hex 16)"
  etcd_instance secure yes
  dir="$(run_dir)/etcd-secure"
  {
    etcdctl "${ETCD_CTL[@]}" user add "root:$password" \
      && etcdctl "${ETCD_CTL[@]}" user add "fenced:$password" \
      && etcdctl "${ETCD_CTL[@]}" role add locks \
      && etcdctl "${ETCD_CTL[@]}" role grant-permission locks readwrite --prefix=true fenced/ \
      && etcdctl "${ETCD_CTL[@]}" user grant-role fenced locks \
      && etcdctl "${ETCD_CTL[@]}" auth enable
  } >/dev/null 2>&1 || die "could not set up authentication on the etcd server with TLS (see $dir/etcd.log)"
  export FENCED_TEST_ETCDS_URL="etcds://fenced:${password}@localhost:${ETCD_PORT}/?tls_ca=${dir}/ca.crt&session_ttl=3s"
  log "etcd with TLS and authentication on localhost:$ETCD_PORT"
}
