"""Runs `pgquorum` commands as real subprocesses (the CLI and crash tests)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode, free_port

PGQUORUM = str(Path(sys.executable).parent / "pgquorum")

#: Upper bound for `pgquorum up` to create/start its servers and open the router port.
UP_TIMEOUT = 90
#: How long a SIGTERMed `up`/`router` may take to stop everything and exit.
STOP_TIMEOUT = 30


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PGQUORUM_PASSWORD", None)
    env.pop("PGPASSWORD", None)
    env["COLUMNS"] = "200"  # rich: do not wrap messages at 80 columns in the pipe
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGQUORUM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        stdin=subprocess.DEVNULL,
        cwd="/",
    )


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class CliProcess:
    """A long-running `pgquorum ...` subprocess with its output in a log file."""

    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [PGQUORUM, *self.args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=cli_env(**self.env),
            cwd="/",
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def wait_port(self, port: int, timeout: float = UP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"pgquorum {' '.join(self.args)} exited with {self.proc.returncode} before "
                    f"listening on {port}:\n{self.output()}"
                )
            if port_open(port):
                return
            time.sleep(0.2)
        pytest.fail(f"port {port} not open after {timeout}s:\n{self.output()}")

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait for the process to exit by itself; its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"did not exit within {timeout}s of SIGTERM:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._out.close()


def start(procs: list[CliProcess], tmp_path: Path, *args: str, **env: str) -> CliProcess:
    p = CliProcess(list(args), tmp_path / f"out{len(procs)}.log", env)
    procs.append(p)
    return p


def dsn(port: int, dbname: str = "postgres", **extra: str) -> str:
    parts = [f"host=127.0.0.1 port={port} dbname={dbname} user=postgres connect_timeout=10"]
    parts += [f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts)


def write_router_config(
    path: Path,
    port: int,
    nodes: list[Any],
    *,
    tcp: bool = False,
    **router: str | int | list[str],
) -> Path:
    """A router TOML file over ``nodes`` (LocalNode), through their Unix sockets unless
    ``tcp``; ``router`` adds keys to [router] (numbers as they are, strings and lists of
    strings quoted)."""
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in router.items())
    listed = "".join(
        f'\n[[group.nodes]]\nname = "{n.name}"\nhost = "{n.host if tcp else n.router_host}"\n'
        f"port = {n.port}\n"
        for n in nodes
    )
    path.write_text(
        f'[router]\nlisten = "127.0.0.1:{port}"\nauth_method = "trust"\n{extra}\n'
        f'[group]\nname = "default"\n{listed}'
    )
    return path


def _toml(value: str | int | list[str]) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f'"{value}"'


def start_up(
    procs: list[CliProcess], tmp_path: Path, cluster_dir: Path, nodes: int, port: int
) -> CliProcess:
    """`pgquorum up --nodes N` on ``cluster_dir``, once its router port is open."""
    up = start(
        procs, tmp_path, "up", "--nodes", str(nodes), "--port", str(port), "--dir", str(cluster_dir)
    )
    up.wait_port(port)
    return up


def state_node_ports(cluster_dir: Path) -> list[int]:
    """The node ports recorded in cluster.json by the running `pgquorum up`."""
    state = json.loads((cluster_dir / "cluster.json").read_text())
    return [int(n["port"]) for n in state["nodes"]]


def local_nodes(cluster_dir: Path, binaries: PgBinaries) -> list[LocalNode]:
    """The running nodes of a local cluster, to look at each one directly."""
    return [
        LocalNode(f"node{i}", cluster_dir / f"node{i}", port, binaries)
        for i, port in enumerate(state_node_ports(cluster_dir), 1)
    ]


def worker_dir(port: int, index: int) -> Path:
    """Where worker ``index`` keeps its private socket (as workers.private_dir says)."""
    return Path(tempfile.gettempdir()) / f"pgquorum-{port}-w{index}"


def worker_dsn(port: int, index: int, dbname: str = "pgquorum") -> str:
    """Worker ``index`` alone, through its private socket (its admin console by default)."""
    return f"host={worker_dir(port, index)} port={port} dbname={dbname} user=postgres"


def worker_states(port: int, index: int) -> list[str]:
    """The node states worker ``index`` shows, in group order."""
    with psycopg.connect(worker_dsn(port, index), autocommit=True) as admin:
        return [str(r[4]) for r in admin.execute("SHOW NODES").fetchall()]


def start_workers(
    procs: list[CliProcess], tmp_path: Path, nodes: list[LocalNode]
) -> tuple[CliProcess, int, Path]:
    """`pgquorum router` with two workers; returns once both listen."""
    port = free_port()
    cfg = write_router_config(
        tmp_path / "router.toml", port, nodes, name="multi", workers=2, state_db="state.db"
    )
    router = start(procs, tmp_path, "router", "--config", str(cfg))
    router.wait_port(port, timeout=30)
    deadline = time.monotonic() + 20
    while not (worker_dir(port, 1) / f".s.PGSQL.{port}").exists():
        assert time.monotonic() < deadline, router.output()
        time.sleep(0.1)
    return router, port, cfg
