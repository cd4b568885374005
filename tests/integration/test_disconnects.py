"""Clients that vanish at any point: the nodes end identical and nothing half-done remains."""

from __future__ import annotations

import socket
import time

import psycopg
from router_harness import RouterThread

from pgquorum.local.instance import LocalNode
from pgquorum.protocol import messages as m
from pgquorum.protocol.framing import Framer


def _session(router: RouterThread, db: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", router.port), timeout=10)
    s.sendall(m.encode_startup({"user": "postgres", "database": db}))
    _until_ready(s)
    return s


def _until_ready(s: socket.socket) -> list[tuple[int, bytes]]:
    framer, out = Framer(), []
    while True:
        data = s.recv(65536)
        assert data, "router closed the connection"
        framer.feed(data)
        while (msg := framer.next_message()) is not None:
            out.append(msg)
            if msg[0] == m.READY_FOR_QUERY:
                return out


def _count_everywhere(nodes: list[LocalNode], db: str, table: str) -> set[str]:
    return {n.psql(f"SELECT count(*) FROM {table}", database=db) for n in nodes}


def _wait_sessions_gone(router: RouterThread, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while router.router.sessions and time.time() < deadline:
        time.sleep(0.05)


def test_disconnect_inside_a_transaction_rolls_back_everywhere(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE dt (id int)")
    s = _session(router, db)
    s.sendall(m.encode_query("BEGIN; INSERT INTO dt VALUES (1)"))
    _until_ready(s)
    s.sendall(m.encode_query("INSERT INTO dt VALUES (2)"))
    _until_ready(s)
    s.close()
    _wait_sessions_gone(router)
    time.sleep(0.5)
    assert _count_everywhere(pg_nodes, db, "dt") == {"0"}


def test_disconnect_during_copy_in_copies_nothing(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE dc (id int)")
    s = _session(router, db)
    s.sendall(m.encode_query("COPY dc FROM STDIN"))
    framer = Framer()
    while True:
        framer.feed(s.recv(65536))
        msg = framer.next_message()
        if msg is not None:
            assert msg[0] == m.COPY_IN_RESPONSE
            break
    s.sendall(b"".join(m.frame(m.COPY_DATA, f"{i}\n".encode()) for i in range(1000)))
    s.close()
    _wait_sessions_gone(router)
    time.sleep(0.5)
    assert _count_everywhere(pg_nodes, db, "dc") == {"0"}


def test_disconnect_while_a_write_runs_finishes_it_everywhere(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE dw (id int)")
    s = _session(router, db)
    # The client leaves while the lead is still working: the router still runs the statement
    # on the other nodes, so all of them agree (the `db` fixture compares them).
    s.sendall(m.encode_query("INSERT INTO dw SELECT g FROM generate_series(1, 3) g, pg_sleep(0.5)"))
    time.sleep(0.1)
    s.close()
    _wait_sessions_gone(router)
    time.sleep(1.5)
    assert _count_everywhere(pg_nodes, db, "dw") == {"3"}


def test_terminate_mid_pipeline(router: RouterThread, db: str, pg_nodes: list[LocalNode]) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE dp (id int)")
    s = _session(router, db)
    s.sendall(
        m.encode_parse("", "INSERT INTO dp VALUES (1)")
        + m.frame(m.BIND, b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0")
        + m.frame(m.EXECUTE, b"\0" + b"\0\0\0\0")
        + m.TERMINATE_MESSAGE
    )
    s.close()
    _wait_sessions_gone(router)
    time.sleep(0.5)
    # No Sync ever came: the unit never ran anywhere.
    assert _count_everywhere(pg_nodes, db, "dp") == {"0"}
