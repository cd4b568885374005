"""Shared fixtures: real local PostgreSQL servers for integration tests.

PostgreSQL must be installed wherever these tests run, so a missing
installation fails the tests instead of skipping them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pgquorum.local.binaries import PgBinaries, PostgresNotFound, find_binaries
from pgquorum.local.instance import LocalNode, free_port

# Make tests/helpers.py importable as `helpers` regardless of pytest's import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


MakeNodes = Callable[..., list[LocalNode]]


@pytest.fixture(scope="session")
def pg_binaries() -> PgBinaries:
    try:
        return find_binaries()
    except PostgresNotFound as e:
        pytest.fail(str(e), pytrace=False)


class _NodePool:
    """Creates nodes under one temp dir and tears all of them down at the end."""

    def __init__(self, binaries: PgBinaries) -> None:
        self.binaries = binaries
        # mkdtemp (short path under /tmp) keeps unix socket paths well below
        # the 107-byte limit; init() grants the postgres user search access.
        self.basedir = Path(tempfile.mkdtemp(prefix="pgquorum-test-"))
        self.nodes: list[LocalNode] = []
        self._lock = threading.Lock()
        self._sets = 0

    def create(
        self, n: int, *, password: str | None = None, group: str | None = None
    ) -> list[LocalNode]:
        with self._lock:
            self._sets += 1
            setdir = self.basedir / (group or f"set{self._sets}")
            nodes = [
                LocalNode(f"node{i}", setdir / f"node{i}", free_port(), self.binaries)
                for i in range(1, n + 1)
            ]
            # Register before starting so a failure half-way still gets cleaned up.
            self.nodes.extend(nodes)

        def setup(node: LocalNode) -> None:
            node.init(password=password)
            node.start()

        with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
            list(pool.map(setup, nodes))
        return nodes

    def close(self) -> None:
        def stop(node: LocalNode) -> None:
            try:
                node.stop(mode="immediate")
            except Exception:
                node.kill()

        if self.nodes:
            with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
                list(pool.map(stop, self.nodes))
        shutil.rmtree(self.basedir, ignore_errors=True)


@pytest.fixture(scope="session")
def _node_pool(pg_binaries: PgBinaries) -> Iterator[_NodePool]:
    pool = _NodePool(pg_binaries)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def pg_nodes(_node_pool: _NodePool) -> list[LocalNode]:
    """Three running trust-auth nodes (node1..node3) shared by the whole session.

    Don't stop or kill them; tests that need that should use make_nodes.
    """
    return _node_pool.create(3, group="shared")


@pytest.fixture(scope="session")
def make_nodes(_node_pool: _NodePool) -> MakeNodes:
    """Factory: make_nodes(n, password=None) -> n fresh running nodes, stopped at session end."""

    def make(n: int, password: str | None = None) -> list[LocalNode]:
        return _node_pool.create(n, password=password)

    return make
