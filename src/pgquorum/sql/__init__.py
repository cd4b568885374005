"""SQL analysis on the real PostgreSQL grammar (pglast): classify statements for routing."""
