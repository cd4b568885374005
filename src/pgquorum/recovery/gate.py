"""The write gate: the short pause in which a recovered node joins the group.

A recovered node may only take writes once it holds every committed transaction and no
transaction that wrote without it is still open (such a transaction would go on committing on
the others only). While the gate is held, a session that has not written in its transaction
waits before its first write; the holder waits until no session is inside a write or a
transaction that wrote. Then the rest of the queue is replayed, the node goes ONLINE, and the
waiting sessions connect to it before they write.

The hold is short (a second at most): if a transaction stays open longer, the gate opens
again and the recovery waits for that transaction to end, with writes flowing, before it
tries again. A long transaction delays the recovery, never the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol


class Writer(Protocol):
    writing: bool  # inside a write unit that began outside a transaction that wrote
    txn_wrote: bool  # inside a transaction block that wrote
    txn_count: int  # transactions ended so far


class StillOpen(TimeoutError):
    """Transactions that wrote did not end while the gate was held."""

    def __init__(self, open_: list[tuple[Writer, int]]) -> None:
        super().__init__(f"{len(open_)} transactions that wrote are still open")
        self.open = open_

    async def ended(self, timeout: float) -> bool:
        """Wait (with the gate open) until each of those transactions ended; False if some
        is still open after ``timeout``."""
        if not self.open:  # a peer's: nothing to watch from here, so a pause
            await asyncio.sleep(timeout)
            return True
        deadline = time.monotonic() + timeout
        while any(w.txn_count == n and (w.writing or w.txn_wrote) for w, n in self.open):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


POLL_S = 0.002


class WriteGate:
    def __init__(self, sessions: Callable[[], Iterable[Writer]]) -> None:
        self._sessions = sessions
        self._open: asyncio.Event | None = None  # set when the gate opens again
        self._others = 0  # writers that are no session's (see writer)

    @property
    def held(self) -> bool:
        return self._open is not None

    async def wait_open(self) -> None:
        while self._open is not None:
            await self._open.wait()

    def busy(self) -> int:
        return self._others + sum(1 for s in self._sessions() if s.writing or s.txn_wrote)

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[None]:
        """Around a write that no session makes: the in-doubt resolver commits a transaction
        and then asks the recovery queue whether it holds it. The node must not join in
        between, or a transaction the queue lacks would be missing on it unnoticed."""
        await self.wait_open()
        self._others += 1
        try:
            yield
        finally:
            self._others -= 1

    @contextlib.asynccontextmanager
    async def hold(self, timeout: float) -> AsyncIterator[float]:
        """Hold new writes back until no write is in flight; yields how long that took.
        StillOpen if transactions that wrote are still open after ``timeout``."""
        while self._open is not None:  # one holder at a time
            await self._open.wait()
        self._open = asyncio.Event()
        began = time.monotonic()
        try:
            while self.busy():
                if time.monotonic() - began > timeout:
                    raise StillOpen(
                        [(w, w.txn_count) for w in self._sessions() if w.writing or w.txn_wrote]
                    )
                await asyncio.sleep(POLL_S)
            yield time.monotonic() - began
        finally:
            opened, self._open = self._open, None
            opened.set()
