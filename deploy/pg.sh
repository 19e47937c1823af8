#!/usr/bin/env bash
# Throwaway PostgreSQL 15 for demos and tests.
#
#   deploy/pg.sh start DIR    init (if needed) and start a server in DIR on a free port;
#                             prints DATABASE_URL=... and writes it to DIR/url
#   deploy/pg.sh stop DIR     stop it (idempotent)
#   deploy/pg.sh run CMD...   if DATABASE_URL is set, run CMD as is; otherwise start a
#                             server in a temp dir, run CMD with DATABASE_URL exported,
#                             stop and delete the server afterwards (also on Ctrl-C).
#
#   PG_OPTS="-c name=value ..."  extra server options for start/run, after the defaults
#                             (e.g. shared_preload_libraries=pg_stat_statements);
#                             unset: the defaults alone.
#
# PostgreSQL refuses to run as root, so the server runs as the `postgres` user.
set -euo pipefail

PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"

as_pg() {
    if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
    local dir="$1"
    mkdir -p "$dir"
    if [ "$(id -u)" = "0" ]; then chown postgres:postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_pg mkdir -p "$dir/data"
        as_pg "$PGBIN/initdb" -D "$dir/data" --auth=trust --no-sync -U postgres >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    local port
    port="${PGPORT_WANTED:-$(free_port)}"
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 -c shared_buffers=256MB${PG_OPTS:+ $PG_OPTS}" \
        >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    local url="postgres://postgres@127.0.0.1:$port/postgres"
    echo "$port" >"$dir/port"
    echo "$url" >"$dir/url"
    echo "DATABASE_URL=$url"
}

stop() {
    local dir="$1"
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$dir/data" -w -t 30 -m fast stop >/dev/null 2>&1 || true
    fi
}

case "${1:-}" in
    start) start "${2:?usage: pg.sh start DIR}" ;;
    stop) stop "${2:?usage: pg.sh stop DIR}" ;;
    run)
        shift
        if [ -n "${DATABASE_URL:-}" ]; then exec "$@"; fi
        dir="$(mktemp -d /tmp/warden-pg.XXXXXX)"
        trap 'stop "$dir"; rm -rf "$dir"' EXIT
        trap 'exit 130' INT TERM
        start "$dir" >/dev/null
        echo "warden: started throwaway PostgreSQL at $(cat "$dir/url")" >&2
        DATABASE_URL="$(cat "$dir/url")" PGSERVER_DIR="$dir" "$@"
        ;;
    *)
        echo "usage: deploy/pg.sh start DIR | stop DIR | run CMD..." >&2
        exit 2
        ;;
esac
