"""The router's live view of its group: node states, the lead, and per-node counters.

Everything the router knows about the cluster goes through :class:`ClusterView`, so that its
source can later move from the state database to a mediator. States are durable: a node that
one router (or a peer) failed stays FAILED when the router restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .model import Group, Node, NodeState
from .store import StateStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class NodeStatus:
    """Mutable runtime facts about one node, as this router sees them."""

    node: Node
    state: NodeState = NodeState.ONLINE
    reason: str = ""
    since: float = field(default_factory=time.time)
    statements: int = 0  # units of work served (reads and writes)
    outstanding: int = 0  # units in flight right now: the read balancer's load measure
    divergences: int = 0  # replicated statements whose outcome differed from the majority's
    last_error: str = ""


class ClusterView:
    """Node states of one group and the choice of lead.

    The lead is the first ONLINE node in the group's configured order, so every router over
    the same group picks the same lead without talking to the others.
    """

    def __init__(self, group: Group, store: StateStore | None = None, router: str = "") -> None:
        self.store = store if store is not None else StateStore(None)
        # The configured nodes, amended by ADD NODE / REMOVE NODE (kept in the store).
        added, removed = self.store.members(group.name)
        configured = {n.name for n in group.nodes}
        nodes = [n for n in group.nodes if n.name not in removed]
        nodes += [n for n in added if n.name not in configured]
        self.group = Group(group.name, tuple(nodes))
        self.router = router
        self.status: dict[str, NodeStatus] = {n.name: NodeStatus(n) for n in self.group.nodes}
        self._listeners: list[Callable[[NodeStatus], None]] = []
        self.generation = 0  # bumped on every state change, so callers can cache derived views
        self.refresh()

    def refresh(self) -> None:
        """Take over the states in the state database (written by this or another router).

        Only ever moves a node away from ONLINE here: coming back ONLINE is recovery's
        business (next issue), never a side effect of reading.
        """
        stored = self.store.node_states(self.group.name)
        for name, st in self.status.items():
            rec = stored.get(name)
            if rec is None or rec.state is NodeState.ONLINE or st.state is rec.state:
                continue
            st.state = rec.state
            st.reason = rec.reason
            if rec.state is NodeState.FAILED:
                st.last_error = rec.reason
            st.since = rec.since
            self.generation += 1
            log.warning("node %s is %s in the state database: %s", name, rec.state, rec.reason)
            for listener in self._listeners:
                listener(st)

    def online(self) -> list[NodeStatus]:
        return [s for s in self.status.values() if s.state is NodeState.ONLINE]

    def lead(self) -> NodeStatus | None:
        for s in self.status.values():
            if s.state is NodeState.ONLINE:
                return s
        return None

    def is_online(self, name: str) -> bool:
        return self.status[name].state is NodeState.ONLINE

    def mark_failed(self, name: str, reason: str) -> None:
        """Take a node out of service. It stays FAILED: it may have diverged from the others."""
        try:
            self.refresh()  # an error is when another router's verdicts matter most
        except Exception:
            log.exception("cannot read the state database")
        if self.status[name].state is not NodeState.FAILED:
            self._set(name, NodeState.FAILED, reason)

    def mark_recovering(self, name: str, reason: str) -> None:
        """A FAILED (or new) node that a recovery is rebuilding: still no traffic."""
        self._set(name, NodeState.RECOVERING, reason)

    def mark_online(self, name: str, reason: str) -> None:
        """The end of a recovery: the node holds what the others hold and takes traffic."""
        self._set(name, NodeState.ONLINE, reason)

    def add_node(self, node: Node, reason: str) -> None:
        """A new member of the group: FAILED (no traffic) until a recovery fills it."""
        if node.name in self.status and node in self.group.nodes:
            return
        self.store.set_member(self.group.name, node)
        self.group = Group(self.group.name, (*self.group.nodes, node))
        self.status[node.name] = NodeStatus(node, NodeState.FAILED)
        # Not told to the peers as a failure (they learn of the member from ADD NODE, and
        # a FAIL NODE arriving late would end its recovery).
        self._set(node.name, NodeState.FAILED, reason, notify=False)

    def remove_node(self, name: str) -> None:
        """Take a node out of the group for good (it is failed first). Its status stays, out
        of the group, for sessions still holding a connection to it."""
        self.mark_failed(name, "removed from the group")
        st = self.status[name]
        self.store.set_member(self.group.name, st.node, removed=True)
        self.group = Group(self.group.name, tuple(n for n in self.group.nodes if n.name != name))
        self.generation += 1

    def _set(self, name: str, state: NodeState, reason: str, *, notify: bool = True) -> None:
        st = self.status[name]
        st.state = state
        st.reason = reason
        if state is NodeState.FAILED:  # SHOW NODES keeps it for an ONLINE node
            st.last_error = reason
        try:
            st.since = self.store.set_state(self.group.name, name, state, reason, self.router)
        except Exception:  # the new state holds in memory all the same
            log.exception("cannot record node %s as %s in the state database", name, state)
            st.since = time.time()
        self.generation += 1
        level = logging.ERROR if state is NodeState.FAILED else logging.WARNING
        log.log(level, "node %s is %s: %s", name, state, reason)
        if notify:
            for listener in self._listeners:
                listener(st)

    def on_change(self, listener: Callable[[NodeStatus], None]) -> None:
        self._listeners.append(listener)
