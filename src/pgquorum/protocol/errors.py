"""SQLSTATE codes the router reports itself, and the error type that carries them."""

from __future__ import annotations

# Codes from https://www.postgresql.org/docs/current/errcodes-appendix.html that the router uses.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CONNECTION_EXCEPTION = "08000"
SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
INVALID_CATALOG_NAME = "3D000"
FEATURE_NOT_SUPPORTED = "0A000"
SYNTAX_ERROR = "42601"
PROGRAM_LIMIT_EXCEEDED = "54000"
TOO_MANY_CONNECTIONS = "53300"
ADMIN_SHUTDOWN = "57P01"
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"  # FATAL: idle_in_transaction_session_timeout
IDLE_SESSION_TIMEOUT = "57P05"  # FATAL: idle_session_timeout
QUERY_CANCELED = "57014"
SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout, NOWAIT
INTERNAL_ERROR = "XX000"
IN_FAILED_TRANSACTION = "25P02"
UNDEFINED_OBJECT = "42704"
DUPLICATE_OBJECT = "42710"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
IO_ERROR = "58030"


class PgError(Exception):
    """An error the router reports to a client as an ErrorResponse.

    ``severity`` is ERROR (the session goes on) or FATAL (the router closes the connection
    after sending it).
    """

    def __init__(
        self,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint

    @property
    def fatal(self) -> bool:
        return self.severity in ("FATAL", "PANIC")


class ProtocolViolation(PgError):
    """The peer broke the protocol (malformed or oversized message); the connection ends."""

    def __init__(self, message: str) -> None:
        super().__init__(PROTOCOL_VIOLATION, message, severity="FATAL")
