"""Literals the router writes: for PostgreSQL, and for its own admin console."""

from __future__ import annotations

from pgquorum.router.client import console_literal
from pgquorum.router.peers import fail_node_command, parse_fail_node
from pgquorum.sql.quoting import quote_literal


def test_sql_literal_holds_under_either_standard_conforming_strings() -> None:
    assert quote_literal("it's") == "'it''s'"
    # With standard_conforming_strings off, '\' would escape the closing quote.
    assert quote_literal("C:\\dir\\") == "E'C:\\\\dir\\\\'"


def test_console_literal_round_trips_through_fail_node() -> None:
    reason = "cannot connect: C:\\sock 'x'"
    assert console_literal("a'b") == "'a''b'"
    assert parse_fail_node(fail_node_command("node 1", reason)) == ("node 1", reason)
