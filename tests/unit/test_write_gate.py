"""The write gate (recovery/gate.py): its holder and the writers that are no session's."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from pgquorum.recovery.gate import StillOpen, WriteGate


@dataclass
class FakeSession:
    writing: bool = False
    txn_wrote: bool = False
    txn_count: int = 0


async def resolver(gate: WriteGate, seen: list[str], stays: float = 0.0) -> None:
    """A write no session makes (the in-doubt resolver's), inside the gate for ``stays``."""
    async with gate.writer():
        seen.append("writing")
        if stays:
            await asyncio.sleep(stays)
            seen.append("wrote")


def test_the_holder_waits_for_a_writer_to_leave() -> None:
    async def go() -> list[str]:
        gate = WriteGate(list)
        seen: list[str] = []
        task = asyncio.create_task(resolver(gate, seen, stays=0.05))
        await asyncio.sleep(0)  # (the resolver is inside)
        async with gate.hold(timeout=5):
            seen.append("held")
        await task
        return seen

    assert asyncio.run(go()) == ["writing", "wrote", "held"]


def test_a_writer_waits_while_the_gate_is_held() -> None:
    async def go() -> list[str]:
        gate = WriteGate(list)
        seen: list[str] = []
        async with gate.hold(timeout=5):
            task = asyncio.create_task(resolver(gate, seen))
            await asyncio.sleep(0.05)
            seen.append("released")
        await task
        return seen

    assert asyncio.run(go()) == ["released", "writing"]


def test_a_writer_that_stays_makes_the_holder_give_way() -> None:
    async def go() -> None:
        session = FakeSession()
        gate = WriteGate(lambda: [session])
        async with gate.writer():
            with pytest.raises(StillOpen) as e:
                async with gate.hold(timeout=0.05):
                    pass
            assert e.value.open == []  # (no session to watch: the caller tries again)
            assert not gate.held
        session.txn_wrote = True
        with pytest.raises(StillOpen) as e:
            async with gate.hold(timeout=0.05):
                pass
        assert e.value.open == [(session, 0)]

    asyncio.run(go())
