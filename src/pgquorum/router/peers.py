"""Peer routers in front of the same group: failures are told to every peer at once.

A router that fails a node sends ``FAIL NODE name REASON '...'`` to the admin console of
every peer, retrying with backoff until the peer acknowledges (or a recovery of the node
begins, which reaches every peer and supersedes the notice); the peer fails the node before
its sessions' next statement (and tells its own peers, which already know: a no-op). At
start-up a router asks its peers for their node states and takes over every FAILED node, so a
restarted router never resurrects a node another one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pgquorum.cluster.model import NodeState
from pgquorum.cluster.state import NodeStatus
from pgquorum.protocol.errors import OBJECT_NOT_IN_PREREQUISITE_STATE, UNDEFINED_OBJECT, PgError
from pgquorum.recovery.gate import StillOpen
from pgquorum.recovery.queue import RemoteQueue
from pgquorum.sql.quoting import quote_ident

from .backend import NodeLost
from .client import Link, admin_link, admin_query, console_literal

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 10.0
PULL_TIMEOUT_S = 3.0
# A node this router left RECOVERING waits on the peers' answer (is its recovery still
# running?): a peer that answered too slowly is asked again for this long, rather than the
# node failed (which would end a recovery that goes well). A peer that refuses is down.
PULL_PATIENCE_S = 20.0

# The admin console's own syntax (not SQL): a node name as quote_ident writes it, or bare.
NODE_NAME = r"""(?P<node>"(?:[^"]|"")+"|[\w.-]+)"""
# FAIL NODE name [REASON 'text']
FAIL_NODE = re.compile(
    rf"""^\s*FAIL\s+NODE\s+{NODE_NAME}"""
    r"""(?:\s+REASON\s+'(?P<reason>(?:[^']|'')*)')?\s*;?\s*$""",
    re.IGNORECASE | re.DOTALL,
)


def node_name(matched: str) -> str:
    """The name NODE_NAME matched, unquoted."""
    if matched.startswith('"'):
        return matched[1:-1].replace('""', '"')
    return matched


def parse_fail_node(sql: str) -> tuple[str, str] | None:
    """(node, reason) of a FAIL NODE command, or None if ``sql`` is something else."""
    match = FAIL_NODE.match(sql)
    if match is None:
        return None
    return node_name(match["node"]), (match["reason"] or "").replace("''", "'")


def fail_node_command(node: str, reason: str) -> str:
    return f"FAIL NODE {quote_ident(node)} REASON {console_literal(reason)}"


class PeerRecoveries:
    def __init__(self) -> None:
        self.online: set[str] = set()  # nodes some peer has ONLINE
        self.running: dict[str, tuple[str, str, int]] = {}  # node -> (recovery, peer address)


class Peers:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.addresses = router.settings.peers
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0  # acknowledged notifications, for tests and SHOW

    async def start(self) -> None:
        if not self.addresses:
            self._settle_recovering(PeerRecoveries())
            return
        await self.pull()
        self.router.cluster.on_change(self._changed)
        # Tell the peers what this router already knew (it may have failed a node while
        # they were down): FAIL NODE of a node already FAILED is a no-op for them.
        for st in self.router.cluster.status.values():
            if st.state is NodeState.FAILED:
                self._changed(st)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def pull(self) -> None:
        """Take over the FAILED nodes the peers know of (those that answer in time), and
        settle the nodes this router left RECOVERING when it stopped."""
        seen = PeerRecoveries()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + PULL_PATIENCE_S
        ask = list(self.addresses)
        while True:
            results = await asyncio.gather(
                *(self._pull_one(host, port, seen) for host, port in ask),
                return_exceptions=True,
            )
            slow = []
            for (host, port), res in zip(ask, results, strict=True):
                if isinstance(res, BaseException):
                    log.warning("peer %s:%d did not tell its node states: %s", host, port, res)
                    if isinstance(res, TimeoutError):
                        slow.append((host, port))
            if not slow or not self._unsettled(seen) or loop.time() >= give_up:
                break
            log.warning("asking %d slow peer(s) again: a node left RECOVERING waits", len(slow))
            ask = slow
        self._settle_recovering(seen)

    def _unsettled(self, seen: PeerRecoveries) -> bool:
        """A node this router left RECOVERING whose recovery, run by a peer, no peer that
        answered knows of."""
        return any(
            st.state is NodeState.RECOVERING
            and st.node.name not in seen.running
            and st.node.name not in seen.online
            and not self._own_recovery(st)
            for st in self.router.cluster.status.values()
        )

    def _own_recovery(self, st: NodeStatus) -> bool:
        # (The reason of a RECOVERING node names the recovery, and the recovery its router.)
        return st.reason.startswith(f"recovery {self.router.settings.name}/")

    async def _pull_one(self, host: str, port: int, seen: PeerRecoveries) -> None:
        user, password = self.router.internal_credentials()

        async def ask(command: str) -> tuple[list[str], list[list[str | None]]]:
            # The connection's own timeout is longer: a slow peer is a TimeoutError here.
            return await asyncio.wait_for(
                admin_query(host, port, user, password, command, timeout=PULL_TIMEOUT_S + 1),
                PULL_TIMEOUT_S,
            )

        cols, rows = await ask("SHOW NODES")
        name_at, state_at, reason_at = cols.index("name"), cols.index("state"), cols.index("reason")
        cluster = self.router.cluster
        for row in rows:
            name, state = row[name_at], row[state_at]
            if name in cluster.status and state == NodeState.FAILED.value:
                cluster.mark_failed(name, f"failed by peer {host}:{port}: {row[reason_at]}")
            elif name is not None and state == NodeState.ONLINE.value:
                seen.online.add(name)
        cols, rows = await ask("SHOW RECOVERY")
        for row in rows:
            info = dict(zip(cols, row, strict=True))
            if info["phase"] not in ("done", "failed") and info["node"] and info["recovery"]:
                seen.running[info["node"]] = (info["recovery"], host, port)

    def _settle_recovering(self, seen: PeerRecoveries) -> None:
        """A node this router left RECOVERING: join the recovery a peer still runs (queue
        its commits there), take ONLINE if it ended meanwhile, else it is FAILED again."""
        router = self.router
        for st in list(router.cluster.status.values()):
            if st.state is not NodeState.RECOVERING:
                continue
            name = st.node.name
            running = seen.running.get(name)
            if running is not None:
                rid, host, port = running
                router.recovery_sink = RemoteQueue(
                    rid, name, (host, port), router.internal_credentials()
                )
                log.warning("node %s: joining recovery %s run by peer %s:%d", name, *running)
            elif name in seen.online:
                router.cluster.mark_online(name, "recovered while this router was down")
            else:
                # This router ran the recovery: resume it, or begin it again from a fresh
                # snapshot.
                # (Straight from RECOVERING: a FAILED state would travel to the peers and
                # back, and end the new recovery.)
                if self._own_recovery(st):
                    router.resume_recovery(name, st.reason)
                else:
                    router.cluster.mark_failed(
                        name, "its recovery was interrupted by a router restart; recover it again"
                    )

    def _changed(self, st: NodeStatus) -> None:
        if st.state is not NodeState.FAILED:
            return
        name = st.node.name
        command = fail_node_command(name, st.reason)
        loop = asyncio.get_running_loop()
        for host, port in self.addresses:
            task = loop.create_task(self._notify(host, port, name, command))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _notify(self, host: str, port: int, node: str, command: str) -> None:
        delay = RETRY_FIRST_S
        user, password = self.router.internal_credentials()
        status = self.router.cluster.status
        # Until the peer takes it, or the node is no longer FAILED here: a recovery of it
        # began (it reached every peer first), and a notice arriving after would fail the
        # recovered node again.
        while (st := status.get(node)) is not None and st.state is NodeState.FAILED:
            try:
                await admin_query(host, port, user, password, command, timeout=5)
                self.sent += 1
                return
            except (NodeLost, PgError, OSError, TimeoutError) as e:
                if isinstance(e, PgError) and e.sqlstate == UNDEFINED_OBJECT:
                    log.info("peer %s:%d has no such node: %s", host, port, e.message)
                    return  # a node it never had: nothing to fail
                log.warning("peer %s:%d not told yet (%s); retrying in %.1fs", host, port, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def tell(self, command: str, *, strict: bool = True) -> None:
        """An admin command to every peer, now. ``strict``: each must take it (else PgError);
        otherwise a peer that cannot is passed over."""
        user, password = self.router.internal_credentials()
        for host, port in self.addresses:
            try:
                await admin_query(host, port, user, password, command, timeout=10)
            except (NodeLost, PgError, OSError, TimeoutError) as e:
                if strict:
                    raise PgError(
                        OBJECT_NOT_IN_PREREQUISITE_STATE,
                        f"peer router {host}:{port} did not take "
                        f"{command.removesuffix(' FROM PEER')}: {e}",
                    ) from None
                log.warning("peer %s:%d did not take %r: %s", host, port, command, e)


class Held(list[tuple[Link, str]]):
    """The peers' admin links under a hold (with the host each was reached at)."""

    drained = 0.0  # the longest any router took to drain (seconds)


@contextlib.asynccontextmanager
async def hold_everywhere(router: Router, what: str, timeout: float = 5.0) -> AsyncIterator[Held]:
    """HOLD COMMITS (or WRITES) on every peer, then on this router; yields the peers' admin
    links, open for more commands until released.

    PgError if a router cannot hold its commits (a peer may still be committing); StillOpen
    if a write gate found transactions still open after ``timeout``, or a peer cannot hold
    its writes now (with no sessions named: the caller just tries again later).
    """
    user, password = router.internal_credentials()
    held = Held()
    done = False
    try:
        for host, port in router.settings.peers:
            try:
                link = await admin_link(host, port, user, password)
                held.append((link, host))
                _, rows = await link.query(f"HOLD {what}")
            except (PgError, NodeLost, OSError, TimeoutError) as e:
                if what == "WRITES":
                    # Transactions still open there, or the peer is restarting (it finds the
                    # recovery when it starts): try again later rather than give up.
                    log.info("peer %s:%d cannot hold writes yet: %s", host, port, e)
                    raise StillOpen([]) from None
                raise PgError(
                    OBJECT_NOT_IN_PREREQUISITE_STATE,
                    f"cannot hold the commits of peer router {host}:{port}: {e}",
                ) from None
            held.drained = max(held.drained, float(rows[0][1] or 0) / 1000 if rows else 0.0)
        async with contextlib.AsyncExitStack() as stack:
            try:
                if what == "COMMITS":
                    took = await stack.enter_async_context(router.commits.barrier())
                else:
                    took = await stack.enter_async_context(router.write_gate.hold(timeout))
                    await router.flush_sink()
            except StillOpen:
                raise
            except TimeoutError:
                raise no_quiet_point(what) from None
            held.drained = max(held.drained, took)
            yield held
            done = True
    finally:
        lapsed = []
        for link, host in held:
            try:
                await link.query(f"RELEASE {what}")
            except Exception as e:  # a hold lapses after HOLD_MAX_S, ending its connection
                lapsed.append(f"{host} ({e})")
            link.close()
    if done and lapsed and what == "COMMITS":
        # What ran under the hold (a snapshot, VERIFY's cut) may not have been quiet there.
        # (Under a write hold every step talks to the peers, and the first one after a
        # lapse fails: one that lapses after the node joined changes nothing.)
        raise PgError(
            OBJECT_NOT_IN_PREREQUISITE_STATE,
            f"the {what.lower()} of peer router {', '.join(lapsed)} were let go before "
            "the end of the hold",
        )


def no_quiet_point(what: str = "COMMITS") -> PgError:
    """A router's commits (or writes) could not be held in time."""
    if what == "WRITES":
        return PgError(
            OBJECT_NOT_IN_PREREQUISITE_STATE,
            "cannot hold writes: transactions that wrote are still open",
        )
    return PgError(
        OBJECT_NOT_IN_PREREQUISITE_STATE,
        "cannot hold commits: the commits in flight did not finish in time",
        hint="Try again; a long one-phase commit (or a lock it waits for) was in the way.",
    )
