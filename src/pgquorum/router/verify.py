"""VERIFY: compare every ONLINE node at one consistent point, under live load.

Under the commit barrier of this router and of every peer (HOLD COMMITS: no transaction is
committed on some nodes and not on others) each node opens a REPEATABLE READ transaction
per database and takes its snapshot; the barriers are released at once, and the comparison
runs in those snapshots at leisure. Each table is
compared by row count and an ordered checksum (by primary key, or by the whole row where
there is none); a table that differs is compared again in primary-key ranges taken from the
first node, so the report names where the rows differ. The nodes on the minority side of a
comparison are the ones reported (and failed with FAIL MINORITY).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgquorum.cluster.model import Node
from pgquorum.protocol.errors import PgError
from pgquorum.recovery.restore import Credentials, list_databases

from .client import Link, Table, open_links
from .peers import hold_everywhere

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger(__name__)

RANGES = 16
ATTEMPTS = 3
QUERY_TIMEOUT_S = 3600.0  # a checksum reads a whole table (or key range)

# Ordinary tables (leaf partitions included) outside the system schemas, with their primary
# key columns in key order (empty when there is none).
_TABLES = """
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname),
       coalesce((SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', '
                                              ORDER BY k.ord)
                 FROM pg_catalog.pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_catalog.pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary), '')
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1"""


@dataclass(frozen=True, slots=True)
class Finding:
    database: str
    table: str
    range: str  # "all", or the primary-key range that differs
    node: str
    detail: str


class Snapshots:
    """One REPEATABLE READ transaction per (node, database), all begun under the barrier."""

    def __init__(self) -> None:
        self.links: dict[tuple[str, str], Link] = {}

    async def take(self, router: Router, nodes: list[Node], databases: list[str]) -> float:
        user, password = router.internal_credentials()

        def params(db: str) -> dict[str, str]:
            return {"user": user, "database": db, "application_name": "pgquorum verify"}

        await open_links(
            {(n.name, db): Link.open(n, params(db), password) for n in nodes for db in databases},
            self.links,  # (close() closes every link that opened)
        )
        # Every router in front of the group holds its commits: peers first, then this one.
        async with hold_everywhere(router, "COMMITS") as held:
            await asyncio.gather(
                *(
                    link.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
                    for link in self.links.values()
                )
            )
        for link in self.links.values():
            # Beginning under the hold keeps the default timeout, since every router's
            # commits wait on it; a checksum may read a whole table.
            link.timeout = QUERY_TIMEOUT_S
        return held.drained

    async def query(self, node: str, db: str, sql: str) -> Table:
        return await self.links[(node, db)].query(sql)

    def close(self) -> None:
        for link in self.links.values():
            link.close()


async def verify(router: Router, *, fail_minority: bool = False) -> list[Finding]:
    nodes = [st.node for st in router.cluster.online()]
    if len(nodes) < 2:
        return []
    lead = nodes[0]
    databases = await list_databases(lead, Credentials(*router.internal_credentials()))
    snaps = Snapshots()
    try:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                paused = await snaps.take(router, nodes, databases)
                break
            except (TimeoutError, PgError) as e:
                # Under heavy load the commits in flight may not drain in time: try again.
                snaps.close()
                snaps = Snapshots()
                if attempt == ATTEMPTS:
                    raise
                log.warning("verify: no consistent point yet (%s); trying again", e)
                await asyncio.sleep(0.5 * attempt)
        log.info("verify: snapshots taken; commits waited %.1f ms", paused * 1000)
        findings: list[Finding] = []
        for db in databases:
            tables = (await snaps.query(lead.name, db, _TABLES))[1]
            for name, key in tables:
                findings += await _compare_table(snaps, nodes, db, str(name), str(key or ""))
    finally:
        snaps.close()
    if fail_minority:
        for f in {f.node: f for f in findings}.values():
            router.cluster.mark_failed(
                f.node, f"verify: {f.database} {f.table} ({f.range}) differs from the majority"
            )
    return findings


async def _checksums(
    snaps: Snapshots, nodes: list[Node], db: str, table: str, key: str, where: str = ""
) -> dict[str, tuple[str, str]]:
    order = key or "t::text"
    sql = (
        # Rows folded as their own md5s: 33 bytes a row stay far below the 1 GB a text
        # value may hold, where the rows themselves would not.
        f"SELECT count(*), pg_catalog.md5(coalesce(pg_catalog.string_agg("
        f"pg_catalog.md5(t::text), ',' ORDER BY {order}), '')) FROM {table} AS t {where}"
    )
    results = await asyncio.gather(*(snaps.query(n.name, db, sql) for n in nodes))
    return {n.name: (str(r[1][0][0]), str(r[1][0][1])) for n, r in zip(nodes, results, strict=True)}


def _minority(sums: dict[str, tuple[str, str]]) -> list[str]:
    """Nodes whose (count, checksum) differs from what most nodes have (ties: the first)."""
    sides: dict[tuple[str, str], list[str]] = {}
    for name, value in sums.items():
        sides.setdefault(value, []).append(name)
    if len(sides) == 1:
        return []
    best = max(sides.values(), key=len)
    return [name for name in sums if name not in best]


async def _compare_table(
    snaps: Snapshots, nodes: list[Node], db: str, table: str, key: str
) -> list[Finding]:
    sums = await _checksums(snaps, nodes, db, table, key)
    odd = _minority(sums)
    if not odd:
        return []
    ref = next(n for n in nodes if n.name not in odd)
    if not key:
        return [
            Finding(db, table, "all (no primary key)", n, f"{sums[n][0]} rows, checksum differs")
            for n in odd
        ]
    findings: list[Finding] = []
    for lo, hi in await _key_ranges(snaps, ref, db, table, key, int(sums[ref.name][0])):
        cond = []
        if lo is not None:
            cond.append(f"({key}) >= ({lo})")
        if hi is not None:
            cond.append(f"({key}) < ({hi})")
        where = "WHERE " + " AND ".join(cond) if cond else ""
        part = await _checksums(snaps, nodes, db, table, key, where)
        for n in _minority(part):
            span = f"{key} in [{lo or '-inf'}, {hi or '+inf'})"
            findings.append(
                Finding(db, table, span, n, f"{part[n][0]} rows vs {part[ref.name][0]}")
            )
    return findings


async def _key_ranges(
    snaps: Snapshots, ref: Node, db: str, table: str, key: str, rows: int
) -> list[tuple[str | None, str | None]]:
    """About RANGES key ranges covering the table, bounds as SQL row literals of the key."""
    step = max(rows // RANGES, 1)
    literal = " || ', ' || ".join(
        f"pg_catalog.quote_nullable(t.{col.strip()})" for col in key.split(",")
    )
    sql = (
        f"SELECT b FROM (SELECT {literal} AS b, row_number() OVER (ORDER BY {key}) AS rn "
        f"FROM {table} AS t) s WHERE (rn - 1) % {step} = 0 AND rn > 1 ORDER BY rn"
    )
    bounds = [str(r[0]) for r in (await snaps.query(ref.name, db, sql))[1]]
    edges: list[str | None] = [None, *bounds, None]
    return list(itertools.pairwise(edges))
