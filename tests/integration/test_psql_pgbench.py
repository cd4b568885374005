"""The command-line clients people use: psql and pgbench, through the router."""

from __future__ import annotations

import subprocess

import pytest
from router_harness import RouterThread, client_cmd, pgbench

from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode


def psql(
    binaries: PgBinaries, router: RouterThread, db: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_cmd(binaries, "psql", router, *args, db=db),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_psql_script_with_copy(pg_binaries: PgBinaries, router: RouterThread, db: str) -> None:
    script = """
CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);
INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 100) g;
COPY items (name) FROM STDIN;
copied one
copied two
\\.
BEGIN;
UPDATE items SET name = upper(name) WHERE id % 2 = 0;
COMMIT;
SELECT count(*) FROM items;
"""
    r = psql(pg_binaries, router, db, "-A", "-t", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "102"
    r = psql(pg_binaries, router, db, "-c", r"\copy items TO STDOUT")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 102


def test_psql_error_has_sqlstate(pg_binaries: PgBinaries, router: RouterThread, db: str) -> None:
    r = psql(pg_binaries, router, db, "-c", "\\set VERBOSITY verbose", "-c", "SELECT * FROM nope")
    assert r.returncode != 0
    assert "42P01" in r.stderr


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_all_protocols(
    pg_binaries: PgBinaries, router: RouterThread, db: str, pg_nodes: list[LocalNode], mode: str
) -> None:
    pgbench(pg_binaries, router, "-i", "-s", "1", "-q", db=db)
    out = pgbench(pg_binaries, router, "-M", mode, "-S", "-c", "4", "-j", "2", "-t", "200", db=db)
    assert "number of failed transactions: 0" in out
    # TPC-B-like last: pgbench truncates pgbench_history when it starts.
    out = pgbench(pg_binaries, router, "-M", mode, "-c", "4", "-j", "2", "-t", "50", db=db)
    assert "number of failed transactions: 0" in out
    for node in pg_nodes:
        # pgbench's own invariant: the balances moved exactly as the history says.
        got = node.psql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = "
            "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
            database=db,
        )
        assert got.strip() == "t"
        assert node.psql("SELECT count(*) FROM pgbench_history", database=db).strip() == "200"
