#!/usr/bin/env python3
"""What any Python router can reach on this machine: the least a proxy must do, and nothing else.

Two bare proxies, as fast as Python with uvloop goes, to measure beside the router
(`bench.py --targets direct,relay,fanout,router,pgpool`):

- ``relay``: one node behind it; bytes are copied both ways without looking at them. No
  router can serve reads faster than this (it must at least do this much).
- ``fanout``: three nodes behind it; the least a router that replicates with a two-phase
  commit does for the simple query protocol. Each Query goes to the lead, then to the
  others at once, and the lead's answer is relayed when all answered (a SELECT goes to the
  lead only, BEGIN rides along with the next statement); END or COMMIT becomes PREPARE
  TRANSACTION on every node, then COMMIT PREPARED on the others and last on the lead. No
  vote, no durable decision, no SQL analysis (so no fixing of node-dependent values such as
  CURRENT_TIMESTAMP), no failure handling: not a router, a bound.

Both accept trust authentication only and run WORKERS processes on one port
(SO_REUSEPORT), like the router's workers.

    python bench/ceiling.py relay  --port 7000 --node /tmp:5432 [--workers 2]
    python bench/ceiling.py fanout --port 7001 --node /tmp:5433 --node /tmp:5434 --node ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import struct
import sys

import uvloop

_READY = ord("Z")
_QUERY = ord("Q")
_TERMINATE = ord("X")


def _node_address(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host, int(port)


async def _open(spec: str, protocol: asyncio.Protocol) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    host, port = _node_address(spec)
    if host.startswith("/"):
        path = os.path.join(host, f".s.PGSQL.{port}")
        transport, _ = await loop.create_unix_connection(lambda: protocol, path)
    else:
        transport, _ = await loop.create_connection(lambda: protocol, host, port)
    return transport


# -- relay: copy bytes ------------------------------------------------------------------------


class _Pipe(asyncio.Protocol):
    """One direction's sink: what arrives here is written to ``peer``."""

    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class _RelayClient(_Pipe):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        backend = _Pipe()
        assert self.transport is not None
        try:
            node = await _open(self.node, backend)
        except OSError:
            self.transport.close()
            return
        backend.peer = self.transport
        self.peer = node
        for chunk in self.early:
            node.write(chunk)
        self.early.clear()


# -- fanout: replicate with a two-phase commit ------------------------------------------------


class _Node(asyncio.Protocol):
    """A node connection that collects whole answers up to a number of ReadyForQuery."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.scan = 0  # where the next unread message starts in buf
        self.want = 0  # ReadyForQuery messages still owed
        self.done: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def ask(self, data: bytes, answers: int) -> asyncio.Future[bytes]:
        assert self.transport is not None
        self.want = answers
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.done

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = self.scan, len(buf)
        while n - pos >= 5:
            end = pos + 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if end > n:
                break
            if buf[pos] == _READY:
                self.want -= 1
                if self.want == 0:
                    answer = bytes(buf[:end])
                    del buf[:end]
                    pos, n = 0, len(buf)
                    if self.done is not None and not self.done.done():
                        self.done.set_result(answer)
                    continue
            pos = end
        self.scan = pos

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("node lost"))


def _query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


_COMMIT_REPLY = b"C\0\0\0\x0bCOMMIT\0Z\0\0\0\x05I"
_BEGIN_REPLY = b"C\0\0\0\x0aBEGIN\0Z\0\0\0\x05T"


class _FanoutClient(asyncio.Protocol):
    _gids = itertools.count()

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.more = asyncio.Event()
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.more.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.more.set()

    async def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.gone:
                raise ConnectionError("client gone")
            self.more.clear()
            await self.more.wait()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _serve(self) -> None:
        client = self.transport
        assert client is not None
        nodes: list[_Node] = []
        try:
            while True:
                (length,) = struct.unpack("!I", await self._take(4))
                startup = struct.pack("!I", length) + await self._take(length - 4)
                if startup[4:8] in (b"\x04\xd2\x16\x2f", b"\x04\xd2\x16\x30"):  # SSL / GSS
                    client.write(b"N")
                    continue
                break
            for spec in self.nodes:
                node = _Node()
                await _open(spec, node)
                nodes.append(node)
            greetings = await asyncio.gather(*(n.ask(startup, 1) for n in nodes))
            client.write(greetings[0])
            lead, others = nodes[0], nodes[1:]
            begin = b""
            began: set[_Node] = set()  # the nodes that got the transaction's BEGIN

            async def run(node: _Node, msg: bytes) -> bytes:
                if begin and node not in began:
                    began.add(node)
                    answer = await node.ask(begin + msg, 2)
                    return answer[answer.index(b"Z\0\0\0\x05") + 6 :]  # BEGIN's answer off
                return await node.ask(msg, 1)

            while True:
                head = await self._take(5)
                msg = head + await self._take(int.from_bytes(head[1:5], "big") - 4)
                if head[0] == _TERMINATE:
                    return
                if head[0] != _QUERY:
                    raise ConnectionError("fanout serves the simple query protocol only")
                word = msg[5:].lstrip()[:6].upper()
                if word.startswith(b"BEGIN"):
                    begin = msg
                    began.clear()
                    client.write(_BEGIN_REPLY)
                elif word.startswith((b"END", b"COMMIT")):
                    if began:
                        gid = f"ceiling_{os.getpid()}_{next(self._gids)}"
                        prepare = _query(f"PREPARE TRANSACTION '{gid}'")
                        await asyncio.gather(*(n.ask(prepare, 1) for n in began))
                        finish = _query(f"COMMIT PREPARED '{gid}'")
                        await asyncio.gather(*(n.ask(finish, 1) for n in began if n is not lead))
                        if lead in began:
                            await lead.ask(finish, 1)
                    begin = b""
                    began.clear()
                    client.write(_COMMIT_REPLY)
                elif word.startswith(b"SELECT"):
                    client.write(await run(lead, msg))
                else:
                    answer = await run(lead, msg)
                    await asyncio.gather(*(run(n, msg) for n in others))
                    client.write(answer)
        except (ConnectionError, OSError):
            pass
        finally:
            client.close()
            for n in nodes:
                if n.transport is not None:
                    n.transport.close()


# -- serving ----------------------------------------------------------------------------------


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(256)
    return sock


def _serve_forever(args: argparse.Namespace) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def factory() -> asyncio.Protocol:
            if args.mode == "relay":
                return _RelayClient(args.node[0])
            return _FanoutClient(args.node)

        server = await loop.create_server(factory, sock=_listen(args.port))
        await stop.wait()
        server.close()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("mode", choices=("relay", "fanout"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--node", action="append", required=True, help="HOST:PORT or SOCKETDIR:PORT")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            _serve_forever(args)
            os._exit(0)
        children.append(pid)
    try:
        _serve_forever(args)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
