"""The commit coordinator: transaction ids, the decision log, and in-doubt resolution.

A transaction that wrote on more than one node commits in two phases: PREPARE TRANSACTION
everywhere, a majority vote, the decision made durable in the state database, then COMMIT
PREPARED (or ROLLBACK PREPARED). If the router dies between the phases, prepared
transactions stay behind on the nodes, holding locks. The resolver finds the ones this
router owns (the id names the router) and finishes them by the record: commit where a
decision was recorded, roll back where none was (presumed abort).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from pgquorum import failpoints
from pgquorum.cluster.model import Node
from pgquorum.cluster.store import DecisionLog
from pgquorum.protocol import messages as m
from pgquorum.recovery.queue import QueueUnavailable, Sink
from pgquorum.sql.quoting import quote_literal

from .backend import NodeLost
from .client import Link, query
from .quiet import QuietLock
from .signals import Signal

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger(__name__)

GID_PREFIX = "pgq/"
RESOLVE_INTERVAL_S = 30.0
# How long a commit waits for the quiet holds before it ends them (see quiet): a statement
# in one may be waiting for a lock of the committing transaction.
QUIET_PATIENCE_S = 0.02
RESOLVE_RETRY_S = 1.0


class Hold:
    """A quiet hold (CommitCoordinator.quiet): ``kept`` unless it ended before its owner left
    it (it gave way to a commit, or ran out of time). ``early``: by the time the held
    statement went to the nodes after the lead (reach_others), it had ended and a commit may
    have landed since it began, so the nodes may run the statement on different rows."""

    __slots__ = ("_coordinator", "_landed", "_peers", "early", "kept")

    def __init__(self, coordinator: CommitCoordinator, peers: bool) -> None:
        self.kept = True
        self.early = False
        self._coordinator = coordinator
        self._landed = coordinator.landed  # this router's commits that began phase 2
        self._peers = peers  # (whose commits go on unseen once the quiet lock is given up)

    def reach_others(self) -> None:
        """The held statement is being sent to the nodes after the lead."""
        self.early = not self.kept and (self._peers or self._coordinator.landed != self._landed)


class CommitCoordinator:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.name = router.settings.name
        self.log = DecisionLog(router.store, self.name)
        # Transactions between PREPARE and the end of phase 2 in this process: never
        # touched by the resolver.
        self.in_flight: set[str] = set()
        self._epoch = int(time.time() * 1000)  # a restarted router never reuses an id
        self._seq = itertools.count(1)
        self._owner = f"{GID_PREFIX}{self.name}/"
        self._task: asyncio.Task[None] | None = None
        # Set once the resolver has looked at the nodes after start-up: a recovery's
        # snapshot must come after the transactions an earlier run left in doubt.
        self.resolved_once = asyncio.Event()
        self._active = 0  # sessions inside a commit slot
        self._barrier: asyncio.Event | None = None  # set when the barrier is released
        self._drained = Signal()  # no one is in a slot any more
        self._holds: dict[Hold, Callable[[], None]] = {}  # each quiet hold's give_way
        self._quiet_over = Signal()  # the last quiet hold ended
        self._waiting = 0  # sessions waiting for a slot until quiet holds end
        self._no_waiting = Signal()  # none waits any more
        self._impatience: asyncio.TimerHandle | None = None  # ends the holds (QUIET_PATIENCE_S)
        self._quiet_locks: dict[str, QuietLock] = {}  # by database (quiet.py)
        self.landed = 0  # commits that entered a slot (see Hold.reach_others)

    # -- the commit barrier ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def commit_slot(self) -> AsyncIterator[None]:
        """Around every point where a transaction becomes committed on some nodes and not yet
        on others (phase 2, one-phase commits): the barrier waits until no one is inside."""
        while self._barrier is not None or self._holds:
            if self._barrier is not None:
                await self._barrier.wait()
                continue
            # No new quiet hold begins while a commit waits (see quiet): no starving.
            if self._impatience is None:
                self._impatience = asyncio.get_running_loop().call_later(
                    QUIET_PATIENCE_S, self._end_holds
                )
            self._waiting += 1
            try:
                await self._quiet_over.wait()
            finally:
                self._waiting -= 1
                if not self._waiting:
                    if self._impatience is not None:
                        self._impatience.cancel()
                        self._impatience = None
                    self._no_waiting.fire()
        self._active += 1
        self.landed += 1
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._drained.fire()

    def _end_holds(self) -> None:
        """A commit waited QUIET_PATIENCE_S for the quiet holds: the statements in them may
        wait for its locks (on any node: concurrent holds need not take their locks in the
        same order everywhere), so they go on without their holds."""
        self._impatience = None
        for give_way in list(self._holds.values()):
            give_way()

    async def _wait_drained(self, timeout: float) -> None:
        """Until no one is inside a commit slot; TimeoutError after ``timeout``."""
        began = time.monotonic()
        while self._active:
            left = began + timeout - time.monotonic()
            await asyncio.wait_for(self._drained.wait(), max(left, 0.001))

    @contextlib.asynccontextmanager
    async def quiet(self, longest: float, database: str | None = None) -> AsyncIterator[Hold]:
        """No commit of this router is under way while inside (none in a slot), for
        ``longest`` seconds at most, and no longer than QUIET_PATIENCE_S after a commit
        began to wait: then commits go on again, and the hold is over (``Hold.kept`` turns
        False; it is False at once if the commits in flight did not end within ``longest``).

        For a statement whose effect depends on its snapshot: it runs on the lead, then on
        the others, and a commit in between would show on some of those snapshots only.
        Several sessions may be inside at once. No new hold begins while a commit waits
        for the holds to end, so a commit waits for one round of holds at most.

        With peers (other routers, or sibling workers), the hold also keeps their commits
        back, by the quiet lock of ``database`` on the lead (quiet.py).
        """
        lock = self._quiet_lock(database)
        hold = Hold(self, lock is not None)

        def leave() -> None:
            if self._holds.pop(hold, None) is not None and not self._holds:
                self._quiet_over.fire()

        def give_way() -> None:  # before its owner is done
            hold.kept = False
            leave()
            if lock is not None:
                lock.leave(hold)

        timer = asyncio.get_running_loop().call_later(longest, give_way)
        try:
            # The quiet lock first: a commit of this router that has prepared holds it
            # (shared) until its phase 2, which a hold within the router would keep waiting.
            if lock is not None and not await lock.take(hold, give_way):
                hold.kept = False
            while self._barrier is not None or self._waiting:
                if self._barrier is not None:
                    await self._barrier.wait()
                else:
                    await self._no_waiting.wait()  # the commits that wait for holds go first
            if hold.kept:
                self._holds[hold] = give_way
                try:
                    await self._wait_drained(longest)
                except TimeoutError:
                    give_way()  # (a commit in flight waits for a lock: maybe this session's)
            yield hold
        finally:
            timer.cancel()
            leave()
            if lock is not None:
                lock.leave(hold)

    def _quiet_lock(self, database: str | None) -> QuietLock | None:
        """The quiet lock of ``database``, when there are peers whose commits it holds."""
        if database is None or not self.router.settings.peers:
            return None
        lock = self._quiet_locks.get(database)
        if lock is None:
            lock = self._quiet_locks[database] = QuietLock(self.router, database)
        return lock

    @property
    def share_quiet_lock(self) -> bool:
        """Whether commits take the quiet lock (quiet.py): when there are peers."""
        return bool(self.router.settings.peers)

    @contextlib.asynccontextmanager
    async def barrier(self, timeout: float = 5.0) -> AsyncIterator[float]:
        """Hold new commits back and let those in flight finish: inside, every node holds
        the same committed transactions. Yields how long the draining took (seconds).

        TimeoutError if the commits in flight do not finish within ``timeout``: a one-phase
        commit in its slot may wait for a lock that a transaction held back by the barrier
        keeps, so the barrier gives way rather than wait for ever.
        """
        while self._barrier is not None:  # one barrier at a time
            await self._barrier.wait()
        self._barrier = asyncio.Event()
        began = time.monotonic()
        try:
            await self._wait_drained(timeout)
            yield time.monotonic() - began
        finally:
            released, self._barrier = self._barrier, None
            released.set()

    def new_gid(self) -> str:
        # PostgreSQL allows 200 bytes; a long router name is cut, the suffix keeps ids apart.
        return f"{self._owner[:150]}{self._epoch}.{next(self._seq)}"

    def owns(self, gid: str) -> bool:
        return gid.startswith(self._owner[:150]) and "/" not in gid[len(self._owner[:150]) :]

    # -- in-doubt resolution ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._resolve_forever())

    async def stop(self) -> None:
        task = self._task
        if task is not None:
            # Python 3.11's wait_for can swallow a cancel that races with its result, so
            # cancel until the task is really gone.
            for _ in range(20):
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    break
            with contextlib.suppress(asyncio.CancelledError, Exception):
                if task.done():
                    task.result()
        for lock in self._quiet_locks.values():
            lock.close()
        self.log.flush_forgotten()
        self.log.close()

    async def _resolve_forever(self) -> None:
        while True:
            complete = False
            try:
                complete = await self.resolve_in_doubt()
            except Exception:
                log.exception("resolving in-doubt transactions failed; retrying later")
            if complete:
                self.resolved_once.set()
            # Until one pass reached every ONLINE node, a recovery waits: try again soon.
            await asyncio.sleep(RESOLVE_INTERVAL_S if complete else RESOLVE_RETRY_S)

    async def resolve_in_doubt(self) -> bool:
        """Finish this router's prepared transactions that no session is working on; True
        if every ONLINE node was looked at."""
        self.log.flush_forgotten()
        started = time.time()
        prepared: set[str] = set()
        complete = True
        for st in self.router.cluster.online():
            try:
                await self._resolve_node(st.node, prepared)
            except (NodeLost, m.PgError, OSError) as e:
                complete = False
                log.warning("cannot resolve in-doubt transactions on node %s: %s", st.node.name, e)
        if complete:
            # Records of transactions finished everywhere (kept by a crash): no longer needed.
            self.router.store.prune_decisions(
                self.name, prepared | self.in_flight, started - 2 * self.log.keep_s
            )
        return complete

    async def _resolve_node(self, node: Node, prepared: set[str]) -> None:
        rows = await self._query(
            node, "postgres", "SELECT gid, database FROM pg_catalog.pg_prepared_xacts"
        )
        by_db: dict[str, list[str]] = defaultdict(list)
        for gid, database in rows:
            prepared.add(str(gid))
            owned = gid is not None and database is not None and self.owns(gid)
            if owned and gid not in self.in_flight:
                by_db[str(database)].append(str(gid))
        user, password = self.router.internal_credentials()
        for database, gids in by_db.items():
            decided = self.router.store.decided(gids)
            params = {"user": user, "database": database, "application_name": "pgquorum"}
            link = await Link.open(node, params, password)
            committed: list[str] = []
            sink: Sink | None = None
            async with self.router.write_gate.writer():
                try:
                    async with self.commit_slot():
                        sink = self.router.recovery_sink
                        await self._finish(link, node, database, gids, decided, committed)
                finally:
                    link.close()
                    if sink is not None and committed:
                        # (Asked outside the slot: a peer asks the coordinator.)
                        await failpoints.pause(failpoints.BEFORE_QUEUE_CHECK)
                        await self._check_queued(sink, committed)

    async def _check_queued(self, sink: Sink, committed: list[str]) -> None:
        """Committed after the recovery's snapshot, a transaction its queue does not have
        (its session died before queueing it) would be missing on the recovered node."""
        for gid in committed:
            if not await sink.holds(gid):
                self.router.queue_lost(
                    sink,
                    QueueUnavailable(
                        f"in-doubt transaction {gid} was committed after the recovery's "
                        "snapshot, outside its queue"
                    ),
                )
                return

    async def _finish(
        self,
        link: Link,
        node: Node,
        database: str,
        gids: list[str],
        decided: set[str],
        committed: list[str],
    ) -> None:
        """Commit or roll back in-doubt ``gids`` (inside a commit slot, so a recovery's
        snapshot is taken before or after, never during); those committed go to
        ``committed``."""
        for gid in gids:
            verb = "COMMIT" if gid in decided else "ROLLBACK"
            log.warning(
                "in-doubt transaction %s on node %s (database %s): %s PREPARED (%s)",
                gid,
                node.name,
                database,
                verb,
                "decision recorded" if gid in decided else "no decision",
            )
            try:  # one per query: COMMIT PREPARED refuses multi-statement strings
                await link.query(f"{verb} PREPARED {quote_literal(gid)}")
            except m.PgError as e:
                if e.sqlstate != "42704":  # already finished by someone else
                    raise
                continue
            if verb == "COMMIT":
                committed.append(gid)

    async def _query(self, node: Node, database: str, sql: str) -> list[list[str | None]]:
        """Run one statement on a node over a fresh connection of the router's own."""
        user, password = self.router.internal_credentials()
        params = {"user": user, "database": database, "application_name": "pgquorum"}
        return (await query(node, params, password, sql))[1]
