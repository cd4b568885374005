"""Encoding and decoding of the PostgreSQL protocol 3.0 messages the router builds or inspects.

Row data (DataRow, CopyData) is never decoded here: the router forwards it as bytes.
Decoders take the payload of one frame (without the type byte and length) and raise
:class:`ProtocolViolation` on malformed input, never IndexError or struct.error.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import PgError, ProtocolViolation

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Frontend message types.
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
TERMINATE = ord("X")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
FUNCTION_CALL = ord("F")
PASSWORD = ord("p")  # also SASLInitialResponse and SASLResponse

# Backend message types.
AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ROW_DESCRIPTION = ord("T")
DATA_ROW = ord("D")
COMMAND_COMPLETE = ord("C")
EMPTY_QUERY = ord("I")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION = ord("A")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
PORTAL_SUSPENDED = ord("s")
NO_DATA = ord("n")
PARAMETER_DESCRIPTION = ord("t")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

# Authentication request codes (payload of an 'R' message).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HEADER = struct.Struct("!ci")


def frame(mtype: int, payload: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (including itself), payload."""
    return bytes((mtype,)) + _I32.pack(len(payload) + 4) + payload


def cstr(text: str) -> bytes:
    # surrogateescape gives back exactly the bytes a lenient decode took in (see Cursor.cstring);
    # a NUL inside would end the string early on the wire, so it is dropped.
    return text.replace("\0", "").encode("utf-8", "surrogateescape") + b"\0"


# ---------------------------------------------------------------------------------------------
# Reading helpers


class Cursor:
    """Reads fields from one message payload; every overrun is a ProtocolViolation."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _short(self) -> ProtocolViolation:
        return ProtocolViolation(f"invalid {self.what} message: too short")

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self._short()
        (v,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self._short()
        (v,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self._short()
        v = self.data[self.pos]
        self.pos += 1
        return v

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolViolation(f"invalid {self.what} message: unterminated string")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        # Clients may use another client_encoding: keep undecodable bytes as surrogates so the
        # text round-trips unchanged (the router forwards original bytes wherever it can).
        return raw.decode("utf-8", "surrogateescape")

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._short()
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def rest(self) -> bytes:
        v = self.data[self.pos :]
        self.pos = len(self.data)
        return v

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolViolation(f"invalid {self.what} message: trailing bytes")


# ---------------------------------------------------------------------------------------------
# Startup phase (untyped messages)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    params: dict[str, str]

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database") or self.user


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def parse_startup(payload: bytes) -> StartupPacket:
    """Decode the payload of a startup-phase packet (after its int32 length)."""
    cur = Cursor(payload, "startup")
    code = cur.int32()
    if code == SSL_REQUEST_CODE:
        cur.end()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        cur.end()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        pid, secret = cur.int32(), cur.int32()
        cur.end()
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise PgError(
            "0A000",
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0",
            severity="FATAL",
        )
    params: dict[str, str] = {}
    while True:
        key = cur.cstring()
        if not key:
            break
        params[key] = cur.cstring()
    cur.end()
    if not params.get("user"):
        raise PgError(
            "28000", "no PostgreSQL user name specified in startup packet", severity="FATAL"
        )
    return StartupMessage(params)


def encode_startup(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def encode_cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + _I32.pack(secret)


def encode_ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


# ---------------------------------------------------------------------------------------------
# Frontend messages the router inspects


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # 'S' statement or 'P' portal
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int


@dataclass(frozen=True, slots=True)
class Close:
    kind: str  # 'S' or 'P'
    name: str


def parse_query(payload: bytes) -> str:
    cur = Cursor(payload, "Query")
    q = cur.cstring()
    cur.end()
    return q


def parse_parse(payload: bytes) -> Parse:
    cur = Cursor(payload, "Parse")
    name = cur.cstring()
    query = cur.cstring()
    n = cur.int16()
    if n < 0:
        raise ProtocolViolation("invalid Parse message: negative parameter count")
    types = tuple(cur.int32() for _ in range(n))
    cur.end()
    return Parse(name, query, types)


def parse_bind(payload: bytes) -> Bind:
    # Only the names are needed for routing; the parameter values are forwarded untouched.
    # Every read per message counts here (pgbench -M prepared sends one Bind per
    # transaction), hence plain slicing rather than a Cursor.
    end = payload.find(b"\0")
    end2 = payload.find(b"\0", end + 1) if end >= 0 else -1
    if end2 < 0:
        raise ProtocolViolation("invalid Bind message: unterminated string")
    portal = payload[:end].decode("utf-8", "surrogateescape")
    stmt = payload[end + 1 : end2].decode("utf-8", "surrogateescape")
    pos = end2 + 1
    size = len(payload)
    try:
        (nfmt,) = _I16.unpack_from(payload, pos)
        if nfmt < 0:
            raise ProtocolViolation("invalid Bind message: negative format count")
        pos += 2 + 2 * nfmt
        (nparams,) = _I16.unpack_from(payload, pos)
        if nparams < 0:
            raise ProtocolViolation("invalid Bind message: negative parameter count")
        pos += 2
        for _ in range(nparams):
            (length,) = _I32.unpack_from(payload, pos)
            pos += 4
            if length >= 0:
                pos += length
            elif length != -1:
                raise ProtocolViolation("invalid Bind message: bad parameter length")
        (nres,) = _I16.unpack_from(payload, pos)
        if nres < 0:
            raise ProtocolViolation("invalid Bind message: negative result format count")
        pos += 2 + 2 * nres
    except struct.error:  # read past the end
        raise ProtocolViolation("invalid Bind message: too short") from None
    if pos != size:
        why = "too short" if pos > size else "trailing bytes"
        raise ProtocolViolation(f"invalid Bind message: {why}")
    return Bind(portal, stmt)


def bind_text_params(payload: bytes) -> list[str | None] | None:
    """The parameter values of a Bind already checked by parse_bind, as text (None for
    NULL); None if any is in binary format."""
    pos = payload.find(b"\0", payload.find(b"\0") + 1) + 1
    (nfmt,) = _I16.unpack_from(payload, pos)
    formats = [_I16.unpack_from(payload, pos + 2 + 2 * i)[0] for i in range(nfmt)]
    pos += 2 + 2 * nfmt
    (nparams,) = _I16.unpack_from(payload, pos)
    pos += 2
    if nfmt not in (0, 1, nparams):
        return None  # the server refuses it
    values: list[str | None] = []
    for i in range(nparams):
        fmt = formats[0] if nfmt == 1 else formats[i] if nfmt else 0
        if fmt != 0:
            return None
        (length,) = _I32.unpack_from(payload, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(payload[pos : pos + length].decode("utf-8", "surrogateescape"))
            pos += length
    return values


def _kind_and_name(payload: bytes, what: str) -> tuple[str, str]:
    # Slicing, not a Cursor: one Describe per prepared execution is on the hot path.
    if not payload:
        raise ProtocolViolation(f"invalid {what} message: too short")
    kind = chr(payload[0])
    if kind not in ("S", "P"):
        raise ProtocolViolation(f"invalid {what} message subtype {kind!r}")
    end = payload.find(b"\0", 1)
    if end < 0:
        raise ProtocolViolation(f"invalid {what} message: unterminated string")
    if end != len(payload) - 1:
        raise ProtocolViolation(f"invalid {what} message: trailing bytes")
    return kind, payload[1:end].decode("utf-8", "surrogateescape")


def parse_describe(payload: bytes) -> Describe:
    return Describe(*_kind_and_name(payload, "Describe"))


def parse_close(payload: bytes) -> Close:
    return Close(*_kind_and_name(payload, "Close"))


def parse_execute(payload: bytes) -> Execute:
    cur = Cursor(payload, "Execute")
    portal = cur.cstring()
    max_rows = cur.int32()
    cur.end()
    return Execute(portal, max_rows)


def encode_query(sql: str) -> bytes:
    return frame(QUERY, cstr(sql))


def encode_parse(name: str, query: str, param_types: Sequence[int] = ()) -> bytes:
    body = cstr(name) + cstr(query) + _I16.pack(len(param_types))
    body += b"".join(_I32.pack(t) for t in param_types)
    return frame(PARSE, body)


def encode_close(kind: str, name: str) -> bytes:
    return frame(CLOSE, kind.encode() + cstr(name))


SYNC_MESSAGE = frame(SYNC)
FLUSH_MESSAGE = frame(FLUSH)
TERMINATE_MESSAGE = frame(TERMINATE)


# ---------------------------------------------------------------------------------------------
# Backend messages


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter codes."""
    cur = Cursor(payload, "ErrorResponse")
    fields: dict[str, str] = {}
    while True:
        code = cur.byte()
        if code == 0:
            break
        fields[chr(code)] = cur.cstring()
    return fields


def error_from_fields(fields: dict[str, str]) -> PgError:
    return PgError(
        fields.get("C", "XX000"),
        fields.get("M", "unknown error"),
        severity=fields.get("V", fields.get("S", "ERROR")),
        detail=fields.get("D"),
        hint=fields.get("H"),
    )


def encode_error(err: PgError, *, notice: bool = False) -> bytes:
    parts = [
        b"S" + cstr(err.severity),
        b"V" + cstr(err.severity),
        b"C" + cstr(err.sqlstate),
        b"M" + cstr(err.message),
    ]
    if err.detail:
        parts.append(b"D" + cstr(err.detail))
    if err.hint:
        parts.append(b"H" + cstr(err.hint))
    return frame(NOTICE_RESPONSE if notice else ERROR_RESPONSE, b"".join(parts) + b"\0")


def parse_command_tag(payload: bytes) -> str:
    return Cursor(payload, "CommandComplete").cstring()


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    cur = Cursor(payload, "ParameterStatus")
    return cur.cstring(), cur.cstring()


def parse_backend_key(payload: bytes) -> tuple[int, int]:
    cur = Cursor(payload, "BackendKeyData")
    return cur.int32(), cur.int32()


def encode_auth(code: int, data: bytes = b"") -> bytes:
    return frame(AUTHENTICATION, _I32.pack(code) + data)


def encode_parameter_status(name: str, value: str) -> bytes:
    return frame(PARAMETER_STATUS, cstr(name) + cstr(value))


def encode_backend_key(pid: int, secret: int) -> bytes:
    return frame(BACKEND_KEY_DATA, _I32.pack(pid) + _I32.pack(secret))


def encode_ready(status: int) -> bytes:
    return frame(READY_FOR_QUERY, bytes((status,)))


def encode_command_complete(tag: str) -> bytes:
    return frame(COMMAND_COMPLETE, cstr(tag))


def encode_row_description(columns: Iterable[str]) -> bytes:
    """A RowDescription of text columns (type oid 25), as the admin console returns."""
    cols = list(columns)
    body = _I16.pack(len(cols))
    for name in cols:
        body += cstr(name) + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return frame(ROW_DESCRIPTION, body)


def encode_data_row(values: Iterable[str | None]) -> bytes:
    vals = list(values)
    body = _I16.pack(len(vals))
    for v in vals:
        if v is None:
            body += _I32.pack(-1)
        else:
            b = v.encode()
            body += _I32.pack(len(b)) + b
    return frame(DATA_ROW, body)


def parse_data_row(payload: bytes) -> list[str | None]:
    """A DataRow in text format (the router's own queries only: client rows are never decoded)."""
    n = int.from_bytes(payload[0:2], "big")
    pos = 2
    out: list[str | None] = []
    for _ in range(n):
        size = int.from_bytes(payload[pos : pos + 4], "big", signed=True)
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(payload[pos : pos + size].decode())
            pos += size
    return out


def encode_password(data: bytes) -> bytes:
    return frame(PASSWORD, data)


def encode_sasl_initial(mechanism: str, data: bytes) -> bytes:
    return frame(PASSWORD, cstr(mechanism) + _I32.pack(len(data)) + data)


def parse_sasl_initial(payload: bytes) -> tuple[str, bytes]:
    cur = Cursor(payload, "SASLInitialResponse")
    mech = cur.cstring()
    n = cur.int32()
    data = b"" if n == -1 else cur.raw(n)
    cur.end()
    return mech, data


def parse_password(payload: bytes) -> str:
    cur = Cursor(payload, "PasswordMessage")
    pw = cur.cstring()
    cur.end()
    return pw


def parse_auth_request(payload: bytes) -> tuple[int, bytes]:
    cur = Cursor(payload, "Authentication")
    return cur.int32(), cur.rest()


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode("utf-8", "surrogateescape") for m in data.split(b"\0") if m]
