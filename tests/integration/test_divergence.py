"""Outcomes that differ between nodes are reported loudly; failed nodes are left alone."""

from __future__ import annotations

import logging
import threading
import time

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


def test_reads_outside_transactions_survive_a_killed_node(own_router) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = own_router
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE r (id int)")
        conn.execute("INSERT INTO r SELECT generate_series(1, 100)")
    errors: list[BaseException] = []
    counts: list[int] = []
    stop = threading.Event()

    def reader(prepare: bool) -> None:
        try:
            with psycopg.connect(
                rt.dsn(), autocommit=True, prepare_threshold=0 if prepare else None
            ) as c:
                while not stop.is_set():
                    counts.append(c.execute("SELECT count(*) FROM r").fetchone()[0])  # type: ignore[index]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    before = len(counts)
    nodes[1].kill()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert len(counts) > before and set(counts) == {100}
    assert rt.router.cluster.status["node2"].state is NodeState.FAILED
    assert_nodes_identical([nodes[0], nodes[2]], "postgres")


def test_node_lost_mid_answer_ends_the_session_promptly(own_router) -> None:  # type: ignore[no-untyped-def]
    """A read whose node dies after part of the answer was relayed cannot be retried: the
    client must get an error at once, not wait forever."""
    rt, nodes = own_router
    outcome: list[BaseException | None] = []

    def reader() -> None:
        try:
            with psycopg.connect(rt.dsn(), autocommit=True) as c:
                # Once the router knows these functions are not volatile, the big read takes
                # the fast path (served from callbacks, outside the session task).
                c.execute("SELECT generate_series(1, 1), repeat('x', 1)")
                # generate_series in the target list streams rows at once (in FROM it would
                # first materialize all of them).
                c.execute("SELECT generate_series(1, 20000000), repeat('x', 500)")
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=reader)
    t.start()
    serving = None
    deadline = time.time() + 20
    while serving is None and time.time() < deadline:
        serving = next((s for s in rt.router.cluster.status.values() if s.outstanding), None)
        time.sleep(0.05)
    assert serving is not None
    time.sleep(0.5)  # rows are streaming to the client by now
    next(n for n in nodes if n.name == serving.node.name).kill()
    t.join(15)
    assert not t.is_alive(), "the client was left waiting"
    assert isinstance(outcome[0], psycopg.OperationalError), outcome
    assert rt.router.cluster.status[serving.node.name].state is NodeState.FAILED
