"""Online recovery of a FAILED node, run by one router (the coordinator) for every router.

1. The node becomes RECOVERING. Under the commit barrier of every router (HOLD COMMITS on the
   peers), each router starts queueing its commits (the peers into the coordinator's queue),
   and one snapshot per database is exported on a healthy node, with the global objects
   dumped; the barrier is released at once.
2. The node is emptied and rebuilt from those snapshots (pg_dump / pg_restore).
3. The queue is replayed on the node in commit order (replay.py) until it is almost empty.
4. Under the write gate of every router (HOLD WRITES), the rest is replayed, the node goes
   ONLINE everywhere and queueing stops; the gate opens.

Any failure puts the node back to FAILED with the reason, on every router: never half
ONLINE. The queue and the replay's progress are written to a file next to the state
database (queue_log.py): a coordinator that restarts during the replay resumes the recovery
where the node is (resume.py), with the same recovery id, so the peers go on queueing into
it; when that cannot be done exactly, or the restore had not finished, it begins the
recovery again from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pgquorum.cluster.model import Node, NodeState
from pgquorum.local.binaries import find_binaries
from pgquorum.protocol.errors import OBJECT_NOT_IN_PREREQUISITE_STATE, PgError
from pgquorum.router.client import console_literal, query
from pgquorum.router.peers import hold_everywhere
from pgquorum.sql.quoting import quote_literal

from . import restore
from .gate import StillOpen
from .queue import LocalQueue, QueueUnavailable
from .queue_log import QueueLog, boot_id
from .replay import Replayer, ReplayError
from .resume import Resumable, Unresumable

if TYPE_CHECKING:
    from pgquorum.router.server import Router

log = logging.getLogger(__name__)

CATCH_UP_DEPTH = 20  # entries left in the queue when the final switch is tried
SWITCH_HOLD_S = 1.0  # how long the write gate waits for open transactions that wrote
FOLLOW_AT_ONCE = 8  # databases whose sequences are moved at the same time, in the switch
SWITCH_PATIENCE_S = 600.0  # how long long transactions may keep the node from joining
SNAPSHOT_TRIES = 3  # commit barriers tried for the snapshot
SNAPSHOT_RETRY_S = 1.0
RESOLVE_WAIT_S = 60.0  # for the in-doubt transactions of an earlier run, before a snapshot
# Resumed: how long the replay's transaction that died with the coordinator may still be in
# progress on the node (its backend ends when it sees the connection closed).
IN_PROGRESS_WAIT_S = 30.0


@dataclass
class Progress:
    """What SHOW RECOVERY and `pgquorum recover` report."""

    node: str
    rid: str
    phase: str = "starting"
    databases: int = 0
    databases_done: int = 0
    bytes: int = 0  # dumped and restored so far
    replayed: int = 0
    pauses_ms: list[float] = field(default_factory=list)  # each barrier's hold
    error: str = ""
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    resumed: int = 0  # times a restarted coordinator took it up where the node was


class Recovery:
    def __init__(self, router: Router, node: str, resumed: Resumable | None = None) -> None:
        self.router = router
        self.node = node
        self.task: asyncio.Task[None] | None = None
        self._replayer: Replayer | None = None
        # Taken up from the log of a run before a restart, until resumed (or begun again).
        self.resumed = resumed
        self.lost_while_resuming = ""  # why its queue was lost meanwhile (Router.queue_lost)
        if resumed is None:
            rid = f"{router.settings.name}/{int(time.time() * 1000)}"
            self.queue = LocalQueue(rid, node)
            self.progress = Progress(node, rid)
        else:
            self.queue = resumed.queue
            _, _, databases, restored, pauses = resumed.restored
            self.progress = Progress(
                node,
                resumed.queue.rid,
                phase="resume",
                databases=databases,
                databases_done=databases,
                bytes=restored,
                pauses_ms=list(pauses),
                started=float(resumed.header.get("started", time.time())),
                resumed=resumed.times + 1,
            )

    @property
    def rid(self) -> str:
        return self.queue.rid

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        router = self.router
        try:
            await self._run()
            self.progress.phase = "done"
        except Exception as e:
            reason = _reason(e)
            log.error("recovery of node %s failed: %s", self.node, reason)
            self.progress.phase = "failed"
            self.progress.error = reason
            self._stop_queueing()
            await router.peers.tell(f"RECOVERY STOP {self.rid}", strict=False)
            if router.cluster.status[self.node].state is not NodeState.FAILED:
                router.cluster.mark_failed(self.node, f"recovery failed: {reason}")
        finally:
            self.progress.finished = time.time()
            if self._replayer is not None:
                self._replayer.close()

    # -- the phases ---------------------------------------------------------------------------

    async def _run(self) -> None:
        # A restarted router first finishes what it left in doubt: committed after the
        # snapshot, such a transaction would be in neither the snapshot nor the queue (a
        # resumed queue is asked whether it has it, see Router.queue_lost).
        try:
            await asyncio.wait_for(self.router.commits.resolved_once.wait(), RESOLVE_WAIT_S)
        except TimeoutError:
            raise PgError(
                OBJECT_NOT_IN_PREREQUISITE_STATE,
                "the transactions this router left in doubt could not be resolved on every "
                f"ONLINE node within {RESOLVE_WAIT_S:.0f}s (see the router's log)",
            ) from None
        if self.resumed is not None:
            try:
                await self._resume(self.resumed)
            except (Unresumable, QueueUnavailable) as e:
                if isinstance(e, QueueUnavailable) and not self.lost_while_resuming:
                    raise
                log.warning(
                    "node %s: recovery %s cannot be resumed (%s); beginning it again",
                    self.node,
                    self.rid,
                    e,
                )
                self._afresh()
                await self._snapshot_and_restore()
        else:
            await self._snapshot_and_restore()
        await self._replay_and_switch()

    async def _snapshot_and_restore(self) -> None:
        router = self.router
        cluster = router.cluster
        st = cluster.status[self.node]
        source = cluster.lead()
        if source is None:
            raise PgError(OBJECT_NOT_IN_PREREQUISITE_STATE, "no ONLINE node to recover from")
        cluster.mark_recovering(self.node, f"recovery {self.rid} from {source.node.name}")
        user, password = router.internal_credentials()
        creds = restore.Credentials(user, password)
        target = st.node

        self._keep_on_disk()
        self.progress.phase = "snapshot"
        # Found once (each look runs `postgres --version`), and before the pause.
        bins = await asyncio.to_thread(find_binaries)
        snapshots = await restore.SnapshotSet.open(source.node, creds)
        try:
            await self._snapshot(snapshots)
            globals_sql = await restore.dump_globals(source.node, creds, bins)
            self.progress.phase = "restore"
            self.progress.databases = len(snapshots.databases)
            await restore.reset_node(target, creds)
            await restore.restore_globals(target, creds, globals_sql, bins)
            workdir = Path(tempfile.mkdtemp(prefix="pgquorum-recover-"))
            try:
                done = 0
                for db, snapshot in snapshots.databases.items():

                    def seen(n: int, done: int = done) -> None:
                        self.progress.bytes = done + n

                    done += await restore.copy_database(
                        source.node,
                        target,
                        creds,
                        db,
                        snapshot,
                        workdir,
                        binaries=bins,
                        progress=seen,
                    )
                    self.progress.databases_done += 1
                    self._check_alive()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            snapshots.close()
        # From here on a restarted coordinator can resume (unless the node restarted).
        started = await self._node_started(target)
        p = self.progress
        self.queue.note(("restored", started, p.databases, p.bytes, p.pauses_ms))
        self._replayer = Replayer(
            target, self.queue, router.credentials, router.settings.node_timeout_s
        )

    async def _replay_and_switch(self) -> None:
        self.progress.phase = "replay"
        give_up = time.monotonic() + SWITCH_PATIENCE_S
        while True:
            await self._replay_until(CATCH_UP_DEPTH)
            still_open = await self._switch()
            if still_open is None:
                return
            # Let the long transactions finish with the gate open, replaying meanwhile.
            while time.monotonic() < give_up and not await still_open.ended(0.2):
                self._check_alive()  # (a peer may fail the node while nothing replays)
                await self._replay_until(CATCH_UP_DEPTH)
            if time.monotonic() >= give_up:
                raise PgError(
                    OBJECT_NOT_IN_PREREQUISITE_STATE,
                    f"transactions that wrote stayed open for {SWITCH_PATIENCE_S:.0f}s, so "
                    "the node could not join the group",
                    hint="Long transactions keep a recovered node from joining; try again.",
                )

    async def _snapshot(self, snapshots: restore.SnapshotSet) -> None:
        """Under every router's commit barrier: queueing starts everywhere, the snapshots
        are exported. A barrier that cannot drain its commits in flight in time (one waits
        for a lock, say) is tried again a few times before the recovery gives up."""
        router = self.router
        for attempt in range(1, SNAPSHOT_TRIES + 1):
            held_all = False
            try:
                async with hold_everywhere(router, "COMMITS") as held:
                    held_all = True
                    began = time.monotonic()
                    router.recovery_sink = self.queue
                    for link, host in held:
                        await link.query(self._start_command(host))
                    await snapshots.export()
                    pause = time.monotonic() - began + held.drained
                    self.progress.pauses_ms.append(pause * 1000)
                    return
            except PgError as e:
                if held_all or attempt == SNAPSHOT_TRIES:
                    raise
                log.warning(
                    "node %s: %s; trying again (%d of %d)", self.node, e, attempt, SNAPSHOT_TRIES
                )
                await asyncio.sleep(SNAPSHOT_RETRY_S)

    # -- resuming -----------------------------------------------------------------------------

    def _keep_on_disk(self) -> None:
        """Start the queue's log (a coordinator that cannot write it just cannot resume)."""
        path = self.router.queue_log_path()
        if path is None:
            return
        header = {
            "rid": self.rid,
            "node": self.node,
            "boot": boot_id(),
            "started": self.progress.started,
        }
        try:
            self.queue.log = QueueLog.create(path, header)
        except OSError as e:
            log.warning(
                "recovery %s: its queue is not kept on disk (%s): a restart of this router "
                "begins it again",
                self.rid,
                e,
            )

    async def _resume(self, resumed: Resumable) -> None:
        """Take the recovery up where the node is (see resume.py); Unresumable if that
        cannot be done exactly."""
        router = self.router
        log.warning("node %s: resuming recovery %s", self.node, self.rid)
        target = router.cluster.status[self.node].node
        started = await self._node_started(target)
        if started != resumed.restored[1]:
            raise Unresumable("the node restarted since (replayed commits may be lost)")
        replayer = Replayer(target, self.queue, router.credentials, router.settings.node_timeout_s)
        self._replayer = replayer
        replayer.rebuild = resumed.sessions
        if resumed.in_doubt is not None:
            serial, xid = resumed.in_doubt
            status = await self._transaction_status(target, xid)
            if status == "committed":
                state = await replayer.skip(serial)
                if state is not None and state.sticky:
                    raise Unresumable(
                        f"a session made session state during the recovery ({state.sticky}) "
                        "that a new replay connection cannot get back"
                    )
            elif status != "aborted":  # (aborted: it is replayed again)
                raise Unresumable(
                    f"the replay's transaction {xid} is {status or 'unknown'} on the node"
                )
        if self.lost_while_resuming:
            raise Unresumable(self.lost_while_resuming)
        self.resumed = None
        self.queue.note(("resumed",))
        log.warning(
            "node %s: recovery %s resumed after entry %d", self.node, self.rid, self.queue.applied
        )

    def _afresh(self) -> None:
        """Let the resumed queue go (its peers learn it from their next batch, QueueGone) and
        start over as a new recovery."""
        self.resumed = None
        self.lost_while_resuming = ""
        self._stop_queueing()
        if self._replayer is not None:
            self._replayer.close()
            self._replayer = None
        rid = f"{self.router.settings.name}/{int(time.time() * 1000)}"
        self.queue = LocalQueue(rid, self.node)
        self.progress = Progress(self.node, rid, started=self.progress.started)

    async def _node_started(self, target: Node) -> str:
        """When the node's server started: a restart loses the replayed commits it did not
        flush yet."""
        return str(await self._ask(target, "SELECT pg_catalog.pg_postmaster_start_time()::text"))

    async def _transaction_status(self, target: Node, xid: int) -> str:
        if xid <= 0:
            return ""
        deadline = time.monotonic() + IN_PROGRESS_WAIT_S
        while True:
            status = await self._ask(target, f"SELECT pg_catalog.txid_status({int(xid)})")
            if status != "in progress" or time.monotonic() >= deadline:
                return str(status or "")
            await asyncio.sleep(0.1)

    async def _ask(self, target: Node, sql: str) -> str | None:
        user, password = self.router.internal_credentials()
        params = {"user": user, "database": "template1", "application_name": "pgquorum recovery"}
        _, rows = await query(target, params, password, sql, self.router.settings.node_timeout_s)
        return rows[0][0] if rows else None

    # -- the replay -----------------------------------------------------------------------------

    async def _replay_until(self, depth: int) -> None:
        replayer = self._replayer
        assert replayer is not None
        while self.queue.depth > depth:
            await replayer.step()
            self._note_replay()

    async def _switch(self) -> StillOpen | None:
        """The final pause: no write anywhere, the rest replayed, the node ONLINE. Returns
        the transactions that were in the way if it could not be done."""
        replayer = self._replayer
        assert replayer is not None
        self.progress.phase = "switch"
        try:
            async with hold_everywhere(self.router, "WRITES", SWITCH_HOLD_S) as held:
                began = time.monotonic()
                await replayer.drain()
                self._note_replay()
                self._check_alive()
                await self._follow_sequences(replayer.node)
                await replayer.flush()
                self.router.cluster.mark_online(self.node, f"recovered ({self.rid})")
                # The peers first, then the queue closes: a peer's last operations (a
                # session's end, under the hold nothing that wrote) still find it open.
                for link, host in held:
                    _, rows = await link.query(f"RECOVERY ONLINE {self.rid}")
                    if not rows or rows[0][1] != NodeState.ONLINE.value:
                        # It lost its queue (and failed the node): what it committed since
                        # may be missing here.
                        raise QueueUnavailable(
                            f"peer router {host} no longer queues for this recovery"
                        )
                self._stop_queueing()
                self.progress.pauses_ms.append((time.monotonic() - began + held.drained) * 1000)
                return None
        except StillOpen as e:
            log.info("node %s: %s; joining later", self.node, e)
            self.progress.phase = "replay"
            return e

    async def _follow_sequences(self, target: Node) -> None:
        """Move the node's sequences to at least the lead's: the router reserved blocks of
        values on the ONLINE nodes meanwhile (router/sequences.py), and this node may be
        lead one day."""
        lead = self.router.cluster.lead()
        if lead is None:
            return
        user, password = self.router.internal_credentials()

        # A few databases at once (this runs while every router holds its writes), not all:
        # each takes a connection on two nodes.
        room = asyncio.Semaphore(FOLLOW_AT_ONCE)

        async def follow(db: str) -> None:
            params = {"user": user, "database": db, "application_name": "pgquorum recovery"}
            async with room:
                _, rows = await query(lead.node, params, password, _SEQUENCES)
                if rows:
                    await query(
                        target,
                        params,
                        password,
                        "; ".join(
                            f"SELECT pg_catalog.setval({quote_literal(str(name))}, "
                            f"greatest({int(str(value))}, last_value)) FROM {name}"
                            for name, value in rows
                        ),
                    )

        databases = await restore.list_databases(lead.node, restore.Credentials(user, password))
        try:
            async with asyncio.TaskGroup() as group:  # one fails: the others are cancelled
                for db in databases:
                    group.create_task(follow(db))
        except ExceptionGroup as e:
            raise e.exceptions[0] from None  # the recovery's reason names what failed

    # -- helpers ------------------------------------------------------------------------------

    def _start_command(self, peer_host: str) -> str:
        host, port = self.router.address_for_peer(peer_host)
        return (
            f"RECOVERY START {self.rid} {console_literal(self.node)} {console_literal(host)} {port}"
        )

    def _note_replay(self) -> None:
        assert self._replayer is not None
        self.progress.replayed = self._replayer.applied
        self._check_alive()

    def _check_alive(self) -> None:
        """A peer may have failed the node meanwhile (or lost the queue): stop."""
        st = self.router.cluster.status[self.node]
        if st.state is NodeState.FAILED:
            raise ReplayError(f"the node was failed during its recovery: {st.reason}")
        if self.router.recovery_sink is not self.queue:
            raise QueueUnavailable("queueing stopped")

    def _stop_queueing(self) -> None:
        self.queue.close()
        if self.queue.log is not None:
            self.queue.log.remove()  # (the recovery ended: nothing to resume)
        if self.router.recovery_sink is self.queue:
            self.router.recovery_sink = None


_SEQUENCES = (
    "SELECT pg_catalog.format('%I.%I', schemaname, sequencename), last_value "
    "FROM pg_catalog.pg_sequences WHERE last_value IS NOT NULL"
)


def _reason(e: BaseException) -> str:
    if isinstance(e, PgError):
        return e.message
    return str(e) or type(e).__name__
