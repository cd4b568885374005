"""psycopg 3 through the router: simple and extended protocol, pipelines, COPY, cursors."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql
from router_harness import RouterThread

from pgquorum.local.instance import LocalNode


def test_simple_protocol_writes_reach_every_node(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        cur = conn.execute("UPDATE t SET v = v || '!' WHERE id = 2")
        assert cur.rowcount == 1
        assert conn.execute("SELECT v FROM t ORDER BY id").fetchall() == [("one",), ("two!",)]
    for node in pg_nodes:
        assert node.psql("SELECT count(*) FROM t", database=db).strip() == "2"


def test_transactions_commit_and_rollback(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db)) as conn:
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int)")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO acct VALUES (1, 100), (2, 0)")
        try:
            with conn.transaction():
                conn.execute("UPDATE acct SET balance = balance - 50 WHERE id = 1")
                conn.execute("SELECT 1/0")
        except psycopg.errors.DivisionByZero:
            pass
        conn.rollback()
        rows = conn.execute("SELECT id, balance FROM acct ORDER BY id").fetchall()
        assert rows == [(1, 100), (2, 0)]
        conn.commit()


def test_extended_protocol_parameters_and_types(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE p (id int PRIMARY KEY, name text, score numeric, tags text[])")
        for i in range(20):
            conn.execute("INSERT INTO p VALUES (%s, %s, %s, %s)", (i, f"n{i}", i * 1.5, ["a", "b"]))
        row = conn.execute("SELECT name, score, tags FROM p WHERE id = %s", (7,)).fetchone()
        assert row is not None and row[0] == "n7" and float(row[1]) == 10.5
        assert row[2] == ["a", "b"]
        # Binary results.
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT id FROM p WHERE id < %s ORDER BY id", (3,))
            assert cur.fetchall() == [(0,), (1,), (2,)]


def test_prepared_statements_run_on_every_node_they_reach(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True, prepare_threshold=0) as conn:
        conn.execute("CREATE TABLE k (id int PRIMARY KEY, v int)")
        for i in range(30):
            conn.execute("INSERT INTO k VALUES (%s, %s)", (i, i * i))
        # The same prepared read, many times: balanced over nodes that must prepare it lazily.
        total = 0
        for i in range(30):
            total += conn.execute("SELECT v FROM k WHERE id = %s", (i,)).fetchone()[0]  # type: ignore[index]
        assert total == sum(i * i for i in range(30))
        conn.execute("DEALLOCATE ALL")
        assert conn.execute("SELECT count(*) FROM k").fetchone() == (30,)


def test_pipeline_mode(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE pl (id int PRIMARY KEY)")
        with conn.pipeline():
            for i in range(100):
                conn.execute("INSERT INTO pl VALUES (%s)", (i,))
            cur = conn.execute("SELECT count(*) FROM pl")
        assert cur.fetchone() == (100,)
        with conn.pipeline(), conn.cursor() as cur:
            cur.executemany("INSERT INTO pl VALUES (%s)", [(i,) for i in range(100, 150)])
        assert conn.execute("SELECT count(*) FROM pl").fetchone() == (150,)


def test_pipeline_error_until_sync(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE pe (id int PRIMARY KEY)")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute("INSERT INTO pe VALUES (1)")
            conn.execute("INSERT INTO pe VALUES (1)")
            conn.execute("INSERT INTO pe VALUES (2)")
        # The session goes on after the error.
        assert conn.execute("SELECT count(*) FROM pe").fetchone() is not None


def test_copy_in_and_out(router: RouterThread, db: str, pg_nodes: list[LocalNode]) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE c (id int PRIMARY KEY, v text)")
        with conn.cursor() as cur:
            with cur.copy("COPY c (id, v) FROM STDIN") as copy:
                for i in range(5000):
                    copy.write_row((i, f"value {i}"))
            out = bytearray()
            with cur.copy("COPY c TO STDOUT") as copy:
                for data in copy:
                    out += data
        assert out.count(b"\n") == 5000
    for node in pg_nodes:
        assert node.psql("SELECT count(*), sum(id) FROM c", database=db).strip() == (
            f"5000|{sum(range(5000))}"
        )


def test_copy_in_error_is_reported(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE ce (id int PRIMARY KEY)")
        with (
            pytest.raises(psycopg.errors.UniqueViolation),
            conn.cursor() as cur,
            cur.copy("COPY ce FROM STDIN") as copy,
        ):
            copy.write_row((1,))
            copy.write_row((1,))
        assert conn.execute("SELECT count(*) FROM ce").fetchone() == (0,)


def test_server_side_cursor(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db)) as conn:
        conn.execute("CREATE TABLE big AS SELECT g AS id FROM generate_series(1, 1000) g")
        conn.commit()
        with conn.cursor(name="walker") as cur:
            cur.itersize = 100
            cur.execute("SELECT id FROM big ORDER BY id")
            ids = [r[0] for r in cur]
        assert ids == list(range(1, 1001))
        conn.commit()


def test_multi_statement_string(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int); INSERT INTO m VALUES (1); INSERT INTO m VALUES (2)")
        assert conn.execute("SELECT count(*) FROM m").fetchone() == (2,)


def test_reads_are_spread_over_nodes(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    ports: set[int] = set()
    conns = [psycopg.connect(router.dsn(db), autocommit=True) for _ in range(6)]
    try:
        for _ in range(5):
            for c in conns:
                ports.add(c.execute("SELECT current_setting('port')::int").fetchone()[0])  # type: ignore[index]
    finally:
        for c in conns:
            c.close()
    assert ports == {n.port for n in pg_nodes}


def test_a_sessions_reads_stay_on_its_home_node(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    """Balanced reads keep a session on one node while that node is not busier than the
    others, so each session keeps one warm backend (and parses its statements once)."""
    with (
        psycopg.connect(router.dsn(db), autocommit=True) as simple,
        psycopg.connect(router.dsn(db), autocommit=True, prepare_threshold=0) as prepared,
    ):
        for c in (simple, prepared):
            ports = {
                c.execute("SELECT current_setting('port')::int").fetchone()[0]  # type: ignore[index]
                for _ in range(20)
            }
            assert len(ports) == 1 and ports <= {n.port for n in pg_nodes}


def test_reads_in_a_transaction_follow_its_writes(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db)) as conn:
        conn.execute("CREATE TABLE rw (id int)")
        conn.commit()
        for i in range(10):
            conn.execute("INSERT INTO rw VALUES (%s)", (i,))
            assert conn.execute("SELECT count(*) FROM rw").fetchone() == (i + 1,)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM rw").fetchone() == (0,)
        conn.commit()


def test_volatile_function_select_is_a_write(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE s")
        got = [conn.execute("SELECT nextval('s')").fetchone()[0] for _ in range(5)]  # type: ignore[index]
    assert got == [1, 2, 3, 4, 5]
    # The router reserved a block of values on every node's sequence alike.
    last = {node.psql("SELECT last_value FROM s", database=db).strip() for node in pg_nodes}
    assert len(last) == 1 and int(last.pop()) >= 5


def test_set_reaches_every_node(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("SET application_name = 'pgq-test'")
        names = {conn.execute("SHOW application_name").fetchone()[0] for _ in range(10)}  # type: ignore[index]
        assert names == {"pgq-test"}


def test_listen_notify_delivered_exactly_once(router: RouterThread, db: str) -> None:
    with (
        psycopg.connect(router.dsn(db), autocommit=True) as listener,
        psycopg.connect(router.dsn(db), autocommit=True) as sender,
    ):
        listener.execute("LISTEN chan")
        for i in range(3):
            sender.execute(sql.SQL("NOTIFY chan, {}").format(sql.Literal(f"m{i}")))
        got: list[str] = []
        deadline = time.time() + 5
        while time.time() < deadline and len(got) < 3:
            for n in listener.notifies(timeout=0.5, stop_after=3 - len(got)):
                got.append(n.payload)
        time.sleep(0.3)  # anything duplicated would arrive by now
        got.extend(n.payload for n in listener.notifies(timeout=0.3))
        assert got == ["m0", "m1", "m2"]


def test_cancel(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        # cancel_safe, not cancel: libpq's PQcancel blocks holding the GIL, which would freeze
        # the router running in this same process.
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        start = time.time()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.time() - start < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_statement_failing_everywhere_keeps_session(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC 1")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("INSERT INTO nope VALUES (1)")
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_standard_conforming_strings_off_runs_everything_everywhere(
    router: RouterThread, db: str, pg_nodes: list[LocalNode]
) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE scs (id int)")
        conn.execute("INSERT INTO scs VALUES (1), (2)")
        conn.execute("SET standard_conforming_strings = off")
        # To pglast (which reads '' as a quote) this is one SELECT of a literal; to a server
        # with the setting off (which reads \' as a quote) it is a SELECT and a DELETE.
        # The router must not send it to one node only.
        conn.execute("SELECT 'x\\''; DELETE FROM scs; --'")
        conn.execute("SET standard_conforming_strings = on")
    for node in pg_nodes:
        assert node.psql("SELECT count(*) FROM scs", database=db) == "0"


def test_begin_options_reach_the_nodes(router: RouterThread, db: str) -> None:
    # The router answers BEGIN itself and sends it with each node's first work in the
    # transaction: its options must still apply there.
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE iso (id int)")
        conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        assert conn.execute("SHOW transaction_isolation").fetchone() == ("serializable",)
        conn.execute("INSERT INTO iso VALUES (1)")
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        assert conn.execute("SHOW transaction_isolation").fetchone() == ("read committed",)
        conn.execute("INSERT INTO iso VALUES (2)")
        conn.execute("ROLLBACK")
        conn.execute("BEGIN READ ONLY")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO iso VALUES (3)")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT array_agg(id) FROM iso").fetchone() == ([1],)
