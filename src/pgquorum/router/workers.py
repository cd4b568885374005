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
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from pgquorum.config import Config, ConfigError

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0


def private_dir(config: Config, index: int) -> Path:
    """Where worker ``index`` of this listen port keeps its private socket."""
    port = config.router.listen_port
    return Path(tempfile.gettempdir()) / f"pgquorum-{port}-w{index}"


def own_dir(path: Path) -> None:
    """Make ``path`` a directory of this user alone, or check that it already is one.

    The private directories have known names in the shared temporary directory: one that
    another user made first could hold a socket listening in a worker's place (and take
    the credentials a sibling logs in with), or let that user reach a worker's socket.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(
            [
                f"router.workers: {path} must be a directory of this user (uid "
                f"{os.geteuid()}) that no one else may use (mode 0700); it is "
                f"{'a directory' if stat.S_ISDIR(st.st_mode) else 'not a directory'} of uid "
                f"{st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}. Remove it, or stop "
                "whoever made it."
            ]
        )


def worker_config(config: Config, index: int) -> Config:
    """The configuration of worker ``index`` of ``config.router.workers``; raises
    ConfigError when a private directory of the workers is not this user's alone."""
    settings = config.router
    count = settings.workers
    dirs = [private_dir(config, i) for i in range(count)]
    for path in dirs:  # a sibling's too: this worker connects to its socket
        own_dir(path)
    siblings = tuple((str(path), settings.listen_port) for path in dirs)
    mine = dirs[index]
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
