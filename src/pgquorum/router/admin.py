"""The admin console: psql to the router port with database ``pgquorum``, like PgBouncer's.

Commands are parsed with pglast (they are SHOW statements to the PostgreSQL grammar).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pglast import parse_sql
from pglast.ast import VariableShowStmt

from pgquorum.cluster.model import Node, NodeState
from pgquorum.protocol import messages as m
from pgquorum.protocol.errors import (
    FEATURE_NOT_SUPPORTED,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    QUERY_CANCELED,
    SYNTAX_ERROR,
    UNDEFINED_OBJECT,
    PgError,
)
from pgquorum.recovery.queue import QueueUnavailable, RemoteQueue

from .peers import NODE_NAME, no_quiet_point, node_name, parse_fail_node
from .verify import verify

if TYPE_CHECKING:
    from .server import Router
    from .session import ClientSession

log = logging.getLogger(__name__)

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
        self._holds: dict[tuple[int, str], asyncio.Event] = {}  # (admin session, what) -> HOLD
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
            if st.node not in cluster.group.nodes:
                continue  # removed
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
        rows.append(["RECOVER NODE name"])
        rows.append(["ADD NODE name 'host' port"])
        rows.append(["REMOVE NODE name"])
        rows.append(["SHOW RECOVERY"])
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
        except TimeoutError:  # (holding the commits has its own error: no_quiet_point)
            raise PgError(QUERY_CANCELED, "VERIFY gave up: a node did not answer in time") from None
        cols = ["database", "table", "range", "node", "detail"]
        return cols, [[f.database, f.table, f.range, f.node, f.detail] for f in findings]

    async def hold(self, session: ClientSession, what: str) -> Table:
        """HOLD COMMITS: this router's commit barrier, held for a peer's VERIFY or recovery
        snapshot; HOLD WRITES: its write gate, for a recovered node to join. Held until
        RELEASE, the end of the admin session, or HOLD_MAX_S."""
        key = (session.id, what)
        cols = _hold_columns(what)
        if key in self._holds:
            return cols, [["t", None]]  # already held by this session
        drained: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        release = asyncio.Event()
        router = self.router

        async def hold() -> None:
            try:
                if what == "COMMITS":
                    barrier = router.commits.barrier()
                else:
                    barrier = router.write_gate.hold(WRITE_HOLD_S)
                async with barrier as took:
                    if what == "WRITES":
                        await router.flush_sink()  # every commit queued has reached the queue
                    drained.set_result(took)
                    try:
                        await asyncio.wait_for(release.wait(), HOLD_MAX_S)
                    except TimeoutError:
                        # The holder must not go on as if it still held: its connection
                        # ends, so its next command (RECOVERY ONLINE, say) fails.
                        log.warning("a peer held %s for over %.0fs: ended", what, HOLD_MAX_S)
                        if session.transport is not None:
                            session.transport.abort()
            except BaseException as e:
                if not drained.done():
                    drained.set_exception(e)

        self._holds[key] = release
        task = asyncio.get_running_loop().create_task(hold())
        self._hold_tasks.add(task)  # (the loop keeps only a weak reference)
        task.add_done_callback(self._hold_tasks.discard)
        task.add_done_callback(
            lambda _: self._holds.pop(key) if self._holds.get(key) is release else None
        )
        try:
            took = await drained
        except TimeoutError:
            raise no_quiet_point(what) from None
        return cols, [["t", f"{took * 1000:.1f}"]]

    def release(self, session: ClientSession, what: str) -> Table:
        release = self._holds.pop((session.id, what), None)
        if release is not None:
            release.set()
        return _hold_columns(what), [["f", None]]

    # -- recovery -----------------------------------------------------------------------------

    def recover_node(self, node: str) -> Table:
        """RECOVER NODE name: starts the recovery and answers at once (see SHOW RECOVERY)."""
        recovery = self.router.start_recovery(node)
        return ["node", "recovery", "phase"], [[node, recovery.rid, recovery.progress.phase]]

    def show_recovery(self) -> Table:
        cols = [
            "node",
            "recovery",
            "phase",
            "databases",
            "bytes",
            "replayed",
            "queue_depth",
            "queue_bytes",
            "longest_pause_ms",
            "pauses_ms",
            "started",
            "seconds",
            "error",
            "resumed",
        ]
        recovery = self.router.recovery
        if recovery is None:
            return cols, []
        p = recovery.progress
        end = p.finished or time.time()
        row: list[str | None] = [
            p.node,
            p.rid,
            p.phase,
            f"{p.databases_done}/{p.databases}",
            str(p.bytes),
            str(p.replayed),
            str(recovery.queue.depth),
            str(recovery.queue.bytes),
            f"{max(p.pauses_ms, default=0.0):.1f}",
            ",".join(f"{x:.1f}" for x in p.pauses_ms),
            _when(p.started),
            f"{end - p.started:.1f}",
            p.error,
            str(p.resumed),
        ]
        return cols, [row]

    async def member_command(self, match: re.Match[str]) -> Table:
        """ADD NODE name 'host' port / REMOVE NODE name (FROM PEER: a peer passing it on)."""
        router = self.router
        name = node_name(match["node"])
        from_peer = match["peer"] is not None
        if match["verb"].upper() == "ADD":
            if match["host"] is None:
                raise PgError(SYNTAX_ERROR, "usage: ADD NODE name 'host' port")
            node = Node(name, match["host"].replace("''", "'"), int(match["port"]))
            await router.add_node(node, from_peer=from_peer)
        else:
            await router.remove_node(name, from_peer=from_peer)
        rows: list[list[str | None]] = [
            [st.node.name, st.state.value, st.reason]
            for st in router.cluster.status.values()
            if st.node.name == name
        ]
        return ["node", "state", "reason"], rows

    def queue_batch(self, sql: str, at: int) -> Table:
        """RECOVERY QUEUE {json}: a peer's batch of queue operations, its JSON at ``at``
        (read in place: a batch may be megabytes)."""
        router = self.router
        sink = router.recovery_sink
        recovery = router.recovery
        try:
            request, end = _JSON.raw_decode(sql, at)
        except ValueError as e:
            raise PgError(SYNTAX_ERROR, f"invalid RECOVERY QUEUE payload: {e}") from None
        if sql[end:].strip() not in ("", ";") or not isinstance(request, dict):
            raise PgError(SYNTAX_ERROR, "invalid RECOVERY QUEUE payload: one JSON object")
        if recovery is None or sink is not recovery.queue or request.get("rid") != sink.rid:
            # (Its own SQLSTATE: the peer learns that nothing replays, see QueueGone.)
            raise PgError(
                UNDEFINED_OBJECT,
                f"no recovery {request.get('rid')!r} is queueing on this router",
            )
        peer, batch = request.get("peer"), request.get("batch", 0)
        if not (peer is None or isinstance(peer, str)) or not isinstance(batch, int):
            raise PgError(SYNTAX_ERROR, "invalid RECOVERY QUEUE payload: peer and batch")
        try:
            serials = recovery.queue.apply_batch(request["ops"], peer, batch)
        except QueueUnavailable as e:
            raise PgError(OBJECT_NOT_IN_PREREQUISITE_STATE, str(e)) from None
        except (KeyError, TypeError, ValueError) as e:
            raise PgError(SYNTAX_ERROR, f"invalid RECOVERY QUEUE operation: {e}") from None
        return ["serial"], [[str(n)] for n in serials]

    def recovery_command(self, sql: str) -> Table:
        """The coordinator's commands to its peers (RECOVERY START/ONLINE/STOP)."""
        router = self.router
        text = sql.strip().rstrip(";")
        start = _RECOVERY_START.match(text)
        if start is not None:
            node = start["node"].replace("''", "'")
            host = start["host"].replace("''", "'")
            if node not in router.cluster.status:
                raise PgError(UNDEFINED_OBJECT, f"no node {node!r} in this router's group")
            old = router.recovery_sink
            if old is not None:
                old.close()
            router.recovery_sink = RemoteQueue(
                start["rid"], node, (host, int(start["port"])), router.internal_credentials()
            )
            router.cluster.refresh()
            if router.cluster.status[node].state is not NodeState.RECOVERING:
                router.cluster.mark_recovering(node, f"recovery {start['rid']} (by a peer)")
            return ["node", "state"], [[node, "RECOVERING"]]
        words = text.split()
        if len(words) == 3 and words[1].upper() in ("ONLINE", "STOP"):
            sink = router.recovery_sink
            if sink is None or sink.rid != words[2]:
                return ["node", "state"], []
            router.recovery_sink = None
            sink.close()
            if words[1].upper() == "ONLINE":
                router.cluster.mark_online(sink.node, f"recovered ({sink.rid})")
            state = router.cluster.status[sink.node].state.value
            return ["node", "state"], [[sink.node, state]]
        raise PgError(SYNTAX_ERROR, f"invalid recovery command: {text[:80]}")

    async def run(self, sql: str, session: ClientSession) -> list[tuple[str, Table]]:
        """Each command's result with its command tag."""
        queue = _QUEUE.match(sql)
        if queue is not None:  # first, and without copies of the text: see queue_batch
            return [("RECOVERY QUEUE", self.queue_batch(sql, queue.end()))]
        fail = parse_fail_node(sql)
        if fail is not None:
            return [("FAIL NODE", self.fail_node(*fail))]
        text = sql.strip().rstrip(";").strip()
        words = text.split()
        command = " ".join(w.upper() for w in words)
        if command in _HOLDS:
            verb, what = words[0].upper(), words[1].upper()
            if verb == "HOLD":
                return [(command, await self.hold(session, what))]
            return [(command, self.release(session, what))]
        if command == "SHOW RECOVERY":
            return [_shown(self.show_recovery())]
        recover = _RECOVER.match(text)
        if recover is not None:
            return [("RECOVER NODE", self.recover_node(node_name(recover["node"])))]
        if words and words[0].upper() == "RECOVERY":
            return [(" ".join(command.split()[:2]), self.recovery_command(sql))]
        member = _MEMBER.match(text)
        if member is not None:
            return [(f"{member['verb'].upper()} NODE", await self.member_command(member))]
        if words and words[0].upper() == "VERIFY":
            rest = [w.upper() for w in words[1:]]
            if rest not in ([], ["FAIL", "MINORITY"]):
                raise PgError(SYNTAX_ERROR, "usage: VERIFY [FAIL MINORITY]")
            return [("VERIFY", await self.verify(bool(rest)))]
        try:
            stmts = parse_sql(sql)
        except Exception as e:
            raise PgError(SYNTAX_ERROR, f"invalid admin command: {e}") from None
        tables = []
        for raw in stmts:
            stmt = raw.stmt
            if isinstance(stmt, VariableShowStmt) and stmt.name in self.commands:
                tables.append(_shown(self.commands[stmt.name]()))
            else:
                raise PgError(
                    FEATURE_NOT_SUPPORTED,
                    "unsupported admin command; try: "
                    + ", ".join("SHOW " + c.upper() for c in self.commands)
                    + ", FAIL NODE name [REASON 'text'], VERIFY [FAIL MINORITY]"
                    + ", RECOVER NODE name, SHOW RECOVERY, ADD NODE name 'host' port"
                    + ", REMOVE NODE name",
                )
        return tables

    async def serve(self, session: ClientSession) -> None:
        try:
            await self._serve(session)
        finally:
            for what in ("COMMITS", "WRITES"):  # a peer that holds and goes away
                self.release(session, what)

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
                for tag, (cols, rows) in await self.run(sql, session):
                    out.append(m.encode_row_description(cols))
                    out.extend(m.encode_data_row(r) for r in rows)
                    out.append(m.encode_command_complete(tag))
                if not out:
                    out.append(m.frame(m.EMPTY_QUERY))
            except PgError as e:
                out = [m.encode_error(e)]
            out.append(m.encode_ready(ord("I")))
            session.write(b"".join(out))


def _shown(table: Table) -> tuple[str, Table]:
    return f"SHOW {len(table[1])}", table


def _hold_columns(what: str) -> list[str]:
    return ["held" if what == "COMMITS" else "writes_held", "drained_ms"]


_QUEUE = re.compile(r"\s*RECOVERY\s+QUEUE\s+", re.IGNORECASE)
_JSON = json.JSONDecoder()
_RECOVER = re.compile(rf"^RECOVER\s+NODE\s+{NODE_NAME}$", re.IGNORECASE)
_MEMBER = re.compile(
    rf"""^(?P<verb>ADD|REMOVE)\s+NODE\s+{NODE_NAME}"""
    r"""(?:\s+'(?P<host>(?:[^']|'')*)'\s+(?P<port>\d{1,5}))?(?P<peer>\s+FROM\s+PEER)?$""",
    re.IGNORECASE,
)
_HOLDS = ("HOLD COMMITS", "RELEASE COMMITS", "HOLD WRITES", "RELEASE WRITES")
_RECOVERY_START = re.compile(
    r"^RECOVERY\s+START\s+(?P<rid>\S+)\s+'(?P<node>(?:[^']|'')*)'\s+"
    r"'(?P<host>(?:[^']|'')*)'\s+(?P<port>\d+)$",
    re.IGNORECASE,
)
WRITE_HOLD_S = 1.0  # a peer's write gate gives up on open transactions after this


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


HOLD_MAX_S = 10.0  # a peer's hold never outlives this
