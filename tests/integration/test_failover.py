"""Failover without dropping sessions: nodes killed with SIGKILL under pgbench load."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psycopg
import pytest
from router_harness import (
    RouterThread,
    finish_pgbench,
    pgbench,
    router_config,
    start_pgbench,
    wait_pgbench_commits,
)

from helpers import assert_nodes_identical, balanced
from pgquorum.cluster.model import NodeState
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import _descendants


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["simple", "prepared"])
@pytest.mark.parametrize("victim", [0, 2], ids=["lead", "replica"])
def test_pgbench_tpcb_survives_a_killed_node(
    make_nodes,  # type: ignore[no-untyped-def]
    pg_binaries: PgBinaries,
    victim: int,
    mode: str,
) -> None:
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes))
    try:
        pgbench(pg_binaries, rt, "-i", "-s", "1", "-q")
        bench = start_pgbench(pg_binaries, rt, "-M", mode, "-c", "8", "-j", "2", "-T", "8", "-n")
        wait_pgbench_commits(rt, bench, 100)
        nodes[victim].kill()
        assert finish_pgbench(bench) > 50
        status = rt.router.cluster.status
        victim_name = nodes[victim].name
        assert status[victim_name].state is NodeState.FAILED
        survivors = [n for n in nodes if n is not nodes[victim]]
        assert all(status[n.name].state is NodeState.ONLINE for n in survivors)
        for n in survivors:
            assert balanced(n), n.name
            assert int(n.psql("SELECT count(*) FROM pg_prepared_xacts")) == 0
        assert_nodes_identical(survivors, "postgres")
    finally:
        rt.stop()


def test_transaction_moves_to_the_next_lead(make_nodes) -> None:  # type: ignore[no-untyped-def]
    """The lead dies between two statements of a transaction: the transaction goes on."""
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes))
    try:
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
            conn.execute("INSERT INTO t VALUES (1, 0), (2, 0)")
        with psycopg.connect(rt.dsn()) as conn:
            conn.execute("UPDATE t SET v = v + 1 WHERE id = 1")
            nodes[0].kill()
            conn.execute("UPDATE t SET v = v + 1 WHERE id = 2")
            assert conn.execute("SELECT sum(v) FROM t").fetchone() == (2,)
            conn.commit()
        assert rt.router.cluster.lead().node.name == "node2"  # type: ignore[union-attr]
        assert nodes[1].psql("SELECT sum(v) FROM t") == "2"
        assert_nodes_identical(nodes[1:], "postgres")
    finally:
        rt.stop()


def test_a_catalog_lookup_moves_to_the_next_lead(make_nodes) -> None:  # type: ignore[no-untyped-def]
    """The lead dies before a statement the router must first look up in the catalog (a
    table's serial column, a function's volatility): the lookup runs on the next lead."""
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes))
    try:
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v int)")
            conn.execute(
                "CREATE FUNCTION twice(x int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT 2 * x'"
            )
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("SELECT 1")
            nodes[0].kill()
            time.sleep(0.5)  # (the router notices the lost connection before the next statement)
            conn.execute("INSERT INTO t (v) VALUES (1), (2)")  # the serial column: a lookup
            assert conn.execute("SELECT sum(twice(v)) FROM t").fetchone() == (6,)
        assert rt.router.cluster.status["node1"].state is NodeState.FAILED
        rows = nodes[1].psql("SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM t")
        assert rows == "1:1,2:2"
        assert_nodes_identical(nodes[1:], "postgres")
    finally:
        rt.stop()


def test_statement_in_flight_is_rerun_on_the_next_lead(make_nodes) -> None:  # type: ignore[no-untyped-def]
    """The lead dies while it runs a statement inside a transaction block."""
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes))
    try:
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
            conn.execute("INSERT INTO t VALUES (1, 0)")
        blocker = psycopg.connect(nodes[0].dsn())  # holds the row on the lead only
        blocker.execute("SELECT * FROM t FOR UPDATE")
        with psycopg.connect(rt.dsn()) as conn:
            conn.execute("UPDATE t SET v = 10 WHERE id = 2")  # (no such row) opens the block
            killer = threading.Timer(1.0, nodes[0].kill)
            killer.start()
            conn.execute("UPDATE t SET v = v + 11")  # waits for the lock until the lead dies
            killer.join()
            conn.commit()
        with contextlib.suppress(psycopg.Error):
            blocker.close()
        assert [n.psql("SELECT v FROM t") for n in nodes[1:]] == ["11", "11"]
        assert_nodes_identical(nodes[1:], "postgres")
    finally:
        rt.stop()


def test_a_hanging_replica_is_failed_after_node_timeout(make_nodes) -> None:  # type: ignore[no-untyped-def]
    """A replica that stops answering (SIGSTOP) is failed node_timeout_s after the lead."""
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes, node_timeout_s=1.0))
    frozen: list[int] = []
    try:
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE h (id int PRIMARY KEY)")
            pid = nodes[2].postmaster_pid()
            assert pid is not None
            frozen = [pid, *_descendants(pid)]
            for p in frozen:
                os.kill(p, signal.SIGSTOP)
            started = time.monotonic()
            conn.execute("INSERT INTO h VALUES (1)")
            assert 0.9 < time.monotonic() - started < 10
            assert conn.execute("SELECT count(*) FROM h").fetchone() == (1,)
        st = rt.router.cluster.status["node3"]
        assert st.state is NodeState.FAILED and "no answer" in st.reason
        assert_nodes_identical(nodes[:2], "postgres")
    finally:
        for p in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        rt.stop()
