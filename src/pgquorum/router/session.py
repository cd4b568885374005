"""One client connection: startup, authentication, and routing of every unit of work.

The session reads whole frontend messages, groups them into units (a simple Query, or an
extended-protocol batch up to Sync or Flush), decides where each unit runs, and hands it to the
node connections:

* READ   one ONLINE node chosen by the read policy; the node's reply is relayed as it arrives.
* LEAD   the lead only (LISTEN, cursors); relayed.
* WRITE  every ONLINE node, lead first, then the others; the client gets the lead's reply once
         every node has finished, and outcomes that differ are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pglast import Error as PglastError
from pglast.parser import scan

from pgquorum import failpoints
from pgquorum.cluster.state import NodeStatus
from pgquorum.protocol import messages as m
from pgquorum.protocol.auth import ServerAuth
from pgquorum.protocol.errors import (
    CONNECTION_FAILURE,
    DEADLOCK_DETECTED,
    FEATURE_NOT_SUPPORTED,
    IDLE_SESSION_TIMEOUT,
    IO_ERROR,
    LOCK_NOT_AVAILABLE,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    QUERY_CANCELED,
    SERIALIZATION_FAILURE,
    TOO_MANY_CONNECTIONS,
    PgError,
    ProtocolViolation,
)
from pgquorum.protocol.framing import Framer
from pgquorum.recovery import journal as recovery_journal
from pgquorum.recovery.journal import Entry, Journal
from pgquorum.recovery.queue import QueueUnavailable, Sink
from pgquorum.sql import sequences as seq
from pgquorum.sql.analyze import Analysis, Route
from pgquorum.sql.catalog import TableCatalog
from pgquorum.sql.determinism import (
    NODE_LOCAL_VALUES,
    REFUSED_ALWAYS,
    TIME_FUNCTIONS,
    check_and_rewrite,
)
from pgquorum.sql.quoting import quote_literal

from . import quiet
from .backend import (
    EXPECT_QUERY,
    EXPECT_QUERY_SWALLOWED,
    EXPECT_SYNC,
    Expectation,
    NodeConnection,
    NodeLost,
    UnitResult,
)
from .client import query, send_cancel
from .commit import Hold
from .sequences import lock_sql

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger(__name__)

IDLE = ord("I")
IN_BLOCK = ord("T")
FAILED_BLOCK = ord("E")
_BEGIN = m.encode_query("BEGIN")
_ROLLBACK = m.encode_query("ROLLBACK")
# Failures of a transaction that one node may meet where the others do not, by its own
# timing: serialization failure, deadlock detected, lock not available (lock_timeout,
# NOWAIT), query canceled (statement_timeout, a cancel). The transaction's, not the node's.
TIMING_FAILURES = frozenset(
    {SERIALIZATION_FAILURE, DEADLOCK_DETECTED, LOCK_NOT_AVAILABLE, QUERY_CANCELED}
)
_TAKE_SNAPSHOT = m.encode_query("SELECT 1")  # (any statement takes the transaction's snapshot)
# How much longer than the lead the others may wait for a lock (see _break_cross_waits).
CROSS_WAIT_S = 1.0
# At most how long a statement keeps this router's commits back (CommitCoordinator.quiet,
# which also ends the hold once a commit has waited QUIET_PATIENCE_S for it).
QUIET_LONGEST_S = 5.0
ADMIN_DATABASE = "pgquorum"
_READ_PAUSE_BYTES = 4 * 1024 * 1024
# How many more statements in flight a session's home node may have than the least loaded
# node before the session's reads move (see ClientSession._home).
HOME_SLACK = 2
_session_ids = itertools.count(1)

# Builds the bytes of a unit, and what to expect back, for one node connection.
BuildUnit = Callable[[NodeConnection], tuple[bytes, list[Expectation]]]


class ClientGone(Exception):
    """The client closed its connection."""


class Statement:
    """A prepared statement as the client defined it; ``version`` tells reuses of a name apart
    (and rewrites of it: see ClientSession._fix_statement)."""

    __slots__ = ("analysis", "name", "parse", "parse_frame", "sent_text", "version")

    def __init__(
        self, parse: m.Parse, parse_frame: bytes, analysis: Analysis, version: int
    ) -> None:
        self.name = parse.name
        self.parse = parse
        self.parse_frame = parse_frame
        self.sent_text = parse.query  # the text the nodes get: the client's, or a rewrite
        self.analysis = analysis
        self.version = version


class ClientSession(asyncio.Protocol):
    def __init__(self, router: Router, *, private: bool = False) -> None:
        self.router = router
        self.private = private  # came in on a worker's private socket: from a sibling
        self.id = next(_session_ids)
        self.framer = Framer(router.settings.max_message_size)
        self.transport: asyncio.Transport | None = None
        self._wake: asyncio.Future[None] | None = None
        self._gone = False
        self._reading_paused = False
        self.conns: dict[str, NodeConnection] = {}
        self._online: list[NodeConnection] = []
        self._online_generation = -1
        self.params: dict[str, str] = {}
        self.user = ""
        self.database = ""
        self.peer = ""
        self.connected_at = time.time()
        self.key = (0, 0)
        self.state = "startup"
        self.units = 0
        # Transaction tracking, from the ReadyForQuery status of the nodes.
        self.txn_status = IDLE
        self.txn_wrote = False
        self.txn_strict = False
        self.session_strict = False
        self._snapshot_pinned = False  # see _pin_snapshot
        self._hold: Hold | None = None  # the quiet hold of the unit running (_write_unit)
        self._cross_cancelled: set[NodeConnection] = set()  # see _break_cross_waits
        # While the nodes after the lead run a statement: they, and when they have taken
        # CROSS_WAIT_S longer than the lead (look_for_cross_waits).
        self._after_lead: tuple[list[NodeConnection], float] | None = None
        self._cross_probe: asyncio.Task[None] | None = None
        self.txn_node: NodeConnection | None = None
        self.read_home: NodeConnection | None = None  # where balanced reads go by preference
        # Extended protocol: statements and where portals were bound.
        self.statements: dict[str, Statement] = {}
        self.portals: dict[str, tuple[NodeConnection, ...]] = {}
        self._versions = itertools.count(1)
        self._skip_to_sync = False
        # The fast path: reads outside transaction blocks handled in callbacks, without
        # waking the session task (see _fast_path).
        self._fast_ready = False
        self._parked = False  # the task waits for the client's next message
        self._fast_unit: tuple[NodeConnection, NodeStatus, BuildUnit] | None = None
        self._fast_error: PgError | None = None
        self._pushback: deque[tuple[int, bytes]] = deque()
        self.cancel_requested = False  # set by a CancelRequest, cleared when a unit starts
        self.lenient_strings = False  # standard_conforming_strings is off: see _resolve
        # The session created a temporary object: PostgreSQL refuses PREPARE TRANSACTION for
        # transactions that touch one, so its commits are one-phase (voted per statement).
        self.temp_objects = False
        self.txn_one_phase = False  # the transaction did NOTIFY/LISTEN: it cannot PREPARE
        # The time the router chose for the transaction: now() and friends in its writes.
        self.txn_time: datetime | None = None
        # Sequences the unit being prepared draws from on the nodes (see _with_seq_locks).
        self._seq_locks: set[str] = set()
        # Sequence values this session got (currval/lastval), by schema-qualified name.
        self.seq_last: dict[str, int] = {}
        self.seq_lastval: int | None = None
        self.task: asyncio.Task[None] | None = None
        # Recovery (see pgquorum.recovery): the transaction's write units as sent, settings
        # to give a new connection, and the queue serial a one-phase commit reserved.
        self.journal = Journal()
        # The session's settings by name (the SET as sent), and those a transaction block
        # made, which count only if it commits.
        self.settings: dict[str, bytes] = {}
        self._txn_settings: list[tuple[bool, str, bytes]] = []  # (reset, name, statement)
        self._savepoints: list[tuple[str, int]] = []  # see _note_settings
        self.writing = False  # in a write unit outside a transaction that wrote (WriteGate)
        self.txn_count = 0  # transactions ended (WriteGate)
        self._begin_data: bytes | None = None  # the client's deferred BEGIN
        self._reserved: tuple[Sink, int] | None = None
        self._adopted_generation = -1
        self._cancel_build: BuildUnit | None = None
        self._copy_seen = False
        self._copy_data: bytes | None = None

    # -- asyncio.Protocol (client side) -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        self.task = asyncio.get_running_loop().create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.framer.feed(data)
        if self.framer.buffered > _READ_PAUSE_BYTES and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        if self._fast_ready and self._fast_unit is None:
            self._fast_path()
        else:
            self._wakeup()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._wakeup()

    def pause_writing(self) -> None:
        for c in self.conns.values():
            c.pause_reading()

    def resume_writing(self) -> None:
        for c in self.conns.values():
            c.resume_reading()

    def _wakeup(self) -> None:
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    # -- reading frontend messages ----------------------------------------------------------

    async def _wait_data(self) -> None:
        if self._gone:
            raise ClientGone
        if self._fast_error is not None:
            raise self._fast_error  # a fast-path read lost its node: see _fast_done
        if self._reading_paused and self.framer.buffered < _READ_PAUSE_BYTES // 2:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    async def next_message(self) -> tuple[int, bytes]:
        while True:
            if self._pushback:
                return self._pushback.popleft()
            msg = self.framer.next_message()
            if msg is not None:
                return msg
            await self._wait_data()

    async def _next_startup(self) -> bytes:
        while True:
            pkt = self.framer.next_startup()
            if pkt is not None:
                return pkt
            await self._wait_data()

    # -- the session ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if not await self._startup():
                return
            self.router.sessions[self.key[0]] = self
            if self.database == ADMIN_DATABASE:
                await self.router.admin.serve(self)
            else:
                await self._serve()
        except ClientGone:
            pass
        except PgError as e:
            if not e.fatal:
                e.severity = "FATAL"
            self.write(m.encode_error(e))
            if e.sqlstate not in ("28P01", "28000", "3D000"):
                log.warning("session %d (%s): %s", self.id, self.peer, e.message)
        except Exception:
            log.exception("session %d (%s): internal error", self.id, self.peer)
            self.write(
                m.encode_error(
                    PgError("XX000", "internal error in the pgquorum router", severity="FATAL")
                )
            )
        finally:
            self.router.sessions.pop(self.key[0], None)
            self._leave_queue()
            for c in self.conns.values():
                c.close()
            if self.transport is not None:
                self.transport.close()

    async def _startup(self) -> bool:
        """Handle the startup phase; False if the connection was a cancel request."""
        assert self.transport is not None
        while True:
            pkt = m.parse_startup(await self._next_startup())
            if isinstance(pkt, m.SSLRequest):
                ctx = self.router.ssl_ctx
                if ctx is None or self.framer.buffered:
                    self.transport.write(b"N")
                    continue
                self.transport.write(b"S")
                loop = asyncio.get_running_loop()
                new = await loop.start_tls(self.transport, self, ctx, server_side=True)
                assert new is not None
                self.transport = new
            elif isinstance(pkt, m.GSSENCRequest):
                self.transport.write(b"N")
            elif isinstance(pkt, m.CancelRequest):
                await self.router.cancel(pkt.pid, pkt.secret, forward=not self.private)
                return False
            else:
                break
        self.params = dict(pkt.params)
        self.user = pkt.user
        self.database = pkt.database
        self.params["database"] = self.database
        await self._authenticate()
        if self.database == ADMIN_DATABASE:
            server_params = {
                "server_version": "15.0 (pgquorum admin console)",
                "client_encoding": "UTF8",
                "server_encoding": "UTF8",
                "DateStyle": "ISO, MDY",
                "integer_datetimes": "on",
                "standard_conforming_strings": "on",
            }
        else:
            await self._connect_nodes()
            lead = self._lead()
            server_params = lead.params
            lead.set_forward_async(True)
            self.lenient_strings = lead.params.get("standard_conforming_strings") == "off"
        self.key = self.router.new_cancel_key()
        out = [m.encode_parameter_status(k, v) for k, v in server_params.items()]
        out.append(m.encode_backend_key(*self.key))
        out.append(m.encode_ready(IDLE))
        self.transport.writelines(out)
        self.state = "idle"
        return True

    async def _authenticate(self) -> None:
        settings = self.router.settings
        secret = self.router.users.get(self.user)
        auth = ServerAuth(settings.auth_method, self.user, secret)
        out, done = auth.start()
        self.write(out)
        while not done:
            mtype, payload = await self.next_message()
            if mtype != m.PASSWORD:
                raise ProtocolViolation(
                    f"expected a password message, got message type {chr(mtype)!r}"
                )
            out, done = auth.receive(payload)
            self.write(out)

    def _backend_params(self) -> tuple[dict[str, str], str | None]:
        params = {k: v for k, v in self.params.items() if k != "replication"}
        params["user"], password = self.router.credentials(params["user"])
        return params, password

    async def _connect_nodes(self) -> None:
        cluster = self.router.cluster
        targets = [st.node for st in cluster.online()]
        if not targets:
            raise PgError(
                CONNECTION_FAILURE,
                f"no ONLINE node in group {cluster.group.name!r}",
                severity="FATAL",
            )
        params, password = self._backend_params()
        results = await asyncio.gather(
            *(NodeConnection.open(n, params, password, self.write) for n in targets),
            return_exceptions=True,
        )
        for node, res in zip(targets, results, strict=True):
            if isinstance(res, NodeConnection):
                res.on_idle_timeout = self._idle_timeout
                self.conns[node.name] = res
            elif isinstance(res, NodeLost):
                cluster.mark_failed(node.name, res.reason)
            elif isinstance(res, PgError):
                for c in self.conns.values():
                    c.close()
                self.conns.clear()
                raise res
            elif isinstance(res, BaseException):
                raise res
        if not self.conns:
            raise PgError(
                CONNECTION_FAILURE,
                f"no node of group {cluster.group.name!r} can be reached",
                severity="FATAL",
            )

    def keep_alive(self) -> None:
        """A ping on each connection that runs no unit, unless the session waits for its
        client (Router._tick, every KEEPALIVE_S): while the router works for the session
        (one node runs a statement, a commit waits its turn), the others wait idle, maybe in
        its transaction, and a node ends a connection idle longer than its
        idle_session_timeout or idle_in_transaction_session_timeout. Waiting for the client,
        the client's own idleness is the nodes' to judge."""
        if not self._parked:
            for c in self.conns.values():
                c.ping()  # (nothing where a unit runs)

    def _idle_timeout(self, conn: NodeConnection, e: NodeLost) -> None:
        """A node ended this session's connection to it for an idle timeout (the client's
        or the server's setting) while no unit ran on it: the node is well, and is not
        failed (one that ends it while a unit runs there fails, as any other loss).

        Outside a transaction (idle_session_timeout) the session connects to the node again
        before it next needs it, as a pooler would: the client keeps its session. In a
        transaction (idle_in_transaction_session_timeout) the node rolled it back: the session
        ends for the client as on PostgreSQL, and its transaction everywhere."""
        name = conn.node.name
        if self.conns.get(name) is not conn:
            return
        if e.idle_timeout == IDLE_SESSION_TIMEOUT:
            # Dropped and replaced before the session next needs the node (_drop_lost,
            # _adopt_nodes), whether it waits for its client or runs a unit elsewhere.
            self._online_generation = self._adopted_generation = -1
            log.info("session %d: node %s closed its idle connection: %s", self.id, name, e.reason)
            return
        if not self._parked:
            return  # (the unit under way finds the connection lost)
        log.info("session %d: ended by node %s: %s", self.id, name, e.reason)
        self.write(m.encode_error(PgError(e.idle_timeout, e.reason, severity="FATAL")))
        for c in self.conns.values():
            c.close()
        if self.transport is not None:
            self.transport.close()

    # -- node selection ---------------------------------------------------------------------

    def _online_conns(self) -> list[NodeConnection]:
        """Connections to ONLINE nodes, in group order; drops nodes failed meanwhile."""
        cluster = self.router.cluster
        if self._online_generation == cluster.generation and self._online:
            # A connection lost since then raises NodeLost when used, which fails its node
            # and bumps the generation.
            return self._online
        conns = self.conns
        if self._drop_lost():
            lead = next(iter(conns.values()), None)
            if lead is not None:
                lead.set_forward_async(True)
        if not conns:
            raise PgError(
                CONNECTION_FAILURE, "no ONLINE node is left for this session", severity="FATAL"
            )
        self._online = list(conns.values())
        self._online_generation = cluster.generation
        # Nodes failed, or came back: the session's reads find their home again, so that a
        # recovered node takes its share.
        self.read_home = None
        return self._online

    def _all_writes(self) -> bool:
        return self.lenient_strings or self.router.settings.read_policy == "all"

    def _lead(self) -> NodeConnection:
        return self._online_conns()[0]

    def _pick_read(self) -> NodeConnection:
        conns = self._online_conns()
        policy = self.router.settings.read_policy
        if policy == "lead" or len(conns) == 1:
            return conns[0]
        if self.txn_status != IDLE:
            # Inside a transaction block reads stick to one node; after a write (or under
            # REPEATABLE READ / SERIALIZABLE, whose snapshot must be the writer's) the lead.
            if self.txn_wrote or self.txn_strict or self.session_strict:
                return conns[0]
            if self.txn_node is None or self.txn_node not in conns:
                self.txn_node = self._home(conns)
            return self.txn_node
        if self.session_strict:
            return conns[0]
        return self._home(conns)

    def _home(self, conns: list[NodeConnection]) -> NodeConnection:
        """The session's home node for reads, while it is not clearly busier than the least
        loaded one (then the least loaded becomes home).

        Keeping a session's reads on one node keeps one backend process per session busy
        instead of one per node: its caches stay warm and its prepared statements are
        parsed once. Measured on pgbench -S with 8 clients over 3 nodes, the servers spent
        a fifth less CPU per read than with every read sent to the least loaded node.
        """
        home = self.read_home
        if home is not None and home in conns:
            status = self.router.cluster.status
            load = status[home.node.name].outstanding
            if load <= HOME_SLACK or (
                load - min(status[c.node.name].outstanding for c in conns) <= HOME_SLACK
            ):
                return home
        home = self.read_home = self._least_loaded(conns)
        return home

    def _least_loaded(self, conns: list[NodeConnection]) -> NodeConnection:
        """The node with the least outstanding work; ties go round robin."""
        count = len(conns)
        turn = self.router.read_turn = (self.router.read_turn + 1) % count
        status = self.router.cluster.status
        best = conns[turn]
        least = status[best.node.name].outstanding
        for i in range(1, count):
            if not least:
                break
            c = conns[(turn + i) % count]
            load = status[c.node.name].outstanding
            if load < least:
                best, least = c, load
        return best

    async def _resolve(self, a: Analysis) -> Route:
        """The analysis' route, upgraded to WRITE when a called function is volatile."""
        route = a.route
        if route is Route.READ and not a.functions and not self._all_writes():
            return route
        if self.lenient_strings:
            # The SQL grammar pglast knows assumes standard_conforming_strings = on; with it
            # off, backslashes inside literals change where statements end, so no analysis
            # can be trusted: everything runs everywhere.
            return Route.WRITE
        if route is Route.READ:
            if a.functions:
                catalog = self.router.catalog(self.database)
                unknown = catalog.unknown(a.functions)
                if unknown:
                    await self._lookup_functions(unknown)
                if catalog.is_volatile(a.functions - NODE_LOCAL_VALUES):
                    route = Route.WRITE
            if self.router.settings.read_policy == "all":
                route = Route.WRITE
        return route

    async def _lookup_functions(self, names: list[str]) -> None:
        catalog = self.router.catalog(self.database)
        rows = await self._fetch(catalog.lookup_sql(names))
        if rows is not None:
            catalog.learn(((str(r[0]), str(r[1])) for r in rows), names)

    # -- the fast path ----------------------------------------------------------------------

    def _fast_path(self) -> None:
        """Serve buffered reads straight from the protocol callbacks.

        Runs only while the session task is parked between units. A simple Query or an
        extended batch (up to Sync) that is a provable read outside a transaction block goes
        to a node at once, and the next one is taken when its answer has been relayed.
        Anything else is pushed back and the task is woken to handle it the general way.
        """
        framer = self.framer
        if self._reading_paused and framer.buffered < _READ_PAUSE_BYTES // 2:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        while self._fast_ready and self._fast_unit is None:
            try:
                msg = framer.next_message()
            except PgError:
                self._wakeup()  # the task reports it
                return
            if msg is None:
                return
            mtype = msg[0]
            if mtype == m.QUERY:
                if self._fast_query(msg[1]):
                    continue
                self._pushback.append(msg)
            elif mtype == m.PARSE or mtype == m.BIND:
                msgs = [msg]
                while mtype != m.SYNC:
                    try:
                        nxt = framer.next_message()
                    except PgError:
                        nxt = None
                    if nxt is None:
                        break
                    msgs.append(nxt)
                    mtype = nxt[0]
                if mtype == m.SYNC and self._fast_extended(msgs):
                    continue
                self._pushback.extend(msgs)
            else:
                self._pushback.append(msg)
            self._wakeup()
            return
        if not self._fast_ready:
            self._wakeup()  # the task has a message and waits for the unit in flight

    def _nodes_changed(self) -> bool:
        """The ONLINE nodes changed since the session last connected to the new ones: the
        task does that (an await) before the next unit."""
        return self._adopted_generation != self.router.cluster.generation

    def _known_read(self, a: Analysis) -> bool:
        """A READ whose functions (if any) the catalog already knows to be non-volatile."""
        if a.route is not Route.READ:
            return False
        if not a.functions:
            return True
        catalog = self.router.catalog(self.database)
        return not catalog.unknown(a.functions) and not catalog.is_volatile(
            a.functions - NODE_LOCAL_VALUES
        )

    def _fast_start(self, conn: NodeConnection, build: BuildUnit) -> bool:
        st = self.router.cluster.status[conn.node.name]
        try:
            conn.send_unit(*build(conn), relay=True, on_done=self._fast_done)
        except NodeLost:
            return False  # the task retries and handles the loss
        st.outstanding += 1
        st.statements += 1
        self._fast_unit = (conn, st, build)
        self.state = "active"
        self.cancel_requested = False
        return True

    def _fast_query(self, payload: bytes) -> bool:
        if self.txn_status != IDLE or self._all_writes() or self._nodes_changed():
            return False
        try:
            a = self.router.analyzer.analyze(m.parse_query(payload))
        except PgError:
            return False
        if not self._known_read(a):
            return False
        try:
            conn = self._pick_read()
        except PgError:
            return False
        data = m.frame(m.QUERY, payload)
        return self._fast_start(conn, lambda c: (data, [EXPECT_QUERY]))

    def _fast_extended(self, msgs: list[tuple[int, bytes]]) -> bool:
        """A batch of Parse/Bind/Describe/Execute ending in Sync whose every Execute is a
        provable read of a statement parsed in the batch or before."""
        if self.txn_status != IDLE or self._all_writes() or self._nodes_changed():
            return False
        statements = self.statements
        parsed: dict[str, Statement] = {}
        bound: set[str] = set()
        batch: list[tuple[int, bytes, object]] = []
        try:
            for mtype, payload in msgs:
                info: object = None
                if mtype == m.PARSE:
                    p = m.parse_parse(payload)
                    a = self.router.analyzer.analyze(p.query)
                    if not self._known_read(a) or a.strict_isolation:
                        return False
                    info = parsed[p.name] = Statement(p, m.frame(m.PARSE, payload), a, 0)
                elif mtype == m.BIND:
                    b = m.parse_bind(payload)
                    info = parsed.get(b.statement) or statements.get(b.statement)
                    if not isinstance(info, Statement):
                        return False
                    if not self._known_read(info.analysis):
                        return False
                    bound.add(b.portal)
                elif mtype == m.EXECUTE:
                    if m.parse_execute(payload).portal not in bound:
                        return False
                elif mtype == m.DESCRIBE:
                    d = m.parse_describe(payload)
                    if d.kind == "S":
                        info = parsed.get(d.name) or statements.get(d.name)
                    elif d.name not in bound:
                        return False
                elif mtype != m.SYNC:
                    return False
                batch.append((mtype, payload, info))
        except PgError:
            return False
        try:
            conn = self._pick_read()
        except PgError:
            return False
        for stmt in parsed.values():
            stmt.version = next(self._versions)
            statements[stmt.name] = stmt
        return self._fast_start(conn, lambda c: _build_batch(c, batch))

    def _fast_done(self, res: UnitResult | None) -> None:
        assert self._fast_unit is not None
        conn, st, build = self._fast_unit
        self._fast_unit = None
        st.outstanding -= 1
        if res is None:
            reason = conn.lost.reason if conn.lost else "connection lost"
            self.router.cluster.mark_failed(conn.node.name, reason)
            if not conn.relayed:
                # Nothing reached the client yet: the read runs again on another node.
                try:
                    if self._fast_start(self._pick_read(), build):
                        return
                except PgError:
                    pass
            self._fast_error = _served_node_lost(conn, reason)
            self._wakeup()
            return
        if res.status == IDLE:
            self.units += 1  # a read outside a block: no transaction state to follow
        else:
            self._after_unit(res, Route.READ, False, False)
        self.state = "idle"
        self._fast_path()

    # -- serving units ----------------------------------------------------------------------

    async def _serve(self) -> None:
        batch: list[tuple[int, bytes, object]] = []
        while True:
            if not batch:
                self.state = "idle" if self.txn_status == IDLE else "idle in transaction"
                self.writing = False
                # Parked between units: reads may now take the fast path (see _fast_path).
                self._fast_ready = not self._skip_to_sync
                self._parked = True
                try:
                    mtype, payload = await self.next_message()
                finally:
                    self._fast_ready = self._parked = False
                while self._fast_unit is not None:  # never overtake a unit in flight
                    await self._wait_data()
                if self._fast_error is not None:
                    raise self._fast_error  # the fast unit before this message failed
            else:
                mtype, payload = await self.next_message()
            self.state = "active"
            self.cancel_requested = False
            if not batch and self.txn_status == IDLE and self._nodes_changed():
                await self._adopt_nodes()  # reads too may use a node that came ONLINE
            if self._skip_to_sync:
                if mtype == m.SYNC:
                    self._skip_to_sync = False
                    self.write(m.encode_ready(self.txn_status))
                elif mtype == m.TERMINATE:
                    return
                continue
            if mtype == m.QUERY:
                await self._simple_query(payload)
            elif mtype in (m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE):
                batch.append((mtype, payload, None))
            elif mtype == m.SYNC or mtype == m.FLUSH:
                if mtype == m.FLUSH and not batch:
                    continue
                batch.append((mtype, payload, None))
                try:
                    await self._extended(batch)
                finally:
                    batch = []
            elif mtype == m.TERMINATE:
                return
            elif mtype in (m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL):
                continue  # outside COPY these are ignored, as PostgreSQL does
            elif mtype == m.FUNCTION_CALL:
                self._router_error(
                    PgError(
                        FEATURE_NOT_SUPPORTED,
                        "the fast-path function call protocol is not supported by pgquorum",
                        hint="Call the function with SELECT instead.",
                    ),
                    ready=True,
                )
            else:
                raise ProtocolViolation(f"invalid frontend message type {mtype}")

    def _router_error(self, err: PgError, *, ready: bool) -> None:
        self.write(m.encode_error(err))
        if ready:
            self.write(m.encode_ready(self.txn_status))

    async def _simple_query(self, payload: bytes) -> None:
        self._seq_locks = set()
        sql = m.parse_query(payload)
        a = self.router.analyzer.analyze(sql)
        route = await self._resolve(a)
        data = m.frame(m.QUERY, payload)
        if a.begin and self.txn_status == IDLE and not a.error:
            self._defer_begin(data, a.strict_isolation)
            return
        if self._unpinned_snapshot((a,)):
            await self._pin_snapshot()
        expect = [EXPECT_QUERY]
        if route is Route.WRITE and not self.txn_wrote and not self._may_write_now():
            await self._before_write()
        try:
            fixed = await self._fix_text(sql, a, route) if _may_need_fixing(a) else None
        except PgError as e:
            res = await self._refuse(e)
            self._reply(res)
            self._after_unit(res, Route.WRITE, False, False)
            return
        if fixed is not None:
            data = m.encode_query(fixed)
        self._note_unpreparable(a)
        if route is Route.WRITE:
            wrap = self._autocommit_in_two_phases(a)
            try:
                build = self._with_seq_locks(lambda c: (data, expect), wrap)
            except PgError as e:
                res = await self._refuse(e)
                self._reply(res)
                self._after_unit(res, Route.WRITE, False, False)
                return
            if a.commit and self._commits_in_two_phases():
                res = await self._commit_block()
            elif wrap:
                res = await self._autocommit(build, quiet=await self._quiet_needed((a,)))
            elif (self.txn_status == IDLE or a.txn_control) and not a.lock_free:
                # A one-phase commit, lead first: inside the commit barrier's slot (SET,
                # SAVEPOINT, ROLLBACK and the like commit nothing and need none).
                async with self.router.commits.commit_slot():
                    if self.router.recovery_sink is not None:
                        await self._reserve()
                    res = await self._write_unit(
                        build, single=a.statements == 1, lock_free=a.lock_free
                    )
            else:
                res = await self._write_unit(
                    build,
                    single=a.statements == 1,
                    lock_free=a.lock_free,
                    quiet=await self._quiet_needed((a,)),
                )
            if a.settings and not res.error:
                self._note_settings(a, sql)
            self._reply(res)
        else:
            conn = self._lead() if route is Route.LEAD else self._pick_read()
            res = await self._read_unit(conn, lambda c: (data, expect), retry=route is Route.READ)
        self._after_unit(res, route, a.strict_isolation, a.catalog_change)
        self._after_catalog_work(a)

    # -- determinism ------------------------------------------------------------------------

    async def _needs_fixing(self, a: Analysis, route: Route) -> bool:
        """Whether a statement may hold node-dependent values to fix: writes (they run on
        every node), and reads inside a transaction block, so that now() there agrees with
        the transaction's writes."""
        if not (a.time_values or a.calls or a.arbitrary) or a.error:
            return False
        if route is not Route.WRITE and self.txn_status == IDLE:
            return False
        catalog = self.router.catalog(self.database)
        unknown = catalog.unknown(a.calls)
        if unknown:  # check_and_rewrite asks the catalog about each call
            await self._lookup_functions(unknown)
        if a.time_values or a.calls & _FIXED_NAMES:
            return True
        return route is Route.WRITE and (a.arbitrary or catalog.is_volatile(a.calls))

    def _deterministic(self, sql: str) -> str | None:
        """``sql`` with the transaction's time fixed, or None if unchanged; PgError (0A000)
        for what cannot be made the same on every node."""
        now = datetime.now(UTC)
        if self.txn_time is None:
            self.txn_time = now
        catalog = self.router.catalog(self.database)
        return check_and_rewrite(
            sql,
            txn_time=self.txn_time,
            stmt_time=now,
            is_volatile=lambda name: catalog.volatility(name) not in ("i", "s"),
            deterministic=self.router.settings.deterministic_functions,
        )

    async def _fix_text(self, sql: str, a: Analysis, route: Route) -> str | None:
        """The text to send instead of ``sql`` (None: ``sql`` itself): sequence values and
        column defaults assigned, then the time fixed. PgError: the router refuses it."""
        text = None
        if (
            route is Route.WRITE
            and self.txn_status != FAILED_BLOCK
            and (a.inserts or a.copy_into or a.calls & seq.SEQUENCE_FUNCTIONS)
        ):
            text = await self._assign_sequences(sql, a)
            if text is not None:
                a = self.router.analyzer.analyze(text)
        if await self._needs_fixing(a, route):
            fixed = self._deterministic(text or sql)
            if fixed is not None:
                text = fixed
        return text

    async def _assign_sequences(self, sql: str, a: Analysis) -> str | None:
        """Fill the defaults an INSERT leaves to functions, and give nextval()/currval()/
        lastval() their values (see pgquorum.sql.sequences); None if nothing changed."""
        tables = self.router.tables(self.database)
        known = a.inserts | {a.copy_into} if a.copy_into else a.inserts
        filled = await tables.filled(self._fetch, known)
        if a.copy_into is not None and a.copy_into in filled:
            self._seq_locks |= await self._copy_locks(sql, tables)
        wanted = a.inserts & filled
        if not wanted and not a.calls & (seq.SEQUENCE_FUNCTIONS - seq.SETVAL):
            return None
        try:
            stmts = seq.parse(sql)
        except Exception:
            return None  # the nodes report the syntax error
        changed = False
        for stmt, name in seq.insert_targets(stmts):
            if stmt.relation.relname in wanted:
                columns = await tables.columns(self._fetch, name)
                filled_in, locks = seq.fill_defaults(stmt, columns)
                changed = changed or filled_in
                self._seq_locks |= locks
        calls = seq.sequence_calls(stmts)
        if calls:
            await self._give_values(calls)
            changed = True
        return seq.deparse(stmts) if changed else None

    async def _fetch(self, sql: str) -> list[list[str | None]] | None:
        """A catalog query of the router's own on the lead, between units (on the next lead
        if the lead is lost: it only reads)."""
        while True:
            lead = self._lead()  # (PgError when no node is left)
            try:
                return await fetch_rows(lead, sql)
            except NodeLost as e:
                self.router.cluster.mark_failed(lead.node.name, e.reason)

    async def _give_values(self, calls: list[seq.SequenceCall]) -> None:
        tables = self.router.tables(self.database)
        names: dict[str, str] = {}
        for call in calls:
            if call.sequence is not None and call.sequence not in names:
                names[call.sequence] = await tables.sequence(self._fetch, call.sequence)
        counts: dict[str, int] = {}
        for call in calls:
            if call.kind == "nextval":
                q = names[str(call.sequence)]
                counts[q] = counts.get(q, 0) + 1
        values = {
            q: iter(await self.router.sequences.take(self.database, q, n))
            for q, n in counts.items()
        }
        for call in calls:  # in evaluation order: currval sees the nextval before it
            if call.kind == "nextval":
                q = names[str(call.sequence)]
                value = next(values[q])
                self.seq_last[q] = value
                self.seq_lastval = value
            elif call.kind == "currval":
                got = self.seq_last.get(names[str(call.sequence)])
                if got is None:
                    raise PgError(
                        OBJECT_NOT_IN_PREREQUISITE_STATE,
                        f'currval of sequence "{call.sequence}" is not yet defined in this session',
                    )
                value = got
            else:
                if self.seq_lastval is None:
                    raise PgError(
                        OBJECT_NOT_IN_PREREQUISITE_STATE,
                        "lastval is not yet defined in this session",
                    )
                value = self.seq_lastval
            seq.replace_call(call, value)

    async def _copy_locks(self, sql: str, tables: TableCatalog) -> set[str]:
        locks: set[str] = set()
        for relname, name, given in seq.copy_targets(seq.parse(sql)):
            locks |= seq.copy_locks(relname, await tables.columns(self._fetch, name), given)
        return locks

    def _with_seq_locks(self, build: BuildUnit, a_wrapped: bool) -> BuildUnit:
        """Prefix the unit with the sequence locks its statements need (see
        sql.sequences.fill_defaults): held to the end of the transaction, so the statement
        must run inside one, the client's or the router's own."""
        locks, self._seq_locks = self._seq_locks, set()
        if not locks:
            return build
        if self.txn_status == IDLE and not a_wrapped and len(self._online_conns()) > 1:
            raise PgError(
                FEATURE_NOT_SUPPORTED,
                "pgquorum cannot number these rows on every node alike outside a transaction "
                "in this session",
                hint="Run the statement inside BEGIN ... COMMIT.",
            )
        prefix = m.encode_query("; ".join(lock_sql(q) for q in sorted(locks)))

        def locked(conn: NodeConnection) -> tuple[bytes, list[Expectation]]:
            data, expect = build(conn)
            return prefix + data, [EXPECT_QUERY_SWALLOWED, *expect]

        return locked

    def _after_catalog_work(self, a: Analysis) -> None:
        if a.ddl:
            self.router.tables(self.database).clear()
        if a.calls & seq.SETVAL or a.ddl:
            # setval or DDL moved a sequence: reserve afresh from where it is now.
            self.router.sequences.forget(self.database)

    async def _fix_statement(self, stmt: Statement, route: Route) -> Statement:
        """The prepared statement its next execution must run: a rewrite with this
        transaction's time and sequence values, as a new version (each node is sent the new
        Parse). A new object: units kept in the journal still build the old one."""
        text = await self._fix_text(stmt.parse.query, stmt.analysis, route) or stmt.parse.query
        if text == stmt.sent_text:
            return stmt
        p = stmt.parse
        fixed = Statement(
            p, m.encode_parse(p.name, text, p.param_types), stmt.analysis, next(self._versions)
        )
        fixed.sent_text = text
        return fixed

    async def _refuse(self, err: PgError) -> UnitResult:
        """Report a statement the router will not run. Inside a transaction block the nodes'
        transaction is made to fail with the same error, as PostgreSQL's would."""
        res = UnitResult()
        res.error = err.sqlstate
        if self.txn_status == IDLE:
            res.status = IDLE
            res.chunks = [m.encode_error(err), m.encode_ready(IDLE)]
            return res
        fail = m.encode_query(_raise_sql(err))
        return await self._write_unit(lambda c: (fail, [EXPECT_QUERY]), single=True, lock_free=True)

    def _defer_begin(self, data: bytes, strict: bool) -> None:
        """Answer a plain BEGIN at once and send it to each node with that node's first work
        in the transaction: one round trip to every node saved per transaction, and a node the
        transaction never uses never hears of it."""
        for c in self._online_conns():
            c.pending_begin = data
        self._begin_data = data
        self.journal.begin(data)
        self.units += 1
        self.txn_status = ord("T")
        self.txn_strict = strict
        self.txn_time = datetime.now(UTC)
        self.write(m.encode_command_complete("BEGIN") + m.encode_ready(self.txn_status))

    def _unpinned_snapshot(self, analyses: Iterable[Analysis]) -> bool:
        """The first statement of a REPEATABLE READ or SERIALIZABLE transaction that takes a
        snapshot (see _pin_snapshot)."""
        return (
            self.txn_status == IN_BLOCK
            and (self.txn_strict or self.session_strict)
            and not self._snapshot_pinned
            and any(not (a.lock_free or a.txn_control) for a in analyses)
        )

    async def _pin_snapshot(self) -> None:
        """Take the transaction's snapshot on every node at once, while no commit of this
        router is under way (a quiet hold), so that each node's snapshot holds the same
        committed transactions. Taken lazily, node by node, a snapshot could come a commit
        later on one node than on another; the transaction would then read other rows there
        (and write what it computed from them), or meet another conflict."""
        conns = self._online_conns()
        self._snapshot_pinned = True
        async with self.router.commits.quiet(QUIET_LONGEST_S, self.database) as hold:
            if not hold.kept:  # commits in flight wait for a lock (maybe this session's)
                log.warning("session %d: snapshot taken while commits were under way", self.id)
            results = await self._run_on(conns, _TAKE_SNAPSHOT)
        voters = [(c, r) for c, r in zip(conns, results, strict=True) if r is not None]
        if voters:
            self._vote(voters)  # (a node that answered otherwise is failed)

    def _after_unit(
        self, res: UnitResult | None, route: Route, strict: bool, catalog_change: bool
    ) -> None:
        self.units += 1
        if route is not Route.READ or self._reserved is not None:
            self._journal_after(res)
        if route is not Route.READ:
            # Only writes (SET) change settings; reads cannot turn this one off.
            lead = next(iter(self.conns.values()), None)
            if lead is not None:
                self.lenient_strings = lead.params.get("standard_conforming_strings") == "off"
        if catalog_change:
            self.router.catalog(self.database).clear()
        if res is None or not res.status:
            return
        status = res.status
        if strict:
            if status == IDLE:
                self.session_strict = True
            else:
                self.txn_strict = True
        if route is not Route.READ:
            # After a write, or lead-only work such as DECLARE CURSOR, the transaction's
            # reads must see it: they go to the lead.
            self.txn_wrote = True
        self.txn_status = status
        if status == IDLE:
            if self._txn_settings:
                if not res.error and res.tags[-1:] != ["ROLLBACK"]:  # they hold
                    self._keep_settings()
                self._txn_settings = []
            if self._savepoints:
                self._savepoints = []
            self.txn_count += 1
            self._begin_data = None
            self.txn_time = None
            self.txn_wrote = False
            self.txn_one_phase = False
            self.txn_strict = False
            self._snapshot_pinned = False
            self.txn_node = None
            self.portals.clear()

    def _note_settings(self, a: Analysis, sql: str, params: list[str | None] | None = None) -> None:
        """The session SETs and RESETs of a statement that ran: a node the session connects
        to later (or a replay of the session on a recovering node) gets them first, once
        the transaction that made them commits. A rollback to a savepoint undoes those
        made since. ``params``: the values bound to an extended-protocol statement."""
        pending = self._txn_settings
        marks = self._savepoints  # each with how many of the pending came before it
        for kind, name, start, end, kept in a.settings:
            if kind == "set" or kind == "reset":
                text = kept or _with_values(sql[start:end], params)
                if text is None:
                    log.warning(
                        "session %s: setting %s is not kept for nodes connected later: its "
                        "value was bound in binary format",
                        self.id,
                        name,
                    )
                    continue
                pending.append((kind == "reset", name, m.encode_query(text)))
            elif kind == "savepoint":
                marks.append((name, len(pending)))
            else:
                for i in range(len(marks) - 1, -1, -1):
                    if marks[i][0] == name:
                        if kind == "rollback to":  # the savepoint stays
                            del pending[marks[i][1] :]
                            del marks[i + 1 :]
                        else:  # release: it and those after it are gone
                            del marks[i:]
                        break

    def _keep_settings(self) -> None:
        settings = self.settings
        for reset, name, data in self._txn_settings:
            if not name:  # RESET ALL
                settings.clear()
            elif reset:
                settings.pop(name, None)
            else:
                settings.pop(name, None)  # the latest last, in the order they were made
                settings[name] = data

    async def _read_unit(
        self, conn: NodeConnection, build: BuildUnit, *, retry: bool
    ) -> UnitResult:
        """Run a unit on one node, relaying its answer. With ``retry``, a read whose node is
        lost before any of the answer reached the client runs again on another node."""
        cluster = self.router.cluster
        while True:
            data, expect = build(conn)
            st = cluster.status[conn.node.name]
            st.outstanding += 1
            st.statements += 1
            try:
                conn.send_unit(data, expect, relay=True)
                res = await conn.wait()
                break
            except NodeLost as e:
                cluster.mark_failed(conn.node.name, e.reason)
                if not (retry and not conn.relayed):
                    raise _served_node_lost(conn, e.reason) from None
                # Nothing reached the client yet: run it on another node (inside a transaction
                # block, one the transaction's writes reached).
                conn = self._pick_read()
            finally:
                st.outstanding -= 1
        if res.error and self.txn_status != IDLE and res.status != IDLE:
            # A read failed inside a transaction block on one node: run it on the others too,
            # so every node's transaction is aborted the same way.
            await self._replay_elsewhere(conn, build)
            self.journal.record(build, res)
        return res

    async def _replay_elsewhere(self, conn: NodeConnection, build: BuildUnit) -> None:
        started = []
        for c in self._online_conns():
            if c is conn:
                continue
            # Built per node: an extended batch carries the Parse/Close that node still needs.
            try:
                c.send_unit(*build(c), relay=False)
            except NodeLost as e:
                self.router.cluster.mark_failed(c.node.name, e.reason)
                continue
            started.append(c)
        results = await asyncio.gather(*(c.wait() for c in started), return_exceptions=True)
        for c, r in zip(started, results, strict=True):
            if isinstance(r, NodeLost):
                self.router.cluster.mark_failed(c.node.name, r.reason)

    async def _quiet_needed(self, analyses: Iterable[Analysis]) -> bool:
        """Whether a write's effect depends on its snapshot beyond the rows it locks: it reads
        other rows (Analysis.reads_others), or it is an UPDATE or DELETE whose WHERE does not
        pin a unique key (a row another transaction commits meanwhile may match it on some
        nodes only). See _write_unit."""
        tables = None
        for a in analyses:
            if a.reads_others:
                return True
            for table, columns in a.filters:
                if tables is None:
                    tables = self.router.tables(self.database)
                keys = await tables.unique_keys(self._fetch, table)
                if not any(key <= columns for key in keys):
                    return True
        return False

    async def _write_unit(
        self,
        build: BuildUnit,
        *,
        single: bool,
        lock_free: bool = False,
        wrapped: bool = False,
        quiet: bool = False,
    ) -> UnitResult:
        """_run_write, and the unit kept in the transaction's journal. ``quiet``: its effect
        depends on its snapshot (_quiet_needed), and it runs outside a commit slot."""
        self._cancel_build = None
        if quiet and not self._snapshot_pinned and len(self._online_conns()) > 1:
            # Its snapshot on the lead and on the others must hold the same commits: none
            # of this router's or its peers' may land in between.
            async with self.router.commits.quiet(QUIET_LONGEST_S, self.database) as self._hold:
                try:
                    res = await self._run_write(
                        build, single=single, lock_free=lock_free, wrapped=wrapped
                    )
                finally:
                    self._hold = None
        else:
            res = await self._run_write(build, single=single, lock_free=lock_free, wrapped=wrapped)
        copy, missing = b"", ""
        if self._copy_seen:
            self._copy_seen = False
            if self._copy_data is None:
                missing = "its COPY FROM STDIN began before the recovery (no data kept)"
            else:
                copy, self._copy_data = self._copy_data, None
        self.journal.record(self._cancel_build or build, res, copy, missing)
        return res

    async def _run_write(
        self, build: BuildUnit, *, single: bool, lock_free: bool = False, wrapped: bool = False
    ) -> UnitResult:
        """Run a unit on the lead, then on every other ONLINE node; return the majority's
        answer (see _vote) for the caller to send.

        ``build(conn)`` returns the bytes and expectations for one node (they differ only when
        a node needs a prepared statement it has not seen yet). ``wrapped``: the unit runs in
        a transaction the router opened for it (see _autocommit).
        """
        cluster = self.router.cluster
        while True:
            conns = self._online_conns()
            lead = conns[0]
            data, expect = build(lead)
            st = cluster.status[lead.node.name]
            if not lock_free and self.router.followers.others(lead.node.name):
                await self.router.followers.settle(lead.node.name)
            st.outstanding += 1
            st.statements += 1
            try:
                lead.send_unit(data, expect, relay=False)
                if lock_free:
                    # Nothing to order by the lead's locks: start the others at once.
                    break
                began = time.monotonic()
                lead_res = await lead.wait()
                lead_took = time.monotonic() - began
                break
            except NodeLost as e:
                # The lead died before answering. The statement never reached the others
                # (they run it only after the lead), and every statement before it ran on
                # them too, so the next lead runs it from scratch, inside a transaction as
                # well: the client notices nothing.
                cluster.mark_failed(lead.node.name, e.reason)
                log.warning("lead %s lost; re-running the statement on the next", lead.node.name)
            finally:
                st.outstanding -= 1
        others = conns[1:]
        if lock_free:
            started = self._start_others(others, build)
            st.outstanding += 1
            try:
                lead_res = await lead.wait()
            except NodeLost as e:
                cluster.mark_failed(lead.node.name, e.reason)
                results = await self._gather(started)
                voters = [(c, r) for c, r in zip(started, results, strict=True) if r is not None]
                if not voters:
                    raise _served_node_lost(lead, e.reason) from None
                return self._vote(voters)
            finally:
                st.outstanding -= 1
            return await self._finish_write(lead, lead_res, started, await self._gather(started))
        if lead_res.error and ((lead_res.status == IDLE and single) or wrapped):
            # Work outside a transaction block that failed on the lead changed nothing there,
            # so it must change nothing elsewhere either (it may have failed for a reason of
            # the lead's own, such as a cancel or a lock timeout).
            others = []
        elif lead_res.error == QUERY_CANCELED and self.cancel_requested:
            # The client cancelled: abort the others' transaction the same way.
            cancel_self = m.encode_query("SELECT pg_cancel_backend(pg_backend_pid())")
            build = lambda c: (cancel_self, [EXPECT_QUERY])  # noqa: E731
            self._cancel_build = build
        followers = self.router.followers
        followers.begin(lead.node.name)
        if self._hold is not None:
            self._hold.reach_others()
        try:
            started = self._start_others(others, build)
            results = await self._gather(started, lead_took, after_lead=True)
            if lead_res.copy_in:
                lead_res, results = await self._copy_in(lead, lead_res, started, results)
        finally:
            followers.end(lead.node.name)
        return await self._finish_write(lead, lead_res, started, results)

    def _start_others(self, others: list[NodeConnection], build: BuildUnit) -> list[NodeConnection]:
        """Send the unit to these nodes at once; those that cannot take it are failed."""
        cluster = self.router.cluster
        started = []
        for c in others:
            d, ex = build(c)
            try:
                c.send_unit(d, ex, relay=False)
            except NodeLost as e:
                cluster.mark_failed(c.node.name, e.reason)
                continue
            st = cluster.status[c.node.name]
            st.outstanding += 1
            st.statements += 1
            started.append(c)
        return started

    async def _finish_write(
        self,
        lead: NodeConnection,
        lead_res: UnitResult,
        others: list[NodeConnection],
        results: list[UnitResult | None],
    ) -> UnitResult:
        voters = [(lead, lead_res)]
        voters += [(c, r) for c, r in zip(others, results, strict=True) if r is not None]
        conflict = _conflict(voters)
        if conflict is None and self._hold is not None and not self._hold.kept:
            conflict = _skewed(voters, self._hold.early)
        if self._cross_cancelled:
            cancelled, self._cross_cancelled = self._cross_cancelled, set()
            if conflict is not None and any(c in cancelled for c, r in voters if r.error):
                conflict = _synthesized(DEADLOCK_DETECTED)  # (not the cancel we sent)
        if conflict is None:
            return self._vote(voters)
        # Some node failed the statement for its own timing (a conflict with a concurrent
        # transaction, a lock or statement timeout) where the others did not. Outvoting it
        # would fail a healthy node, and for a conflict let the transaction past the
        # isolation PostgreSQL keeps: the transaction fails instead, on every node alike (it
        # is still open everywhere), for the client to retry, as on one server.
        passed = [c for c, r in voters if not r.error]
        log.info(
            "session %d: SQLSTATE %s on some nodes: the transaction fails on %s too",
            self.id,
            conflict.error,
            ", ".join(c.node.name for c in passed),
        )
        failed = None
        for c, r in zip(passed, await self._run_on(passed, _raise(conflict)), strict=True):
            if r is not None and (r.error != conflict.error or r.status != FAILED_BLOCK):
                self.router.cluster.mark_failed(
                    c.node.name, f"could not fail its transaction like the others: {r.outcome()}"
                )
            elif failed is None:
                failed = r
        if not conflict.chunks:  # (_skewed: no node's reply to pass on)
            if failed is None:
                raise _served_node_lost(lead, "no node could report the failure")
            return failed
        return conflict

    def _reply(self, res: UnitResult) -> None:
        if res.chunks:
            assert self.transport is not None
            if not self.transport.is_closing():
                self.transport.writelines(res.chunks)

    async def _gather(
        self, conns: list[NodeConnection], lead_took: float = 0.0, *, after_lead: bool = False
    ) -> list[UnitResult | None]:
        """Wait for each node's answer; a node that breaks, or that has not answered
        ``node_timeout_s`` (plus ``lead_took``, what the same work took the lead) from now,
        is failed and gives None. ``after_lead``: the nodes run what the lead ran; one that
        waits for a lock CROSS_WAIT_S longer than the lead took is cancelled (see
        look_for_cross_waits)."""
        out: list[UnitResult | None] = []
        cluster = self.router.cluster
        limit = self.router.settings.node_timeout_s
        loop = asyncio.get_running_loop()
        if after_lead and conns:  # (looked at by the router's tick: look_for_cross_waits)
            self._after_lead = (conns, time.monotonic() + lead_took + CROSS_WAIT_S)
        timer = None
        if limit and conns:
            waited = limit + lead_took

            def expire() -> None:  # one timer for all: cheaper than a wait_for per node
                for c in conns:
                    if c.busy:
                        c.give_up(f"no answer {waited:.1f}s after the others")

            timer = loop.call_later(waited, expire)
        try:
            for c in conns:
                try:
                    out.append(await c.wait())
                except NodeLost as e:
                    cluster.mark_failed(c.node.name, e.reason)
                    out.append(None)
                finally:
                    cluster.status[c.node.name].outstanding -= 1
        finally:
            if timer is not None:
                timer.cancel()
            self._after_lead = None
            if self._cross_probe is not None:
                self._cross_probe.cancel()
                self._cross_probe = None
        return out

    def look_for_cross_waits(self, now: float) -> None:
        """(The router's tick, every KEEPALIVE_S.) The nodes after the lead still run the
        lead's statement CROSS_WAIT_S longer than it took the lead: look whether they wait
        for a lock (_break_cross_waits), one look at a time. A tick, not a timer per
        statement: the write path stays free of timers for what rarely happens."""
        after_lead = self._after_lead
        if after_lead is None or now < after_lead[1]:
            return
        if self._cross_probe is not None and not self._cross_probe.done():
            return
        busy = [c for c in after_lead[0] if c.busy]
        if busy:
            self._cross_probe = asyncio.get_running_loop().create_task(
                self._break_cross_waits(busy)
            )

    async def _break_cross_waits(self, conns: list[NodeConnection]) -> None:
        """These nodes still run a statement the lead finished, waiting for a lock there:
        two statements that did not meet on the lead (their snapshots or their order differ
        on the others) took locks in opposite orders on two nodes, a deadlock no PostgreSQL
        sees. Cancelled there, the statement fails with 57014, and the transaction fails on
        every node for the client to retry (TIMING_FAILURES), failing no node."""
        user, password = self.router.internal_credentials()
        params = {"user": user, "database": "postgres", "application_name": "pgquorum"}
        for c in conns:
            sql = f"SELECT wait_event_type FROM pg_catalog.pg_stat_activity WHERE pid = {c.pid}"
            try:
                _, rows = await query(c.node, params, password, sql)
                if rows and rows[0][0] == "Lock" and c.busy:
                    log.warning(
                        "session %d: node %s waits for a lock its lead did not wait for: "
                        "cancelling the statement there (a deadlock across nodes)",
                        self.id,
                        c.node.name,
                    )
                    self._cross_cancelled.add(c)
                    await send_cancel(c.node, c.pid, c.secret)
            except (NodeLost, PgError, OSError, TimeoutError) as e:
                log.info("session %d: cannot look at node %s: %s", self.id, c.node.name, e)

    async def _copy_in(
        self,
        lead: NodeConnection,
        lead_res: UnitResult,
        others: list[NodeConnection],
        results: list[UnitResult | None],
    ) -> tuple[UnitResult, list[UnitResult | None]]:
        """Stream the client's COPY data to every node that is waiting for it."""
        receivers = [lead] + [
            c for c, r in zip(others, results, strict=True) if r is not None and r.copy_in
        ]
        assert self.transport is not None
        # The client sees the lead's CopyInResponse; the rest of its reply comes at the end.
        self.transport.writelines(lead_res.chunks)
        lead_res.chunks = []
        # A recovering node replays the COPY with its data (only what streams while it
        # recovers can be kept: see Journal).
        sink = self.router.recovery_sink
        capture: list[bytes] | None = [] if sink is not None else None
        room = self.journal.room  # what the transaction may still keep (journal.py)
        while True:
            run = self.framer.take_run(m.COPY_DATA)
            if run:
                if capture is not None:
                    capture.append(run)
                    room -= len(run)
                    if room < 0:
                        # Memory is worth more than this recovery: it fails now (safely),
                        # rather than the router holding a bulk load for its replay.
                        assert sink is not None
                        capture = None
                        self.router.queue_lost(
                            sink,
                            QueueUnavailable(
                                "a COPY FROM STDIN sent more than a transaction keeps "
                                f"({recovery_journal.MAX_KEPT_BYTES / 2**20:g} MiB) while the node "
                                "recovered; recover it again after the load"
                            ),
                        )
                await self._copy_to(receivers, run)
                continue
            mtype, payload = await self.next_message()
            if mtype in (m.SYNC, m.FLUSH):
                continue  # ignored during COPY, as PostgreSQL does
            if mtype not in (m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL):
                raise ProtocolViolation(
                    f"unexpected message type {chr(mtype)!r} during COPY from stdin"
                )
            await self._copy_to(receivers, m.frame(mtype, payload))
            if capture is not None:
                capture.append(m.frame(mtype, payload))
            if mtype != m.COPY_DATA:
                break
        self._copy_seen = True
        self._copy_data = None if capture is None else b"".join(capture)
        for c in receivers:
            c.resume_copy()
        status = self.router.cluster.status
        for c in others:
            status[c.node.name].outstanding += 1
        lead_final = await lead.wait()
        rest = await self._gather(others)
        return lead_final, rest

    async def _copy_to(self, receivers: list[NodeConnection], data: bytes) -> None:
        for c in receivers:
            if c.lost is None:
                c.send_more(data)
        for c in receivers:
            if c.lost is None:
                await c.writable()

    def _vote(self, voters: list[tuple[NodeConnection, UnitResult]]) -> UnitResult:
        """The outcome (command tags with row counts, or the error's SQLSTATE) that most
        nodes gave wins; on a tie the lead's side (voters[0]) wins. Nodes on another side
        are failed at once: they no longer hold what the majority holds."""
        if len(voters) == 1:
            return voters[0][1]
        sides: dict[tuple[object, ...], list[int]] = {}
        for i, (_, r) in enumerate(voters):
            sides.setdefault(r.outcome(), []).append(i)
        if len(sides) == 1:
            return voters[0][1]
        # max() keeps the first of equals, and the lead's outcome was inserted first.
        best = max(sides.values(), key=len)
        winner = voters[best[0]][1]
        want = _describe(winner.outcome())
        cluster = self.router.cluster
        for i, (c, r) in enumerate(voters):
            if i in best:
                continue
            got = _describe(r.outcome())
            cluster.status[c.node.name].divergences += 1
            log.error(
                "DIVERGENCE: node %s answered %s where %d of %d nodes answered %s",
                c.node.name,
                got,
                len(best),
                len(voters),
                want,
            )
            cluster.mark_failed(
                c.node.name,
                f"outvoted: answered {got} where {len(best)} of {len(voters)} nodes "
                f"answered {want}",
            )
        return winner

    # -- recovery (see pgquorum.recovery) ---------------------------------------------------

    def _may_write_now(self) -> bool:
        """Before a write that is not part of a transaction that wrote: True (and the
        session marked writing) if nothing is in the way, else _before_write must run.
        The common case costs no coroutine on the per-statement path."""
        if self.router.write_gate.held or self._nodes_changed():
            return False
        self.writing = True
        return True

    async def _before_write(self) -> None:
        """Wait while a recovered node joins the group (WriteGate), then connect to nodes
        that came ONLINE."""
        gate = self.router.write_gate
        if gate.held:
            await gate.wait_open()
        self.writing = True
        if self._adopted_generation != self.router.cluster.generation:
            await self._adopt_nodes()

    def _drop_lost(self) -> bool:
        """Let go of the connections to nodes no longer ONLINE, or lost: a node that ended
        one for its idle_session_timeout is well (the session connects to it again,
        _adopt_nodes); any other loss fails the node. Whether any was let go."""
        cluster = self.router.cluster
        dropped = False
        for name, c in list(self.conns.items()):
            if c.lost is None and cluster.is_online(name):
                continue
            del self.conns[name]
            dropped = True
            if self.read_home is c:
                self.read_home = None
            if c.lost is not None and c.lost.idle_timeout != IDLE_SESSION_TIMEOUT:
                cluster.mark_failed(name, c.lost.reason)
            c.close()
        return dropped

    async def _adopt_nodes(self) -> None:
        """Connect to ONLINE nodes this session has no connection to (a recovered node, or one
        that closed an idle connection: see _idle_timeout)."""
        cluster = self.router.cluster
        self._adopted_generation = cluster.generation
        self._drop_lost()
        missing = [st.node for st in cluster.online() if st.node.name not in self.conns]
        if not missing:
            return
        params, password = self._backend_params()
        for node in missing:
            try:
                conn = await NodeConnection.open(node, params, password, self.write)
                for sql in self.settings.values():
                    conn.send_unit(sql, [EXPECT_QUERY], relay=False)
                    await conn.wait()
            except PgError as e:
                if e.sqlstate == TOO_MANY_CONNECTIONS:
                    # The node is well, only full; this session cannot write without it.
                    raise PgError(
                        e.sqlstate, f"node {node.name}: {e.message}", severity="FATAL"
                    ) from None
                cluster.mark_failed(node.name, f"cannot connect to it again: {e}")
                continue
            except (NodeLost, OSError) as e:
                cluster.mark_failed(node.name, f"cannot connect to it again: {e}")
                continue
            if self.txn_status != IDLE:  # a transaction that has only read so far
                conn.pending_begin = self._begin_data or _BEGIN
            conn.on_idle_timeout = self._idle_timeout
            self.conns[node.name] = conn
        order = [n.name for n in cluster.group.nodes]
        self.conns = {name: self.conns[name] for name in order if name in self.conns}
        for i, c in enumerate(self.conns.values()):
            c.set_forward_async(i == 0)
        self._online_generation = -1

    async def _reserve(self) -> None:
        """Inside a commit slot, before a one-phase commit: its place in the recovery queue
        (called only while there is one)."""
        sink = self.router.recovery_sink
        assert sink is not None
        try:
            self._reserved = (sink, await sink.reserve())
        except QueueUnavailable as e:
            self.router.queue_lost(sink, e)

    async def _queue_commit(self, gid: str) -> None:
        """A two-phase commit that was decided: its transaction goes to the recovery queue
        before any node commits it (with its id: a resolver that commits it later, after a
        crash, can learn that the queue has it)."""
        sink = self.router.recovery_sink
        assert sink is not None
        try:
            await sink.append(self._entry(sink, commit=True, gid=gid))
        except QueueUnavailable as e:
            self.router.queue_lost(sink, e)

    def _journal_after(self, res: UnitResult | None) -> None:
        reserved, self._reserved = self._reserved, None
        if res is None or res.status != IDLE:
            if reserved is not None:  # the unit did not end a transaction
                self._settle(*reserved, None)
            return
        journal = self.journal
        sink = self.router.recovery_sink
        if sink is None or (reserved is not None and reserved[0] is not sink):
            if reserved is not None:
                self._settle(*reserved, None)
            journal.drop()
            return
        if journal.empty:
            if reserved is not None:
                self._settle(sink, reserved[1], None)
            return
        entry = self._entry(sink, commit=False)
        if reserved is not None:
            self._settle(sink, reserved[1], entry)
            return
        try:  # a transaction that rolled back: its place in the order does not matter
            sink.post(entry)
        except QueueUnavailable as e:
            self.router.queue_lost(sink, e)

    def _settle(self, sink: Sink, serial: int, entry: Entry | None) -> None:
        """Fill a reserved place. The commit is done whatever happens here: a queue that
        cannot take it ends that recovery (queue_lost), never the client's session."""
        try:
            sink.settle(serial, entry)
        except QueueUnavailable as e:
            self.router.queue_lost(sink, e)

    def _entry(self, sink: Sink, *, commit: bool, gid: str = "") -> Entry:
        """The transaction as an entry of this recovery's queue, with the settings a fresh
        connection needs."""
        self.journal.join(sink.rid)
        units = self.journal.take(commit=commit)
        missing = next((u.missing for u in units if u.missing), "")
        if missing:
            # The replay would stop at it: the recovery fails now, not when it gets there
            # (maybe only in its final pause).
            self.router.queue_lost(
                sink,
                QueueUnavailable(
                    f"a transaction of session {self.id} cannot be replayed: {missing}"
                ),
            )
        # The settings as the transaction began (its own SETs are kept once it ends, after
        # this): a new replay connection for it starts with them, the session's first in
        # the recovery, or any after a coordinator restarted (recovery/resume.py).
        prelude = list(self.settings.values())
        session = f"{self.router.settings.name}/{self.id}"
        return Entry(session, dict(self.params), units, prelude, gid=gid)

    def _leave_queue(self) -> None:
        reserved, self._reserved = self._reserved, None
        sink = self.router.recovery_sink
        if reserved is not None:
            self._settle(*reserved, None)
        if sink is not None and self.journal.queued == sink.rid:
            with contextlib.suppress(QueueUnavailable):
                sink.end_session(f"{self.router.settings.name}/{self.id}", dict(self.params))

    # -- two-phase commit -------------------------------------------------------------------

    def _note_unpreparable(self, a: Analysis) -> None:
        if a.temp:
            self.temp_objects = True
        if a.notify and self.txn_status != IDLE:
            self.txn_one_phase = True

    def _two_phase_possible(self) -> bool:
        return not self.temp_objects and len(self._online_conns()) > 1

    def _commits_in_two_phases(self) -> bool:
        """A COMMIT of a transaction block that wrote: vote on it in two phases."""
        return (
            self.txn_status == IN_BLOCK
            and self.txn_wrote
            and not self.txn_one_phase
            and self._two_phase_possible()
        )

    def _autocommit_in_two_phases(self, a: Analysis) -> bool:
        """A write outside a transaction block that can run inside one: the router wraps
        it in a transaction of its own and commits that in two phases."""
        return (
            self.txn_status == IDLE
            and not (a.lock_free or a.txn_control or a.no_block or a.temp or a.notify)
            and (a.route is not Route.READ or bool(a.functions))
            and self._two_phase_possible()
        )

    async def _autocommit(self, build: BuildUnit, *, quiet: bool = False) -> UnitResult:
        conns = self._online_conns()
        for c in conns:
            c.pending_begin = _BEGIN
        self.journal.begin(_BEGIN)
        try:
            res = await self._write_unit(build, single=True, wrapped=True, quiet=quiet)
            # The nodes that ran it (a node the lead's failure spared still holds BEGIN).
            participants = [c for c in self._online_conns() if c.pending_begin is None]
        finally:
            for c in conns:
                c.pending_begin = None
        if res.error or res.status != IN_BLOCK:
            await self._run_on(participants, _ROLLBACK)
        else:
            failure = await self._two_phase_commit(participants)
            if failure is not None:
                res = failure
        res.status = IDLE
        _set_ready(res.chunks, IDLE)
        return res

    async def _commit_block(self) -> UnitResult:
        """COMMIT of a transaction block that wrote, by two-phase commit."""
        conns = self._online_conns()
        participants = [c for c in conns if c.pending_begin is None]
        for c in conns:
            c.pending_begin = None
        failure = await self._two_phase_commit(participants) if participants else None
        if failure is not None:
            failure.status = IDLE
            _set_ready(failure.chunks, IDLE)
            return failure
        res = UnitResult()
        res.status = IDLE
        res.tags.append("COMMIT")
        res.chunks = [m.encode_command_complete("COMMIT"), m.encode_ready(IDLE)]
        return res

    async def _run_on(
        self,
        conns: list[NodeConnection],
        query: bytes,
        expect: list[Expectation] | None = None,
        lead_first: bytes | None = None,
    ) -> list[UnitResult | None]:
        """Run a query of the router's own on these nodes at once; a result per node, None
        where the node was lost (and failed). ``lead_first``: a simple query that the lead
        (the first of ``conns``) runs before it."""
        expected = expect or [EXPECT_QUERY]
        if lead_first is None:
            started = self._start_others(conns, lambda c: (query, expected))
        else:  # (the lead gets the router's own query first, its answer swallowed)
            lead, first = conns[0], lead_first + query
            led = [EXPECT_QUERY_SWALLOWED, *expected]
            started = self._start_others(
                conns, lambda c: (first, led) if c is lead else (query, expected)
            )
        done = dict(zip(started, await self._gather(started), strict=True))
        return [done.get(c) for c in conns]

    async def _two_phase_commit(self, conns: list[NodeConnection]) -> UnitResult | None:
        """Commit the session's transaction on ``conns`` (in group order, lead first) in two
        phases, decided by a majority vote. Returns None when it committed, else the
        majority's error (every node's transaction is then rolled back)."""
        commits = self.router.commits
        cluster = self.router.cluster
        gid = commits.new_gid()
        literal = quote_literal(gid)
        commits.in_flight.add(gid)
        try:
            prepared = await self._run_on(
                conns,
                m.encode_query(f"PREPARE TRANSACTION {literal}"),
                # With peers, the commit keeps their quiet holds waiting (quiet.py).
                lead_first=quiet.SHARE if commits.share_quiet_lock else None,
            )
            voters = [(c, r) for c, r in zip(conns, prepared, strict=True) if r is not None]
            if not voters:
                raise PgError(
                    CONNECTION_FAILURE,
                    "every node of the transaction was lost while it committed",
                    severity="FATAL",
                )
            ok = [c for c, r in voters if not r.error]
            failed = [(c, r) for c, r in voters if r.error]
            failpoints.hit(failpoints.AFTER_PREPARE)
            conflict = next((r for _, r in failed if r.error in TIMING_FAILURES), None)
            if conflict is not None:
                # E.g. a serialization failure at commit (SERIALIZABLE): the transaction's
                # failure, not the node's (see _finish_write). Nothing commits.
                undo = m.encode_query(f"ROLLBACK PREPARED {literal}")
                self._check_finish(ok, await self._run_on(ok, undo), "ROLLBACK")
                return conflict
            if len(ok) >= len(failed):
                # More successes, or a tie (failures are rarer than successes): commit.
                for c, r in failed:
                    cluster.mark_failed(
                        c.node.name,
                        f"PREPARE TRANSACTION failed with SQLSTATE {r.error} where "
                        f"{len(ok)} of {len(voters)} nodes prepared",
                    )
                async with commits.commit_slot():
                    return await self._phase_two(gid, ok)
            # More failures: nothing commits. The nodes that prepared disagree with the
            # majority; their transaction is rolled back before they are failed.
            undo = m.encode_query(f"ROLLBACK PREPARED {literal}")
            self._check_finish(ok, await self._run_on(ok, undo), "ROLLBACK")
            for c in ok:
                cluster.mark_failed(
                    c.node.name,
                    f"prepared a transaction that {len(failed)} of {len(voters)} nodes "
                    "failed to prepare",
                )
            # Every failed node rolled back, whatever its error: the most common one is told.
            errors: dict[str | None, list[UnitResult]] = {}
            for _, r in failed:
                errors.setdefault(r.error, []).append(r)
            return max(errors.values(), key=len)[0]
        finally:
            commits.in_flight.discard(gid)

    async def _refuse_batch(self, batch: list[tuple[int, bytes, object]], err: PgError) -> None:
        """An extended batch with a statement the router will not run: nothing of it runs
        (a Parse of it reaches the nodes with a later batch), the client gets the error and,
        at the Sync, the transaction status."""
        res = await self._refuse(err)
        if batch[-1][0] == m.SYNC:
            self._reply(res)
        else:
            self.write(m.encode_error(err))
            self._skip_to_sync = True
        self._after_unit(res, Route.WRITE, False, False)

    async def _phase_two(self, gid: str, ok: list[NodeConnection]) -> UnitResult | None:
        """Record the decision, then COMMIT PREPARED: the others first, the lead last."""
        commits = self.router.commits
        literal = quote_literal(gid)
        try:
            await commits.log.record(gid)
        except Exception as e:  # no durable decision: presumed abort, said aloud
            log.error("cannot record the commit decision for %s: %s", gid, e)
            undo = m.encode_query(f"ROLLBACK PREPARED {literal}")
            self._check_finish(ok, await self._run_on(ok, undo), "ROLLBACK")
            res = UnitResult()
            res.error = IO_ERROR
            res.chunks = [
                m.encode_error(
                    PgError(
                        IO_ERROR,
                        f"the transaction was rolled back: pgquorum cannot record "
                        f"its commit decision ({e})",
                    )
                )
            ]
            return res
        failpoints.hit(failpoints.AFTER_DECISION)
        if self.router.recovery_sink is None:
            self.journal.drop()
        else:
            await self._queue_commit(gid)
            failpoints.hit(failpoints.AFTER_QUEUED)
        # One statement per node: COMMIT PREPARED always waits for its WAL flush (PostgreSQL
        # ignores synchronous_commit for it), so there is no setting worth changing around it.
        finish = m.encode_query(f"COMMIT PREPARED {literal}")
        # The others first: the lead gives up its locks last, so no transaction can
        # run on the lead on top of this one before the others have it committed.
        lead, rest = ok[0], ok[1:]
        results = await self._run_on(rest, finish)
        clean = self._check_finish(rest, results, "COMMIT")
        if rest:
            failpoints.hit(failpoints.AFTER_FIRST_COMMIT)
        results = await self._run_on([lead], finish)
        clean &= self._check_finish([lead], results, "COMMIT")
        if clean:
            commits.log.forget(gid)
        return None

    async def _commit_extended(self, batch: list[tuple[int, bytes, object]]) -> UnitResult:
        """An extended-protocol COMMIT (Parse/Bind/Execute/Sync, as JDBC and pgbench -M
        prepared send it): the two-phase commit, with the replies the batch expects made up
        by the router, since the nodes never see the batch."""
        out: list[bytes] = []
        res = UnitResult()
        skipping = False  # after an error, until the Sync
        for mtype, payload, _ in batch:
            if skipping and mtype != m.SYNC:
                continue
            if mtype == m.PARSE:
                out.append(m.frame(m.PARSE_COMPLETE))
            elif mtype == m.BIND:
                out.append(m.frame(m.BIND_COMPLETE))
            elif mtype == m.DESCRIBE:
                if payload[:1] == b"S":
                    out.append(m.frame(m.PARAMETER_DESCRIPTION, b"\0\0"))
                out.append(m.frame(m.NO_DATA))
            elif mtype == m.CLOSE:
                out.append(m.frame(m.CLOSE_COMPLETE))
            elif mtype == m.EXECUTE:
                res = await self._commit_block()
                out.extend(res.chunks[:-1])  # its ReadyForQuery comes with the Sync
                skipping = res.error is not None
            elif mtype == m.SYNC:
                out.append(m.encode_ready(IDLE))
        res.chunks = out
        return res

    def _check_finish(
        self, conns: list[NodeConnection], results: list[UnitResult | None], verb: str
    ) -> bool:
        """Fail the nodes where phase 2 did not succeed; True if it succeeded everywhere."""
        clean = True
        for c, r in zip(conns, results, strict=True):
            if r is None:
                clean = False  # lost, and already failed
            elif r.error:
                clean = False
                self.router.cluster.mark_failed(
                    c.node.name, f"{verb} PREPARED failed with SQLSTATE {r.error}"
                )
        return clean

    # -- extended protocol ------------------------------------------------------------------

    async def _extended(self, batch: list[tuple[int, bytes, object]]) -> None:
        self._seq_locks = set()
        route = Route.READ
        pinned: tuple[NodeConnection, ...] | None = None
        bound: dict[str, Statement | None] = {}
        strict = False
        catalog_change = False
        # Statements that take locks (anything but SET, SAVEPOINT, ROLLBACK, ...), and of
        # those the transaction control ones (COMMIT, COMMIT PREPARED, PREPARE TRANSACTION).
        locking = ends_block = False
        closes: list[str] = []
        executes = 0
        executed: list[Analysis] = []
        # Executed statements that SET, RESET or SAVEPOINT, with their portal's Bind.
        settings: list[tuple[Statement, bytes]] = []
        statements = self.statements
        # Where each portal was bound, and the last Execute: a statement rewritten for an
        # execution (its own sequence values) changes only the messages since that Execute.
        bound_at: dict[str, int] = {}
        last_execute = -1
        for i, (mtype, payload, _) in enumerate(batch):
            info: object = None
            if mtype == m.PARSE:
                p = m.parse_parse(payload)
                a = self.router.analyzer.analyze(p.query)
                info = statements[p.name] = Statement(
                    p, m.frame(m.PARSE, payload), a, next(self._versions)
                )
                strict = strict or a.strict_isolation
            elif mtype == m.BIND:
                b = m.parse_bind(payload)
                info = bound[b.portal] = statements.get(b.statement)
                bound_at[b.portal] = i
            elif mtype == m.EXECUTE:
                executes += 1
                portal = m.parse_execute(payload).portal
                if portal in bound:
                    stmt = bound[portal]
                    if stmt is not None:
                        executed.append(stmt.analysis)
                        # A portal's first Execute since its Bind runs the statement;
                        # another one only fetches more of its rows.
                        at = bound_at.pop(portal, None)
                        if at is not None and stmt.analysis.settings:
                            settings.append((stmt, batch[at][1]))  # with its Bind
                        self._note_unpreparable(stmt.analysis)
                        r = await self._resolve(stmt.analysis)
                        try:
                            if at is not None and _may_need_fixing(stmt.analysis):
                                fixed = await self._fix_statement(stmt, r)
                                if fixed is not stmt:
                                    if at < last_execute:
                                        raise _bound_too_early(portal)
                                    _repoint(stmt, fixed, statements, bound, batch, last_execute)
                        except PgError as e:
                            await self._refuse_batch(batch, e)
                            return
                        catalog_change = catalog_change or stmt.analysis.catalog_change
                        strict = strict or stmt.analysis.strict_isolation
                        if not stmt.analysis.lock_free:
                            locking = True
                            ends_block = ends_block or stmt.analysis.txn_control
                    else:
                        r = Route.LEAD  # unknown statement: let the lead report the error
                    route = _stronger(route, r)
                else:
                    pinned = self.portals.get(portal, pinned)
                last_execute = i
            elif mtype == m.DESCRIBE:
                d = m.parse_describe(payload)
                if d.kind == "S":
                    info = statements.get(d.name)
                elif d.name not in bound:
                    pinned = self.portals.get(d.name, pinned)
            elif mtype == m.CLOSE:
                c = m.parse_close(payload)
                if c.kind == "S":
                    statements.pop(c.name, None)
                    closes.append(c.name)
                    info = c.name
            batch[i] = (mtype, payload, info)

        if self._unpinned_snapshot(executed):
            await self._pin_snapshot()

        def build(conn: NodeConnection) -> tuple[bytes, list[Expectation]]:
            return _build_batch(conn, batch)

        res: UnitResult | None
        if pinned is not None and route is not Route.WRITE:
            targets: tuple[NodeConnection, ...] = pinned
            res = await self._read_unit(pinned[0], build, retry=False)
        elif route is Route.WRITE:
            if not self.txn_wrote and not self._may_write_now():
                await self._before_write()
            synced = batch[-1][0] == m.SYNC and len(executed) == executes
            if synced and executes == 1 and executed[0].commit and self._commits_in_two_phases():
                res = await self._commit_extended(batch)
                targets = ()
            elif synced and executed and all(map(self._autocommit_in_two_phases, executed)):
                res = await self._autocommit(
                    self._with_seq_locks(build, True), quiet=await self._quiet_needed(executed)
                )
                targets = tuple(self._online_conns())
            else:
                try:
                    locked = self._with_seq_locks(build, False)
                except PgError as e:
                    await self._refuse_batch(batch, e)
                    return
                if (self.txn_status == IDLE and locking) or ends_block:
                    async with self.router.commits.commit_slot():  # a one-phase commit
                        if self.router.recovery_sink is not None:
                            await self._reserve()
                        res = await self._write_unit(locked, single=executes == 1)
                else:
                    res = await self._write_unit(
                        locked, single=executes == 1, quiet=await self._quiet_needed(executed)
                    )
                targets = tuple(self._online_conns())
            if settings and not res.error:
                for stmt, bind in settings:
                    params = m.bind_text_params(bind)
                    self._note_settings(stmt.analysis, stmt.parse.query, params)
            self._reply(res)
        else:
            conn = self._lead() if route is Route.LEAD else self._pick_read()
            targets = (conn,)
            res = await self._read_unit(conn, build, retry=route is Route.READ)
        for portal in bound:
            self.portals[portal] = targets
        if closes:
            for other in self.conns.values():
                if other not in targets:
                    other.pending_close.extend(n for n in closes if n in other.prepared)
        self._after_unit(res, route, strict, catalog_change)
        for a in executed:
            self._after_catalog_work(a)


def _with_values(text: str, params: list[str | None] | None) -> str | None:
    """``text`` with its parameters ($1...) written as literals of the bound values; None if
    a value is missing (bound in binary, or not at all)."""
    if "$" not in text:
        return text
    try:
        tokens = [t for t in scan(text) if t.name == "PARAM"]
    except PglastError:
        return None
    out = []
    pos = 0
    for t in tokens:
        n = int(text[t.start + 1 : t.end + 1])
        if params is None or not 0 < n <= len(params):
            return None
        value = params[n - 1]
        out += [text[pos : t.start], "NULL" if value is None else quote_literal(value)]
        pos = t.end + 1
    out.append(text[pos:])
    return "".join(out)


def _repoint(
    old: Statement,
    new: Statement,
    statements: dict[str, Statement],
    bound: dict[str, Statement | None],
    batch: list[tuple[int, bytes, object]],
    after: int,
) -> None:
    """Make the batch since the Execute at ``after`` (and the session from now on) use the
    rewritten version of a statement. What ran before keeps its own version: the nodes
    get the new Parse before the first message that needs it (_build_batch)."""
    if statements.get(old.name) is old:
        statements[old.name] = new
    for k in range(after + 1, len(batch)):
        mtype, payload, info = batch[k]
        if info is old:
            batch[k] = (mtype, payload, new)
            if mtype == m.BIND:
                bound[m.parse_bind(payload).portal] = new


def _bound_too_early(portal: str) -> PgError:
    return PgError(
        FEATURE_NOT_SUPPORTED,
        f"pgquorum cannot give portal {portal!r} its own sequence values: it was bound "
        "before an earlier Execute in the same batch",
        hint="Bind each portal just before its Execute, as drivers' batches do.",
    )


def _served_node_lost(conn: NodeConnection, reason: str) -> PgError:
    return PgError(
        CONNECTION_FAILURE,
        f"lost the connection to node {conn.node.name} while it served this session: {reason}",
        severity="FATAL",
    )


def _stronger(a: Route, b: Route) -> Route:
    if a is Route.WRITE or b is Route.WRITE:
        return Route.WRITE
    if a is Route.LEAD or b is Route.LEAD:
        return Route.LEAD
    return Route.READ


def _build_batch(
    conn: NodeConnection, batch: list[tuple[int, bytes, object]]
) -> tuple[bytes, list[Expectation]]:
    """The bytes of a batch for one node, with the Parse/Close it still needs injected."""
    parts: list[bytes] = []
    expect: list[Expectation] = []
    if conn.pending_close:
        for name in conn.pending_close:
            parts.append(m.encode_close("S", name))
            expect.append(Expectation(m.CLOSE, name, swallow=True))
        conn.pending_close = []
    have = conn.prepared
    will_have: dict[str, int] = {}
    for mtype, payload, info in batch:
        if isinstance(info, Statement):
            if mtype == m.PARSE:
                will_have[info.name] = info.version
                parts.append(info.parse_frame)
                expect.append(Expectation(m.PARSE, info.name, False, info.version))
                continue
            known = will_have.get(info.name, have.get(info.name))
            if known != info.version:
                if known is not None and info.name:
                    parts.append(m.encode_close("S", info.name))
                    expect.append(Expectation(m.CLOSE, info.name, swallow=True))
                parts.append(info.parse_frame)
                expect.append(Expectation(m.PARSE, info.name, True, info.version))
                will_have[info.name] = info.version
        parts.append(m.frame(mtype, payload))
        if mtype == m.FLUSH:
            continue
        if mtype == m.SYNC:
            expect.append(EXPECT_SYNC)
        elif mtype == m.CLOSE and isinstance(info, str):
            expect.append(Expectation(m.CLOSE, info))
        else:
            expect.append(_EXPECT[mtype])
    return b"".join(parts), expect


# Expectations without a statement name are immutable and shared.
_EXPECT = {t: Expectation(t) for t in (m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.PARSE)}


def _may_need_fixing(a: Analysis) -> bool:
    """Cheap test on the per-statement path: could _fix_text have anything to do?"""
    return bool(a.time_values or a.calls or a.arbitrary or a.inserts or a.copy_into)


# Functions whose calls always go through check_and_rewrite (fixed or refused).
_FIXED_NAMES = TIME_FUNCTIONS | REFUSED_ALWAYS


def _raise_sql(err: PgError) -> str:
    """A statement that fails on a node with ``err``'s SQLSTATE and message."""

    def literal(text: str) -> str:  # (never ending the dollar quote around it)
        return quote_literal(text.replace("$pgq$", ""))

    hint = f", HINT = {literal(err.hint)}" if err.hint else ""
    return (
        f"DO $pgq$BEGIN RAISE EXCEPTION USING ERRCODE = {literal(err.sqlstate)}, "
        f"MESSAGE = {literal(err.message)}{hint}; END$pgq$"
    )


def _set_ready(chunks: list[bytes], status: int) -> None:
    """Make the reply's closing ReadyForQuery say ``status``."""
    if chunks and chunks[-1][0] == m.READY_FOR_QUERY:
        chunks[-1] = m.encode_ready(status)
    else:
        chunks.append(m.encode_ready(status))


def _conflict(voters: list[tuple[NodeConnection, UnitResult]]) -> UnitResult | None:
    """A node's TIMING_FAILURES error where others succeeded, when no node has ended the
    transaction (each is in its block, failed or not): else None."""
    conflict = next((r for _, r in voters if r.error in TIMING_FAILURES), None)
    if conflict is None or all(r.error for _, r in voters):
        return None
    for _, r in voters:
        if r.status != (FAILED_BLOCK if r.error else IN_BLOCK):
            return None
        if r.error and r.error not in TIMING_FAILURES:
            return None
    return conflict


def _skewed(voters: list[tuple[NodeConnection, UnitResult]], early: bool) -> UnitResult | None:
    """For a statement whose quiet hold gave way: outcomes that differ although every node
    still has the transaction open and none failed (a commit landed between the nodes' runs,
    so they saw different rows), or any outcome if the hold had ended before the nodes after
    the lead got the statement (``early``: they may have seen other rows and still counted
    as many, writing other values). The transaction's failure (a serialization failure, as
    PostgreSQL reports a concurrent update), not a node's: the result to report, or None if
    the statement stands or some node's transaction ended."""
    if not early and len({r.outcome() for _, r in voters}) < 2:
        return None
    if any(r.error or r.status != IN_BLOCK for _, r in voters):
        return None
    return _synthesized(SERIALIZATION_FAILURE)


# Failures the router reports for the transaction itself (no node's reply says it).
_SYNTHESIZED = {
    SERIALIZATION_FAILURE: "could not serialize access due to a concurrent commit (the nodes "
    "of the group saw different rows); retry the transaction",
    DEADLOCK_DETECTED: "deadlock detected across the nodes of the group (two statements "
    "took their locks in opposite orders on two nodes); retry the transaction",
}


def _synthesized(code: str) -> UnitResult:
    failure = UnitResult()
    failure.error = code
    failure.status = FAILED_BLOCK
    return failure


def _raise(conflict: UnitResult) -> bytes:
    """A statement that fails its transaction the way ``conflict`` did on another node (or,
    with no node's reply, as _skewed says)."""
    code = conflict.error or SERIALIZATION_FAILURE
    if conflict.chunks:
        message = f"another node of the group refused this transaction with SQLSTATE {code}"
    else:
        message = _SYNTHESIZED[code]
    return m.encode_query(
        "DO $pgquorum$BEGIN RAISE EXCEPTION USING ERRCODE = "
        f"{quote_literal(code)}, MESSAGE = {quote_literal('pgquorum: ' + message)}; "
        "END$pgquorum$"
    )


def _describe(outcome: tuple[object, ...]) -> str:
    return ", ".join(str(x) for x in outcome) or "(nothing)"


async def fetch_rows(conn: NodeConnection, sql: str) -> list[list[str | None]] | None:
    """Run an internal query on a node between units; None if it failed."""
    conn.send_unit(m.encode_query(sql), [EXPECT_QUERY], relay=False)
    res = await conn.wait()
    if res.error:
        return None
    return [m.parse_data_row(c[5:]) for c in res.chunks if c[0] == m.DATA_ROW]
