"""pgquorum: several ordinary PostgreSQL servers acting as one fault-tolerant database."""

__version__ = "0.1.0"
