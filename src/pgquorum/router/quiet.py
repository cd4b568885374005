"""The quiet lock: quiet holds that keep back the commits of every router, not only this one's.

A quiet hold (CommitCoordinator.quiet) keeps this router's commits back while a statement
runs on the lead and then on the others, so that each node's snapshot holds the same commits.
Peer routers (and the sibling workers of this one) commit without asking this router, so the
hold also takes a PostgreSQL advisory lock on the lead, in the statement's database:

- every two-phase commit takes the lock SHARED on the lead before its PREPARE TRANSACTION;
  the prepared transaction keeps it until its COMMIT PREPARED on the lead, which is the last
  node to commit (session.py, _phase_two). So while someone holds it EXCLUSIVE, no commit
  lands on any node, and none is half done;
- a router's quiet holds in a database share one EXCLUSIVE hold of the lock, taken on a
  connection of the router's own (not the held statement's: the statement may wait for a
  lock of a committing transaction, which waits for this one; held apart, the two never
  wait for each other inside PostgreSQL, so no deadlock detector is needed to part them).

As within one router, a hold gives way: the lock is given up when a commit has waited for it
about QUIET_PATIENCE_S (seen in pg_locks), and not taken when it cannot be had within
TAKE_TIMEOUT_MS (a commit in flight that waits for a lock, such as one left in doubt by a
router that died). The statement then runs unprotected, as a hold that gave way within the
router does. Holds of different routers take turns: while a peer's hold waits for the lock,
no new hold joins the one this router keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m
from pgquorum.protocol.errors import PgError

from .backend import NodeLost
from .client import Link
from .signals import Signal

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger(__name__)

# The advisory lock's key (the two-int4 form, apart from the one-bigint keys applications
# usually take): "pgqu", 1.
KEY = (0x70677175, 1)
TAKE_TIMEOUT_MS = 200  # the lock_timeout of the router's own connection that takes it
# How often the lock's holder looks for commits (and peers' holds) waiting for it: a commit
# seen waiting twice in a row ends the holds (it waited about QUIET_PATIENCE_S).
WATCH_S = 0.01

# What a commit sends to the lead before its PREPARE TRANSACTION (its answer swallowed),
# one statement: the client's lock_timeout must not fail the commit for this short wait
# (set for the transaction, which ends with the PREPARE).
SHARE = m.encode_query(
    "SELECT pg_catalog.set_config('lock_timeout', '0', true), "
    f"pg_catalog.pg_advisory_xact_lock_shared({KEY[0]}, {KEY[1]})"
)
_TAKE = f"SELECT pg_catalog.pg_advisory_lock({KEY[0]}, {KEY[1]})"
_GIVE = f"SELECT pg_catalog.pg_advisory_unlock({KEY[0]}, {KEY[1]})"
_WAITING = (
    "SELECT count(*) FILTER (WHERE mode = 'ShareLock'), count(*) FILTER (WHERE mode <> "
    "'ShareLock') FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND NOT granted "
    f"AND classid = {KEY[0]} AND objid = {KEY[1]} AND objsubid = 2 "
    "AND database = (SELECT oid FROM pg_catalog.pg_database "
    "WHERE datname = pg_catalog.current_database())"
)


class QuietLock:
    """The quiet lock of one database, as this router holds it for its quiet holds."""

    def __init__(self, router: Router, database: str) -> None:
        self.router = router
        self.database = database
        self._link: Link | None = None
        self._node: Node | None = None  # the lead the link goes to
        self._held = False
        # The holds that count on the lock, each with what ends it early (give_way).
        self._users: dict[object, Callable[[], None]] = {}
        self._mutex = asyncio.Lock()  # one query at a time on the link
        self._watch: asyncio.Task[None] | None = None
        self._giving: asyncio.Task[None] | None = None
        # Set while a peer's hold waits for the lock: no hold of this router joins the one
        # it holds (they would keep it for ever); they take it again after the peer's.
        self._yielding = False
        self._given = Signal()  # the lock was given up

    async def take(self, hold: object, give_way: Callable[[], None]) -> bool:
        """Hold the lock for ``hold`` (with the router's other holds in this database).
        False if it could not be had: the hold goes on unprotected from the peers."""
        while self._yielding:
            await self._given.wait()
        async with self._mutex:
            if not self._held:
                try:
                    link = await self._open()
                    await link.query(_TAKE)
                except PgError as e:
                    # Most often 55P03: a commit in flight waits for a lock, maybe of the
                    # statement's own transaction, or a peer's hold lasts.
                    log.debug("quiet lock in %s not taken: %s", self.database, e.message)
                    return False
                except (NodeLost, OSError, TimeoutError) as e:
                    log.warning("quiet lock in %s: %s", self.database, e)
                    self._drop_link()
                    return False
                self._held = True
                self._watch = asyncio.get_running_loop().create_task(self._watch_waiters())
            self._users[hold] = give_way
            return True

    def leave(self, hold: object) -> None:
        """``hold`` is over (or gave way): the last one out gives the lock up."""
        if self._users.pop(hold, None) is not None and not self._users:
            # (kept: the loop holds its tasks weakly)
            self._giving = asyncio.get_running_loop().create_task(self._give())

    async def _give(self) -> None:
        async with self._mutex:
            if not self._held or self._users:  # (taken again meanwhile)
                return
            self._given_up()
            try:
                assert self._link is not None
                await self._link.query(_GIVE)
            except (PgError, NodeLost, OSError, TimeoutError) as e:
                # Closing the connection gives the lock up, too.
                log.warning("quiet lock in %s: %s", self.database, e)
                self._drop_link()

    async def _watch_waiters(self) -> None:
        """While held: a commit (of any router) that waits for the lock ends the holds; a
        peer's hold that waits for it keeps new holds of this router from joining."""
        seen = 0  # polls in a row that saw a commit waiting
        while True:
            await asyncio.sleep(WATCH_S)
            async with self._mutex:
                if not self._held or self._link is None:
                    return
                try:
                    _, rows = await self._link.query(_WAITING)
                    commits, holds = (int(x or 0) for x in rows[0])
                except (PgError, NodeLost, OSError, TimeoutError, ValueError) as e:
                    log.warning("quiet lock in %s: %s", self.database, e)
                    commits, holds, seen = 1, 0, 1  # (unknown: give way now)
            self._yielding = self._yielding or holds > 0
            seen = seen + 1 if commits else 0
            if seen >= 2:
                for give_way in list(self._users.values()):
                    give_way()  # (each leaves: the last one gives the lock up)
                return

    async def _open(self) -> Link:
        lead = self.router.cluster.lead()
        if lead is None:
            raise NodeLost(Node("lead", "", 0), "no ONLINE node")
        if self._link is not None and (self._node is not lead.node or self._link.conn.lost):
            self._drop_link()
        if self._link is None:
            user, password = self.router.internal_credentials()
            params = {
                "user": user,
                "database": self.database,
                "application_name": "pgquorum quiet lock",
                "options": f"-c lock_timeout={TAKE_TIMEOUT_MS}",
            }
            self._link = await Link.open(lead.node, params, password, timeout=5)
            self._node = lead.node
        return self._link

    def _given_up(self) -> None:
        """The lock is no longer held (or about to be given up): wake the holds that
        waited for a peer's turn."""
        self._held = False
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._yielding = False
        self._given.fire()

    def _drop_link(self) -> None:
        """Close the link: the server gives the lock up with it."""
        if self._link is not None:
            self._link.close()
            self._link = None
        self._given_up()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._drop_link()
