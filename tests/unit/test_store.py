"""The state database: node states and events, commit decisions and their group commit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pgquorum.cluster.model import Group, Node, NodeState
from pgquorum.cluster.state import ClusterView
from pgquorum.cluster.store import DecisionLog, StateStore


def test_states_and_events_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.set_state("g", "n2", NodeState.FAILED, "connection lost", "r1")
    store.close()
    store = StateStore(path)
    states = store.node_states("g")
    assert states["n2"].state is NodeState.FAILED and states["n2"].reason == "connection lost"
    assert store.node_states("other") == {}
    [event] = store.events()
    assert (event.node, event.state, event.router) == ("n2", NodeState.FAILED, "r1")


def test_cluster_view_takes_failed_nodes_from_the_store(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    group = Group("g", (Node("n1", "h", 1), Node("n2", "h", 2), Node("n3", "h", 3)))
    first = ClusterView(group, store, "r1")
    first.mark_failed("n1", "outvoted")
    assert first.lead().node.name == "n2"  # type: ignore[union-attr]
    second = ClusterView(group, store, "r2")  # another router, or a restart
    assert second.status["n1"].state is NodeState.FAILED
    assert second.status["n1"].reason == "outvoted"
    assert [s.node.name for s in second.online()] == ["n2", "n3"]
    # A failure recorded by someone else is taken over on the next error.
    store.set_state("g", "n3", NodeState.FAILED, "by a peer", "r3")
    generation = second.generation
    second.mark_failed("n2", "connection lost")
    assert second.status["n3"].state is NodeState.FAILED and second.generation > generation
    assert second.lead() is None


def test_decisions_are_group_committed_and_forgotten_late(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    writes: list[int] = []
    real = store.write_decisions

    def counting(router: str, record: list[str], forget: list[str]) -> None:
        writes.append(len(record))
        real(router, record, forget)

    store.write_decisions = counting  # type: ignore[method-assign]

    async def main() -> None:
        log = DecisionLog(store, "r1")
        log.keep_s = 0.2
        await asyncio.gather(*(log.record(f"g{i}") for i in range(50)))
        assert store.decided([f"g{i}" for i in range(60)]) == {f"g{i}" for i in range(50)}
        assert len(writes) < 50 and sum(writes) == 50  # batched
        log.forget("g1")
        log.flush_forgotten()
        assert "g1" in store.decided(["g1"])  # kept while the nodes may not have flushed
        await asyncio.sleep(0.25)
        log.flush_forgotten()
        assert store.decided(["g1", "g2"]) == {"g2"}
        log.close()

    asyncio.run(main())
    # Old records whose transactions are prepared nowhere any more are pruned.
    assert store.prune_decisions("r1", keep={"g3"}, older_than=time.time() + 1) == 48
    assert store.decisions("r1") == ["g3"]


def test_a_failed_write_fails_the_waiters(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")

    def broken(router: str, record: list[str], forget: list[str]) -> None:
        raise OSError("disk full")

    store.write_decisions = broken  # type: ignore[method-assign]

    async def main() -> None:
        log = DecisionLog(store, "r1")
        with pytest.raises(OSError, match="disk full"):
            await log.record("g1")
        log.close()

    asyncio.run(main())
