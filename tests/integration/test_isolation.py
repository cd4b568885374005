"""REPEATABLE READ and SERIALIZABLE through the router: the isolation PostgreSQL keeps on one
server, and nodes that stay identical and ONLINE when it refuses a transaction.

Each node judges conflicts between concurrent transactions by its own timing, so one node may
refuse (SQLSTATE 40001) what another accepted. That is the transaction's failure, for the
client to retry, never a reason to fail a node or to commit the transaction on the others."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from router_harness import (
    RouterThread,
    assert_all_online,
    assert_settled,
    pair_configs,
    router_config,
)

from helpers import assert_nodes_identical
from pgquorum.local.instance import LocalNode


def at_once(calls: list[tuple[Callable[..., None], tuple[object, ...]]]) -> None:
    """Run each call in a thread of its own; fail with what any of them raised."""
    errors: list[BaseException] = []

    def run(target: Callable[..., None], args: tuple[object, ...]) -> None:
        try:
            target(*args)
        except BaseException as e:  # (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def bump_until(dsn: str, stop: float, i: int) -> None:
    """Commit `UPDATE src SET v = v + 1` of row ``i`` again and again until ``stop``."""
    with psycopg.connect(dsn, autocommit=True) as c:
        while time.monotonic() < stop:
            c.execute(f"UPDATE src SET v = v + 1 WHERE id = {i}")


def tally_until(
    dsn: str, stop: float, retried: list[int], latest: int | None = None, *, block: bool = False
) -> None:
    """Until ``stop``: INSERT the sum of src into tally and, with ``latest``, UPDATE that row
    of latest to it by a subquery; in one transaction block each time with ``block``. A
    40001 is retried: a hold that gave way (a commit waited QUIET_PATIENCE_S for it) before
    the nodes after the lead ran the statement, so a commit may have landed in between."""
    with psycopg.connect(dsn, autocommit=not block) as c:
        while time.monotonic() < stop:
            try:
                c.execute("INSERT INTO tally SELECT sum(v) FROM src")
                if latest is not None:
                    c.execute(
                        "UPDATE latest SET s = (SELECT sum(v) FROM src) WHERE id = %s", (latest,)
                    )
                if block:
                    c.commit()
            except psycopg.errors.SerializationFailure:
                retried.append(1)
                if block:
                    c.rollback()


def assert_tallied(nodes: list[LocalNode], retried: list[int]) -> None:
    """The tallies ran, few were retried, and every node holds the same."""
    tallied = int(nodes[0].psql("SELECT count(*) FROM tally"))
    print(f"{tallied} tallied, {len(retried)} retried")
    assert tallied > 100
    assert len(retried) < tallied / 4
    assert_nodes_identical(nodes, "postgres")


@pytest.fixture
def three(make_nodes) -> Iterator[tuple[RouterThread, list[LocalNode]]]:  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes))
    yield rt, nodes
    rt.stop()


def test_a_concurrent_update_fails_a_repeatable_read_transaction_everywhere(three) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as other:
        other.execute("CREATE TABLE acct (id int PRIMARY KEY, v int)")
        other.execute("INSERT INTO acct VALUES (1, 0)")
        with psycopg.connect(rt.dsn(), autocommit=True) as t1:
            t1.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            assert t1.execute("SELECT v FROM acct WHERE id = 1").fetchone() == (0,)
            other.execute("UPDATE acct SET v = v + 10 WHERE id = 1")
            with pytest.raises(psycopg.errors.SerializationFailure):
                t1.execute("UPDATE acct SET v = v + 1 WHERE id = 1")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                t1.execute("SELECT 1")  # failed on every node, not only where it was refused
            t1.execute("ROLLBACK")
            t1.execute("UPDATE acct SET v = v + 1 WHERE id = 1")  # the retry
    assert_settled(rt, nodes, "SELECT v FROM acct", "11")


def test_a_repeatable_read_snapshot_is_the_same_on_every_node(three) -> None:  # type: ignore[no-untyped-def]
    """The transaction reads on the lead only; the others must still take their snapshot
    with it, not at its first write (after a commit the lead's snapshot does not hold)."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as other:
        other.execute("CREATE TABLE item (id int PRIMARY KEY)")
        other.execute("CREATE TABLE tally (n bigint)")
        other.execute("INSERT INTO item VALUES (1), (2)")
        with psycopg.connect(rt.dsn(), autocommit=True) as t1:
            t1.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            assert t1.execute("SELECT count(*) FROM item").fetchone() == (2,)
            other.execute("INSERT INTO item VALUES (3)")
            t1.execute("INSERT INTO tally SELECT count(*) FROM item")
            t1.execute("COMMIT")
    assert_settled(rt, nodes, "SELECT n FROM tally", "2")


def test_serializable_write_skew_is_refused_and_no_node_fails(three) -> None:  # type: ignore[no-untyped-def]
    """Two SERIALIZABLE transactions each read both rows and change one: PostgreSQL lets only
    one commit. Their reads ran on the lead alone, so only the lead sees the conflict."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as setup:
        setup.execute("CREATE TABLE duty (id int PRIMARY KEY, on_call bool)")
        setup.execute("INSERT INTO duty VALUES (1, true), (2, true)")
    t1 = psycopg.connect(rt.dsn(), autocommit=True)
    t2 = psycopg.connect(rt.dsn(), autocommit=True)
    refused = 0
    try:
        for t in (t1, t2):
            t.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            assert t.execute("SELECT count(*) FROM duty WHERE on_call").fetchone() == (2,)
        t1.execute("UPDATE duty SET on_call = false WHERE id = 1")
        try:
            t2.execute("UPDATE duty SET on_call = false WHERE id = 2")
        except psycopg.errors.SerializationFailure:
            refused += 1
            t2.execute("ROLLBACK")
        t1.execute("COMMIT")
        if not refused:
            with pytest.raises(psycopg.errors.SerializationFailure):
                t2.execute("COMMIT")
    finally:
        t1.close()
        t2.close()
    on_call = "SELECT string_agg(on_call::text, ',' ORDER BY id) FROM duty"
    assert_settled(rt, nodes, on_call, "false,true")


def test_a_lock_timeout_on_the_lead_alone_fails_the_transaction_not_the_lead(three) -> None:  # type: ignore[no-untyped-def]
    """A lock only the lead has (taken there behind the router's back) makes the statement
    time out on the lead alone; the others ran it. The transaction fails everywhere."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as setup:
        setup.execute("CREATE TABLE acct (id int PRIMARY KEY, v int)")
        setup.execute("INSERT INTO acct VALUES (1, 0)")
    with psycopg.connect(nodes[0].dsn("postgres")) as direct:
        direct.execute("SELECT * FROM acct WHERE id = 1 FOR UPDATE")  # held until the end
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("SET lock_timeout = '300ms'")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO acct VALUES (2, 0)")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                conn.execute("UPDATE acct SET v = 1 WHERE id = 1")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("SELECT 1")
            conn.execute("ROLLBACK")
        direct.rollback()
    assert_settled(rt, nodes, "SELECT string_agg(id || ':' || v, ',') FROM acct", "1:0")


def test_a_node_waiting_for_a_lock_the_lead_did_not_gets_the_statement_cancelled(three) -> None:  # type: ignore[no-untyped-def]
    """A lock that only a node after the lead has (taken there behind the router's back, as
    a statement that met another in the opposite order would hold it): the statement would
    wait there until node_timeout_s and fail that node. The router cancels it there instead
    (a deadlock across the nodes), and the transaction fails everywhere with 40P01."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as setup:
        setup.execute("CREATE TABLE acct (id int PRIMARY KEY, v int)")
        setup.execute("INSERT INTO acct VALUES (1, 0)")
    assert rt.router.cluster.lead().node.name == nodes[0].name  # type: ignore[union-attr]
    with psycopg.connect(nodes[1].dsn("postgres")) as direct:
        direct.execute("SELECT * FROM acct WHERE id = 1 FOR UPDATE")  # held until the end
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            began = time.monotonic()
            with pytest.raises(psycopg.errors.DeadlockDetected) as e:
                conn.execute("UPDATE acct SET v = 1 WHERE id = 1")
            took = time.monotonic() - began
            assert "deadlock detected across the nodes" in str(e.value)
            assert conn.execute("SELECT count(*) FROM acct").fetchone() == (1,)  # serves on
        direct.rollback()
    # Seen on the router's one-second tick after CROSS_WAIT_S, far from node_timeout_s.
    assert took < 5, took
    assert_settled(rt, nodes, "SELECT v FROM acct", "0")


def test_writes_computed_from_rows_others_commit_meanwhile_stay_identical(three) -> None:  # type: ignore[no-untyped-def]
    """READ COMMITTED writes that read rows they do not lock (INSERT ... SELECT sum(), an
    UPDATE with a subquery) while other sessions commit changes to those rows: each node
    must compute the same values (no commit may land between the lead's run and the
    others')."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as setup:
        setup.execute("CREATE TABLE src (id int PRIMARY KEY, v int)")
        setup.execute("INSERT INTO src SELECT g, 0 FROM generate_series(1, 4) g")
        setup.execute("CREATE TABLE tally (s bigint)")
        setup.execute("CREATE TABLE latest (id int PRIMARY KEY, s bigint)")
        setup.execute("INSERT INTO latest VALUES (0, 0), (1, 0)")
    stop = time.monotonic() + 5.0
    dsn = rt.dsn()
    retried: list[int] = []
    at_once(
        [
            *((bump_until, (dsn, stop, i)) for i in (1, 2, 3)),
            (tally_until, (dsn, stop, retried, 0)),
            (functools.partial(tally_until, block=True), (dsn, stop, retried, 1)),
        ]
    )
    assert_all_online(rt)
    # It ran, and the holds did not slow it much: a statement that waits for a lock of a
    # transaction whose commit it holds back lets it go (QUIET_PATIENCE_S). (About 250 rows
    # here with or without the holds; some 50 when a hold kept commits back for 250 ms.)
    assert_tallied(nodes, retried)


def test_updates_by_a_condition_rows_commit_into_meanwhile_stay_identical(three) -> None:  # type: ignore[no-untyped-def]
    """An UPDATE whose WHERE does not pin a unique key (`WHERE state = 'new'`) while other
    sessions commit rows that match it: every node must change the same rows (a commit
    landing between the lead's run and the others' would be matched on some nodes only,
    and the vote would fail the rest)."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as setup:
        setup.execute("CREATE TABLE jobs (id int PRIMARY KEY, state text)")
    stop = time.monotonic() + 5.0

    def add(first: int) -> None:
        with psycopg.connect(rt.dsn(), autocommit=True) as c:
            n = first
            while time.monotonic() < stop:
                c.execute(f"INSERT INTO jobs VALUES ({n}, 'new')")
                n += 2

    retried = []

    def take() -> None:
        with psycopg.connect(rt.dsn(), autocommit=True) as c:
            while time.monotonic() < stop:
                try:
                    c.execute("UPDATE jobs SET state = 'taken' WHERE state = 'new'")
                except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
                    # Two takers wait for each other's rows on the lead: commits then go
                    # on under the one that waits, so the nodes may see different rows (the
                    # statement fails for the client to retry, never a node), and the two
                    # may lock rows in opposite orders on two nodes (one is cancelled).
                    retried.append(1)

    at_once([(add, (0,)), (add, (1,)), (take, ()), (take, ())])
    assert_all_online(rt)
    assert int(nodes[0].psql("SELECT count(*) FROM jobs WHERE state = 'taken'")) > 50
    assert_nodes_identical(nodes, "postgres")


def test_writes_computed_from_rows_a_peer_router_commits_stay_identical(
    make_nodes,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """As above, with the commits made through another router: a router's own holds cannot
    see them, so the hold must also keep the peers' commits back (the quiet lock on the
    lead)."""
    nodes = make_nodes(3)
    a, b = (RouterThread(c) for c in pair_configs(nodes, tmp_path))
    try:
        with psycopg.connect(a.dsn(), autocommit=True) as setup:
            setup.execute("CREATE TABLE src (id int PRIMARY KEY, v int)")
            setup.execute("INSERT INTO src SELECT g, 0 FROM generate_series(1, 4) g")
            setup.execute("CREATE TABLE tally (s bigint)")
        stop = time.monotonic() + 5.0
        retried: list[int] = []
        at_once(
            [
                (bump_until, (b.dsn(), stop, 1)),
                (bump_until, (b.dsn(), stop, 2)),
                (bump_until, (a.dsn(), stop, 3)),
                (tally_until, (a.dsn(), stop, retried)),
                (tally_until, (b.dsn(), stop, retried)),
            ]
        )
        assert_all_online(a)
        assert_all_online(b)
        assert_tallied(nodes, retried)
    finally:
        a.stop()
        b.stop()
