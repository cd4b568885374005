"""The router's live view of its group: node states, the lead, and per-node counters.

Everything the router knows about the cluster goes through :class:`ClusterView`, so that its
source can later move from this in-memory table to a durable state database or a mediator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .model import Group, Node, NodeState

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
    divergences: int = 0  # replicated statements whose outcome differed from the lead's
    last_error: str = ""


class ClusterView:
    """Node states of one group and the choice of lead.

    The lead is the first ONLINE node in the group's configured order, so every router over
    the same group picks the same lead without talking to the others.
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        self.status: dict[str, NodeStatus] = {n.name: NodeStatus(n) for n in group.nodes}
        self._listeners: list[Callable[[NodeStatus], None]] = []
        self.generation = 0  # bumped on every state change, so callers can cache derived views

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
        st = self.status[name]
        if st.state is NodeState.FAILED:
            return
        st.state = NodeState.FAILED
        st.reason = reason
        st.last_error = reason
        st.since = time.time()
        self.generation += 1
        log.error("node %s FAILED: %s", name, reason)
        for listener in self._listeners:
            listener(st)

    def on_change(self, listener: Callable[[NodeStatus], None]) -> None:
        self._listeners.append(listener)
