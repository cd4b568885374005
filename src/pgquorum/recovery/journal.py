"""What a session sent to the nodes in its current transaction, kept for a recovering node.

While a node recovers, every transaction that commits on the group is appended to the
recovery queue as the exact bytes the nodes were sent (after the router's rewriting, so a
replay is deterministic), with the outcome the nodes voted for, and replayed on the node in
commit order. A transaction may begin before the recovery does and commit after it, so every
session keeps the write units of its current transaction: a list append per unit, the bytes
built only when a recovery queues the transaction.

The bytes are built for a *shadow* of the node connection on the recovering node: the shadow
knows which prepared statements that connection will hold, so the units carry the Parse
messages it needs, as they would for a real node the session had not used yet.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pgquorum.protocol import messages as m
from pgquorum.router.backend import EXPECT_QUERY, EXPECT_QUERY_SWALLOWED, Expectation

if TYPE_CHECKING:
    from pgquorum.router.backend import NodeConnection, UnitResult

    BuildUnit = Callable[[NodeConnection], tuple[bytes, list[Expectation]]]
    # (build, deferred BEGIN, SQLSTATE, command tags, COPY data, why it cannot be replayed)
    _Kept = tuple[BuildUnit, bytes | None, str | None, list[str], bytes, str]

IDLE = ord("I")


@dataclass(slots=True)
class Unit:
    """One unit of work as sent to a node, and what the group answered."""

    data: bytes
    expect: list[tuple[int, str | None, bool, int]]  # Expectation fields
    outcome: list[str]  # UnitResult.outcome(): the SQLSTATE first if it failed, then tags
    copy: bytes = b""  # CopyData ... CopyDone/CopyFail of a COPY FROM STDIN
    missing: str = ""  # why the unit cannot be replayed (its COPY data was not kept, ...)
    error: str = ""  # the SQLSTATE of the unit's first error (also first in ``outcome``)

    @property
    def tags(self) -> list[str]:
        return self.outcome[1:] if self.error else self.outcome

    def expectations(self) -> list[Expectation]:
        return [Expectation(k, s, w, v) for k, s, w, v in self.expect]

    def to_json(self) -> list[Any]:
        return [
            _b64(self.data),
            self.expect,
            self.outcome,
            _b64(self.copy),
            self.missing,
            self.error,
        ]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Unit:
        data, expect, outcome, copy, missing, error = raw
        return cls(
            base64.b64decode(data),
            [(int(k), s, bool(w), int(v)) for k, s, w, v in expect],
            [str(x) for x in outcome],
            base64.b64decode(copy),
            str(missing),
            str(error),
        )


@dataclass(slots=True)
class Entry:
    """A finished transaction of one session (or the end of the session), for the queue."""

    session: str  # "<router name>/<session id>": one replay connection each
    params: dict[str, str]  # the client's startup parameters (user, database, ...)
    units: list[Unit] = field(default_factory=list)
    # The session's settings as the transaction began: what a new replay connection for
    # it starts with (None in entries that are not transactions).
    prelude: list[bytes] | None = None
    end: bool = False  # the session is gone: close its replay connection
    gid: str = ""  # a two-phase commit's transaction id (see LocalQueue.holds)

    @property
    def size(self) -> int:
        """Bytes held (roughly): the units' messages and COPY data."""
        return sum(len(u.data) + len(u.copy) for u in self.units) + 64

    @property
    def footprint(self) -> int:
        """Roughly the memory the entry takes with its Python objects (measured on pgbench's
        transactions: about 400 bytes an entry and 250 a unit more than ``size``)."""
        return self.size + 400 + 250 * len(self.units)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session": self.session,
            "params": self.params,
            "units": [u.to_json() for u in self.units],
        }
        if self.prelude is not None:
            out["prelude"] = [_b64(p) for p in self.prelude]
        if self.end:
            out["end"] = True
        if self.gid:
            out["gid"] = self.gid
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Entry:
        prelude = raw.get("prelude")
        return cls(
            str(raw["session"]),
            {str(k): str(v) for k, v in raw["params"].items()},
            [Unit.from_json(u) for u in raw["units"]],
            None if prelude is None else [base64.b64decode(p) for p in prelude],
            bool(raw.get("end", False)),
            str(raw.get("gid", "")),
        )


class _Shadow:
    """Stands in for a NodeConnection when building a unit's bytes (see _build_batch)."""

    __slots__ = ("pending_close", "prepared")

    def __init__(self) -> None:
        self.prepared: dict[str, int] = {}
        self.pending_close: list[str] = []


class Journal:
    """The write units of one session's transaction in progress.

    Kept as they ran (the build function and the outcome: an append on the per-unit path)
    and built into bytes only when a recovery queues the transaction (``take``); a rewritten
    prepared statement is a new Statement object, so a kept unit builds what it ran.
    """

    def __init__(self) -> None:
        self._kept: list[_Kept] = []
        self._bytes = 0  # the messages and COPY data the kept units hold
        self._overflow = ""  # why the transaction is too big to keep
        self._shadow = _Shadow()
        self._begin: bytes | None = None  # a deferred BEGIN, sent with the next unit
        self.open = False  # the last unit left a transaction block open on the nodes
        self.queued: str | None = None  # the recovery whose queue has this session's units

    @property
    def room(self) -> int:
        """Bytes the transaction may still send before it is too big to keep."""
        return 0 if self._overflow else MAX_KEPT_BYTES - self._bytes

    @property
    def empty(self) -> bool:
        return not self._kept and not self._overflow

    def begin(self, data: bytes) -> None:
        """The client's BEGIN, held back until the transaction's first write (as the
        session holds it back from each node)."""
        self._begin = data

    def record(
        self, build: BuildUnit, res: UnitResult, copy: bytes = b"", missing: str = ""
    ) -> None:
        begin, self._begin = self._begin, None
        self.open = res.status not in (0, IDLE)
        if self._overflow:
            return
        self._bytes += res.sent + len(copy)
        if len(self._kept) >= MAX_KEPT_UNITS:
            self._give_up(f"the transaction ran more than {MAX_KEPT_UNITS} write units")
        elif self._bytes > MAX_KEPT_BYTES:
            self._give_up(f"the transaction sent more than {MAX_KEPT_BYTES / 2**20:g} MiB")
        else:
            self._kept.append((build, begin, res.error, res.tags, copy, missing))

    def _give_up(self, why: str) -> None:
        """Memory is worth more than the replay of one giant transaction: every unit kept is
        let go (every transaction keeps its units, recovery or not), and a recovery the
        transaction commits into fails, safely, rather than every session holding its bulk
        load."""
        self._overflow = why
        self._kept = []

    def take(self, *, commit: bool) -> list[Unit]:
        """The transaction's units as the recovering node must be sent them, ended the way
        the router ended it on the nodes (a two-phase COMMIT, or a ROLLBACK of a transaction
        the client never ended)."""
        units = [Unit(b"", [], [], missing=self._overflow)] if self._overflow else self._build()
        if self.open:
            units.append(COMMIT if commit else ROLLBACK)
        self.drop()
        return units

    def join(self, rid: str) -> bool:
        """Before ``take`` for recovery ``rid``: True if it is the session's first entry
        there. Its replay connection starts from nothing, and so does the shadow."""
        if self.queued == rid:
            return False
        self.queued = rid
        self._shadow = _Shadow()
        return True

    def drop(self) -> None:
        """No recovery wants the transaction: forget it."""
        self._kept = []
        self._bytes = 0
        self._overflow = ""
        self.open = False
        self._begin = None

    def _build(self) -> list[Unit]:
        shadow = self._shadow
        prepared = shadow.prepared
        units = []
        for build, begin, error, tags, copy, missing in self._kept:
            data, expect = build(cast("NodeConnection", shadow))
            if begin is not None:
                data = begin + data
                expect = [EXPECT_QUERY_SWALLOWED, *expect]
            for e in expect:  # what the node will hold after this unit
                if e.statement is not None:
                    if e.kind == m.PARSE:
                        prepared[e.statement] = e.version
                    elif e.kind == m.CLOSE:
                        prepared.pop(e.statement, None)
            outcome = [error, *tags] if error else list(tags)
            unit = Unit(
                data,
                [(e.kind, e.statement, e.swallow, e.version) for e in expect],
                outcome,
                copy,
                missing,
                error or "",
            )
            units.append(unit)
        return units


# What one transaction keeps for a recovery that may queue it. The bytes fit, with its COPY
# data, in what a peer may send the coordinator as one operation (queue.MAX_OP_BYTES, in
# base64).
MAX_KEPT_UNITS = 100_000
MAX_KEPT_BYTES = 32 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fixed(sql: str, tag: str) -> Unit:
    e = EXPECT_QUERY
    return Unit(m.encode_query(sql), [(e.kind, e.statement, e.swallow, e.version)], [tag])


COMMIT = _fixed("COMMIT", "COMMIT")
ROLLBACK = _fixed("ROLLBACK", "ROLLBACK")
