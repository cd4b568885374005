"""Recovery with several routers: peers queue their commits into the coordinator's queue, and
routers that restart during a recovery rejoin it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cli_harness import (
    CliProcess,
    dsn,
    start,
    start_workers,
    worker_dsn,
    worker_states,
    write_router_config,
)
from recovery_harness import (
    fail_by_killing,
    recover,
    recover_held_open,
    recovery,
    wait_recovery,
)
from router_harness import (
    RouterThread,
    eventually,
    pair_configs,
    peer_config,
    state,
    wait_resolved,
)

from helpers import Transfers, assert_nodes_identical
from pgquorum import failpoints
from pgquorum.cluster.model import Node, NodeState
from pgquorum.config import Config
from pgquorum.local.instance import LocalNode, _descendants, free_port
from pgquorum.protocol.errors import PgError
from pgquorum.recovery import queue as queue_module
from pgquorum.recovery.queue import RemoteQueue
from pgquorum.router import peers
from pgquorum.router.backend import NodeLost
from pgquorum.router.peers import hold_everywhere


def setup_table(rt: RouterThread) -> None:
    Transfers.create(rt.dsn(), 100)
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE h (v text)")


def recovering_at(a: RouterThread, b: RouterThread, nodes: list[LocalNode]) -> psycopg.Connection:
    """node3 killed and failed on both routers, recovered by a and held in the replay by the
    returned connection's open transaction (see recover_held_open)."""
    setup_table(a)
    fail_by_killing(a, nodes[2])
    eventually(lambda: state(b, "node3") is NodeState.FAILED)
    return recover_held_open(a)


def rejoined(config_b: Config) -> RouterThread:
    """Router b started again during a's recovery of node3: it found the recovery and
    queues into it; a commit through it (account 1 + 5) goes to a's queue."""
    b = RouterThread(config_b)
    assert state(b, "node3") is NodeState.RECOVERING
    assert b.router.recovery_sink is not None
    with psycopg.connect(b.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE acct SET balance = balance + 5 WHERE id = 1")
    return b


def ends_online(
    a: RouterThread,
    b: RouterThread,
    nodes: list[LocalNode],
    holder: psycopg.Connection,
    balance: int,
) -> None:
    """``holder`` (see recovering_at) ends its transaction: the recovery ends ONLINE on
    both routers, account 1 has ``balance`` on the recovered node, and the nodes agree."""
    holder.commit()
    holder.close()
    info = wait_recovery(a)
    assert info["phase"] == "done", info
    eventually(lambda: state(b, "node3") is NodeState.ONLINE)
    assert nodes[2].psql("SELECT balance FROM acct WHERE id = 1") == str(balance)
    assert_nodes_identical(nodes, "postgres")


def test_commits_through_a_peer_reach_the_recovered_node(make_nodes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a, b = RouterThread(config_a), RouterThread(config_b)
    try:
        setup_table(a)
        with (
            Transfers(a.dsn(), clients=2, accounts=100) as load_a,
            Transfers(b.dsn(), clients=2, accounts=100) as load_b,
        ):
            load_a.wait_commits(20)
            load_b.wait_commits(20)
            fail_by_killing(a, nodes[2])
            eventually(lambda: state(b, "node3") is NodeState.FAILED)
            recover(a, "node3")
            info = wait_recovery(a)
            assert info["phase"] == "done", info
            eventually(lambda: state(b, "node3") is NodeState.ONLINE)
            load_a.wait_commits(20)  # both routers write to node3 again
            load_b.wait_commits(20)
        assert not load_a.errors and not load_b.errors, (load_a.errors, load_b.errors)
        assert int(info["replayed"]) > 0
        with psycopg.connect(b.dsn(), autocommit=True) as conn:
            conn.execute("INSERT INTO h VALUES ('through b, after')")
        assert nodes[2].psql("SELECT count(*) FROM h") == "1"
        assert nodes[2].psql("SELECT sum(balance) FROM acct") == str(Transfers.total(100))
        assert_nodes_identical(nodes, "postgres")
    finally:
        a.stop()
        b.stop()


def test_a_batch_whose_answer_a_peer_lost_is_applied_once(
    make_nodes,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The link from b to the coordinator breaks after a batch of b's queue operations
    arrived, before the answer came back: b sends the batch again, the coordinator answers
    it again without applying it twice, and the recovery goes on."""
    nodes = make_nodes(3)
    lost: list[int] = []
    exchange = queue_module.RemoteQueue._exchange

    async def answer_lost_once(self: RemoteQueue, ops: list[str], batch: int) -> list[int]:
        serials = await exchange(self, ops, batch)
        if not lost:
            lost.append(batch)
            raise NodeLost(Node("a", "127.0.0.1", 1), "connection reset (the test)")
        return serials

    monkeypatch.setattr(queue_module.RemoteQueue, "_exchange", answer_lost_once)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a, b = RouterThread(config_a), RouterThread(config_b)
    try:
        holder = recovering_at(a, b, nodes)
        with psycopg.connect(b.dsn(), autocommit=True) as conn:
            for _ in range(5):
                conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = 1")
        assert lost == [1]
        ends_online(a, b, nodes, holder, balance=105)
    finally:
        a.stop()
        b.stop()


def test_a_peer_restarting_during_a_recovery_waits_for_a_slow_coordinator(
    make_nodes,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The coordinator answers a restarting peer too slowly the first time: the peer asks
    again rather than failing the node (which would end a recovery that goes well)."""
    nodes = make_nodes(3)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a, b = RouterThread(config_a), RouterThread(config_b)
    try:
        holder = recovering_at(a, b, nodes)
        b.stop()
        slow = [True]
        admin_query = peers.admin_query

        async def slow_once(*args: Any, **kwargs: Any) -> Any:
            if slow and "SHOW NODES" in args:
                slow.clear()
                await asyncio.sleep(peers.PULL_TIMEOUT_S + 0.5)
            return await admin_query(*args, **kwargs)

        monkeypatch.setattr(peers, "PULL_TIMEOUT_S", 1.0)
        monkeypatch.setattr(peers, "admin_query", slow_once)
        b = rejoined(config_b)
        assert not slow  # the first answer was too late
        ends_online(a, b, nodes, holder, balance=105)
    finally:
        a.stop()
        b.stop()


def test_routers_that_restart_during_a_recovery_rejoin_it(make_nodes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes = make_nodes(3)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a, b = RouterThread(config_a), RouterThread(config_b)
    try:
        holder = recovering_at(a, b, nodes)
        # The peer restarts: it finds the recovery at a and queues its commits there.
        b.stop()
        b = rejoined(config_b)
        # The coordinator restarts (its open transaction dies with it): it begins the
        # recovery again, and the peer follows the new one.
        holder.close()
        a.stop()
        a = RouterThread(config_a)
        info = wait_recovery(a)
        assert info["phase"] == "done", info
        eventually(lambda: state(b, "node3") is NodeState.ONLINE)
        with psycopg.connect(b.dsn(), autocommit=True) as conn:
            conn.execute("UPDATE acct SET balance = balance + 7 WHERE id = 2")
        assert nodes[2].psql("SELECT balance FROM acct WHERE id IN (1, 2) ORDER BY id") == (
            "105\n107"
        )
        assert_nodes_identical(nodes, "postgres")
    finally:
        a.stop()
        b.stop()


def fail_under_workers(router: CliProcess, port: int, node: LocalNode) -> None:
    """Kill ``node``'s server, wait until both workers know it FAILED (the load made one
    fail it), restart it."""
    node.kill()
    deadline = time.monotonic() + 30
    while any(NodeState.FAILED.value not in worker_states(port, i) for i in (0, 1)):
        assert time.monotonic() < deadline, router.output()
        time.sleep(0.2)
    node.start()


def test_recovery_through_router_workers(make_nodes, procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two worker processes on one port: the sibling queues into the coordinator over its
    private socket."""
    nodes = make_nodes(3)
    router, port, _ = start_workers(procs, tmp_path, nodes)
    Transfers.create(dsn(port), 100)
    with Transfers(dsn(port), clients=6, accounts=100) as load:  # spread over both workers
        load.wait_commits(20)
        fail_under_workers(router, port, nodes[2])
        recover(worker_dsn(port, 1), "node3")  # worker 1 coordinates
        info = wait_recovery(worker_dsn(port, 1), timeout=60)
        assert info["phase"] == "done", info

        # Worker 0 learns it from its sibling.
        eventually(lambda: worker_states(port, 0) == ["ONLINE"] * 3)
        load.wait_commits(50)  # both workers write to node3 again
    assert not load.errors, load.errors
    assert int(info["replayed"]) > 0
    assert [worker_states(port, i) for i in (0, 1)] == [["ONLINE"] * 3] * 2
    assert nodes[2].psql("SELECT sum(balance) FROM acct") == str(Transfers.total(100))
    assert_nodes_identical(nodes, "postgres")
    assert router.terminate() == 0, router.output()


def worker_pid(router_pid: int, index: int) -> int:
    """The process of worker ``index`` (a child of worker 0's process)."""
    for pid in _descendants(router_pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--worker" in argv and argv[argv.index(b"--worker") + 1] == str(index).encode():
                return pid
    raise AssertionError(f"no worker {index} under process {router_pid}")


def test_a_coordinator_killed_mid_recovery_resumes_it_under_load(  # type: ignore[no-untyped-def]
    make_nodes, procs, tmp_path: Path
) -> None:
    """kill -9 of the router that runs a recovery, while its peer commits all the time: the
    peer's commits wait for the coordinator instead of failing the node, the coordinator
    comes back (worker 0 restarts it) and resumes the recovery from its queue on disk (the
    same recovery, no second restore), and it ends ONLINE."""
    nodes = make_nodes(3)
    router, port, _ = start_workers(procs, tmp_path, nodes)
    Transfers.create(dsn(port), 100)
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        conn.execute("CREATE TABLE h (v text)")
    peer = worker_dsn(port, 0, "postgres")
    coordinator = worker_dsn(port, 1)
    with Transfers(peer, clients=4, accounts=100) as load:
        load.wait_commits(20)
        fail_under_workers(router, port, nodes[2])
        # A transaction that wrote, open at the peer, keeps the recovery from switching.
        holder = psycopg.connect(peer)
        holder.execute("INSERT INTO h VALUES ('held')")
        recover(coordinator, "node3")
        eventually(lambda: recovery(coordinator)["phase"] == "replay", timeout=60)
        first = recovery(coordinator)
        load.wait_commits(20)  # queued through the peer, replayed meanwhile
        os.kill(worker_pid(router.proc.pid, 1), signal.SIGKILL)

        def resumed() -> bool:
            with contextlib.suppress(psycopg.OperationalError):
                info = recovery(coordinator)
                return info.get("resumed") == "1" and info.get("phase") == "replay"
            return False

        eventually(resumed, timeout=60)
        again = recovery(coordinator)
        assert again["recovery"] == first["recovery"], (first, again)
        load.wait_commits(20)  # the peer commits into the same recovery
        holder.commit()
        holder.close()
        info = wait_recovery(coordinator, timeout=60)
        assert info["phase"] == "done", info

        eventually(lambda: worker_states(port, 0) == ["ONLINE"] * 3)
        load.wait_commits(20)
    assert not load.errors, load.errors
    assert "resumed after entry" in router.output(), router.output()
    with psycopg.connect(worker_dsn(port, 0), autocommit=True) as admin:
        events = [(e[2], e[3]) for e in admin.execute("SHOW EVENTS").fetchall()]
    assert events.count(("node3", "FAILED")) == 1, events  # the kill only, never the restart
    assert nodes[2].psql("SELECT v FROM h") == "held"
    assert nodes[2].psql("SELECT sum(balance) FROM acct") == str(Transfers.total(100))
    assert_nodes_identical(nodes, "postgres")
    assert router.terminate() == 0, router.output()


def crash_in_a_commit(  # type: ignore[no-untyped-def]
    make_nodes, procs, tmp_path: Path, failpoint: str, then: str = ""
) -> tuple[RouterThread, CliProcess, list[LocalNode], psycopg.Connection]:
    """Peer b (a process) dies at ``failpoint`` in a commit of its client's while a recovers
    node3 (held in its replay by the returned connection), and is started again (with the
    fail points ``then``)."""
    nodes = make_nodes(3)
    a_port, b_port = free_port(), free_port()
    a = RouterThread(peer_config(nodes, tmp_path, "a", a_port, b_port))
    cfg = write_router_config(
        tmp_path / "b.toml", b_port, nodes, name="b", state_db="b.db", peers=[f"127.0.0.1:{a_port}"]
    )
    b = start(procs, tmp_path, "router", "--config", str(cfg), PGQUORUM_FAILPOINTS=failpoint)
    b.wait_port(b_port, timeout=30)
    setup_table(a)
    fail_by_killing(a, nodes[2])
    holder = recover_held_open(a)
    with psycopg.connect(dsn(b_port)) as conn, pytest.raises(psycopg.OperationalError):
        conn.execute("UPDATE acct SET balance = balance + 10 WHERE id = 1")
        conn.commit()
    assert b.proc.wait(10) == 70, b.output()
    b = start(procs, tmp_path, "router", "--config", str(cfg), PGQUORUM_FAILPOINTS=then)
    b.wait_port(b_port, timeout=30)
    return a, b, nodes, holder


def failed_by_the_resolver(a: RouterThread, nodes: list[LocalNode]) -> None:
    """The recovery of node3 failed because a resolver committed outside its queue; the
    transaction is on the ONLINE nodes."""
    info = wait_recovery(a)
    assert info["phase"] == "failed", info
    assert "in-doubt transaction" in info["error"], info
    assert state(a, "node3") is NodeState.FAILED
    assert nodes[0].psql("SELECT balance FROM acct WHERE id = 1") == "110"


def test_a_peer_that_crashes_in_a_commit_during_a_recovery_fails_it(  # type: ignore[no-untyped-def]
    make_nodes, procs, tmp_path: Path
) -> None:
    """A peer dies after its commit decision, before the transaction reached the queue; when
    it restarts, its resolver commits the transaction on the ONLINE nodes, after the
    recovery's snapshot and outside its queue. The recovery must fail (the node would miss
    the transaction), never end ONLINE."""
    a, _, nodes, holder = crash_in_a_commit(make_nodes, procs, tmp_path, failpoints.AFTER_DECISION)
    try:
        # The restarted peer's resolver commits the transaction and fails the node
        # everywhere: the recovery ends while the open transaction still keeps it from its
        # switch (which it would reach, the node not FAILED, once that one ended).
        failed_by_the_resolver(a, nodes)
        holder.commit()
        holder.close()
        wait_resolved(nodes[:2])
        assert_nodes_identical(nodes[:2], "postgres")
    finally:
        a.stop()


def test_the_switch_waits_for_a_peer_resolver_to_hear_from_the_queue(  # type: ignore[no-untyped-def]
    make_nodes, procs, tmp_path: Path
) -> None:
    """As above, but the restarted peer's resolver is slow to ask the queue about the
    transaction it committed, and nothing else holds the recovery back meanwhile: the node
    must not join in between (it would lack the transaction, unnoticed). The switch waits
    for the resolver, whose answer fails the recovery."""
    a, b, nodes, holder = crash_in_a_commit(
        make_nodes, procs, tmp_path, failpoints.AFTER_DECISION, then=failpoints.BEFORE_QUEUE_CHECK
    )
    try:
        eventually(lambda: f"{failpoints.BEFORE_QUEUE_CHECK} hit" in b.output(), 30)
        holder.commit()  # (the switch may come now)
        holder.close()
        failed_by_the_resolver(a, nodes)
        assert_nodes_identical(nodes[:2], "postgres")
    finally:
        a.stop()


def test_a_peer_that_crashes_after_queueing_a_commit_lets_the_recovery_go_on(  # type: ignore[no-untyped-def]
    make_nodes, procs, tmp_path: Path
) -> None:
    """A peer dies after its decided commit reached the queue, before phase 2: its resolver
    commits the transaction on restart, the coordinator says the queue has it, and the
    recovery ends ONLINE with the transaction on every node."""
    a, b, nodes, holder = crash_in_a_commit(make_nodes, procs, tmp_path, failpoints.AFTER_QUEUED)
    try:
        wait_resolved(nodes[:2])  # the restarted peer's resolver committed it
        assert nodes[0].psql("SELECT balance FROM acct WHERE id = 1") == "110"
        holder.commit()
        holder.close()
        info = wait_recovery(a)
        assert info["phase"] == "done", info
        assert "in-doubt transaction" in b.output()  # (it did resolve one)
        assert nodes[2].psql("SELECT balance FROM acct WHERE id = 1") == "110"
        assert_nodes_identical(nodes, "postgres")
    finally:
        a.stop()


def test_a_node_a_peer_refuses_is_not_half_added(make_nodes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """ADD NODE needs every router (each must queue for the node while it fills): when a
    peer cannot take it, the node leaves the group again. (Peers that did take it are sent
    REMOVE NODE ... FROM PEER; with one peer, down, this test does not reach that.)"""
    nodes = make_nodes(4)
    config_a, config_b = pair_configs(nodes[:3], tmp_path)
    a = RouterThread(config_a)
    empty = nodes[3]
    try:
        setup_table(a)
        add = f"ADD NODE node4 '{empty.router_host}' {empty.port}"
        # b is down: a cannot tell it.
        with psycopg.connect(a.dsn("pgquorum"), autocommit=True) as admin:
            try:
                admin.execute(add)
            except psycopg.errors.ObjectNotInPrerequisiteState as e:
                assert 'did not take ADD NODE "node4"' in str(e)
            else:
                raise AssertionError("ADD NODE succeeded without its peer")
        assert [n.name for n in a.router.cluster.group.nodes] == ["node1", "node2", "node3"]
        # Once the peer is back, the node joins everywhere.
        b = RouterThread(config_b)
        try:
            with psycopg.connect(a.dsn("pgquorum"), autocommit=True) as admin:
                admin.execute(add)
            assert wait_recovery(a)["phase"] == "done"
            eventually(lambda: state(b, "node4") is NodeState.ONLINE)
            with psycopg.connect(b.dsn(), autocommit=True) as conn:
                conn.execute("INSERT INTO h VALUES ('through b, on four nodes')")
        finally:
            b.stop()
        assert_nodes_identical(nodes, "postgres")
    finally:
        a.stop()


def test_a_late_failure_notice_does_not_fail_the_recovered_node(  # type: ignore[no-untyped-def]
    make_nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router tells a peer that was down of a failure with retries further and further
    apart. The recovery's start reaches that peer first (it must), and supersedes it: the
    notice, still on its way, must not fail the node again once it is recovered."""
    retry_s = 8.0  # a's second try falls after the recovery
    monkeypatch.setattr(peers, "RETRY_FIRST_S", retry_s)
    nodes = make_nodes(3)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a = RouterThread(config_a)
    b = None
    try:
        setup_table(a)
        fail_by_killing(a, nodes[2])  # b is down: a's first try fails
        second_try = time.monotonic() + retry_s
        b = RouterThread(config_b)
        # b tells a of the failure it took over at start-up; arriving during the recovery,
        # that (current) notice would end it.
        eventually(lambda: b is not None and b.router.peers.sent >= 1)
        recover(a, "node3")
        assert wait_recovery(a)["phase"] == "done"
        # Otherwise the test proves nothing: the notice must still have been on its way.
        assert a.router.peers.sent == 0, "the recovery took longer than the retry"
        time.sleep(max(0.0, second_try - time.monotonic()) + 2)
        assert a.router.peers.sent == 0  # never told
        assert state(a, "node3") is NodeState.ONLINE
        assert state(b, "node3") is NodeState.ONLINE
        with psycopg.connect(b.dsn(), autocommit=True) as conn:
            conn.execute("INSERT INTO h VALUES ('through b, on three nodes')")
        assert_nodes_identical(nodes, "postgres")
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_a_peer_hold_that_lapses_fails_what_ran_under_it(  # type: ignore[no-untyped-def]
    make_nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer lets its commits go after HOLD_MAX_S; the holder must not take what it did
    meanwhile (a snapshot, VERIFY's cut) for a quiet point."""
    monkeypatch.setattr("pgquorum.router.admin.HOLD_MAX_S", 0.3)
    nodes = make_nodes(3)
    config_a, config_b = pair_configs(nodes, tmp_path)
    a, b = RouterThread(config_a), RouterThread(config_b)
    try:

        async def hold(seconds: float, what: str = "COMMITS") -> None:
            async with hold_everywhere(a.router, what):
                await asyncio.sleep(seconds)

        a.call(hold(0))  # within the time: fine
        with pytest.raises(PgError, match="were let go before the end of the hold"):
            a.call(hold(1))
        # A write hold's every step talks to the peers (the first after a lapse fails): one
        # that lapses after the last step, as after a node joined, changes nothing.
        a.call(hold(1, "WRITES"))
        setup_table(b)  # b commits again
        assert_nodes_identical(nodes, "postgres")
    finally:
        a.stop()
        b.stop()
