"""Helpers for integration tests that check several PostgreSQL nodes hold the same data.

Importable as `helpers` (tests/conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import psycopg
from psycopg import sql

from pgquorum.local.instance import LocalNode

__all__ = [
    "assert_nodes_identical",
    "connect",
    "fresh_database",
    "node_dump",
    "table_fingerprint",
    "user_tables",
]

_MAX_ROWS_SHOWN = 10


def connect(node: LocalNode, database: str = "postgres") -> psycopg.Connection:
    """An autocommit psycopg connection straight to `node` (bypassing any router)."""
    return psycopg.connect(node.dsn(database), autocommit=True, connect_timeout=10)


def fresh_database(nodes: Iterable[LocalNode], name: str) -> None:
    """Drop (kicking out sessions) and recreate database `name` on every node."""
    ident = sql.Identifier(name)
    for node in nodes:
        with connect(node) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))


def user_tables(node: LocalNode, database: str, exclude_schemas: Sequence[str] = ()) -> list[str]:
    """Qualified names ("schema.table") of ordinary tables, including partitions."""
    with connect(node, database) as conn:
        rows = conn.execute(
            """
            SELECT format('%%I.%%I', n.nspname, c.relname)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r'
              AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_toast%%'
              AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
              AND NOT (n.nspname = ANY(%s))
            ORDER BY 1
            """,
            [list(exclude_schemas)],
        ).fetchall()
    return [r[0] for r in rows]


def _columns(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        """
        SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        [table],
    ).fetchall()
    return [r[0] for r in rows]


def table_fingerprint(node: LocalNode, database: str, table: str) -> tuple[list[str], int, str]:
    """(column definitions, row count, md5 of all rows in a node-independent order)."""
    with connect(node, database) as conn:
        cols = _columns(conn, table)
        # `table` comes from user_tables(), i.e. already quoted by format('%I.%I').
        row = conn.execute(
            f"SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' "
            f"ORDER BY t::text COLLATE \"C\")), '') FROM {table} t"
        ).fetchone()
    assert row is not None
    return cols, row[0], row[1]


def node_dump(
    node: LocalNode, database: str, tables: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Every row of each table as its text form, sorted; tables default to all user tables."""
    names = list(tables) if tables is not None else user_tables(node, database)
    out: dict[str, list[str]] = {}
    with connect(node, database) as conn:
        for table in names:
            rows = conn.execute(
                f'SELECT t::text FROM {table} t ORDER BY t::text COLLATE "C"'
            ).fetchall()
            out[table] = [r[0] for r in rows]
    return out


def _row_diff(ref: list[str], other: list[str]) -> tuple[list[str], list[str]]:
    a, b = Counter(ref), Counter(other)
    return sorted((a - b).elements()), sorted((b - a).elements())


def _show(rows: list[str]) -> str:
    shown = ", ".join(rows[:_MAX_ROWS_SHOWN])
    more = len(rows) - _MAX_ROWS_SHOWN
    return shown + (f", ... ({more} more)" if more > 0 else "")


def assert_nodes_identical(
    nodes: Sequence[LocalNode], database: str, *, exclude_schemas: Sequence[str] = ()
) -> None:
    """Fail with a readable report unless every node holds exactly the same user tables/rows.

    The first node is the reference; each difference names the table and node.
    """
    assert nodes, "no nodes given"
    ref = nodes[0]
    problems: list[str] = []

    tables = {n.name: user_tables(n, database, exclude_schemas) for n in nodes}
    ref_tables = set(tables[ref.name])
    for node in nodes[1:]:
        mine = set(tables[node.name])
        if missing := sorted(ref_tables - mine):
            problems.append(f"{node.name}: missing tables present on {ref.name}: {missing}")
        if extra := sorted(mine - ref_tables):
            problems.append(f"{node.name}: extra tables absent on {ref.name}: {extra}")

    for table in sorted(ref_tables):
        holders = [n for n in nodes if table in tables[n.name]]
        prints = {n.name: table_fingerprint(n, database, table) for n in holders}
        ref_cols, ref_count, ref_md5 = prints[ref.name]
        ref_rows: list[str] | None = None
        for node in holders[1:]:
            cols, count, digest = prints[node.name]
            if cols != ref_cols:
                problems.append(
                    f"{table}: columns differ on {node.name}: {cols} vs {ref.name}: {ref_cols}"
                )
                continue
            if (count, digest) == (ref_count, ref_md5):
                continue
            if ref_rows is None:
                ref_rows = node_dump(ref, database, [table])[table]
            rows = node_dump(node, database, [table])[table]
            only_ref, only_node = _row_diff(ref_rows, rows)
            msg = f"{table}: {node.name} has {count} rows, {ref.name} has {ref_count}"
            if only_ref:
                msg += f"\n    only on {ref.name}: {_show(only_ref)}"
            if only_node:
                msg += f"\n    only on {node.name}: {_show(only_node)}"
            problems.append(msg)

    if problems:
        raise AssertionError(f"nodes differ in database {database!r}:\n  " + "\n  ".join(problems))


def balanced(node: LocalNode) -> bool:
    """pgbench's invariant: the balances moved exactly as the history says."""
    return (
        node.psql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = "
            "(SELECT coalesce(sum(delta), 0) FROM pgbench_history) AND "
            "(SELECT sum(tbalance) FROM pgbench_tellers) = "
            "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
        )
        == "t"
    )


class Transfers:
    """Clients moving 1 between accounts of ``acct (id, balance)`` (ids 1..accounts) in
    transactions, until stopped: load that commits all the time and keeps the total."""

    BALANCE = 100  # each account's at the start

    def __init__(self, dsn: str, clients: int, accounts: int) -> None:
        self.errors: list[BaseException] = []
        self.commits = 0  # transfers committed so far (all clients)
        self._counting = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(dsn, n, accounts), daemon=True)
            for n in range(clients)
        ]

    @classmethod
    def create(cls, dsn: str, accounts: int) -> None:
        """The accounts table the transfers need, through ``dsn``."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL)")
            conn.execute(
                "INSERT INTO acct SELECT g, %s FROM generate_series(1, %s) g",
                (cls.BALANCE, accounts),
            )

    @classmethod
    def total(cls, accounts: int) -> int:
        """The sum of the balances, which the transfers never change."""
        return cls.BALANCE * accounts

    def wait_commits(self, n: int, timeout: float = 30) -> None:
        """Until ``n`` more transfers have committed: the load really runs."""
        goal = self.commits + n
        deadline = time.monotonic() + timeout
        while self.commits < goal:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"only {self.commits} of {goal} transfers"
            time.sleep(0.01)

    def _run(self, dsn: str, n: int, accounts: int) -> None:
        try:
            with psycopg.connect(dsn) as conn:
                i = n
                while not self._stop.is_set():
                    a, b = sorted((i % accounts + 1, (i * 7 + 3) % accounts + 1))
                    if a != b:
                        conn.execute("UPDATE acct SET balance = balance - 1 WHERE id = %s", (a,))
                        conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = %s", (b,))
                        conn.commit()
                        with self._counting:
                            self.commits += 1
                    i += 1
        except BaseException as e:
            self.errors.append(e)

    def __enter__(self) -> Transfers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        stuck = sum(t.is_alive() for t in self._threads)
        if stuck and exc[0] is None:
            raise AssertionError(f"{stuck} transfer clients did not end (a commit held?)")
