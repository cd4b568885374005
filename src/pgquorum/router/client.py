"""A minimal client for the router's own use: its queries to nodes and to peer routers."""

from __future__ import annotations

import asyncio

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m

from .backend import EXPECT_QUERY, NodeConnection

Table = tuple[list[str], list[list[str | None]]]


async def query(
    server: Node, params: dict[str, str], password: str | None, sql: str, timeout: float = 30
) -> Table:
    """Run one simple query on a fresh connection; its column names and text rows.

    An ErrorResponse is raised as PgError; an unreachable server as NodeLost.
    """
    conn = await NodeConnection.open(server, params, password, _discard, timeout=timeout)
    try:
        conn.send_unit(m.encode_query(sql), [EXPECT_QUERY], relay=False)
        res = await asyncio.wait_for(conn.wait(), timeout)
        cols: list[str] = []
        rows: list[list[str | None]] = []
        for chunk in res.chunks:
            if chunk[0] == m.ERROR_RESPONSE:
                raise m.error_from_fields(m.parse_error_fields(chunk[5:]))
            if chunk[0] == m.ROW_DESCRIPTION:
                cur = m.Cursor(chunk[5:], "RowDescription")
                for _ in range(cur.int16()):
                    cols.append(cur.cstring())
                    cur.raw(18)
            elif chunk[0] == m.DATA_ROW:
                rows.append(m.parse_data_row(chunk[5:]))
        return cols, rows
    finally:
        conn.close()


async def admin_query(
    host: str, port: int, user: str, password: str | None, sql: str, timeout: float = 30
) -> Table:
    """Run one admin console command on a router."""
    params = {"user": user, "database": "pgquorum", "application_name": "pgquorum"}
    return await query(Node("router", host, port), params, password, sql, timeout)


def _discard(data: bytes) -> None:
    pass
