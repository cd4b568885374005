"""Cluster-wide sequence values, handed out by the router in blocks.

Nodes must not call nextval() themselves: two transactions inserting at once could get their
values in one order on the lead and in the other order on a replica. The router assigns the
values instead, from blocks it reserves on the sequences of the nodes themselves, so they are
durable and shared by every router without another store:

* on the lead, under an advisory lock (routers reserving the same sequence take turns),
  ``setval(seq, nextval(seq) + (size - 1) * increment)`` reserves ``size`` values;
* on every other ONLINE node the sequence is moved to at least the same point, so a later
  lead continues after every value any router handed out.

Like PostgreSQL's own sequence CACHE, values a router reserved but did not use are skipped
after it restarts, and setval() does not reach values already reserved.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgquorum.cluster.model import Node
from pgquorum.protocol.errors import FEATURE_NOT_SUPPORTED, PgError
from pgquorum.sql.quoting import quote_literal

from .backend import NodeLost
from .client import query

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger(__name__)

BLOCK_SIZE = 100
_LOCK_CLASS = 0x70677173  # 'pgqs': advisory lock class of sequence reservations


@dataclass(slots=True)
class Block:
    next: int
    last: int
    increment: int


def lock_sql(sequence: str) -> str:
    """Take the lock that makes users of ``sequence`` on a node take turns until their
    transaction ends: reservations, and statements that draw values on the nodes."""
    key = quote_literal(sequence)
    return f"SELECT pg_catalog.pg_advisory_xact_lock({_LOCK_CLASS}, pg_catalog.hashtext({key}))"


class SequenceAllocator:
    def __init__(self, router: Router) -> None:
        self.router = router
        self._blocks: dict[tuple[str, str], Block] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def take(self, database: str, sequence: str, count: int) -> list[int]:
        """``count`` values of ``sequence`` (a qualified name as the catalog prints it)."""
        key = (database, sequence)
        lock = self._locks.setdefault(key, asyncio.Lock())
        out: list[int] = []
        async with lock:
            while len(out) < count:
                block = self._blocks.get(key)
                if block is None or block.next > block.last:
                    block = self._blocks[key] = await self._reserve(
                        database, sequence, max(BLOCK_SIZE, count - len(out))
                    )
                while block.next <= block.last and len(out) < count:
                    out.append(block.next)
                    block.next += block.increment
        return out

    def forget(self, database: str, sequence: str | None = None) -> None:
        """Drop reserved blocks (after setval, ALTER/DROP SEQUENCE: the next take reserves
        afresh from the sequence as it is now)."""
        if sequence is None:
            for key in [k for k in self._blocks if k[0] == database]:
                del self._blocks[key]
        else:
            self._blocks.pop((database, sequence), None)

    async def _reserve(self, database: str, sequence: str, size: int) -> Block:
        cluster = self.router.cluster
        online = cluster.online()
        if not online:
            raise PgError("08006", "no ONLINE node to reserve sequence values on")
        lead, rest = online[0].node, [s.node for s in online[1:]]
        seq = quote_literal(sequence)
        lock = f"SELECT pg_catalog.pg_advisory_xact_lock({_LOCK_CLASS}, pg_catalog.hashtext({seq}))"
        rows = await self._run(
            lead,
            database,
            f"{lock}; SELECT s.seqincrement, pg_catalog.setval({seq}, "
            f"pg_catalog.nextval({seq}) + ({size} - 1) * s.seqincrement) "
            f"FROM pg_catalog.pg_sequence s WHERE s.seqrelid = {seq}::regclass",
        )
        # (the rows of the last statement: the setval's)
        if not rows or rows[-1][0] is None or rows[-1][1] is None:
            raise PgError("42P01", f"sequence {sequence} not found on the lead")
        increment, last = int(rows[-1][0]), int(rows[-1][1])
        if increment <= 0:
            raise PgError(
                FEATURE_NOT_SUPPORTED,
                f"pgquorum cannot assign values of the descending sequence {sequence}",
                hint="Use a sequence with a positive INCREMENT.",
            )
        follow = (
            f"{lock}; SELECT pg_catalog.setval({seq}, greatest({last}, last_value)) "
            f"FROM {sequence}"  # the catalog's own spelling: a safe identifier
        )
        results = await asyncio.gather(
            *(self._run(n, database, follow) for n in rest), return_exceptions=True
        )
        for node, res in zip(rest, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("cannot move sequence %s on node %s: %s", sequence, node.name, res)
        return Block(last - (size - 1) * increment, last, increment)

    async def _run(self, node: Node, database: str, sql: str) -> list[list[str | None]]:
        user, password = self.router.internal_credentials()
        params = {"user": user, "database": database, "application_name": "pgquorum"}
        try:
            return (await query(node, params, password, sql))[1]
        except NodeLost as e:
            self.router.cluster.mark_failed(node.name, e.reason)
            raise PgError("08006", f"node {node.name} lost while reserving values") from None
