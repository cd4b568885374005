"""Fixtures for tests that go through a router in front of real PostgreSQL nodes."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cli_harness import CliProcess, run_cli
from router_harness import RouterThread, router_config

from helpers import assert_nodes_identical
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode


@pytest.fixture(scope="session")
def router(pg_nodes: list[LocalNode]) -> Iterator[RouterThread]:
    """One router in front of the shared three nodes (no node is ever killed behind it)."""
    rt = RouterThread(router_config(pg_nodes))
    yield rt
    rt.stop()


@pytest.fixture
def db(
    router: RouterThread, pg_nodes: list[LocalNode], request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh database created through the router; at the end every node must hold the same."""
    name = "t_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    with psycopg.connect(router.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    assert_nodes_identical(pg_nodes, name)


@pytest.fixture
def procs() -> Iterator[list[CliProcess]]:
    """Processes started by a test; killed at the end if still running."""
    started: list[CliProcess] = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture
def cluster_dir(pg_binaries: PgBinaries) -> Iterator[Path]:
    """A short, fresh directory for `pgquorum up`; anything left running is stopped at the end."""
    d = Path(tempfile.mkdtemp(prefix="pgq-cli-"))
    yield d
    try:
        run_cli("down", "--dir", str(d), timeout=120)
    finally:
        for p in d.glob("node*"):
            node = LocalNode(p.name, p, 0, pg_binaries)
            if node.is_running():
                node.kill()
        shutil.rmtree(d, ignore_errors=True)
