#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the tests: `source .ci/postgres.sh` installs
# it from the Debian packages when missing, starts a cluster in a temp folder (trust auth, local
# only), exports FMNIST_TEST_POSTGRES_URL and stops the server when the calling shell exits.
# Anything that fails leaves the variable unset: the PostgreSQL tests then skip with a reason.

fmnist_pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

fmnist_start_postgres() {
  local bin dir port as_user
  bin="$(fmnist_pg_bin)"
  if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing PostgreSQL from the Debian packages..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
      >/dev/null || return 1
    bin="$(fmnist_pg_bin)"
  fi
  [ -n "$bin" ] || return 1
  dir="$(mktemp -d /tmp/fmnist-pg.XXXXXX)"
  port="${FMNIST_TEST_POSTGRES_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
  as_user=()
  if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
    chown postgres "$dir"
    as_user=(runuser -u postgres --)
  fi
  "${as_user[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null || return 1
  "${as_user[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200" start >/dev/null || return 1
  FMNIST_PG_STOP=("${as_user[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop)
  trap '"${FMNIST_PG_STOP[@]}" >/dev/null 2>&1; rm -rf "'"$dir"'"' EXIT
  export FMNIST_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
}

if [ -z "${FMNIST_TEST_POSTGRES_URL:-}" ]; then
  fmnist_start_postgres || echo "PostgreSQL unavailable: its tests will be skipped." >&2
fi
