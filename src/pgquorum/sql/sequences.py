"""Sequence values and column defaults in statements that run on every node.

Nodes must not evaluate nextval() themselves (two transactions would get their values in one
order on the lead and in another on a replica), nor column defaults that call now(),
nextval() or another function: an INSERT that leaves such a column out would store each
node's own value. So, before a write is sent:

1. every column an INSERT ... VALUES leaves to a default that calls a function (serial,
   identity, ``DEFAULT now()``...) is written out with that default's expression
   (:func:`fill_defaults`);
2. every nextval() is replaced by a value the router assigned, currval()/lastval() by the
   session's last value (:class:`SequenceCalls`);
3. the result goes through :func:`pgquorum.sql.determinism.check_and_rewrite`, which fixes
   the time and refuses what stays node-dependent.

Only places evaluated once per statement can take an assigned value: a VALUES row, or a
SELECT without FROM. nextval() anywhere else (per row of a query, in UPDATE ... SET) and
INSERT ... SELECT into a table with such defaults are refused with a remedy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import OverridingKind
from pglast.stream import RawStream

from pgquorum.protocol.errors import FEATURE_NOT_SUPPORTED, PgError

from .analyze import _child_attrs, _func_name
from .quoting import quote_ident, quote_literal

NEXTVAL = frozenset({"nextval", "pg_catalog.nextval"})
CURRVAL = frozenset({"currval", "pg_catalog.currval"})
LASTVAL = frozenset({"lastval", "pg_catalog.lastval"})
SETVAL = frozenset({"setval", "pg_catalog.setval"})
SEQUENCE_FUNCTIONS = NEXTVAL | CURRVAL | LASTVAL | SETVAL  # determinism leaves these alone

# Every table (by relation name) and whether a column's default calls a function (or is an
# identity): their INSERTs need fill_defaults. The look at the stored expression tree is
# coarse on purpose: a plain constant never matches, anything else is looked at closely.
_FILLED = "a.attidentity <> '' OR coalesce(d.adbin::text ~ '\\{(FUNCEXPR|SQLVALUEFUNCTION)', false)"
TABLES_SQL = f"""
SELECT c.relname, bool_or({_FILLED})
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_attribute a
  ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relkind IN ('r', 'p', 'f')
GROUP BY c.relname"""


def columns_sql(table: str) -> str:
    """The columns of ``table`` (as the statement names it, resolved by the session's
    search_path) in order: name, identity, filled (default calls a function), default
    expression, the identity's sequence."""
    lit = quote_literal(table)  # (the client sets standard_conforming_strings)
    return f"""
SELECT a.attname, a.attidentity, {_FILLED},
       pg_catalog.pg_get_expr(d.adbin, d.adrelid),
       pg_catalog.pg_get_serial_sequence({lit}, a.attname)
FROM pg_catalog.pg_attribute a
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = pg_catalog.to_regclass({lit}) AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attgenerated = ''
ORDER BY a.attnum"""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    identity: str  # '' | 'a' (GENERATED ALWAYS) | 'd' (BY DEFAULT)
    filled: bool  # left out of an INSERT, the router writes its default out
    default: str | None  # the default's expression (pg_get_expr)
    sequence: str | None  # the serial's or identity's sequence, schema-qualified

    @staticmethod
    def from_row(row: list[str | None]) -> Column:
        name, identity, filled, default, sequence = row
        return Column(str(name), identity or "", filled == "t", default, sequence)


def _refuse(message: str, hint: str) -> PgError:
    return PgError(FEATURE_NOT_SUPPORTED, message, hint=hint)


def parse(sql: str) -> list[Any]:
    return [raw.stmt for raw in parse_sql(sql)]


def deparse(stmts: list[Any]) -> str:
    return "; ".join(RawStream()(s) for s in stmts)


def insert_targets(stmts: list[Any]) -> Iterator[tuple[Any, str]]:
    """(InsertStmt, table name as written) of every top-level INSERT."""
    for stmt in stmts:
        if type(stmt) is ast.InsertStmt:
            yield stmt, _table_name(stmt.relation)


def copy_targets(stmts: list[Any]) -> Iterator[tuple[str, str, set[str] | None]]:
    """(relation name, table name as written, columns given or None for all) of every
    COPY ... FROM."""
    for stmt in stmts:
        if type(stmt) is ast.CopyStmt and stmt.is_from and stmt.relation is not None:
            given = {c.sval for c in stmt.attlist} if stmt.attlist else None
            yield str(stmt.relation.relname), _table_name(stmt.relation), given


def copy_locks(table: str, columns: list[Column], given: set[str] | None) -> set[str]:
    """The sequences a COPY FROM draws from for the columns it leaves out (the rows come in
    the client's order, so every node numbers them alike under a lock); other defaults that
    call functions must be given by the client."""
    left = [c for c in columns if c.filled and given is not None and c.name not in given]
    return _drawn_by_nodes(left, f"COPY into {table}", "the COPY column list and send their values")


def _drawn_by_nodes(columns: list[Column], where: str, remedy: str) -> set[str]:
    """The sequences of these left-out columns, which the nodes draw from themselves; any
    other default that calls a function cannot be left to the nodes."""
    other = [c.name for c in columns if c.sequence is None]
    if other:
        names = ", ".join(other)
        raise _refuse(
            f"pgquorum cannot fill the defaults of {names} for {where}: "
            "each node would compute its own",
            f"List {names} in {remedy}.",
        )
    return {str(c.sequence) for c in columns}


def _table_name(rel: Any) -> str:
    if rel.schemaname:
        return f"{quote_ident(rel.schemaname)}.{quote_ident(rel.relname)}"
    return quote_ident(rel.relname)


def _any(obj: object) -> Any:
    return obj


def _default_expr(col: Column) -> Any:
    text = f"pg_catalog.nextval('{col.sequence}')" if col.identity else col.default or "NULL"
    select: Any = parse_sql(f"SELECT {text}")[0].stmt
    return select.targetList[0].val


def fill_defaults(stmt: Any, columns: list[Column]) -> tuple[bool, set[str]]:
    """Write out the filled defaults an INSERT ... VALUES leaves to its table.

    Returns whether the statement changed, and the sequences the nodes must draw from
    themselves under a lock (INSERT ... SELECT whose rows come in one order everywhere:
    each node numbers them alike if no one else draws from the sequence meanwhile).
    """
    given = [t.name for t in stmt.cols] if stmt.cols else None
    select = stmt.selectStmt
    rows = select.valuesLists if select is not None else None
    width = len(rows[0]) if rows else 0
    if given is None:
        given = [c.name for c in columns[:width]] if select is not None else []
    by_name = {c.name: c for c in columns}
    missing = [c for c in columns if c.filled and c.name not in given]
    defaulted = (
        [i for i, name in enumerate(given) if name in by_name and by_name[name].filled]
        if rows
        else []
    )
    if not missing and not any(
        type(row[i]) is ast.SetToDefault for row in rows or () for i in defaulted
    ):
        return False, set()
    if select is not None and not rows:
        return False, _select_locks(select, missing)
    if select is not None and (select.withClause or select.sortClause or select.limitCount):
        raise _refuse(
            "pgquorum cannot fill column defaults in this form of INSERT ... VALUES",
            "List every column with a default that calls a function, and give its value.",
        )
    always = False
    new_rows = []
    for row in rows or ((),):
        values = list(row)
        for i in defaulted:
            if type(values[i]) is ast.SetToDefault:
                values[i] = _default_expr(by_name[given[i]])
        values += [_default_expr(c) for c in missing]
        new_rows.append(tuple(values))
    always = any(c.identity == "a" for c in missing) or any(
        by_name[given[i]].identity == "a" for i in defaulted
    )
    stmt.cols = tuple(ast.ResTarget(name=n) for n in [*given, *(c.name for c in missing)])
    if select is None:
        stmt.selectStmt = ast.SelectStmt(valuesLists=tuple(new_rows), op=0, all=False)
    else:
        select.valuesLists = tuple(new_rows)
    if always:
        if stmt.override == OverridingKind.OVERRIDING_USER_VALUE:
            raise _refuse(
                "pgquorum cannot assign identity values with OVERRIDING USER VALUE",
                "Leave the identity column out of the INSERT instead.",
            )
        stmt.override = OverridingKind.OVERRIDING_SYSTEM_VALUE
    return True, set()


def _select_locks(select: Any, missing: list[Column]) -> set[str]:
    locks = _drawn_by_nodes(
        missing, "the rows of INSERT ... SELECT", "the INSERT and give the values, or use VALUES"
    )
    if not _ordered(select):
        names = ", ".join(c.name for c in missing)
        raise _refuse(
            f"pgquorum cannot number the rows of this INSERT ... SELECT ({names}): "
            "they may come in a different order on each node",
            "Add ORDER BY on a unique key to the SELECT.",
        )
    return locks


def _ordered(select: Any) -> bool:
    """Rows come in the same order on every node: sorted, or from functions and VALUES only
    (a table scan follows each node's own physical layout)."""
    if select.sortClause:
        return True
    if select.op:  # UNION etc.
        return False
    return all(type(item) is ast.RangeFunction for item in select.fromClause or ())


@dataclass(slots=True)
class SequenceCall:
    node: Any  # the FuncCall
    kind: str  # nextval | currval | lastval
    sequence: str | None  # the argument as written (a regclass text), None for lastval


def sequence_calls(stmts: list[Any]) -> list[SequenceCall]:
    """The nextval/currval/lastval calls to replace, in the order PostgreSQL would evaluate
    them; PgError for one in a place evaluated per row."""
    found: list[SequenceCall] = []
    for stmt in stmts:
        _walk(stmt, once=type(stmt) is ast.SelectStmt and not stmt.fromClause, out=found)
    found.sort(key=lambda c: c.node.location)
    return found


def _walk(obj: Any, *, once: bool, out: list[SequenceCall]) -> None:
    cls = type(obj)
    if cls is tuple:
        for item in obj:
            _walk(item, once=once, out=out)
        return
    if not isinstance(obj, ast.Node):
        return
    obj = _any(obj)
    if cls is ast.FuncCall:
        name = _func_name(obj.funcname)
        kind = (
            "nextval"
            if name in NEXTVAL
            else "currval"
            if name in CURRVAL
            else "lastval"
            if name in LASTVAL
            else None
        )
        if kind is not None:
            if kind == "nextval" and not once:
                raise _refuse(
                    "pgquorum cannot assign nextval() values here: it runs once per row, "
                    "and each node would number the rows itself",
                    "Call nextval() in a VALUES row or a SELECT without FROM, or let the "
                    "client fetch the values first.",
                )
            arg = obj.args[0] if obj.args else None
            seq = None
            if kind != "lastval":
                if type(arg) is ast.TypeCast:
                    arg = arg.arg
                if type(arg) is not ast.A_Const or type(arg.val) is not ast.String:
                    raise _refuse(
                        f"pgquorum can only assign {kind}() of a sequence named by a literal",
                        f"Write {kind}('sequence_name').",
                    )
                seq = arg.val.sval
            out.append(SequenceCall(obj, kind, seq))
            return
    if cls is ast.InsertStmt:
        select = obj.selectStmt
        _walk(obj.withClause, once=False, out=out)
        if select is not None and select.valuesLists:
            _walk(select.valuesLists, once=True, out=out)
        else:
            _walk(select, once=False, out=out)
        for attr in ("onConflictClause", "returningClause"):
            _walk(getattr(obj, attr), once=False, out=out)
        return
    if cls is ast.SelectStmt and obj is not None:
        once = once and not obj.fromClause and not obj.valuesLists
    for attr in _child_attrs(cls):
        value = getattr(obj, attr)
        if value is not None:
            _walk(value, once=once, out=out)


def replace_call(call: SequenceCall, value: int) -> None:
    """Make the call return ``value``: it becomes pg_catalog.int8(value), an immutable call
    of nextval's own type (rewritten in place, so no parent needs to change)."""
    const = ast.A_Const(
        val=ast.Integer(ival=value) if -(2**31) <= value < 2**31 else ast.Float(fval=str(value))
    )
    call.node.funcname = (ast.String(sval="pg_catalog"), ast.String(sval="int8"))
    call.node.args = (const,)
