"""The durable state database: node states and their history, and commit decisions.

An embedded SQLite file (WAL mode). Node state changes are rare and written at once; commit
decisions are frequent, so :class:`DecisionLog` writes them in groups: every decision that
arrives while one batch is being made durable goes into the next batch, one fsync for all.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .model import Node, NodeState

_SCHEMA = """
create table if not exists nodes(
    grp text not null, name text not null, state text not null,
    reason text not null default '', since real not null,
    primary key (grp, name));
create table if not exists events(
    id integer primary key autoincrement, at real not null, grp text not null,
    node text not null, state text not null, reason text not null, router text not null);
create table if not exists members(
    grp text not null, name text not null, host text not null, port integer not null,
    removed integer not null default 0,
    primary key (grp, name));
create table if not exists decisions(
    gid text primary key, router text not null, at real not null);
"""


@dataclass(frozen=True, slots=True)
class StoredState:
    state: NodeState
    reason: str
    since: float


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    group: str
    node: str
    state: NodeState
    reason: str
    router: str


class StateStore:
    """One SQLite database, shared by the threads of one router (and by routers on one host)."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = str(path) if path is not None else ":memory:"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("pragma journal_mode=wal")
            # A decision must survive a power loss, not only a router crash.
            self._db.execute("pragma synchronous=full")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- node states ------------------------------------------------------------------------

    def node_states(self, group: str) -> dict[str, StoredState]:
        with self._lock:
            rows = self._db.execute(
                "select name, state, reason, since from nodes where grp = ?", (group,)
            ).fetchall()
        return {name: StoredState(NodeState(st), reason, since) for name, st, reason, since in rows}

    def set_state(self, group: str, node: str, state: NodeState, reason: str, router: str) -> float:
        """Record a node's new state and the event, in one transaction; returns its time."""
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("begin immediate")
            try:
                db.execute(
                    "insert into nodes(grp, name, state, reason, since) values (?, ?, ?, ?, ?) "
                    "on conflict(grp, name) do update set state = excluded.state, "
                    "reason = excluded.reason, since = excluded.since",
                    (group, node, state.value, reason, now),
                )
                db.execute(
                    "insert into events(at, grp, node, state, reason, router) "
                    "values (?, ?, ?, ?, ?, ?)",
                    (now, group, node, state.value, reason, router),
                )
                db.execute("commit")
            except BaseException:
                db.execute("rollback")
                raise
        return now

    def set_member(self, group: str, node: Node, *, removed: bool = False) -> None:
        """A node added to the group at run time (ADD NODE), or taken out (REMOVE NODE):
        the configuration file's list of nodes, amended."""
        with self._lock:
            self._db.execute(
                "insert into members(grp, name, host, port, removed) values (?, ?, ?, ?, ?) "
                "on conflict(grp, name) do update set host = excluded.host, "
                "port = excluded.port, removed = excluded.removed",
                (group, node.name, node.host, node.port, int(removed)),
            )

    def members(self, group: str) -> tuple[list[Node], set[str]]:
        """Nodes added at run time, and names removed."""
        with self._lock:
            rows = self._db.execute(
                "select name, host, port, removed from members where grp = ? order by rowid",
                (group,),
            ).fetchall()
        added = [Node(name, host, int(port)) for name, host, port, removed in rows if not removed]
        return added, {name for name, _, _, removed in rows if removed}

    def events(self, limit: int = 100) -> list[Event]:
        """The latest state changes, newest first."""
        with self._lock:
            rows = self._db.execute(
                "select at, grp, node, state, reason, router from events order by id desc limit ?",
                (limit,),
            ).fetchall()
        return [Event(at, g, n, NodeState(s), r, rt) for at, g, n, s, r, rt in rows]

    # -- commit decisions -------------------------------------------------------------------

    def write_decisions(self, router: str, record: list[str], forget: list[str]) -> None:
        """Make ``record`` durable and drop ``forget`` (finished), in one transaction."""
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("begin immediate")
            try:
                if forget:
                    db.executemany("delete from decisions where gid = ?", ((g,) for g in forget))
                if record:
                    db.executemany(
                        "insert or ignore into decisions(gid, router, at) values (?, ?, ?)",
                        ((g, router, now) for g in record),
                    )
                db.execute("commit")
            except BaseException:
                db.execute("rollback")
                raise

    def decided(self, gids: list[str]) -> set[str]:
        """Which of ``gids`` have a recorded commit decision."""
        if not gids:
            return set()
        with self._lock:
            found: set[str] = set()
            for i in range(0, len(gids), 500):
                chunk = gids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"select gid from decisions where gid in ({marks})", chunk
                ).fetchall()
                found.update(r[0] for r in rows)
        return found

    def prune_decisions(self, router: str, keep: set[str], older_than: float) -> int:
        """Drop this router's decisions recorded before ``older_than`` (epoch seconds) whose
        transaction is no longer prepared anywhere (``keep``: the ids still prepared)."""
        with self._lock:
            rows = self._db.execute(
                "select gid from decisions where router = ? and at < ?", (router, older_than)
            ).fetchall()
            drop = [(g,) for (g,) in rows if g not in keep]
            if drop:
                self._db.execute("begin immediate")
                self._db.executemany("delete from decisions where gid = ?", drop)
                self._db.execute("commit")
        return len(drop)

    def decisions(self, router: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "select gid from decisions where router = ?", (router,)
            ).fetchall()
        return [r[0] for r in rows]


class DecisionLog:
    """Group commit of commit decisions on a thread of its own.

    ``await record(gid)`` returns once the decision is durable. Decisions that arrive while
    a batch is being written wait for the next batch, so a burst of commits pays for one
    fsync. ``forget(gid)`` (after phase 2 finished everywhere) drops the record with a later
    batch, once ``keep_s`` have passed, so that a resolver that listed the transaction as
    prepared just before phase 2 finished still finds it decided. A record left behind by a
    crash is harmless (the resolver prunes old ones).
    """

    keep_s = 30.0

    def __init__(self, store: StateStore, router: str) -> None:
        self.store = store
        self.router = router
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._forget: deque[tuple[float, str]] = deque()
        self._writing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pgquorum-decisions")

    async def record(self, gid: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((gid, fut))
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._write_batches())
        await fut

    def forget(self, gid: str) -> None:
        self._forget.append((time.monotonic() + self.keep_s, gid))
        if len(self._forget) >= 1000 and not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._write_batches())

    def _due(self) -> list[str]:
        now = time.monotonic()
        due = []
        while self._forget and self._forget[0][0] <= now:
            due.append(self._forget.popleft()[1])
        return due

    async def _write_batches(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                forget = self._due()
                gids = [g for g, _ in batch]
                try:
                    await loop.run_in_executor(
                        self._executor, self.store.write_decisions, self.router, gids, forget
                    )
                except Exception as e:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._writing = False

    def flush_forgotten(self) -> None:
        """Drop the finished decisions that are due (from the periodic resolver)."""
        forget = self._due()
        if forget:
            self.store.write_decisions(self.router, [], forget)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
