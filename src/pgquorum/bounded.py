"""Dicts used as bounded caches and memories: the oldest entries go first."""

from __future__ import annotations

import itertools
from typing import TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


def store_bounded(cache: dict[_K, _V], key: _K, value: _V, max_entries: int) -> None:
    """``cache[key] = value``; a full cache first drops its oldest eighth."""
    if len(cache) >= max_entries:
        # Dicts keep insertion order, so the first keys are the oldest.  Evicting in
        # batches keeps this O(1) amortized: deleting one key at a time from the front
        # makes each next(iter(cache)) skip an ever longer run of dead slots.
        for old in list(itertools.islice(cache, max(1, len(cache) // 8))):
            del cache[old]
    cache[key] = value
