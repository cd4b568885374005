"""Node-dependent values in replicated statements (pgquorum.sql.determinism).

The first part needs no database: rewrites are compared with the expected text and parsed
again with pglast.
The last part runs original and rewritten SQL side by side on a real PostgreSQL node (the
shared `pg_nodes` fixture) to prove the rewrite keeps PostgreSQL's types and values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from pglast import ast
from pglast.parser import parse_sql

from helpers import connect
from pgquorum.local.instance import LocalNode
from pgquorum.protocol.errors import FEATURE_NOT_SUPPORTED, PgError
from pgquorum.sql import determinism
from pgquorum.sql.analyze import Analyzer
from pgquorum.sql.determinism import (
    REFUSED_ALWAYS,
    REPLICABLE_VOLATILE,
    TIME_FUNCTIONS,
    check_and_rewrite,
)
from pgquorum.sql.sequences import SEQUENCE_FUNCTIONS

TXN = datetime(2026, 11, 21, 10, 0, 0, 987654, tzinfo=UTC)
STMT = datetime(2026, 11, 21, 10, 0, 2, 123456, tzinfo=UTC)
TXN_LIT = "'2026-11-21 10:00:00.987654+00:00'"
STMT_LIT = "'2026-11-21 10:00:02.123456+00:00'"
TS = f"CAST({TXN_LIT} AS timestamp with time zone)"
STMT_TS = f"CAST({STMT_LIT} AS timestamp with time zone)"

# Functions the fake catalog calls volatile (anything else is stable or immutable).
VOLATILE = frozenset(
    {
        "random",
        "gen_random_uuid",
        "clock_timestamp",
        "timeofday",
        "nextval",
        "currval",
        "lastval",
        "setval",
        "pg_catalog.nextval",
        "set_config",
        "pg_catalog.set_config",
        "pg_notify",
        "pg_advisory_lock",
        "pg_advisory_xact_lock",
        "pg_sleep",
        "pg_try_advisory_lock",
        "my_volatile",
        "app.my_volatile",
        "app.other",
        "proc_with_side_effects",
    }
)


def rewrite(
    sql: str,
    *,
    volatile: frozenset[str] = VOLATILE,
    deterministic: frozenset[str] = frozenset(),
    txn_time: datetime = TXN,
    stmt_time: datetime = STMT,
) -> str | None:
    """check_and_rewrite from a cold plan cache, then again from the plan it kept (if any):
    both must give the same answer."""

    def run() -> str | None:
        return check_and_rewrite(
            sql,
            txn_time=txn_time,
            stmt_time=stmt_time,
            is_volatile=lambda name: name in volatile,
            deterministic=deterministic,
        )

    determinism._PLANS.clear()
    try:
        first = run()
    except PgError as cold:
        with pytest.raises(PgError) as warm:
            run()
        assert warm.value.message == cold.message
        raise
    assert run() == first
    return first


def refused(sql: str, **kwargs: Any) -> PgError:
    with pytest.raises(PgError) as info:
        rewrite(sql, **kwargs)
    err = info.value
    assert err.sqlstate == FEATURE_NOT_SUPPORTED == "0A000"
    assert err.severity == "ERROR"
    assert err.message.startswith("pgquorum cannot replicate ")
    assert err.hint
    return err


def assert_no_time_values(sql: str) -> None:
    """The output, parsed again, has no time function or SQLValueFunction left."""
    a = Analyzer().analyze(sql)
    assert a.error is None, a.error
    assert not a.time_values, sql
    assert not (a.calls & TIME_FUNCTIONS), sql


# -- rule 1: time ----------------------------------------------------------------------------

DATE = f"CAST({TS} AS pg_catalog.date)"

TIME_REWRITES = [
    ("now()", TS),
    ("pg_catalog.now()", TS),
    ("NOW ( )", TS),
    ('"now"()', TS),
    ("pg_catalog . now (/* no arguments */)", TS),
    ("transaction_timestamp()", TS),
    ("pg_catalog.transaction_timestamp()", TS),
    ("statement_timestamp()", STMT_TS),
    ("pg_catalog.statement_timestamp()", STMT_TS),
    ("CURRENT_TIMESTAMP", TS),
    ("current_timestamp", TS),
    ("CURRENT_TIMESTAMP(0)", f"CAST({TXN_LIT} AS timestamp(0) with time zone)"),
    ("CURRENT_TIMESTAMP ( 3 )", f"CAST({TXN_LIT} AS timestamp(3) with time zone)"),
    ("CURRENT_DATE", DATE),
    ("CURRENT_TIME", f"CAST({TS} AS time with time zone)"),
    ("CURRENT_TIME/* precision: */(2)", f"CAST({TS} AS time(2) with time zone)"),
    ("LOCALTIME", f"CAST({TS} AS time)"),
    ("LOCALTIME(4)", f"CAST({TS} AS time(4))"),
    ("LOCALTIMESTAMP", f"CAST({TS} AS timestamp)"),
    ("LOCALTIMESTAMP(6)", f"CAST({TS} AS timestamp(6))"),
]


@pytest.mark.parametrize(("expr", "expected"), TIME_REWRITES)
def test_time_value_in_insert(expr: str, expected: str) -> None:
    out = rewrite(f"INSERT INTO t (a) VALUES ({expr})")
    assert out == f"INSERT INTO t (a) VALUES ({expected})"
    assert_no_time_values(out)


def _column_name(expr: str) -> str:
    words = re.findall(r"[a-z_]+", expr.lower())
    return words[1] if words[0] == "pg_catalog" else words[0]


@pytest.mark.parametrize(("expr", "expected"), TIME_REWRITES)
def test_time_value_keeps_its_column_name(expr: str, expected: str) -> None:
    name = _column_name(expr)
    out = rewrite(f"SELECT {expr}, 1")
    assert out == f'SELECT {expected} AS "{name}", 1'
    assert parse_sql(out)[0].stmt.targetList[0].name == name  # type: ignore[attr-defined]


def test_statement_time_is_separate() -> None:
    out = rewrite("UPDATE t SET a = now(), b = statement_timestamp()")
    assert out == f"UPDATE t SET a = {TS}, b = {STMT_TS}"


def test_time_literal_is_utc_with_microseconds() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=5, minutes=45)))
    out = rewrite("SELECT now() AS x", txn_time=when)
    assert out == "SELECT CAST('2026-01-01 21:19:05.000000+00:00' AS timestamp with time zone) AS x"


def test_naive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="aware"):
        rewrite("SELECT now()", txn_time=datetime(2026, 1, 1))


def _wrapped(value: str, name: str) -> str:
    return f'(SELECT {value} AS "{name}")'


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # The whole column: an alias.
        ("SELECT now() FROM t", f'SELECT {TS} AS "now" FROM t'),
        ("SELECT DISTINCT CURRENT_DATE FROM t", f'SELECT DISTINCT {DATE} AS "current_date" FROM t'),
        ("SELECT now() AS created", f"SELECT {TS} AS created"),  # named already
        ("SELECT now() created", f"SELECT {TS} created"),
        # Parenthesized, or what FigureColname looks through (casts, COLLATE, CASE ... ELSE):
        # a scalar subquery carrying the name.
        ("SELECT (now())", f"SELECT ({_wrapped(TS, 'now')})"),
        ("SELECT now()::date", f"SELECT {_wrapped(TS, 'now')}::date"),
        ("SELECT CAST(now() AS text)", f"SELECT CAST({_wrapped(TS, 'now')} AS text)"),
        ("SELECT now()::text::date", f"SELECT {_wrapped(TS, 'now')}::text::date"),
        (
            "SELECT CURRENT_DATE::timestamp(0)",
            f"SELECT {_wrapped(DATE, 'current_date')}::timestamp(0)",
        ),
        (
            "SELECT CASE WHEN a THEN 1 ELSE now() END FROM t",
            f"SELECT CASE WHEN a THEN 1 ELSE {_wrapped(TS, 'now')} END FROM t",
        ),
        (
            'SELECT LOCALTIMESTAMP::text COLLATE "C"',
            f'SELECT {_wrapped(f"CAST({TS} AS timestamp)", "localtimestamp")}::text COLLATE "C"',
        ),
        # Named after something else: nothing to keep.
        ("SELECT CASE WHEN a THEN now() END FROM t", f"SELECT CASE WHEN a THEN {TS} END FROM t"),
        ("SELECT now() - interval '1 day'", f"SELECT {TS} - interval '1 day'"),
        ("SELECT coalesce(x, now()) FROM t", f"SELECT coalesce(x, {TS}) FROM t"),
        ("SELECT date_trunc('day', now())", f"SELECT date_trunc('day', {TS})"),
        ("SELECT EXTRACT(epoch FROM now())", f"SELECT EXTRACT(epoch FROM {TS})"),
        # A scalar subquery is named after its first column, which keeps its own name.
        ("SELECT (SELECT now())", f'SELECT (SELECT {TS} AS "now")'),
        # RETURNING lists are output columns too.
        (
            "INSERT INTO t VALUES (1) RETURNING id, now(), CURRENT_DATE AS d",
            f'INSERT INTO t VALUES (1) RETURNING id, {TS} AS "now", {DATE} AS d',
        ),
        # A function in FROM names the table and its column.
        ("SELECT * FROM now()", f'SELECT * FROM {TS} AS "now"'),
        ("SELECT * FROM CURRENT_DATE, now() n", f'SELECT * FROM {DATE} AS "current_date", {TS} n'),
    ],
)
def test_output_column_names_survive(sql: str, expected: str) -> None:
    assert rewrite(sql) == expected


def _sub(sql: str) -> str:
    """The expected rewrite of a test statement (test-side shorthand for the constructs)."""
    for pattern, value in [
        (r"\bstatement_timestamp\(\)", STMT_TS),
        (r"\bnow\(\)", TS),
        (r"\bCURRENT_DATE\b", DATE),
        (r"\bLOCALTIMESTAMP\b", f"CAST({TS} AS timestamp)"),
        (r"\bCURRENT_TIME\b", f"CAST({TS} AS time with time zone)"),
    ]:
        sql = re.sub(pattern, lambda _, v=value: v, sql)  # type: ignore[misc]
    return sql


EVERYWHERE = [
    "UPDATE t SET a = now() WHERE b < CURRENT_DATE",
    "DELETE FROM t WHERE created < now() - interval '30 days'",
    "INSERT INTO t VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET seen = now()",
    "INSERT INTO t SELECT id, x FROM u WHERE d = CURRENT_DATE",
    "WITH x AS (SELECT now() AS n) INSERT INTO t SELECT n FROM x",
    "UPDATE t SET a = (SELECT max(b) FROM u WHERE u.c < now())",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = now()"
    " WHEN NOT MATCHED THEN INSERT VALUES (u.id, LOCALTIMESTAMP)",
    "WITH d AS (DELETE FROM t WHERE a < now() RETURNING *) SELECT count(*) FROM d",
    "UPDATE t SET (a, b) = (now(), CURRENT_DATE) WHERE id = 1",
    "UPDATE t SET (a, b) = (SELECT now(), x FROM u WHERE u.id = t.id)",
    "INSERT INTO t VALUES (ARRAY[now(), now()], ROW(CURRENT_TIME))",
    "INSERT INTO t VALUES (1), (2) , ($1::int) RETURNING CURRENT_DATE AS d",
    "SELECT * FROM t WHERE a > now() FOR UPDATE",
    "SELECT x INTO TEMP t2 FROM t WHERE a < now()",
    "CREATE TABLE t2 AS SELECT id, a FROM t WHERE a < now()",
    "CREATE TABLE t2 AS EXECUTE p(now())",
    "COPY (SELECT x FROM t WHERE a < now()) TO STDOUT",
    "COPY (INSERT INTO t VALUES (now()) RETURNING id) TO STDOUT",
    "COPY t FROM STDIN WHERE a > now()",
    "EXPLAIN ANALYZE INSERT INTO t VALUES (now())",
    "EXPLAIN (ANALYZE true, BUFFERS) UPDATE t SET a = now()",
    "EXPLAIN (ANALYZE) CREATE TABLE t2 AS SELECT x FROM t WHERE a < now()",
    "EXECUTE p(1, now())",
    "CALL p(CURRENT_DATE)",
    "ALTER TABLE t ALTER COLUMN c TYPE timestamptz USING now()",
    "ALTER TABLE t ALTER COLUMN c TYPE date USING CURRENT_DATE, ADD COLUMN d int DEFAULT 0",
    "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (CURRENT_DATE) TO (MAXVALUE)",
    "ALTER TABLE p ATTACH PARTITION p1 FOR VALUES FROM (MINVALUE) TO (now())",
    "SELECT setval('s', extract(epoch FROM now())::bigint)",
    "SELECT x FROM t WHERE a < now() ORDER BY now() - a",
    "INSERT INTO t SELECT * FROM generate_series(now(), now() + interval '1 day', '1 hour')",
    "/* a comment about now() */ INSERT INTO t VALUES (now()) -- and CURRENT_DATE",
    "INSERT INTO t VALUES ('now()', E'CURRENT_DATE\\n', $$now()$$, now())",
    "INSERT INTO \"Ünïcødé 😀\" (\"Now\") VALUES ('€', now(), '😀', CURRENT_DATE)",
    "INSERT INTO t (now) SELECT now FROM u WHERE now < now()",  # a column named now
    "UPDATE t\n   SET a = now(),\n       b = CURRENT_DATE\n WHERE id = $1",
]


@pytest.mark.parametrize("sql", EVERYWHERE)
def test_time_values_everywhere(sql: str) -> None:
    out = rewrite(sql)
    assert out is not None
    if "a comment about" in sql:
        expected = f"/* a comment about now() */ INSERT INTO t VALUES ({TS}) -- and CURRENT_DATE"
    elif "SELECT now(), x" in sql:  # a subquery's output column: named
        expected = f'UPDATE t SET (a, b) = (SELECT {TS} AS "now", x FROM u WHERE u.id = t.id)'
    elif "'now()'" in sql:
        expected = f"INSERT INTO t VALUES ('now()', E'CURRENT_DATE\\n', $$now()$$, {TS})"
    else:
        expected = _sub(sql)
    assert out == expected
    assert_no_time_values(out)


@pytest.mark.parametrize(
    "sql",
    [
        # Stored for later, not evaluated now: must stay as written.
        "CREATE TABLE t (id int, created timestamptz DEFAULT now(), d date DEFAULT CURRENT_DATE)",
        "ALTER TABLE t ALTER COLUMN created SET DEFAULT now()",
        "CREATE VIEW v AS SELECT * FROM t WHERE created > now() - interval '1 day'",
        "CREATE FUNCTION f() RETURNS timestamptz LANGUAGE sql RETURN now()",
        "CREATE FUNCTION f() RETURNS float LANGUAGE sql AS 'SELECT random()'",
        "CREATE TRIGGER tr BEFORE UPDATE ON t FOR EACH ROW WHEN (now() > '2020-01-01')"
        " EXECUTE FUNCTION f()",
        "CREATE RULE r AS ON INSERT TO t DO ALSO INSERT INTO log VALUES (now())",
        "CREATE POLICY p ON t USING (created < now())",
        "CREATE DOMAIN d AS date DEFAULT CURRENT_DATE CHECK (VALUE <= CURRENT_DATE)",
        "CREATE TABLE t (u uuid DEFAULT gen_random_uuid(), r float DEFAULT random())",
        "DO $$ BEGIN INSERT INTO t VALUES (now()); END $$",
        # Evaluates nothing.
        "EXPLAIN INSERT INTO t VALUES (now(), random())",
        "EXPLAIN (ANALYZE false) INSERT INTO t VALUES (now())",
        "EXPLAIN (ANALYZE off, COSTS off) DELETE FROM t WHERE a < now()",
        "EXPLAIN (ANALYZE 0) DELETE FROM t WHERE a < now()",
        "CREATE TABLE t2 AS SELECT now(), random() WITH NO DATA",
        # Runs on the lead only.
        "DECLARE c CURSOR FOR SELECT now(), random()",
    ],
)
def test_stored_or_unevaluated_expressions_are_left_alone(sql: str) -> None:
    assert rewrite(sql) is None


def test_time_function_with_arguments_is_an_ordinary_call() -> None:
    # There is no now(int) in pg_catalog: whatever this is, the catalog decides.
    assert rewrite("SELECT now(1)") is None
    err = refused("SELECT now(1)", volatile=frozenset({"now"}))
    assert "now()" in err.message


# -- rule 2: volatile functions --------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (random())",
        "INSERT INTO t (id) VALUES (gen_random_uuid())",
        "UPDATE t SET a = random() WHERE id = 1",
        "DELETE FROM t WHERE random() < 0.5",
        "INSERT INTO t SELECT * FROM u ORDER BY random()",
        "INSERT INTO t VALUES (1) RETURNING random()",
        "WITH x AS (SELECT random() AS r) INSERT INTO t SELECT r FROM x",
        "SELECT random()",
        "SELECT * FROM t WHERE a = (SELECT random())",
        "CREATE TABLE t2 AS SELECT random()",
        "COPY (SELECT random()) TO STDOUT",
        "COPY t FROM STDIN WHERE random() > 0.5",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (random())",
        "EXECUTE p(random())",
        "CALL p(random())",
        "ALTER TABLE t ALTER COLUMN c TYPE float USING random()",
        "SELECT lower(random()::text)",
        "SELECT 1; SELECT random()",
    ],
)
def test_volatile_call_refused(sql: str) -> None:
    err = refused(sql)
    assert "random()" in err.message or "gen_random_uuid()" in err.message
    assert "different value on each node" in err.message
    assert err.hint is not None
    assert "client" in err.hint


def test_volatile_message_and_hint() -> None:
    err = refused("INSERT INTO t VALUES (my_volatile())")
    assert err.message == (
        "pgquorum cannot replicate my_volatile(): it may return a different value on each node"
    )
    assert err.hint is not None
    assert "deterministic_functions" in err.hint
    assert "literal or parameter" in err.hint


def test_unknown_function_counts_as_volatile() -> None:
    # is_volatile answers True for unknown names; the function trusts it.
    err = refused("SELECT nosuch()", volatile=frozenset({"nosuch"}))
    assert "nosuch()" in err.message


def test_declared_deterministic() -> None:
    sql = "INSERT INTO t VALUES (my_volatile(), app.my_volatile())"
    refused(sql)
    assert rewrite(sql, deterministic=frozenset({"my_volatile"})) is None
    # "app.my_volatile" listed covers the qualified call only.
    refused(sql, deterministic=frozenset({"app.my_volatile"}))
    assert rewrite("SELECT app.my_volatile()", deterministic=frozenset({"app.my_volatile"})) is None
    # ... and a listed bare name covers every schema's function of that name.
    assert rewrite("SELECT app.my_volatile()", deterministic=frozenset({"my_volatile"})) is None
    refused("SELECT app.other()", deterministic=frozenset({"my_volatile"}))
    # Declared deterministic functions still get their arguments fixed.
    out = rewrite("SELECT my_volatile(now())", deterministic=frozenset({"my_volatile"}))
    assert out == f"SELECT my_volatile({TS})"


@pytest.mark.parametrize(
    "name",
    [
        "clock_timestamp",
        "timeofday",
        "random",
        "gen_random_uuid",
        "txid_current",
        "pg_current_xact_id",
        "pg_backend_pid",
        "inet_server_port",
        "pg_postmaster_start_time",
        "pg_catalog.txid_current",
    ],
)
def test_refused_always(name: str) -> None:
    assert name in REFUSED_ALWAYS
    sql = f"INSERT INTO t VALUES ({name}())"
    # Even when pg_proc says STABLE (txid_current, pg_backend_pid...) and even when
    # the operator lists it: these differ between nodes by nature.
    err = refused(sql, volatile=frozenset(), deterministic=frozenset({name, name.split(".")[-1]}))
    assert f"{name}()" in err.message
    assert err.hint is not None
    assert "deterministic_functions" not in err.hint


def test_clock_hint_points_to_now() -> None:
    err = refused("UPDATE t SET a = clock_timestamp()")
    assert err.message == (
        "pgquorum cannot replicate clock_timestamp(): it reads the node's own clock"
    )
    assert err.hint is not None
    assert "now()" in err.hint


def test_age_with_one_argument() -> None:
    err = refused("UPDATE t SET years = extract(year FROM age(born))", volatile=frozenset())
    assert "age()" in err.message
    assert err.hint is not None
    assert "age(CURRENT_DATE, x)" in err.hint
    assert rewrite("UPDATE t SET y = age(a, born)", volatile=frozenset()) is None
    out = rewrite("UPDATE t SET y = age(CURRENT_DATE, born)", volatile=frozenset())
    assert out == f"UPDATE t SET y = age(CAST({TS} AS pg_catalog.date), born)"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_catalog.set_config('search_path', '', false)",  # pg_dump's first line
        "SELECT set_config('work_mem', '8MB', true)",
        "SELECT pg_notify('chan', 'payload')",
        "SELECT pg_advisory_lock(42)",
        "SELECT pg_advisory_xact_lock(1, 2)",
        "SELECT pg_sleep(0)",
    ],
)
def test_replicable_volatile_builtins(sql: str) -> None:
    assert rewrite(sql) is None


def test_try_advisory_lock_is_not_replicable() -> None:
    assert "pg_try_advisory_lock" not in REPLICABLE_VOLATILE
    refused("SELECT pg_try_advisory_lock(1)")


def test_is_volatile_asked_once_per_name() -> None:
    asked: list[str] = []

    def is_volatile(name: str) -> bool:
        asked.append(name)
        return False

    sql = "INSERT INTO t VALUES (lower('a'), lower('b'), upper(lower('c')), now(), nextval('s'))"
    assert (
        check_and_rewrite(
            sql,
            txn_time=TXN,
            stmt_time=STMT,
            is_volatile=is_volatile,
            deterministic=frozenset(),
        )
        is not None
    )
    # Time and sequence functions are never looked up.
    assert sorted(asked) == ["lower", "upper"]


def test_procedure_itself_is_not_judged() -> None:
    # Procedures are VOLATILE in pg_proc; their bodies, like triggers, are opaque.
    assert rewrite("CALL proc_with_side_effects(1, 'x')") is None


# -- rule 3: sequences -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (nextval('s'))",
        "INSERT INTO t VALUES (pg_catalog.nextval('s'::regclass))",
        "SELECT currval('s'), lastval()",
        "SELECT setval('s', 42, false)",
        "SELECT pg_catalog.setval('public.t_id_seq', 1, false)",  # pg_dump
        "PREPARE p AS INSERT INTO t VALUES (nextval('s'))",
    ],
)
def test_sequence_functions_left_alone(sql: str) -> None:
    assert {"nextval", "pg_catalog.setval"} <= SEQUENCE_FUNCTIONS
    assert rewrite(sql) is None


def test_sequence_functions_left_alone_next_to_a_rewrite() -> None:
    out = rewrite("INSERT INTO t VALUES (nextval('s'), now())")
    assert out == f"INSERT INTO t VALUES (nextval('s'), {TS})"


# -- rule 4: rows picked arbitrarily -----------------------------------------------------------

ARBITRARY_ROWS = [
    "DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 10)",
    "DELETE FROM t WHERE id IN (SELECT id FROM t WHERE a > 1 OFFSET 5)",
    "DELETE FROM t WHERE id IN (SELECT id FROM t FETCH FIRST 3 ROWS ONLY)",
    "UPDATE t SET a = (SELECT b FROM u WHERE u.id = t.id LIMIT 1)",
    "UPDATE t SET a = 1 FROM (SELECT id FROM u LIMIT 5) s WHERE s.id = t.id",
    "INSERT INTO t SELECT * FROM u LIMIT 5",
    "INSERT INTO t SELECT * FROM u LIMIT $1",
    "INSERT INTO t SELECT a FROM u UNION SELECT b FROM v LIMIT 3",
    "INSERT INTO t SELECT * FROM (SELECT * FROM u LIMIT 5) s ORDER BY 1",
    "WITH s AS (SELECT id FROM t LIMIT 10) DELETE FROM t WHERE id IN (SELECT id FROM s)",
    "WITH d AS (DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 1) RETURNING *) SELECT * FROM d",
    "MERGE INTO t USING (SELECT * FROM u LIMIT 10) s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "CREATE TABLE t2 AS SELECT * FROM t LIMIT 10",
    "SELECT * INTO t2 FROM t LIMIT 10",
    "INSERT INTO t SELECT DISTINCT ON (a) a, b FROM u",
    "PREPARE p AS DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 10)",
    "EXPLAIN ANALYZE DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 10)",
    "CREATE MATERIALIZED VIEW mv AS SELECT * FROM t LIMIT 10",
]


@pytest.mark.parametrize("sql", ARBITRARY_ROWS)
def test_write_picking_arbitrary_rows_refused(sql: str) -> None:
    err = refused(sql)
    assert "without ORDER BY" in err.message
    assert "different rows" in err.message
    assert err.hint is not None
    assert "ORDER BY" in err.hint


DETERMINISTIC_ROWS = [
    "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 10)",
    "INSERT INTO t SELECT * FROM u ORDER BY id LIMIT 5 OFFSET 5",
    "INSERT INTO t SELECT * FROM u ORDER BY id FETCH FIRST 3 ROWS WITH TIES",
    "INSERT INTO t SELECT DISTINCT ON (a) a, b FROM u ORDER BY a, b",
    "INSERT INTO t SELECT DISTINCT a FROM u",
    "INSERT INTO t SELECT * FROM u LIMIT ALL",
    "INSERT INTO t SELECT * FROM u LIMIT NULL",
    "INSERT INTO t SELECT * FROM u OFFSET 0",  # the classic optimization fence
    "INSERT INTO t SELECT * FROM u LIMIT 0",
    "INSERT INTO t VALUES (1), (2) LIMIT 1",
    "INSERT INTO t SELECT 1 LIMIT 1",
    "INSERT INTO t SELECT generate_series(1, 10) LIMIT 3",
    "DELETE FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id LIMIT 1)",
    # Reads may: the router answers from one node.
    "SELECT now(), a FROM t LIMIT 1",
    "SELECT DISTINCT ON (a) a, b, now() FROM t",
]


@pytest.mark.parametrize("sql", DETERMINISTIC_ROWS)
def test_deterministic_rows_accepted(sql: str) -> None:
    rewrite(sql)  # no error


def test_exists_exemption_is_not_inherited() -> None:
    refused(
        "DELETE FROM t WHERE EXISTS (SELECT 1 FROM (SELECT id FROM u LIMIT 3) s WHERE s.id = t.id)"
    )


@pytest.mark.parametrize(
    ("sql", "column"),
    [
        ("DELETE FROM t WHERE ctid = '(0,1)'", "ctid"),
        ("DELETE FROM t a USING t b WHERE a.ctid < b.ctid AND a.k = b.k", "ctid"),
        ("DELETE FROM t WHERE ctid IN (SELECT min(ctid) FROM t GROUP BY k)", "ctid"),
        ("UPDATE t SET a = 1 WHERE id = 5 AND xmin = 1234", "xmin"),
        ("INSERT INTO log SELECT xmax::text FROM t", "xmax"),
        ("INSERT INTO t VALUES (1) RETURNING ctid", "ctid"),
        ("UPDATE t SET a = 1 WHERE t.cmin = 0", "cmin"),
    ],
)
def test_write_using_system_columns_refused(sql: str, column: str) -> None:
    err = refused(sql)
    assert f"system column {column}" in err.message
    assert err.hint is not None
    assert "primary key" in err.hint


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        ("INSERT INTO t SELECT * FROM u TABLESAMPLE BERNOULLI (10) REPEATABLE (42)", "TABLESAMPLE"),
        ("DELETE FROM t WHERE id IN (SELECT id FROM t TABLESAMPLE SYSTEM (1))", "TABLESAMPLE"),
        (
            "UPDATE jobs SET taken = true WHERE id = (SELECT id FROM jobs WHERE NOT taken"
            " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING *",
            "SKIP LOCKED",
        ),
    ],
)
def test_write_picking_rows_by_storage_or_locks_refused(sql: str, what: str) -> None:
    err = refused(sql)
    assert what in err.message
    assert "differs between nodes" in err.message


def test_skip_locked_and_tablesample_in_reads_accepted() -> None:
    # A locking read takes its locks on every node, but changes nothing; the client then
    # changes the rows it got (from one node) by key.
    sql = "SELECT id, now() FROM jobs ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    assert (
        rewrite(sql)
        == f'SELECT id, {TS} AS "now" FROM jobs ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED'
    )
    assert rewrite("SELECT * FROM t TABLESAMPLE SYSTEM (1) WHERE a < now()") is not None
    assert rewrite("UPDATE t SET a = 1 WHERE id IN (SELECT id FROM t FOR UPDATE NOWAIT)") is None


def test_system_columns_in_reads_accepted() -> None:
    out = rewrite("SELECT ctid, xmin, now() FROM t")
    assert out == f'SELECT ctid, xmin, {TS} AS "now" FROM t'


# -- contexts where a value is both stored and computed now ------------------------------------


@pytest.mark.parametrize(
    ("sql", "construct", "context"),
    [
        ("PREPARE p AS INSERT INTO t VALUES (now())", "now()", "PREPARE"),
        ("PREPARE p (int) AS SELECT $1, CURRENT_DATE", "CURRENT_DATE", "PREPARE"),
        ("PREPARE p AS UPDATE t SET a = random()", "random()", "PREPARE"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT now()", "now()", "materialized view"),
        (
            "CREATE MATERIALIZED VIEW mv AS SELECT * FROM t WHERE d > CURRENT_DATE - 7"
            " WITH NO DATA",
            "CURRENT_DATE",
            "materialized view",
        ),
        (
            "ALTER TABLE t ADD COLUMN c timestamptz NOT NULL DEFAULT now()",
            "now()",
            "ADD COLUMN",
        ),
        ("ALTER TABLE t ADD COLUMN c time DEFAULT LOCALTIME(0)", "LOCALTIME(0)", "ADD COLUMN"),
        ("ALTER TABLE t ADD COLUMN u uuid DEFAULT gen_random_uuid()", "gen_random_uuid()", ""),
    ],
)
def test_stored_and_computed_now_refused(sql: str, construct: str, context: str) -> None:
    err = refused(sql)
    assert construct in err.message
    assert context in err.message


def test_add_column_with_constant_default_accepted() -> None:
    assert rewrite("ALTER TABLE t ADD COLUMN c int DEFAULT 0, ADD COLUMN d date") is None


# -- rules 5-8: SELECT, several statements, parameters, nothing to do -----------------------------


def test_select_rewritten() -> None:
    assert rewrite("SELECT now()") == f'SELECT {TS} AS "now"'


def test_several_statements() -> None:
    sql = (
        "BEGIN; INSERT INTO t VALUES (now()) ;SELECT nextval('s');\nUPDATE t SET d = CURRENT_DATE;"
    )
    out = rewrite(sql)
    assert out == (
        f"BEGIN; INSERT INTO t VALUES ({TS}) ;SELECT nextval('s');\nUPDATE t SET d = {DATE};"
    )
    # Every statement is checked, not only the first.
    refused("INSERT INTO t VALUES (now()); INSERT INTO t VALUES (random())")
    refused("SELECT 1; DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 1)")
    # A statement's refusal problems do not leak into the next one.
    assert rewrite("SELECT ctid FROM t LIMIT 1; INSERT INTO t VALUES (now())") == (
        f"SELECT ctid FROM t LIMIT 1; INSERT INTO t VALUES ({TS})"
    )


def test_parameters_survive() -> None:
    out = rewrite("INSERT INTO t (a, b, c) VALUES ($1, now(), $2::int) RETURNING $3")
    assert out == f"INSERT INTO t (a, b, c) VALUES ($1, {TS}, $2::int) RETURNING $3"
    assert out is not None
    assert [p.number for p in _params(out)] == [1, 2, 3]


def _params(sql: str) -> list[Any]:
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, tuple):
            for item in node:
                visit(item)
        elif isinstance(node, ast.Node):
            if isinstance(node, ast.ParamRef):
                found.append(node)
            for attr in node:
                visit(getattr(node, attr))

    visit(parse_sql(sql))
    return sorted(found, key=lambda p: p.number)


@pytest.mark.parametrize(
    "sql",
    [
        "",
        ";",
        "-- nothing",
        "SELECT 1",
        "INSERT INTO t VALUES (1, 'now', 'today', 'now()')",
        "UPDATE t SET a = lower(b) WHERE id = $1",
        "SELECT current_user, session_user, current_schema, current_catalog",
        "SELEC garbage",  # the servers report the syntax error
        "SET TIME ZONE 'UTC'",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "VACUUM t",
        "CREATE INDEX ON t (lower(a))",
        "DROP TABLE t",
        "TRUNCATE t",
        "SELECT nextval('s')",
        "SELECT now FROM t",  # a column
    ],
)
def test_nothing_to_fix(sql: str) -> None:
    assert rewrite(sql) is None


def test_replacements_parse_as_intended() -> None:
    """Every replacement is one pg_catalog cast of one literal, whatever surrounds it."""
    for expr, expected in TIME_REWRITES:
        tree = parse_sql(f"SELECT {expected}")[0].stmt.targetList[0].val  # type: ignore[attr-defined]
        types = []
        while isinstance(tree, ast.TypeCast):
            names = [n.sval for n in tree.typeName.names]
            types.append(names[-1])
            assert names[0] == "pg_catalog", expr
            tree = tree.arg
        assert isinstance(tree, ast.A_Const), expr
        assert types[-1] == "timestamptz", expr


# -- the text around the replacements is kept ----------------------------------------------------

UNTOUCHED = [
    "SELECT a, b FROM t JOIN u USING (id) WHERE a > 1 ORDER BY b DESC NULLS LAST LIMIT 10",
    "SELECT 1 UNION SELECT 2 EXCEPT SELECT 3 INTERSECT SELECT 4",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
    "SELECT a, count(*) FILTER (WHERE b) OVER (PARTITION BY c ORDER BY d) FROM t",
    "SELECT x::numeric(10, 2), y::varchar(5), z::timestamp(3) with time zone FROM t",
    "SELECT $1, $2::text, ARRAY[1, 2], '{1,2}'::int[], (x).y, t.*, u.a[1:2] FROM t, u",
    "SELECT a COLLATE \"C\", 'it''s', E'tab\\there', U&'\\0041', B'101', X'ff' FROM \"MiXed\"",
    "SELECT EXTRACT(year FROM d), SUBSTRING(s FROM 2 FOR 3), POSITION('a' IN s), TRIM(s) FROM t",
    "SELECT x AT TIME ZONE 'UTC', OVERLAY(s PLACING 'x' FROM 2) FROM t",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED AND u.d THEN DELETE"
    " WHEN NOT MATCHED THEN INSERT (id, a) VALUES (u.id, u.a)",
    "INSERT INTO t AS x VALUES (1) ON CONFLICT ON CONSTRAINT c DO UPDATE SET b = EXCLUDED.b"
    " WHERE x.b IS NULL RETURNING *",
    "/* comment */ UPDATE ONLY t SET a = DEFAULT -- now()\n FROM u WHERE t.id = u.id",
    "COPY t (a, b) FROM STDIN WITH (FORMAT csv, HEADER true)",
    "CREATE TEMP TABLE t3 (a int PRIMARY KEY, b text NOT NULL DEFAULT 'x')",
    "PREPARE p (int, text) AS SELECT $1, $2",
    "SET search_path = public, pg_catalog",
    "DO $body$ BEGIN PERFORM now(); END $body$",
]


@pytest.mark.parametrize("sql", UNTOUCHED)
def test_other_statements_are_kept_verbatim(sql: str) -> None:
    assert rewrite(sql) is None
    out = rewrite(f"{sql};\nINSERT INTO log VALUES (now())")
    assert out == f"{sql};\nINSERT INTO log VALUES ({TS})"
    out = rewrite(f"INSERT INTO log VALUES (CURRENT_DATE); {sql}")
    assert out == f"INSERT INTO log VALUES ({DATE}); {sql}"


def test_strings_are_kept_as_written() -> None:
    # The client's spelling of literals is kept (what a backslash means depends on the
    # session's standard_conforming_strings, which the router does not change).
    sql = r"INSERT INTO t VALUES ('a\b', E'c\\d\'e', U&'\0041', $q$now()$q$, now())"
    assert rewrite(sql) == sql.replace("now())", f"{TS})")


# -- real server ---------------------------------------------------------------------------------

EXPRESSIONS = [
    "now()",
    "transaction_timestamp()",
    "pg_catalog.now()",
    "CURRENT_TIMESTAMP",
    *(f"CURRENT_TIMESTAMP({p})" for p in range(7)),
    "CURRENT_DATE",
    "CURRENT_TIME",
    *(f"CURRENT_TIME({p})" for p in range(7)),
    "LOCALTIME",
    *(f"LOCALTIME({p})" for p in range(7)),
    "LOCALTIMESTAMP",
    *(f"LOCALTIMESTAMP({p})" for p in range(7)),
    "now() - interval '1 day'",
    "CURRENT_DATE + 1",
    "CURRENT_DATE - date '2000-01-01'",
    "date_trunc('hour', now())",
    "now()::date",
    "extract(epoch FROM now())",
    "now() AT TIME ZONE 'America/New_York'",
    "CURRENT_TIMESTAMP(0)::text",
    "to_char(LOCALTIMESTAMP(2), 'YYYY-MM-DD HH24:MI:SS.US')",
]

TIME_ZONES = ["UTC", "Asia/Kathmandu", "America/St_Johns", "Pacific/Kiritimati", "Etc/GMT+12"]


@pytest.fixture(scope="module")
def pg(pg_nodes: list[LocalNode]) -> Iterator[psycopg.Connection]:
    with connect(pg_nodes[0]) as conn:
        yield conn


@contextmanager
def _time_zone(pg: psycopg.Connection, tz: str) -> Iterator[None]:
    pg.execute("SELECT set_config('TimeZone', %s, false)", [tz])
    try:
        yield
    finally:
        pg.execute("RESET TimeZone")


def _rewrite_at(sql: str, when: datetime) -> str:
    out = rewrite(sql, txn_time=when, stmt_time=when)
    assert out is not None
    return out


@pytest.mark.parametrize("tz", TIME_ZONES)
def test_same_values_and_types_as_postgresql(pg: psycopg.Connection, tz: str) -> None:
    """Inside one transaction, PostgreSQL's own functions and the rewrite given that
    transaction's start time agree on every value and type, in any session time zone."""
    select = "SELECT " + ", ".join(f"{e}, pg_typeof({e})::text" for e in EXPRESSIONS)
    with _time_zone(pg, tz), pg.transaction():
        start = pg.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        original = pg.execute(select).fetchone()
        rewritten = pg.execute(_rewrite_at(select, start)).fetchone()
    assert original is not None
    assert rewritten is not None
    for i, expr in enumerate(EXPRESSIONS):
        assert rewritten[2 * i] == original[2 * i], (tz, expr)
        assert rewritten[2 * i + 1] == original[2 * i + 1], (tz, expr)


def test_same_column_names_and_typmods(pg: psycopg.Connection) -> None:
    """CREATE TABLE AS from the original and from the rewrite: same column name, type and
    precision (CURRENT_TIME(2) gives a time(2) with time zone column), same value."""
    columns = """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 ORDER BY a.attnum
    """
    seen = set()
    with pg.transaction():
        start = pg.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        for i, expr in enumerate(EXPRESSIONS):
            pg.execute(f"CREATE TEMP TABLE orig{i} ON COMMIT DROP AS SELECT {expr}, 1 AS one")
            pg.execute(
                _rewrite_at(
                    f"CREATE TEMP TABLE rew{i} ON COMMIT DROP AS SELECT {expr}, 1 AS one", start
                )
            )
            orig = pg.execute(columns, [f"orig{i}"]).fetchall()
            rew = pg.execute(columns, [f"rew{i}"]).fetchall()
            assert rew == orig, expr
            seen.update(orig)
            same = pg.execute(
                f"SELECT (SELECT row(o.*)::text FROM orig{i} o)"
                f" = (SELECT row(r.*)::text FROM rew{i} r)"
            ).fetchone()
            assert same == (True,), expr
    assert ("current_time", "time(2) with time zone") in seen
    assert ("now", "timestamp with time zone") in seen
    assert ("localtimestamp", "timestamp(0) without time zone") in seen
    assert ("current_date", "date") in seen


def test_values_against_the_literal(pg: psycopg.Connection) -> None:
    """Known answers: the date/time of txn_time in the session time zone, with rounding."""
    when = datetime(2026, 11, 21, 23, 30, 59, 987654, tzinfo=UTC)
    tz = "Asia/Kathmandu"  # +05:45: already the next day there
    sql = (
        "SELECT now(), CURRENT_DATE, LOCALTIME, LOCALTIME(0), LOCALTIME(2), LOCALTIMESTAMP(3),"
        " CURRENT_TIMESTAMP(1), statement_timestamp()"
    )
    out = rewrite(sql, txn_time=when, stmt_time=when + timedelta(seconds=3))
    assert out is not None
    with _time_zone(pg, tz):
        row = pg.execute(out).fetchone()
    local = when.astimezone(ZoneInfo(tz))
    assert local.date() == date(2026, 11, 22)
    assert row == (
        when,
        date(2026, 11, 22),
        time(5, 15, 59, 987654),
        time(5, 16, 0),  # rounded, not truncated
        time(5, 15, 59, 990000),
        datetime(2026, 11, 22, 5, 15, 59, 988000),
        datetime(2026, 11, 21, 23, 31, 0, 0, tzinfo=UTC),
        when + timedelta(seconds=3),
    )


def test_rounding_at_midnight_matches_postgresql(pg: psycopg.Connection) -> None:
    # CURRENT_TIME(0) at 23:59:59.9 rounds the time of day to 24:00:00 in PostgreSQL (the
    # date is dropped first); rounding the timestamp first would give 00:00:00 instead.
    when = datetime(2026, 11, 21, 23, 59, 59, 900000, tzinfo=UTC)
    out = rewrite("SELECT CURRENT_TIME(0)::text, LOCALTIME(0)::text", txn_time=when)
    assert out is not None
    with _time_zone(pg, "UTC"):
        assert pg.execute(out).fetchone() == ("24:00:00+00", "24:00:00")
        assert pg.execute(
            "SELECT ('2026-11-21 23:59:59.9+00'::timestamptz)::time(0)::text"
        ).fetchone() == ("24:00:00",)


def test_precision_above_six_warns_like_postgresql(pg: psycopg.Connection) -> None:
    notices: list[str] = []

    def handler(diag: psycopg.errors.Diagnostic) -> None:
        notices.append(diag.message_primary or "")

    pg.add_notice_handler(handler)
    try:
        with pg.transaction():
            start = pg.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            original = pg.execute("SELECT CURRENT_TIMESTAMP(7)").fetchone()
            first = list(notices)
            notices.clear()
            rewritten = pg.execute(_rewrite_at("SELECT CURRENT_TIMESTAMP(7)", start)).fetchone()
    finally:
        pg.remove_notice_handler(handler)
    assert rewritten == original
    assert first
    assert notices == first


def test_writes_store_the_same_values(pg: psycopg.Connection) -> None:
    """INSERT/UPDATE/DELETE with time values, original vs rewritten, inside one
    transaction: the tables end up identical."""
    statements = [
        "INSERT INTO {t} VALUES (1, now(), now(), now(), CURRENT_DATE, CURRENT_TIMESTAMP(0))",
        "INSERT INTO {t} SELECT 2, CURRENT_TIMESTAMP, LOCALTIMESTAMP, CURRENT_DATE, now(), now()",
        "INSERT INTO {t} VALUES (3, now() - interval '1 day', now(), now(), CURRENT_DATE - 1,"
        " now())",
        "UPDATE {t} SET d = CURRENT_DATE + 7 WHERE d = CURRENT_DATE - 1",
        "UPDATE {t} SET ts = LOCALTIMESTAMP(2) WHERE tz < now() - interval '1 hour'",
        "DELETE FROM {t} WHERE id = 2 AND tz = now()",
        "INSERT INTO {t} VALUES (4, statement_timestamp(), now(), now(), CURRENT_DATE, now())"
        " ON CONFLICT (id) DO UPDATE SET tz = now()",
    ]
    with pg.transaction():
        start = pg.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        for name in ("orig", "rew"):
            pg.execute(
                f"CREATE TEMP TABLE {name} (id int PRIMARY KEY, tz timestamptz,"
                " ts timestamp, txt text, d date, tz0 timestamptz(0)) ON COMMIT DROP"
            )
        for sql in statements:
            pg.execute(sql.format(t="orig"))
            pg.execute(_rewrite_at(sql.format(t="rew"), start))
        orig = pg.execute("SELECT * FROM orig ORDER BY id").fetchall()
        rew = pg.execute("SELECT * FROM rew ORDER BY id").fetchall()
    # statement_timestamp() is not now() in PostgreSQL; the rewrite was given `start` for both.
    assert [r[:1] + r[2:] for r in rew] == [r[:1] + r[2:] for r in orig]
    assert [r[1] for r in rew if r[0] != 4] == [r[1] for r in orig if r[0] != 4]
    assert len(orig) == 3


def test_parameters_on_the_server(pg: psycopg.Connection) -> None:
    out = rewrite("SELECT $1::int + 1, $2::date = CURRENT_DATE, pg_typeof($3 + now())")
    assert out is not None
    with _time_zone(pg, "UTC"):
        result = pg.pgconn.exec_params(out.encode(), [b"41", b"2026-11-21", b"1 hour"])
    assert result.status == psycopg.pq.ExecStatus.TUPLES_OK, result.error_message
    assert [result.get_value(0, i) for i in range(3)] == [
        b"42",
        b"t",
        b"timestamp with time zone",
    ]


def test_rewritten_statements_run_on_the_server(pg: psycopg.Connection) -> None:
    """Rewrites of statements of every kind run on the server (PostgreSQL 15 here, while
    pglast follows a newer grammar: only the replaced spans are new text)."""
    setup = [
        "CREATE TEMP TABLE t (id int PRIMARY KEY, a timestamptz, d date, n text)",
        "CREATE TEMP TABLE u (id int PRIMARY KEY, a timestamptz, d date, n text)",
        "INSERT INTO u SELECT g, now(), CURRENT_DATE, 'u' || g FROM generate_series(1, 5) g",
    ]
    statements = [
        "INSERT INTO t VALUES (1, now(), CURRENT_DATE, 'x') RETURNING id, now(), CURRENT_DATE",
        "INSERT INTO t SELECT id + 10, now(), d, n FROM u WHERE d = CURRENT_DATE ORDER BY id",
        "UPDATE t SET a = now() - interval '1 day', d = CURRENT_DATE + 1 WHERE id = 1",
        "WITH x AS (SELECT id FROM u WHERE a <= now() ORDER BY id LIMIT 2)"
        " DELETE FROM t WHERE id - 10 IN (SELECT id FROM x) RETURNING id",
        "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = now()"
        " WHEN NOT MATCHED THEN INSERT VALUES (u.id, LOCALTIMESTAMP, CURRENT_DATE, 'm')",
        "INSERT INTO t VALUES (100, now(), CURRENT_DATE, 'c')"
        " ON CONFLICT (id) DO UPDATE SET a = EXCLUDED.a, d = CURRENT_DATE",
        "SELECT now(), CURRENT_TIME(3), count(*) FILTER (WHERE d = CURRENT_DATE) FROM t",
        "CREATE TEMP TABLE t2 AS SELECT id, now(), CURRENT_DATE FROM t",
        "SELECT now() INTO TEMP t3",
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) UPDATE t SET a = now()",
        "ALTER TABLE t2 ALTER COLUMN now TYPE date USING CURRENT_DATE",
        "SELECT 1; UPDATE t SET n = 'y' WHERE a < now(); SELECT CURRENT_DATE",
    ]
    with pg.transaction():
        for sql in setup:
            # Rewritten too: the rows hold the test's fixed transaction time, not the clock's.
            pg.execute(rewrite(sql) or sql)
        for sql in statements:
            out = rewrite(sql)
            assert out is not None, sql
            pg.execute(out)
        assert pg.execute("SELECT count(*) FROM t2").fetchone() == (9,)
        raise psycopg.Rollback()


NAMED_SELECTS = [
    "SELECT now(), CURRENT_DATE, CURRENT_TIME(2), LOCALTIMESTAMP, transaction_timestamp()",
    "SELECT (now()), ((CURRENT_DATE)), now()::date, CAST(now() AS text), now() AS n",
    "SELECT CASE WHEN g > 1 THEN now() - interval '1 day' ELSE now() END"
    " FROM generate_series(1, 2) g",
    'SELECT CURRENT_DATE::timestamp(0), LOCALTIME::text COLLATE "C", (SELECT now())',
    "SELECT * FROM now()",
    "SELECT * FROM CURRENT_DATE, LOCALTIME(1) AS l",
    "SELECT now.now FROM now()",
    "SELECT now()::date, count(*) FROM generate_series(1, 3) g GROUP BY 1 ORDER BY now",
    "SELECT now()::date, count(*) FROM generate_series(1, 3) g GROUP BY now()::date",
    "SELECT DISTINCT CURRENT_DATE FROM generate_series(1, 3) ORDER BY current_date",
    "SELECT now() UNION ALL SELECT now() - interval '1 hour' ORDER BY now",
    "WITH x AS (SELECT now(), CURRENT_DATE) SELECT x.now, x.current_date FROM x",
]


@pytest.mark.parametrize("sql", NAMED_SELECTS)
def test_output_columns_on_the_server(pg: psycopg.Connection, sql: str) -> None:
    """Original and rewrite give the same column names and rows (inside one transaction)."""
    with pg.transaction():
        start = pg.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        original = pg.execute(sql)
        names = [c.name for c in original.description or ()]
        rows = original.fetchall()
        rewritten = pg.execute(_rewrite_at(sql, start))
        assert [c.name for c in rewritten.description or ()] == names
        assert rewritten.fetchall() == rows
    assert rows


def test_undecodable_client_bytes_are_kept() -> None:
    # A client_encoding other than UTF-8: the protocol layer keeps such bytes as lone
    # surrogates; the rewrite keeps them, so the router can send the client's bytes back.
    raw = b"INSERT INTO t VALUES ('caf\xe9', now(), 'na\xefve', CURRENT_DATE)"
    sql = raw.decode("utf-8", "surrogateescape")
    out = rewrite(sql)
    assert out is not None
    assert out.encode("utf-8", "surrogateescape") == (
        b"INSERT INTO t VALUES ('caf\xe9', "
        + TS.encode()
        + b", 'na\xefve', "
        + DATE.encode()
        + b")"
    )


def test_nul_byte_ends_the_text_like_on_the_server() -> None:
    # A server reads a query string up to its NUL; so does the parser.  What follows is
    # kept as is (the router's protocol layer never produces this: strings end at NUL).
    out = rewrite("INSERT INTO t VALUES (now())\x00; SELECT random()")
    assert out == f"INSERT INTO t VALUES ({TS})\x00; SELECT random()"


# -- plans kept by statement shape -----------------------------------------------------------


def warm(sql: str, volatile: frozenset[str] = VOLATILE, txn_time: datetime = TXN) -> str | None:
    """check_and_rewrite with whatever plans earlier calls kept."""
    return check_and_rewrite(
        sql,
        txn_time=txn_time,
        stmt_time=STMT,
        is_volatile=lambda name: name in volatile,
        deterministic=frozenset(),
    )


def warm_refused(sql: str) -> None:
    with pytest.raises(PgError) as info:
        warm(sql)
    assert info.value.sqlstate == FEATURE_NOT_SUPPORTED


def _no_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(sql: str) -> Any:
        raise AssertionError(f"parsed again: {sql}")

    monkeypatch.setattr(determinism, "parse_sql", fail)


def test_same_shape_other_constants_is_rewritten_from_the_kept_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    determinism._PLANS.clear()
    first = "INSERT INTO h (tid, delta, mtime) VALUES (1, 'a', CURRENT_TIMESTAMP)"
    assert warm(first) == f"INSERT INTO h (tid, delta, mtime) VALUES (1, 'a', {TS})"
    _no_parse(monkeypatch)
    # Longer constants move every offset after them; a string constant may hold "now()".
    later = "INSERT INTO h (tid, delta, mtime) VALUES (123456, 'now() -- x', CURRENT_TIMESTAMP)"
    got = warm(later, txn_time=datetime(2027, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
    assert got == (
        "INSERT INTO h (tid, delta, mtime) VALUES (123456, 'now() -- x', "
        "CAST('2027-01-02 03:04:05.000006+00:00' AS timestamp with time zone))"
    )


def test_statement_and_transaction_times_keep_their_places(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    determinism._PLANS.clear()
    assert warm("SELECT now(), 1, statement_timestamp() AS s") == (
        f'SELECT {TS} AS "now", 1, {STMT_TS} AS s'
    )
    _no_parse(monkeypatch)
    got = check_and_rewrite(  # the next statement of the transaction: a later time
        "SELECT now(), 22, statement_timestamp() AS s",
        txn_time=TXN,
        stmt_time=datetime(2026, 11, 21, 10, 0, 3, 5, tzinfo=UTC),
        is_volatile=lambda n: True,
        deterministic=frozenset(),
    )
    later = "CAST('2026-11-21 10:00:03.000005+00:00' AS timestamp with time zone)"
    assert got == f'SELECT {TS} AS "now", 22, {later} AS s'


@pytest.mark.parametrize(
    ("allowed", "refused_sql"),
    [
        # LIMIT 0 picks no rows at all; LIMIT 5 picks arbitrary ones.
        (
            "DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 0)",
            "DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 5)",
        ),
        (
            "DELETE FROM t WHERE id IN (SELECT id FROM t OFFSET 0)",
            "DELETE FROM t WHERE id IN (SELECT id FROM t OFFSET 3)",
        ),
    ],
)
def test_a_constant_that_decides_is_never_shared_by_shape(allowed: str, refused_sql: str) -> None:
    determinism._PLANS.clear()
    for _ in range(2):  # either order
        assert warm(allowed) is None
        warm_refused(refused_sql)
    determinism._PLANS.clear()
    warm_refused(refused_sql)
    assert warm(allowed) is None


def test_precision_and_explain_options_are_not_shared_by_shape() -> None:
    determinism._PLANS.clear()
    three = warm("SELECT CURRENT_TIME(3)")
    six = warm("SELECT CURRENT_TIME(6)")
    assert three is not None and "time(3) with time zone" in three
    assert six is not None and "time(6) with time zone" in six
    # EXPLAIN (ANALYZE 0) runs nothing, EXPLAIN (ANALYZE 1) runs the INSERT.
    assert warm("EXPLAIN (ANALYZE 0) INSERT INTO t VALUES (now())") is None
    assert warm("EXPLAIN (ANALYZE 1) INSERT INTO t VALUES (now())") == (
        f"EXPLAIN (ANALYZE 1) INSERT INTO t VALUES ({TS})"
    )


def test_a_function_whose_volatility_changed_is_checked_again() -> None:
    determinism._PLANS.clear()
    stable = warm("INSERT INTO t VALUES (f(1), now())", volatile=frozenset())
    assert stable == f"INSERT INTO t VALUES (f(1), {TS})"
    with pytest.raises(PgError, match=r"cannot replicate f\(\)"):
        warm("INSERT INTO t VALUES (f(2), now())", volatile=frozenset({"f"}))


def test_a_unicode_escape_character_is_part_of_what_a_plan_is_kept_by() -> None:
    # U&"n!006Fw" UESCAPE '!' is now; with '#' as the escape it is the name n!006Fw.
    determinism._PLANS.clear()
    now = """SELECT U&"n!006Fw" UESCAPE '!' ()"""
    other = """SELECT U&"n!006Fw" UESCAPE '#' ()"""
    assert warm(now) is not None
    assert warm(other, volatile=frozenset()) is None
    assert warm(now) is not None


def test_an_identifier_spelled_like_a_token_kind_is_not_a_constant() -> None:
    determinism._PLANS.clear()
    assert warm("INSERT INTO t VALUES (now(), 1)") is not None
    assert warm("INSERT INTO t VALUES (now(), ICONST)", volatile=frozenset()) is not None
    assert len(determinism._PLANS._plans) == 2


def test_a_full_plan_cache_forgets_its_oldest_plans_not_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    determinism._PLANS.clear()
    monkeypatch.setattr(determinism._Plans, "max_entries", 16)
    for i in range(16):
        warm(f"INSERT INTO t{i} VALUES (now())")
    warm("INSERT INTO newest VALUES (now())")
    assert len(determinism._PLANS._plans) == 15  # the oldest two (an eighth) made room
    _no_parse(monkeypatch)  # the newer plans are all still there
    for i in range(2, 16):
        assert warm(f"INSERT INTO t{i} VALUES (now())") is not None
    assert warm("INSERT INTO newest VALUES (now())") is not None
