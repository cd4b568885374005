"""Fixing node-dependent values in statements that run on every node.

A write runs on every node, so anything in it whose value depends on the node must be the
same everywhere before the SQL is sent:

* the transaction time (now(), CURRENT_TIMESTAMP, CURRENT_DATE, ...) becomes a literal of
  the time the router chose, cast to exactly the type (and precision) PostgreSQL's own
  function returns, so the statement means what it meant;
* any other call of a volatile function (random(), clock_timestamp(), ...) is refused,
  unless the operator declared it deterministic; so are functions that describe the node
  itself (pg_backend_pid(), txid_current(), ...) whatever pg_proc says;
* a data-changing statement that picks rows arbitrarily (LIMIT/OFFSET or DISTINCT ON
  without ORDER BY, TABLESAMPLE, SKIP LOCKED, the system columns ctid/xmin/...) is
  refused.

Sequence functions (nextval, currval, lastval, setval) are left alone: another part of the
router assigns sequence values.

Only expressions the statement itself evaluates are looked at.  Expressions PostgreSQL
stores for later (column defaults, views, rules, triggers, policies, function bodies)
are neither rewritten nor refused: rewriting them would freeze a value that is meant to
be computed later.  Where a stored expression is also evaluated right away (a materialized
view's query, PREPARE, ALTER TABLE ... ADD COLUMN ... DEFAULT filling existing rows) no
rewrite can be right, so node-dependent values there are refused.

The statement is parsed with pglast (the real PostgreSQL grammar); the rewrite replaces
exactly the source text of each fixed construct (located by the parse tree and PostgreSQL's
own scanner, pglast.parser.scan) and leaves every other character as the client wrote it.
(A full deparse was tried first: pglast follows the newest grammar, and its output is not
always accepted by older servers; e.g. it writes MERGE ... WHEN NOT MATCHED BY TARGET,
which PostgreSQL 15 rejects.  It also loses comments and changes the spelling of
SUBSTRING(... FROM ...), AT TIME ZONE, etc.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pglast import Error as PglastError
from pglast import ast
from pglast.enums import (
    AlterTableType,
    ConstrType,
    LockWaitPolicy,
    ObjectType,
    SetOperation,
    SQLValueFunctionOp,
    SubLinkType,
)
from pglast.parser import parse_sql, scan

from pgquorum.bounded import store_bounded
from pgquorum.protocol.errors import FEATURE_NOT_SUPPORTED, PgError
from pgquorum.sql.analyze import TIME_VALUE_OPS, _child_attrs, _func_name, parsable_text
from pgquorum.sql.sequences import SEQUENCE_FUNCTIONS  # assigned by the router, not here

__all__ = [
    "NODE_LOCAL_VALUES",
    "REFUSED_ALWAYS",
    "REPLICABLE_VOLATILE",
    "TIME_FUNCTIONS",
    "check_and_rewrite",
]


def _with_catalog(*names: str) -> frozenset[str]:
    return frozenset(names) | frozenset(f"pg_catalog.{name}" for name in names)


# now() and transaction_timestamp() are the transaction start; statement_timestamp() is the
# start of the current client message.  (CURRENT_TIMESTAMP and friends are not functions
# but SQLValueFunction nodes: see analyze.TIME_VALUE_OPS.)  clock_timestamp() and
# timeofday() read the clock while running: they are refused, see REFUSED_ALWAYS.
_TXN_TIME_FUNCTIONS = _with_catalog("now", "transaction_timestamp")
_STMT_TIME_FUNCTIONS = _with_catalog("statement_timestamp")
TIME_FUNCTIONS: frozenset[str] = _TXN_TIME_FUNCTIONS | _STMT_TIME_FUNCTIONS


# Volatile in pg_proc, yet with the same effect and result on every node that runs the same
# statements in the same order: not refused.  (pg_try_advisory_lock* are not here: whether
# they get the lock depends on what other sessions hold on that node at that moment, and
# the nodes run a statement one after the other.)
REPLICABLE_VOLATILE: frozenset[str] = _with_catalog(
    "set_config",  # pg_dump output starts with SELECT pg_catalog.set_config(...)
    "pg_notify",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
)

_CLOCK = "it reads the node's own clock"
_RANDOM = "it returns a different value on each node"
_XID = "transaction ids differ between nodes"
_NODE = "it describes the node itself, which differs between nodes"
_PID = "process ids differ between nodes"
_REFUSED_REASONS: dict[str, str] = {
    **dict.fromkeys(_with_catalog("clock_timestamp", "timeofday"), _CLOCK),
    **dict.fromkeys(
        _with_catalog(
            "random",
            "random_normal",
            "gen_random_uuid",
            "uuidv4",
            "uuidv7",
            "uuid_generate_v1",
            "uuid_generate_v1mc",
            "uuid_generate_v4",
            "gen_random_bytes",
            "gen_salt",
        ),
        _RANDOM,
    ),
    **dict.fromkeys(
        _with_catalog(
            "txid_current",
            "txid_current_if_assigned",
            "txid_current_snapshot",
            "pg_current_xact_id",
            "pg_current_xact_id_if_assigned",
            "pg_current_snapshot",
            "mxid_age",
        ),
        _XID,
    ),
    **dict.fromkeys(
        _with_catalog(
            "inet_server_addr",
            "inet_server_port",
            "inet_client_addr",
            "inet_client_port",
            "pg_postmaster_start_time",
            "pg_conf_load_time",
            "pg_my_temp_schema",
            "pg_relation_filenode",
            "pg_relation_filepath",
            "pg_current_wal_lsn",
            "pg_current_wal_insert_lsn",
            "pg_current_wal_flush_lsn",
        ),
        _NODE,
    ),
    **dict.fromkeys(
        _with_catalog("pg_backend_pid", "pg_cancel_backend", "pg_terminate_backend"), _PID
    ),
}
# Node-dependent whatever pg_proc says (several are STABLE) and whatever the configuration
# says: deterministic_functions cannot make them replicable.
REFUSED_ALWAYS: frozenset[str] = frozenset(_REFUSED_REASONS)
# Of those, the ones that only report something of the node (no effect on anything): a read
# calling them may still run on one node (SELECT random(), SELECT pg_backend_pid()).
NODE_LOCAL_VALUES: frozenset[str] = REFUSED_ALWAYS - _with_catalog(
    "pg_cancel_backend", "pg_terminate_backend"
)
# age(x) with one argument is age(CURRENT_DATE, x) for timestamps, the distance from the
# node's next transaction id for xids: refused (STABLE in pg_proc).
_AGE = _with_catalog("age")

# System columns that identify a row version physically: a row's ctid, and the ids of the
# transactions that wrote it, differ between nodes.  A write that uses them (ctid = '(0,1)',
# ORDER BY ctid, "DELETE ... WHERE a.ctid < b.ctid" to drop duplicates, xmin as an
# optimistic-locking token) would touch different rows on different nodes, so any use in a
# data-changing statement is refused, even uses that happen to be harmless such as a
# self-join on ctid: telling those apart would need the planner, and a key does the same job.
# (tableoid is left alone: it is nearly always compared with a regclass, which resolves on
# each node to that node's oid.)
_SYSTEM_COLUMNS: dict[str, str] = {
    "ctid": "a row's physical location differs between nodes",
    **dict.fromkeys(("xmin", "xmax", "cmin", "cmax"), "transaction ids differ between nodes"),
}

_DML: frozenset[type] = frozenset(
    {ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt, ast.IntoClause}
)
_QUERIES: frozenset[type] = frozenset(
    {ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt}
)

_CLIENT_HINT = "Compute the value in the client and pass it as a literal or parameter"


def _refuse(message: str, hint: str, detail: str | None = None) -> PgError:
    return PgError(FEATURE_NOT_SUPPORTED, message, hint=hint, detail=detail)


# -- time literals -----------------------------------------------------------------------


def _time_literal(when: datetime) -> str:
    """An ISO 8601 timestamptz literal (read the same under every DateStyle and TimeZone)."""
    if when.tzinfo is None:
        raise ValueError("the router's transaction and statement times must be aware datetimes")
    return when.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


def _timestamptz(literal: str, typmod: int = -1) -> str:
    precision = f"({typmod})" if typmod >= 0 else ""
    return f"CAST('{literal}' AS timestamp{precision} with time zone)"


_OP = SQLValueFunctionOp
# SQLValueFunction -> the type it returns, as SQL, with "{}" where its precision goes.  Each
# is computed in PostgreSQL from the transaction start timestamp, converted to the session
# time zone and, with a precision, rounded by the routines the casts below use
# (AdjustTimestampForTypmod / AdjustTimeForTypmod); casts from timestamptz convert in the
# session time zone too.  Hence CURRENT_TIME(p) becomes ts::time(p) with time zone, not
# ts::timestamp(p) with time zone::timetz, which would round before dropping the date.
# The SQL-standard type names always mean pg_catalog's types; "date" is not one of them.
_VALUE_TYPES: dict[SQLValueFunctionOp, str | None] = {
    _OP.SVFOP_CURRENT_DATE: "pg_catalog.date",
    _OP.SVFOP_CURRENT_TIME: "time with time zone",
    _OP.SVFOP_CURRENT_TIME_N: "time{} with time zone",
    _OP.SVFOP_CURRENT_TIMESTAMP: None,  # the timestamptz itself
    _OP.SVFOP_CURRENT_TIMESTAMP_N: None,
    _OP.SVFOP_LOCALTIME: "time",
    _OP.SVFOP_LOCALTIME_N: "time{}",
    _OP.SVFOP_LOCALTIMESTAMP: "timestamp",
    _OP.SVFOP_LOCALTIMESTAMP_N: "timestamp{}",
}
_WITH_PRECISION = frozenset(
    {
        _OP.SVFOP_CURRENT_TIME_N,
        _OP.SVFOP_CURRENT_TIMESTAMP_N,
        _OP.SVFOP_LOCALTIME_N,
        _OP.SVFOP_LOCALTIMESTAMP_N,
    }
)
assert frozenset(_VALUE_TYPES) == TIME_VALUE_OPS

# Their keywords (as the scanner names the tokens) and output column names.
_VALUE_KEYWORDS: dict[SQLValueFunctionOp, str] = {
    _OP.SVFOP_CURRENT_DATE: "CURRENT_DATE",
    _OP.SVFOP_CURRENT_TIME: "CURRENT_TIME",
    _OP.SVFOP_CURRENT_TIME_N: "CURRENT_TIME",
    _OP.SVFOP_CURRENT_TIMESTAMP: "CURRENT_TIMESTAMP",
    _OP.SVFOP_CURRENT_TIMESTAMP_N: "CURRENT_TIMESTAMP",
    _OP.SVFOP_LOCALTIME: "LOCALTIME",
    _OP.SVFOP_LOCALTIME_N: "LOCALTIME",
    _OP.SVFOP_LOCALTIMESTAMP: "LOCALTIMESTAMP",
    _OP.SVFOP_LOCALTIMESTAMP_N: "LOCALTIMESTAMP",
}


def _value_sql(node: Any, literal: str) -> str:
    """The replacement for a time SQLValueFunction."""
    typmod = node.typmod if node.op in _WITH_PRECISION else -1
    type_sql = _VALUE_TYPES[node.op]
    if type_sql is None:
        return _timestamptz(literal, typmod)
    precision = f"({typmod})" if typmod >= 0 else ""
    return f"CAST({_timestamptz(literal)} AS {type_sql.format(precision)})"


def _value_text(node: Any) -> str:
    """How the client may have written it (for messages)."""
    keyword = _VALUE_KEYWORDS[node.op]
    return f"{keyword}({node.typmod})" if node.op in _WITH_PRECISION else keyword


# How a replacement keeps the output column name of what it replaces.
_ALIAS = 1  # the whole output column: append AS "name" (unless parenthesized: wrap)
_WRAP = 2  # inside a cast, COLLATE or CASE ... ELSE: (SELECT <value> AS "name")
_FROM_ALIAS = 3  # a function in FROM without an alias: append AS "name"


def _output_name(node: Any) -> str:
    """The output column name PostgreSQL gives a replaced node (FigureColname)."""
    if type(node) is ast.FuncCall:
        names: Any = node.funcname
        return str(names[-1].sval)
    return _VALUE_KEYWORDS[node.op].lower()


def _naming_leaf(node: Any) -> Any:
    """The node an unnamed output column is named after (parse_target.c, FigureColname).

    FigureColname looks through casts, COLLATE, CASE's ELSE and field-less indirection; a
    function call or SQLValueFunction found there gives its name, which outranks the names
    casts and CASE would give.  A replaced node there is turned into a scalar subquery
    (SELECT <value> AS "<name>"), which FigureColname names just as strongly; anywhere else
    its replacement cannot change the column's name.  (A scalar subquery inside the column
    is named after its own first column, which is an output column itself.)
    """
    while True:
        cls = type(node)
        if cls is ast.TypeCast or cls is ast.CollateClause:
            node = node.arg
        elif cls is ast.CaseExpr and node.defresult is not None:
            node = node.defresult
        elif cls is ast.A_Indirection and not any(type(i) is ast.String for i in node.indirection):
            node = node.arg
        else:
            return node


# -- rows picked arbitrarily -------------------------------------------------------------


def _no_limit(node: Any) -> bool:
    """LIMIT ALL / LIMIT NULL (a null constant), or no LIMIT at all."""
    return node is None or (type(node) is ast.A_Const and bool(node.isnull))


def _is_zero(node: Any) -> bool:
    return (
        type(node) is ast.A_Const
        and not node.isnull
        and type(node.val) is ast.Integer
        and node.val.ival == 0
    )


def _arbitrary_rows(select: Any) -> str | None:
    """What makes this SELECT pick rows arbitrarily, or None."""
    if select.sortClause or select.valuesLists:  # ORDER BY, or VALUES (ordered)
        return None
    if select.op is SetOperation.SETOP_NONE and not select.fromClause:
        return None  # no table: at most the rows of set-returning functions, in order
    count, offset = select.limitCount, select.limitOffset
    if _is_zero(count):
        return None  # LIMIT 0: no rows at all
    if not _no_limit(count) or not (offset is None or _is_zero(offset)):
        return "LIMIT/OFFSET without ORDER BY"
    if select.distinctClause and any(expr is not None for expr in select.distinctClause):
        return "DISTINCT ON without ORDER BY"
    return None


def _explain_analyze(stmt: Any) -> bool:
    """Whether EXPLAIN executes its statement (anything but a clear false counts as yes)."""
    for option in stmt.options or ():
        if type(option) is not ast.DefElem or option.defname != "analyze":
            continue
        arg = option.arg
        if type(arg) is ast.String:
            return str(arg.sval).lower() not in ("false", "off", "0")
        if type(arg) is ast.Integer:
            return bool(arg.ival)
        if type(arg) is ast.Boolean:
            return bool(arg.boolval)
        return True
    return False


# -- the walk ------------------------------------------------------------------------------

_FIX = 0  # evaluated by this statement: rewrite time values, refuse the rest


class _Stored:
    """A context where a value is both stored and computed now: nothing can be fixed."""

    __slots__ = ("hint", "what", "why")

    def __init__(self, what: str, why: str, hint: str) -> None:
        self.what = what
        self.why = why
        self.hint = hint


_PREPARE = _Stored(
    "PREPARE of a statement using {}",
    "each node would compute its own value every time it is executed",
    "Use your driver's prepared statements (the extended query protocol) instead of SQL "
    "PREPARE, or pass the value as a parameter of EXECUTE.",
)
_MATVIEW = _Stored(
    "a materialized view whose query uses {}",
    "each node computes its own value, at creation and at every REFRESH",
    "Fill an ordinary table with CREATE TABLE ... AS or INSERT ... SELECT instead "
    "(pgquorum fixes the values there), or write the value into the query as a constant.",
)
_ADD_COLUMN = _Stored(
    "ALTER TABLE ... ADD COLUMN with a DEFAULT using {}",
    "each node fills the existing rows with its own value",
    "Add the column without that default, fill it with UPDATE, then set the default with "
    "ALTER TABLE ... ALTER COLUMN ... SET DEFAULT.",
)


class _Fixer:
    __slots__ = (
        "const_dependent",
        "deterministic",
        "edits",
        "is_volatile",
        "modifies",
        "named",
        "problem",
        "ranges",
        "replacements",
        "stmt_literal",
        "txn_literal",
        "volatile",
    )

    def __init__(
        self,
        txn_literal: str,
        stmt_literal: str,
        is_volatile: Callable[[str], bool],
        deterministic: frozenset[str],
    ) -> None:
        self.txn_literal = txn_literal
        self.stmt_literal = stmt_literal
        self.is_volatile = is_volatile
        self.deterministic = deterministic
        self.volatile: dict[str, bool] = {}
        # Per statement: location -> (node, replacement SQL).  Keyed by location, not
        # identity: UPDATE ... SET (a, b) = (x, y) gives every target its own copy of the
        # source row, and each construct starts at its own place in the text.
        self.replacements: dict[int, tuple[Any, str]] = {}
        self.named: list[Any] = []  # unnamed output columns (ResTarget)
        self.ranges: list[Any] = []  # functions in FROM without an alias (RangeFunction)
        self.modifies = False  # the statement changes data
        self.problem: PgError | None = None  # refused if the statement changes data
        # For the whole string: (node, replacement SQL, how to keep its output name).
        self.edits: list[tuple[Any, str, tuple[int, str] | None]] = []
        # Whether a constant's value decided anything (LIMIT 0, CURRENT_TIME(3), EXPLAIN's
        # options): then the plan holds for this text only, not for its shape (_Plans).
        self.const_dependent = False

    # -- per statement

    def statement(self, stmt: Any) -> None:
        """Check one top-level statement, adding its edits to self.edits."""
        self.replacements.clear()
        self.named.clear()
        self.ranges.clear()
        self.modifies = False
        self.problem = None
        self._statement(stmt)
        if self.modifies and self.problem is not None:
            raise self.problem
        replacements = self.replacements
        if not replacements:
            return
        naming: dict[int, tuple[int, str]] = {}
        for target in self.named:
            leaf = _naming_leaf(target.val)
            if _key(leaf) in replacements:
                how = _ALIAS if leaf is target.val else _WRAP
                naming[leaf.location] = (how, _output_name(leaf))
        for rf in self.ranges:
            # FROM now(): the function names the table and its column.
            leaf = rf.functions[0][0]
            if _key(leaf) in replacements:
                naming[leaf.location] = (_FROM_ALIAS, _output_name(leaf))
        for key, (node, sql) in replacements.items():
            self.edits.append((node, sql, naming.get(key)))

    def _statement(self, stmt: Any) -> None:
        cls = type(stmt)
        if cls in _QUERIES:
            self._walk(stmt, _FIX)
        elif cls is ast.ExplainStmt:
            self.const_dependent = self.const_dependent or bool(stmt.options)
            if _explain_analyze(stmt):  # plain EXPLAIN runs nothing
                self._statement(stmt.query)
        elif cls is ast.CreateTableAsStmt:
            self.modifies = True
            if stmt.objtype is ObjectType.OBJECT_MATVIEW:
                self._walk(stmt.query, _MATVIEW)
            elif not stmt.into.skipData:  # WITH NO DATA runs nothing
                self._statement(stmt.query)  # a query or EXECUTE
        elif cls is ast.CopyStmt:
            if stmt.query is not None:
                self._statement(stmt.query)
            self._walk(stmt.whereClause, _FIX)  # COPY FROM ... WHERE
        elif cls is ast.ExecuteStmt:
            self._walk(stmt.params, _FIX)
        elif cls is ast.CallStmt:
            # The procedure's body is opaque, like a trigger's; its arguments are evaluated
            # here.  (Procedures are always VOLATILE in pg_proc: the call itself is allowed.)
            self._walk(stmt.funccall.args, _FIX)
        elif cls is ast.PrepareStmt:
            self._walk(stmt.query, _PREPARE)
        elif cls is ast.CreateStmt:
            self._walk(stmt.partbound, _FIX)  # PARTITION OF ... FOR VALUES (expr)
        elif cls is ast.AlterTableStmt:
            for cmd in stmt.cmds or ():
                self._alter_table(cmd)
        # Anything else evaluates no expression now (or, like DO, none we can see); the
        # expressions of DDL (defaults, views, rules, triggers, policies, function bodies)
        # are stored for later and must stay as written.

    def _alter_table(self, cmd: Any) -> None:
        if type(cmd) is not ast.AlterTableCmd:
            return
        if cmd.subtype is AlterTableType.AT_AlterColumnType and type(cmd.def_) is ast.ColumnDef:
            self.modifies = True  # USING expr computes every row's new value
            self._walk(cmd.def_.raw_default, _FIX)
        elif cmd.subtype is AlterTableType.AT_AddColumn and type(cmd.def_) is ast.ColumnDef:
            for constraint in cmd.def_.constraints or ():
                if (
                    type(constraint) is ast.Constraint
                    and constraint.contype is ConstrType.CONSTR_DEFAULT
                ):
                    self._walk(constraint.raw_expr, _ADD_COLUMN)
        elif (
            cmd.subtype is AlterTableType.AT_AttachPartition and type(cmd.def_) is ast.PartitionCmd
        ):
            self._walk(cmd.def_.bound, _FIX)

    # -- the tree

    def _walk(self, root: Any, mode: int | _Stored) -> None:
        """Visit a tree iteratively (no recursion limit), collecting replacements."""
        if root is None:
            return
        stack: list[Any] = [root]
        pop = stack.pop
        push = stack.append
        exempt: set[int] = set()  # subqueries of EXISTS: only their row count matters
        replacements = self.replacements
        while stack:
            obj = pop()
            cls = type(obj)
            if cls is tuple:
                for item in obj:
                    if isinstance(item, (tuple, ast.Node)):
                        push(item)
                continue
            if cls is ast.FuncCall:
                sql = self._call(obj, mode)
                if sql is not None:
                    replacements[obj.location] = (obj, sql)
                    continue
            elif cls is ast.SQLValueFunction:
                if obj.op in TIME_VALUE_OPS:
                    if obj.op in _WITH_PRECISION:
                        self.const_dependent = True
                    if isinstance(mode, _Stored):
                        raise self._stored(mode, _value_text(obj))
                    replacements[obj.location] = (obj, _value_sql(obj, self.txn_literal))
                continue
            elif cls is ast.ColumnRef:
                self._column(obj)
                continue
            elif cls is ast.ResTarget:
                if obj.name is None and obj.val is not None:
                    # An output column of a SELECT list or RETURNING (the other ResTargets,
                    # UPDATE ... SET and INSERT columns, always have a name).
                    self.named.append(obj)
            elif cls is ast.RangeFunction:
                if obj.alias is None and not obj.is_rowsfrom and not obj.ordinality:
                    self.ranges.append(obj)
            elif cls is ast.SelectStmt:
                if type(obj.limitCount) is ast.A_Const or type(obj.limitOffset) is ast.A_Const:
                    self.const_dependent = True  # LIMIT 0 and LIMIT 5 differ
                if self.problem is None and id(obj) not in exempt:
                    what = _arbitrary_rows(obj)
                    if what is not None:
                        self._note(
                            f"{what}: each node may pick different rows",
                            "Add an ORDER BY on a unique key to the query that picks them.",
                        )
            elif cls is ast.SubLink:
                if obj.subLinkType is SubLinkType.EXISTS_SUBLINK:
                    exempt.add(id(obj.subselect))
            elif cls is ast.RangeTableSample:
                self._note(
                    "TABLESAMPLE: the sample depends on where rows are stored, which differs "
                    "between nodes",
                    "Select the rows by a condition on their columns, with ORDER BY and LIMIT.",
                )
            elif cls is ast.LockingClause:
                if obj.waitPolicy is LockWaitPolicy.LockWaitSkip:
                    self._note(
                        "SKIP LOCKED: which rows other sessions hold locked differs between nodes",
                        "Lock the rows in a separate SELECT ... FOR UPDATE SKIP LOCKED and "
                        "change them by key in the next statement.",
                    )
            elif cls in _DML:
                self.modifies = True
            for child in _child_attrs(cls):
                value = getattr(obj, child)
                if value is not None:
                    push(value)

    def _note(self, what: str, hint: str) -> None:
        """Something that makes a data-changing statement pick rows arbitrarily: refused
        once the walk knows the statement changes data."""
        if self.problem is None:
            self.problem = _refuse(f"pgquorum cannot replicate a write that uses {what}", hint)

    def _column(self, ref: Any) -> None:
        if self.problem is not None or not ref.fields:
            return
        last = ref.fields[-1]
        if type(last) is not ast.String:
            return
        why = _SYSTEM_COLUMNS.get(str(last.sval))
        if why is not None:
            self._note(
                f"the system column {last.sval}: {why}",
                "Identify rows by their primary key or another unique column.",
            )

    def _call(self, call: Any, mode: int | _Stored) -> str | None:
        """A replacement for a time function call, None to keep it (and walk its arguments);
        raises if it cannot be replicated."""
        name = _func_name(call.funcname)
        if name in TIME_FUNCTIONS and _plain_call(call):
            if isinstance(mode, _Stored):
                raise self._stored(mode, f"{name}()")
            literal = self.txn_literal if name in _TXN_TIME_FUNCTIONS else self.stmt_literal
            return _timestamptz(literal)
        if name in SEQUENCE_FUNCTIONS:
            return None  # assigned elsewhere in the router
        reason = _REFUSED_REASONS.get(name)
        if reason is None and name in _AGE and len(call.args or ()) == 1:
            reason = "with one argument it counts from the node's current date or transaction id"
        if reason is not None:
            if isinstance(mode, _Stored):
                raise self._stored(mode, f"{name}()")
            if name in _AGE:
                hint = "Use the two-argument form, e.g. age(CURRENT_DATE, x)."
            elif reason == _CLOCK:
                hint = (
                    "Use now() or statement_timestamp() (pgquorum fixes those), or compute "
                    "the value in the client and pass it as a literal or parameter."
                )
            else:
                hint = _CLIENT_HINT + "."
            raise _refuse(f"pgquorum cannot replicate {name}(): {reason}", hint)
        if name in REPLICABLE_VOLATILE or self._declared(name):
            return None
        volatile = self.volatile.get(name)
        if volatile is None:
            volatile = self.volatile[name] = bool(self.is_volatile(name))
        if volatile:
            if isinstance(mode, _Stored):
                raise self._stored(mode, f"{name}()")
            raise _refuse(
                f"pgquorum cannot replicate {name}(): it may return a different value on each node",
                f"{_CLIENT_HINT}, or, if {name}() returns the same value on every node, list it "
                "under deterministic_functions in the router configuration.",
            )
        return None

    def _declared(self, name: str) -> bool:
        """Listed under deterministic_functions: as called, or by its bare name (listing
        "f" covers every schema's f; listing "s.f" does not cover an unqualified f)."""
        deterministic = self.deterministic
        if not deterministic:
            return False
        if name in deterministic:
            return True
        _, dot, bare = name.rpartition(".")
        return bool(dot) and bare in deterministic

    @staticmethod
    def _stored(mode: _Stored, construct: str) -> PgError:
        return _refuse(
            f"pgquorum cannot replicate {mode.what.format(construct)}: {mode.why}", mode.hint
        )


def _key(node: Any) -> int | None:
    """The replacements key of a node that may have been replaced."""
    cls = type(node)
    return node.location if cls is ast.FuncCall or cls is ast.SQLValueFunction else None


def _plain_call(call: Any) -> bool:
    """f() exactly: no arguments, no aggregate or window decoration."""
    return not (
        call.args
        or call.agg_order
        or call.agg_filter
        or call.over
        or call.agg_star
        or call.agg_distinct
        or call.func_variadic
    )


# -- splicing ------------------------------------------------------------------------------

_OPEN, _CLOSE, _ICONST = "ASCII_40", "ASCII_41", "ICONST"
_COMMENTS = frozenset({"SQL_COMMENT", "C_COMMENT"})
# Tokens whose text is a value: a statement's shape has their kind in its place, not them
# (after a NUL, which no token's text has, so an identifier named ICONST stays apart).
_CONSTANTS = frozenset({"ICONST", "FCONST", "SCONST", "USCONST", "BCONST", "XCONST"})
# UESCAPE 'c' gives a constant a say in what U&"..." names: no plan is kept by shape.
_CONSTANT_MEANS = frozenset({"UESCAPE"})
# Where the router's times go in a replacement template (made by the _Fixer, never taken
# from the client's text, so a NUL there cannot be mistaken for one).
_TXN_MARK, _STMT_MARK = "\x00txn\x00", "\x00stmt\x00"


def _cannot_rewrite(detail: str) -> PgError:
    # Not expected to happen; refusing is safe, sending a guess is not.
    return _refuse(
        "pgquorum cannot replicate this statement: it uses node-dependent values that could "
        "not be rewritten",
        _CLIENT_HINT + ".",
        detail=detail,
    )


class _Tokens:
    """PostgreSQL's own scanner's tokens (pglast.parser.scan), comments dropped.  Offsets
    are character offsets into the query, like the parse tree's locations."""

    __slots__ = ("at", "tokens")

    def __init__(self, sql: str) -> None:
        self.tokens = [t for t in scan(sql) if t.name not in _COMMENTS]
        self.at = {t.start: i for i, t in enumerate(self.tokens)}

    def shape(self, sql: str) -> tuple[str, ...] | None:
        """The statement with its constants' values left out, None if it is not to be kept
        (too long, or a constant that changes a name).  The grammar decides on token kinds
        alone, so texts of one shape parse to the same tree but for those values."""
        tokens = self.tokens
        if len(tokens) > _Plans.max_tokens:
            return None
        shape = []
        for t in tokens:
            name = t.name
            if name in _CONSTANTS:
                shape.append("\x00" + name)
            elif name in _CONSTANT_MEANS:
                return None
            else:
                shape.append(sql[t.start : t.end + 1])
        return tuple(shape)

    def after_open_paren(self, i: int) -> bool:
        """Whether the token before token ``i`` is "(" (comments aside)."""
        return i > 0 and self.tokens[i - 1].name == _OPEN

    def span(self, node: Any) -> tuple[int, int]:
        """The first and the last token of a time function call or SQLValueFunction."""
        tokens = self.tokens
        i = self.at.get(node.location)
        if i is None:
            raise _cannot_rewrite(f"no token at {node.location} for {type(node).__name__}")
        try:
            if type(node) is ast.FuncCall:
                # [catalog .] [schema .] name ( ): the time functions take no arguments.
                j = i
                while tokens[j].name != _OPEN and j - i < 5:
                    j += 1
                if tokens[j].name == _OPEN and tokens[j + 1].name == _CLOSE:
                    return i, j + 1
            elif tokens[i].name == _VALUE_KEYWORDS[node.op]:
                if node.op not in _WITH_PRECISION:
                    return i, i
                if [t.name for t in tokens[i + 1 : i + 4]] == [_OPEN, _ICONST, _CLOSE]:
                    return i, i + 3
        except IndexError:
            pass
        raise _cannot_rewrite(f"unexpected tokens at {node.location} for {type(node).__name__}")


# A plan: the edits to make, as (first token, last token, replacement template), in order.
_Edits = tuple[tuple[int, int, str], ...]


def _plan(tokens: _Tokens, edits: list[tuple[Any, str, tuple[int, str] | None]]) -> _Edits:
    spans = []
    for node, replacement, naming in edits:
        first, last = tokens.span(node)
        if naming is not None:
            how, name = naming
            # (The names are lowercase ASCII: quoting is all they need.)
            if how == _ALIAS and tokens.after_open_paren(first):
                how = _WRAP  # SELECT (now()): an alias cannot go inside the parentheses
            if how == _WRAP:
                replacement = f'(SELECT {replacement} AS "{name}")'
            else:
                replacement = f'{replacement} AS "{name}"'
        spans.append((first, last, replacement))
    spans.sort()
    for (_, last, _), (first, _, _) in itertools.pairwise(spans):
        if first <= last:
            raise _cannot_rewrite(f"overlapping replacements at token {first}")
    return tuple(spans)


def _render(sql: str, tokens: _Tokens, edits: _Edits, txn: str, stmt: str) -> str:
    """``sql`` with the edits made and the times filled in."""
    parts = []
    done = 0
    toks = tokens.tokens
    for first, last, template in edits:
        start = toks[first].start
        parts.append(sql[done:start])
        parts.append(template.replace(_TXN_MARK, txn).replace(_STMT_MARK, stmt))
        done = toks[last].end + 1
    parts.append(sql[done:])
    return "".join(parts)


class _Plans:
    """Plans by statement shape: a statement run again with other constants (the common
    case: the same INSERT with new values) is rewritten from the scanner's tokens alone,
    without a parse.  A plan is reused only while every function it asked about has the
    same volatility, and never when a constant's value mattered (see _Fixer)."""

    __slots__ = ("_plans",)
    max_entries = 4096
    max_tokens = 512  # longer statements (bulk INSERTs) would pin too much memory

    def __init__(self) -> None:
        self._plans: dict[object, tuple[_Edits, tuple[tuple[str, bool], ...]]] = {}

    def get(self, key: object, is_volatile: Callable[[str], bool]) -> _Edits | None:
        found = self._plans.get(key)
        if found is None:
            return None
        edits, asked = found
        for name, volatile in asked:
            if bool(is_volatile(name)) != volatile:
                return None
        return edits

    def put(self, key: object, edits: _Edits, asked: tuple[tuple[str, bool], ...]) -> None:
        store_bounded(self._plans, key, (edits, asked), self.max_entries)

    def clear(self) -> None:
        self._plans.clear()


_PLANS = _Plans()


# -- entry point ---------------------------------------------------------------------------


def check_and_rewrite(
    sql: str,
    *,
    txn_time: datetime,
    stmt_time: datetime,
    is_volatile: Callable[[str], bool],
    deterministic: frozenset[str],
) -> str | None:
    """Returns SQL with every node-dependent value fixed, None if nothing needed fixing
    (send the original text), or raises pgquorum.protocol.errors.PgError with SQLSTATE
    FEATURE_NOT_SUPPORTED (0A000) naming the construct and the remedy.

    `txn_time` replaces now(), transaction_timestamp(), CURRENT_TIMESTAMP, CURRENT_DATE,
    CURRENT_TIME, LOCALTIME and LOCALTIMESTAMP (with their precision); `stmt_time` replaces
    statement_timestamp(); both must be aware datetimes.  `is_volatile(name)` is asked about
    other functions ("name" or "schema.name" as in Analysis.calls; True if volatile or
    unknown), at most once per name.  Every statement of a multi-statement string is
    checked.  The result is the original text with only the fixed constructs replaced
    (comments, $n parameters, spelling all kept).  Text pglast cannot parse gives None: the
    servers will report the error.
    """
    text = parsable_text(sql)  # same offsets; the splice keeps the client's own characters
    try:
        tokens = _Tokens(text)
    except (PglastError, RecursionError):
        return None
    shape = tokens.shape(text)
    key = None if shape is None else (shape, deterministic)
    edits = None if key is None else _PLANS.get(key, is_volatile)
    if edits is None:
        try:
            stmts = parse_sql(text)
        except (PglastError, RecursionError):
            return None
        fixer = _Fixer(_TXN_MARK, _STMT_MARK, is_volatile, deterministic)
        for raw in stmts:
            fixer.statement(raw.stmt)  # raises what is refused: not kept, it is rare
        edits = _plan(tokens, fixer.edits)
        if key is not None and not fixer.const_dependent:
            _PLANS.put(key, edits, tuple(fixer.volatile.items()))
    if not edits:
        return None
    return _render(sql, tokens, edits, _time_literal(txn_time), _time_literal(stmt_time))
