"""Statement classification (pgquorum.sql.analyze) and the volatility catalog (catalog.py).

No database needed: lookup_sql's quoting is checked by parsing its output with pglast.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import ast
from pglast.parser import fingerprint, parse_sql

from pgquorum.sql import analyze as analyze_mod
from pgquorum.sql.analyze import Analysis, Analyzer, CopyDirection, Route
from pgquorum.sql.catalog import FunctionCatalog, TableCatalog

READ, WRITE, LEAD = Route.READ, Route.WRITE, Route.LEAD


def analyze(sql: str) -> Analysis:
    return Analyzer().analyze(sql)


# -- routes --------------------------------------------------------------------------------

READS = [
    "SELECT 1",
    "select abalance from pgbench_accounts where aid = 1234;",
    "SELECT a, b FROM t JOIN u USING (id) WHERE a > 1 ORDER BY b LIMIT 10 OFFSET 5",
    "SELECT 1 UNION SELECT 2 EXCEPT SELECT 3 INTERSECT SELECT 4",
    "VALUES (1, 'a'), (2, 'b')",
    "TABLE t",
    "SELECT * FROM (SELECT * FROM (SELECT x FROM t) a) b",
    "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id)",
    "WITH x AS (SELECT 1), y AS (SELECT * FROM x) SELECT * FROM y",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
    "SELECT DISTINCT ON (a) a, b FROM t",
    "SELECT a FROM t GROUP BY a HAVING a > 1",
    "SHOW search_path",
    "SHOW ALL",
    "SHOW transaction_isolation",
    "EXPLAIN SELECT * FROM t",
    "EXPLAIN (COSTS OFF, FORMAT JSON) SELECT * FROM t WHERE a = 1",
    "EXPLAIN VALUES (1)",
    "/* leading comment */ SELECT 1 -- trailing",
]


@pytest.mark.parametrize("sql", READS)
def test_read(sql: str) -> None:
    a = analyze(sql)
    assert a.route is READ
    assert a.error is None
    assert a.copy is None
    assert a.statements == 1


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN ANALYZE SELECT * FROM t",
        "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
        "EXPLAIN (ANALYZE true) SELECT 1",
    ],
)
def test_explain_analyze_of_a_read_is_read(sql: str) -> None:
    # ANALYZE executes exactly the read-only query; its functions still go to the caller.
    assert analyze(sql).route is READ


WRITES = [
    "INSERT INTO t VALUES (1)",
    "INSERT INTO t SELECT * FROM u",
    "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 2",
    "UPDATE t SET a = 1 WHERE id = 2",
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 5;",
    "DELETE FROM t WHERE id = 1",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a",
    "CREATE TABLE t (id int)",
    "CREATE TEMP TABLE tt (id int)",
    "CREATE TEMPORARY TABLE tt AS SELECT 1",
    "CREATE TABLE t2 AS SELECT * FROM t",
    "CREATE INDEX ON t (a)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MATERIALIZED VIEW mv AS SELECT 1",
    "REFRESH MATERIALIZED VIEW mv",
    "ALTER TABLE t ADD COLUMN b int",
    "DROP TABLE t",
    "TRUNCATE t",
    "GRANT SELECT ON t TO bob",
    "COMMENT ON TABLE t IS 'x'",
    "SELECT 1 INTO t2",
    "SELECT * INTO TEMP t3 FROM t",
    "BEGIN",
    "BEGIN READ ONLY",
    "START TRANSACTION",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "ROLLBACK TO SAVEPOINT s1",
    "PREPARE TRANSACTION 'gid'",
    "COMMIT PREPARED 'gid'",
    "ROLLBACK PREPARED 'gid'",
    "SET search_path = public",
    "SET LOCAL statement_timeout = 0",
    "SET TIME ZONE 'UTC'",
    "RESET ALL",
    "RESET search_path",
    "PREPARE p AS SELECT 1",
    "EXECUTE p",
    "DEALLOCATE p",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "NOTIFY chan, 'payload'",
    "VACUUM t",
    "VACUUM",
    "ANALYZE t",
    "ANALYZE",
    "CHECKPOINT",
    "CLUSTER t",
    "REINDEX TABLE t",
    "CALL p(1)",
    "DO $$ BEGIN PERFORM 1; END $$",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "SECURITY LABEL ON TABLE t IS 'x'",
    "CREATE SEQUENCE s",
    "ALTER SYSTEM SET work_mem = '1MB'",
    "LOAD 'plpgsql'",
    "EXPLAIN INSERT INTO t VALUES (1)",
    "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
    "EXPLAIN (ANALYZE false) DELETE FROM t",
    "EXPLAIN (ANALYZE, FORMAT JSON) UPDATE t SET a = 1",
    "EXPLAIN EXECUTE p",
    "EXPLAIN CREATE TABLE t9 AS SELECT 1",
    "EXPLAIN SELECT * FROM t FOR UPDATE",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
]


@pytest.mark.parametrize("sql", WRITES)
def test_write(sql: str) -> None:
    a = analyze(sql)
    assert a.route is WRITE
    assert a.functions == frozenset()
    assert a.error is None
    assert a.statements == 1


LOCKING_READS = [
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR NO KEY UPDATE",
    "SELECT * FROM t FOR SHARE",
    "SELECT * FROM t FOR KEY SHARE",
    "SELECT * FROM t FOR UPDATE OF t SKIP LOCKED",
    "SELECT * FROM t FOR SHARE NOWAIT",
    "SELECT 1 UNION SELECT 2 FOR UPDATE",
    "SELECT * FROM (SELECT * FROM t FOR UPDATE) s",
    "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)",
    "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id FOR KEY SHARE)",
    "SELECT (SELECT a FROM u LIMIT 1 FOR NO KEY UPDATE)",
    "WITH c AS (SELECT * FROM t FOR UPDATE) SELECT * FROM c",
    "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.id = t.id FOR UPDATE) l",
    "SELECT * FROM (SELECT * FROM (SELECT * FROM (SELECT * FROM t FOR SHARE) a) b) c",
    "SELECT 1 UNION ALL (SELECT 2 FROM t FOR UPDATE)",
    "COPY (SELECT * FROM t FOR UPDATE) TO STDOUT",
]


@pytest.mark.parametrize("sql", LOCKING_READS)
def test_locking_read_is_write(sql: str) -> None:
    a = analyze(sql)
    assert a.route is WRITE
    assert a.functions == frozenset()


WRITABLE_CTES = [
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i",
    "WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u",
    "WITH m AS (MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE RETURNING t.*)"
    " SELECT * FROM m",
    "WITH a AS (SELECT 1), d AS (DELETE FROM t) SELECT * FROM a",
    # nested: in a subquery's WITH, in a CTE's CTE, in a set operation, in WHERE
    "SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s",
    "WITH outer_cte AS (WITH d AS (DELETE FROM t RETURNING id) SELECT id FROM d)"
    " SELECT * FROM outer_cte",
    "SELECT 1 UNION SELECT * FROM (WITH i AS (INSERT INTO t VALUES (1) RETURNING id)"
    " SELECT id FROM i) s",
    "SELECT * FROM t WHERE id IN (WITH u AS (UPDATE t SET a = 1 RETURNING id) SELECT id FROM u)",
    "COPY (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) TO STDOUT",
]


@pytest.mark.parametrize("sql", WRITABLE_CTES)
def test_data_modifying_cte_is_write(sql: str) -> None:
    assert analyze(sql).route is WRITE


LEADS = [
    "LISTEN chan",
    "UNLISTEN chan",
    "UNLISTEN *",
    "DECLARE c CURSOR FOR SELECT * FROM t",
    "DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT now()",
    "FETCH c",
    "FETCH 10 FROM c",
    "FETCH ALL IN c",
    "FETCH BACKWARD 2 FROM c",
    "MOVE c",
    "MOVE LAST IN c",
    "CLOSE c",
    "CLOSE ALL",
]


@pytest.mark.parametrize("sql", LEADS)
def test_lead(sql: str) -> None:
    a = analyze(sql)
    assert a.route is LEAD
    assert a.functions == frozenset()  # only READ carries functions


# -- COPY ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "route", "copy"),
    [
        ("COPY t TO STDOUT", READ, CopyDirection.OUT),
        ("COPY t (a, b) TO STDOUT WITH (FORMAT csv, HEADER)", READ, CopyDirection.OUT),
        ("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT", READ, CopyDirection.OUT),
        ("COPY (VALUES (1)) TO STDOUT (FORMAT binary)", READ, CopyDirection.OUT),
        ("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", WRITE, CopyDirection.OUT),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", WRITE, CopyDirection.OUT),
        ("COPY t FROM STDIN", WRITE, CopyDirection.IN),
        ("COPY t (a) FROM STDIN WITH (FORMAT csv) WHERE a > 0", WRITE, CopyDirection.IN),
        # server-side files and programs: side effects on each server, no client stream
        ("COPY t TO '/tmp/t.csv'", WRITE, None),
        ("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", WRITE, None),
        ("COPY (SELECT 1) TO '/tmp/one'", WRITE, None),
        ("COPY t FROM '/tmp/t.csv'", WRITE, None),
        ("COPY t FROM PROGRAM 'cat /tmp/t.csv'", WRITE, None),
    ],
)
def test_copy(sql: str, route: Route, copy: CopyDirection | None) -> None:
    a = analyze(sql)
    assert (a.route, a.copy) == (route, copy)


def test_copy_query_functions() -> None:
    a = analyze("COPY (SELECT nextval('s'), lower(x) FROM t) TO STDOUT")
    assert a.route is READ
    assert a.functions == {"nextval", "lower"}


# -- isolation -------------------------------------------------------------------------------

ISOLATION = [
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", True),
    ("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ", True),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", True),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", True),
    ("START TRANSACTION READ WRITE, ISOLATION LEVEL REPEATABLE READ", True),
    ("BEGIN ISOLATION LEVEL READ COMMITTED", False),
    ("BEGIN ISOLATION LEVEL READ UNCOMMITTED", False),
    ("BEGIN", False),
    ("BEGIN READ ONLY", False),
    ("COMMIT AND CHAIN", False),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", True),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", True),
    ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", False),
    ("SET TRANSACTION READ ONLY", False),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", True),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED", False),
    ("SET default_transaction_isolation = 'serializable'", True),
    ("SET default_transaction_isolation TO 'repeatable read'", True),
    ("SET SESSION default_transaction_isolation = 'SERIALIZABLE'", True),
    ("SET default_transaction_isolation = serializable", True),
    ("SET \"default_transaction_isolation\" = 'serializable'", True),
    ("SET LOCAL default_transaction_isolation = 'serializable'", True),
    ("SET transaction_isolation = 'serializable'", True),
    ("SET default_transaction_isolation = 'read committed'", False),
    ("SET default_transaction_isolation TO DEFAULT", False),
    ("RESET default_transaction_isolation", False),
    ("SET search_path = 'serializable'", False),
    ("SET application_name = 'repeatable read'", False),
]


@pytest.mark.parametrize(("sql", "strict"), ISOLATION)
def test_strict_isolation(sql: str, strict: bool) -> None:
    a = analyze(sql)
    assert a.route is WRITE
    assert a.strict_isolation is strict


@pytest.mark.parametrize(
    ("sql", "strict"),
    [
        ("SELECT set_config('default_transaction_isolation', 'serializable', false)", True),
        ("SELECT pg_catalog.set_config('transaction_isolation', 'repeatable read', true)", True),
        ("SELECT set_config('default_transaction_isolation', 'read committed', false)", False),
        ("SELECT set_config('search_path', 'public', false)", False),
        ("SELECT set_config($1, $2, false)", True),  # could be anything: assume strict
    ],
)
def test_set_config_isolation(sql: str, strict: bool) -> None:
    a = analyze(sql)
    # READ with set_config in functions: the catalog (volatile) upgrades it to WRITE.
    assert a.route is READ
    assert "set_config" in a.functions or "pg_catalog.set_config" in a.functions
    assert a.strict_isolation is strict


def test_strict_isolation_in_multi_statement() -> None:
    a = analyze("SELECT 1; BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 2")
    assert (a.route, a.strict_isolation, a.statements) == (WRITE, True, 3)


@pytest.mark.parametrize(
    ("sql", "reads"),
    [
        ("INSERT INTO t SELECT sum(v) FROM s", True),
        ("INSERT INTO t SELECT * FROM t WHERE id < 10", True),  # its own other rows
        ("UPDATE t SET v = (SELECT max(v) FROM s) WHERE id = 1", True),
        ("UPDATE t SET v = s.v FROM s WHERE s.id = t.id", True),
        ("DELETE FROM t USING s WHERE t.id = s.id", True),
        ("DELETE FROM t WHERE id IN (SELECT id FROM s)", True),
        ("WITH d AS (DELETE FROM q RETURNING *) INSERT INTO arch SELECT * FROM d", True),
        ("CREATE TABLE c AS SELECT * FROM s", True),
        ("BEGIN; INSERT INTO t SELECT 1 FROM s; COMMIT", True),
        ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7", False),
        ("INSERT INTO t VALUES (1, now())", False),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", False),
        ("DELETE FROM t WHERE id = 3", False),
        ("SELECT * FROM a JOIN b USING (id)", False),  # a read: nothing written
    ],
)
def test_writes_that_read_other_rows(sql: str, reads: bool) -> None:
    assert analyze(sql).reads_others is reads


@pytest.mark.parametrize(
    ("sql", "filters"),
    [
        ("UPDATE a SET v = v + 1 WHERE aid = 7", (("a", {"aid"}),)),
        ("UPDATE t SET v = 1 WHERE t.id = 3 AND k = $1 AND x > 2", (("t", {"id", "k"}),)),
        ("DELETE FROM jobs j WHERE j.state = CAST('new' AS text)", (("jobs", {"state"}),)),
        ("DELETE FROM jobs j WHERE other.id = 1", (("jobs", set()),)),  # not its column
        ("UPDATE t SET v = 0", (("t", set()),)),
        ("UPDATE t SET v = 0 WHERE id = 1 OR id = 2", (("t", set()),)),
        ("UPDATE t SET v = 0 WHERE id = v", (("t", set()),)),  # not a constant
        (
            "BEGIN; UPDATE a SET v = 1 WHERE id = 1; DELETE FROM b; COMMIT",
            (("a", {"id"}), ("b", set())),
        ),
        ("INSERT INTO t VALUES (1)", ()),
        ("SELECT * FROM t WHERE id = 1", ()),
    ],
)
def test_update_and_delete_filters(sql: str, filters: tuple[tuple[str, set[str]], ...]) -> None:
    assert analyze(sql).filters == tuple((t, frozenset(c)) for t, c in filters)


# -- fingerprint cache traps -----------------------------------------------------------------

CONSTANT_TRAPS = [
    (
        "SET default_transaction_isolation = 'read committed'",
        "SET default_transaction_isolation = 'serializable'",
    ),
    (
        "SET SESSION default_transaction_isolation = 'read committed'",
        "SET SESSION default_transaction_isolation = 'repeatable read'",
    ),
    ("SET transaction_isolation = 'read committed'", "SET transaction_isolation = 'serializable'"),
    # the isolation level is a constant in the parse tree, whatever the syntax
    ("BEGIN ISOLATION LEVEL READ COMMITTED", "BEGIN ISOLATION LEVEL SERIALIZABLE"),
    (
        "START TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    ),
    (
        "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ),
    (
        "SELECT set_config('default_transaction_isolation', 'read committed', false)",
        "SELECT set_config('default_transaction_isolation', 'serializable', false)",
    ),
    (
        "SELECT set_config('search_path', 'serializable', false)",
        "SELECT set_config('default_transaction_isolation', 'serializable', false)",
    ),
]


@pytest.mark.parametrize(("lax", "strict"), CONSTANT_TRAPS)
def test_fingerprint_trap_constants(lax: str, strict: str) -> None:
    # The trap is real: the two statements share a fingerprint ...
    assert fingerprint(lax) == fingerprint(strict)
    analyzer = Analyzer()
    assert analyzer.analyze(lax).strict_isolation is False
    # ... yet the second is not answered from the first one's fingerprint-cache entry.
    assert analyzer.analyze(strict).strict_isolation is True
    assert analyzer.stats()["fingerprint_hits"] == 0
    # And the other way round.
    analyzer = Analyzer()
    assert analyzer.analyze(strict).strict_isolation is True
    assert analyzer.analyze(lax).strict_isolation is False


def test_fingerprint_trap_explain_analyze_option() -> None:
    analyzer = Analyzer()
    for sql in [
        "EXPLAIN (ANALYZE false) INSERT INTO t VALUES (1)",
        "EXPLAIN (ANALYZE true) INSERT INTO t VALUES (1)",
        "EXPLAIN (ANALYZE 0) INSERT INTO t VALUES (1)",
        "EXPLAIN (ANALYZE) INSERT INTO t VALUES (1)",
        "EXPLAIN (ANALYZE off) INSERT INTO t VALUES (2)",
        "EXPLAIN (ANALYZE on) INSERT INTO t VALUES (3)",
    ]:
        assert analyzer.analyze(sql).route is WRITE, sql


def _nest(inner: str, n: int) -> str:
    return "SELECT " + "abs(" * n + inner + ")" * n


def test_fingerprint_trap_depth() -> None:
    # libpg_query stops hashing 100 levels deep: deeply different statements collide.
    safe, volatile = _nest("abs(1)", 60), _nest("nextval('s')", 60)
    assert fingerprint(safe) == fingerprint(volatile)
    analyzer = Analyzer()
    assert analyzer.analyze(safe).functions == {"abs"}
    assert analyzer.analyze(volatile).functions == {"abs", "nextval"}

    read = "SELECT * FROM " + "(SELECT * FROM " * 40 + "t" + ") s" * 40
    locking = "SELECT * FROM " + "(SELECT * FROM " * 40 + "t FOR UPDATE" + ") s" * 40
    assert fingerprint(read) == fingerprint(locking)
    analyzer = Analyzer()
    assert analyzer.analyze(read).route is READ
    assert analyzer.analyze(locking).route is WRITE


SHAPES = {
    "call": lambda f, n: "SELECT " + "abs(" * n + f + "(1)" + ")" * n,
    "operator": lambda f, n: "SELECT " + "(1 + " * n + f + "(1)" + ")" * n,
    "scalar subquery": lambda f, n: "SELECT " + "(SELECT " * n + f + "(1)" + ")" * n,
    "from subquery": lambda f, n: (
        "SELECT * FROM " + "(SELECT * FROM " * n + f + "(1) x" + ") s" * n
    ),
    "case": lambda f, n: "SELECT " + "CASE WHEN a THEN " * n + f + "(1)" + " END" * n,
    "cte": lambda f, n: _cte(f"SELECT {f}(1)", n),
}


def _cte(query: str, n: int) -> str:
    for _ in range(n):
        query = f"WITH c AS ({query}) SELECT * FROM c"
    return query


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_depth_measure_matches_fingerprint_cutoff(shape: str) -> None:
    """The walker's depth counts levels like libpg_query: the first nesting at which
    fingerprints stop seeing the difference is deeper than the cache's safety bound, and
    the one just before is not cut off yet."""
    make = SHAPES[shape]
    for n in range(1, 200):
        if fingerprint(make("abs", n)) == fingerprint(make("nextval", n)):
            break
    else:
        pytest.fail("no fingerprint collision found")
    depth = analyze_mod._scan(parse_sql(make("abs", n))[0].stmt, analyze_mod._STMT_DEPTH).depth
    assert depth >= 100
    shallower = parse_sql(make("abs", n - 1))[0].stmt
    assert analyze_mod._scan(shallower, analyze_mod._STMT_DEPTH).depth <= 101
    assert analyze_mod._FINGERPRINT_SAFE_DEPTH < 100


# -- errors, empty, multi-statement ----------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",
        "SELECT (",
        "SELECT 1; SELEC 2",
        "INSERT INTO",
        "SELECT 'unterminated",
        "garbage garbage",
    ],
)
def test_syntax_error(sql: str) -> None:
    analyzer = Analyzer()
    a = analyzer.analyze(sql)
    assert a.route is WRITE
    assert a.error
    assert "syntax error" in a.error or "unterminated" in a.error
    assert a.statements == 1
    assert a.functions == frozenset()
    assert analyzer.analyze(sql) is a  # cached by text
    assert analyzer.stats()["fingerprint_entries"] == 0


def test_nul_byte_is_an_error() -> None:
    a = analyze("SELECT 1\x00; DELETE FROM t")
    assert a.route is WRITE
    assert a.error


@pytest.mark.parametrize("sql", ["", "   ", "\n\t", "-- only a comment", "/* c */", ";", " ; ;; "])
def test_empty(sql: str) -> None:
    a = analyze(sql)
    assert (a.route, a.statements, a.functions, a.error) == (READ, 0, frozenset(), None)


@pytest.mark.parametrize(
    ("sql", "route", "statements", "functions"),
    [
        ("SELECT 1; SELECT now()", READ, 2, {"now"}),
        ("SELECT f(); SELECT g(); SHOW x", READ, 3, {"f", "g"}),
        ("SELECT f(); INSERT INTO t VALUES (1)", WRITE, 2, set()),
        ("INSERT INTO t VALUES (1); SELECT f()", WRITE, 2, set()),
        ("SELECT f(); LISTEN x", LEAD, 2, set()),
        ("FETCH c; SELECT 1", LEAD, 2, set()),
        ("LISTEN x; UPDATE t SET a = 1", WRITE, 2, set()),
        ("BEGIN; SELECT 1; COMMIT", WRITE, 3, set()),
        ("SELECT 1;", READ, 1, set()),
        ("SELECT 1;;", READ, 1, set()),
        ("SELECT 1; -- done", READ, 1, set()),
    ],
)
def test_multi_statement(sql: str, route: Route, statements: int, functions: set[str]) -> None:
    a = analyze(sql)
    assert (a.route, a.statements, a.functions) == (route, statements, functions)


def test_multi_statement_copy_and_catalog() -> None:
    a = analyze("COPY t FROM STDIN; SELECT 1")
    assert (a.route, a.copy) == (WRITE, CopyDirection.IN)
    a = analyze("SELECT 1; COPY t TO STDOUT")
    assert (a.route, a.copy) == (READ, CopyDirection.OUT)
    a = analyze("SELECT 1; CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'")
    assert (a.route, a.catalog_change) == (WRITE, True)


# -- functions -------------------------------------------------------------------------------

FUNCTIONS = [
    ("SELECT now()", {"now"}),
    ("SELECT 1 + 2 * 3, 'a' || 'b', a = b, x::int, CAST(y AS text) FROM t", set()),
    ("SELECT pg_catalog.now(), public.f(1)", {"pg_catalog.now", "public.f"}),
    ("SELECT mydb.myschema.f()", {"myschema.f"}),
    ("SELECT Lower(X) FROM t", {"lower"}),  # the parser folds unquoted identifiers
    ('SELECT "MixedCase"(1), "S"."F"()', {"MixedCase", "S.F"}),
    ('SELECT "a.b"(), "q""uote"()', {'"a.b"', '"q""uote"'}),
    ("SELECT * FROM generate_series(1, 10) g", {"generate_series"}),
    ("SELECT * FROM ROWS FROM (f(1), g(2)) WITH ORDINALITY", {"f", "g"}),
    ("SELECT * FROM t, LATERAL unnest(t.arr) u", {"unnest"}),
    ("SELECT * FROM t JOIN s.tf(t.id) x ON true", {"s.tf"}),
    ("SELECT f(g(h(1)))", {"f", "g", "h"}),
    ("SELECT * FROM t WHERE a = (SELECT max(b) FROM u WHERE c = lower(d))", {"max", "lower"}),
    ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE f(u.a))", {"f"}),
    ("WITH c AS (SELECT random() AS r) SELECT r FROM c", {"random"}),
    ("WITH c AS (WITH d AS (SELECT f()) SELECT * FROM d) SELECT * FROM c", {"f"}),
    ("SELECT 1 UNION SELECT f() INTERSECT SELECT g()", {"f", "g"}),
    ("VALUES (f(1)), (g(2))", {"f", "g"}),
    (
        "SELECT count(*), sum(a) FILTER (WHERE b > c(1)), string_agg(d, ',' ORDER BY e(d)) FROM t",
        {"count", "sum", "c", "string_agg", "e"},
    ),
    ("SELECT row_number() OVER (PARTITION BY f(a) ORDER BY b) FROM t", {"row_number", "f"}),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t", {"percentile_cont"}),
    (
        "SELECT nextval('s'), currval('s'), setval('s', 1), lastval()",
        {"nextval", "currval", "setval", "lastval"},
    ),
    ("SELECT * FROM t ORDER BY f(a) LIMIT g()", {"f", "g"}),
    ("SELECT a FROM t GROUP BY f(a) HAVING g(count(*)) > 1", {"f", "g", "count"}),
    ("SELECT CASE WHEN f() THEN g() ELSE h() END, COALESCE(i(), 0)", {"f", "g", "h", "i"}),
    ("SELECT ARRAY[f()], ROW(g()), (h()).x", {"f", "g", "h"}),
    ("SELECT trim(x), extract(year FROM ts)", {"pg_catalog.btrim", "pg_catalog.extract"}),
    ("SELECT current_date, current_user, localtimestamp", set()),
    ("SHOW search_path", set()),
    ("EXPLAIN SELECT f() FROM g()", {"f", "g"}),
    ("EXPLAIN ANALYZE SELECT f()", {"f"}),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10) WHERE f(a)", {"f"}),
    ("SELECT * FROM t WHERE a IN (f(), g()) AND b = ANY (h())", {"f", "g", "h"}),
]


@pytest.mark.parametrize(("sql", "functions"), FUNCTIONS)
def test_functions(sql: str, functions: set[str]) -> None:
    a = analyze(sql)
    assert a.route is READ
    assert a.functions == functions
    assert isinstance(a.functions, frozenset)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (nextval('s'))",
        "SELECT nextval('s') FROM t FOR UPDATE",
        "WITH d AS (DELETE FROM t RETURNING f(a)) SELECT g() FROM d",
        "DECLARE c CURSOR FOR SELECT f()",
        "SELECT f() INTO t2",
        "CREATE TABLE t2 AS SELECT f()",
        "SELECT f(); FETCH c",
    ],
)
def test_functions_empty_when_not_read(sql: str) -> None:
    assert analyze(sql).functions == frozenset()


# -- catalog changes -------------------------------------------------------------------------

CATALOG = [
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", True),
    ("CREATE OR REPLACE FUNCTION f() RETURNS int VOLATILE LANGUAGE sql AS 'select 1'", True),
    ("CREATE PROCEDURE p() LANGUAGE sql AS $$ select 1 $$", True),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC SELECT 1; END", True),
    ("ALTER FUNCTION f() IMMUTABLE", True),
    ("ALTER FUNCTION f(int) VOLATILE", True),
    ("ALTER PROCEDURE p() SECURITY DEFINER", True),
    ("ALTER ROUTINE r() STABLE", True),
    ("ALTER FUNCTION f() RENAME TO g", True),
    ("ALTER FUNCTION f() SET SCHEMA s", True),
    ("DROP FUNCTION f", True),
    ("DROP FUNCTION IF EXISTS f(int), g(text) CASCADE", True),
    ("DROP PROCEDURE p", True),
    ("DROP ROUTINE r", True),
    ("DROP AGGREGATE a(int)", True),
    ("CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)", True),
    ("CREATE EXTENSION pgcrypto", True),
    ("CREATE EXTENSION IF NOT EXISTS hstore SCHEMA s", True),
    ("ALTER EXTENSION hstore UPDATE", True),
    ("ALTER EXTENSION hstore SET SCHEMA s", True),
    ("ALTER EXTENSION hstore ADD FUNCTION f()", True),
    ("DROP EXTENSION pgcrypto", True),
    ("DROP SCHEMA s CASCADE", True),
    ("ALTER SCHEMA s RENAME TO t", True),
    ("DROP OWNED BY bob", True),
    (
        "DO $$ BEGIN EXECUTE 'CREATE FUNCTION x() RETURNS int AS ''select 1'' LANGUAGE sql';"
        " END $$",
        True,
    ),
    ("CREATE OR REPLACE VIEW v AS SELECT 1", True),
    ("CREATE OR REPLACE RULE r AS ON INSERT TO t DO NOTHING", True),
    ("CREATE OR REPLACE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()", True),
    ("CREATE VIEW v AS SELECT 1", False),
    ("CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()", False),
    ("CREATE SCHEMA s", False),
    ("CREATE TABLE t (id int)", False),
    ("DROP TABLE t", False),
    ("ALTER TABLE t RENAME TO u", False),
    ("INSERT INTO t VALUES (1)", False),
    ("SELECT 1", False),
    ("CALL p()", False),
    ("SET search_path = s", False),
]


@pytest.mark.parametrize(("sql", "change"), CATALOG)
def test_catalog_change(sql: str, change: bool) -> None:
    a = analyze(sql)
    assert a.catalog_change is change
    if change:
        assert a.route is WRITE


# -- caches ----------------------------------------------------------------------------------


def test_fingerprint_cache_shares_analysis_between_constants() -> None:
    analyzer = Analyzer()
    first = analyzer.analyze("SELECT 1")
    assert analyzer.stats()["parses"] == 1
    second = analyzer.analyze("SELECT 2")
    assert second is first
    assert analyzer.stats() == {
        "text_entries": 2,
        "fingerprint_entries": 1,
        "fingerprint_hits": 1,
        "shape_entries": 1,
        "shape_hits": 0,
        "parses": 1,
    }


def test_fingerprint_cache_pgbench_statement() -> None:
    analyzer = Analyzer()
    results = {
        id(analyzer.analyze(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"))
        for aid in range(1, 200)
    }
    assert len(results) == 1
    assert analyzer.stats()["parses"] == 1
    # The second text is a fingerprint hit that takes the shape; the rest fit the shape.
    assert analyzer.stats()["fingerprint_hits"] == 1
    assert analyzer.stats()["shape_hits"] == 197
    update = "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {};"
    a = analyzer.analyze(update.format(-5, 7))
    assert analyzer.analyze(update.format(12, 99)) is a  # writes without constants share too
    assert a.route is WRITE


def test_shape_cache_needs_the_same_text_around_the_integers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    analyzer = Analyzer()
    # Shapes whose texts differ only in digits outside integer constants share a lookup
    # key (the text without digits); the comparison keeps them apart.
    for f in ("f1", "f2"):
        analyzer.analyze(f"SELECT {f}(x) FROM t WHERE a = 5")
        analyzer.analyze(f"SELECT {f}(x) FROM t WHERE a = 6")
    assert analyzer.stats()["shape_entries"] == 1

    def boom(sql: str) -> str:
        raise AssertionError("fingerprint called for a text that fits a shape")

    with monkeypatch.context() as patch:
        patch.setattr(analyze_mod, "fingerprint", boom)
        assert analyzer.analyze("SELECT f1(x) FROM t WHERE a = 70").functions == {"f1"}
        assert analyzer.analyze("SELECT f2(x) FROM t WHERE a = 123456789").functions == {"f2"}
        assert analyzer.stats()["shape_hits"] == 2
    # Not the shape: ten digits (maybe not an int4), a decimal, a parameter, more text.
    for sql in (
        "SELECT f1(x) FROM t WHERE a = 1234567890",
        "SELECT f1(x) FROM t WHERE a = 5.5",
        "SELECT f1(x) FROM t WHERE a = $1",
        "SELECT f1(x) FROM t WHERE a = 5 OR a = 6",
        "SELECT f1(x) FROM t WHERE a = 5 ",
        "SELECT f3(x) FROM t WHERE a = 5",
    ):
        assert analyzer.analyze(sql) == Analyzer().analyze(sql), sql
    assert analyzer.stats()["shape_hits"] == 2


def test_shape_cache_takes_a_shape_per_sign() -> None:
    """`v + 5` and `v + -5` share a fingerprint but not a shape: each gets its own."""
    analyzer = Analyzer()
    update = "UPDATE t SET v = v + {} WHERE id = {}"
    for i in range(1, 50):
        analyzer.analyze(update.format(i if i % 2 else -i, i))
    assert analyzer.stats()["parses"] == 1
    assert analyzer.stats()["fingerprint_hits"] == 2
    assert analyzer.stats()["shape_hits"] == 46


def test_long_texts_get_no_shape() -> None:
    analyzer = Analyzer()
    values = ", ".join(f"({i}, {i})" for i in range(400))
    for i in range(3):
        analyzer.analyze(f"INSERT INTO t VALUES {values}, ({i}, {i})")
    assert analyzer.stats()["shape_entries"] == 0
    assert analyzer.stats()["fingerprint_hits"] == 2


def test_shape_cache_with_text_beyond_ascii() -> None:
    analyzer = Analyzer()
    analyzer.analyze("SELECT 'é😀', lower(x) FROM t WHERE a = 1")
    analyzer.analyze("SELECT 'é😀', lower(x) FROM t WHERE a = 2")
    assert analyzer.analyze("SELECT 'é😀', lower(x) FROM t WHERE a = 33").functions == {"lower"}
    assert analyzer.stats()["shape_hits"] == 1


@settings(max_examples=200, deadline=None)
@given(
    template=st.sampled_from(
        [
            "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
            "SELECT a[{}:{}] FROM t LIMIT 1",
            "UPDATE t SET v = v + {} WHERE id = {} RETURNING lower(s)",
            "SELECT {}..{}",
            "SELECT x FROM t WHERE a IN ({}, {}) AND b = 'x{}'",
            "SELECT {}e FROM t",
            "SELECT nextval('s{}'), {}",
        ]
    ),
    values=st.lists(
        st.one_of(st.integers(0, 10**12), st.sampled_from(["0x1F", "1_000", "007", "1.5"])),
        min_size=6,
        max_size=6,
    ),
)
def test_shape_cache_answers_as_a_parse_would(template: str, values: list[object]) -> None:
    """Whatever is put where the integers were, the cached answer is the one a fresh parse
    gives."""
    analyzer = Analyzer()
    n = template.count("{}")
    for seed in ("1", "2"):  # a parse, then a fingerprint hit that takes the shape
        analyzer.analyze(template.format(*[seed] * n))
    sql = template.format(*values[:n])
    assert analyzer.analyze(sql) == Analyzer().analyze(sql)
    plain = all(isinstance(v, int) and 2 < v < 10**9 for v in values[:n])  # not a seed
    if plain and "pgbench" in template:
        assert analyzer.stats()["shape_hits"] == 1  # the shape answered


@settings(max_examples=100, deadline=None)
@given(
    template=st.sampled_from(["SELECT f{}(x) FROM t WHERE a = {}", "INSERT INTO t{} VALUES ({})"]),
    name=st.integers(0, 10**4),
    value=st.integers(0, 10**6),
)
def test_digits_of_names_are_never_holes(template: str, name: int, value: int) -> None:
    """A name's digits change the analysis (which function, which table): a shape taken
    from one name must never answer for another."""
    analyzer = Analyzer()
    for seed in (5, 6):
        analyzer.analyze(template.format(1, seed))
    sql = template.format(name, value)
    assert analyzer.analyze(sql) == Analyzer().analyze(sql)


def test_a_shape_pushed_out_is_taken_again() -> None:
    """More shapes share a lookup key than are kept for it (names that differ only in
    digits): one that was pushed out is taken again when its statement comes back."""
    analyzer = Analyzer()
    for f in range(1, 6):
        for a in (5, 6):
            analyzer.analyze(f"SELECT f{f}(x) FROM t WHERE a = {a}")
    assert analyzer.stats()["shape_hits"] == 0
    for a in range(10, 20):
        assert analyzer.analyze(f"SELECT f1(x) FROM t WHERE a = {a}").functions == {"f1"}
    assert analyzer.stats()["shape_hits"] == 9  # taken again at the first, then answered


def test_fingerprint_cache_keeps_functions_apart() -> None:
    analyzer = Analyzer()
    assert analyzer.analyze("SELECT lower('a')").functions == {"lower"}
    assert analyzer.analyze("SELECT nextval('a')").functions == {"nextval"}
    assert analyzer.analyze("SELECT lower('b')").functions == {"lower"}
    assert analyzer.stats()["fingerprint_hits"] == 1


def test_text_cache_hit_is_a_dict_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    analyzer = Analyzer()
    a = analyzer.analyze("SELECT * FROM t WHERE id = 1")

    def boom(sql: str) -> str:
        raise AssertionError("fingerprint called on a text-cache hit")

    monkeypatch.setattr(analyze_mod, "fingerprint", boom)
    monkeypatch.setattr(analyze_mod, "parse_sql", boom)
    assert analyzer.analyze("SELECT * FROM t WHERE id = 1") is a


def test_not_fingerprint_cached_kinds() -> None:
    analyzer = Analyzer()
    for sql in [
        "BEGIN",
        "SET x = 1",
        "SELECT set_config('a', 'b', false)",
        "SELEC",
        _nest("abs(1)", 60),
    ]:
        analyzer.analyze(sql)
    assert analyzer.stats()["fingerprint_entries"] == 0
    assert analyzer.stats()["text_entries"] == 5


def test_caches_are_bounded() -> None:
    analyzer = Analyzer(max_entries=16)
    for i in range(500):
        analyzer.analyze(f"SELECT c{i} FROM t WHERE x = {i}")
        assert analyzer.stats()["text_entries"] <= 16
        assert analyzer.stats()["fingerprint_entries"] <= 16
    # the newest entries survive eviction
    assert analyzer.analyze("SELECT c499 FROM t WHERE x = 499").route is READ
    parses = analyzer.stats()["parses"]
    analyzer.analyze("SELECT c499 FROM t WHERE x = 499")
    assert analyzer.stats()["parses"] == parses


def test_long_text_not_kept_by_text() -> None:
    analyzer = Analyzer(max_text_len=100)
    long_sql = "SELECT " + ", ".join(f"c{i}" for i in range(100)) + " FROM t"
    a = analyzer.analyze(long_sql)
    assert analyzer.stats()["text_entries"] == 0
    assert analyzer.analyze(long_sql) is a  # through the fingerprint cache
    assert analyzer.stats()["fingerprint_hits"] == 1


def test_clear() -> None:
    analyzer = Analyzer()
    analyzer.analyze("SELECT 1")
    analyzer.clear()
    assert analyzer.stats()["text_entries"] == 0
    assert analyzer.stats()["fingerprint_entries"] == 0


def test_analysis_is_frozen() -> None:
    a = analyze("SELECT 1")
    with pytest.raises(AttributeError):
        a.route = WRITE  # type: ignore[misc]


# -- calls and time values (every route) ---------------------------------------------------

CALLS = [
    # (sql, route, calls, time_values)
    ("SELECT now()", READ, {"now"}, False),
    ("SELECT CURRENT_TIMESTAMP(3), lower(x) FROM t", READ, {"lower"}, True),
    ("SELECT current_user, current_schema, session_user, current_catalog", READ, set(), False),
    ("SELECT pg_catalog.now(), s.f()", READ, {"pg_catalog.now", "s.f"}, False),
    ("INSERT INTO t VALUES (now(), random())", WRITE, {"now", "random"}, False),
    ("INSERT INTO t VALUES (CURRENT_DATE)", WRITE, set(), True),
    ("INSERT INTO t VALUES (1), (2), (LOCALTIME)", WRITE, set(), True),
    ("UPDATE t SET a = f(b) WHERE c < g() RETURNING h()", WRITE, {"f", "g", "h"}, False),
    ("UPDATE t SET (a, b) = (SELECT f(), LOCALTIMESTAMP(2))", WRITE, {"f"}, True),
    ("DELETE FROM t WHERE id IN (SELECT k(x) FROM u)", WRITE, {"k"}, False),
    ("WITH x AS (SELECT a()) INSERT INTO t SELECT b() FROM x", WRITE, {"a", "b"}, False),
    (
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = f() WHERE t.b < g()",
        WRITE,
        {"f", "g"},
        False,
    ),
    (
        "MERGE INTO t USING (SELECT s() AS id) u ON t.id = f(u.id)"
        " WHEN MATCHED AND g() THEN UPDATE SET a = h()"
        " WHEN NOT MATCHED THEN INSERT VALUES (i(), CURRENT_TIME)",
        WRITE,
        {"s", "f", "g", "h", "i"},
        True,
    ),
    (
        "WITH d AS (DELETE FROM t WHERE a < now() RETURNING *) SELECT f(a) FROM d",
        WRITE,
        {"now", "f"},
        False,
    ),
    ("SELECT * FROM t WHERE a < f() FOR UPDATE", WRITE, {"f"}, False),
    ("CREATE TABLE t2 AS SELECT f(), LOCALTIME", WRITE, {"f"}, True),
    ("SELECT f() INTO t2", WRITE, {"f"}, False),
    ("CREATE MATERIALIZED VIEW mv AS SELECT f()", WRITE, {"f"}, False),
    ("COPY (SELECT f()) TO STDOUT", READ, {"f"}, False),
    ("COPY (INSERT INTO t VALUES (f()) RETURNING g()) TO STDOUT", WRITE, {"f", "g"}, False),
    ("COPY t FROM STDIN WHERE a > f() AND b < CURRENT_DATE", WRITE, {"f"}, True),
    ("COPY (SELECT f()) TO '/tmp/x'", WRITE, {"f"}, False),
    ("EXPLAIN SELECT f()", READ, {"f"}, False),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (f(), CURRENT_TIME(3))", WRITE, {"f"}, True),
    ("EXPLAIN (ANALYZE false) UPDATE t SET a = f()", WRITE, {"f"}, False),
    ("CALL p(f())", WRITE, {"p", "f"}, False),
    ("EXECUTE p(f(), CURRENT_DATE)", WRITE, {"f"}, True),
    ("PREPARE p AS INSERT INTO t VALUES (f())", WRITE, {"f"}, False),
    ("DECLARE c CURSOR FOR SELECT f(), CURRENT_DATE", LEAD, {"f"}, True),
    # DDL: what its stored expressions will call later
    (
        "CREATE TABLE t (a timestamptz DEFAULT now(), b date DEFAULT CURRENT_DATE)",
        WRITE,
        {"now"},
        True,
    ),
    ("ALTER TABLE t ALTER COLUMN c TYPE int USING f(c)", WRITE, {"f"}, False),
    ("CREATE VIEW v AS SELECT f()", WRITE, {"f"}, False),
    ("CREATE FUNCTION g() RETURNS int LANGUAGE sql RETURN f()", WRITE, {"f"}, False),
    ("SELECT 1; INSERT INTO t VALUES (f()); SELECT g()", WRITE, {"f", "g"}, False),
    ("SELECT f(); SELECT CURRENT_DATE", READ, {"f"}, True),
    ("BEGIN", WRITE, set(), False),
    ("SET TIME ZONE 'UTC'", WRITE, set(), False),
    ("NOTIFY c, 'now()'", WRITE, set(), False),
    ("INSERT INTO t VALUES ('now()', 'CURRENT_DATE')", WRITE, set(), False),
    ("SELEC now()", WRITE, set(), False),
]


@pytest.mark.parametrize(("sql", "route", "calls", "time_values"), CALLS)
def test_calls_and_time_values(sql: str, route: Route, calls: set[str], time_values: bool) -> None:
    a = analyze(sql)
    assert (a.route, a.calls, a.time_values) == (route, calls, time_values)
    # `functions` keeps its meaning: READ statements only.
    assert a.functions == (a.calls if route is READ else frozenset())


def test_calls_default_for_old_callers() -> None:
    a = Analysis(WRITE, frozenset())
    assert (a.calls, a.time_values) == (frozenset(), False)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("SELECT CURRENT_DATE", "SELECT CURRENT_USER"),
        ("SELECT CURRENT_TIME", "SELECT CURRENT_SCHEMA"),
        ("SELECT LOCALTIME", "SELECT 1"),
        ("INSERT INTO t VALUES (CURRENT_DATE)", "INSERT INTO t VALUES (CURRENT_ROLE)"),
        ("INSERT INTO t VALUES (now())", "INSERT INTO t VALUES (random())"),
        ("INSERT INTO t VALUES (now())", "INSERT INTO t VALUES ('x')"),
        ("UPDATE t SET a = 1 WHERE b IN (1, 2)", "UPDATE t SET a = 1 WHERE b IN (1, f())"),
        ("EXECUTE p(1)", "EXECUTE p(now())"),
        ("CALL p(1)", "CALL p(CURRENT_DATE)"),
        ("PREPARE p AS SELECT 1", "PREPARE p AS SELECT now()"),
        ("ALTER TABLE t ADD c int DEFAULT 1", "ALTER TABLE t ADD c int DEFAULT f()"),
    ],
)
def test_fingerprint_sees_calls_and_time_values(a: str, b: str) -> None:
    # What the fingerprint cache relies on: calls and SQLValueFunction ops are hashed.
    assert fingerprint(a) != fingerprint(b)


def test_precision_never_changes_the_new_fields() -> None:
    analyzer = Analyzer()
    for p in range(7):
        for sql in (
            f"INSERT INTO t VALUES (CURRENT_TIMESTAMP({p}))",
            f"SELECT LOCALTIME({p})",
            f"UPDATE t SET a = CURRENT_TIME({p}) WHERE b = {p}",
        ):
            a = analyzer.analyze(sql)
            assert (a.calls, a.time_values) == (frozenset(), True), sql
            assert a == analyze(sql)


FILLERS = ["1", "'x'", "now()", "random()", "CURRENT_DATE", "CURRENT_TIMESTAMP(2)", "$1"]
TEMPLATES = [
    "SELECT {}",
    "INSERT INTO t VALUES (1, {})",
    "INSERT INTO t VALUES (1, 2), (3, {}) RETURNING id",
    "UPDATE t SET a = {} WHERE id = 5",
    "UPDATE t SET a = 1 WHERE b < {} RETURNING {}",
    "DELETE FROM t WHERE a IN (SELECT b FROM u WHERE c = {})",
    "WITH x AS (SELECT {} AS v) INSERT INTO t SELECT v FROM x",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = {}",
    "CREATE TABLE t2 AS SELECT {} AS c",
    "COPY (SELECT {}) TO STDOUT",
    "COPY t FROM STDIN WHERE a = {}",
    "EXPLAIN ANALYZE UPDATE t SET a = {}",
    "EXECUTE p({})",
    "CALL p({})",
    "ALTER TABLE t ALTER COLUMN c TYPE text USING {}",
]


def test_fingerprint_cache_keeps_calls_and_time_values_right() -> None:
    """One Analyzer fed statements that share fingerprints (same shape, different
    constants) and statements that must not: every answer equals a fresh analysis."""
    analyzer = Analyzer()
    for template in TEMPLATES:
        for filler in FILLERS:
            for constant in ("1", "2"):
                sql = template.replace("{}", filler).replace("5", constant)
                got = analyzer.analyze(sql)
                fresh = analyze(sql)
                assert (got.calls, got.time_values) == (fresh.calls, fresh.time_values), sql
                assert got == fresh, sql
    assert analyzer.stats()["fingerprint_hits"] > 0


def test_deep_write_calls_not_fingerprint_cached() -> None:
    # libpg_query stops hashing 100 levels deep: the walk for `calls` must not let a deep
    # INSERT be answered from another's cache entry.
    safe = "INSERT INTO t VALUES (" + "abs(" * 60 + "1" + ")" * 60 + ")"
    volatile = "INSERT INTO t VALUES (" + "abs(" * 60 + "random()" + ")" * 60 + ")"
    dated = "INSERT INTO t VALUES (" + "abs(" * 60 + "CURRENT_DATE" + ")" * 60 + ")"
    assert fingerprint(safe) == fingerprint(volatile) == fingerprint(dated)
    analyzer = Analyzer()
    assert analyzer.analyze(safe).calls == {"abs"}
    assert analyzer.analyze(volatile).calls == {"abs", "random"}
    a = analyzer.analyze(dated)
    assert (a.calls, a.time_values) == ({"abs"}, True)
    assert analyzer.stats()["fingerprint_hits"] == 0


def test_shallow_writes_still_share_cache_entries() -> None:
    analyzer = Analyzer()
    a = analyzer.analyze("INSERT INTO t VALUES (1, now(), 'a')")
    assert analyzer.analyze("INSERT INTO t VALUES (2, now(), 'b')") is a
    assert a.calls == {"now"}
    assert analyzer.stats()["fingerprint_hits"] == 1


# -- catalog ---------------------------------------------------------------------------------


def _values(sql: str) -> list[tuple[str | None, ...]]:
    """Parse lookup_sql's output with the real grammar; return its VALUES rows."""
    stmts = parse_sql(sql)
    assert len(stmts) == 1
    select: Any = stmts[0].stmt
    assert type(select).__name__ == "SelectStmt"  # (no isinstance: keep it Any for mypy)
    join = select.fromClause[0]
    subselect = join.larg.subquery
    rows = []
    for row in subselect.valuesLists:
        values: list[str | None] = []
        for cast in row:
            assert isinstance(cast, ast.TypeCast)
            const: Any = cast.arg
            assert type(const).__name__ == "A_Const"
            values.append(None if const.isnull else const.val.sval)
        rows.append(tuple(values))
    return rows


NASTY_NAMES = [
    "now",
    "s.f",
    "it's",
    "x'); DROP TABLE t; --",
    "back\\",
    "back\\'",
    "\\'; SELECT 1; --",
    "$$",
    "dollar$$quote",
    "ünïcødé",
    "MixedCase",
]


def test_lookup_sql_quoting_round_trips() -> None:
    sql = FunctionCatalog.lookup_sql(NASTY_NAMES)
    rows = _values(sql)
    assert [row[0] for row in rows] == NASTY_NAMES
    by_name = {row[0]: row[1:] for row in rows}
    assert by_name["now"] == (None, "now")
    assert by_name["s.f"] == ("s", "f")
    assert by_name["it's"] == (None, "it's")
    assert by_name["x'); DROP TABLE t; --"] == (None, "x'); DROP TABLE t; --")
    assert by_name["back\\"] == (None, "back\\")
    assert "DROP TABLE" not in sql.replace("'x''); DROP TABLE t; --'", "")


def test_lookup_sql_uses_escape_strings() -> None:
    # E'' literals mean the same whatever standard_conforming_strings is set to.
    sql = FunctionCatalog.lookup_sql(["back\\"])
    assert "E'back\\\\'" in sql
    assert " 'back" not in sql


def test_lookup_sql_shape() -> None:
    sql = FunctionCatalog.lookup_sql(["now", "pg_catalog.now", "now", '"a.b"', "a.b.c"])
    rows = _values(sql)
    assert rows == [
        ("now", None, "now"),
        ("pg_catalog.now", "pg_catalog", "now"),
        ('"a.b"', None, None),  # cannot be looked up: comes back 'v'
        ("a.b.c", None, None),
    ]
    assert "max(p.provolatile::text" in sql
    assert "coalesce(" in sql
    assert "pg_catalog.pg_proc" in sql


def test_lookup_sql_rejects_nul() -> None:
    with pytest.raises(ValueError):
        FunctionCatalog.lookup_sql(["a\x00b"])


def test_lookup_sql_empty() -> None:
    sql = FunctionCatalog.lookup_sql([])
    assert len(parse_sql(sql)) == 1


def test_catalog_learn_unknown_is_volatile() -> None:
    catalog = FunctionCatalog()
    fns = frozenset({"now", "lower", "random", "s.f"})
    assert catalog.unknown(fns) == ["lower", "now", "random", "s.f"]
    assert catalog.is_volatile(fns)  # unknown counts as volatile
    assert catalog.is_volatile(frozenset({"lower"}))
    assert not catalog.is_volatile(frozenset())

    catalog.learn([("now", "s"), ("lower", "i")])
    assert catalog.unknown(fns) == ["random", "s.f"]
    assert not catalog.is_volatile(frozenset({"now", "lower"}))
    assert catalog.is_volatile(fns)

    catalog.learn([("random", "v"), ("s.f", "i")])
    assert catalog.unknown(fns) == []
    assert catalog.is_volatile(fns)
    assert not catalog.is_volatile(frozenset({"now", "lower", "s.f"}))
    assert catalog.volatility("random") == "v"


def test_catalog_missing_rows_are_volatile() -> None:
    catalog = FunctionCatalog()
    catalog.learn([("lower", "i")], requested=["lower", "nosuch"])
    assert catalog.unknown(frozenset({"lower", "nosuch"})) == []
    assert catalog.volatility("nosuch") == "v"
    assert catalog.is_volatile(frozenset({"nosuch"}))
    assert not catalog.is_volatile(frozenset({"lower"}))


def test_catalog_odd_values_are_volatile() -> None:
    catalog = FunctionCatalog()
    catalog.learn([("a", "x"), ("b", ""), ("c", None)])  # type: ignore[list-item]
    assert catalog.is_volatile(frozenset({"a"}))
    assert catalog.is_volatile(frozenset({"b"}))
    assert catalog.is_volatile(frozenset({"c"}))


def test_catalog_clear_and_bound() -> None:
    catalog = FunctionCatalog(max_entries=10)
    catalog.learn([(f"f{i}", "i") for i in range(10)])
    assert len(catalog) == 10
    catalog.learn([("g", "i")])  # full: starts over rather than growing without bound
    assert len(catalog) == 1
    catalog.clear()
    assert len(catalog) == 0
    assert catalog.unknown(frozenset({"g"})) == ["g"]


def test_analyzer_and_catalog_together() -> None:
    analyzer, catalog = Analyzer(), FunctionCatalog()
    a = analyzer.analyze("SELECT now(), nextval('s')")
    assert a.route is READ
    missing = catalog.unknown(a.functions)
    assert missing == ["nextval", "now"]
    assert [row[0] for row in _values(FunctionCatalog.lookup_sql(missing))] == missing
    catalog.learn([("nextval", "v"), ("now", "s")])
    assert catalog.is_volatile(a.functions)  # -> the caller routes it as a WRITE
    b = analyzer.analyze("SELECT now()")
    assert not catalog.is_volatile(b.functions)
    if analyzer.analyze("CREATE OR REPLACE FUNCTION now() RETURNS int AS 'x'").catalog_change:
        catalog.clear()
    assert catalog.is_volatile(b.functions)


@pytest.mark.parametrize(
    ("sql", "lock_free"),
    [
        ("BEGIN", True),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", True),
        ("SAVEPOINT s1", True),
        ("RELEASE SAVEPOINT s1", True),
        ("ROLLBACK TO SAVEPOINT s1", True),
        ("ROLLBACK", True),
        ("SET work_mem = '8MB'", True),
        ("BEGIN; SET LOCAL statement_timeout = 0", True),
        ("COMMIT", False),  # deferred triggers and constraint checks may take locks
        ("PREPARE TRANSACTION 'x'", False),
        ("BEGIN; UPDATE t SET a = 1", False),
        ("UPDATE t SET a = 1", False),
        ("SELECT 1", False),
    ],
)
def test_lock_free(sql: str, lock_free: bool) -> None:
    assert Analyzer().analyze(sql).lock_free is lock_free


def test_undecodable_client_bytes() -> None:
    # protocol.messages decodes non-UTF-8 client bytes to lone surrogates; pglast cannot
    # encode those, and the analysis must not crash on them.
    sql = b"INSERT INTO t VALUES ('caf\xe9', now(), CURRENT_DATE)".decode(
        "utf-8", "surrogateescape"
    )
    a = analyze(sql)
    assert (a.route, a.error, a.calls, a.time_values) == (WRITE, None, {"now"}, True)
    read = b"SELECT * FROM t WHERE name = 'M\xfcller'".decode("utf-8", "surrogateescape")
    assert analyze(read).route is READ
    text = analyze_mod.parsable_text(sql)
    assert len(text) == len(sql)
    assert text.encode()
    assert analyze_mod.parsable_text("SELECT 'ü'") == "SELECT 'ü'"


@pytest.mark.parametrize(
    ("sql", "arbitrary"),
    [
        ("DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 10)", True),
        ("DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY id OFFSET 5)", True),
        ("UPDATE t SET v = 1 WHERE ctid = '(0,1)'", True),
        ("INSERT INTO u SELECT * FROM t TABLESAMPLE SYSTEM (10)", True),
        ("INSERT INTO u SELECT DISTINCT ON (a) a, b FROM t", True),
        ("UPDATE t SET v = v + 1 WHERE id = 3", False),
        ("INSERT INTO u SELECT a FROM t WHERE a > 3", False),
    ],
)
def test_arbitrary_row_picks_are_flagged(sql: str, arbitrary: bool) -> None:
    # Flagged writes go through determinism.check_and_rewrite, which decides exactly.
    assert Analyzer().analyze(sql).arbitrary is arbitrary


@pytest.mark.parametrize(
    "sql",
    [
        "NOTIFY ch",
        "LISTEN ch",
        "SELECT pg_notify('ch', 'x')",
        "INSERT INTO log SELECT pg_notify('ch', 'x')",
        "UPDATE t SET v = 1 WHERE pg_catalog.pg_notify('ch', 'y') IS NULL",
    ],
)
def test_notify_anywhere_is_flagged(sql: str) -> None:
    # PostgreSQL cannot PREPARE a transaction that notified: it commits in one phase.
    assert Analyzer().analyze(sql).notify


@pytest.mark.parametrize(
    ("sql", "setting"),
    [
        ("SET search_path = public", ("set", "search_path")),
        ("SET SESSION Statement_Timeout TO 5", ("set", "statement_timeout")),
        ("SET TIME ZONE 'UTC'", ("set", "timezone")),
        ("RESET work_mem", ("reset", "work_mem")),
        ("RESET ALL", ("reset", "")),
        ("DISCARD ALL", ("reset", "")),  # as poolers reset a connection
        ("DISCARD PLANS", None),
        ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", None),
        ("SAVEPOINT a", ("savepoint", "a")),
        ('RELEASE SAVEPOINT "B"', ("release", "B")),
        ("ROLLBACK TO a", ("rollback to", "a")),
        # Only the transaction: nothing for a node connected later.
        ("SET LOCAL statement_timeout = 0", None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
        ("SELECT 1", None),
    ],
)
def test_session_setting(sql: str, setting: tuple[str, str] | None) -> None:
    expected = () if setting is None else ((*setting, 0, len(sql), None),)
    assert Analyzer().analyze(sql).settings == expected


def test_session_characteristics_are_kept_as_one_set_of_each_default() -> None:
    """So that a later SET or RESET of one of them replaces just that one."""
    sql = "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"
    settings = Analyzer().analyze(sql).settings
    assert [(k, n) for k, n, *_ in settings] == [
        ("set", "default_transaction_isolation"),
        ("set", "default_transaction_read_only"),
    ]
    assert [t for *_, t in settings] == [
        "SET default_transaction_isolation = 'serializable'",
        "SET default_transaction_read_only = on",
    ]
    sql = "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE, NOT DEFERRABLE"
    assert [t for *_, t in Analyzer().analyze(sql).settings] == [
        "SET default_transaction_read_only = off",
        "SET default_transaction_deferrable = off",
    ]


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("SELECT set_config('App.Tenant', $1, false)", "app.tenant"),
        ("select pg_catalog.set_config('x.y', 'v', 'off')", "x.y"),
        ("SELECT set_config('x.y'::text, 'v', false)", "x.y"),
        ("SELECT set_config('x.y', NULL, 'F')", "x.y"),
        # Only the transaction, or maybe not run at all: nothing for a later connection.
        ("SELECT set_config('x.y', 'v', true)", None),
        ("SELECT set_config('x.y', 'v', $3)", None),
        ("SELECT set_config('x.y', 'v', false) LIMIT 0", None),
        ("SELECT set_config('x.y', 'v', false) FROM t WHERE false", None),
        ("SELECT set_config('x.y', 'v', false), 1", None),
        ("SELECT set_config($1, 'v', false)", None),
    ],
)
def test_session_setting_made_by_set_config(sql: str, name: str | None) -> None:
    expected = () if name is None else (("set", name, 0, len(sql), None),)
    assert Analyzer().analyze(sql).settings == expected


def test_session_settings_of_several_statements() -> None:
    sql = "SET a.x = 'é😀' ; SELECT 1; SAVEPOINT s; SET LOCAL b.y = 2; RESET c.z"
    settings = Analyzer().analyze(sql).settings
    assert [(kind, name, sql[start:end]) for kind, name, start, end, _ in settings] == [
        ("set", "a.x", "SET a.x = 'é😀' "),
        ("savepoint", "s", "SAVEPOINT s"),
        ("reset", "c.z", "RESET c.z"),
    ]


def test_unique_keys_are_grouped_cached_and_a_failed_lookup_is_not_kept() -> None:
    asked: list[str] = []
    answers: list[list[list[str | None]] | None] = [
        None,  # the first lookup fails (an aborted transaction, say)
        [["101", "id"], ["102", "a"], ["102", "b"]],
    ]

    async def fetch(sql: str) -> list[list[str | None]] | None:
        asked.append(sql)
        return answers.pop(0)

    async def go() -> tuple[list[frozenset[str]], ...]:
        tables = TableCatalog()
        failed = await tables.unique_keys(fetch, "t")
        keys = await tables.unique_keys(fetch, "t")
        again = await tables.unique_keys(fetch, "t")  # (cached: no third query)
        return failed, keys, again

    failed, keys, again = asyncio.run(go())
    assert failed == []
    assert sorted(keys, key=len) == [frozenset({"id"}), frozenset({"a", "b"})]
    assert again == keys
    assert len(asked) == 2
    assert "indisunique" in asked[0] and "'t'" in asked[0]
