"""One connection from a client session to one node, and the unit-of-work bookkeeping on it.

A *unit* is what the session sends to a node in one go: a simple Query, or an extended-protocol
batch that ends with Sync or Flush. The connection knows which response ends each frontend
message it sent (the *expectations*), so it can tell when a unit is answered without decoding
row data. While a unit runs the connection either *relays* the node's bytes straight to the
client (reads) or *collects* them (writes, whose reply waits for every node).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m
from pgquorum.protocol.auth import ClientAuth
from pgquorum.protocol.errors import IDLE_IN_TRANSACTION_TIMEOUT, IDLE_SESSION_TIMEOUT, PgError

log = logging.getLogger(__name__)

# The response that ends each frontend message. After an ErrorResponse the node skips to the
# next Sync, which still ends with ReadyForQuery.
_ENDS: dict[int, frozenset[int]] = {
    m.QUERY: frozenset((m.READY_FOR_QUERY,)),
    m.SYNC: frozenset((m.READY_FOR_QUERY,)),
    m.PARSE: frozenset((m.PARSE_COMPLETE,)),
    m.BIND: frozenset((m.BIND_COMPLETE,)),
    m.DESCRIBE: frozenset((m.ROW_DESCRIPTION, m.NO_DATA)),
    m.EXECUTE: frozenset((m.COMMAND_COMPLETE, m.EMPTY_QUERY, m.PORTAL_SUSPENDED)),
    m.CLOSE: frozenset((m.CLOSE_COMPLETE,)),
}
_DATA_ROW, _ERROR, _COMPLETE, _READY = (
    m.DATA_ROW,
    m.ERROR_RESPONSE,
    m.COMMAND_COMPLETE,
    m.READY_FOR_QUERY,
)
_COPY_IN, _COPY_BOTH, _PARAMETER_STATUS = (
    m.COPY_IN_RESPONSE,
    m.COPY_BOTH_RESPONSE,
    m.PARAMETER_STATUS,
)
_PARSE, _CLOSE, _SYNC, _QUERY = m.PARSE, m.CLOSE, m.SYNC, m.QUERY
# Messages a node may send at any time, also between units.
_ASYNC = frozenset((m.NOTICE_RESPONSE, m.NOTIFICATION, m.PARAMETER_STATUS))
_EMPTY_QUERY = m.EMPTY_QUERY
_PING = m.encode_query("")


class NodeLost(Exception):
    """The connection to a node broke or the node sent something the router cannot follow.

    ``idle_timeout`` is the SQLSTATE when the node ended the connection while it waited for
    the router, for one of its idle timeouts: the node itself is well."""

    def __init__(self, node: Node, reason: str, *, idle_timeout: str = "") -> None:
        super().__init__(f"node {node.name} ({node.address}): {reason}")
        self.node = node
        self.reason = reason
        self.idle_timeout = idle_timeout


_IDLE_TIMEOUTS = frozenset({IDLE_IN_TRANSACTION_TIMEOUT, IDLE_SESSION_TIMEOUT})


class Expectation:
    """A frontend message awaiting its response; ``swallow`` hides the reply from the client
    (the router injected the message itself, e.g. a Parse a node had not seen yet)."""

    __slots__ = ("ends", "kind", "statement", "swallow", "version")

    def __init__(
        self, kind: int, statement: str | None = None, swallow: bool = False, version: int = 0
    ) -> None:
        self.ends = _ENDS[kind]
        self.kind = kind
        self.statement = statement
        self.swallow = swallow
        self.version = version


EXPECT_SYNC = Expectation(m.SYNC)
EXPECT_QUERY = Expectation(m.QUERY)
EXPECT_QUERY_SWALLOWED = Expectation(m.QUERY, swallow=True)


class UnitResult:
    """What a node answered to one unit."""

    __slots__ = ("chunks", "copy_in", "error", "sent", "status", "tags")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []  # collected reply bytes (collect mode only)
        self.tags: list[str] = []  # CommandComplete tags, for comparing nodes
        self.error: str | None = None  # SQLSTATE of the first error
        self.status = 0  # ReadyForQuery status of the last Sync/Query, 0 if none
        self.copy_in = False  # the node is waiting for COPY data
        self.sent = 0  # bytes of the unit as sent (what a session's journal holds for it)

    def outcome(self) -> tuple[object, ...]:
        return (self.error, *self.tags) if self.error else tuple(self.tags)


class NodeConnection(asyncio.Protocol):
    """The router acting as a client of one node, for one client session."""

    def __init__(self, node: Node, client_write: Callable[[bytes], None]) -> None:
        self.node = node
        self._client_write = client_write
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._expect: deque[Expectation] = deque()
        self._relay = False
        self._forward_async = False  # pass notices/notifications to the client while idle
        self._result: UnitResult | None = None
        self._waiter: asyncio.Future[UnitResult] | None = None
        self._copy_result: UnitResult | None = None
        self._on_done: Callable[[UnitResult | None], None] | None = None
        self.pending_begin: bytes | None = None  # see ClientSession._defer_begin
        self.relayed = False  # the running unit's answer has (partly) reached the client
        self._pings = 0  # pings whose ReadyForQuery has not come yet (see ping)
        self._lost: NodeLost | None = None
        # Told when the node ends the connection for an idle timeout (see NodeLost).
        self.on_idle_timeout: Callable[[NodeConnection, NodeLost], None] | None = None
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        # Filled during startup.
        self.params: dict[str, str] = {}
        self.pid = 0
        self.secret = 0
        # Prepared statements this node holds for the session: name -> version.
        self.prepared: dict[str, int] = {}
        self.pending_close: list[str] = []  # statements the client closed while we were elsewhere
        self._startup: asyncio.Future[None] | None = None
        self._auth: ClientAuth | None = None

    # -- connection set-up ------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        node: Node,
        params: dict[str, str],
        password: str | None,
        client_write: Callable[[bytes], None],
        timeout: float = 10.0,
    ) -> NodeConnection:
        loop = asyncio.get_running_loop()
        conn = cls(node, client_write)
        try:
            await asyncio.wait_for(open_transport(node, lambda: conn), timeout)
        except (OSError, TimeoutError) as e:
            raise NodeLost(node, f"cannot connect: {e or 'timeout'}") from None
        conn._auth = ClientAuth(params["user"], password)
        conn._startup = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(m.encode_startup(params))
        try:
            await asyncio.wait_for(conn._startup, timeout)
        except TimeoutError:
            conn.close()
            raise NodeLost(node, "no answer to the startup message") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def _startup_message(self, mtype: int, payload: bytes) -> None:
        fut = self._startup
        assert fut is not None and self._auth is not None and self.transport is not None
        if mtype == m.AUTHENTICATION:
            code, data = m.parse_auth_request(payload)
            reply = self._auth.receive(code, data)
            if reply:
                self.transport.write(reply)
        elif mtype == m.PARAMETER_STATUS:
            k, v = m.parse_parameter_status(payload)
            self.params[k] = v
        elif mtype == m.BACKEND_KEY_DATA:
            self.pid, self.secret = m.parse_backend_key(payload)
        elif mtype == m.READY_FOR_QUERY:
            self._startup = None
            fut.set_result(None)
        elif mtype == m.ERROR_RESPONSE:
            raise m.error_from_fields(m.parse_error_fields(payload))
        elif mtype == m.NOTICE_RESPONSE or mtype == m.NEGOTIATE_PROTOCOL_VERSION:
            pass
        else:
            raise NodeLost(self.node, f"unexpected message {chr(mtype)!r} during startup")

    # -- units ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A unit is running: the node still owes answers."""
        return bool(self._expect)

    def send_unit(
        self,
        data: bytes,
        expect: list[Expectation],
        *,
        relay: bool,
        on_done: Callable[[UnitResult | None], None] | None = None,
    ) -> None:
        """Send one unit; ``relay`` forwards the answer to the client as it arrives.

        The answer is awaited with ``wait()``, or, when ``on_done`` is given, handed to that
        callback (None if the node was lost): the session's fast path for reads, which saves
        the task switches of awaiting.
        """
        self.relayed = False
        if self._lost:
            raise self._lost
        assert self.transport is not None and not self._expect
        if self._pings:  # their answers come first
            self._expect.extend([EXPECT_QUERY_SWALLOWED] * self._pings)
            self._pings = 0
        if self.pending_begin is not None:
            # The client's BEGIN, held back until this node gets work in the transaction.
            data = self.pending_begin + data
            self._expect.append(EXPECT_QUERY_SWALLOWED)
            self.pending_begin = None
        self._expect.extend(expect)
        self._relay = relay
        self._result = res = UnitResult()
        res.sent = len(data)
        if on_done is None:
            self._waiter = asyncio.get_running_loop().create_future()
        self._on_done = on_done
        self.transport.write(data)

    def send_more(self, data: bytes) -> None:
        """Bytes inside a running unit (COPY data)."""
        if self._lost:
            raise self._lost
        assert self.transport is not None
        self.transport.write(data)

    def ping(self) -> None:
        """An empty query while no unit runs, its answer swallowed: it resets the node's idle
        timeouts (idle_session_timeout, idle_in_transaction_session_timeout). A unit sent
        before the answer came waits behind it (send_unit)."""
        if self._expect or self._lost is not None or self.transport is None:
            return
        self._pings += 1
        self.transport.write(_PING)

    async def wait(self) -> UnitResult:
        """Until the unit is answered, or the node asks for COPY data."""
        fut = self._waiter
        assert fut is not None
        if fut.done():
            res = fut.result()
        else:
            res = await fut
        self._waiter = None
        if res.copy_in:
            self._copy_result = res
        return res

    def resume_copy(self) -> None:
        """After the COPY data is sent: wait for the rest of the unit."""
        res = self._copy_result
        assert res is not None
        self._copy_result = None
        res.copy_in = False
        self._waiter = asyncio.get_running_loop().create_future()
        if self._lost:
            self._waiter.set_exception(self._lost)
        elif not self._expect:
            self._waiter.set_result(res)

    async def writable(self) -> None:
        await self._write_ok.wait()

    # -- incoming bytes ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        try:
            consumed = self._process(buf)
        except NodeLost as e:
            self._fail(e)
            return
        except PgError as e:
            if self._startup is not None and not self._startup.done():
                self._startup.set_exception(e)
                self._startup = None
                return
            self._fail(NodeLost(self.node, e.message))
            return
        if consumed:
            del buf[:consumed]

    def _process(self, buf: bytearray) -> int:
        """Handle every whole message in ``buf``; return how many bytes were consumed."""
        n = len(buf)
        pos = 0
        relay_from = -1  # start of a run of bytes to forward to the client unchanged
        out = self._client_write
        relay = self._relay
        while n - pos >= 5:
            mtype = buf[pos]
            end = pos + 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if end > n:
                break
            if mtype == _DATA_ROW and relay_from >= 0:
                pos = end  # the bulk of a result, inside a run already being relayed
                continue
            if self._startup is not None:
                self._startup_message(mtype, bytes(buf[pos + 5 : end]))
                pos = end
                continue
            res = self._result
            expect = self._expect
            if res is None or (not expect and not res.copy_in):
                # Between units: only asynchronous messages are allowed, and pings' answers.
                if self._pings and mtype in (_EMPTY_QUERY, _READY):
                    if mtype == _READY:
                        self._pings -= 1
                    pos = end
                    continue
                if mtype not in _ASYNC:
                    if mtype == _ERROR:
                        f = m.parse_error_fields(bytes(buf[pos + 5 : end]))
                        code = f.get("C", "")
                        raise NodeLost(
                            self.node,
                            f.get("M", "error while idle"),
                            idle_timeout=code if code in _IDLE_TIMEOUTS else "",
                        )
                    raise NodeLost(self.node, f"unexpected message {chr(mtype)!r} while idle")
                if self._forward_async:
                    out(bytes(buf[pos:end]))
                pos = end
                continue
            head = expect[0] if expect else None
            keep = True
            if head is not None and mtype in head.ends:
                expect.popleft()
                if head.swallow:
                    keep = False
                if head.statement is not None:
                    if head.kind == _PARSE:
                        self.prepared[head.statement] = head.version
                    elif head.kind == _CLOSE:
                        self.prepared.pop(head.statement, None)
                if mtype == _COMPLETE:
                    if not relay:  # tags are compared for replicated writes only
                        res.tags.append(m.parse_command_tag(bytes(buf[pos + 5 : end])))
                elif mtype == _READY:
                    res.status = buf[pos + 5]
            elif mtype == _ERROR:
                fields = m.parse_error_fields(bytes(buf[pos + 5 : end]))
                if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                    # The node is ending this connection (shutdown, crash, terminate): that
                    # is the node lost, not an answer to relay.
                    raise NodeLost(self.node, fields.get("M", "fatal error"))
                if res.error is None:
                    res.error = fields.get("C", "XX000")
                if head is not None and head.swallow:
                    keep = True  # an injected message failed: the client must see why
                # The node now skips everything up to the next Sync.
                while expect and expect[0].kind not in (_SYNC, _QUERY):
                    expect.popleft()
            elif mtype == _COMPLETE:
                # Inside a simple Query: one per statement.
                if head is not None and head.swallow:
                    keep = False
                elif not relay:
                    res.tags.append(m.parse_command_tag(bytes(buf[pos + 5 : end])))
            elif mtype == _COPY_IN:
                res.copy_in = True
            elif mtype == _PARAMETER_STATUS:
                k, v = m.parse_parameter_status(bytes(buf[pos + 5 : end]))
                self.params[k] = v
            elif mtype == _COPY_BOTH:
                raise NodeLost(self.node, "COPY BOTH (replication) is not supported")
            elif head is not None and head.swallow:
                keep = False  # e.g. ParameterDescription of an injected message
            if keep:
                if relay:
                    if relay_from < 0:
                        relay_from = pos
                else:
                    res.chunks.append(bytes(buf[pos:end]))
            elif relay_from >= 0:
                out(bytes(buf[relay_from:pos]))
                self.relayed = True
                relay_from = -1
            pos = end
            if not expect or mtype == _COPY_IN:
                if relay_from >= 0:
                    out(bytes(buf[relay_from:pos]))
                    self.relayed = True
                    relay_from = -1
                waiter = self._waiter
                if not expect:
                    self._result = None
                    on_done = self._on_done
                    if on_done is not None:
                        self._on_done = None
                        on_done(res)  # may start the next unit on this very connection
                        continue
                if waiter is not None and not waiter.done():
                    waiter.set_result(res)
        if relay_from >= 0:
            out(bytes(buf[relay_from:pos]))
            self.relayed = True
        return pos

    # -- failure ----------------------------------------------------------------------------

    def _fail(self, err: NodeLost) -> None:
        if self._lost is None:
            self._lost = err
        if self._startup is not None and not self._startup.done():
            self._startup.set_exception(err)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(err)
        on_done = self._on_done
        if on_done is not None:
            self._on_done = None
            on_done(None)
        if self.transport is not None:
            self.transport.abort()
        if err.idle_timeout and self.on_idle_timeout is not None:
            self.on_idle_timeout(self, err)

    def give_up(self, reason: str) -> None:
        """Treat the node as lost (it took too long): the unit's waiter gets NodeLost."""
        self._fail(NodeLost(self.node, reason))

    @property
    def lost(self) -> NodeLost | None:
        return self._lost

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the node"
        self._fail(NodeLost(self.node, reason))

    def pause_writing(self) -> None:
        self._write_ok.clear()

    def resume_writing(self) -> None:
        self._write_ok.set()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.resume_reading()

    def set_forward_async(self, on: bool) -> None:
        self._forward_async = on

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._lost is None:
                self._lost = NodeLost(self.node, "closed by the router")
                self.transport.write(m.TERMINATE_MESSAGE)
            self.transport.close()


async def open_transport(
    node: Node, factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    """Connect to a node: TCP, or its Unix-domain socket when the host is a directory (as in
    libpq). A node on the router's own machine answers faster over its socket."""
    loop = asyncio.get_running_loop()
    if node.host.startswith("/"):
        return await loop.create_unix_connection(factory, f"{node.host}/.s.PGSQL.{node.port}")
    return await loop.create_connection(factory, node.host, node.port)
