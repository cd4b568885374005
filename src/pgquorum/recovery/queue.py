"""The recovery queue: every transaction the group commits while a node recovers, in commit
order.

The router that runs the recovery (the coordinator) holds the queue; its sessions append to
it directly (:class:`LocalQueue`), the sessions of peer routers through the coordinator's
admin console (:class:`RemoteQueue`, which batches what its sessions send, a group commit
over the network; a batch whose answer was lost is sent again and applied once). What the
coordinator cannot hold in memory waits in a spool file (:class:`_Spool`).

Commit order is the order of serial numbers, taken inside the commit barrier's slot *before*
a commit is sent (a two-phase commit takes its serial after the decision, before phase 2):
a transaction that waits for another's locks can only commit after that one's commit ended
on the lead, so it draws a later serial. A one-phase commit reserves its serial first and
settles it with the transaction's units afterwards (or as void, when the unit did not end a
transaction); the replay waits for an entry to be settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import pickle
import tempfile
import uuid
from array import array
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, cast

from pgquorum.bounded import store_bounded
from pgquorum.protocol.errors import UNDEFINED_OBJECT, PgError
from pgquorum.router.backend import NodeLost
from pgquorum.router.client import Link, admin_link

from .journal import Entry
from .queue_log import QueueLog

log = logging.getLogger(__name__)

COMMAND = "RECOVERY QUEUE "  # the admin console command that carries a batch of operations
SEND_TIMEOUT_S = 10.0
# How long a peer keeps its sessions' commits waiting for a coordinator it lost (one that
# restarts comes back within this) before it gives the recovery up.
RECONNECT_S = 30.0
RECONNECT_PAUSE_S = 0.25
# A batch of a peer's operations is one admin console query: batches are cut at this size,
# and one operation (a transaction with its COPY data, in base64) may take this much, well
# under the coordinator's max_message_size (64 MiB by default).
BATCH_BYTES = 4 * 1024 * 1024
MAX_OP_BYTES = 48 * 1024 * 1024
# What a peer's sessions may have waiting to be sent (while a batch is on its way, or the
# coordinator is being reconnected to) before the recovery fails: the peer's memory is worth
# more than a recovery whose coordinator does not keep up.
MAX_WAITING_BYTES = 256 * 1024 * 1024
# What the coordinator keeps for the replay: entries up to MEMORY_BYTES (their units and
# COPY data) in memory, the rest in a spool file on disk (in TMPDIR, like the dump), so that
# a long restore under a heavy write load does not hold the backlog in memory (the spool's
# index takes 16 bytes an entry). Past MAX_DEPTH entries or MAX_BYTES on disk the recovery
# fails rather than grow without end.
MEMORY_BYTES = 64 * 1024 * 1024
# The ids of the latest two-phase commits queued that the coordinator remembers (see
# LocalQueue.holds): a resolver asks about its router's last transactions before a crash.
GID_MEMORY = 100_000
MAX_DEPTH = 4_000_000
MAX_BYTES = 64 * 1024 * 1024 * 1024


class QueueUnavailable(Exception):
    """The coordinator's queue cannot take an entry: the recovery cannot go on."""


class QueueGone(QueueUnavailable):
    """The coordinator no longer runs the recovery (it ended, or the coordinator restarted
    and lost it): no replay will miss what was not queued, so nothing needs to fail. The
    node stays RECOVERING until the coordinator says what became of it (a recovery begun
    again, ONLINE, or FAILED)."""


class Sink(Protocol):
    """Where a router's sessions put their transactions while a node recovers."""

    rid: str
    node: str

    async def reserve(self) -> int: ...
    def settle(self, serial: int, entry: Entry | None) -> None: ...
    async def append(self, entry: Entry) -> int: ...
    def post(self, entry: Entry) -> None: ...
    async def flush(self) -> None: ...
    def end_session(self, session: str, params: dict[str, str]) -> None: ...
    async def holds(self, gid: str) -> bool: ...
    def close(self) -> None: ...


_PENDING = object()


class LocalQueue:
    """The coordinator's queue: serial -> entry (None when void), in memory or spooled."""

    def __init__(self, rid: str, node: str, spool_dir: str | None = None) -> None:
        self.rid = rid
        self.node = node
        self._next = 1
        # Reserved and not replayed: an entry, None (void), or _PENDING; those spooled are
        # in the spool instead.
        self._entries: dict[int, object] = {}
        self._changed = asyncio.Event()
        self.applied = 0  # serials below this were replayed (set by the replay)
        self.bytes = 0  # the size of the entries not yet replayed (Entry.size)
        self.memory = 0  # what those held in memory take (Entry.footprint)
        self._spool = _Spool(spool_dir)
        # Each peer's last batch and its answer: a batch sent again (its answer was lost) is
        # answered again, not applied twice.
        self._batches: dict[str, tuple[int, list[int]]] = {}
        self._gids: dict[str, None] = {}  # the latest two-phase commits queued, oldest first
        self.closed = False
        self.error = ""  # why it closed, when it gave up by itself
        # Where each change is written, for a coordinator that restarts (queue_log.py).
        self.log: QueueLog | None = None
        # While the queue is rebuilt from its log (resume.py): told each entry the node
        # had before the restart, which is not kept.
        self.replayed_hook: Callable[[Entry], None] | None = None

    @property
    def depth(self) -> int:
        """Entries reserved and not yet replayed."""
        return self._next - 1 - self.applied

    async def reserve(self) -> int:
        serial = self.reserve_now()
        self.note(("reserve",))
        return serial

    def note(self, record: tuple[Any, ...]) -> None:
        """Write a change (or a step of the replay) to the log, if the queue keeps one."""
        if self.log is None or self.closed:
            return
        try:
            self.log.write(record)
        except OSError as e:
            self._give_up(f"cannot write the recovery queue of node {self.node} to disk: {e}")
            raise QueueUnavailable(self.error) from None

    def reserve_now(self) -> int:
        if self.closed:
            raise QueueUnavailable(
                self.error or f"the recovery {self.rid} of node {self.node} ended"
            )
        if self.depth >= MAX_DEPTH:  # the replay cannot keep up: give up first
            self._give_up(
                f"more than {MAX_DEPTH} transactions waited for the replay on node {self.node}"
            )
            raise QueueUnavailable(self.error)
        serial = self._next
        self._next += 1
        self._entries[serial] = _PENDING
        return serial

    def settle(self, serial: int, entry: Entry | None) -> None:
        self.settle_now(serial, entry)
        self.note(("settle", serial, entry))

    def post(self, entry: Entry) -> None:
        self.add(entry)
        self.note(("add", entry))

    def add(self, entry: Entry) -> int:
        """Reserve a place and fill it at once; its serial."""
        serial = self.reserve_now()
        self.settle_now(serial, entry)
        return serial

    def settle_now(self, serial: int, entry: Entry | None) -> None:
        if self._entries.get(serial) is not _PENDING or self.closed:
            return  # (a closed queue is not replayed any more)
        if serial <= self.applied:  # rebuilt from the log: replayed before the restart
            del self._entries[serial]
            if entry is not None:
                if entry.gid:
                    store_bounded(self._gids, entry.gid, None, GID_MEMORY)
                if self.replayed_hook is not None:
                    self.replayed_hook(entry)
            return
        if entry is None:
            self._entries[serial] = None
        else:
            if entry.gid:
                store_bounded(self._gids, entry.gid, None, GID_MEMORY)
            size = entry.size
            self.bytes += size
            if self.bytes > MAX_BYTES:  # the replay cannot keep up: give up first
                self._give_up(
                    f"the transactions waiting for the replay on node {self.node} "
                    f"took more than {MAX_BYTES / 2**20:g} MiB"
                )
                raise QueueUnavailable(self.error)
            footprint = entry.footprint
            if self.memory + footprint > MEMORY_BYTES:
                try:
                    self._spool.put(serial, entry, self.applied + 1)
                except OSError as e:
                    self._give_up(
                        f"cannot keep the recovery queue of node {self.node} on disk: {e}"
                    )
                    raise QueueUnavailable(self.error) from None
                del self._entries[serial]
            else:
                self._entries[serial] = entry
                self.memory += footprint
        self._wake()

    def _unspill(self, serial: int) -> Entry:
        try:
            return self._spool.take(serial)
        except OSError as e:
            self._give_up(f"cannot read the recovery queue of node {self.node} back: {e}")
            raise QueueUnavailable(self.error) from None

    def _give_up(self, why: str) -> None:
        self.error = why
        self.close()

    async def append(self, entry: Entry) -> int:
        serial = self.add(entry)
        self.note(("add", entry))
        return serial

    async def holds(self, gid: str) -> bool:
        """Whether the two-phase commit ``gid`` was queued (among the latest GID_MEMORY: an
        older one is not found, and its resolver fails the recovery, safely)."""
        return gid in self._gids

    async def flush(self) -> None:
        pass

    def end_session(self, session: str, params: dict[str, str]) -> None:
        if self._end(session, params):
            self.note(("end", session, params))

    def _end(self, session: str, params: dict[str, str]) -> bool:
        """The session's end, queued (its replay connection closes there), unless the
        queue is closed."""
        if self.closed:
            return False
        self.add(Entry(session, params, end=True))
        return True

    def close(self) -> None:
        """Nothing more is queued or replayed. (Its log stays: a router that stops during
        the recovery resumes it when it starts again.)"""
        self.closed = True
        self._spool.close()
        if self.log is not None:
            self.log.close()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def take(self, serial: int, timeout: float) -> Entry | None:
        """Entry ``serial`` once it is settled (None: void). TimeoutError if it is not
        reserved or settled within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.error:  # gave up: the rest is not worth replaying
                raise QueueUnavailable(self.error)
            got = self._entries.get(serial, _PENDING)
            if got is not _PENDING:
                del self._entries[serial]
                if got is None:
                    return None
                entry = cast(Entry, got)
                self.memory -= entry.footprint
                self.bytes -= entry.size
                return entry
            if self._spool.holds(serial):  # (a reserved one is in _entries until settled)
                entry = self._unspill(serial)
                self.bytes -= entry.size
                return entry
            if self.closed:
                raise QueueUnavailable(self.error or "the queue was closed")
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def redo(self, record: tuple[Any, ...]) -> int:
        """A change read back from the log (see note), made again as it was first made; the
        serial a reservation took (else 0)."""
        kind = record[0]
        if kind == "reserve":
            return self.reserve_now()
        if kind == "settle":
            self.settle_now(record[1], record[2])
        elif kind == "add":
            self.add(record[1])
        elif kind == "end":
            self._end(record[1], record[2])
        elif kind == "batch":
            self.apply_batch(record[1], record[2], record[3])
        return 0

    def apply_batch(
        self, ops: list[dict[str, Any]], peer: str | None = None, batch: int = 0
    ) -> list[int]:
        """Operations sent by a peer's RemoteQueue; a serial (or 0) for each. ``peer`` and
        ``batch`` name the batch: the peer's last one, sent again, gets its answer again."""
        if peer is not None:
            last = self._batches.get(peer)
            if last is not None and last[0] == batch:
                return last[1]
            if last is not None and batch < last[0]:
                # A copy that took longer than the one sent after it on a new link: the
                # peer sends the next batch only once this one was answered, so it was.
                raise QueueUnavailable(f"batch {batch} of this peer was applied already")
        out = self._apply(ops)
        if peer is not None:
            self._batches[peer] = (batch, out)
        self.note(("batch", ops, peer, batch))  # (before the peer has its answer)
        return out

    def _apply(self, ops: list[dict[str, Any]]) -> list[int]:
        out = []
        for op in ops:
            kind = op["op"]
            if kind == "reserve":
                out.append(self.reserve_now())
            elif kind == "settle":
                entry = op.get("entry")
                self.settle_now(
                    int(op["serial"]), None if entry is None else Entry.from_json(entry)
                )
                out.append(0)
            elif kind == "append":
                out.append(self.add(Entry.from_json(op["entry"])))
            elif kind == "end":
                self._end(str(op["session"]), dict(op["params"]))
                out.append(0)
            elif kind == "holds":
                out.append(int(str(op["gid"]) in self._gids))
            else:
                raise ValueError(f"unknown queue operation {kind!r}")
        return out


class _Spool:
    """Queue entries in an unlinked temporary file, found again by serial. The index holds
    16 bytes for each serial from the oldest not replayed to the newest spooled."""

    def __init__(self, directory: str | None) -> None:
        self._directory = directory
        self._file: BinaryIO | None = None
        self._end = 0
        self.count = 0  # entries in the file not read back yet
        self._base = 0  # the serial at index 0 of the index
        self._at = array("q")  # offset in the file, or -1
        self._size = array("q")
        self._closed = False

    def put(self, serial: int, entry: Entry, low: int) -> None:
        """Write ``entry``. ``low``: no serial below it is put or taken any more."""
        if self._closed:
            raise OSError("the spool is closed")
        data = pickle.dumps(entry, pickle.HIGHEST_PROTOCOL)
        if self._file is None:
            # Unlinked at once: a crashed coordinator leaves no file behind.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115 (lives with the queue)
                prefix="pgquorum-queue-", dir=self._directory
            )
        fd = self._file.fileno()
        done = 0
        while done < len(data):
            done += os.pwrite(fd, memoryview(data)[done:], self._end + done)
        if not self.count:
            self._base = low
            del self._at[:], self._size[:]
        elif low - self._base > len(self._at) // 2:  # the index keeps to the live range
            del self._at[: low - self._base], self._size[: low - self._base]
            self._base = low
        i = serial - self._base
        if i >= len(self._at):
            more = i + 1 - len(self._at)
            self._at.extend(itertools.repeat(-1, more))
            self._size.extend(itertools.repeat(0, more))
        self._at[i] = self._end
        self._size[i] = len(data)
        self._end += len(data)
        self.count += 1

    def holds(self, serial: int) -> bool:
        i = serial - self._base
        return self.count > 0 and 0 <= i < len(self._at) and self._at[i] >= 0

    def take(self, serial: int) -> Entry:
        """The entry spooled for ``serial`` (see holds), read back and let go."""
        if self._file is None:
            raise OSError("the spool is closed")
        i = serial - self._base
        at, size = self._at[i], self._size[i]
        data = os.pread(self._file.fileno(), size, at)
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes at {at}")
        self._at[i] = -1
        self.count -= 1
        if not self.count:  # drained: the file starts over, its space freed
            self._file.truncate(0)
            self._end = 0
        entry: Entry = pickle.loads(data)  # (our own file: unlinked, mode 0600)
        return entry

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


class RemoteQueue:
    """A peer router's way into the coordinator's queue: the operations of all its sessions,
    sent in batches over one admin connection, in the order they were made."""

    def __init__(
        self,
        rid: str,
        node: str,
        coordinator: tuple[str, int],
        credentials: tuple[str, str | None],
    ) -> None:
        self.rid = rid
        self.node = node
        self.coordinator = coordinator
        self._credentials = credentials
        # Operations as JSON texts (a batch is cut by their size), each with its caller.
        self._waiting: list[tuple[str, asyncio.Future[int] | None]] = []
        self._waiting_bytes = 0
        self._link: Link | None = None
        # The coordinator applies each batch of this queue once (see LocalQueue.apply_batch),
        # so one whose answer was lost is simply sent again.
        self._peer = uuid.uuid4().hex
        self._batch = 0
        self._sender: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.error: QueueUnavailable | None = None  # set: nothing more is sent
        # An operation made was never applied: a commit may be missing from the queue. (A
        # queue closed with nothing on its way lost nothing: a router that stops while a
        # peer holds its writes must not fail the node for it.)
        self.lost = False

    async def reserve(self) -> int:
        return await self._call({"op": "reserve"})

    def settle(self, serial: int, entry: Entry | None) -> None:
        op: dict[str, Any] = {"op": "settle", "serial": serial}
        if entry is not None:
            op["entry"] = entry.to_json()
        self._post(op, None)

    def post(self, entry: Entry) -> None:
        self._post({"op": "append", "entry": entry.to_json()}, None)

    async def append(self, entry: Entry) -> int:
        return await self._call({"op": "append", "entry": entry.to_json()})

    def end_session(self, session: str, params: dict[str, str]) -> None:
        with contextlib.suppress(QueueUnavailable):
            self._post({"op": "end", "session": session, "params": params}, None)

    async def holds(self, gid: str) -> bool:
        try:
            return await self._call({"op": "holds", "gid": gid}) == 1
        except QueueUnavailable:
            return False  # (not known to be queued: the caller fails the recovery)

    async def flush(self) -> None:
        """Until every operation made so far has reached the coordinator (QueueUnavailable
        if one never will)."""
        await self._idle.wait()
        if self.lost:
            self._check()

    def close(self) -> None:
        if self._sender is not None and not self._sender.done():
            self.lost = True  # (a batch is on its way, its answer will not be read)
        self._fail(QueueUnavailable(f"the recovery {self.rid} of node {self.node} ended"))
        if self._sender is not None:
            self._sender.cancel()  # (it fails its own batch)
        self._drop_link()

    def _check(self) -> None:
        if self.error is not None:
            raise type(self.error)(str(self.error))

    def _fail(self, error: QueueUnavailable) -> None:
        """Nothing more is sent; every caller still waiting gets ``error``."""
        if self.error is None:
            self.error = error
        waiting, self._waiting = self._waiting, []
        self._waiting_bytes = 0
        self.lost = self.lost or bool(waiting)
        _fail_all(waiting, self.error)
        self._idle.set()

    async def _call(self, op: dict[str, Any]) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._post(op, fut)
        return await fut

    def _post(self, op: dict[str, Any], fut: asyncio.Future[int] | None) -> None:
        self._check()
        text = json.dumps(op, separators=(",", ":"))
        if len(text) > MAX_OP_BYTES:
            # The coordinator's admin console takes messages of max_message_size at most.
            raise QueueUnavailable(
                f"a transaction of {len(text) / 2**20:.0f} MiB is more than a peer can send "
                f"to the recovery queue ({MAX_OP_BYTES / 2**20:g} MiB)"
            )
        if self._waiting_bytes + len(text) > MAX_WAITING_BYTES:
            error = QueueUnavailable(
                f"more than {MAX_WAITING_BYTES / 2**20:g} MiB of transactions waited to be "
                f"sent to the coordinator at {self.coordinator[0]}:{self.coordinator[1]}"
            )
            self._fail(error)
            raise error
        self._waiting.append((text, fut))
        self._waiting_bytes += len(text)
        self._idle.clear()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self._waiting:
            batch = _cut(self._waiting, BATCH_BYTES)
            del self._waiting[: len(batch)]
            self._waiting_bytes -= sum(len(text) for text, _ in batch)
            self._batch += 1
            try:
                serials = await self._deliver([text for text, _ in batch], self._batch)
            except QueueUnavailable as e:
                log.error("the recovery queue at %s:%d: %s", *self.coordinator, e)
                self.lost = True
                _fail_all(batch, e)
                self._fail(e)
                return
            except BaseException as e:  # cancelled by close(), or a bug: no one waits on
                error = self.error or QueueUnavailable(f"the queue's sender failed: {e!r}")
                self.lost = True
                self._fail(error)
                _fail_all(batch, error)
                raise
            for (_, fut), serial in zip(batch, serials, strict=True):
                if fut is not None and not fut.done():
                    fut.set_result(serial)
        self._idle.set()

    async def _deliver(self, ops: list[str], batch: int) -> list[int]:
        """The serials the coordinator gave batch number ``batch``. A lost coordinator is
        waited for (the sessions' commits wait meanwhile) and sent the batch again: it
        applies a batch once, so one that arrived before the link broke is only answered
        again. One that restarted has lost the recovery, and says so (QueueGone)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            try:
                return await asyncio.wait_for(self._exchange(ops, batch), SEND_TIMEOUT_S)
            except PgError as e:
                raise _refused(e) from None
            except ValueError as e:
                raise QueueUnavailable(str(e)) from None
            except (NodeLost, OSError, TimeoutError) as e:
                if deadline is None:
                    deadline = loop.time() + RECONNECT_S
                    log.warning(
                        "lost the recovery queue at %s:%d (%s); waiting up to %.0fs for it",
                        *self.coordinator,
                        e,
                        RECONNECT_S,
                    )
                elif loop.time() >= deadline:
                    raise QueueUnavailable(
                        f"the coordinator did not come back in {RECONNECT_S:.0f}s: {e}"
                    ) from None
                self._drop_link()
                await asyncio.sleep(RECONNECT_PAUSE_S)

    def _drop_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    async def _exchange(self, ops: list[str], batch: int) -> list[int]:
        if self._link is None:
            self._link = await admin_link(*self.coordinator, *self._credentials)
        payload = (
            f'{{"rid":{json.dumps(self.rid)},"peer":"{self._peer}","batch":{batch},'
            f'"ops":[{",".join(ops)}]}}'
        )
        _, rows = await self._link.query(COMMAND + payload)
        serials = [int(r[0] or 0) for r in rows]
        if len(serials) != len(ops):
            raise ValueError("the coordinator answered a different number of operations")
        return serials


def _cut(
    waiting: list[tuple[str, asyncio.Future[int] | None]], budget: int
) -> list[tuple[str, asyncio.Future[int] | None]]:
    """The first operations whose texts fit in ``budget`` bytes (at least one)."""
    size = 0
    for n, (text, _) in enumerate(waiting):
        size += len(text) + 1
        if size > budget and n:
            return waiting[:n]
    return list(waiting)


def _fail_all(calls: list[tuple[str, asyncio.Future[int] | None]], error: QueueUnavailable) -> None:
    for _, fut in calls:
        if fut is not None and not fut.done():
            fut.set_exception(type(error)(str(error)))


def _refused(e: PgError) -> QueueUnavailable:
    """The coordinator's answer to a batch it would not take."""
    if e.sqlstate == UNDEFINED_OBJECT:  # no such recovery queues there
        return QueueGone(e.message)
    return QueueUnavailable(e.message)
