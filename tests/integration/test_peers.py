"""Several routers in front of one group: failures travel between peers at once."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from router_harness import RouterThread, eventually, pair_configs, state

from helpers import assert_nodes_identical
from pgquorum.cluster.model import NodeState


def test_a_failure_reaches_the_peer_and_survives_its_restart(make_nodes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a = RouterThread(config_a)
    b = RouterThread(config_b)
    try:
        with psycopg.connect(a.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE p (id int)")
        with psycopg.connect(b.dsn(), autocommit=True) as conn_b:
            conn_b.execute("INSERT INTO p VALUES (1)")  # b's session uses all three nodes
            # An operator (or a vote) fails node3 on router a only; node3 is still alive.
            with psycopg.connect(a.dsn("pgquorum"), autocommit=True) as admin:
                row = admin.execute("FAIL NODE node3 REASON 'taken out by a test'").fetchone()
            assert row == ("node3", "FAILED", "taken out by a test")
            eventually(lambda: state(b, "node3") is NodeState.FAILED)
            assert "taken out by a test" in b.router.cluster.status["node3"].reason
            # b's open session stops writing to node3 at its next statement.
            conn_b.execute("INSERT INTO p VALUES (2)")
        assert nodes[2].psql("SELECT count(*) FROM p") == "1"
        b.stop()
        (tmp_path / "b.db").unlink()  # b forgets everything: its peer tells it again
        b = RouterThread(config_b)
        assert state(b, "node3") is NodeState.FAILED
        with psycopg.connect(b.dsn(), autocommit=True) as conn_b:
            conn_b.execute("INSERT INTO p VALUES (3)")
        assert_nodes_identical(nodes[:2], "postgres")
        assert nodes[0].psql("SELECT count(*) FROM p") == "3"
    finally:
        a.stop()
        b.stop()


def test_peer_down_is_told_once_it_is_back(make_nodes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a = RouterThread(config_a)  # b is not running: a's start-up does not wait for it
    try:
        with psycopg.connect(a.dsn("pgquorum"), autocommit=True) as admin:
            admin.execute("FAIL NODE node2")
            with pytest.raises(psycopg.errors.UndefinedObject):
                admin.execute("FAIL NODE node9")
        time.sleep(0.5)  # a few failed attempts to reach b
        b = RouterThread(config_b)
        try:
            assert state(b, "node2") is NodeState.FAILED
            eventually(lambda: a.router.peers.sent >= 1)  # a's retries got through as well
        finally:
            b.stop()
    finally:
        a.stop()
