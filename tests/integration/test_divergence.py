"""Outcomes that differ between nodes are reported loudly; failed nodes are left alone."""

from __future__ import annotations

import logging

import psycopg
import pytest
from router_harness import RouterThread, router_config

from helpers import assert_nodes_identical
from pgquorum.cluster.model import NodeState


@pytest.fixture
def own_router(make_nodes):  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes, tcp=True))
    yield rt, nodes
    rt.stop()


def test_different_row_count_is_reported(own_router, caplog) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = own_router
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE d (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO d SELECT g, 0 FROM generate_series(1, 10) g")
        # Behind the router's back: node3 loses a row.
        nodes[2].psql("DELETE FROM d WHERE id = 10")
        with caplog.at_level(logging.ERROR, logger="pgquorum"):
            cur = conn.execute("UPDATE d SET v = 1")
        assert cur.rowcount == 10  # the lead's answer
    assert any("DIVERGENCE" in r.getMessage() and "node3" in r.getMessage() for r in caplog.records)
    with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
        rows = {r[0]: r for r in admin.execute("SHOW NODES").fetchall()}
    assert rows["node3"][7] == "1"  # divergences
    assert "UPDATE 9" in rows["node3"][9] and "UPDATE 10" in rows["node3"][9]
    assert rows["node1"][7] == "0" and rows["node2"][7] == "0"
    assert_nodes_identical(nodes[:2], "postgres")


def test_killed_replica_is_failed_and_writes_go_on(own_router) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = own_router
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE f (id int PRIMARY KEY)")
        conn.execute("INSERT INTO f VALUES (1)")
        nodes[2].kill()
        for i in range(2, 12):
            conn.execute("INSERT INTO f VALUES (%s)", (i,))
        assert conn.execute("SELECT count(*) FROM f").fetchone() == (11,)
    status = rt.router.cluster.status["node3"]
    assert status.state is NodeState.FAILED and status.reason
    # A new session does not use the failed node.
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO f VALUES (100)")
    assert_nodes_identical(nodes[:2], "postgres")
