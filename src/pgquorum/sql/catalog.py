"""Function volatility, learnt from pg_proc, to decide whether a SELECT may run on one node.

A READ statement that calls a volatile function (nextval, random, anything user-defined
and VOLATILE, or anything we cannot find) must run on every node instead.  Names come
from :class:`pgquorum.sql.analyze.Analysis.functions`: "name" or "schema.name".
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from pgquorum.protocol.errors import PgError

from .quoting import quote_literal
from .sequences import TABLES_SQL, Column, columns_sql

_KNOWN = frozenset({"i", "s", "v"})


class FunctionCatalog:
    """Per-database cache of function volatility from pg_proc ('i' immutable, 's' stable,
    'v' volatile).

    A name maps to the most volatile of all its overloads: an unqualified name across every
    schema (so search_path cannot matter), "schema.name" within that schema.  Plain dicts,
    no awaits: safe to share between asyncio tasks on one loop.
    """

    __slots__ = ("_max_entries", "_volatility")

    def __init__(self, max_entries: int = 100_000) -> None:
        self._volatility: dict[str, str] = {}
        # Clients can invent any number of names (each remembered as 'v'): stay bounded.
        self._max_entries = max_entries

    def unknown(self, functions: frozenset[str]) -> list[str]:
        """Names not cached yet, sorted (stable lookup_sql text)."""
        volatility = self._volatility
        return sorted(name for name in functions if name not in volatility)

    def is_volatile(self, functions: frozenset[str]) -> bool:
        """True if any function is volatile or not cached (unknown counts as a write)."""
        volatility = self._volatility
        return any(volatility.get(name, "v") == "v" for name in functions)

    def volatility(self, name: str) -> str | None:
        return self._volatility.get(name)

    def learn(self, rows: Iterable[tuple[str, str]], requested: Iterable[str] = ()) -> None:
        """Store (name, volatility) rows as returned by lookup_sql.

        lookup_sql returns a row for every requested name ('v' when pg_proc has none), so
        `rows` alone is enough for its output; rows from elsewhere can pass the names that
        were asked for as `requested`, and those without a row are remembered as 'v'.
        Anything but 'i' or 's' is stored as 'v'.
        """
        volatility = self._volatility
        if len(volatility) >= self._max_entries:
            volatility.clear()
        seen: set[str] = set()
        for name, value in rows:
            volatility[name] = value if value in _KNOWN else "v"
            seen.add(name)
        for name in requested:
            if name not in seen:
                volatility[name] = "v"

    def clear(self) -> None:
        """Forget everything (after CREATE/ALTER/DROP FUNCTION, extensions, schemas...)."""
        self._volatility.clear()

    def __len__(self) -> int:
        return len(self._volatility)

    @staticmethod
    def lookup_sql(names: Sequence[str]) -> str:
        """One SELECT returning (name text, volatility text) for each distinct name.

        `name` is echoed exactly as given; volatility is max(provolatile) over all matching
        overloads ('i' < 's' < 'v' under COLLATE "C", so max is the most volatile), or 'v'
        when nothing matches, so a name with no function is learnt as volatile.  Names
        containing a double quote (analyze.py's marker for an identifier that itself
        contains '.' or '"') are never matched and come back 'v'.
        """
        if not names:
            return "SELECT NULL::text AS name, NULL::text AS volatility WHERE false"
        rows = []
        for name in dict.fromkeys(names):  # dedup, keep order
            schema: str | None
            proname: str | None
            if '"' in name:
                schema, proname = None, None
            else:
                schema, dot, proname = name.partition(".")
                if not dot:
                    schema, proname = None, name
                elif "." in proname:
                    schema, proname = None, None
            rows.append(f"({_literal(name)}, {_literal(schema)}, {_literal(proname)})")
        return (
            "SELECT q.name, coalesce(max(p.provolatile::text COLLATE \"C\"), 'v') AS volatility"
            f" FROM (VALUES {', '.join(rows)}) AS q(name, nsp, pro)"
            " LEFT JOIN (pg_catalog.pg_proc AS p"
            " JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace)"
            " ON p.proname = q.pro::name AND (q.nsp IS NULL OR n.nspname = q.nsp::name)"
            " GROUP BY q.name"
        )


def _literal(value: str | None) -> str:
    """A text literal that means `value` whatever standard_conforming_strings is."""
    if value is None:
        return "NULL::text"
    if "\x00" in value:
        raise ValueError("function name contains a NUL character")
    return quote_literal(value) + "::text"


# Runs one query of the router's own where the session's statements run (the session's lead
# connection, so names resolve by its search_path); None if the query failed.
Fetch = Callable[[str], Awaitable[list[list[str | None]] | None]]


class TableCatalog:
    """Per-database cache of what fill_defaults needs: the tables with defaults that call a
    function, their columns, and sequences' schema-qualified names.

    Entries live ``ttl`` seconds, and DDL through this router clears them: DDL through
    another router is seen after at most ``ttl`` (and a table this cache has not heard of
    is looked up at once).
    """

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._filled: frozenset[str] | None = None
        self._filled_at = 0.0
        self._known: frozenset[str] = frozenset()
        self._columns: dict[str, tuple[float, list[Column]]] = {}
        self._sequences: dict[str, str] = {}
        self._keys: dict[str, tuple[float, list[frozenset[str]]]] = {}

    def clear(self) -> None:
        self._filled = None
        self._columns.clear()
        self._sequences.clear()
        self._keys.clear()

    async def filled(self, fetch: Fetch, tables: frozenset[str] = frozenset()) -> frozenset[str]:
        now = time.monotonic()
        stale = self._filled is None or now - self._filled_at > self.ttl
        if stale or not tables <= self._known:
            rows = await fetch(TABLES_SQL)
            if rows is not None:
                self._filled = frozenset(str(r[0]) for r in rows if r[1] == "t")
                self._known = frozenset(str(r[0]) for r in rows)
                self._filled_at = now
        return self._filled or frozenset()

    async def columns(self, fetch: Fetch, table: str) -> list[Column]:
        now = time.monotonic()
        hit = self._columns.get(table)
        if hit is not None and now - hit[0] <= self.ttl:
            return hit[1]
        rows = await fetch(columns_sql(table))
        columns = [Column.from_row(r) for r in rows or ()]
        self._columns[table] = (now, columns)
        return columns

    async def unique_keys(self, fetch: Fetch, table: str) -> list[frozenset[str]]:
        """The column sets of ``table``'s unique indexes (plain columns, no predicate)."""
        now = time.monotonic()
        hit = self._keys.get(table)
        if hit is not None and now - hit[0] <= self.ttl:
            return hit[1]
        rows = await fetch(
            "SELECT i.indexrelid::pg_catalog.int8, a.attname FROM pg_catalog.pg_index i "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY (i.indkey) "
            f"WHERE i.indrelid = pg_catalog.to_regclass({_literal(table)}) "
            "AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL"
        )
        if rows is None:  # (the query failed: an aborted transaction, say) no key known
            return []
        by_index: dict[str, set[str]] = {}
        for index, column in rows:
            by_index.setdefault(str(index), set()).add(str(column))
        keys = [frozenset(columns) for columns in by_index.values()]
        self._keys[table] = (now, keys)
        return keys

    async def sequence(self, fetch: Fetch, name: str) -> str:
        """The schema-qualified name of the sequence ``name`` (as a statement wrote it)."""
        got = self._sequences.get(name)
        if got is None:
            lit = _literal(name)
            rows = await fetch(
                "SELECT pg_catalog.quote_ident(n.nspname) || '.' || "
                "pg_catalog.quote_ident(c.relname) FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE c.oid = pg_catalog.to_regclass({lit}) AND c.relkind = 'S'"
            )
            if not rows:
                raise PgError("42P01", f'relation "{name}" does not exist')
            got = self._sequences[name] = str(rows[0][0])
        return got
