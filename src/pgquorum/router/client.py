"""A minimal client for the router's own use: the admin console from the command line."""

from __future__ import annotations

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m

from .backend import EXPECT_QUERY, NodeConnection


async def admin_query(
    host: str, port: int, user: str, password: str | None, sql: str
) -> tuple[list[str], list[list[str | None]]]:
    """Run one admin console command; return its column names and rows."""
    conn = await NodeConnection.open(
        Node("router", host, port), {"user": user, "database": "pgquorum"}, password, lambda _: None
    )
    try:
        conn.send_unit(m.encode_query(sql), [EXPECT_QUERY], relay=False)
        res = await conn.wait()
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
