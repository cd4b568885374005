"""Runs a pgquorum router in a background thread, in front of real local PostgreSQL nodes."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvloop

from helpers import assert_nodes_identical
from pgquorum.cluster.model import Group, Node, NodeState
from pgquorum.config import Config, RouterSettings
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode, free_port
from pgquorum.router.server import Router


def router_config(nodes: list[LocalNode], *, tcp: bool = False, **overrides: Any) -> Config:
    """A router config over ``nodes``: through their Unix sockets, or loopback TCP if ``tcp``."""
    settings = RouterSettings(
        listen_host="127.0.0.1",
        listen_port=0,
        name="test-router",
        read_policy="balance",
        auth_method="trust",
        users_file=None,
        tls_cert=None,
        tls_key=None,
        max_message_size=64 * 1024 * 1024,
        backend_user=None,
        backend_password=None,
    )
    settings = dataclasses.replace(settings, **overrides)
    group = Group(
        "default", tuple(Node(n.name, n.host if tcp else n.router_host, n.port) for n in nodes)
    )
    return Config(router=settings, group=group)


class RouterThread:
    """A Router on its own uvloop event loop in a daemon thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = uvloop.new_event_loop()
        self.router = Router(config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="router")
        self._thread.start()
        self._ready.wait(30)
        if self._error:
            raise self._error

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.router.start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def port(self) -> int:
        return self.router.port

    def dsn(self, dbname: str = "postgres", user: str = "postgres", **extra: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.router.stop(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def write_users(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(f'"{u}" "{p}"\n' for u, p in users.items()))
    return path


def client_cmd(
    binaries: PgBinaries, program: str, rt: RouterThread, *args: str, db: str = "postgres"
) -> list[str]:
    """psql/pgbench through the router as postgres: ``program -h -p -U -d db args``
    (pgbench takes the database as its last argument instead)."""
    base = [str(binaries.path(program)), "-h", "127.0.0.1", "-p", str(rt.port), "-U", "postgres"]
    if program == "pgbench":
        return [*base, *args, db]
    return [*base, "-X", "-v", "ON_ERROR_STOP=1", "-d", db, *args]


def pgbench(
    binaries: PgBinaries, rt: RouterThread, *args: str, db: str = "postgres", timeout: float = 300
) -> str:
    """Run pgbench through the router to its end; its output (a failed run fails the test)."""
    r = subprocess.run(
        client_cmd(binaries, "pgbench", rt, *args, db=db),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def start_pgbench(
    binaries: PgBinaries, rt: RouterThread, *args: str, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """pgbench load through the router in the background; finish_pgbench reads its end."""
    return subprocess.Popen(
        client_cmd(binaries, "pgbench", rt, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
    )


def finish_pgbench(bench: subprocess.Popen[str], timeout: float = 120) -> int:
    """Wait for a start_pgbench run: no client transaction failed or was aborted; returns
    how many it processed."""
    out, _ = bench.communicate(timeout=timeout)
    assert bench.returncode == 0, out
    assert "number of failed transactions: 0" in out, out
    assert "aborted" not in out, out
    return int(out.split("number of transactions actually processed: ")[1].split()[0])


def peer_config(
    nodes: list[LocalNode], tmp_path: Path, name: str, port: int, peer_port: int
) -> Config:
    """Router ``name`` on ``port`` with its state database in ``tmp_path``, told of the peer
    router on ``peer_port``."""
    return router_config(
        nodes,
        name=name,
        listen_port=port,
        peers=(("127.0.0.1", peer_port),),
        state_db=tmp_path / f"{name}.db",
    )


def pair_configs(nodes: list[LocalNode], tmp_path: Path) -> tuple[Config, Config]:
    """Two routers, each with its own state database, told of each other."""
    a, b = free_port(), free_port()
    return peer_config(nodes, tmp_path, "a", a, b), peer_config(nodes, tmp_path, "b", b, a)


def prepared(node: LocalNode) -> int:
    """Prepared transactions left on ``node``."""
    return int(node.psql("SELECT count(*) FROM pg_prepared_xacts"))


def wait_resolved(nodes: list[LocalNode], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(prepared(n) for n in nodes):
        if time.monotonic() > deadline:
            pytest.fail(f"prepared transactions left: {[prepared(n) for n in nodes]}")
        time.sleep(0.2)


def assert_all_online(rt: RouterThread) -> None:
    """Every node of the router's group is ONLINE (none was failed)."""
    states = {name: st.state for name, st in rt.router.cluster.status.items()}
    assert set(states.values()) == {NodeState.ONLINE}, states


def assert_settled(rt: RouterThread, nodes: list[LocalNode], sql: str, expected: str) -> None:
    """No node was failed, ``sql`` answers ``expected``, and every node holds the same."""
    assert_all_online(rt)
    assert nodes[0].psql(sql) == expected
    assert_nodes_identical(nodes, "postgres")


def eventually(check: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached in {timeout:g}s: {what or _source(check)}")
        time.sleep(0.05)


def _source(check: Callable[[], bool]) -> str:
    """The line that made ``check`` (a lambda's own text), for a failure message."""
    try:
        return inspect.getsource(check).strip()
    except (OSError, TypeError):
        return repr(check)


def pgbench_commits(rt: RouterThread) -> int:
    """Transactions pgbench's TPC-B-like script committed (rows in pgbench_history)."""
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()
    assert row is not None
    return int(row[0])


def wait_pgbench_commits(
    rt: RouterThread, bench: subprocess.Popen[str], more: int, timeout: float = 30
) -> None:
    """Until a start_pgbench run commits ``more`` transactions from now."""
    target = pgbench_commits(rt) + more

    def committed() -> bool:
        assert bench.poll() is None, "pgbench ended early"
        return pgbench_commits(rt) >= target

    eventually(committed, timeout, f"pgbench committing {more} more transactions")


def state(rt: RouterThread, node: str) -> NodeState:
    return rt.router.cluster.status[node].state
