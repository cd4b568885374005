"""NodeConnection.ping: an empty query between units whose answer is swallowed, and a unit
sent before that answer came waits behind it. (Bytes in, no server: the answers are fed.)"""

from __future__ import annotations

import asyncio

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m
from pgquorum.router.backend import EXPECT_QUERY, NodeConnection

IDLE, IN_BLOCK = ord("I"), ord("T")
PING_ANSWER = m.frame(m.EMPTY_QUERY) + m.encode_ready(IN_BLOCK)


class Wire:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def abort(self) -> None:
        pass


def connection() -> tuple[NodeConnection, Wire, list[bytes]]:
    relayed: list[bytes] = []
    conn = NodeConnection(Node("n1", "127.0.0.1", 5432), relayed.append)
    wire = Wire()
    conn.transport = wire  # type: ignore[assignment]
    return conn, wire, relayed


def test_a_ping_answered_between_units_is_swallowed() -> None:
    conn, wire, relayed = connection()
    conn.ping()
    conn.data_received(PING_ANSWER)
    assert wire.sent == [m.encode_query("")]
    assert conn.lost is None and relayed == []


def test_a_unit_sent_before_the_ping_answer_gets_its_own_answer() -> None:
    async def go() -> tuple[list[str], int, list[bytes]]:
        conn, _, relayed = connection()
        conn.ping()
        conn.ping()
        conn.data_received(PING_ANSWER[:6])  # one ping half answered
        conn.send_unit(m.encode_query("UPDATE t SET v = 1"), [EXPECT_QUERY], relay=True)
        conn.data_received(
            PING_ANSWER[6:]
            + PING_ANSWER
            + m.encode_command_complete("UPDATE 1")
            + m.encode_ready(IN_BLOCK)
        )
        res = await conn.wait()
        return res.tags, res.status, relayed

    tags, status, relayed = asyncio.run(go())
    assert status == IN_BLOCK
    # Only the unit's own answer reaches the client, not the pings'.
    assert b"".join(relayed) == m.encode_command_complete("UPDATE 1") + m.encode_ready(IN_BLOCK)
    assert tags == []  # (relayed units are not collected)


def test_no_ping_while_a_unit_runs() -> None:
    async def go() -> list[bytes]:
        conn, wire, _ = connection()
        conn.send_unit(m.encode_query("SELECT 1"), [EXPECT_QUERY], relay=False)
        conn.ping()
        conn.data_received(m.encode_command_complete("SELECT 1") + m.encode_ready(IDLE))
        res = await conn.wait()
        assert res.tags == ["SELECT 1"]
        return wire.sent

    assert asyncio.run(go()) == [m.encode_query("SELECT 1")]
