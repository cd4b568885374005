"""Decoding and encoding of protocol messages (messages.py) and stream framing (framing.py)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from pgquorum.protocol import messages as m
from pgquorum.protocol.errors import PgError, ProtocolViolation
from pgquorum.protocol.framing import DEFAULT_MAX_MESSAGE_SIZE, MAX_STARTUP_SIZE, Framer
from pgquorum.protocol.messages import (
    AUTH_MD5,
    AUTH_OK,
    AUTHENTICATION,
    BACKEND_KEY_DATA,
    CANCEL_REQUEST_CODE,
    CLOSE,
    COMMAND_COMPLETE,
    DATA_ROW,
    ERROR_RESPONSE,
    FLUSH,
    FLUSH_MESSAGE,
    GSSENC_REQUEST_CODE,
    NOTICE_RESPONSE,
    PARAMETER_STATUS,
    PARSE,
    PASSWORD,
    PROTOCOL_3_0,
    QUERY,
    READY_FOR_QUERY,
    ROW_DESCRIPTION,
    SSL_REQUEST_CODE,
    SYNC,
    SYNC_MESSAGE,
    TERMINATE,
    TERMINATE_MESSAGE,
    Bind,
    CancelRequest,
    Close,
    Describe,
    Execute,
    GSSENCRequest,
    Parse,
    SSLRequest,
    StartupMessage,
    cstr,
    encode_auth,
    encode_backend_key,
    encode_cancel_request,
    encode_close,
    encode_command_complete,
    encode_data_row,
    encode_error,
    encode_parameter_status,
    encode_parse,
    encode_password,
    encode_query,
    encode_ready,
    encode_row_description,
    encode_sasl_initial,
    encode_ssl_request,
    encode_startup,
    error_from_fields,
    frame,
    parse_auth_request,
    parse_backend_key,
    parse_bind,
    parse_close,
    parse_command_tag,
    parse_describe,
    parse_error_fields,
    parse_execute,
    parse_parameter_status,
    parse_parse,
    parse_password,
    parse_query,
    parse_sasl_initial,
    parse_sasl_mechanisms,
    parse_startup,
)

i16 = struct.Struct("!h").pack
i32 = struct.Struct("!i").pack


def split(message: bytes) -> tuple[int, bytes]:
    """(type, payload) of one whole typed message, checking its length field."""
    f = Framer()
    f.feed(message)
    got = f.next_message()
    assert got is not None and f.buffered == 0
    return got


def payload_of(message: bytes) -> bytes:
    return split(message)[1]


def bind_payload(
    portal: str = "p1",
    statement: str = "s1",
    formats: tuple[int, ...] = (0, 1),
    params: tuple[bytes | None, ...] = (b"42", None, b""),
    results: tuple[int, ...] = (1,),
) -> bytes:
    body = cstr(portal) + cstr(statement) + i16(len(formats))
    body += b"".join(i16(f) for f in formats) + i16(len(params))
    for p in params:
        body += i32(-1) if p is None else i32(len(p)) + p
    return body + i16(len(results)) + b"".join(i16(f) for f in results)


# ---------------------------------------------------------------------------------------------
# Startup phase


def startup_payload(packet: bytes) -> bytes:
    f = Framer()
    f.feed(packet)
    payload = f.next_startup()
    assert payload is not None and f.buffered == 0
    return payload


def test_startup_message() -> None:
    packet = encode_startup({"user": "alice", "database": "shop", "application_name": "psql"})
    msg = parse_startup(startup_payload(packet))
    assert msg == StartupMessage({"user": "alice", "database": "shop", "application_name": "psql"})
    assert isinstance(msg, StartupMessage)
    assert msg.user == "alice" and msg.database == "shop"


def test_startup_database_defaults_to_user() -> None:
    msg = parse_startup(startup_payload(encode_startup({"user": "bob"})))
    assert isinstance(msg, StartupMessage)
    assert msg.database == "bob"
    msg = parse_startup(startup_payload(encode_startup({"user": "bob", "database": ""})))
    assert isinstance(msg, StartupMessage)
    assert msg.database == "bob"


def test_startup_non_ascii_params() -> None:
    msg = parse_startup(startup_payload(encode_startup({"user": "zoë", "options": "-c x=ü"})))
    assert isinstance(msg, StartupMessage)
    assert msg.user == "zoë" and msg.params["options"] == "-c x=ü"


def test_ssl_gssenc_cancel_requests() -> None:
    assert parse_startup(startup_payload(encode_ssl_request())) == SSLRequest()
    assert parse_startup(i32(GSSENC_REQUEST_CODE)) == GSSENCRequest()
    cancel = parse_startup(startup_payload(encode_cancel_request(1234, -5678)))
    assert cancel == CancelRequest(1234, -5678)


@pytest.mark.parametrize(
    "payload",
    [
        i32(SSL_REQUEST_CODE) + b"\0",
        i32(GSSENC_REQUEST_CODE) + b"x",
        i32(CANCEL_REQUEST_CODE) + i32(1),
        i32(CANCEL_REQUEST_CODE) + i32(1) + i32(2) + b"\0",
    ],
)
def test_special_requests_with_wrong_length(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_startup(payload)


@pytest.mark.parametrize(
    ("version", "shown"), [(2 << 16, "2.0"), (4 << 16, "4.0"), ((1 << 16) | 7, "1.7")]
)
def test_unsupported_protocol_version(version: int, shown: str) -> None:
    with pytest.raises(PgError) as excinfo:
        parse_startup(i32(version) + cstr("user") + cstr("u") + b"\0")
    err = excinfo.value
    assert not isinstance(err, ProtocolViolation)
    assert err.sqlstate == "0A000" and err.fatal
    assert f"unsupported frontend protocol {shown}" in err.message
    assert "3.0" in err.message


def test_missing_user() -> None:
    with pytest.raises(PgError) as excinfo:
        parse_startup(i32(PROTOCOL_3_0) + cstr("database") + cstr("db") + b"\0")
    err = excinfo.value
    assert err.sqlstate == "28000" and err.fatal
    assert err.message == "no PostgreSQL user name specified in startup packet"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\x03",
        i32(PROTOCOL_3_0),  # no terminator at all
        i32(PROTOCOL_3_0) + b"user\0alice\0",  # no final terminator
        i32(PROTOCOL_3_0) + b"user\0alice",  # unterminated value
        i32(PROTOCOL_3_0) + b"user\0alice\0\0junk",  # trailing bytes
    ],
)
def test_malformed_startup(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_startup(payload)


@pytest.mark.parametrize("length", [0, 4, 7, MAX_STARTUP_SIZE + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_startup_length_out_of_range(length: int) -> None:
    f = Framer()
    f.feed(length.to_bytes(4, "big") + bytes(8))
    with pytest.raises(ProtocolViolation, match=f"invalid length of startup packet: {length}"):
        f.next_startup()


def test_startup_length_limit_is_inclusive() -> None:
    f = Framer()
    f.feed(MAX_STARTUP_SIZE.to_bytes(4, "big"))
    assert f.next_startup() is None  # length accepted, body still missing
    f.feed(bytes(MAX_STARTUP_SIZE - 4))
    payload = f.next_startup()
    assert payload is not None and len(payload) == MAX_STARTUP_SIZE - 4


def test_startup_then_messages_in_one_read() -> None:
    stream = encode_startup({"user": "u"}) + encode_query("select 1") + TERMINATE_MESSAGE
    f = Framer()
    f.feed(stream)
    assert f.next_startup() == encode_startup({"user": "u"})[4:]
    assert f.next_message() == (QUERY, b"select 1\0")
    assert f.next_message() == (TERMINATE, b"")
    assert f.next_message() is None
    assert f.buffered == 0


def test_ssl_request_then_take_rest() -> None:
    """Bytes after an SSLRequest belong to the TLS handshake, not to the framer."""
    f = Framer()
    f.feed(encode_ssl_request() + b"\x16\x03\x01hello")
    assert f.next_startup() == i32(SSL_REQUEST_CODE)
    assert f.take_rest() == b"\x16\x03\x01hello"
    assert f.buffered == 0
    assert f.next_message() is None


# ---------------------------------------------------------------------------------------------
# Framer


STREAM_MESSAGES = [
    encode_query("select 'é'"),
    SYNC_MESSAGE,
    encode_parse("stmt", "select $1", [23]),
    frame(ord("B"), bind_payload()),
    FLUSH_MESSAGE,
    encode_data_row(["x" * 300, None]),
    TERMINATE_MESSAGE,
]


def expected_frames() -> list[tuple[int, bytes]]:
    return [split(m) for m in STREAM_MESSAGES]


def drain(f: Framer) -> list[tuple[int, bytes]]:
    out = []
    while (m := f.next_message()) is not None:
        out.append(m)
    return out


def test_framer_one_byte_at_a_time() -> None:
    stream = b"".join(STREAM_MESSAGES)
    f = Framer()
    got: list[tuple[int, bytes]] = []
    for i in range(len(stream)):
        f.feed(stream[i : i + 1])
        got += drain(f)
    assert got == expected_frames()
    assert f.buffered == 0


def test_framer_split_at_every_position() -> None:
    stream = b"".join(STREAM_MESSAGES)
    for cut in range(len(stream) + 1):
        f = Framer()
        f.feed(stream[:cut])
        got = drain(f)
        f.feed(stream[cut:])
        got += drain(f)
        assert got == expected_frames(), cut


def test_framer_startup_one_byte_at_a_time() -> None:
    packet = encode_startup({"user": "alice", "database": "db"})
    f = Framer()
    for i, byte in enumerate(packet):
        assert f.next_startup() is None
        f.feed(bytes((byte,)))
        got = f.next_startup()
        if i < len(packet) - 1:
            assert got is None
    assert got == packet[4:]


def test_framer_returns_none_until_complete() -> None:
    f = Framer()
    assert f.next_message() is None
    f.feed(b"Q\0\0")
    assert f.next_message() is None
    f.feed(b"\0\x0bselect")
    assert f.next_message() is None
    assert f.buffered == 11
    f.feed(b"\0")
    assert f.next_message() == (QUERY, b"select\0")


@pytest.mark.parametrize("length", [0, 1, 3])
def test_framer_length_below_four(length: int) -> None:
    f = Framer()
    f.feed(b"Q" + i32(length))
    with pytest.raises(ProtocolViolation, match=f"invalid message length {length}"):
        f.next_message()


def test_framer_oversized_message_fails_on_header() -> None:
    """The limit is checked as soon as the header is in, before buffering the body."""
    f = Framer(max_size=1000)
    f.feed(b"Q" + i32(1001))
    with pytest.raises(ProtocolViolation) as excinfo:
        f.next_message()
    msg = excinfo.value.message
    assert msg == "message of type 'Q' is 1001 bytes, over the limit of 1000 bytes"
    assert excinfo.value.sqlstate == "08P01" and excinfo.value.fatal


def test_framer_limit_is_inclusive() -> None:
    f = Framer(max_size=100)
    body = b"x" * 96
    f.feed(b"d" + i32(100) + body)
    assert f.next_message() == (ord("d"), body)


def test_framer_default_limit() -> None:
    f = Framer()
    assert f.max_size == DEFAULT_MAX_MESSAGE_SIZE
    f.feed(b"d" + i32(DEFAULT_MAX_MESSAGE_SIZE + 1))
    with pytest.raises(ProtocolViolation, match="over the limit"):
        f.next_message()


def test_framer_huge_unsigned_length() -> None:
    f = Framer()
    f.feed(b"Q\xff\xff\xff\xff")
    with pytest.raises(ProtocolViolation):
        f.next_message()


def test_framer_keeps_bytes_after_message() -> None:
    f = Framer()
    f.feed(SYNC_MESSAGE + b"Q\0")
    assert f.next_message() == (SYNC, b"")
    assert f.buffered == 2
    assert f.take_rest() == b"Q\0"


def test_framer_many_messages_compacts() -> None:
    f = Framer()
    for _ in range(1000):
        f.feed(SYNC_MESSAGE + FLUSH_MESSAGE)
        assert drain(f) == [(SYNC, b""), (FLUSH, b"")]
    assert f.buffered == 0


# ---------------------------------------------------------------------------------------------
# Frontend messages


def test_query_round_trip() -> None:
    message = encode_query("select 'ünï'")
    assert message[:1] == b"Q"
    assert parse_query(payload_of(message)) == "select 'ünï'"


def test_parse_round_trip() -> None:
    t, payload = split(encode_parse("s1", "select $1, $2", [23, 25]))
    assert t == PARSE
    assert parse_parse(payload) == Parse("s1", "select $1, $2", (23, 25))
    assert parse_parse(payload_of(encode_parse("", "select 1"))) == Parse("", "select 1", ())


def test_parse_negative_count() -> None:
    with pytest.raises(ProtocolViolation, match="negative parameter count"):
        parse_parse(cstr("") + cstr("q") + i16(-1))


def test_bind() -> None:
    assert parse_bind(bind_payload()) == Bind("p1", "s1")
    assert parse_bind(bind_payload("", "", (), (), ())) == Bind("", "")


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (cstr("") + cstr("") + i16(-1), "negative format count"),
        (cstr("") + cstr("") + i16(0) + i16(-1), "negative parameter count"),
        (cstr("") + cstr("") + i16(0) + i16(1) + i32(-2), "bad parameter length"),
        (cstr("") + cstr("") + i16(0) + i16(0) + i16(-3), "negative result format count"),
        (cstr("") + cstr("") + i16(0) + i16(1) + i32(10) + b"short", "too short"),
        (bind_payload() + b"x", "trailing bytes"),
    ],
)
def test_bind_malformed(payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        parse_bind(payload)


def test_describe_close_execute() -> None:
    assert parse_describe(b"S" + cstr("st")) == Describe("S", "st")
    assert parse_describe(b"P" + cstr("")) == Describe("P", "")
    t, payload = split(encode_close("S", "st"))
    assert t == CLOSE and parse_close(payload) == Close("S", "st")
    assert parse_close(b"P" + cstr("portal")) == Close("P", "portal")
    assert parse_execute(cstr("portal") + i32(100)) == Execute("portal", 100)
    assert parse_execute(cstr("") + i32(0)) == Execute("", 0)


@pytest.mark.parametrize("parser", [parse_describe, parse_close])
@pytest.mark.parametrize("kind", [b"X", b"s", b"\0", b"\xff"])
def test_describe_close_bad_kind(parser: Callable[[bytes], Any], kind: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="subtype"):
        parser(kind + cstr("x"))


def test_password_and_sasl_initial() -> None:
    t, payload = split(encode_password(cstr("secret")))
    assert t == PASSWORD and parse_password(payload) == "secret"
    payload = payload_of(encode_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert parse_sasl_initial(payload) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert parse_sasl_initial(cstr("M") + i32(-1)) == ("M", b"")
    assert parse_sasl_initial(cstr("M") + i32(0)) == ("M", b"")


@pytest.mark.parametrize(
    "payload",
    [cstr("M") + i32(-2), cstr("M") + i32(5) + b"abcd", cstr("M") + i32(1) + b"ab", b"M"],
)
def test_sasl_initial_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_sasl_initial(payload)


def test_constant_messages() -> None:
    assert SYNC_MESSAGE == b"S\0\0\0\x04"
    assert FLUSH_MESSAGE == b"H\0\0\0\x04"
    assert TERMINATE_MESSAGE == b"X\0\0\0\x04"


# ---------------------------------------------------------------------------------------------
# Backend messages


def test_error_round_trip() -> None:
    err = PgError("23505", "duplicate key", severity="ERROR", detail="Key (id)=(1)", hint="hm")
    t, payload = split(encode_error(err))
    assert t == ERROR_RESPONSE
    fields = parse_error_fields(payload)
    assert fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "23505",
        "M": "duplicate key",
        "D": "Key (id)=(1)",
        "H": "hm",
    }
    back = error_from_fields(fields)
    assert (back.sqlstate, back.message, back.severity, back.detail, back.hint) == (
        "23505",
        "duplicate key",
        "ERROR",
        "Key (id)=(1)",
        "hm",
    )


def test_notice_and_fatal() -> None:
    t, payload = split(encode_error(PgError("01000", "careful", severity="WARNING"), notice=True))
    assert t == NOTICE_RESPONSE
    assert parse_error_fields(payload)["S"] == "WARNING"
    fatal = error_from_fields(parse_error_fields(payload_of(encode_error(ProtocolViolation("x")))))
    assert fatal.fatal and fatal.sqlstate == "08P01"


def test_error_without_optional_fields() -> None:
    fields = parse_error_fields(payload_of(encode_error(PgError("XX000", "boom"))))
    assert set(fields) == {"S", "V", "C", "M"}
    assert error_from_fields({}).sqlstate == "XX000"
    # Servers before 9.6 send no V field; S (possibly localized) is the fallback.
    assert error_from_fields({"S": "FEHLER"}).severity == "FEHLER"


@pytest.mark.parametrize("payload", [b"", b"S", b"SERROR\0", b"SERROR"])
def test_error_fields_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_error_fields(payload)


def test_row_description() -> None:
    t, payload = split(encode_row_description(["name", "välue"]))
    assert t == ROW_DESCRIPTION
    (count,) = struct.unpack_from("!h", payload)
    assert count == 2
    pos = 2
    names = []
    for _ in range(count):
        end = payload.index(b"\0", pos)
        names.append(payload[pos:end].decode())
        table, col, oid, size, mod, fmt = struct.unpack_from("!ihihih", payload, end + 1)
        assert (table, col, oid, size, mod, fmt) == (0, 0, 25, -1, -1, 0)
        pos = end + 1 + 18
    assert pos == len(payload)
    assert names == ["name", "välue"]
    assert payload_of(encode_row_description([])) == i16(0)


def test_data_row() -> None:
    t, payload = split(encode_data_row(["1", None, "", "é"]))
    assert t == DATA_ROW
    assert payload == i16(4) + i32(1) + b"1" + i32(-1) + i32(0) + i32(2) + "é".encode()
    assert payload_of(encode_data_row([])) == i16(0)


def test_simple_backend_messages() -> None:
    assert split(encode_parameter_status("TimeZone", "UTC")) == (
        PARAMETER_STATUS,
        b"TimeZone\0UTC\0",
    )
    assert parse_parameter_status(b"TimeZone\0UTC\0") == ("TimeZone", "UTC")
    t, payload = split(encode_backend_key(42, -7))
    assert t == BACKEND_KEY_DATA and parse_backend_key(payload) == (42, -7)
    t, payload = split(encode_command_complete("INSERT 0 1"))
    assert t == COMMAND_COMPLETE and parse_command_tag(payload) == "INSERT 0 1"
    assert split(encode_ready(ord("T"))) == (READY_FOR_QUERY, b"T")


def test_auth_requests() -> None:
    t, payload = split(encode_auth(AUTH_OK))
    assert t == AUTHENTICATION and parse_auth_request(payload) == (AUTH_OK, b"")
    assert parse_auth_request(payload_of(encode_auth(AUTH_MD5, b"salt"))) == (AUTH_MD5, b"salt")
    assert parse_sasl_mechanisms(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0") == [
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
    ]
    assert parse_sasl_mechanisms(b"") == []


def test_sasl_mechanisms_not_utf8() -> None:
    assert parse_sasl_mechanisms(b"\xff\0\0") == ["\udcff"]


# ---------------------------------------------------------------------------------------------
# Every parser on valid input and on every truncation of it


# (parser, a valid payload, what it decodes to)
VALID: list[tuple[Callable[[bytes], Any], bytes, Any]] = [
    (
        parse_startup,
        encode_startup({"user": "u", "database": "d"})[4:],
        StartupMessage({"user": "u", "database": "d"}),
    ),
    (parse_startup, encode_cancel_request(1, 2)[4:], CancelRequest(1, 2)),
    (parse_query, cstr("select 1"), "select 1"),
    (parse_parse, payload_of(encode_parse("n", "q", [1, 2])), Parse("n", "q", (1, 2))),
    (parse_bind, bind_payload(), Bind("p1", "s1")),
    (parse_describe, b"S" + cstr("x"), Describe("S", "x")),
    (parse_close, b"P" + cstr("x"), Close("P", "x")),
    (parse_execute, cstr("p") + i32(5), Execute("p", 5)),
    (
        parse_error_fields,
        b"SERROR\0C42601\0Msyntax\0\0",
        {"S": "ERROR", "C": "42601", "M": "syntax"},
    ),
    (parse_command_tag, cstr("SELECT 1"), "SELECT 1"),
    (parse_parameter_status, cstr("a") + cstr("b"), ("a", "b")),
    (parse_backend_key, i32(1) + i32(2), (1, 2)),
    (parse_sasl_initial, cstr("M") + i32(3) + b"abc", ("M", b"abc")),
    (parse_password, cstr("pw"), "pw"),
    (parse_auth_request, i32(5) + b"salt", (5, b"salt")),
]

# Parsers for which a shorter payload can still be a valid, different message.
PREFIX_TOLERANT = {parse_auth_request}


@pytest.mark.parametrize(
    ("parser", "payload", "expected"), VALID, ids=lambda v: getattr(v, "__name__", "")
)
def test_parser_valid_and_truncated(
    parser: Callable[[bytes], Any], payload: bytes, expected: Any
) -> None:
    assert parser(payload) == expected
    for cut in range(len(payload)):
        try:
            parser(payload[:cut])
        except ProtocolViolation:
            continue
        except PgError:
            # parse_startup: a truncated protocol code reads as an unsupported version.
            assert parser is parse_startup
            continue
        assert parser in PREFIX_TOLERANT and cut >= 4, (
            f"{parser.__name__} accepted {payload[:cut]!r}"
        )


NOT_UTF8: list[tuple[Callable[[bytes], Any], bytes]] = [
    (parse_startup, i32(PROTOCOL_3_0) + b"user\0\xc3\0\0"),
    (parse_query, b"\xc3\x28\0"),
    (parse_parse, b"\xff\0q\0" + i16(0)),
    (parse_bind, b"\xff\0\0" + i16(0) + i16(0) + i16(0)),
    (parse_describe, b"S\xfe\0"),
    (parse_close, b"P\xfe\0"),
    (parse_execute, b"\xed\xa0\x80\0" + i32(0)),  # an encoded surrogate
    (parse_error_fields, b"M\xff\0\0"),
    (parse_command_tag, b"\xff\0"),
    (parse_parameter_status, b"a\0\xff\0"),
    (parse_sasl_initial, b"\xff\0" + i32(0)),
    (parse_password, b"\xc0\xaf\0"),  # overlong encoding
]


@pytest.mark.parametrize(("parser", "payload"), NOT_UTF8, ids=lambda v: getattr(v, "__name__", ""))
def test_parser_keeps_non_utf8_bytes(parser: Callable[[bytes], Any], payload: bytes) -> None:
    # Clients in another client_encoding send non-UTF-8 text: it must decode (the router
    # forwards the original bytes) and strings must round-trip through cstr unchanged.
    parser(payload)
    raw = payload.split(b"\0")[0].lstrip(b"SP")
    assert cstr(raw.decode("utf-8", "surrogateescape")) == raw + b"\0"


@pytest.mark.parametrize(
    ("parser", "payload"),
    [
        (parse_query, cstr("a") + b"x"),
        (parse_parse, payload_of(encode_parse("n", "q")) + b"\0"),
        (parse_describe, b"S" + cstr("x") + b"\0"),
        (parse_execute, cstr("p") + i32(5) + b"\0"),
        (parse_password, cstr("pw") + b"\0"),
        (parse_sasl_initial, cstr("M") + i32(1) + b"ab"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_parser_rejects_trailing_bytes(parser: Callable[[bytes], Any], payload: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="trailing bytes"):
        parser(payload)


def test_startup_with_empty_user_is_refused() -> None:
    with pytest.raises(PgError) as info:
        parse_startup(i32(PROTOCOL_3_0) + b"user\0\0\0")
    assert info.value.sqlstate == "28000" and info.value.fatal


def test_take_run_returns_whole_messages_of_one_type() -> None:
    data = b"".join(frame(ord("d"), bytes([i]) * i) for i in range(5)) + frame(ord("c"))
    f = Framer()
    f.feed(data[:-3])  # the CopyDone is incomplete
    run = f.take_run(ord("d"))
    assert run == data[: len(data) - 5]
    assert f.take_run(ord("d")) == b""
    f.feed(data[-3:])
    assert f.next_message() == (ord("c"), b"")
    f.feed(frame(ord("d"), b"x")[:4])
    assert f.take_run(ord("d")) == b""  # a partial message stays buffered


def test_bind_text_params() -> None:
    def bind(formats: list[int], values: list[bytes | None]) -> bytes:
        out = b"portal\0stmt\0" + struct.pack("!h", len(formats))
        out += b"".join(struct.pack("!h", f) for f in formats)
        out += struct.pack("!h", len(values))
        for v in values:
            out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
        return out + struct.pack("!h", 0)

    for payload in (bind([], [b"a'b", None]), bind([0], [b"a'b", None])):
        m.parse_bind(payload)  # well formed
        assert m.bind_text_params(payload) == ["a'b", None]
    assert m.bind_text_params(bind([0, 1], [b"x", b"\0\0\0\1"])) is None
    assert m.bind_text_params(bind([1], [b"\0\0\0\1"])) is None
    assert m.bind_text_params(bind([0, 0], [b"x", b"y", b"z"])) is None  # 2 formats, 3 values
    assert m.bind_text_params(bind([], [b"\xff"])) == ["\udcff"]  # kept as its bytes
