"""A minimal client for the router's own use: its queries to nodes and to peer routers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar, cast

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m

from .backend import EXPECT_QUERY, NodeConnection, open_transport

Table = tuple[list[str], list[list[str | None]]]
K = TypeVar("K")


class Link:
    """A connection of the router's own to one server, for several simple queries."""

    def __init__(self, conn: NodeConnection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout

    @classmethod
    async def open(
        cls, server: Node, params: dict[str, str], password: str | None, timeout: float = 30
    ) -> Link:
        conn = await NodeConnection.open(server, params, password, discard, timeout=timeout)
        return cls(conn, timeout)

    async def query(self, sql: str) -> Table:
        """Column names and text rows of the last result; ErrorResponse raised as PgError."""
        self.conn.send_unit(m.encode_query(sql), [EXPECT_QUERY], relay=False)
        res = await asyncio.wait_for(self.conn.wait(), self.timeout)
        cols: list[str] = []
        rows: list[list[str | None]] = []
        for chunk in res.chunks:
            if chunk[0] == m.ERROR_RESPONSE:
                raise m.error_from_fields(m.parse_error_fields(chunk[5:]))
            if chunk[0] == m.ROW_DESCRIPTION:
                cols, rows = [], []
                cur = m.Cursor(chunk[5:], "RowDescription")
                for _ in range(cur.int16()):
                    cols.append(cur.cstring())
                    cur.raw(18)
            elif chunk[0] == m.DATA_ROW:
                rows.append(m.parse_data_row(chunk[5:]))
        return cols, rows

    def close(self) -> None:
        self.conn.close()


async def open_links(opening: dict[K, Awaitable[Link]], into: dict[K, Link]) -> None:
    """Open links at once. Every link that opened goes into ``into`` (its owner closes
    them) before the first failure, if any, is raised."""
    opened = await asyncio.gather(*opening.values(), return_exceptions=True)
    for key, link in zip(opening, opened, strict=True):
        if isinstance(link, Link):
            into[key] = link
    for link in opened:
        if isinstance(link, BaseException):
            raise link


async def query(
    server: Node, params: dict[str, str], password: str | None, sql: str, timeout: float = 30
) -> Table:
    """Run one simple query on a fresh connection; its column names and text rows.

    An ErrorResponse is raised as PgError; an unreachable server as NodeLost.
    """
    link = await Link.open(server, params, password, timeout)
    try:
        return await link.query(sql)
    finally:
        link.close()


def console_literal(text: str) -> str:
    """A string in the admin console's own commands: '' doubles a quote, nothing else."""
    return "'" + text.replace("'", "''") + "'"


async def admin_link(
    host: str, port: int, user: str, password: str | None, timeout: float = 30
) -> Link:
    """A connection to a router's admin console, for several commands."""
    return await Link.open(*_console(host, port, user), password, timeout)


async def admin_query(
    host: str, port: int, user: str, password: str | None, sql: str, timeout: float = 30
) -> Table:
    """Run one admin console command on a router."""
    node, params = _console(host, port, user)
    return await query(node, params, password, sql, timeout)


def _console(host: str, port: int, user: str) -> tuple[Node, dict[str, str]]:
    return Node("router", host, port), {
        "user": user,
        "database": "pgquorum",
        "application_name": "pgquorum",
    }


def discard(data: bytes) -> None:
    """Where a connection of the router's own sends what it would relay: nowhere."""


async def send_cancel(node: Node, pid: int, secret: int) -> None:
    """A CancelRequest for the backend ``pid`` of ``node``."""
    transport, _ = await asyncio.wait_for(open_transport(node, asyncio.Protocol), 5)
    try:
        cast(asyncio.WriteTransport, transport).write(m.encode_cancel_request(pid, secret))
    finally:
        transport.close()  # after the buffered request is sent
