"""VERIFY / pgquorum verify: nodes compared at one consistent point, under load."""

from __future__ import annotations

import threading

import psycopg
import pytest
from cli_harness import run_cli
from router_harness import RouterThread, router_config

from helpers import Transfers, assert_nodes_identical
from pgquorum.cluster.model import NodeState
from pgquorum.local.instance import free_port


@pytest.fixture
def cluster(make_nodes):  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes))
    Transfers.create(rt.dsn(), 1000)
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE log (msg text)")  # no primary key
        conn.execute("INSERT INTO log VALUES ('a'), ('b')")
    yield rt, nodes
    rt.stop()


def test_identical_under_load_then_a_row_changed_behind_the_routers_back(cluster) -> None:  # type: ignore[no-untyped-def]
    rt, nodes = cluster
    with (
        Transfers(rt.dsn(), clients=4, accounts=1000) as load,
        psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin,
    ):
        for _ in range(3):  # a consistent cut every time, though commits never stop
            load.wait_commits(20)
            cur = admin.execute("VERIFY")
            assert cur.fetchall() == [] and cur.statusmessage == "VERIFY"
    assert not load.errors
    assert_nodes_identical(nodes, "postgres")  # what VERIFY said, checked another way
    nodes[1].psql("UPDATE acct SET balance = 0 WHERE id = 777")  # behind the router's back
    nodes[2].psql("INSERT INTO log VALUES ('c')")
    res = run_cli("verify", "--port", str(rt.port))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "node2" in res.stdout and "acct" in res.stdout and "node3" in res.stdout
    with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
        rows = admin.execute("VERIFY").fetchall()
        acct = [r for r in rows if r[1] == "public.acct"]
        assert [r[3] for r in acct] == ["node2"]
        lo, hi = acct[0][2].split("[")[1].rstrip(")").split(", ")
        assert (lo == "-inf" or int(lo.strip("'")) <= 777) and (
            hi == "+inf" or int(hi.strip("'")) > 777
        )
        assert [r[3] for r in rows if r[1] == "public.log"] == ["node3"]
        admin.execute("VERIFY FAIL MINORITY")
    status = rt.router.cluster.status
    assert status["node2"].state is status["node3"].state is NodeState.FAILED
    assert status["node1"].state is NodeState.ONLINE


def test_hold_commits_holds_them_until_released(cluster) -> None:  # type: ignore[no-untyped-def]
    """What a peer's VERIFY asks of this router: no commit gets through while it holds."""
    rt, nodes = cluster
    with (
        psycopg.connect(rt.dsn()) as conn,
        psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin,
    ):
        conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = 1")
        cur = admin.execute("HOLD COMMITS")
        assert cur.statusmessage == "HOLD COMMITS" and cur.fetchone()[0] == "t"  # type: ignore[index]
        done = threading.Event()
        committer = threading.Thread(target=lambda: (conn.commit(), done.set()))
        committer.start()
        assert not done.wait(0.7)  # held back by the barrier
        assert admin.execute("RELEASE COMMITS").statusmessage == "RELEASE COMMITS"
        assert done.wait(10)
        committer.join()
    assert nodes[2].psql("SELECT balance FROM acct WHERE id = 1") == "101"
    # A hold ends with the admin session that took it.
    with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
        admin.execute("HOLD COMMITS")
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = 1")
    assert nodes[0].psql("SELECT balance FROM acct WHERE id = 1") == "102"
    assert_nodes_identical(nodes, "postgres")


def test_verify_refuses_without_every_peers_barrier(make_nodes) -> None:  # type: ignore[no-untyped-def]
    nodes = make_nodes(2)
    gone = free_port()  # a peer router that is not running: it might still be committing
    rt = RouterThread(router_config(nodes, peers=(("127.0.0.1", gone),)))
    try:
        with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="peer router"):
                admin.execute("VERIFY")
            admin.execute("HOLD COMMITS")
            admin.execute("HOLD COMMITS")  # twice in one session: still one hold
            admin.execute("RELEASE COMMITS")
            done = threading.Event()

            def create() -> None:
                with psycopg.connect(rt.dsn(), autocommit=True) as conn:
                    conn.execute("CREATE TABLE z (id int PRIMARY KEY)")
                done.set()

            threading.Thread(target=create, daemon=True).start()
            # Commits flow again, with the admin session still open (well before a hold
            # left behind would lapse by itself).
            assert done.wait(3)
        assert_nodes_identical(nodes, "postgres")
    finally:
        rt.stop()


def test_a_hold_that_lapses_ends_its_holders_connection(
    cluster,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that kept a hold too long must not go on as if it still held: its next
    command fails, and commits flow again."""
    rt, nodes = cluster
    monkeypatch.setattr("pgquorum.router.admin.HOLD_MAX_S", 0.3)
    with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
        admin.execute("HOLD COMMITS")
        done = threading.Event()

        def update() -> None:  # held at first, then let go by the lapse itself
            with psycopg.connect(rt.dsn(), autocommit=True) as conn:
                conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = 1")
            done.set()

        threading.Thread(target=update, daemon=True).start()
        assert done.wait(10)  # the holder's session is still open
        with pytest.raises(psycopg.OperationalError):
            admin.execute("RELEASE COMMITS")
    assert_nodes_identical(nodes, "postgres")
