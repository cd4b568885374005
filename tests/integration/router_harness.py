"""Runs a pgquorum router in a background thread, in front of real local PostgreSQL nodes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvloop

from pgquorum.cluster.model import Group, Node
from pgquorum.config import Config, RouterSettings
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode
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
