"""Frozen value types describing the cluster: nodes, their states, and groups."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeState(enum.StrEnum):
    ONLINE = "ONLINE"
    FAILED = "FAILED"  # gets no traffic and never rejoins by itself: it may have diverged
    RECOVERING = "RECOVERING"


@dataclass(frozen=True, slots=True)
class Node:
    """One PostgreSQL server of a group."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Group:
    """Nodes that each hold a full copy of the same data, in lead-preference order."""

    name: str
    nodes: tuple[Node, ...]
