"""Rebuilding a node from a consistent snapshot of another (recovery/restore.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from helpers import connect
from pgquorum.cluster.model import Node
from pgquorum.local.instance import LocalNode
from pgquorum.recovery.restore import (
    Credentials,
    RestoreError,
    SnapshotSet,
    copy_database,
    dump_globals,
    reset_node,
    restore_globals,
)

CREDS = Credentials("postgres", None)  # the local test servers trust 127.0.0.1 and the socket

SOURCE_SETUP = {
    "postgres": [
        "CREATE ROLE app LOGIN PASSWORD 'secret'",
        "CREATE DATABASE shop OWNER app",
        "CREATE DATABASE inventory",
        "CREATE TABLE notes (id int PRIMARY KEY, body text)",
        "INSERT INTO notes VALUES (1, 'kept in postgres')",
    ],
    "shop": [
        "SET ROLE app",
        "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL)",
        "CREATE TABLE orders (id serial PRIMARY KEY,"
        " customer_id int NOT NULL REFERENCES customers, amount numeric NOT NULL)",
        "CREATE INDEX orders_amount ON orders (amount)",
        "INSERT INTO customers (name) SELECT 'c' || g FROM generate_series(1, 50) g",
        "INSERT INTO orders (customer_id, amount)"
        " SELECT 1 + g % 50, g * 1.5 FROM generate_series(1, 500) g",
    ],
    "inventory": [
        "CREATE TABLE items (sku text PRIMARY KEY, qty int NOT NULL)",
        "INSERT INTO items SELECT 'sku' || g, g FROM generate_series(1, 100) g",
        "CREATE SEQUENCE tickets",
        "SELECT nextval('tickets') FROM generate_series(1, 7)",
    ],
}
# Written on the source after the snapshot: none of it may reach the target.
AFTER_EXPORT = {
    "postgres": ["INSERT INTO notes VALUES (2, 'too late')"],
    "shop": [
        "INSERT INTO customers (name) VALUES ('late')",
        "INSERT INTO orders (customer_id, amount) VALUES (1, 9999)",
        "UPDATE orders SET amount = 0 WHERE id = 1",
        "DELETE FROM orders WHERE id = 2",
    ],
    "inventory": ["UPDATE items SET qty = -1", "SELECT nextval('tickets')"],
}
TABLES = {
    "postgres": ["notes"],
    "shop": ["customers", "orders"],
    "inventory": ["items"],
}
SEQUENCES = {"shop": ["customers_id_seq", "orders_id_seq"], "inventory": ["tickets"]}


@pytest.fixture(scope="module")
def pair(make_nodes) -> tuple[LocalNode, LocalNode]:  # type: ignore[no-untyped-def]
    source, target = make_nodes(2)
    return source, target


def run_sql(node: LocalNode, db: str, statements: list[str]) -> None:
    with connect(node, db) as conn:
        for sql in statements:
            conn.execute(sql)


def rows(node: LocalNode, db: str, table: str) -> list[tuple[object, ...]]:
    with connect(node, db) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()


def one(node: LocalNode, db: str, sql: str) -> list[tuple[object, ...]]:
    with connect(node, db) as conn:
        return conn.execute(sql).fetchall()


DATABASES = "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1"


def test_target_becomes_the_source_as_of_the_snapshot(
    pair: tuple[LocalNode, LocalNode], tmp_path: Path
) -> None:
    src, dst = pair
    for db, statements in SOURCE_SETUP.items():
        run_sql(src, db, statements)
    # Junk on the target: a database, a table in postgres, prepared transactions holding both.
    run_sql(dst, "postgres", ["CREATE DATABASE junk"])
    for db in ("junk", "postgres"):
        with psycopg.connect(dst.dsn(db), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS junk_table (x int)")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO junk_table VALUES (1)")
            conn.execute(f"PREPARE TRANSACTION 'junk in {db}'")
    assert len(one(dst, "postgres", "SELECT gid FROM pg_prepared_xacts")) == 2

    expected = {db: {t: rows(src, db, t) for t in tables} for db, tables in TABLES.items()}
    # The source through its Unix socket directory, the target over TCP.
    source = Node("node1", src.router_host, src.port)
    target = Node("node2", dst.host, dst.port)
    progress: dict[str, list[int]] = {}

    async def recover() -> dict[str, int]:
        snaps = await SnapshotSet.open(source, CREDS)  # before the (here imagined) pause
        try:
            # A database created between open and export is exported too.
            await asyncio.to_thread(run_sql, src, "postgres", ["CREATE DATABASE late"])
            await snaps.export()
            assert sorted(snaps.databases) == ["inventory", "late", "postgres", "shop"]
            await asyncio.to_thread(
                lambda: [run_sql(src, db, sql) for db, sql in AFTER_EXPORT.items()]
            )
            globals_sql = await dump_globals(source, CREDS)
            await reset_node(target, CREDS)
            await restore_globals(target, CREDS, globals_sql)
            sizes = await asyncio.gather(
                *(
                    copy_database(
                        source,
                        target,
                        CREDS,
                        db,
                        snap,
                        tmp_path,
                        progress=progress.setdefault(db, []).append,
                    )
                    for db, snap in snaps.databases.items()
                )
            )
            return dict(zip(snaps.databases, sizes, strict=True))
        finally:
            snaps.close()

    sizes = asyncio.run(asyncio.wait_for(recover(), 120))

    assert one(dst, "postgres", DATABASES) == one(src, "postgres", DATABASES)
    assert one(dst, "postgres", "SELECT gid FROM pg_prepared_xacts") == []
    for db, tables in TABLES.items():
        for table in tables:
            assert rows(dst, db, table) == expected[db][table], (db, table)
            assert rows(src, db, table) != expected[db][table]  # the later writes are there
    role = "SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = 'app'"
    assert one(dst, "postgres", role) == one(src, "postgres", role) != []
    owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'shop'"
    assert one(dst, "postgres", owner) == [("app",)]
    indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
    assert one(dst, "shop", indexes) == one(src, "shop", indexes)
    # Sequences are not transactional: pg_dump reads their state when it dumps them, so the
    # target has the source's current values, past the snapshot (a gap, never a reuse).
    for db, seqs in SEQUENCES.items():
        for seq in seqs:
            state = f"SELECT last_value, is_called FROM {seq}"
            assert one(dst, db, state) == one(src, db, state), (db, seq)
    with connect(dst, "shop") as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO orders (customer_id, amount) VALUES (12345, 1)")

    for db, calls in progress.items():
        assert calls and calls == sorted(calls) and calls[-1] == sizes[db] > 0, db
    assert list(tmp_path.iterdir()) == []  # the dumps are gone


def test_a_bad_snapshot_fails_naming_pg_dump(
    pair: tuple[LocalNode, LocalNode], tmp_path: Path
) -> None:
    src, dst = pair
    source = Node("node1", src.host, src.port)
    target = Node("node2", dst.host, dst.port)
    with pytest.raises(RestoreError) as err:
        asyncio.run(
            copy_database(source, target, CREDS, "postgres", "00000003-0000001B-1", tmp_path)
        )
    msg = str(err.value)
    assert "pg_dump" in msg and "'postgres'" in msg and "snapshot" in msg, msg
    assert list(tmp_path.iterdir()) == []
