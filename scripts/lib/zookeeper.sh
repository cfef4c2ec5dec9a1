# Starts a throwaway single-node ZooKeeper server on loopback (free client port, no admin server,
# data and log in the run directory) and exports:
#   FENCED_TEST_ZK_URL       zk://127.0.0.1:PORT (the default 10 s session timeout)
#   FENCED_TEST_ZK_FAST_URL  the same server with a 2 s session timeout, for crash-expiry checks
# The server allows session timeouts from 1 s to 60 s, any number of connections from one
# address (the herd check opens over 100), and removes empty container nodes every 500 ms.
# shellcheck shell=bash

ZK_JARS="/usr/share/java/zookeeper.jar"
ZK_CONF_DIR="/etc/zookeeper/conf"

# zk_answers <port> <4lw>: prints the server's answer to a four-letter-word command.
zk_answers() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
s.sendall(sys.argv[2].encode())
out = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    out += chunk
print(out.decode(errors="replace"))
PY
}

zk_ready() { [[ "$(zk_answers "$1" ruok 2>/dev/null)" == imok* ]] && zk_answers "$1" srvr 2>/dev/null | grep -q '^Mode'; }

# Installs Java and ZooKeeper from Debian packages when missing.
need_zookeeper() {
  need_packages "java:default-jre-headless"
  if [[ ! -f "$ZK_JARS" ]]; then
    need_packages "zookeeper-not-installed:zookeeper"
  fi
  [[ -f "$ZK_JARS" ]] || die "ZooKeeper is not installed ($ZK_JARS is missing); apt-get install zookeeper"
}

start_zookeeper() {
  need_zookeeper
  local dir attempt
  dir="$(run_dir)/zookeeper"
  mkdir -p "$dir/data"
  for attempt in 1 2 3; do
    local port
    port="$(free_port)"
    cat > "$dir/zoo.cfg" <<EOF
tickTime=200
initLimit=10
syncLimit=5
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
minSessionTimeout=1000
maxSessionTimeout=60000
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,mntr,wchs,cons
EOF
    java -Xmx256m -Dzookeeper.log.dir="$dir" -Dzookeeper.root.logger=INFO,CONSOLE \
      -Dznode.container.checkIntervalMs=500 -Dznode.container.maxPerMinute=100000 \
      -cp "$ZK_JARS:$ZK_CONF_DIR" org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg" \
      > "$dir/zookeeper.log" 2>&1 &
    FENCED_PIDS+=("$!")
    if wait_for 30 zk_ready "$port"; then
      export FENCED_TEST_ZK_URL="zk://127.0.0.1:${port}"
      export FENCED_TEST_ZK_FAST_URL="zk://127.0.0.1:${port}?session_timeout=2s"
      log "zookeeper $(zk_answers "$port" srvr | sed -n 's/^Zookeeper version: \([^-,]*\).*/\1/p') on 127.0.0.1:$port"
      return 0
    fi
    log "zookeeper did not start on port $port (attempt $attempt): $(tail -3 "$dir/zookeeper.log" 2>/dev/null)"
    kill "${FENCED_PIDS[-1]}" 2>/dev/null || true
  done
  die "ZooKeeper did not start; see $dir/zookeeper.log"
}
