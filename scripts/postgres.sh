#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for kttune workers that share one study.
#
#   scripts/postgres.sh install       install Debian's postgresql if missing (root, apt-get)
#   scripts/postgres.sh start [DIR]   install if missing, start a cluster in DIR (default: a new
#                                     temp dir), create the database "kttune", print its URL
#   scripts/postgres.sh stop DIR      stop that cluster and delete DIR
#
# The cluster trusts loopback connections and runs without fsync: for tests and trials on
# one machine, not for a study you want to keep (docs/scale-out.md sets up a real one).
# Environment: KTTUNE_PG_PORT picks the port (default: a free one), KTTUNE_PG_DB the database.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }

bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && { echo "$d"; return 0; }
    done
    d="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
    [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && { echo "$d"; return 0; }
    return 1
}

install_postgres() {
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and this is not a Debian-like system (no apt-get)"
    echo "postgres.sh: installing postgresql with apt-get" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

# Run a PostgreSQL program as the cluster's owner: the postgres user when we are root
# (initdb and postgres refuse to run as root), ourselves otherwise.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir="${1:-}" bin port db="${KTTUNE_PG_DB:-kttune}"
    bin="$(bindir)" || { install_postgres; bin="$(bindir)" || die "postgresql installed but initdb/pg_ctl not found"; }
    if [[ -z "$dir" ]]; then
        dir="$(mktemp -d "${TMPDIR:-/tmp}/kttune-pg.XXXXXX")"
    fi
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [[ ! -e "$dir/data" ]] || die "$dir/data exists: stop that cluster first (postgres.sh stop $dir)"
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' user to run the server as (the postgresql package creates it)"
        chown postgres "$dir"
        runuser -u postgres -- test -w "$dir" || die "the postgres user cannot write $dir (a parent folder is private?)"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    port="${KTTUNE_PG_PORT:-$(free_port)}"
    cat >>"$dir/data/postgresql.conf" <<EOF
# kttune throwaway cluster
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/data'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >&2 \
        || { tail -n 20 "$dir/server.log" >&2 || true; die "the server did not start (log: $dir/server.log)"; }
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db" \
        || { stop "$dir"; die "createdb $db failed"; }
    local url="postgresql://postgres@127.0.0.1:$port/$db"
    echo "$url" >"$dir/url"
    echo "postgres.sh: server in $dir (stop: scripts/postgres.sh stop $dir)" >&2
    echo "$url"
}

stop() {
    local dir="${1:-}" bin
    [[ -n "$dir" ]] || die "usage: postgres.sh stop DIR"
    [[ -d "$dir" ]] || die "$dir: no such folder"
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        bin="$(bindir)" || die "initdb/pg_ctl not found"
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2 || die "pg_ctl stop failed (log: $dir/server.log)"
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    install) bindir >/dev/null || install_postgres; bindir >/dev/null || die "postgresql installed but initdb/pg_ctl not found" ;;
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: postgres.sh install | start [DIR] | stop DIR" ;;
esac
