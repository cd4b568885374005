"""Loading and validating the router's TOML configuration."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pgquorum.cluster.model import Group, Node
from pgquorum.config import (
    Config,
    ConfigError,
    RouterSettings,
    load_config,
    parse_config,
)
from pgquorum.protocol.framing import DEFAULT_MAX_MESSAGE_SIZE

FULL = """
[router]
listen = "127.0.0.1:6432"
name = "router1"
read_policy = "all"
auth_method = "scram-sha-256"
users_file = "users.txt"
tls_cert = "server.crt"
tls_key = "server.key"
max_message_size = 1048576
node_timeout_s = 0
state_db = "state/router1.db"

[backend]
user = "router"
password = "secret"

[group]
name = "main"

[[group.nodes]]
name = "node1"
host = "127.0.0.1"
port = 5432

[[group.nodes]]
name = "node2"
host = "db2.example"
port = 5433
"""

MINIMAL = """
[router]
listen = "0.0.0.0:6432"
auth_method = "trust"

[group]
[[group.nodes]]
name = "n1"
host = "localhost"
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "users.txt").write_text('"alice" "pw"\n')
    (tmp_path / "server.crt").write_text("cert")
    (tmp_path / "server.key").write_text("key")
    return tmp_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgquorum.toml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, text))
    return excinfo.value.problems


def test_full_config(files: Path) -> None:
    config = load_config(write(files, FULL))
    assert config == Config(
        router=RouterSettings(
            listen_host="127.0.0.1",
            listen_port=6432,
            name="router1",
            read_policy="all",
            auth_method="scram-sha-256",
            users_file=files / "users.txt",
            tls_cert=files / "server.crt",
            tls_key=files / "server.key",
            max_message_size=1048576,
            backend_user="router",
            backend_password="secret",
            state_db=files / "state" / "router1.db",
            node_timeout_s=0.0,
        ),
        group=Group(
            "main",
            (Node("node1", "127.0.0.1", 5432), Node("node2", "db2.example", 5433)),
        ),
    )


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    r = config.router
    assert (r.listen_host, r.listen_port) == ("0.0.0.0", 6432)
    assert r.name == f"{socket.gethostname()}:6432"
    assert r.read_policy == "balance"
    assert r.auth_method == "trust"
    assert r.users_file is r.tls_cert is r.tls_key is None
    assert r.max_message_size == DEFAULT_MAX_MESSAGE_SIZE
    assert r.backend_user is r.backend_password is None
    assert r.state_db == tmp_path / "pgquorum-state.db"  # next to the file
    assert config.group == Group("default", (Node("n1", "localhost", 5432),))


def test_state_db_must_not_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "somedir").mkdir()
    problems = problems_of(tmp_path, MINIMAL.replace("[group]", 'state_db = "somedir"\n[group]'))
    assert any(p.startswith("router.state_db:") and "is not a file" in p for p in problems)


def test_empty_backend_strings_mean_unset(tmp_path: Path) -> None:
    text = MINIMAL + '\n[backend]\nuser = ""\npassword = ""\n'
    r = load_config(write(tmp_path, text)).router
    assert r.backend_user is None and r.backend_password is None


def test_example_from_docs(files: Path) -> None:
    text = """
[router]
listen = "127.0.0.1:6432"     # host:port
name = "router1"              # default: hostname:port
read_policy = "balance"       # balance | all | lead
auth_method = "trust"         # trust | md5 | scram-sha-256 (client authentication)
users_file = "users.txt"
tls_cert = "server.crt"       # optional; both or neither of tls_cert/tls_key
tls_key = "server.key"
max_message_size = 67108864   # optional
node_timeout_s = 30           # fail a node this late after the lead

[backend]
user = ""
password = ""

[group]
name = "default"

[[group.nodes]]
name = "node1"
host = "127.0.0.1"
port = 5432
"""
    config = load_config(write(files, text))
    assert config.router.max_message_size == 67108864
    assert config.group.nodes == (Node("node1", "127.0.0.1", 5432),)


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("localhost:5000", "localhost", 5000),
        ("[::1]:6432", "::1", 6432),
        ("[::]:6432", "::", 6432),
        ("127.0.0.1:0", "127.0.0.1", 0),  # let the OS pick, for tests
    ],
)
def test_listen_forms(tmp_path: Path, listen: str, host: str, port: int) -> None:
    text = MINIMAL.replace('"0.0.0.0:6432"', f'"{listen}"')
    r = load_config(write(tmp_path, text)).router
    assert (r.listen_host, r.listen_port) == (host, port)


@pytest.mark.parametrize(
    "listen", ["6432", ":6432", "host:", "host:abc", "::1:6432", "h:70000", "[::1:5"]
)
def test_bad_listen(tmp_path: Path, listen: str) -> None:
    (problem,) = problems_of(tmp_path, MINIMAL.replace('"0.0.0.0:6432"', f'"{listen}"'))
    assert problem.startswith("router.listen: ")
    assert repr(listen) in problem


def test_relative_and_absolute_paths(files: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    users = elsewhere / "u.txt"
    users.write_text('"a" "b"\n')
    text = FULL.replace('"users.txt"', f'"{users}"')
    config = load_config(write(files, text))
    assert config.router.users_file == users
    assert config.router.tls_cert == files / "server.crt"


def test_parse_config_relative_to_base_dir(files: Path) -> None:
    import tomllib

    config = parse_config(tomllib.loads(FULL), files)
    assert config.router.users_file == files / "users.txt"


def test_every_problem_is_reported(tmp_path: Path) -> None:
    text = """
unknown_section = 1

[router]
listen = 6432
lisen = "x"
read_policy = "random"
auth_method = "md5"
tls_cert = "missing.crt"
max_message_size = true
node_timeout_s = -1

[backend]
user = 5
pasword = "x"

[group]
name = ""

[[group.nodes]]
name = "a"
host = "h1"
port = 5432

[[group.nodes]]
name = "a"
host = "h2"
port = "abc"

[[group.nodes]]
name = "c"
host = "H1"
port = 5432
colour = "blue"

[[group.nodes]]
port = 0
"""
    problems = problems_of(tmp_path, text)
    expected = [
        "unknown_section: unknown key",
        "router.lisen: unknown key (did you mean 'listen'?)",
        "router.listen: must be a string, got 6432",
        "router.read_policy: must be one of balance, all, lead, got 'random'",
        'router.users_file: missing: required when auth_method is "md5"',
        f"router.tls_cert: file {str(tmp_path / 'missing.crt')!r} does not exist",
        "router.tls_key: missing: required when tls_cert is set (give both or neither)",
        "router.max_message_size: must be an integer 8192-1073741824, got True",
        "router.node_timeout_s: must be a number >= 0, got -1",
        "backend.pasword: unknown key (did you mean 'password'?)",
        "backend.user: must be a string, got 5",
        "group.name: must not be empty, got ''",
        "group.nodes[1].port: must be an integer 1-65535, got 'abc'",
        "group.nodes[1].name: duplicate node name 'a' (also group.nodes[0])",
        "group.nodes[2].colour: unknown key",
        "group.nodes[2]: duplicate address H1:5432 (also group.nodes[0])",
        "group.nodes[3].name: missing (required)",
        "group.nodes[3].host: missing (required)",
        "group.nodes[3].port: must be an integer 1-65535, got 0",
    ]
    assert sorted(problems) == sorted(expected)


def test_str_lists_problems_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\n[group]\nnodes = []\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    err = excinfo.value
    lines = str(err).splitlines()
    assert lines[0] == f"3 problems in the configuration in {path}:"
    assert lines[1:] == [f"  {p}" for p in err.problems]
    assert sorted(err.problems) == [
        "group.nodes: must list at least one node",
        "router.auth_method: missing (required)",
        "router.listen: missing (required)",
    ]


def test_single_problem_str(tmp_path: Path) -> None:
    err = ConfigError(["router.listen: missing (required)"])
    assert str(err) == "1 problem in the configuration:\n  router.listen: missing (required)"


def test_missing_sections(tmp_path: Path) -> None:
    assert sorted(problems_of(tmp_path, "")) == [
        "group: missing required table [group]",
        "router.auth_method: missing (required)",
        "router.listen: missing (required)",
        "router: missing required table [router]",
    ]


def test_sections_of_wrong_type(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, 'router = 1\nbackend = "x"\ngroup = [1]\n')
    assert "router: must be a table [router], got 1" in problems
    assert "backend: must be a table [backend], got 'x'" in problems
    assert "group: must be a table [group], got an array" in problems


@pytest.mark.parametrize(
    ("nodes", "problem"),
    [
        ("", "group.nodes: missing: at least one [[group.nodes]] is required"),
        ("nodes = []", "group.nodes: must list at least one node"),
        ("nodes = 3", "group.nodes: must be an array of tables [[group.nodes]], got 3"),
        ('nodes = ["a"]', "group.nodes[0]: must be a table, got 'a'"),
    ],
)
def test_bad_node_lists(tmp_path: Path, nodes: str, problem: str) -> None:
    text = f'[router]\nlisten = "h:1"\nauth_method = "trust"\n[group]\n{nodes}\n'
    assert problems_of(tmp_path, text) == [problem]


def test_node_on_router_address(tmp_path: Path) -> None:
    text = MINIMAL.replace('"0.0.0.0:6432"', '"localhost:5432"')
    assert problems_of(tmp_path, text) == [
        "group.nodes[0]: is the router's own listen address localhost:5432"
    ]


def test_auth_method_values(tmp_path: Path, files: Path) -> None:
    bad = MINIMAL.replace('"trust"', '"password"')
    assert problems_of(tmp_path, bad) == [
        "router.auth_method: must be one of trust, md5, scram-sha-256, got 'password'"
    ]
    for method in ("md5", "scram-sha-256"):
        text = MINIMAL.replace('"trust"', f'"{method}"\nusers_file = "users.txt"')
        assert load_config(write(files, text)).router.auth_method == method


def test_users_file_is_checked(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text('"alice" "pw"\nbroken line\n')
    text = MINIMAL.replace('"trust"', '"md5"\nusers_file = "users.txt"')
    (problem,) = problems_of(tmp_path, text)
    assert problem.startswith("router.users_file: ")
    assert "line 2" in problem and "double-quoted" in problem


def test_users_file_missing_or_directory(tmp_path: Path) -> None:
    text = MINIMAL.replace('"trust"', '"md5"\nusers_file = "nope.txt"')
    (problem,) = problems_of(tmp_path, text)
    assert problem == f"router.users_file: file {str(tmp_path / 'nope.txt')!r} does not exist"
    (tmp_path / "dir").mkdir()
    text = MINIMAL.replace('"trust"', '"md5"\nusers_file = "dir"')
    (problem,) = problems_of(tmp_path, text)
    assert problem == f"router.users_file: {str(tmp_path / 'dir')!r} is not a file"


def test_users_file_with_trust_is_allowed(files: Path) -> None:
    text = MINIMAL.replace('"trust"', '"trust"\nusers_file = "users.txt"')
    assert load_config(write(files, text)).router.users_file == files / "users.txt"


def test_tls_key_without_cert(files: Path) -> None:
    text = MINIMAL.replace('"trust"', '"trust"\ntls_key = "server.key"')
    assert problems_of(files, text) == [
        "router.tls_cert: missing: required when tls_key is set (give both or neither)"
    ]


@pytest.mark.parametrize(
    ("size", "ok"), [(8192, True), (8191, False), (1 << 30, True), ((1 << 30) + 1, False)]
)
def test_max_message_size_bounds(tmp_path: Path, size: int, ok: bool) -> None:
    text = MINIMAL.replace('"trust"', f'"trust"\nmax_message_size = {size}')
    if ok:
        assert load_config(write(tmp_path, text)).router.max_message_size == size
    else:
        assert problems_of(tmp_path, text)[0].startswith("router.max_message_size: ")


def test_node_timeout(tmp_path: Path) -> None:
    text = MINIMAL.replace('"trust"', '"trust"\nnode_timeout_s = 2.5')
    assert load_config(write(tmp_path, text)).router.node_timeout_s == 2.5
    assert load_config(write(tmp_path, MINIMAL)).router.node_timeout_s == 30.0


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[router]\nlisten = "a:1"\nauth_method = trust\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    (problem,) = excinfo.value.problems
    assert problem.startswith("invalid TOML: ")
    assert "line 3" in problem
    assert str(path) in str(excinfo.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "missing.toml")
    (problem,) = excinfo.value.problems
    assert problem.startswith("cannot read the file: ")
    with pytest.raises(ConfigError):
        load_config(tmp_path)  # a directory


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'[router]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


def test_config_error_is_an_exception_with_problems() -> None:
    err = ConfigError(["a: b", "c: d"], "x.toml")
    assert isinstance(err, Exception)
    assert err.problems == ["a: b", "c: d"]
    assert str(err) == "2 problems in the configuration in x.toml:\n  a: b\n  c: d"


def test_peers(tmp_path: Path) -> None:
    text = MINIMAL.replace("[group]", 'peers = ["10.0.0.2:6432", "[::1]:6433"]\n[group]')
    assert load_config(write(tmp_path, text)).router.peers == (("10.0.0.2", 6432), ("::1", 6433))
    bad = MINIMAL.replace("[group]", 'peers = ["nope", "0.0.0.0:6432"]\n[group]')
    problems = problems_of(tmp_path, bad)
    assert any(p.startswith("router.peers[0]:") for p in problems)
    assert any(p.startswith("router.peers[1]:") and "own listen address" in p for p in problems)
    problems = problems_of(tmp_path, MINIMAL.replace("[group]", 'peers = "a:1"\n[group]'))
    assert any(p.startswith("router.peers:") and "array of strings" in p for p in problems)
