"""Test-only fail points: crash the process at a named point, to test crash recovery.

Armed by the environment variable ``PGQUORUM_FAILPOINTS`` (comma-separated names), read once
at import. Unset in production, where :func:`hit` is a set lookup that finds nothing.
"""

from __future__ import annotations

import asyncio
import os
import sys

ENV = "PGQUORUM_FAILPOINTS"
_armed = frozenset(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())

# Between the phases of a two-phase commit.
AFTER_PREPARE = "after-prepare"  # every node prepared, no decision recorded yet
AFTER_DECISION = "after-decision"  # decision durable, no COMMIT PREPARED sent
AFTER_QUEUED = "after-queued"  # ... and the transaction in a recovery's queue
AFTER_FIRST_COMMIT = "after-first-commit"  # one node committed, the others not yet

# In a recovery's replay of a transaction (its transaction id written down).
REPLAY_BEFORE_COMMIT = "replay-before-commit"  # the COMMIT not sent to the node
REPLAY_AFTER_COMMIT = "replay-after-commit"  # the node committed, not written down yet

# Pauses (PAUSE_S), to widen a race a test needs to see.
BEFORE_QUEUE_CHECK = "before-queue-check"  # the resolver committed, has not asked the queue
PAUSE_S = 3.0


def hit(name: str) -> None:
    """Exit the process at once, as a crash would, if ``name`` is armed."""
    if name in _armed:
        sys.stderr.write(f"pgquorum: fail point {name} hit, exiting\n")
        sys.stderr.flush()
        os._exit(70)


async def pause(name: str) -> None:
    """Sleep PAUSE_S if ``name`` is armed."""
    if name in _armed:
        sys.stderr.write(f"pgquorum: fail point {name} hit, pausing {PAUSE_S:.0f}s\n")
        await asyncio.sleep(PAUSE_S)
