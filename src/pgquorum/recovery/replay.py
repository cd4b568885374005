"""Replaying the recovery queue on the recovering node, in commit order.

Each client session whose transactions are queued gets a connection of its own on the node,
opened with the session's startup parameters, so session state (settings, prepared
statements, temporary tables made during the recovery) carries over from one of its
transactions to the next as it did on the other nodes. Entries are applied one at a time,
in serial order, so no replayed transaction ever waits for another. Every unit's outcome
must be the one the group voted for; anything else ends the recovery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m
from pgquorum.router.backend import EXPECT_QUERY, NodeConnection

from .journal import Entry, Unit
from .queue import LocalQueue

log = logging.getLogger(__name__)

TAKE_TIMEOUT_S = 60.0  # a reserved commit is settled within this, or its router is gone


class ReplayError(Exception):
    """The node did not answer a queued transaction the way the group did."""


Credentials = Callable[[str], tuple[str, str | None]]


class Replayer:
    def __init__(
        self, node: Node, queue: LocalQueue, credentials: Credentials, timeout: float = 30.0
    ) -> None:
        self.node = node
        self.queue = queue
        self.credentials = credentials
        self.timeout = timeout  # for one unit: a node that hangs fails the recovery
        self.sessions: dict[str, NodeConnection] = {}
        self.applied = 0  # entries replayed (not counting void ones)

    async def run_until(self, depth: int) -> None:
        """Replay until at most ``depth`` entries are left in the queue."""
        queue = self.queue
        while queue.depth > depth:
            await self.step()

    async def step(self) -> None:
        queue = self.queue
        serial = queue.applied + 1
        entry = await queue.take(serial, TAKE_TIMEOUT_S)
        if entry is not None:
            await self._apply(serial, entry)
            self.applied += 1
        queue.applied = serial

    async def drain(self) -> None:
        """Replay everything reserved so far (every commit is held: all are settled soon)."""
        while self.queue.depth > 0:
            await self.step()

    def close(self) -> None:
        for conn in self.sessions.values():
            conn.close()
        self.sessions.clear()

    async def _apply(self, serial: int, entry: Entry) -> None:
        if entry.end:
            conn = self.sessions.pop(entry.session, None)
            if conn is not None:
                conn.close()
            return
        conn = self.sessions.get(entry.session)
        if conn is None:
            conn = await self._open(entry)
        for i, unit in enumerate(entry.units):
            if unit.missing:
                raise ReplayError(
                    f"transaction {serial} of session {entry.session} cannot be replayed: "
                    f"{unit.missing}"
                )
            try:
                got = await asyncio.wait_for(_run(conn, unit), self.timeout)
            except TimeoutError:
                raise ReplayError(
                    f"node {self.node.name} did not answer transaction {serial} within "
                    f"{self.timeout:.0f}s"
                ) from None
            if got != unit.outcome:
                raise ReplayError(
                    f"replaying transaction {serial} (session {entry.session}, unit {i + 1}) "
                    f"node {self.node.name} answered {_show(got)} where the group answered "
                    f"{_show(unit.outcome)}"
                )

    async def _open(self, entry: Entry) -> NodeConnection:
        params = {k: v for k, v in entry.params.items() if k != "replication"}
        params["user"], password = self.credentials(params["user"])
        params["application_name"] = "pgquorum recovery"
        conn = await NodeConnection.open(self.node, params, password, _discard)
        for sql in entry.prelude or ():
            conn.send_unit(sql, [EXPECT_QUERY], relay=False)
            res = await conn.wait()
            if res.error:
                log.warning("a session setting failed on the recovering node: %s", res.error)
        self.sessions[entry.session] = conn
        return conn


async def _run(conn: NodeConnection, unit: Unit) -> list[str]:
    conn.send_unit(unit.data, unit.expectations(), relay=False)
    res = await conn.wait()
    if res.copy_in:
        conn.send_more(unit.copy or m.frame(m.COPY_FAIL, b"no COPY data was queued\0"))
        conn.resume_copy()
        res = await conn.wait()
    return [str(x) for x in res.outcome()]


def _show(outcome: list[str]) -> str:
    return ", ".join(outcome) or "(nothing)"


def _discard(data: bytes) -> None:
    pass
