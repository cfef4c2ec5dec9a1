# Starts a throwaway PostgreSQL server on loopback (free port, data in the run directory, TLS on
# with its own CA, password authentication) and exports:
#   FENCED_TEST_PG_URL          postgres://fenced:PASSWORD@127.0.0.1:PORT/fenced_test — owns its database
#   FENCED_TEST_PG_TLS_URL      the same over TLS: postgres://fenced:…@localhost:PORT/fenced_test?sslmode=verify-full&tls_ca=…
#   FENCED_TEST_PG_LIMITED_URL  postgres://fenced_limited:…@127.0.0.1:PORT/fenced_limited_db — may connect,
#                               may not create tables (for the "no permission" message)
#   FENCED_TEST_PG_ADMIN        psql arguments of the superuser (unix socket), for tests that end sessions
#   FENCED_TEST_PG_POOLED_URL   the database through PgBouncer in transaction pooling mode (each
#                               transaction may run on another server connection), with
#                               prepared_statements=false
# initdb and pg_ctl must run as the `postgres` user, not as root.
# shellcheck shell=bash

# The directory of the PostgreSQL binaries (initdb, pg_ctl, postgres), newest version first.
pg_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x "$dir/initdb" ]] && { printf '%s' "$dir"; return 0; }
  done
  return 1
}

need_postgres() {
  pg_bin >/dev/null || need_packages "/usr/lib/postgresql/15/bin/initdb:postgresql"
  need_packages "psql:postgresql-client" "openssl:openssl" "pgbouncer:pgbouncer"
  pg_bin >/dev/null || die "PostgreSQL's initdb was not found under /usr/lib/postgresql/*/bin; install postgresql"
  id postgres >/dev/null 2>&1 || die "the postgres system user is missing; install postgresql"
  command -v pgbench >/dev/null 2>&1 || true
}

# as_postgres <command…>: runs a command as the postgres user (or as is, when not root).
as_postgres() {
  if [[ "$(id -u)" == 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start_postgres() {
  need_postgres
  local bin dir port attempt password limited_password
  bin="$(pg_bin)"
  dir="$(run_dir)/postgres"
  chmod o+x "$(run_dir)"
  mkdir -p "$dir"
  tls_material "$dir" "postgres"
  chmod 600 "$dir/server.key"
  [[ "$(id -u)" == 0 ]] && chown -R postgres: "$dir"
  as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || die "initdb failed; see $dir/initdb.log"
  password="$(openssl rand -hex 16)"
  limited_password="$(openssl rand -hex 16)"
  PG_PORT=""
  for attempt in 1 2 3; do
    port="$(free_port)"
    if as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 start -o \
      "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c ssl=on \
       -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key -c max_connections=400 \
       -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null 2>&1; then
      PG_PORT="$port"
      break
    fi
    log "PostgreSQL did not start on port $port (attempt $attempt): $(tail -3 "$dir/postgres.log" 2>/dev/null)"
  done
  [[ -n "$PG_PORT" ]] || die "PostgreSQL did not start; see $dir/postgres.log"
  FENCED_PIDS+=("$(head -1 "$dir/data/postmaster.pid")")
  export FENCED_TEST_PG_ADMIN="-h $dir -p $PG_PORT -U postgres"
  local psql=(psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$PG_PORT" -U postgres -d postgres)
  as_postgres "${psql[@]}" >/dev/null <<SQL || die "could not create the test users and databases in PostgreSQL"
CREATE ROLE fenced LOGIN PASSWORD '$password';
CREATE DATABASE fenced_test OWNER fenced;
CREATE ROLE fenced_limited LOGIN PASSWORD '$limited_password';
CREATE DATABASE fenced_limited_db;
REVOKE CREATE ON DATABASE fenced_limited_db FROM PUBLIC;
SQL
  as_postgres "${psql[@]}" -d fenced_limited_db >/dev/null <<SQL || die "could not restrict the limited PostgreSQL user"
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO fenced_limited;
SQL
  export FENCED_TEST_PG_URL="postgres://fenced:${password}@127.0.0.1:${PG_PORT}/fenced_test"
  export FENCED_TEST_PG_TLS_URL="postgres://fenced:${password}@localhost:${PG_PORT}/fenced_test?sslmode=verify-full&tls_ca=${dir}/ca.crt"
  export FENCED_TEST_PG_LIMITED_URL="postgres://fenced_limited:${limited_password}@127.0.0.1:${PG_PORT}/fenced_limited_db"
  log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"
  start_pgbouncer "$dir" "$password"
}

# start_pgbouncer <postgres run dir> <password of fenced>: PgBouncer in transaction pooling
# mode in front of the test server (as the postgres user: PgBouncer refuses to run as root).
start_pgbouncer() {
  local dir="$1" password="$2" bouncer port attempt
  bouncer="$dir/pgbouncer"
  mkdir -p "$bouncer"
  printf '"fenced" "%s"\n' "$password" > "$bouncer/userlist.txt"
  chmod 600 "$bouncer/userlist.txt"
  for attempt in 1 2 3; do
    port="$(free_port)"
    cat > "$bouncer/pgbouncer.ini" <<INI
[databases]
fenced_test = host=127.0.0.1 port=$PG_PORT dbname=fenced_test
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $bouncer/userlist.txt
pool_mode = transaction
default_pool_size = 4
max_client_conn = 200
logfile = $bouncer/pgbouncer.log
pidfile = $bouncer/pgbouncer.pid
INI
    [[ "$(id -u)" == 0 ]] && chown -R postgres: "$bouncer"
    as_postgres pgbouncer -q "$bouncer/pgbouncer.ini" >/dev/null 2>&1 &
    FENCED_PIDS+=("$!")
    if wait_for 10 env PGPASSWORD="$password" psql -X -q -h 127.0.0.1 -p "$port" -U fenced -d fenced_test -c "SELECT 1"; then
      # runuser does not pass the cleanup's signal on: stop PgBouncer itself too.
      [[ -s "$bouncer/pgbouncer.pid" ]] && FENCED_PIDS+=("$(cat "$bouncer/pgbouncer.pid")")
      export FENCED_TEST_PG_POOLED_URL="postgres://fenced:${password}@127.0.0.1:${port}/fenced_test?prepared_statements=false"
      log "PgBouncer $(pgbouncer --version | head -1 | awk '{print $2}') (transaction pooling) on 127.0.0.1:$port"
      return 0
    fi
    log "PgBouncer did not start on port $port (attempt $attempt): $(tail -3 "$bouncer/pgbouncer.log" 2>/dev/null)"
  done
  die "PgBouncer did not start; see $bouncer/pgbouncer.log"
}
