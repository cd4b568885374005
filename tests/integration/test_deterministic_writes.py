"""Node-dependent values through the router: fixed where possible, refused otherwise."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors
from router_harness import RouterThread, router_config

from pgquorum.local.instance import LocalNode


def test_time_values_are_the_same_on_every_node(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz, d date, t time, s timestamptz)"
        )
        conn.execute(
            "INSERT INTO ev VALUES (1, now(), CURRENT_DATE, LOCALTIME(2), statement_timestamp())"
        )
        conn.execute("INSERT INTO ev VALUES (%s, CURRENT_TIMESTAMP, NULL, NULL, NULL)", (2,))
    with psycopg.connect(router.dsn(db)) as conn:  # one block: one transaction time
        conn.execute("INSERT INTO ev VALUES (3, now())")
        conn.execute("INSERT INTO ev VALUES (4, transaction_timestamp())")
        (seen,) = conn.execute("SELECT now()").fetchone()  # type: ignore[misc]
        conn.commit()
    with psycopg.connect(router.dsn(db)) as conn:
        (at3, at4) = (
            r[0] for r in conn.execute("SELECT at FROM ev WHERE id IN (3, 4) ORDER BY id")
        )
        assert at3 == at4 == seen
        (at1,) = conn.execute("SELECT at FROM ev WHERE id = 1").fetchone()  # type: ignore[misc]
        assert at1 < at3


def test_prepared_statement_gets_each_transactions_time(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), prepare_threshold=0) as conn:
        conn.execute("CREATE TABLE ev (id int PRIMARY KEY, at timestamptz)")
        conn.commit()
        for i in range(5):  # the same server-side prepared statement, five transactions
            conn.execute("INSERT INTO ev VALUES (%s, now())", (i,))
            conn.execute("INSERT INTO ev VALUES (%s, now())", (i + 100,))
            conn.commit()
        rows = conn.execute("SELECT id, at FROM ev ORDER BY id").fetchall()
    times = dict(rows)
    assert len(set(times.values())) == 5
    assert all(times[i] == times[i + 100] for i in range(5))


def test_volatile_write_is_refused_and_nothing_changes(router: RouterThread, db: str) -> None:
    with psycopg.connect(router.dsn(db), autocommit=True) as conn:
        conn.execute("CREATE TABLE r (id int PRIMARY KEY, x float8)")
        with pytest.raises(errors.FeatureNotSupported, match=r"random\(\)") as exc:
            conn.execute("INSERT INTO r VALUES (1, random())")
        assert exc.value.diag.message_hint
        with pytest.raises(errors.FeatureNotSupported, match="clock_timestamp"):
            conn.execute("UPDATE r SET x = extract(epoch FROM clock_timestamp())", prepare=True)
        conn.execute("INSERT INTO r VALUES (2, 0.5)")  # the session goes on
        # Reading random() is fine: it runs on one node and changes nothing.
        assert 0 <= conn.execute("SELECT random()").fetchone()[0] < 1  # type: ignore[index]
    with psycopg.connect(router.dsn(db)) as conn:
        conn.execute("INSERT INTO r VALUES (3, 1)")
        with pytest.raises(errors.FeatureNotSupported):
            conn.execute("DELETE FROM r WHERE id IN (SELECT id FROM r LIMIT 1)")
        with pytest.raises(errors.InFailedSqlTransaction):  # as PostgreSQL: the block failed
            conn.execute("INSERT INTO r VALUES (4, 1)")
        conn.rollback()
        assert conn.execute("SELECT array_agg(id ORDER BY id) FROM r").fetchone() == ([2],)


def test_deterministic_functions_from_the_config(pg_nodes: list[LocalNode], db: str) -> None:
    rt = RouterThread(router_config(pg_nodes, deterministic_functions=frozenset({"tax"})))
    try:
        with psycopg.connect(rt.dsn(db), autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION tax(numeric) RETURNS numeric VOLATILE LANGUAGE sql "
                "AS 'SELECT $1 * 0.2'"
            )
            conn.execute(
                "CREATE FUNCTION untrusted(numeric) RETURNS numeric VOLATILE LANGUAGE sql "
                "AS 'SELECT $1'"
            )
            conn.execute("CREATE TABLE price (id int PRIMARY KEY, net numeric, tax numeric)")
            conn.execute("INSERT INTO price VALUES (1, 100, tax(100))")
            with pytest.raises(errors.FeatureNotSupported, match="untrusted"):
                conn.execute("INSERT INTO price VALUES (2, 100, untrusted(100))")
            assert conn.execute("SELECT tax FROM price").fetchone() == (20,)
    finally:
        rt.stop()
