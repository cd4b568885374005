"""Router configuration: a TOML file, validated up front.

Every problem is collected before anything is reported, so one run of the router shows a
person all that is wrong with the file instead of one mistake per attempt.
"""

from __future__ import annotations

import difflib
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cluster.model import Group, Node
from .protocol.auth import METHODS, load_users
from .protocol.framing import DEFAULT_MAX_MESSAGE_SIZE

READ_POLICIES = ("balance", "all", "lead")
DEFAULT_STATE_DB = "pgquorum-state.db"  # next to the configuration file
AUTH_METHODS = METHODS

# Smaller than this and ordinary catalog queries would not fit; PostgreSQL itself caps
# messages at 1 GB.
MIN_MESSAGE_SIZE = 8192
MAX_MESSAGE_SIZE = 1 << 30


class ConfigError(Exception):
    """The configuration is unusable. ``problems`` lists every problem as "where: what".

    Node positions are 0-based, as in ``group.nodes[0]`` for the first node.
    """

    def __init__(self, problems: list[str], source: str | Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        where = f" in {self.source}" if self.source is not None else ""
        head = f"{n} problem{'s' if n != 1 else ''} in the configuration{where}:"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


@dataclass(frozen=True)
class RouterSettings:
    listen_host: str
    listen_port: int
    name: str
    read_policy: str
    auth_method: str
    users_file: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    max_message_size: int
    backend_user: str | None
    backend_password: str | None
    # The state database (node states, events, commit decisions); None keeps it in memory,
    # for tests and embedding only: a restart then forgets failed nodes and decisions.
    state_db: Path | None = None
    # Other routers in front of the same group ("host:port" of their listen addresses): told
    # at once when this router fails a node, asked for node states at start-up.
    peers: tuple[tuple[str, int], ...] = ()
    # Volatile functions the operator vouches for: same result on every node for the same
    # arguments (otherwise a write calling them is refused).
    deterministic_functions: frozenset[str] = frozenset()
    # A node that has not answered a statement this long after the lead did (plus as long as
    # the lead took) is failed; 0 waits for ever.
    node_timeout_s: float = 30.0
    # Router processes sharing the listen port (SO_REUSEPORT); "auto" in the file = CPUs.
    workers: int = 1
    # Set for each worker of several (see router/workers.py): the directory of its private
    # Unix socket, on which its siblings reach its admin console and cancel keys.
    private_dir: Path | None = None


@dataclass(frozen=True)
class Config:
    router: RouterSettings
    group: Group


def load_config(path: Path) -> Config:
    """Read and validate a configuration file; raises ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"cannot read the file: {e.strerror or e}"], path) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"not valid UTF-8 at byte {e.start}"], path) from None
    except tomllib.TOMLDecodeError as e:
        # The message carries "(at line N, column M)".
        raise ConfigError([f"invalid TOML: {e}"], path) from None
    try:
        return parse_config(data, path.parent)
    except ConfigError as e:
        raise ConfigError(e.problems, path) from None


_MISSING = object()


class _Checker:
    """Collects problems while reading one table; every getter returns None on a problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def add(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    def table(self, parent: dict[str, Any], key: str, where: str, *, required: bool) -> dict | None:
        value = parent.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.add(where, f"missing required table [{where}]")
            return None
        if not isinstance(value, dict):
            self.add(where, f"must be a table [{where}], got {_show(value)}")
            return None
        return value

    def unknown_keys(self, table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.add(_join(where, key), f"unknown key{hint}")

    def get(
        self,
        table: dict[str, Any],
        key: str,
        where: str,
        check: Callable[[Any], str | None],
        *,
        required: bool = False,
    ) -> Any:
        """table[key] if ``check`` passes it (returns None), else record the problem."""
        here = _join(where, key)
        value = table.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.add(here, "missing (required)")
            return None
        problem = check(value)
        if problem is not None:
            self.add(here, f"{problem}, got {_show(value)}")
            return None
        return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _workers(value: Any) -> str | None:
    if value == "auto":
        return None
    return _int_range(1, 64)(value) and 'must be "auto" or an integer 1-64'


def _string_list(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "must be an array of strings"


def _nonempty_string(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    return None if value.strip() else "must not be empty"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _int_range(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        # bool is an int subclass in Python; `port = true` is a mistake, not port 1.
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        return None if ok else f"must be an integer {lo}-{hi}"

    return check


def _non_negative_number(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be a number >= 0"


def _split_listen(value: str) -> tuple[str, int] | str:
    """(host, port) from "host:port" or "[v6]:port", or a description of what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        return 'must be "host:port"'
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return 'must be "host:port" (IPv6 as "[addr]:port")'
        host = host[1:-1]
    elif ":" in host:
        return 'must be "host:port", with an IPv6 address in brackets: "[addr]:port"'
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return "port must be an integer 0-65535"
    return host, int(port_text)


def parse_config(data: dict, base_dir: Path) -> Config:
    """Validate parsed TOML; relative paths are taken relative to ``base_dir``."""
    problems: list[str] = []
    c = _Checker(problems)
    base_dir = Path(base_dir)
    c.unknown_keys(data, ("router", "backend", "group"), "")

    router = _parse_router(c, data, base_dir)
    group = _parse_group(c, data)

    if router is not None and group is not None:
        for i, node in enumerate(group.nodes):
            if (node.host, node.port) == (router.listen_host, router.listen_port):
                c.add(f"group.nodes[{i}]", f"is the router's own listen address {node.address}")

    if problems:
        raise ConfigError(problems)
    assert router is not None and group is not None
    return Config(router, group)


def _path(c: _Checker, table: dict, key: str, where: str, base_dir: Path) -> Path | None:
    text = c.get(table, key, where, _nonempty_string)
    if text is None:
        return None
    path = base_dir / Path(text).expanduser()
    if not path.exists():
        c.add(_join(where, key), f"file {str(path)!r} does not exist")
        return None
    if not path.is_file():
        c.add(_join(where, key), f"{str(path)!r} is not a file")
        return None
    return path


def _parse_router(c: _Checker, data: dict, base_dir: Path) -> RouterSettings | None:
    start = len(c.problems)
    router = c.table(data, "router", "router", required=True) or {}
    c.unknown_keys(
        router,
        (
            "listen",
            "name",
            "read_policy",
            "auth_method",
            "users_file",
            "tls_cert",
            "tls_key",
            "max_message_size",
            "node_timeout_s",
            "workers",
            "state_db",
            "peers",
            "deterministic_functions",
        ),
        "router",
    )
    listen_host, listen_port = "", 0
    listen = c.get(router, "listen", "router", _nonempty_string, required=True)
    if listen is not None:
        parsed = _split_listen(listen)
        if isinstance(parsed, str):
            c.add("router.listen", f"{parsed}, got {listen!r}")
        else:
            listen_host, listen_port = parsed

    name = c.get(router, "name", "router", _nonempty_string)
    if name is None:
        name = f"{socket.gethostname()}:{listen_port}"
    read_policy = c.get(router, "read_policy", "router", _one_of(READ_POLICIES))
    auth_method = c.get(router, "auth_method", "router", _one_of(AUTH_METHODS), required=True)

    users_file = _path(c, router, "users_file", "router", base_dir)
    if users_file is not None:
        try:
            load_users(users_file)
        except (OSError, ValueError) as e:
            c.add("router.users_file", str(e))
    elif auth_method not in (None, "trust") and "users_file" not in router:
        c.add("router.users_file", f'missing: required when auth_method is "{auth_method}"')

    tls_cert = _path(c, router, "tls_cert", "router", base_dir)
    tls_key = _path(c, router, "tls_key", "router", base_dir)
    if ("tls_cert" in router) != ("tls_key" in router):
        given, missing = (
            ("tls_cert", "tls_key") if "tls_cert" in router else ("tls_key", "tls_cert")
        )
        c.add(f"router.{missing}", f"missing: required when {given} is set (give both or neither)")

    max_size = c.get(
        router,
        "max_message_size",
        "router",
        _int_range(MIN_MESSAGE_SIZE, MAX_MESSAGE_SIZE),
    )
    node_timeout = c.get(router, "node_timeout_s", "router", _non_negative_number)
    state_text = c.get(router, "state_db", "router", _nonempty_string)
    state_db = base_dir / Path(state_text or DEFAULT_STATE_DB).expanduser()
    if state_db.exists() and not state_db.is_file():
        c.add("router.state_db", f"{str(state_db)!r} is not a file")

    peers: list[tuple[str, int]] = []
    raw_peers = c.get(router, "peers", "router", _string_list)
    for i, text in enumerate(raw_peers or ()):
        parsed = _split_listen(text)
        if isinstance(parsed, str):
            c.add(f"router.peers[{i}]", f"{parsed}, got {text!r}")
        elif parsed == (listen_host, listen_port):
            c.add(f"router.peers[{i}]", f"is this router's own listen address {text}")
        else:
            peers.append(parsed)

    deterministic = c.get(router, "deterministic_functions", "router", _string_list) or []
    workers = c.get(router, "workers", "router", _workers)

    backend = c.table(data, "backend", "backend", required=False) or {}
    c.unknown_keys(backend, ("user", "password"), "backend")
    backend_user = c.get(backend, "user", "backend", _string)
    backend_password = c.get(backend, "password", "backend", _string)

    if len(c.problems) > start:
        return None
    return RouterSettings(
        listen_host=listen_host,
        listen_port=listen_port,
        name=name,
        read_policy=read_policy or "balance",
        auth_method=auth_method,
        users_file=users_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_message_size=DEFAULT_MAX_MESSAGE_SIZE if max_size is None else max_size,
        # An empty string in the file means "not set", so an example file can list the keys.
        backend_user=backend_user or None,
        backend_password=backend_password or None,
        state_db=state_db,
        peers=tuple(peers),
        deterministic_functions=frozenset(deterministic),
        node_timeout_s=30.0 if node_timeout is None else float(node_timeout),
        workers=(os.cpu_count() or 1) if workers == "auto" else (workers or 1),
    )


def _parse_group(c: _Checker, data: dict) -> Group | None:
    start = len(c.problems)
    group = c.table(data, "group", "group", required=True)
    if group is None:
        return None
    c.unknown_keys(group, ("name", "nodes"), "group")
    name = c.get(group, "name", "group", _nonempty_string) or "default"
    raw_nodes = group.get("nodes", _MISSING)
    if raw_nodes is _MISSING:
        c.add("group.nodes", "missing: at least one [[group.nodes]] is required")
        return None
    if not isinstance(raw_nodes, list):
        c.add("group.nodes", f"must be an array of tables [[group.nodes]], got {_show(raw_nodes)}")
        return None
    if not raw_nodes:
        c.add("group.nodes", "must list at least one node")
        return None

    nodes: list[Node] = []
    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for i, raw in enumerate(raw_nodes):
        where = f"group.nodes[{i}]"
        if not isinstance(raw, dict):
            c.add(where, f"must be a table, got {_show(raw)}")
            continue
        c.unknown_keys(raw, ("name", "host", "port"), where)
        node_name = c.get(raw, "name", where, _nonempty_string, required=True)
        host = c.get(raw, "host", where, _nonempty_string, required=True)
        port = c.get(raw, "port", where, _int_range(1, 65535))
        if port is None and "port" not in raw:
            port = 5432
        if node_name is not None:
            if node_name in names:
                c.add(
                    f"{where}.name",
                    f"duplicate node name {node_name!r} (also group.nodes[{names[node_name]}])",
                )
            else:
                names[node_name] = i
        if host is not None and port is not None:
            # Host names are case-insensitive; no DNS lookups here, so aliases go unnoticed.
            key = (host.lower(), port)
            if key in addresses:
                c.add(
                    where,
                    f"duplicate address {host}:{port} (also group.nodes[{addresses[key]}])",
                )
            else:
                addresses[key] = i
        if node_name is not None and host is not None and port is not None:
            nodes.append(Node(node_name, host, port))

    if len(c.problems) > start:
        return None
    return Group(name, tuple(nodes))
