"""`pgquorum up`: a local group of PostgreSQL servers with a router in front, in one directory.

The directory holds one data directory per node (``node1``, ``node2``...) and ``cluster.json``,
which records the node ports and the router's process id so ``pgquorum down`` can stop a
cluster left running.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pgquorum.cluster.model import Group, Node, NodeState
from pgquorum.cluster.store import StateStore
from pgquorum.config import Config, RouterSettings

from .binaries import PgBinaries, find_binaries
from .instance import LocalNode, free_port

STATE_FILE = "cluster.json"
STATE_DB = "state.db"  # the router's state database
USERS_FILE = "users.txt"


@dataclass
class LocalCluster:
    directory: Path
    size: int = 3
    router_port: int = 6432
    password: str | None = None

    def __post_init__(self) -> None:
        self.directory = self.directory.resolve()
        self.nodes: list[LocalNode] = []
        self.joining: list[str] = []
        self._binaries: PgBinaries | None = None

    @property
    def binaries(self) -> PgBinaries:
        if self._binaries is None:
            self._binaries = find_binaries()
        return self._binaries

    def _state_path(self) -> Path:
        return self.directory / STATE_FILE

    def read_state(self) -> dict[str, object]:
        try:
            data = json.loads(self._state_path().read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, **extra: object) -> None:
        self._save_state(
            {
                "nodes": [{"name": n.name, "port": n.port} for n in self.nodes],
                "router_port": self.router_port,
                **extra,
            }
        )

    def _save_state(self, state: dict[str, object]) -> None:
        # Write then rename, so a crash never leaves half a file for `down` to read.
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state_path())

    def prepare(self) -> list[LocalNode]:
        """Create (first run) or reuse the node data directories, on free ports."""
        binaries = self.binaries  # before creating anything: a missing PostgreSQL is one error
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)  # the postgres user must reach the data directories
        existing = sorted(
            (p for p in self.directory.glob("node*") if (p / "PG_VERSION").exists()),
            key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0,
        )
        count = max(self.size, len(existing))
        self.nodes = [
            LocalNode(f"node{i}", self.directory / f"node{i}", free_port(), binaries)
            for i in range(1, count + 1)
        ]
        new = [n for n in self.nodes if not n.initialized()]
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda n: n.init(password=self.password), new))
        # Nodes added to a cluster that has data: empty, so they join by recovery.
        self.joining = [n.name for n in new] if len(new) < len(self.nodes) else []
        return self.nodes

    def mark_joining(self) -> None:
        """Record the joining nodes as FAILED before the router reads the state database,
        so no traffic reaches them until their recovery has filled them."""
        if not self.joining:
            return
        store = StateStore(self.directory / STATE_DB)
        try:
            for name in self.joining:
                store.set_state(
                    "default",
                    name,
                    NodeState.FAILED,
                    "new node: joins the group by recovery",
                    "local",
                )
        finally:
            store.close()

    def start_nodes(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda n: n.start(), self.nodes))

    def stop_nodes(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda n: n.stop(), self.nodes))

    def router_config(self) -> Config:
        users_file = None
        if self.password is not None:
            users_file = self.directory / USERS_FILE
            quoted = self.password.replace('"', '""')
            users_file.write_text(f'"postgres" "{quoted}"\n')
            os.chmod(users_file, 0o600)
        settings = RouterSettings(
            listen_host="127.0.0.1",
            listen_port=self.router_port,
            # One name across restarts: the router resolves the prepared transactions its
            # previous run left in doubt by this name.
            name="local",
            read_policy="balance",
            auth_method="scram-sha-256" if self.password is not None else "trust",
            users_file=users_file,
            tls_cert=None,
            tls_key=None,
            max_message_size=64 * 1024 * 1024,
            backend_user=None,
            backend_password=self.password,
            state_db=self.directory / STATE_DB,
        )
        group = Group("default", tuple(Node(n.name, n.router_host, n.port) for n in self.nodes))
        return Config(router=settings, group=group)


def stop_left_running(directory: Path) -> list[str]:
    """Stop the router and the nodes of a cluster directory; return what was done."""
    cluster = LocalCluster(directory)
    state = cluster.read_state()
    done: list[str] = []
    pid = state.get("router_pid")
    if isinstance(pid, int) and pid > 0 and _is_pgquorum(pid):
        try:
            os.kill(pid, signal.SIGTERM)
            done.append(f"sent SIGTERM to router process {pid}")
        except ProcessLookupError:
            pass
    if state:
        cluster._save_state({**state, "router_pid": None})  # never signal that pid again
    for p in sorted(cluster.directory.glob("node*")):
        if (p / "postmaster.pid").exists():
            node = LocalNode(p.name, p, 0, cluster.binaries)
            node.stop()
            done.append(f"stopped {p.name}")
    return done


def start_if_down(directory: Path, name: str) -> bool:
    """Start node ``name`` of a local cluster if its server is not running (crashed,
    killed); True if it was started. False too when ``directory`` holds no such node."""
    cluster = LocalCluster(directory)
    nodes = cluster.read_state().get("nodes")
    entry = (
        next(
            (n for n in nodes if isinstance(n, dict) and n.get("name") == name),
            None,
        )
        if isinstance(nodes, list)
        else None
    )
    if entry is None or not (cluster.directory / name / "PG_VERSION").exists():
        return False
    node = LocalNode(name, cluster.directory / name, int(entry["port"]), cluster.binaries)
    if node.is_running():
        return False
    node.start()
    return True


def _is_pgquorum(pid: int) -> bool:
    """Whether a process id still belongs to a pgquorum process (ids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"pgquorum" in cmdline
