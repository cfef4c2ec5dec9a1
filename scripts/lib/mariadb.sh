# Starts a throwaway MariaDB server on loopback (free port, data and socket in the run directory,
# TLS on with its own CA, password authentication) and exports:
#   FENCED_TEST_MYSQL_URL          mysql://fenced:PASSWORD@127.0.0.1:PORT/fenced_test — all rights on
#                                  its database
#   FENCED_TEST_MYSQL_TLS_URL      the same over TLS, checked against the test CA:
#                                  mysql://fenced:…@localhost:PORT/fenced_test?tls_ca=…
#   FENCED_TEST_MYSQL_LIMITED_URL  mysql://fenced_limited:…@127.0.0.1:PORT/fenced_limited_db — may
#                                  SELECT, INSERT and UPDATE in its database but not create tables
#                                  (for the "no permission" message)
# shellcheck shell=bash

# The MariaDB server (mariadbd, mariadb-install-db) and client (mariadb, mysqlslap).
need_mariadb() {
  need_packages "mariadbd:mariadb-server" "mariadb:mariadb-client" "openssl:openssl"
}

start_mariadb() {
  need_mariadb
  local dir port attempt password limited_password pid
  dir="$(run_dir)/mariadb"
  mkdir -p "$dir"
  tls_material "$dir" "mariadb"
  mariadb-install-db --no-defaults --user=root --datadir="$dir/data" --auth-root-authentication-method=socket \
    --skip-test-db >"$dir/install.log" 2>&1 || die "mariadb-install-db failed; see $dir/install.log"
  password="$(openssl rand -hex 16)"
  limited_password="$(openssl rand -hex 16)"
  MARIADB_PORT=""
  for attempt in 1 2 3; do
    port="$(free_port)"
    mariadbd --no-defaults --user=root --datadir="$dir/data" --socket="$dir/mariadb.sock" \
      --pid-file="$dir/mariadb.pid" --bind-address=127.0.0.1 --port="$port" --skip-name-resolve \
      --log-error="$dir/mariadb.log" --max-connections=600 --innodb-flush-log-at-trx-commit=0 \
      --ssl-ca="$dir/ca.crt" --ssl-cert="$dir/server.crt" --ssl-key="$dir/server.key" >"$dir/mariadbd.out" 2>&1 &
    pid="$!"
    FENCED_PIDS+=("$pid")
    if wait_for 30 mariadb-admin --no-defaults --socket="$dir/mariadb.sock" -u root ping; then
      MARIADB_PORT="$port"
      break
    fi
    kill -TERM "$pid" 2>/dev/null || true
    log "MariaDB did not start on port $port (attempt $attempt): $(tail -3 "$dir/mariadb.log" 2>/dev/null)"
  done
  [[ -n "$MARIADB_PORT" ]] || die "MariaDB did not start; see $dir/mariadb.log"
  mariadb --no-defaults --socket="$dir/mariadb.sock" -u root >/dev/null <<SQL || die "could not create the test users and databases in MariaDB"
CREATE DATABASE fenced_test;
CREATE USER 'fenced'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER 'fenced'@'localhost' IDENTIFIED BY '$password';
GRANT ALL PRIVILEGES ON fenced_test.* TO 'fenced'@'127.0.0.1';
GRANT ALL PRIVILEGES ON fenced_test.* TO 'fenced'@'localhost';
CREATE DATABASE fenced_limited_db;
CREATE USER 'fenced_limited'@'127.0.0.1' IDENTIFIED BY '$limited_password';
GRANT SELECT, INSERT, UPDATE ON fenced_limited_db.* TO 'fenced_limited'@'127.0.0.1';
SQL
  export FENCED_TEST_MYSQL_URL="mysql://fenced:${password}@127.0.0.1:${MARIADB_PORT}/fenced_test"
  export FENCED_TEST_MYSQL_TLS_URL="mysql://fenced:${password}@localhost:${MARIADB_PORT}/fenced_test?tls_ca=${dir}/ca.crt"
  export FENCED_TEST_MYSQL_LIMITED_URL="mysql://fenced_limited:${limited_password}@127.0.0.1:${MARIADB_PORT}/fenced_limited_db"
  log "MariaDB $(mariadbd --version | sed -n 's/.*Ver \([^ ]*\).*/\1/p') on 127.0.0.1:$MARIADB_PORT (TLS available)"
}
