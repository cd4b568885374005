"""The majority vote on statements and on commits (two-phase), and the durable node states."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from router_harness import RouterThread, router_config

from helpers import assert_nodes_identical
from pgquorum.cluster.model import NodeState
from pgquorum.local.instance import LocalNode

# A constraint trigger that fails at commit time (deferred): installed behind the router's
# back on some nodes, it makes exactly those nodes fail PREPARE TRANSACTION.
REFUSE_AT_COMMIT = """
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
    AS $$BEGIN RAISE EXCEPTION 'refused at commit on this node'; END$$;
CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON c
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse();
"""


@pytest.fixture
def cluster(make_nodes, tmp_path: Path) -> Iterator[tuple[RouterThread, list[LocalNode]]]:  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes, state_db=tmp_path / "state.db"))
    yield rt, nodes
    rt.stop()


def prepared(node: LocalNode) -> int:
    return int(node.psql("SELECT count(*) FROM pg_prepared_xacts"))


def state(rt: RouterThread, name: str) -> NodeState:
    return rt.router.cluster.status[name].state


def test_replica_with_a_different_row_count_is_failed(cluster, caplog) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE d (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO d SELECT g, 0 FROM generate_series(1, 10) g")
        nodes[2].psql("DELETE FROM d WHERE id = 10")  # behind the router's back
        with caplog.at_level(logging.ERROR, logger="pgquorum"):
            cur = conn.execute("UPDATE d SET v = 1")
        assert cur.rowcount == 10  # the majority's answer
        conn.execute("UPDATE d SET v = 2 WHERE id = 1")  # goes on without node3
    assert any("DIVERGENCE" in r.getMessage() and "node3" in r.getMessage() for r in caplog.records)
    assert state(rt, "node3") is NodeState.FAILED
    assert state(rt, "node1") is state(rt, "node2") is NodeState.ONLINE
    with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
        rows = {r[0]: r for r in admin.execute("SHOW NODES").fetchall()}
        events = admin.execute("SHOW EVENTS").fetchall()
    assert rows["node3"][4] == "FAILED"
    assert "outvoted" in rows["node3"][9] and "UPDATE 9" in rows["node3"][9]
    assert [(e[2], e[3]) for e in events] == [("node3", "FAILED")]
    assert "UPDATE 10" in events[0][4]
    assert_nodes_identical(nodes[:2], "postgres")
    assert nodes[0].psql("SELECT v FROM d WHERE id = 1") == "2"
    # Failed before the commit: its copy of the outvoted statement never committed.
    assert nodes[2].psql("SELECT v FROM d WHERE id = 1") == "0"


def test_outvoted_lead_is_failed_and_the_transaction_goes_on(cluster) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE d (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO d SELECT g, 0 FROM generate_series(1, 10) g")
    nodes[0].psql("DELETE FROM d WHERE id = 10")  # the lead diverges
    with psycopg.connect(rt.dsn()) as conn:  # a transaction block
        cur = conn.execute("UPDATE d SET v = 1")
        assert cur.rowcount == 10  # node2 and node3 outvote the lead
        conn.execute("INSERT INTO d VALUES (11, 1)")
        assert conn.execute("SELECT count(*) FROM d").fetchone() == (11,)
        conn.commit()
    assert state(rt, "node1") is NodeState.FAILED
    assert rt.router.cluster.lead().node.name == "node2"  # type: ignore[union-attr]
    assert_nodes_identical(nodes[1:], "postgres")
    assert nodes[1].psql("SELECT count(*), sum(v) FROM d") == "11|11"
    assert all(prepared(n) == 0 for n in nodes)


def test_commit_fails_to_prepare_on_a_minority(cluster) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE c (id int PRIMARY KEY)")
    nodes[2].psql(REFUSE_AT_COMMIT)
    with psycopg.connect(rt.dsn()) as conn:
        conn.execute("INSERT INTO c VALUES (1)")
        conn.commit()  # two of three prepared: committed
    assert state(rt, "node3") is NodeState.FAILED
    assert "PREPARE TRANSACTION failed" in rt.router.cluster.status["node3"].reason
    assert [n.psql("SELECT count(*) FROM c") for n in nodes] == ["1", "1", "0"]
    assert all(prepared(n) == 0 for n in nodes)
    assert_nodes_identical(nodes[:2], "postgres")


def test_commit_fails_to_prepare_on_a_majority(cluster) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE c (id int PRIMARY KEY)")
    for n in nodes[1:]:
        n.psql(REFUSE_AT_COMMIT)
    with psycopg.connect(rt.dsn()) as conn:
        conn.execute("INSERT INTO c VALUES (1)")
        with pytest.raises(errors.RaiseException, match="refused at commit"):
            conn.commit()
        # The session goes on, on the nodes that agree.
        assert conn.execute("SELECT count(*) FROM c").fetchone() == (0,)
    assert state(rt, "node1") is NodeState.FAILED  # it prepared: the minority
    assert "failed to prepare" in rt.router.cluster.status["node1"].reason
    assert [n.psql("SELECT count(*) FROM c") for n in nodes] == ["0", "0", "0"]
    assert all(prepared(n) == 0 for n in nodes)


def test_autocommit_write_is_voted_at_commit(cluster) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE c (id int PRIMARY KEY)")
        nodes[1].psql(REFUSE_AT_COMMIT)
        conn.execute("INSERT INTO c VALUES (1)")  # the statement itself succeeds everywhere
    assert state(rt, "node2") is NodeState.FAILED
    assert "PREPARE TRANSACTION failed" in rt.router.cluster.status["node2"].reason
    assert [n.psql("SELECT count(*) FROM c") for n in nodes] == ["1", "0", "1"]
    assert all(prepared(n) == 0 for n in nodes)


def test_commit_failing_everywhere_is_an_ordinary_error(cluster) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE p (id int PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE ch (id int PRIMARY KEY, p int REFERENCES p DEFERRABLE INITIALLY DEFERRED)"
        )
    with psycopg.connect(rt.dsn()) as conn:
        conn.execute("INSERT INTO ch VALUES (1, 42)")  # no parent 42: fails at commit
        with pytest.raises(errors.ForeignKeyViolation):
            conn.commit()
        conn.execute("INSERT INTO p VALUES (42)")
        conn.execute("INSERT INTO ch VALUES (1, 42)")
        conn.commit()
    assert all(st.state is NodeState.ONLINE for st in rt.router.cluster.status.values())
    assert all(prepared(n) == 0 for n in nodes)
    assert_nodes_identical(nodes, "postgres")
    assert nodes[2].psql("SELECT count(*) FROM ch") == "1"


def test_extended_protocol_commit_and_temp_tables(cluster) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE e (id int PRIMARY KEY)")
    nodes[2].psql(REFUSE_AT_COMMIT.replace(" ON c", " ON e"))
    with psycopg.connect(rt.dsn(), prepare_threshold=0) as conn:
        # COMMIT sent as Parse/Bind/Execute/Sync, the way JDBC and pgbench -M prepared do.
        conn.execute("INSERT INTO e VALUES (%s)", (1,))
        with conn.pipeline():
            conn.execute("INSERT INTO e VALUES (%s)", (2,))
            conn.execute("COMMIT", prepare=True)
        assert conn.execute("SELECT count(*) FROM e").fetchone() == (2,)
        conn.rollback()
    assert state(rt, "node3") is NodeState.FAILED
    assert all(prepared(n) == 0 for n in nodes)
    assert_nodes_identical(nodes[:2], "postgres")
    # A session with a temporary table cannot PREPARE: its commits are one-phase.
    with psycopg.connect(rt.dsn()) as conn:
        conn.execute("CREATE TEMP TABLE scratch (id int)")
        conn.execute("INSERT INTO scratch VALUES (1)")
        conn.execute("INSERT INTO e SELECT id + 10 FROM scratch")
        conn.commit()
    assert [n.psql("SELECT count(*) FROM e") for n in nodes[:2]] == ["3", "3"]


def test_failed_node_stays_failed_across_router_restarts(make_nodes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    config = router_config(nodes, state_db=tmp_path / "state.db")
    rt = RouterThread(config)
    try:
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE k (id int)")
            nodes[1].kill()
            conn.execute("INSERT INTO k VALUES (1)")
        assert state(rt, "node2") is NodeState.FAILED
    finally:
        rt.stop()
    nodes[1].start()  # back up, but it may have missed writes: it must stay out
    rt = RouterThread(config)
    try:
        assert state(rt, "node2") is NodeState.FAILED
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("INSERT INTO k VALUES (2)")
            assert conn.execute("SELECT count(*) FROM k").fetchone() == (2,)
        with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
            events = admin.execute("SHOW EVENTS").fetchall()
        assert [(e[2], e[3], e[5]) for e in events] == [("node2", "FAILED", "test-router")]
    finally:
        rt.stop()
    assert nodes[1].psql("SELECT count(*) FROM k") == "0"
    assert_nodes_identical([nodes[0], nodes[2]], "postgres")
