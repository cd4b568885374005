"""The admin console: database `pgquorum` on the router port, via psql and psycopg."""

from __future__ import annotations

import socket
import subprocess

import psycopg
import pytest
from router_harness import RouterThread, client_cmd

from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode
from pgquorum.protocol import messages as m
from pgquorum.protocol.framing import Framer

NODE_COLUMNS = [
    "name",
    "host",
    "port",
    "role",
    "state",
    "statements",
    "outstanding",
    "divergences",
    "since",
    "reason",
]


def admin(router: RouterThread) -> psycopg.Connection:
    return psycopg.connect(router.dsn("pgquorum"), autocommit=True, connect_timeout=10)


def show(conn: psycopg.Connection, what: str) -> list[dict[str, str | None]]:
    cur = conn.execute(f"SHOW {what}")
    assert cur.description is not None
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def run_psql(
    pg_binaries: PgBinaries, router: RouterThread, sql: str, dbname: str = "pgquorum"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_cmd(pg_binaries, "psql", router, "-A", "-t", "-F", "|", "-w", "-c", sql, db=dbname),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_show_nodes_with_psql(
    router: RouterThread, pg_binaries: PgBinaries, pg_nodes: list[LocalNode]
) -> None:
    res = run_psql(pg_binaries, router, "SHOW NODES")
    assert res.returncode == 0, res.stderr
    rows = [line.split("|") for line in res.stdout.strip().splitlines()]
    assert [r[0] for r in rows] == ["node1", "node2", "node3"], res.stdout
    for r, node in zip(rows, pg_nodes, strict=True):
        assert len(r) == len(NODE_COLUMNS), r
        assert r[1] == node.router_host and r[2] == str(node.port)
        assert r[3] == ("lead" if node.name == "node1" else "replica"), r
        assert r[4] == "ONLINE", r
        assert int(r[5]) >= 0 and int(r[6]) >= 0 and int(r[7]) == 0, r


def test_show_nodes_with_psycopg_and_counters(router: RouterThread, db: str) -> None:
    with admin(router) as conn:
        before = show(conn, "NODES")
        assert list(before[0]) == NODE_COLUMNS
        assert [r["name"] for r in before] == ["node1", "node2", "node3"]
        assert [r["role"] for r in before] == ["lead", "replica", "replica"]
        assert {r["state"] for r in before} == {"ONLINE"}

        with psycopg.connect(router.dsn(db), autocommit=True) as client:
            client.execute("CREATE TABLE adm (id int PRIMARY KEY)")
            for i in range(10):
                client.execute("INSERT INTO adm VALUES (%s)", (i,))
            for _ in range(10):
                client.execute("SELECT count(*) FROM adm")

        after = show(conn, "NODES")
        # Writes go to every node, so every node's counter moved by at least 11.
        for b, a in zip(before, after, strict=True):
            assert a["name"] == b["name"]
            assert int(a["statements"] or 0) >= int(b["statements"] or 0) + 11, (b, a)
            assert a["state"] == "ONLINE"
        total_before = sum(int(r["statements"] or 0) for r in before)
        total_after = sum(int(r["statements"] or 0) for r in after)
        assert total_after >= total_before + 3 * 11 + 10


def test_show_sessions_lists_other_session(router: RouterThread) -> None:
    with psycopg.connect(router.dsn(application_name="admin_test_app"), autocommit=True) as other:
        other.execute("SELECT 1")
        with admin(router) as conn:
            rows = show(conn, "SESSIONS")
            mine = [r for r in rows if r["application_name"] == "admin_test_app"]
            assert len(mine) == 1, rows
            assert mine[0]["user"] == "postgres"
            assert mine[0]["database"] == "postgres"
            assert (mine[0]["client"] or "").startswith("127.0.0.1"), mine
            # The admin session itself is listed too.
            assert any(r["database"] == "pgquorum" for r in rows), rows
    with admin(router) as conn:
        rows = show(conn, "SESSIONS")
        assert not [r for r in rows if r["application_name"] == "admin_test_app"], rows


def test_show_sessions_with_psql(router: RouterThread, pg_binaries: PgBinaries) -> None:
    with psycopg.connect(router.dsn(application_name="psql_sees_me"), autocommit=True):
        res = run_psql(pg_binaries, router, "SHOW SESSIONS")
    assert res.returncode == 0, res.stderr
    assert "psql_sees_me" in res.stdout, res.stdout


def test_unknown_command_is_feature_not_supported(router: RouterThread) -> None:
    with admin(router) as conn:
        for sql in ("SHOW FOO", "SELECT 1", "CREATE TABLE x (id int)"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as exc:
                conn.execute(sql)
            assert exc.value.sqlstate == "0A000"
            assert "SHOW NODES" in str(exc.value)
            # The session keeps working after the error.
            assert [r["name"] for r in show(conn, "NODES")] == ["node1", "node2", "node3"]


def test_syntax_error_is_42601(router: RouterThread) -> None:
    with admin(router) as conn:
        for sql in ("SELEC 1", "SHOW"):
            with pytest.raises(psycopg.errors.SyntaxError) as exc:
                conn.execute(sql)
            assert exc.value.sqlstate == "42601"
            assert show(conn, "SESSIONS")


def test_help_and_several_commands_in_one_query(router: RouterThread) -> None:
    with admin(router) as conn:
        cmds = {r["command"] for r in show(conn, "HELP")}
        assert {"SHOW NODES", "SHOW SESSIONS"} <= cmds
        cur = conn.execute("SHOW NODES; SHOW SESSIONS")
        assert cur.description is not None and cur.description[0].name == "name"
        assert cur.nextset()
        assert cur.description is not None and cur.description[0].name == "id"


def test_psql_unknown_command_and_syntax_error(
    router: RouterThread, pg_binaries: PgBinaries
) -> None:
    res = run_psql(pg_binaries, router, "SHOW FOO")
    assert res.returncode != 0
    assert "unsupported admin command" in res.stderr, res.stderr
    res = run_psql(pg_binaries, router, "SELEC 1")
    assert res.returncode != 0
    assert "invalid admin command" in res.stderr, res.stderr


def test_extended_protocol_is_refused_but_session_survives(router: RouterThread) -> None:
    with admin(router) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("SHOW NODES", prepare=True)
        assert len(show(conn, "NODES")) == 3


def test_extended_protocol_batch_gets_one_error(router: RouterThread) -> None:
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
        s.sendall(m.encode_startup({"user": "postgres", "database": "pgquorum"}))
        assert read_until_ready(s)[-1][0] == m.READY_FOR_QUERY
        parse = m.frame(ord("P"), b"\0SHOW NODES\0\0\0")
        bind = m.frame(ord("B"), b"\0\0\0\0\0\0\0\0")
        execute = m.frame(ord("E"), b"\0\0\0\0\0")
        s.sendall(parse + bind + execute + m.frame(m.SYNC, b""))
        msgs = read_until_ready(s)
        errors = [t for t, _ in msgs if t == m.ERROR_RESPONSE]
        assert len(errors) == 1, [chr(t) for t, _ in msgs]
        # Still usable afterwards with the simple protocol.
        s.sendall(m.encode_query("SHOW NODES"))
        assert any(t == m.DATA_ROW for t, _ in read_until_ready(s))


def read_until_ready(s: socket.socket) -> list[tuple[int, bytes]]:
    framer = Framer()
    out: list[tuple[int, bytes]] = []
    while True:
        data = s.recv(65536)
        assert data, f"connection closed after {out}"
        framer.feed(data)
        while (msg := framer.next_message()) is not None:
            out.append(msg)
            if msg[0] == m.READY_FOR_QUERY:
                return out
