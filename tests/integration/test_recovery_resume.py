"""A coordinator that dies in its recovery's replay resumes the recovery when it starts
again, from its queue on disk: the same recovery, no second restore, and the transaction the
replay was in at the crash applied exactly once (its status on the node tells whether it
committed). The peer's commits meanwhile wait for the coordinator and reach the node."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cli_harness import CliProcess, dsn, start, write_router_config
from recovery_harness import fail_by_killing, recover, recovery, wait_recovery
from router_harness import RouterThread, eventually, peer_config, state

from helpers import Transfers, assert_nodes_identical
from pgquorum import failpoints
from pgquorum.cluster.model import NodeState
from pgquorum.local.instance import LocalNode, free_port
from pgquorum.recovery.coordinator import CATCH_UP_DEPTH


@dataclass
class Pair:
    """Coordinator a (a process, restarted by ``restart``) and its peer b (a thread)."""

    nodes: list[LocalNode]
    a: CliProcess
    b: RouterThread
    admin: str  # a's admin console
    restart: Callable[[], CliProcess]

    def restart_a(self) -> None:
        assert self.a.proc.wait(60) == 70, self.a.output()  # the fail point
        self.a = self.restart()

    def ends_resumed(self) -> None:
        """The recovery ends ONLINE everywhere, resumed once and never begun again."""
        info = wait_recovery(self.admin, timeout=90)
        assert info["phase"] == "done", (info, self.a.output())
        assert info["resumed"] == "1", info
        assert len(info["pauses_ms"].split(",")) == 2, info  # the snapshot's, the switch's
        eventually(lambda: state(self.b, "node3") is NodeState.ONLINE)
        assert "resumed after entry" in self.a.output(), self.a.output()
        assert "beginning it again" not in self.a.output(), self.a.output()


@pytest.fixture
def pair(make_nodes, procs, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:  # type: ignore[no-untyped-def]
    """node3 FAILED; a armed with the fail point ``request.param``."""
    nodes = make_nodes(3)
    a_port, b_port = free_port(), free_port()
    config = write_router_config(
        tmp_path / "a.toml", a_port, nodes, name="a", state_db="a.db", peers=[f"127.0.0.1:{b_port}"]
    )

    def coordinator(**env: str) -> CliProcess:
        a = start(procs, tmp_path, "router", "--config", str(config), **env)
        a.wait_port(a_port, timeout=30)
        return a

    a = coordinator(PGQUORUM_FAILPOINTS=request.param)
    b = RouterThread(peer_config(nodes, tmp_path, "b", b_port, a_port))
    try:
        Transfers.create(b.dsn(), 100)
        fail_by_killing(b, nodes[2])
        p = Pair(nodes, a, b, dsn(a_port, "pgquorum"), coordinator)
        yield p
        assert p.a.terminate() == 0, p.a.output()
    finally:
        b.stop()


@pytest.mark.parametrize(
    "pair",
    [
        pytest.param(failpoints.REPLAY_BEFORE_COMMIT, id="aborted-and-replayed-again"),
        pytest.param(failpoints.REPLAY_AFTER_COMMIT, id="committed-and-skipped"),
    ],
    indirect=True,
)
def test_a_coordinator_that_dies_in_a_replayed_transaction_resumes_the_recovery(
    pair: Pair,
) -> None:
    with Transfers(pair.b.dsn(), clients=2, accounts=100) as load:
        load.wait_commits(10)
        recover(pair.admin, "node3")
        # The first transaction the replay commits (one of b's) hits the fail point; b's
        # commits wait for the coordinator meanwhile.
        pair.restart_a()
        pair.ends_resumed()
        load.wait_commits(10)  # through b to every node again
    assert not load.errors, load.errors
    nodes = pair.nodes
    assert nodes[2].psql("SELECT sum(balance) FROM acct") == str(Transfers.total(100))
    assert_nodes_identical(nodes, "postgres")


@pytest.mark.parametrize("pair", [failpoints.REPLAY_BEFORE_COMMIT], indirect=True)
def test_a_setting_made_during_the_recovery_survives_a_resume(pair: Pair) -> None:
    """A session SETs its search_path while the node replays; the coordinator dies in the
    replay of the session's next transaction. The new replay connection starts with the
    setting (each entry carries the session's settings), so the rows land in the same
    schema on the recovered node, before the crash and after it."""
    with (
        psycopg.connect(pair.b.dsn(), autocommit=True) as conn,
        psycopg.connect(pair.b.dsn()) as holder,
    ):
        conn.execute("CREATE SCHEMA other")
        conn.execute("CREATE TABLE other.h (v text)")
        conn.execute("CREATE TABLE public.h (v text)")
        # A transaction that wrote, left open: the recovery stays in its replay phase.
        holder.execute("INSERT INTO public.h VALUES ('held')")
        recover(pair.admin, "node3")
        eventually(lambda: recovery(pair.admin).get("phase") == "replay", timeout=60)
        conn.execute("SET search_path TO other, public")
        conn.execute("INSERT INTO h VALUES ('before the crash')")  # the replay dies in it
        with psycopg.connect(pair.b.dsn(), autocommit=True) as other:
            for _ in range(CATCH_UP_DEPTH + 5):  # so that the replay goes (see _replay_until)
                other.execute("INSERT INTO public.h VALUES ('more')")
        pair.restart_a()
        conn.execute("INSERT INTO h VALUES ('after it')")
        holder.commit()
        pair.ends_resumed()
    nodes = pair.nodes
    assert nodes[2].psql("SELECT count(*) FROM other.h") == "2"
    assert nodes[2].psql("SELECT count(*) FROM public.h") == str(CATCH_UP_DEPTH + 6)
    assert_nodes_identical(nodes, "postgres")
