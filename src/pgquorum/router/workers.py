"""Several router processes on one listen port, for machines with more than one core.

The kernel spreads new client connections over the processes (SO_REUSEPORT). Each worker is a
whole router with a name of its own (``name.wN``: its transaction ids, its resolver), and the
workers are peers of each other: each also listens on a private Unix socket, through which
its siblings tell it of failed nodes (FAIL NODE) and pass on CancelRequests for sessions it
serves. The state database file is shared. The first process runs worker 0 and starts and
watches the others, restarting one that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from pgquorum.config import Config

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0


def private_dir(config: Config, index: int) -> Path:
    """Where worker ``index`` of this listen port keeps its private socket."""
    port = config.router.listen_port
    return Path(tempfile.gettempdir()) / f"pgquorum-{port}-w{index}"


def worker_config(config: Config, index: int) -> Config:
    """The configuration of worker ``index`` of ``config.router.workers``."""
    settings = config.router
    count = settings.workers
    siblings = tuple((str(private_dir(config, i)), settings.listen_port) for i in range(count))
    mine = private_dir(config, index)
    mine.mkdir(mode=0o700, exist_ok=True)
    return dataclasses.replace(
        config,
        router=dataclasses.replace(
            settings,
            name=f"{settings.name}.w{index}",
            peers=settings.peers + tuple(s for i, s in enumerate(siblings) if i != index),
            private_dir=mine,
        ),
    )


class Supervisor:
    """Runs workers 1..N-1 as child processes of worker 0, restarting any that dies."""

    def __init__(self, config_path: Path, count: int, verbose: bool) -> None:
        self.config_path = config_path
        self.count = count
        self.verbose = verbose
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "pgquorum.cli", "router", "--config", str(self.config_path)]
        cmd += ["--worker", str(index)] + (["--verbose"] if self.verbose else [])
        self.children[index] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        for i in range(1, self.count):
            self._spawn(i)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY_S)
            for index, proc in list(self.children.items()):
                if proc.poll() is not None and not self._stopping:
                    log.error(
                        "router worker %d exited with %s; restarting it", index, proc.returncode
                    )
                    self._spawn(index)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
