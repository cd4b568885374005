"""Statement classification for routing, on the real PostgreSQL grammar (pglast).

A statement is READ only when the parse tree proves it cannot change data or session
state; everything else, including anything unknown or unparsable, is WRITE and goes to
every node.  Function calls are collected rather than judged here: whether ``f()`` is
volatile is a catalog question (see :mod:`pgquorum.sql.catalog`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from pglast import Error as PglastError
from pglast import ast
from pglast.enums import (
    A_Expr_Kind,
    BoolExprType,
    DiscardMode,
    ObjectType,
    SetOperation,
    SQLValueFunctionOp,
    TransactionStmtKind,
    VariableSetKind,
)
from pglast.parser import fingerprint, parse_sql, scan

from pgquorum.bounded import store_bounded
from pgquorum.sql.quoting import quote_ident, quote_literal


class Route(enum.Enum):
    READ = "read"  # provably read-only: may run on any one node
    WRITE = "write"  # may change data or session state: runs on every node, lead first
    LEAD = "lead"  # must run on the lead only (LISTEN/UNLISTEN, cursor DECLARE/FETCH/MOVE/CLOSE)


class CopyDirection(enum.Enum):
    IN = "in"  # COPY ... FROM STDIN
    OUT = "out"  # COPY ... TO STDOUT (or COPY (query) TO STDOUT)


_EMPTY: frozenset[str] = frozenset()
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class Analysis:
    route: Route
    # Functions called, as "name" or "schema.name" (case as PostgreSQL resolves it: unquoted
    # identifiers arrive lowercased from the parser, quoted ones keep their case).  Empty
    # unless route is READ: the caller upgrades a READ to WRITE if any of them is volatile.
    functions: frozenset[str]
    copy: CopyDirection | None = None
    strict_isolation: bool = False  # sets REPEATABLE READ / SERIALIZABLE
    catalog_change: bool = False  # may change function volatility: clear the catalog cache
    error: str | None = None  # pglast could not parse it; route is WRITE
    statements: int = 1
    # Takes no locks another transaction could wait for (BEGIN, SET, SAVEPOINT, ROLLBACK...):
    # a WRITE that may run on every node at once instead of lead first.
    lock_free: bool = False
    begin: bool = False  # exactly one BEGIN / START TRANSACTION
    commit: bool = False  # exactly one COMMIT / END (without AND CHAIN)
    txn_control: bool = False  # some statement is transaction control (BEGIN, COMMIT, ...)
    # Some statement cannot run inside a transaction block (VACUUM, CREATE DATABASE, ...), so
    # the router cannot wrap it in a two-phase commit.
    no_block: bool = False
    temp: bool = False  # creates a temporary object: the session can no longer PREPARE
    # NOTIFY, LISTEN, UNLISTEN or pg_notify(): PostgreSQL refuses to PREPARE the transaction.
    notify: bool = False
    # Every function called anywhere, whatever the route (same naming as `functions`):
    # values, WHERE, RETURNING, SET, subqueries, CTEs, CREATE TABLE AS / SELECT INTO, COPY,
    # EXPLAIN, DDL (column defaults, view bodies, ...: called later, not by this statement).
    calls: frozenset[str] = _EMPTY
    # Uses CURRENT_DATE, CURRENT_TIME, CURRENT_TIMESTAMP, LOCALTIME or LOCALTIMESTAMP (with or
    # without a precision) anywhere: grammar keywords, not function calls.
    time_values: bool = False
    # May pick rows arbitrarily or use system columns (see _PICKS): a write that does is
    # checked by determinism.check_and_rewrite.
    arbitrary: bool = False
    # What changes the session's settings, in order: each SET or RESET of the session (not
    # SET LOCAL, not SET TRANSACTION) as ("set" | "reset", the setting's name: "" for RESET
    # ALL), and each SAVEPOINT, RELEASE or ROLLBACK TO as ("savepoint" | "release" |
    # "rollback to", its name), since a rollback to a savepoint undoes the SETs made after
    # it; with where the statement is in the text (start, end), and the statement to keep
    # for it when that is not the text there (None): SET SESSION CHARACTERISTICS is kept
    # as one SET of each default_transaction_* it changes. A node connected later needs
    # the settings. Never fingerprint-cached, so the places are this text's own.
    settings: tuple[tuple[str, str, int, int, str | None], ...] = ()
    # Tables inserted into (relation names without schema: the fingerprint ignores schemas),
    # and the table of COPY FROM: their column defaults may need the router's values.
    inserts: frozenset[str] = _EMPTY
    copy_into: str | None = None
    ddl: bool = False  # anything but DML, SELECT, SET, transaction control: catalogs may change
    # A write that names a second relation (INSERT ... SELECT, a subquery, UPDATE ... FROM):
    # it reads rows it does not lock, so what it writes depends on its snapshot.
    reads_others: bool = False
    # Each UPDATE or DELETE: its table (name without schema, as `inserts`) and the columns
    # its WHERE clause compares with a constant at the top level (`id = 3 AND k = $1`).
    # Unless those hold a unique key, which rows it changes depends on its snapshot too.
    filters: tuple[tuple[str, frozenset[str]], ...] = ()


_NO_STATEMENTS = Analysis(Route.READ, _EMPTY, statements=0)

# -- fingerprint safety ------------------------------------------------------------------
#
# pglast.parser.fingerprint (libpg_query) hashes the raw parse tree but deliberately leaves
# things out: the values of constants (A_Const, and a TypeCast of a constant as a whole;
# so also BEGIN's isolation level), cursor/prepared/channel names, aliases, and every node
# 100 or more levels deep (some libpg_query versions also skip TransactionStmt options).
# A fingerprint-cache entry is reused for any statement with the same fingerprint without
# parsing it, so an analysis may only go in that cache when no ignored part could have
# changed it:
#   * SET/RESET and transaction control read constants ('serializable' vs 'read
#     committed', BEGIN's isolation options): never fingerprint-cached.  They are short
#     and repeated verbatim, so the exact-text cache serves them.
#   * set_config(...) in a query: its arguments are constants -> not fingerprint-cached.
#   * anything classified by walking a query tree (SELECT, EXPLAIN, COPY (query)) is only
#     fingerprint-cached when the whole tree is at most _FINGERPRINT_SAFE_DEPTH deep, well
#     inside the 100 levels the fingerprint covers (the depth here counts tuples and nodes
#     exactly like libpg_query counts lists and nodes, starting with the statement list at
#     0; measured, see the tests), so every FuncCall name and every locking clause or
#     data-modifying CTE contributes to the hash.
#   * everything else is decided by the statement's node type and its enum/bool/string
#     fields (COPY's filename, DROP's object type, ...), which are all hashed.
#   * `calls` and `time_values` come from walking every statement that may contain
#     expressions (all but SET/RESET/SHOW, transaction control and NOTIFY, whose arguments
#     are constants): FuncCall names and SQLValueFunction ops, both hashed (so is the
#     precision of CURRENT_TIMESTAMP(p), though neither field depends on it).  Such a walk
#     makes a statement fingerprint-cacheable only within _FINGERPRINT_SAFE_DEPTH, as above.
# Relation names, constants and aliases never influence a classification here.
_FINGERPRINT_SAFE_DEPTH = 90
_STMT_DEPTH = 2  # statement list (0) -> RawStmt (1) -> RawStmt.stmt (2)

# -- parse tree walking ------------------------------------------------------------------

# Node types that make a SELECT tree not read-only wherever they appear: data-modifying
# CTEs (at any depth), FOR UPDATE/SHARE (takes row locks, which only the nodes running the
# query would hold), SELECT INTO (creates a table).
_WRITE_NODES: frozenset[type] = frozenset(
    {
        ast.InsertStmt,
        ast.UpdateStmt,
        ast.DeleteStmt,
        ast.MergeStmt,
        ast.LockingClause,
        ast.IntoClause,
    }
)

# CURRENT_DATE, CURRENT_TIME[(p)], CURRENT_TIMESTAMP[(p)], LOCALTIME[(p)], LOCALTIMESTAMP[(p)]:
# all derived from the transaction start.  (CURRENT_USER, CURRENT_SCHEMA... are the other
# SQLValueFunction ops; they do not depend on the node.)
TIME_VALUE_OPS: frozenset[SQLValueFunctionOp] = frozenset(
    {
        SQLValueFunctionOp.SVFOP_CURRENT_DATE,
        SQLValueFunctionOp.SVFOP_CURRENT_TIME,
        SQLValueFunctionOp.SVFOP_CURRENT_TIME_N,
        SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP,
        SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N,
        SQLValueFunctionOp.SVFOP_LOCALTIME,
        SQLValueFunctionOp.SVFOP_LOCALTIME_N,
        SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP,
        SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N,
    }
)

# Where a statement may pick rows arbitrarily (LIMIT/OFFSET, DISTINCT ON, TABLESAMPLE) or
# use a row's physical identity (system columns): harmless in a read, but a write using them
# goes through determinism.check_and_rewrite, which decides exactly.  Presence is all that
# counts here; the fingerprint hashes it (LIMIT's value aside).
_PICKS: frozenset[type] = frozenset({ast.SelectStmt, ast.RangeTableSample, ast.ColumnRef})
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax"})


def _may_pick_arbitrarily(obj: Any, cls: type) -> bool:
    if cls is ast.SelectStmt:
        return bool(obj.limitCount is not None or obj.limitOffset is not None or obj.distinctClause)
    if cls is ast.ColumnRef:
        last = obj.fields[-1] if obj.fields else None
        return type(last) is ast.String and last.sval in _SYSTEM_COLUMNS
    return True  # TABLESAMPLE


_DML: frozenset[type] = frozenset({ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt})


def _frozen(names: set[str]) -> frozenset[str]:
    return frozenset(names) if names else _EMPTY


_CHILD_ATTRS: dict[type, tuple[str, ...]] = {}


def _child_attrs(cls: type) -> tuple[str, ...]:
    """Names of the attributes of a node class that may hold nodes or lists (cached)."""
    attrs = _CHILD_ATTRS.get(cls)
    if attrs is None:
        slots = getattr(cls, "__slots__", None) if issubclass(cls, ast.Node) else None
        if isinstance(slots, dict):
            attrs = tuple(
                name
                for name, info in slots.items()
                # Pointers to nodes/lists, and one embedded struct; 'char*' is a str and
                # A_Const's 'ValUnion' is a constant value (never holds a call).
                if (info.c_type.endswith("*") and info.c_type != "char*")
                or info.c_type == "CreateStmt"
            )
        else:
            attrs = ()
        _CHILD_ATTRS[cls] = attrs
    return attrs


def _quote_part(part: str) -> str:
    # A quoted identifier containing '.' or '"' cannot be written as a plain dotted name
    # without becoming ambiguous; quoting it makes the catalog find no row for it, so it is
    # treated as volatile.
    return quote_ident(part) if "." in part or '"' in part else part


def _func_name(funcname: tuple[Any, ...]) -> str:
    # "catalog.schema.name" is only valid for the current database: keep schema.name.
    parts = [p.sval for p in funcname[-2:]]
    return ".".join(_quote_part(p) for p in parts)


def _const_str(node: Any) -> str | None:
    """The value of a string constant (possibly cast), or None if it is anything else."""
    if type(node) is ast.TypeCast:
        node = node.arg
    if type(node) is ast.A_Const and type(node.val) is ast.String:
        return str(node.val.sval)
    return None


_SET_CONFIG = frozenset({"set_config", "pg_catalog.set_config"})
_ISOLATION_GUCS = frozenset({"transaction_isolation", "default_transaction_isolation"})
_LAX_LEVELS = frozenset({"read committed", "read uncommitted"})


def _strict_level(value: Any) -> bool:
    """True unless `value` is provably a non-strict isolation level (unknown -> strict)."""
    level = _const_str(value)
    return level is None or level.lower() not in _LAX_LEVELS


def _set_config_strict(args: tuple[Any, ...] | None) -> bool:
    if not args or len(args) < 2:
        return False
    name = _const_str(args[0])
    if name is None:  # set_config($1, ...): could be the isolation level
        return True
    return name.lower() in _ISOLATION_GUCS and _strict_level(args[1])


class _Scan:
    __slots__ = (
        "arbitrary",
        "const_dependent",
        "depth",
        "functions",
        "inserts",
        "relations",
        "strict",
        "time_values",
        "writes",
    )

    def __init__(self) -> None:
        self.relations = 0  # RangeVar nodes
        self.arbitrary = False
        self.inserts: set[str] = set()
        self.functions: set[str] = set()
        self.writes = False
        self.strict = False
        self.const_dependent = False
        self.time_values = False
        self.depth = 0


def _scan(root: Any, depth: int) -> _Scan:
    """Walk a tree iteratively (no recursion limit): calls, time values, write nodes, depth."""
    result = _Scan()
    functions = result.functions
    max_depth = depth
    stack: list[tuple[Any, int]] = [(root, depth)]
    pop = stack.pop
    push = stack.append
    node_types = (tuple, ast.Node)
    while stack:
        obj, d = pop()
        if d > max_depth:
            max_depth = d
        cls = type(obj)
        d += 1
        if cls is tuple:
            for item in obj:
                if isinstance(item, node_types):
                    push((item, d))
            continue
        if cls is ast.FuncCall:
            name = _func_name(obj.funcname)
            functions.add(name)
            if name in _SET_CONFIG:
                result.const_dependent = True
                result.strict = result.strict or _set_config_strict(obj.args)
        elif cls is ast.RangeVar:
            result.relations += 1
        elif cls in _WRITE_NODES:
            # No early exit: a later set_config() may still set strict_isolation.
            result.writes = True
            if cls is ast.InsertStmt:
                result.inserts.add(obj.relation.relname)
        elif cls is ast.SQLValueFunction:
            if obj.op in TIME_VALUE_OPS:
                result.time_values = True
            continue  # no children
        elif cls in _PICKS and not result.arbitrary:
            result.arbitrary = _may_pick_arbitrarily(obj, cls)
        for attr in _child_attrs(cls):
            value = getattr(obj, attr)
            if value is not None:
                push((value, d))
    result.depth = max_depth
    return result


# -- per statement -----------------------------------------------------------------------


class _Part:
    """Classification of one statement, plus whether the fingerprint cache may hold it."""

    __slots__ = (
        "arbitrary",
        "begin",
        "calls",
        "catalog",
        "commit",
        "copy",
        "copy_into",
        "ddl",
        "filters",
        "fp_safe",
        "functions",
        "inserts",
        "lock_free",
        "no_block",
        "notify",
        "reads_others",
        "route",
        "settings",
        "strict",
        "temp",
        "time_values",
        "txn_control",
    )

    def __init__(
        self,
        route: Route,
        functions: frozenset[str] = _EMPTY,
        *,
        copy: CopyDirection | None = None,
        strict: bool = False,
        catalog: bool = False,
        fp_safe: bool = True,
        lock_free: bool = False,
        begin: bool = False,
        commit: bool = False,
        txn_control: bool = False,
        no_block: bool = False,
        temp: bool = False,
        notify: bool = False,
        calls: frozenset[str] = _EMPTY,
        time_values: bool = False,
        arbitrary: bool = False,
        inserts: frozenset[str] = _EMPTY,
        copy_into: str | None = None,
        ddl: bool = False,
        settings: tuple[tuple[str, str, str | None], ...] = (),
        reads_others: bool = False,
        filters: tuple[tuple[str, frozenset[str]], ...] = (),
    ) -> None:
        self.filters = filters
        self.reads_others = reads_others
        self.settings = settings
        self.arbitrary = arbitrary
        self.inserts = inserts
        self.copy_into = copy_into
        self.ddl = ddl
        self.calls = calls
        self.time_values = time_values
        self.begin = begin
        self.temp = temp
        self.notify = notify
        self.commit = commit
        self.txn_control = txn_control
        self.no_block = no_block
        self.lock_free = lock_free
        self.route = route
        self.functions = functions
        self.copy = copy
        self.strict = strict
        self.catalog = catalog
        self.fp_safe = fp_safe


_SAVEPOINT_KINDS = {
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: "savepoint",
    TransactionStmtKind.TRANS_STMT_RELEASE: "release",
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "rollback to",
}

_LEAD_STMTS: frozenset[type] = frozenset(
    {
        ast.ListenStmt,
        ast.UnlistenStmt,
        ast.DeclareCursorStmt,  # a cursor lives in one backend: the lead's
        ast.FetchStmt,  # FETCH and MOVE
        ast.ClosePortalStmt,
    }
)

# Statements after which cached function volatility may be wrong: new or altered
# functions, new names, functions moving schema.  DO runs arbitrary code, which may
# include dynamic DDL.  (Dropping alone could only leave a cached value too volatile,
# which is safe, but DROP SCHEMA/EXTENSION/FUNCTION are flagged as asked.)
_CATALOG_STMTS: frozenset[type] = frozenset(
    {
        ast.CreateFunctionStmt,  # CREATE [OR REPLACE] FUNCTION / PROCEDURE
        ast.AlterFunctionStmt,  # ALTER FUNCTION / PROCEDURE / ROUTINE
        ast.CreateExtensionStmt,
        ast.AlterExtensionStmt,  # ALTER EXTENSION UPDATE
        ast.AlterExtensionContentsStmt,  # ALTER EXTENSION ADD/DROP FUNCTION
        ast.DropOwnedStmt,
        ast.DoStmt,
    }
)
_ROUTINES = frozenset(
    {
        ObjectType.OBJECT_FUNCTION,
        ObjectType.OBJECT_PROCEDURE,
        ObjectType.OBJECT_ROUTINE,
        ObjectType.OBJECT_AGGREGATE,
    }
)
_DROP_CATALOG = _ROUTINES | {ObjectType.OBJECT_SCHEMA, ObjectType.OBJECT_EXTENSION}
_RENAME_CATALOG = _ROUTINES | {ObjectType.OBJECT_SCHEMA}
_MOVE_CATALOG = _ROUTINES | {ObjectType.OBJECT_EXTENSION}
# Node types whose `replace` flag means CREATE OR REPLACE.
_REPLACEABLE: frozenset[type] = frozenset(
    {
        ast.ViewStmt,
        ast.RuleStmt,
        ast.CreateTrigStmt,
        ast.DefineStmt,
        ast.CreatePLangStmt,
        ast.CreateTransformStmt,
    }
)


def _catalog_change(stmt: Any, cls: type) -> bool:
    if cls in _CATALOG_STMTS:
        return True
    if cls is ast.DropStmt:
        return stmt.removeType in _DROP_CATALOG
    if cls is ast.RenameStmt:
        return stmt.renameType in _RENAME_CATALOG
    if cls is ast.AlterObjectSchemaStmt:
        return stmt.objectType in _MOVE_CATALOG
    if cls is ast.DefineStmt and stmt.kind is ObjectType.OBJECT_AGGREGATE:
        return True
    return cls in _REPLACEABLE and bool(stmt.replace)


def _options_strict(options: tuple[Any, ...] | None) -> bool:
    for option in options or ():
        if type(option) is ast.DefElem and option.defname == "transaction_isolation":
            return _strict_level(option.arg)
    return False


def _session_settings(stmt: Any) -> tuple[tuple[str, str, str | None], ...]:
    """What a SET/RESET changes for the rest of the session (none if only the transaction),
    as in Analysis.settings."""
    name = (stmt.name or "").lower()
    multi = stmt.kind is VariableSetKind.VAR_SET_MULTI
    if stmt.is_local or (multi and name.startswith("transaction")):  # ..., SNAPSHOT too
        return ()
    if stmt.kind is VariableSetKind.VAR_RESET_ALL:
        return (("reset", "", None),)
    if multi and name == "session characteristics":
        # One SET of each default it changes, so that a later SET or RESET of one of them
        # replaces just that one.
        return tuple(
            ("set", f"default_{o.defname}", f"SET default_{o.defname} = {_option_value(o.arg)}")
            for o in stmt.args or ()
            if type(o) is ast.DefElem
        )
    return (("reset" if stmt.kind is VariableSetKind.VAR_RESET else "set", name, None),)


def _option_value(arg: Any) -> str:
    """A transaction option's value (an isolation level, or 1/0 for READ ONLY and
    DEFERRABLE) as a SET writes it."""
    value = getattr(arg, "val", None)
    if type(value) is ast.String:
        return quote_literal(value.sval or "")
    return "on" if getattr(value, "ival", 0) else "off"


_FALSE = frozenset({"false", "off", "f", "no", "n", "0", "of", "fa", "fal", "fals"})


def _set_config(stmt: Any) -> tuple[tuple[str, str, str | None], ...]:
    """``SELECT set_config('name', value, false)`` and nothing else: a session setting made
    with a function (applications that keep, say, the tenant of row level security in a
    setting do this), as in Analysis.settings. The value may be a parameter; is_local must be a
    constant."""
    if (
        stmt.fromClause
        or stmt.whereClause
        or stmt.withClause
        or stmt.groupClause
        or stmt.havingClause
        or stmt.valuesLists
        or stmt.op != SetOperation.SETOP_NONE
        or stmt.intoClause
        or stmt.limitCount
        or stmt.limitOffset
        or stmt.sortClause
        or stmt.distinctClause
        or stmt.lockingClause
        or stmt.windowClause
        or not stmt.targetList
        or len(stmt.targetList) != 1
    ):
        return ()
    call: Any = stmt.targetList[0].val
    if type(call) is not ast.FuncCall or call.over or call.agg_filter or call.agg_star:
        return ()
    if _func_name(call.funcname or ()) not in _SET_CONFIG:
        return ()
    if not call.args or len(call.args) != 3:
        return ()
    name = _const_str(call.args[0])
    local = call.args[2]
    if not name:
        return ()
    if type(local) is not ast.A_Const:
        return ()
    value: Any = local.val
    if type(value) is ast.Boolean:
        is_local = value.boolval
    elif type(value) is ast.String and (value.sval or "").strip().lower() in _FALSE:
        is_local = False
    else:
        return ()  # true, or something PostgreSQL may refuse: not worth keeping
    return () if is_local else (("set", name.lower(), None),)


def _variable_set_strict(stmt: Any) -> bool:
    name = (stmt.name or "").lower()  # GUC names are case-insensitive
    if stmt.kind is VariableSetKind.VAR_SET_VALUE and name in _ISOLATION_GUCS:
        return _strict_level(stmt.args[0] if stmt.args else None)
    if stmt.kind is VariableSetKind.VAR_SET_MULTI and name in (
        "transaction",
        "session characteristics",
    ):
        return _options_strict(stmt.args)
    return False


_BEGIN_KINDS = frozenset(
    {TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START}
)
# Transaction control that takes no locks: starting, savepoints, and giving locks up.
_LOCK_FREE_KINDS = _BEGIN_KINDS | {
    TransactionStmtKind.TRANS_STMT_ROLLBACK,
    TransactionStmtKind.TRANS_STMT_SAVEPOINT,
    TransactionStmtKind.TRANS_STMT_RELEASE,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
}


def _query_part(query: Any, depth: int) -> _Part:
    """A query tree is READ only when the walk finds no write node in it."""
    scan = _scan(query, depth)
    fp_safe = not scan.const_dependent and scan.depth <= _FINGERPRINT_SAFE_DEPTH
    calls = frozenset(scan.functions) if scan.functions else _EMPTY
    if scan.writes:
        return _Part(
            Route.WRITE,
            strict=scan.strict,
            fp_safe=fp_safe,
            temp=_creates_temp(query, type(query)),
            calls=calls,
            time_values=scan.time_values,
            arbitrary=scan.arbitrary,
            inserts=_frozen(scan.inserts),
            reads_others=scan.relations > 1,
        )
    return _Part(
        Route.READ,
        calls,
        strict=scan.strict,
        fp_safe=fp_safe,
        calls=calls,
        time_values=scan.time_values,
        arbitrary=scan.arbitrary,
        inserts=_frozen(scan.inserts),
    )


def _walked_part(stmt: Any, depth: int, route: Route, **kwargs: Any) -> _Part:
    """A part classified by its statement type, plus `calls` and `time_values` from one walk
    of the statement (only these two come from the walk, hence the depth bound alone)."""
    scan = _scan(stmt, depth)
    return _Part(
        route,
        fp_safe=scan.depth <= _FINGERPRINT_SAFE_DEPTH,
        calls=frozenset(scan.functions) if scan.functions else _EMPTY,
        time_values=scan.time_values,
        arbitrary=scan.arbitrary,
        inserts=_frozen(scan.inserts),
        reads_others=route is Route.WRITE and scan.relations > 1,
        **kwargs,
    )


def _classify(stmt: Any, depth: int) -> _Part:
    cls = type(stmt)
    if cls is ast.SelectStmt:  # also VALUES, TABLE, set operations
        return _query_part(stmt, depth)
    if cls is ast.VariableShowStmt:
        return _Part(Route.READ)
    if cls in _LEAD_STMTS:  # (DECLARE has a query)
        return _walked_part(
            stmt, depth, Route.LEAD, notify=cls is ast.ListenStmt or cls is ast.UnlistenStmt
        )
    if cls is ast.NotifyStmt:
        return _Part(Route.WRITE, notify=True)
    if cls is ast.ExplainStmt:
        # EXPLAIN of a READ is READ with or without ANALYZE: ANALYZE executes exactly that
        # read-only query (its functions are passed on for the volatility check).  EXPLAIN
        # of anything else is WRITE with or without ANALYZE, so the ANALYZE option (a
        # constant-like value) never matters for the fingerprint cache.
        inner = _classify(stmt.query, depth + 1)
        read = inner.route is Route.READ
        return _Part(
            Route.READ if read else Route.WRITE,
            inner.functions if read else _EMPTY,
            strict=inner.strict,
            fp_safe=inner.fp_safe,
            calls=inner.calls,
            time_values=inner.time_values,
            arbitrary=inner.arbitrary,
            inserts=inner.inserts,
        )
    if cls is ast.CopyStmt:
        if stmt.is_from:  # FROM STDIN streams client data; FROM file/PROGRAM is server-side
            # (walked for its WHERE clause)
            copy = CopyDirection.IN if stmt.filename is None else None
            into = stmt.relation.relname if stmt.relation is not None else None
            return _walked_part(stmt, depth, Route.WRITE, copy=copy, copy_into=into)
        if stmt.filename is not None:  # TO 'file' / TO PROGRAM: side effect on the server
            return _walked_part(stmt, depth, Route.WRITE)
        if stmt.query is None:  # COPY table TO STDOUT
            return _Part(Route.READ, copy=CopyDirection.OUT)
        inner = _classify(stmt.query, depth + 1)  # COPY (INSERT ... RETURNING) is a write
        route = Route.READ if inner.route is Route.READ else Route.WRITE
        functions = inner.functions if route is Route.READ else _EMPTY
        return _Part(
            route,
            functions,
            copy=CopyDirection.OUT,
            strict=inner.strict,
            fp_safe=inner.fp_safe,
            calls=inner.calls,
            time_values=inner.time_values,
            arbitrary=inner.arbitrary,
            inserts=inner.inserts,
        )
    if cls is ast.VariableSetStmt:
        return _Part(
            Route.WRITE,
            strict=_variable_set_strict(stmt),
            fp_safe=False,
            lock_free=True,
            settings=_session_settings(stmt),
        )
    if cls is ast.TransactionStmt:
        strict = stmt.kind in _BEGIN_KINDS and _options_strict(stmt.options)
        # COMMIT may run deferred triggers and constraint checks, which take locks.
        lock_free = stmt.kind in _LOCK_FREE_KINDS
        return _Part(
            Route.WRITE,
            strict=strict,
            fp_safe=False,
            lock_free=lock_free,
            begin=stmt.kind in _BEGIN_KINDS,
            commit=stmt.kind is TransactionStmtKind.TRANS_STMT_COMMIT and not stmt.chain,
            txn_control=True,
            # COMMIT PREPARED / ROLLBACK PREPARED refuse to run inside a block.
            no_block=stmt.kind in _NO_BLOCK_KINDS,
            settings=((_SAVEPOINT_KINDS[stmt.kind], stmt.savepoint_name, None),)
            if stmt.kind in _SAVEPOINT_KINDS
            else (),
        )
    return _walked_part(
        stmt,
        depth,
        Route.WRITE,
        ddl=cls not in _DML,
        filters=_filters(stmt) if cls is ast.UpdateStmt or cls is ast.DeleteStmt else (),
        catalog=_catalog_change(stmt, cls),
        no_block=_outside_block_only(stmt, cls),
        temp=_creates_temp(stmt, cls),
    )


def _filters(stmt: Any) -> tuple[tuple[str, frozenset[str]], ...]:
    """An UPDATE's or DELETE's table and the columns its WHERE compares with a constant
    (see Analysis.filters)."""
    rel = stmt.relation
    names = {rel.relname}
    if rel.alias is not None:
        names.add(rel.alias.aliasname)
    where: Any = stmt.whereClause
    terms: tuple[Any, ...]
    if type(where) is ast.BoolExpr and where.boolop == BoolExprType.AND_EXPR:
        terms = where.args or ()
    else:
        terms = () if where is None else (where,)
    columns: set[str] = set()
    for term in terms:
        if type(term) is not ast.A_Expr or term.kind != A_Expr_Kind.AEXPR_OP:
            continue
        operator: Any = term.name
        if len(operator) != 1 or operator[0].sval != "=":
            continue
        for side, other in ((term.lexpr, term.rexpr), (term.rexpr, term.lexpr)):
            if type(side) is ast.ColumnRef and _constant(other):
                fields: Any = side.fields
                if all(type(f) is ast.String for f in fields) and (
                    len(fields) == 1 or (len(fields) == 2 and fields[0].sval in names)
                ):
                    columns.add(fields[-1].sval)
    return ((rel.relname, frozenset(columns)),)


def _constant(node: Any) -> bool:
    while type(node) is ast.TypeCast:
        node = node.arg
    return type(node) is ast.A_Const or type(node) is ast.ParamRef


def _creates_temp(stmt: Any, cls: type) -> bool:
    if cls is ast.CreateStmt:
        rel = stmt.relation
    elif cls is ast.CreateTableAsStmt:
        rel = stmt.into.rel
    elif cls is ast.ViewStmt:
        rel = stmt.view
    elif cls is ast.CreateSeqStmt:
        rel = stmt.sequence
    elif cls is ast.SelectStmt and stmt.intoClause is not None:
        rel = stmt.intoClause.rel
    else:
        return False
    return rel is not None and rel.relpersistence == "t"


_NOTIFY_FUNCTIONS = frozenset({"pg_notify", "pg_catalog.pg_notify"})
_NO_BLOCK_KINDS = frozenset(
    {
        TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
        TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
    }
)
# Statements PostgreSQL refuses inside a transaction block (PreventInTransactionBlock), and
# those that may end transactions themselves (procedures and DO blocks may COMMIT).
_NO_BLOCK_STMTS: frozenset[type] = frozenset(
    {
        ast.CreatedbStmt,
        ast.DropdbStmt,
        ast.AlterSystemStmt,
        ast.CreateTableSpaceStmt,
        ast.DropTableSpaceStmt,
        ast.CreateSubscriptionStmt,
        ast.AlterSubscriptionStmt,
        ast.DropSubscriptionStmt,
        ast.CallStmt,
        ast.DoStmt,
    }
)


def _outside_block_only(stmt: Any, cls: type) -> bool:
    if cls in _NO_BLOCK_STMTS:
        return True
    if cls is ast.VacuumStmt:
        return bool(stmt.is_vacuumcmd)  # ANALYZE alone runs in a block
    if cls is ast.IndexStmt or cls is ast.DropStmt:
        return bool(stmt.concurrent)
    if cls is ast.ReindexStmt:
        # REINDEX DATABASE/SYSTEM and REINDEX ... CONCURRENTLY
        return stmt.kind.name in ("REINDEX_OBJECT_DATABASE", "REINDEX_OBJECT_SYSTEM") or any(
            type(p) is ast.DefElem and p.defname == "concurrently" for p in stmt.params or ()
        )
    if cls is ast.ClusterStmt:
        return stmt.relation is None  # CLUSTER of every table
    if cls is ast.DiscardStmt:
        return stmt.target.name == "DISCARD_ALL"
    if cls is ast.AlterDatabaseStmt:
        return any(type(o) is ast.DefElem and o.defname == "tablespace" for o in stmt.options or ())
    return False


def _combine(parts: list[_Part]) -> tuple[Analysis, bool]:
    routes = {part.route for part in parts}
    if Route.WRITE in routes:
        route = Route.WRITE
    elif Route.LEAD in routes:
        route = Route.LEAD
    else:
        route = Route.READ
    functions = _EMPTY
    if route is Route.READ:
        called = [part.functions for part in parts if part.functions]
        if len(called) == 1:
            functions = called[0]
        elif called:
            functions = frozenset().union(*called)
    copy = next((part.copy for part in parts if part.copy is not None), None)
    all_calls = [part.calls for part in parts if part.calls]
    if len(all_calls) == 1:
        calls = all_calls[0]
    else:
        calls = frozenset().union(*all_calls) if all_calls else _EMPTY
    analysis = Analysis(
        route,
        functions,
        copy=copy,
        strict_isolation=any(part.strict for part in parts),
        catalog_change=any(part.catalog for part in parts),
        statements=len(parts),
        lock_free=all(part.lock_free for part in parts),
        begin=len(parts) == 1 and parts[0].begin,
        commit=len(parts) == 1 and parts[0].commit,
        txn_control=any(part.txn_control for part in parts),
        no_block=any(part.no_block for part in parts),
        temp=any(part.temp for part in parts),
        notify=any(part.notify or _NOTIFY_FUNCTIONS & part.calls for part in parts),
        calls=calls,
        time_values=any(part.time_values for part in parts),
        arbitrary=any(part.arbitrary for part in parts),
        inserts=frozenset().union(*(part.inserts for part in parts)),
        copy_into=next((part.copy_into for part in parts if part.copy_into), None),
        ddl=any(part.ddl for part in parts),
        reads_others=any(part.reads_others for part in parts),
        filters=tuple(f for part in parts for f in part.filters),
    )
    return analysis, all(part.fp_safe for part in parts)


_SURROGATES = re.compile("[\ud800-\udfff]")


def parsable_text(sql: str) -> str:
    """`sql` as pglast can take it: the protocol layer decodes client bytes that are not
    UTF-8 (another client_encoding) to lone surrogates, which cannot be encoded (pglast
    raised UnicodeEncodeError, out of Analyzer.analyze); each becomes U+FFFD, one character
    for one, so offsets into the text stay valid.  Bytes >= 0x80 sit inside literals,
    quoted or plain identifiers and comments, where one such character stands for another
    (a function named with them is unknown to the catalog, hence volatile).  (Encodings
    with ASCII trail bytes, SJIS, BIG5, GBK..., can still be misread, as before.)
    """
    if sql.isascii():
        return sql
    try:
        sql.encode()
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", sql)
    return sql


def _parse(sql: str) -> tuple[Analysis, bool]:
    """Full analysis of `sql` and whether it may be stored in the fingerprint cache."""
    try:
        stmts = parse_sql(sql)
    except PglastError as exc:
        return Analysis(Route.WRITE, _EMPTY, error=str(exc)), False
    except RecursionError:  # pathological nesting: let the servers judge it
        return Analysis(Route.WRITE, _EMPTY), False
    if not stmts:
        return _NO_STATEMENTS, True
    parts = [_classify(raw.stmt, _STMT_DEPTH) for raw in stmts]
    analysis, fp_safe = _combine(parts)
    settings = []
    for part, raw in zip(parts, stmts, strict=True):
        found = part.settings
        if not found and type(raw.stmt) is ast.SelectStmt and part.calls & _SET_CONFIG:
            found = _set_config(raw.stmt)
        elif type(raw.stmt) is ast.DiscardStmt and raw.stmt.target == DiscardMode.DISCARD_ALL:
            found = (("reset", "", None),)  # as a pooler resets a connection
        if found:
            start = raw.stmt_location or 0
            end = start + raw.stmt_len if raw.stmt_len else len(sql)  # 0: to the end
            settings += [(kind, name, start, end, text) for kind, name, text in found]
    if settings:  # their places belong to this text: never shared
        analysis = dataclasses.replace(analysis, settings=tuple(settings))
        fp_safe = False
    return analysis, fp_safe


# -- the shape cache ---------------------------------------------------------------------
#
# A program sends the same statement again and again with other integers in it (pgbench -S:
# ``... WHERE aid = 123456``). Each new text misses the text cache and costs a fingerprint.
# A *shape* is a text cut at its integer constants, as PostgreSQL's own scanner finds them
# (ICONST tokens). A text that is the shape with other digits in its holes scans to the
# same tokens but for those constants' values, so it has the shape's fingerprint and may
# share its analysis; checking that costs a fraction of a fingerprint. Holes take at most
# nine digits, so every value is still an int4 constant, and a hole is never followed by a
# digit (the text around it is the shape's own). Texts are looked up by their letters and
# signs without the digits; the comparison with the shape decides.

_DIGITS = re.compile(r"[0-9]+")
_HOLE = re.compile(r"[0-9]{1,9}(?![0-9])")
_SHAPES_PER_KEY = 4  # shapes that differ only in the digits of identifiers or strings
_SHAPE_MAX_TEXT = 2048  # longer texts go by fingerprint


def _shape(sql: str) -> tuple[str, ...] | None:
    """`sql` cut at its integer constants; None without any, or with a long one."""
    try:
        tokens = scan(sql)
    except PglastError:
        return None
    parts: list[str] = []
    pos = 0
    for t in tokens:
        if t.name == "ICONST":
            digits = sql[t.start : t.end + 1]
            if len(digits) > 9 or not (digits.isascii() and digits.isdigit()):
                return None  # hex, underscores, maybe not an int4: not worth a shape
            parts.append(sql[pos : t.start])
            pos = t.end + 1
    if not parts:
        return None
    parts.append(sql[pos:])
    return tuple(parts)


def _fits(sql: str, shape: tuple[str, ...]) -> bool:
    """Whether `sql` is `shape` with 1-9 digits in every hole."""
    first = shape[0]
    if not sql.startswith(first):
        return False
    pos = len(first)
    hole = _HOLE.match
    for part in shape[1:]:
        found = hole(sql, pos)
        if found is None:
            return False
        pos = found.end()
        if not sql.startswith(part, pos):
            return False
        pos += len(part)
    return pos == len(sql)


class Analyzer:
    """Classifies SQL strings, with bounded caches.

    By exact text first (a dict lookup), then by shape (the text with other integer
    constants, see above), then by pglast fingerprint (~7us, much cheaper than a full
    parse) so that statements differing only in constants share one analysis; see the
    fingerprint-safety notes above for what may be shared.  Each cache holds at most
    `max_entries`; when full, the oldest eighth is dropped.  Texts longer than
    `max_text_len` are not kept by text, nor those over 2048 characters by shape (they
    would pin a lot of memory), but they still use the fingerprint cache.  Not thread-safe;
    fine for one asyncio loop (no awaits inside).
    """

    __slots__ = (
        "_by_fp",
        "_by_shape",
        "_by_text",
        "_max_entries",
        "_max_text_len",
        "_shapeless",
        "fp_hits",
        "parses",
        "shape_hits",
    )

    def __init__(self, max_entries: int = 10_000, max_text_len: int = 16_384) -> None:
        self._by_text: dict[str, Analysis] = {}
        self._by_fp: dict[str, Analysis] = {}
        # text without digits -> (shape, analysis), the newest last
        self._by_shape: dict[str, tuple[tuple[tuple[str, ...], Analysis], ...]] = {}
        self._shapeless: dict[tuple[str, str], bool] = {}  # (fingerprint, key): no shape
        self._max_entries = max(1, max_entries)
        self._max_text_len = max_text_len
        self.fp_hits = 0  # text misses answered by the fingerprint cache
        self.shape_hits = 0  # text misses answered by the shape cache
        self.parses = 0  # full parses (text and fingerprint misses)

    def analyze(self, sql: str) -> Analysis:
        analysis = self._by_text.get(sql)
        if analysis is not None:
            return analysis
        return self._analyze_miss(sql)

    def _analyze_miss(self, sql: str) -> Analysis:
        short = len(sql) <= self._max_text_len
        # Shapes of long texts would pin much memory; a text without digits has none.
        key = _DIGITS.sub("", sql) if len(sql) <= _SHAPE_MAX_TEXT else sql
        shaped = len(key) < len(sql)
        for shape, known in self._by_shape.get(key, ()) if shaped else ():
            if _fits(sql, shape):
                self.shape_hits += 1
                if short:
                    self._store(self._by_text, sql, known)
                return known
        if "\x00" in sql:
            # The parser would stop at the NUL and classify only a prefix.
            analysis = Analysis(Route.WRITE, _EMPTY, error="query string contains a NUL byte")
        else:
            text = parsable_text(sql)
            try:
                fp = fingerprint(text)
            except PglastError as exc:
                analysis = Analysis(Route.WRITE, _EMPTY, error=str(exc))
            else:
                cached = self._by_fp.get(fp)
                if cached is not None:
                    self.fp_hits += 1
                    analysis = cached
                    # Seen twice: worth a shape, kept by its lookup key (`x + 5` and
                    # `x + -5` have one fingerprint but two). A text with none (a long
                    # constant, hex) is not scanned again for one.
                    if shaped and text is sql and (fp, key) not in self._shapeless:
                        cut = _shape(sql)
                        if cut is None:
                            self._store(self._shapeless, (fp, key), True)
                        else:
                            kept = self._by_shape.get(key, ())[-(_SHAPES_PER_KEY - 1) :]
                            self._store(self._by_shape, key, (*kept, (cut, analysis)))
                else:
                    self.parses += 1
                    analysis, fp_safe = _parse(text)
                    if fp_safe:
                        self._store(self._by_fp, fp, analysis)
        if short:
            self._store(self._by_text, sql, analysis)
        return analysis

    def _store(self, cache: dict[_K, _V], key: _K, value: _V) -> None:
        store_bounded(cache, key, value, self._max_entries)

    def stats(self) -> dict[str, int]:
        return {
            "text_entries": len(self._by_text),
            "fingerprint_entries": len(self._by_fp),
            "fingerprint_hits": self.fp_hits,
            "shape_entries": len(self._by_shape),
            "shape_hits": self.shape_hits,
            "parses": self.parses,
        }

    def clear(self) -> None:
        self._by_text.clear()
        self._by_fp.clear()
        self._by_shape.clear()
        self._shapeless.clear()
