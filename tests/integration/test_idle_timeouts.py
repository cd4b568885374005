"""A node that ends an idle connection for one of its idle timeouts is well: it is never
failed for that. idle_in_transaction_session_timeout ends the client's session (as on
PostgreSQL), idle_session_timeout only makes the router connect to the node again."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from router_harness import (
    RouterThread,
    assert_all_online,
    assert_settled,
    eventually,
    router_config,
)

from helpers import assert_nodes_identical
from pgquorum.local.instance import LocalNode


@pytest.fixture
def three(make_nodes) -> tuple[RouterThread, list[LocalNode]]:  # type: ignore[no-untyped-def]
    """A router of its own: a wrong outcome here fails nodes, which no other test may see."""
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes))
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
    yield rt, nodes
    rt.stop()


def test_idle_in_transaction_timeout_ends_the_session_and_fails_no_node(three) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = three
    conn = psycopg.connect(rt.dsn(), autocommit=True)
    conn.execute("SET idle_in_transaction_session_timeout = '300ms'")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (1, 'never committed')")
    time.sleep(1.0)  # every node rolls the transaction back and ends its connection
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT 1")
    assert e.value.sqlstate == "25P03", e.value
    assert "idle-in-transaction timeout" in str(e.value)
    conn.close()
    eventually(lambda: not rt.router.sessions, what="the session is gone")
    assert_all_online(rt)
    with psycopg.connect(rt.dsn(), autocommit=True) as other:
        other.execute("INSERT INTO t VALUES (2, 'after')")
        assert other.execute("SELECT id FROM t ORDER BY id").fetchall() == [(2,)]
    assert_settled(rt, nodes, "SELECT string_agg(id::text, ',') FROM t", "2")


def test_idle_session_timeout_keeps_the_session(three) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("SET idle_session_timeout = '300ms'")
        time.sleep(1.0)  # every node ends its connection of this session
        conn.execute("INSERT INTO t VALUES (1, 'after the timeout')")
        assert conn.execute("SELECT note FROM t").fetchall() == [("after the timeout",)]
        # The session's settings went along to the new connections.
        assert conn.execute("SHOW idle_session_timeout").fetchone() == ("300ms",)
    assert_all_online(rt)
    assert_nodes_identical(nodes, "postgres")


def test_nodes_a_session_does_not_read_from_may_close_its_idle_connections(three) -> None:  # type: ignore[no-untyped-def]
    """Reads go to the session's home node; the others wait, and their idle_session_timeout
    ends those connections while the session is busy. Its next write must still reach
    every node, and no node may be failed."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1, 'before')")
        conn.execute("SET idle_session_timeout = '400ms'")
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
            time.sleep(0.05)
        conn.execute("INSERT INTO t VALUES (2, 'after')")
        conn.execute("UPDATE t SET note = note || '!'")
    assert_settled(rt, nodes, "SELECT string_agg(note, ',' ORDER BY id) FROM t", "before!,after!")


def test_nodes_that_close_idle_connections_during_a_long_read_fail_no_node(three) -> None:  # type: ignore[no-untyped-def]
    """The other nodes end their idle connections while a long read runs on the session's
    home node (the session is busy, not waiting for its client): its next write connects to
    them again instead of failing them."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1, 'before')")
        conn.execute("SET idle_session_timeout = '300ms'")
        row = conn.execute("SELECT count(*) FROM generate_series(1, 8000000)").fetchone()
        assert row == (8000000,)
        conn.execute("INSERT INTO t VALUES (2, 'after')")
    assert_settled(rt, nodes, "SELECT string_agg(note, ',' ORDER BY id) FROM t", "before,after")


def test_nodes_waiting_for_a_long_statement_on_the_lead_are_kept_alive(three) -> None:  # type: ignore[no-untyped-def]
    """The lead waits for a lock for seconds; meanwhile the other nodes wait idle in the
    transaction, longer than its idle_in_transaction_session_timeout: the router keeps
    their connections alive, and the transaction commits on every node."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as setup:
        setup.execute("INSERT INTO t VALUES (1, 'free')")
    holder = psycopg.connect(rt.dsn())
    holder.execute("UPDATE t SET note = 'held' WHERE id = 1")  # the row's lock, everywhere
    conn = psycopg.connect(rt.dsn(), autocommit=True)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            conn.execute("SET idle_in_transaction_session_timeout = '1500ms'")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (2, 'mine')")  # every node is in the transaction
            conn.execute("UPDATE t SET note = note || ', then mine' WHERE id = 1")  # waits
            conn.execute("COMMIT")
        except BaseException as e:  # (reported by the test)
            errors.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(4.0)  # the lead waits for the lock, the others idle for longer than 1.5 s
    holder.commit()
    holder.close()
    thread.join(30)
    conn.close()
    assert not thread.is_alive()
    assert not errors, errors
    notes = "SELECT string_agg(note, '|' ORDER BY id) FROM t"
    assert_settled(rt, nodes, notes, "held, then mine|mine")


def test_a_node_too_full_to_connect_to_again_ends_the_session_not_the_node(three) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as admin:
        admin.execute("CREATE ROLE capped LOGIN CONNECTION LIMIT 2")
        admin.execute("GRANT ALL ON t TO capped")
    a = psycopg.connect(rt.dsn(user="capped"), autocommit=True)
    a.execute("SET idle_session_timeout = '300ms'")
    time.sleep(1.0)  # every node closed a's connections
    others = [psycopg.connect(rt.dsn(user="capped"), autocommit=True) for _ in range(2)]
    try:
        with pytest.raises(psycopg.OperationalError) as e:
            a.execute("INSERT INTO t VALUES (1, 'needs every node')")
        assert e.value.sqlstate == "53300", e.value
        assert "too many connections" in str(e.value)
        others[0].execute("INSERT INTO t VALUES (2, 'through a session that has its nodes')")
    finally:
        a.close()
        for o in others:
            o.close()
    assert_settled(rt, nodes, "SELECT string_agg(id::text, ',') FROM t", "2")
