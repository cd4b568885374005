"""Replaying the recovery queue on the recovering node, in commit order.

Each client session whose transactions are queued gets a connection of its own on the node,
opened with the session's startup parameters, so session state (settings, prepared
statements, temporary tables made during the recovery) carries over from one of its
transactions to the next as it did on the other nodes. Entries are applied one at a time,
in serial order, so no replayed transaction ever waits for another. Every unit's outcome
must be the one the group voted for; anything else ends the recovery.

When the queue keeps a log (queue_log.py), each step is written there too, so that a
coordinator that restarts knows which entries the node has: ("applied", serial) once an
entry's outcome is known, and before it is sent either ("xid", serial, xid), for a
transaction the replay commits (its transaction id is asked for before the COMMIT is sent,
and its status after a restart says whether it committed), or ("start", serial) for anything
else (whose outcome a restart cannot learn: that recovery begins again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pgquorum import failpoints
from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m
from pgquorum.protocol.errors import PgError
from pgquorum.router.backend import (
    EXPECT_QUERY,
    EXPECT_SYNC,
    Expectation,
    NodeConnection,
    UnitResult,
)
from pgquorum.router.client import discard, query
from pgquorum.sql.analyze import Analyzer

from .journal import COMMIT, Entry, Unit
from .queue import LocalQueue
from .resume import SessionState

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
        # Resumed after a restart: the state of each session's connection before it, to
        # build again on a new connection (see resume.py).
        self.rebuild: dict[str, SessionState] = {}

    async def step(self) -> None:
        queue = self.queue
        serial = queue.applied + 1
        entry = await queue.take(serial, TAKE_TIMEOUT_S)
        if entry is not None:
            await self._apply(serial, entry)
            self.applied += 1
            if not entry.end:
                queue.note(("applied", serial))
        queue.applied = serial

    async def skip(self, serial: int) -> SessionState | None:
        """Resumed: entry ``serial`` committed on the node before the restart (the entries
        before it are replayed). Its session's state is kept for a new connection, and
        returned."""
        while self.queue.applied < serial - 1:
            await self.step()
        entry = await self.queue.take(serial, TAKE_TIMEOUT_S)
        self.queue.applied = serial
        if entry is None or entry.end:
            return None
        self.queue.note(("applied", serial))
        state = self.rebuild.setdefault(entry.session, SessionState())
        state.replayed(entry, Analyzer())
        return state

    async def drain(self) -> None:
        """Replay everything reserved so far (every commit is held: all are settled soon)."""
        while self.queue.depth > 0:
            await self.step()

    async def flush(self) -> None:
        """Make every replayed commit durable: a commit with synchronous_commit on flushes
        the WAL up to itself, and so every earlier commit."""
        user, password = self.credentials("postgres")
        params = {"user": user, "database": "template1", "application_name": "pgquorum recovery"}
        sql = "BEGIN; SELECT pg_catalog.txid_current(); COMMIT"
        try:
            await query(self.node, params, password, sql, self.timeout)
        except PgError as e:
            raise ReplayError(f"cannot flush the WAL of node {self.node.name}: {e}") from None

    def close(self) -> None:
        for conn in self.sessions.values():
            conn.close()
        self.sessions.clear()

    async def _apply(self, serial: int, entry: Entry) -> None:
        if entry.end:
            conn = self.sessions.pop(entry.session, None)
            self.rebuild.pop(entry.session, None)
            if conn is not None:
                conn.close()
            return
        conn = self.sessions.get(entry.session)
        if conn is None:
            conn = await self._open(entry)
        for unit in entry.units:
            if unit.missing:
                raise ReplayError(
                    f"transaction {serial} of session {entry.session} cannot be replayed: "
                    f"{unit.missing}"
                )
        units = entry.units
        logged = self.queue.log is not None
        if logged and _committed_by_replay(units):
            # Its transaction id first, written down before the COMMIT leaves.
            runs = _runs(units[:-1])
            if runs[-1][-1].copy:
                runs.append([])
            runs[-1].append(_XID)
            for run in runs:
                res = await self._send(serial, entry, conn, run)
            self.queue.note(("xid", serial, int(_last_value(res) or 0)))
            failpoints.hit(failpoints.REPLAY_BEFORE_COMMIT)
            await self._send(serial, entry, conn, [units[-1]])
            failpoints.hit(failpoints.REPLAY_AFTER_COMMIT)
            return
        if logged:
            self.queue.note(("start", serial))
        for run in _runs(units):
            await self._send(serial, entry, conn, run)

    async def _send(
        self, serial: int, entry: Entry, conn: NodeConnection, run: list[Unit]
    ) -> UnitResult:
        try:
            res = await asyncio.wait_for(_run(conn, run), self.timeout)
        except TimeoutError:
            raise ReplayError(
                f"node {self.node.name} did not answer transaction {serial} within "
                f"{self.timeout:.0f}s"
            ) from None
        want = _merged(run)
        got = [str(x) for x in res.outcome()]
        if got != want:
            raise ReplayError(
                f"replaying transaction {serial} (session {entry.session}) node "
                f"{self.node.name} answered {_show(got)} where the group answered "
                f"{_show(want)}"
            )
        return res

    async def _open(self, entry: Entry) -> NodeConnection:
        params = {k: v for k, v in entry.params.items() if k != "replication"}
        params["user"], password = self.credentials(params["user"])
        params["application_name"] = "pgquorum recovery"
        # No WAL flush per replayed commit (the replay is serial: one flush each would
        # bound it by the disk); flush() makes them durable before the node joins.
        params["options"] = (params.get("options", "") + " -c synchronous_commit=off").strip()
        conn = await NodeConnection.open(self.node, params, password, discard, self.timeout)
        self.sessions[entry.session] = conn  # (closed with the others, whatever happens)
        state = self.rebuild.pop(entry.session, None)
        for sql in entry.prelude or ():
            conn.send_unit(sql, [EXPECT_QUERY], relay=False)
            res = await asyncio.wait_for(conn.wait(), self.timeout)  # as a unit: no hanging
            if res.error:
                log.warning("a session setting failed on the recovering node: %s", res.error)
        if state is not None and state.parses:
            # The statements its earlier entries prepared on the connection lost at the
            # restart (a later entry binds them without parsing them again).
            data = b"".join(state.parses.values()) + m.frame(m.SYNC)
            expect = [Expectation(m.PARSE, name) for name in state.parses]
            conn.send_unit(data, [*expect, EXPECT_SYNC], relay=False)
            res = await asyncio.wait_for(conn.wait(), self.timeout)
            if res.error:
                raise ReplayError(
                    f"cannot prepare again the statements of session {entry.session} on "
                    f"node {self.node.name}: {res.error}"
                )
        return conn


def _runs(units: list[Unit]) -> list[list[Unit]]:
    """The units in runs sent at once (one round trip each); a COPY waits for its
    CopyInResponse, so it ends a run."""
    runs: list[list[Unit]] = [[]]
    for unit in units:
        runs[-1].append(unit)
        if unit.copy:
            runs.append([])
    return [r for r in runs if r]


def _merged(run: list[Unit]) -> list[str]:
    """What a node answers to a run as one unit: the first error, then every tag."""
    error = next((u.error for u in run if u.error), "")
    tags = [t for u in run for t in u.tags]
    return [error, *tags] if error else tags


async def _run(conn: NodeConnection, run: list[Unit]) -> UnitResult:
    data = b"".join(u.data for u in run)
    conn.send_unit(data, [e for u in run for e in u.expectations()], relay=False)
    res = await conn.wait()
    if res.copy_in:
        copy = run[-1].copy
        conn.send_more(copy or m.frame(m.COPY_FAIL, b"no COPY data was queued\0"))
        conn.resume_copy()
        res = await conn.wait()
    return res


def _show(outcome: list[str]) -> str:
    return ", ".join(outcome) or "(nothing)"


def _committed_by_replay(units: list[Unit]) -> bool:
    """A transaction block the replay's own COMMIT ends, every unit of it successful (one
    that failed ends in a ROLLBACK, and a transaction id asked for there would fail too)."""
    return len(units) > 1 and units[-1].data == COMMIT.data and not any(u.error for u in units)


_XID = Unit(
    m.encode_query("SELECT pg_catalog.txid_current()"),
    [(EXPECT_QUERY.kind, None, False, 0)],
    ["SELECT 1"],
)


def _last_value(res: UnitResult) -> str | None:
    """The first column of the last row the node answered (collected, see backend.py)."""
    row = next((c for c in reversed(res.chunks) if c[:1] == b"D"), None)
    return None if row is None else m.parse_data_row(row[5:])[0]
