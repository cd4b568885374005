"""Splitting a byte stream into protocol frames, with a size limit.

The framer only finds message boundaries; what a message means is for ``messages`` to decode.
"""

from __future__ import annotations

from .errors import ProtocolViolation

# PostgreSQL itself refuses startup packets over 10000 bytes and, for most messages, anything
# over 1 GB. The router holds whole messages in memory, so its default limit is smaller.
MAX_STARTUP_SIZE = 10_000
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class Framer:
    """Sans-IO frame splitter for one direction of one connection.

    ``feed(data)`` appends bytes; ``next_startup()`` returns the payload of an untyped
    startup-phase packet; ``next_message()`` returns ``(type, payload)`` of a typed message.
    Both return None until a whole frame has arrived.
    """

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def take_rest(self) -> bytes:
        """Everything buffered and not yet framed (e.g. bytes that arrived before a TLS switch)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def next_startup(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        length = int.from_bytes(buf[pos : pos + 4], "big")
        if length < 8 or length > MAX_STARTUP_SIZE:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        if len(buf) - pos < length:
            return None
        self._pos = pos + length
        return bytes(buf[pos + 4 : pos + length])

    def next_message(self) -> tuple[int, bytes] | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return None
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        if length > self.max_size:
            raise ProtocolViolation(
                f"message of type {chr(buf[pos])!r} is {length} bytes, over the limit of "
                f"{self.max_size} bytes"
            )
        end = pos + 1 + length
        if len(buf) < end:
            return None
        self._pos = end
        return buf[pos], bytes(buf[pos + 5 : end])

    def take_run(self, mtype: int) -> bytes:
        """The raw bytes of the whole messages of type ``mtype`` at the head of the buffer.

        COPY data arrives as many small CopyData messages; forwarding them as one run keeps
        the per-message work down to finding the boundaries. Anything malformed is left for
        ``next_message`` to report.
        """
        buf, pos = self._buf, self._pos
        start, n, limit = pos, len(buf), self.max_size
        while n - pos >= 5 and buf[pos] == mtype:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            end = pos + 1 + length
            if length < 4 or length > limit or end > n:
                break
            pos = end
        self._pos = pos
        return bytes(buf[start:pos])
