"""Bad input gets a proper ErrorResponse with the right SQLSTATE, and nobody else is hurt."""

from __future__ import annotations

import socket
import struct

import psycopg
import pytest
from router_harness import RouterThread, router_config, write_users

from pgquorum.local.instance import LocalNode
from pgquorum.protocol import messages as m
from pgquorum.protocol.framing import Framer


def raw_session(router: RouterThread, db: str = "postgres") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    s.sendall(m.encode_startup({"user": "postgres", "database": db}))
    read_until_ready(s)
    return s


def read_messages(s: socket.socket) -> list[tuple[int, bytes]]:
    """Read until ReadyForQuery or the connection closes."""
    framer = Framer()
    out: list[tuple[int, bytes]] = []
    while True:
        data = s.recv(65536)
        if not data:
            return out
        framer.feed(data)
        while (msg := framer.next_message()) is not None:
            out.append(msg)
            if msg[0] == m.READY_FOR_QUERY:
                return out


def read_until_ready(s: socket.socket) -> list[tuple[int, bytes]]:
    msgs = read_messages(s)
    assert msgs and msgs[-1][0] == m.READY_FOR_QUERY, msgs
    return msgs


def error_of(msgs: list[tuple[int, bytes]]) -> dict[str, str]:
    errors = [m.parse_error_fields(p) for t, p in msgs if t == m.ERROR_RESPONSE]
    assert errors, f"no ErrorResponse in {msgs}"
    return errors[0]


def assert_router_still_serves(router: RouterThread) -> None:
    with psycopg.connect(router.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


def test_unknown_message_type(router: RouterThread) -> None:
    s = raw_session(router)
    s.sendall(m.frame(ord("y"), b"junk"))
    err = error_of(read_messages(s))
    assert err["C"] == "08P01" and err["S"] == "FATAL"
    assert s.recv(100) == b""
    assert_router_still_serves(router)


def test_malformed_bind(router: RouterThread) -> None:
    s = raw_session(router)
    s.sendall(m.frame(m.BIND, b"\0\0\x00\x05") + m.SYNC_MESSAGE)
    err = error_of(read_messages(s))
    assert err["C"] == "08P01"
    assert "Bind" in err["M"]
    assert_router_still_serves(router)


def test_oversized_message(router: RouterThread) -> None:
    s = raw_session(router)
    s.sendall(bytes([m.QUERY]) + struct.pack("!i", 0x7FFFFFF0))
    err = error_of(read_messages(s))
    assert err["C"] == "08P01" and "limit" in err["M"]
    assert_router_still_serves(router)


def test_bad_message_length(router: RouterThread) -> None:
    s = raw_session(router)
    s.sendall(bytes([m.QUERY]) + struct.pack("!i", 2))
    assert error_of(read_messages(s))["C"] == "08P01"


def test_garbage_startup(router: RouterThread) -> None:
    s = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    s.sendall(struct.pack("!i", 3) + b"abc")
    assert error_of(read_messages(s))["C"] == "08P01"
    s = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    s.sendall(struct.pack("!ii", 8, 0x00020000))
    assert error_of(read_messages(s))["C"] == "0A000"
    assert_router_still_serves(router)


def test_disconnect_mid_message(router: RouterThread) -> None:
    s = raw_session(router)
    s.sendall(m.encode_query("SELECT 1")[:6])
    s.close()
    assert_router_still_serves(router)


def test_unknown_database(router: RouterThread) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(router.dsn("no_such_db"))
    assert "does not exist" in str(info.value)
    s = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    s.sendall(m.encode_startup({"user": "postgres", "database": "no_such_db"}))
    assert error_of(read_messages(s))["C"] == "3D000"
    assert_router_still_serves(router)


def test_function_call_protocol_refused(router: RouterThread) -> None:
    s = raw_session(router)
    s.sendall(m.frame(m.FUNCTION_CALL, b"\0\0\0\x01\0\0\0\0\0\0"))
    msgs = read_until_ready(s)
    assert error_of(msgs)["C"] == "0A000"
    s.sendall(m.encode_query("SELECT 1"))
    assert any(t == m.DATA_ROW for t, _ in read_until_ready(s))


def test_ssl_refused_without_certificate(router: RouterThread) -> None:
    s = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    s.sendall(m.encode_ssl_request())
    assert s.recv(1) == b"N"
    with psycopg.connect(router.dsn(sslmode="prefer"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture(scope="module")
def password_router(make_nodes, tmp_path_factory) -> RouterThread:  # type: ignore[no-untyped-def]
    nodes: list[LocalNode] = make_nodes(2, password="nodesecret")
    users = write_users(
        tmp_path_factory.mktemp("users") / "users.txt",
        {"postgres": "nodesecret", "alice": "alicepw"},
    )
    rt = RouterThread(router_config(nodes, auth_method="scram-sha-256", users_file=users))
    yield rt
    rt.stop()


def test_scram_password(password_router: RouterThread) -> None:
    with psycopg.connect(password_router.dsn(password="nodesecret"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_wrong_password(password_router: RouterThread) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(password_router.dsn(password="wrong"))
    assert "password authentication failed" in str(info.value)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(password_router.dsn(user="mallory", password="x"))
    with psycopg.connect(password_router.dsn(password="nodesecret"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_md5_client_auth(make_nodes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    nodes: list[LocalNode] = make_nodes(2, password="pw2")
    users = write_users(tmp_path / "users.txt", {"postgres": "pw2"})
    rt = RouterThread(router_config(nodes, auth_method="md5", users_file=users))
    try:
        with psycopg.connect(rt.dsn(password="pw2"), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(rt.dsn(password="nope"))
    finally:
        rt.stop()


def test_portal_bound_before_an_earlier_execute_is_refused(router: RouterThread, db: str) -> None:
    """Two portals bound before either runs cannot each get their own serial value from
    one rewrite: refused (0A000), nothing runs, nothing diverges (the db fixture compares
    the nodes)."""
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE s (id serial PRIMARY KEY, name text)")
    s = raw_session(router, db)
    no_params = struct.pack("!hhh", 0, 0, 0)
    s.sendall(
        m.encode_parse("ins", "INSERT INTO s (name) VALUES ('x')")
        + m.frame(m.BIND, b"p1\0ins\0" + no_params)
        + m.frame(m.BIND, b"p2\0ins\0" + no_params)
        + m.frame(m.EXECUTE, b"p1\0" + struct.pack("!i", 0))
        + m.frame(m.EXECUTE, b"p2\0" + struct.pack("!i", 0))
        + m.SYNC_MESSAGE
    )
    err = error_of(read_until_ready(s))
    assert err["C"] == "0A000" and "'p2'" in err["M"], err
    s.close()
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM s").fetchone() == (0,)
    assert_router_still_serves(router)
