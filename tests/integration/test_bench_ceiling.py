"""bench/ceiling.py, the bare proxies the benchmark measures the router against: they must do
the work they stand for (a relay that answers like the node, a fan-out that keeps three
nodes identical), or the bound they give would mean nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import assert_nodes_identical, fresh_database
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode, free_port

CEILING = Path(__file__).resolve().parents[2] / "bench" / "ceiling.py"


@contextmanager
def ceiling(mode: str, nodes: list[LocalNode]) -> Iterator[int]:
    port = free_port()
    cmd = [sys.executable, str(CEILING), mode, "--port", str(port), "--workers", "1"]
    for n in nodes:
        cmd += ["--node", f"{n.router_host}:{n.port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"ceiling.py did not listen on {port}")


def _pgbench(binaries: PgBinaries, port: int, db: str, *args: str) -> str:
    to = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    r = subprocess.run(
        [str(binaries.path("pgbench")), *to, *args, db], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_relay_answers_like_the_node(pg_binaries: PgBinaries, pg_nodes: list[LocalNode]) -> None:
    node = pg_nodes[0]
    fresh_database([node], "ceiling_relay")
    with ceiling("relay", [node]) as port:
        _pgbench(pg_binaries, port, "ceiling_relay", "-i", "-s", "1", "-q")
        for mode in ("simple", "prepared"):
            out = _pgbench(pg_binaries, port, "ceiling_relay", "-S", "-M", mode, "-t", "100")
            assert "number of transactions actually processed: 100/100" in out
    assert node.psql("SELECT count(*) FROM pgbench_accounts", database="ceiling_relay") == "100000"


def test_fanout_keeps_three_nodes_identical_under_tpcb(
    pg_binaries: PgBinaries, pg_nodes: list[LocalNode]
) -> None:
    db = "ceiling_fanout"
    fresh_database(pg_nodes, db)
    for n in pg_nodes:
        _pgbench(pg_binaries, n.port, db, "-i", "-s", "1", "-q")
    with ceiling("fanout", pg_nodes) as port:
        out = _pgbench(pg_binaries, port, db, "-c", "4", "-j", "2", "-t", "50")
    assert "number of transactions actually processed: 200/200" in out
    # Every transaction went through a two-phase commit and none is left prepared.
    for n in pg_nodes:
        assert n.psql("SELECT count(*) FROM pgbench_history", database=db) == "200"
        assert n.psql("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'ceiling%'") == "0"
        # It fixes no node-dependent value (the router would): each node set its own clock
        # reading as history's mtime. The rest must be the same everywhere.
        n.psql("ALTER TABLE pgbench_history DROP COLUMN mtime", database=db)
    assert_nodes_identical(pg_nodes, db)
