#!/usr/bin/env bash
# The project's two entry points, each installing what it needs on a fresh machine:
#   ./dev.sh up   [pgquorum up options]  - a local 3-node cluster behind a router on port 6432
#   ./dev.sh test [pytest options]       - lint, type-check and the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

have_postgres() {
    local d
    for d in "${PGQUORUM_PG_BINDIR:-}" "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
        [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/pgbench" ] && return 0
    done
    return 1
}

ensure_postgres() {
    have_postgres && return 0
    echo "dev.sh: PostgreSQL server binaries not found; installing them with apt-get" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql postgresql-contrib >/dev/null
}

ensure_venv() {
    local extra="$1"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    local stamp=".venv/.installed$extra"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/pip install -q --disable-pip-version-check -e ".$extra"
        touch "$stamp"
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
    up)
        ensure_postgres
        ensure_venv ""
        exec .venv/bin/pgquorum up "$@"
        ;;
    test)
        ensure_postgres
        ensure_venv "[test]"
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        .venv/bin/mypy
        exec .venv/bin/pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh up [--nodes N] [--port P] [--dir D] | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
