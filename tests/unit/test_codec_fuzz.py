"""Property tests: hostile bytes never crash the codec; valid messages survive any chunking."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgquorum.protocol.errors import PgError, ProtocolViolation
from pgquorum.protocol.framing import Framer
from pgquorum.protocol.messages import (
    PROTOCOL_3_0,
    Parse,
    cstr,
    encode_auth,
    encode_backend_key,
    encode_close,
    encode_command_complete,
    encode_data_row,
    encode_error,
    encode_parameter_status,
    encode_parse,
    encode_password,
    encode_query,
    encode_row_description,
    encode_sasl_initial,
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

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------------------------
# Strategies


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """data split at the given positions (taken modulo len+1, sorted)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)

# Text without NUL: the protocol's strings are NUL-terminated and cannot contain one.
text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=40)

i16 = st.integers(-(2**15), 2**15 - 1).map(lambda v: struct.pack("!h", v))
i32 = st.integers(-(2**31), 2**31 - 1).map(lambda v: struct.pack("!i", v))
small_i16 = st.integers(-2, 4).map(lambda v: struct.pack("!h", v))
small_i32 = st.integers(-3, 8).map(lambda v: struct.pack("!i", v))

# Payloads built from the pieces real messages are made of, so the parsers get past their first
# field far more often than with uniform random bytes.
pieces = st.one_of(
    st.binary(max_size=8),
    st.sampled_from([b"\0", b"S", b"P", b"\xff", b"\xc3", b"M", b"C"]),
    text.map(cstr),
    small_i16,
    small_i32,
    i16,
    i32,
)
structured = st.lists(pieces, max_size=12).map(b"".join)
payloads = st.one_of(st.binary(max_size=200), structured)

PARSERS: list[Callable[[bytes], Any]] = [
    parse_startup,
    parse_query,
    parse_parse,
    parse_bind,
    parse_describe,
    parse_close,
    parse_execute,
    parse_error_fields,
    parse_command_tag,
    parse_parameter_status,
    parse_backend_key,
    parse_sasl_initial,
    parse_password,
    parse_auth_request,
]


# ---------------------------------------------------------------------------------------------
# Hostile input


@FUZZ
@given(data=st.binary(max_size=400), cut_at=cuts, max_size=st.integers(4, 300))
def test_framer_random_bytes(data: bytes, cut_at: list[int], max_size: int) -> None:
    f = Framer(max_size=max_size)
    try:
        for piece in chunked(data, cut_at):
            f.feed(piece)
            while (m := f.next_message()) is not None:
                mtype, payload = m
                assert 0 <= mtype <= 255
                assert len(payload) + 4 <= max_size
    except ProtocolViolation:
        pass


@FUZZ
@given(data=st.binary(max_size=400), cut_at=cuts)
def test_framer_random_bytes_after_startup(data: bytes, cut_at: list[int]) -> None:
    f = Framer()
    started = False
    try:
        for piece in chunked(data, cut_at):
            f.feed(piece)
            if not started:
                payload = f.next_startup()
                if payload is None:
                    continue
                started = True
                assert 4 <= len(payload) <= 10_000 - 4
            while f.next_message() is not None:
                pass
    except ProtocolViolation:
        pass


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.__name__)
@FUZZ
@given(payload=payloads)
def test_parsers_raise_only_pgerror(parser: Callable[[bytes], Any], payload: bytes) -> None:
    with contextlib.suppress(PgError):
        parser(payload)


@FUZZ
@given(body=structured)
def test_startup_with_valid_code_raises_only_pgerror(body: bytes) -> None:
    with contextlib.suppress(PgError):
        parse_startup(struct.pack("!i", PROTOCOL_3_0) + body)


@FUZZ
@given(payload=payloads)
def test_parse_sasl_mechanisms_raises_only_pgerror(payload: bytes) -> None:
    with contextlib.suppress(PgError):
        parse_sasl_mechanisms(payload)


@FUZZ
@given(payload=payloads)
def test_error_fields_to_error(payload: bytes) -> None:
    try:
        fields = parse_error_fields(payload)
    except ProtocolViolation:
        return
    err = error_from_fields(fields)
    assert isinstance(err, PgError)


# ---------------------------------------------------------------------------------------------
# Valid messages through the framer


message_types = st.integers(0, 255)
frames = st.lists(st.tuples(message_types, st.binary(max_size=300)), max_size=12)


@FUZZ
@given(messages=frames, cut_at=cuts)
def test_valid_frames_round_trip_any_chunking(
    messages: list[tuple[int, bytes]], cut_at: list[int]
) -> None:
    stream = b"".join(frame(t, p) for t, p in messages)
    f = Framer(max_size=304)
    got: list[tuple[int, bytes]] = []
    for piece in chunked(stream, cut_at):
        f.feed(piece)
        while (m := f.next_message()) is not None:
            got.append(m)
    assert got == messages
    assert f.buffered == 0


params = st.dictionaries(text.filter(bool), text, max_size=5)


@FUZZ
@given(startup=params, user=text, messages=frames, cut_at=cuts)
def test_startup_then_frames_any_chunking(
    startup: dict[str, str], user: str, messages: list[tuple[int, bytes]], cut_at: list[int]
) -> None:
    startup = {**startup, "user": user or "u"}
    stream = encode_startup(startup) + b"".join(frame(t, p) for t, p in messages)
    f = Framer()
    payload = None
    got: list[tuple[int, bytes]] = []
    for piece in chunked(stream, cut_at):
        f.feed(piece)
        if payload is None:
            payload = f.next_startup()
            if payload is None:
                continue
        while (m := f.next_message()) is not None:
            got.append(m)
    assert payload is not None
    parsed = parse_startup(payload)
    assert getattr(parsed, "params", None) == startup
    assert got == messages


def encoded_messages() -> st.SearchStrategy[tuple[bytes, Callable[[bytes], Any], Any]]:
    """(message bytes, parser for its payload, expected result) for the encode_* helpers."""
    oids = st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5)
    return st.one_of(
        text.map(lambda q: (encode_query(q), parse_query, q)),
        st.tuples(text, text, oids).map(
            lambda a: (encode_parse(a[0], a[1], a[2]), parse_parse, Parse(a[0], a[1], tuple(a[2])))
        ),
        st.tuples(st.sampled_from("SP"), text).map(
            lambda a: (encode_close(*a), parse_close, (a[0], a[1]))
        ),
        text.map(lambda s: (encode_command_complete(s), parse_command_tag, s)),
        st.tuples(text, text).map(
            lambda a: (encode_parameter_status(*a), parse_parameter_status, a)
        ),
        st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)).map(
            lambda a: (encode_backend_key(*a), parse_backend_key, a)
        ),
        text.map(lambda s: (encode_password(cstr(s)), parse_password, s)),
        st.tuples(text, st.binary(max_size=50)).map(
            lambda a: (encode_sasl_initial(*a), parse_sasl_initial, a)
        ),
        st.tuples(st.integers(0, 12), st.binary(max_size=20)).map(
            lambda a: (encode_auth(*a), parse_auth_request, a)
        ),
        st.tuples(
            st.text("0123456789ABCDEFP", min_size=5, max_size=5),
            text,
            st.sampled_from(["ERROR", "FATAL", "NOTICE"]),
            st.none() | text.filter(bool),
            st.none() | text.filter(bool),
        ).map(
            lambda a: (
                encode_error(PgError(a[0], a[1], severity=a[2], detail=a[3], hint=a[4])),
                lambda p: _error_tuple(error_from_fields(parse_error_fields(p))),
                a,
            )
        ),
    )


def _error_tuple(err: PgError) -> tuple[str, str, str, str | None, str | None]:
    return err.sqlstate, err.message, err.severity, err.detail, err.hint


def _normalize(parsed: Any) -> Any:
    # Close decodes to a dataclass; compare it as (kind, name).
    if type(parsed).__name__ == "Close":
        return (parsed.kind, parsed.name)
    return parsed


@FUZZ
@given(items=st.lists(encoded_messages(), min_size=1, max_size=6), cut_at=cuts)
def test_encoded_messages_round_trip_any_chunking(
    items: list[tuple[bytes, Callable[[bytes], Any], Any]], cut_at: list[int]
) -> None:
    stream = b"".join(message for message, _, _ in items)
    f = Framer()
    got: list[tuple[int, bytes]] = []
    for piece in chunked(stream, cut_at):
        f.feed(piece)
        while (m := f.next_message()) is not None:
            got.append(m)
    assert len(got) == len(items)
    for (mtype, payload), (message, parser, expected) in zip(got, items, strict=True):
        assert mtype == message[0]
        assert _normalize(parser(payload)) == expected


def _decode_data_row(payload: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!h", payload)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (size,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if size == -1:
            values.append(None)
        else:
            values.append(payload[pos : pos + size].decode())
            pos += size
    assert pos == len(payload)
    return values


def _decode_row_description(payload: bytes) -> list[str]:
    (count,) = struct.unpack_from("!h", payload)
    pos = 2
    names: list[str] = []
    for _ in range(count):
        end = payload.index(b"\0", pos)
        names.append(payload[pos:end].decode())
        assert struct.unpack_from("!ihihih", payload, end + 1) == (0, 0, 25, -1, -1, 0)
        pos = end + 1 + 18
    assert pos == len(payload)
    return names


@FUZZ
@given(
    columns=st.lists(text, max_size=6),
    values=st.lists(st.none() | text, max_size=6),
    cut_at=cuts,
)
def test_row_messages_round_trip(
    columns: list[str], values: list[str | None], cut_at: list[int]
) -> None:
    stream = encode_row_description(columns) + encode_data_row(values)
    f = Framer()
    got: list[tuple[int, bytes]] = []
    for piece in chunked(stream, cut_at):
        f.feed(piece)
        while (m := f.next_message()) is not None:
            got.append(m)
    (t_type, t_payload), (d_type, d_payload) = got
    assert (t_type, d_type) == (ord("T"), ord("D"))
    assert _decode_row_description(t_payload) == columns
    assert _decode_data_row(d_payload) == values
