"""The router process: listens for clients, owns the cluster view and the shared caches."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
import time
from pathlib import Path

from pgquorum.cluster.model import Node, NodeState
from pgquorum.cluster.state import ClusterView
from pgquorum.cluster.store import StateStore
from pgquorum.config import Config, RouterSettings
from pgquorum.protocol import messages as m
from pgquorum.protocol.auth import UserSecret, load_users
from pgquorum.protocol.errors import (
    DUPLICATE_OBJECT,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    UNDEFINED_OBJECT,
    PgError,
)
from pgquorum.recovery import resume
from pgquorum.recovery.coordinator import Recovery
from pgquorum.recovery.gate import WriteGate
from pgquorum.recovery.queue import QueueGone, QueueUnavailable, Sink
from pgquorum.sql.analyze import Analyzer
from pgquorum.sql.catalog import FunctionCatalog, TableCatalog
from pgquorum.sql.quoting import quote_ident

from .admin import AdminConsole
from .client import console_literal, send_cancel
from .commit import CommitCoordinator
from .peers import Peers
from .sequences import SequenceAllocator
from .session import ClientSession

log = logging.getLogger(__name__)

# While the router works for a session, the session's other connections wait idle, maybe in
# its transaction: an empty query this often resets the nodes' idle timeouts.
KEEPALIVE_S = 1.0


class Followers:
    """The units the other nodes run in the order a lead gave them, counted per lead.

    Lead-first execution keeps every node's lock order the lead's. When the lead fails, units
    it ordered may still be running on the others; a unit that started on the new lead at
    the same time could take its locks in another order there, and the two could wait for
    each other across nodes, where no PostgreSQL sees the cycle. So a unit waits, before its
    lead phase, until no unit ordered by another lead is still running anywhere.
    """

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self._changed = asyncio.Event()

    def begin(self, lead: str) -> None:
        self.running[lead] = self.running.get(lead, 0) + 1

    def end(self, lead: str) -> None:
        left = self.running[lead] - 1
        if left:
            self.running[lead] = left
        else:
            del self.running[lead]
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def others(self, lead: str) -> bool:
        """Units ordered by another lead still run (checked inline on the per-unit path:
        under load ``running`` is seldom empty, but it is seldom another lead's)."""
        running = self.running
        return bool(running) and (len(running) > 1 or lead not in running)

    async def settle(self, lead: str) -> None:
        while self.others(lead):
            await self._changed.wait()


class Router:
    """One pgquorum router in front of one group of nodes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings: RouterSettings = config.router
        self.store = StateStore(self.settings.state_db)
        self.cluster = ClusterView(config.group, self.store, self.settings.name)
        self.users: dict[str, UserSecret] = (
            load_users(self.settings.users_file) if self.settings.users_file else {}
        )
        self.analyzer = Analyzer()
        self._catalogs: dict[str, FunctionCatalog] = {}
        self.sessions: dict[int, ClientSession] = {}
        self.read_turn = 0  # round robin among equally loaded nodes
        self.admin = AdminConsole(self)
        self.ssl_ctx: ssl.SSLContext | None = None
        if self.settings.tls_cert and self.settings.tls_key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
            self.ssl_ctx = ctx
        self._server: asyncio.Server | None = None
        self._private: asyncio.Server | None = None  # a worker's socket for its siblings
        self._ticker: asyncio.TimerHandle | None = None  # see _tick
        self.commits = CommitCoordinator(self)
        self.followers = Followers()
        self.sequences = SequenceAllocator(self)
        self._tables: dict[str, TableCatalog] = {}
        self.peers = Peers(self)
        # Online recovery (pgquorum.recovery): where commits are queued while a node
        # recovers, the pause in which it joins, and the recovery this router runs.
        self.recovery_sink: Sink | None = None
        self.write_gate = WriteGate(lambda: self.sessions.values())
        self.recovery: Recovery | None = None

    def _no_recovery_running(self) -> None:
        if self.recovery is not None and self.recovery.running:
            raise PgError(
                OBJECT_NOT_IN_PREREQUISITE_STATE,
                f"node {self.recovery.node} is being recovered; one recovery at a time",
            )

    def start_recovery(self, node: str, *, again: bool = False) -> Recovery:
        """RECOVER NODE: rebuild a FAILED node while clients go on (recovery/coordinator).
        ``again``: a recovery this router ran before it restarted, begun anew."""
        cluster = self.cluster
        if node not in cluster.status:
            raise PgError(UNDEFINED_OBJECT, f"no node {node!r} in group {cluster.group.name!r}")
        self._no_recovery_running()
        cluster.refresh()
        state = cluster.status[node].state
        if state is not NodeState.FAILED and not (again and state is NodeState.RECOVERING):
            raise PgError(
                OBJECT_NOT_IN_PREREQUISITE_STATE,
                f"node {node} is {state.value}; only a FAILED node can be recovered",
                hint=f"FAIL NODE {node} first to rebuild it anyway."
                if state is NodeState.ONLINE
                else None,
            )
        self.recovery = Recovery(self, node)
        self.recovery.start()
        return self.recovery

    def resume_recovery(self, node: str, reason: str) -> Recovery:
        """A recovery this router ran when it stopped (``reason``: the node's, RECOVERING):
        taken up from its queue's log where the node is, or else begun again."""
        path = self.queue_log_path()
        rid = reason.split()[1] if reason.startswith("recovery ") else ""
        if path is not None and rid:
            try:
                resumable = resume.load(path, rid, node)
            except resume.Unresumable as e:
                log.warning("node %s: recovery %s cannot be resumed: %s", node, rid, e)
            else:
                self.recovery = Recovery(self, node, resumable)
                # Queueing goes on at once: the peers send again what they could not.
                self.recovery_sink = resumable.queue
                self.recovery.start()
                return self.recovery
        log.warning("node %s: beginning its interrupted recovery again", node)
        return self.start_recovery(node, again=True)

    def queue_log_path(self) -> Path | None:
        """Where this router keeps the queue of the recovery it runs (recovery/queue_log.py):
        beside its state database, one file per router name."""
        state_db = self.settings.state_db
        if state_db is None:
            return None
        name = self.settings.name.replace("/", "_")
        return state_db.with_name(f"{state_db.name}.{name}.recovery-queue")

    async def add_node(self, node: Node, *, from_peer: bool = False) -> None:
        """ADD NODE: a new member joins through the recovery path (an empty server is
        filled from a snapshot of the group). Peers are told first, so they queue for it."""
        cluster = self.cluster
        known = next((n for n in cluster.group.nodes if n.name == node.name), None)
        if known is not None:
            if from_peer and known == node:
                return
            raise PgError(DUPLICATE_OBJECT, f"node {node.name!r} is already in the group")
        if not from_peer:  # checked before the node is added, not by start_recovery after
            self._no_recovery_running()
        cluster.add_node(node, "new node: joins the group by recovery")
        if from_peer:
            return
        try:
            await self.peers.tell(
                f"ADD NODE {quote_ident(node.name)} {console_literal(node.host)} {node.port} "
                "FROM PEER"
            )
            self.start_recovery(node.name)  # (a RECOVER NODE may have begun meanwhile)
        except PgError:
            # Nothing half done: the node leaves the group again, here and at the peers
            # that took it (a recovery needs every router to queue for it anyway).
            cluster.remove_node(node.name)
            await self.peers.tell(f"REMOVE NODE {quote_ident(node.name)} FROM PEER", strict=False)
            raise

    async def remove_node(self, name: str, *, from_peer: bool = False) -> None:
        """REMOVE NODE: take a node out of the group for good."""
        cluster = self.cluster
        if name not in cluster.status or cluster.status[name].node not in cluster.group.nodes:
            if from_peer:
                return
            raise PgError(UNDEFINED_OBJECT, f"no node {name!r} in group {cluster.group.name!r}")
        recovery = self.recovery
        if recovery is not None and recovery.running and recovery.node == name:
            raise PgError(OBJECT_NOT_IN_PREREQUISITE_STATE, f"node {name} is being recovered")
        others = [st for st in cluster.online() if st.node.name != name]
        if not others and not from_peer:
            raise PgError(
                OBJECT_NOT_IN_PREREQUISITE_STATE,
                f"node {name} is the last ONLINE node of the group; it cannot be removed",
            )
        cluster.remove_node(name)
        if not from_peer:
            await self.peers.tell(f"REMOVE NODE {quote_ident(name)} FROM PEER")

    def queue_lost(self, sink: Sink, error: Exception) -> None:
        """The recovery queue cannot take a commit: that recovery cannot succeed any more.
        If it no longer runs at all (QueueGone), nothing it replays misses the commit: the
        node stays RECOVERING, for the coordinator to begin again or settle."""
        if self.recovery_sink is sink:
            self.recovery_sink = None
            sink.close()
            recovery = self.recovery
            if recovery is not None and recovery.queue is sink and recovery.resumed is not None:
                # Not resumed yet: it begins again instead, from a snapshot that has what
                # the queue lacks (a transaction the resolver committed, say).
                recovery.lost_while_resuming = f"its queue was lost: {error}"
                log.warning("node %s: %s", sink.node, recovery.lost_while_resuming)
            elif isinstance(error, QueueGone):
                log.warning("node %s: recovery %s no longer queues: %s", sink.node, sink.rid, error)
            else:
                self.cluster.mark_failed(sink.node, f"the recovery queue was lost: {error}")

    async def flush_sink(self) -> None:
        sink = self.recovery_sink
        if sink is not None:
            try:
                await sink.flush()
            except QueueUnavailable as e:
                self.queue_lost(sink, e)

    def address_for_peer(self, peer_host: str) -> tuple[str, int]:
        """Where a peer reached at ``peer_host`` can reach this router's admin console."""
        settings = self.settings
        if peer_host.startswith("/") and settings.private_dir is not None:
            return str(settings.private_dir), settings.listen_port  # a sibling worker
        host = settings.listen_host
        if host in ("", "0.0.0.0", "::", "*"):
            host = socket.gethostname()
        return host, settings.listen_port or self.port

    def credentials(self, client_user: str) -> tuple[str, str | None]:
        """The user and password the router logs in to nodes with, for a client's user."""
        settings = self.settings
        user = settings.backend_user or client_user
        secret = self.users.get(user)
        password = secret.password if secret and secret.password else settings.backend_password
        return user, password

    def internal_credentials(self) -> tuple[str, str | None]:
        """For the router's own work (resolving prepared transactions needs a superuser or
        the user who prepared them): the backend user, else postgres."""
        return self.credentials("postgres")

    def tables(self, database: str) -> TableCatalog:
        cat = self._tables.get(database)
        if cat is None:
            cat = self._tables[database] = TableCatalog()
        return cat

    def catalog(self, database: str) -> FunctionCatalog:
        cat = self._catalogs.get(database)
        if cat is None:
            cat = self._catalogs[database] = FunctionCatalog()
        return cat

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        await self.peers.start()  # learn the nodes peers failed before serving anyone
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientSession(self),
            self.settings.listen_host,
            self.settings.listen_port,
            reuse_address=True,
            reuse_port=self.settings.workers > 1,
            backlog=1024,
        )
        if self.settings.private_dir is not None:
            # Siblings reach this worker here (router/workers.py): FAIL NODE and cancels.
            path = self.settings.private_dir / f".s.PGSQL.{self.settings.listen_port}"
            path.unlink(missing_ok=True)
            self._private = await loop.create_unix_server(
                lambda: ClientSession(self, private=True), str(path)
            )
        self.commits.start()  # resolves what an earlier run left in doubt, then periodically
        self._ticker = loop.call_later(KEEPALIVE_S, self._tick)
        log.info(
            "router %s listening on %s:%d in front of group %s (%s)",
            self.settings.name,
            self.settings.listen_host,
            self.port,
            self.cluster.group.name,
            ", ".join(n.address for n in self.cluster.group.nodes),
        )

    def _tick(self) -> None:
        """Pings for the idle connections of the sessions the router works for
        (ClientSession.keep_alive), and a look at nodes that run a statement much longer
        than their lead did (ClientSession.look_for_cross_waits): one timer for all, not one
        per statement."""
        now = time.monotonic()
        for s in self.sessions.values():
            s.keep_alive()
            s.look_for_cross_waits(now)
        self._ticker = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._tick)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        recovery = self.recovery
        if recovery is not None and recovery.task is not None:
            recovery.task.cancel()
            await asyncio.wait({recovery.task}, timeout=5)
        if self.recovery_sink is not None:
            self.recovery_sink.close()
        if self._private is not None:
            self._private.close()
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions.values()):
            if s.transport is not None:
                s.write(m.encode_error(_shutdown_error()))
                s.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
        await self.peers.stop()
        await self.commits.stop()
        self.store.close()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    def new_cancel_key(self) -> tuple[int, int]:
        while True:
            pid = secrets.randbits(31) or 1
            if pid not in self.sessions:
                return pid, secrets.randbits(31)

    async def cancel(self, pid: int, secret: int, *, forward: bool = True) -> None:
        """Cancel whatever the session with this key runs, on every node it uses."""
        log.debug("cancel request for session key %d", pid)
        session = self.sessions.get(pid)
        if session is None:
            if forward and self.settings.private_dir is not None:
                # The kernel gave the request to this worker; the session may be a sibling's.
                await asyncio.gather(
                    *(
                        send_cancel(Node("worker", host, port), pid, secret)
                        for host, port in self.settings.peers
                        if host.startswith("/")
                    ),
                    return_exceptions=True,
                )
            return  # like PostgreSQL: no answer, no hint whether the key existed
        if session.key[1] != secret:
            return
        session.cancel_requested = True
        # Only nodes still working on the session's unit: a cancel that reaches an idle node
        # late would cancel whatever the session sends it next.
        await asyncio.gather(
            *(send_cancel(c.node, c.pid, c.secret) for c in session.conns.values() if c.busy),
            return_exceptions=True,
        )


def _shutdown_error() -> m.PgError:
    return m.PgError(
        "57P01",
        "terminating connection because the pgquorum router is shutting down",
        severity="FATAL",
    )
