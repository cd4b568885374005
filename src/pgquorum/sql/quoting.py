"""SQL text the router writes itself: literals and identifiers, quoted as PostgreSQL reads
them whatever the session's settings."""

from __future__ import annotations


def quote_literal(text: str) -> str:
    """A string literal for PostgreSQL, read the same whatever standard_conforming_strings
    says (E'' where there are backslashes)."""
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
