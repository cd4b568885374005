"""The admin console: psql to the router port with database ``pgquorum``, like PgBouncer's.

Commands are parsed with pglast (they are SHOW statements to the PostgreSQL grammar).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pglast import parse_sql
from pglast.ast import VariableShowStmt

from pgquorum.cluster.model import NodeState
from pgquorum.protocol import messages as m
from pgquorum.protocol.errors import (
    FEATURE_NOT_SUPPORTED,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    SYNTAX_ERROR,
    UNDEFINED_OBJECT,
    PgError,
)

from .peers import parse_fail_node
from .verify import verify

if TYPE_CHECKING:
    from .server import Router
    from .session import ClientSession

Table = tuple[list[str], list[list[str | None]]]


class AdminConsole:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.commands: dict[str, Callable[[], Table]] = {
            "nodes": self.show_nodes,
            "sessions": self.show_sessions,
            "events": self.show_events,
            "help": self.show_help,
        }
        self._holds: dict[int, asyncio.Event] = {}  # admin session id -> its HOLD COMMITS
        self._hold_tasks: set[asyncio.Task[None]] = set()

    # -- tables -----------------------------------------------------------------------------

    def show_nodes(self) -> Table:
        cluster = self.router.cluster
        lead = cluster.lead()
        cols = [
            "name",
            "host",
            "port",
            "role",
            "state",
            "statements",
            "outstanding",
            "divergences",
            "since",
            "reason",
        ]
        rows: list[list[str | None]] = []
        for st in cluster.status.values():
            rows.append(
                [
                    st.node.name,
                    st.node.host,
                    str(st.node.port),
                    "lead" if st is lead else "replica",
                    st.state.value,
                    str(st.statements),
                    str(st.outstanding),
                    str(st.divergences),
                    _when(st.since),
                    st.reason if st.state is not NodeState.ONLINE else st.last_error,
                ]
            )
        return cols, rows

    def show_sessions(self) -> Table:
        cols = [
            "id",
            "user",
            "database",
            "client",
            "application_name",
            "state",
            "connected_at",
            "units",
            "nodes",
        ]
        rows: list[list[str | None]] = []
        for s in self.router.sessions.values():
            rows.append(
                [
                    str(s.id),
                    s.user,
                    s.database,
                    s.peer,
                    s.params.get("application_name", ""),
                    s.state,
                    _when(s.connected_at),
                    str(s.units),
                    ",".join(s.conns),
                ]
            )
        return cols, rows

    def show_events(self) -> Table:
        """Node state changes from the state database, newest first."""
        cols = ["at", "group", "node", "state", "reason", "router"]
        rows: list[list[str | None]] = [
            [_when(e.at), e.group, e.node, e.state.value, e.reason, e.router]
            for e in self.router.store.events(limit=200)
        ]
        return cols, rows

    def show_help(self) -> Table:
        rows: list[list[str | None]] = [["SHOW " + c.upper()] for c in self.commands]
        rows.append(["FAIL NODE name [REASON 'text']"])
        rows.append(["VERIFY [FAIL MINORITY]"])
        return ["command"], rows

    # -- protocol ---------------------------------------------------------------------------

    def fail_node(self, node: str, reason: str) -> Table:
        """FAIL NODE: take a node out of service (a peer router failed it, or an operator)."""
        cluster = self.router.cluster
        if node not in cluster.status:
            raise PgError(UNDEFINED_OBJECT, f"no node {node!r} in group {cluster.group.name!r}")
        cluster.mark_failed(node, reason or "failed by an admin command")
        st = cluster.status[node]
        return ["node", "state", "reason"], [[node, st.state.value, st.reason]]

    async def verify(self, fail_minority: bool) -> Table:
        """VERIFY [FAIL MINORITY]: where the ONLINE nodes differ (no rows: identical)."""
        try:
            findings = await verify(self.router, fail_minority=fail_minority)
        except TimeoutError:
            raise _no_quiet_point() from None
        cols = ["database", "table", "range", "node", "detail"]
        return cols, [[f.database, f.table, f.range, f.node, f.detail] for f in findings]

    async def hold_commits(self, session: ClientSession) -> Table:
        """HOLD COMMITS: this router's commit barrier, held for a peer's VERIFY until RELEASE
        COMMITS, the end of the admin session, or HOLD_MAX_S."""
        if session.id in self._holds:
            return ["held", "drained_ms"], [["t", None]]  # already held by this session
        drained: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        release = asyncio.Event()

        async def hold() -> None:
            try:
                async with self.router.commits.barrier() as took:
                    drained.set_result(took)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(release.wait(), HOLD_MAX_S)
            except BaseException as e:
                if not drained.done():
                    drained.set_exception(e)

        self._holds[session.id] = release
        task = asyncio.get_running_loop().create_task(hold())
        self._hold_tasks.add(task)  # (the loop keeps only a weak reference)
        task.add_done_callback(self._hold_tasks.discard)
        task.add_done_callback(lambda _: self._holds.pop(session.id, None))
        try:
            took = await drained
        except TimeoutError:
            raise _no_quiet_point() from None
        return ["held", "drained_ms"], [["t", f"{took * 1000:.1f}"]]

    def release_commits(self, session: ClientSession) -> Table:
        release = self._holds.pop(session.id, None)
        if release is not None:
            release.set()
        return ["held", "drained_ms"], [["f", None]]

    async def run(self, sql: str, session: ClientSession | None = None) -> list[Table]:
        fail = parse_fail_node(sql)
        if fail is not None:
            return [self.fail_node(*fail)]
        words = sql.strip().rstrip(";").split()
        command = " ".join(w.upper() for w in words)
        if command in ("HOLD COMMITS", "RELEASE COMMITS") and session is not None:
            if command == "HOLD COMMITS":
                return [await self.hold_commits(session)]
            return [self.release_commits(session)]
        if words and words[0].upper() == "VERIFY":
            rest = [w.upper() for w in words[1:]]
            if rest not in ([], ["FAIL", "MINORITY"]):
                raise PgError(SYNTAX_ERROR, "usage: VERIFY [FAIL MINORITY]")
            return [await self.verify(bool(rest))]
        try:
            stmts = parse_sql(sql)
        except Exception as e:
            raise PgError(SYNTAX_ERROR, f"invalid admin command: {e}") from None
        tables = []
        for raw in stmts:
            stmt = raw.stmt
            if isinstance(stmt, VariableShowStmt) and stmt.name in self.commands:
                tables.append(self.commands[stmt.name]())
            else:
                raise PgError(
                    FEATURE_NOT_SUPPORTED,
                    "unsupported admin command; try: "
                    + ", ".join("SHOW " + c.upper() for c in self.commands)
                    + ", FAIL NODE name [REASON 'text'], VERIFY [FAIL MINORITY]",
                )
        return tables

    async def serve(self, session: ClientSession) -> None:
        try:
            await self._serve(session)
        finally:
            self.release_commits(session)  # a peer that holds commits and goes away

    async def _serve(self, session: ClientSession) -> None:
        skipping = False  # after an error in an extended-protocol batch, until its Sync
        while True:
            mtype, payload = await session.next_message()
            if mtype == m.TERMINATE:
                return
            if mtype == m.SYNC:
                skipping = False
                session.write(m.encode_ready(ord("I")))
                continue
            if mtype != m.QUERY:
                if mtype in (m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.FLUSH):
                    if not skipping:
                        skipping = True
                        session.write(
                            m.encode_error(
                                PgError(
                                    FEATURE_NOT_SUPPORTED,
                                    "the admin console supports only the simple query protocol",
                                )
                            )
                        )
                    continue
                raise m.ProtocolViolation(f"invalid frontend message type {mtype}")
            out: list[bytes] = []
            try:
                sql = m.parse_query(payload)
                for cols, rows in await self.run(sql, session):
                    out.append(m.encode_row_description(cols))
                    out.extend(m.encode_data_row(r) for r in rows)
                    tag = _TAGS.get(cols[0], f"SHOW {len(rows)}")
                    out.append(m.encode_command_complete(tag))
                if not out:
                    out.append(m.frame(m.EMPTY_QUERY))
            except PgError as e:
                out = [m.encode_error(e)]
            out.append(m.encode_ready(ord("I")))
            session.write(b"".join(out))


def _no_quiet_point() -> PgError:
    return PgError(
        OBJECT_NOT_IN_PREREQUISITE_STATE,
        "cannot hold commits: the commits in flight did not finish in time",
        hint="Try again; a long one-phase commit (or a lock it waits for) was in the way.",
    )


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


_TAGS = {"node": "FAIL NODE", "database": "VERIFY", "held": "HOLD COMMITS"}
HOLD_MAX_S = 10.0  # a peer's hold never outlives this
