"""A coordinator that dies in its recovery's replay resumes the recovery when it starts
again, from its queue on disk: the same recovery, no second restore, and the transaction the
replay was in at the crash applied exactly once (its status on the node tells whether it
committed). The peer's commits meanwhile wait for the coordinator and reach the node."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_harness import CliProcess, dsn, start, write_router_config
from recovery_harness import fail_by_killing, recover, wait_recovery
from router_harness import RouterThread, eventually, peer_config, state

from helpers import Transfers, assert_nodes_identical
from pgquorum import failpoints
from pgquorum.cluster.model import NodeState
from pgquorum.local.instance import free_port


def crash_in_the_replay_and_resume(  # type: ignore[no-untyped-def]
    make_nodes, procs, tmp_path: Path, failpoint: str
) -> None:
    nodes = make_nodes(3)
    a_port, b_port = free_port(), free_port()
    config = write_router_config(
        tmp_path / "a.toml", a_port, nodes, name="a", state_db="a.db", peers=[f"127.0.0.1:{b_port}"]
    )

    def coordinator(**env: str) -> CliProcess:
        a = start(procs, tmp_path, "router", "--config", str(config), **env)
        a.wait_port(a_port, timeout=30)
        return a

    a = coordinator(PGQUORUM_FAILPOINTS=failpoint)
    b = RouterThread(peer_config(nodes, tmp_path, "b", b_port, a_port))
    admin = dsn(a_port, "pgquorum")
    try:
        Transfers.create(b.dsn(), 100)
        fail_by_killing(b, nodes[2])
        with Transfers(b.dsn(), clients=2, accounts=100) as load:
            load.wait_commits(10)
            recover(admin, "node3")
            # The first transaction the replay commits (one of b's) hits the fail point.
            assert a.proc.wait(60) == 70, a.output()
            a = coordinator()  # (b's commits wait for it meanwhile)
            info = wait_recovery(admin, timeout=90)
            assert info["phase"] == "done", (info, a.output())
            eventually(lambda: state(b, "node3") is NodeState.ONLINE)
            load.wait_commits(10)  # through b to every node again
        assert not load.errors, load.errors
        assert info["resumed"] == "1", info
        assert "resumed after entry" in a.output(), a.output()
        assert "beginning it again" not in a.output(), a.output()
        assert nodes[2].psql("SELECT sum(balance) FROM acct") == str(Transfers.total(100))
        assert_nodes_identical(nodes, "postgres")
    finally:
        b.stop()
    assert a.terminate() == 0, a.output()


@pytest.mark.parametrize(
    "failpoint",
    [
        pytest.param(failpoints.REPLAY_BEFORE_COMMIT, id="aborted-and-replayed-again"),
        pytest.param(failpoints.REPLAY_AFTER_COMMIT, id="committed-and-skipped"),
    ],
)
def test_a_coordinator_that_dies_in_a_replayed_transaction_resumes_the_recovery(  # type: ignore[no-untyped-def]
    make_nodes, procs, tmp_path: Path, failpoint: str
) -> None:
    crash_in_the_replay_and_resume(make_nodes, procs, tmp_path, failpoint)
