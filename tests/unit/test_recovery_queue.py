"""The recovery journal and queue: units as a node would be sent them, commit order, JSON."""

from __future__ import annotations

import asyncio
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from pgquorum.cluster.model import Node
from pgquorum.protocol import messages as m
from pgquorum.protocol.errors import OBJECT_NOT_IN_PREREQUISITE_STATE, UNDEFINED_OBJECT, PgError
from pgquorum.recovery import journal as j
from pgquorum.recovery import queue as queue_module
from pgquorum.recovery.journal import Entry, Journal, Unit
from pgquorum.recovery.queue import LocalQueue, QueueGone, QueueUnavailable, RemoteQueue
from pgquorum.router.backend import EXPECT_QUERY, Expectation, NodeLost, UnitResult
from pgquorum.router.session import Statement, _build_batch


def result(
    *tags: str, error: str | None = None, status: int = ord("T"), sent: int = 0
) -> UnitResult:
    res = UnitResult()
    res.sent = sent
    res.tags = list(tags)
    res.error = error
    res.status = status
    return res


def query(sql: str):  # type: ignore[no-untyped-def]
    data = m.encode_query(sql)
    return lambda conn: (data, [EXPECT_QUERY])


def test_deferred_begin_goes_with_the_first_write_and_commit_is_added() -> None:
    journal = Journal()
    journal.begin(m.encode_query("BEGIN ISOLATION LEVEL SERIALIZABLE"))
    journal.record(query("UPDATE t SET v = 1"), result("UPDATE 1"))
    journal.record(query("DELETE FROM t"), result("DELETE 3"))
    units = journal.take(commit=True)
    assert [u.data for u in units] == [
        m.encode_query("BEGIN ISOLATION LEVEL SERIALIZABLE") + m.encode_query("UPDATE t SET v = 1"),
        m.encode_query("DELETE FROM t"),
        m.encode_query("COMMIT"),
    ]
    assert units[0].outcome == ["UPDATE 1"] and len(units[0].expect) == 2
    assert journal.take(commit=True) == []  # taken: nothing left


def test_a_transaction_the_client_ended_gets_nothing_added() -> None:
    journal = Journal()
    journal.record(query("BEGIN; INSERT INTO t VALUES (1); COMMIT"), result(status=ord("I")))
    assert [u.data for u in journal.take(commit=False)] == [
        m.encode_query("BEGIN; INSERT INTO t VALUES (1); COMMIT")
    ]


def test_prepared_statements_are_parsed_once_for_the_replay_connection() -> None:
    journal = Journal()
    parse = m.encode_parse("s1", "INSERT INTO t VALUES ($1)", [23])
    stmt = Statement(m.parse_parse(parse[5:]), parse, None, 1)  # type: ignore[arg-type]
    bind = m.frame(m.BIND, b"\0s1\0\0\0\0\0\0\0")
    batch = [(m.BIND, bind[5:], stmt), (m.EXECUTE, b"\0\0\0\0\0", None), (m.SYNC, b"", None)]
    build = lambda conn: _build_batch(conn, list(batch))  # noqa: E731
    assert journal.join("a/1")  # the session's first entry in recovery a/1
    journal.record(build, result("INSERT 0 1", status=ord("I")))
    first = journal.take(commit=False)[0]
    journal.record(build, result("INSERT 0 1", status=ord("I")))
    second = journal.take(commit=False)[0]  # the replay connection holds s1 by now
    assert first.data.startswith(parse) and not second.data.startswith(parse)
    assert first.expectations()[0].kind == m.PARSE
    assert not journal.join("a/1")
    # Another recovery, with no transaction in between: its replay connection holds nothing.
    assert journal.join("b/2")
    journal.record(build, result("INSERT 0 1", status=ord("I")))
    assert journal.take(commit=False)[0].data.startswith(parse)


def test_a_kept_unit_builds_the_statement_version_it_ran() -> None:
    """A prepared statement rewritten for a later execution is a new object: the unit kept
    for the earlier execution still builds the text that execution ran."""
    journal = Journal()
    old = m.encode_parse("", "INSERT INTO t VALUES ('2026-01-01')", [])
    new = m.encode_parse("", "INSERT INTO t VALUES ('2026-01-02')", [])
    for version, frame in ((1, old), (2, new)):
        stmt = Statement(m.parse_parse(frame[5:]), frame, None, version)  # type: ignore[arg-type]
        batch = [(m.BIND, b"\0\0\0\0\0\0\0\0", stmt), (m.EXECUTE, b"\0\0\0\0\0", None)]
        journal.record(lambda conn, b=batch: _build_batch(conn, b), result("INSERT 0 1"))
    units = journal.take(commit=True)
    assert units[0].data.startswith(old) and units[1].data.startswith(new)


def test_a_huge_transaction_is_marked_instead_of_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(j, "MAX_KEPT_UNITS", 3)
    journal = Journal()
    for _ in range(10):
        journal.record(query("INSERT INTO t VALUES (1)"), result("INSERT 0 1"))
    units = journal.take(commit=True)
    assert units[0].missing and len(units) == 2  # the marker, then COMMIT
    assert journal.empty


def test_a_transaction_past_the_byte_bound_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(j, "MAX_KEPT_BYTES", 100)
    journal = Journal()
    journal.record(query("INSERT INTO t VALUES (1)"), result("INSERT 0 1", sent=60))
    assert not journal.empty
    journal.record(query("INSERT INTO t VALUES (2)"), result("INSERT 0 1", sent=60))
    journal.record(query("INSERT INTO t VALUES (3)"), result("INSERT 0 1", sent=1))
    units = journal.take(commit=True)
    assert [u.missing for u in units] == ["the transaction sent more than 9.53674e-05 MiB", ""]
    assert units[1].data == m.encode_query("COMMIT")
    # The next transaction starts from nothing.
    journal.record(query("INSERT INTO t VALUES (4)"), result("INSERT 0 1", sent=60))
    assert [u.missing for u in journal.take(commit=True)] == ["", ""]


def test_entries_survive_json() -> None:
    unit = Unit(b"\0\1Q", [(ord("Q"), None, False, 0), (ord("P"), "s", True, 3)], ["INSERT 0 1"])
    unit.copy = b"d\0\0\0\5x"
    entry = Entry("r/7", {"user": "u", "database": "db"}, [unit], [m.encode_query("SET a = 1")])
    back = Entry.from_json(entry.to_json())
    assert back == entry
    with_gid = Entry("r/7", {}, [unit], gid="pgq/r/1.2")
    assert Entry.from_json(with_gid.to_json()) == with_gid
    assert isinstance(back.units[0].expectations()[1], Expectation)


def test_local_queue_orders_by_reservation_and_waits_for_settling() -> None:
    async def main() -> None:
        q = LocalQueue("rid", "node3")
        first = await q.reserve()  # a one-phase commit, not settled yet
        second = await q.append(Entry("s/2", {}, [], None))
        q.post(Entry("s/3", {}, [], None))
        assert (first, second, q.depth) == (1, 2, 3)
        with pytest.raises(TimeoutError):
            await q.take(1, timeout=0.05)
        asyncio.get_running_loop().call_later(0.02, q.settle, first, Entry("s/1", {}, [], None))
        got = await q.take(1, timeout=1)
        assert got is not None and got.session == "s/1"
        q.applied = 1
        assert (await q.take(2, timeout=1)).session == "s/2"  # type: ignore[union-attr]
        void = await q.reserve()
        q.settle(void, None)
        assert await q.take(void, timeout=1) is None
        q.close()
        with pytest.raises(QueueUnavailable):
            await q.reserve()
        ops = [{"op": "reserve"}, {"op": "end", "session": "x", "params": {}}]
        q2 = LocalQueue("rid2", "node3")
        assert q2.apply_batch(ops) == [1, 0] and q2.depth == 2

    asyncio.run(main())


def test_the_queue_gives_up_rather_than_grow_without_end(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgquorum.recovery import queue

    monkeypatch.setattr(queue, "MAX_DEPTH", 2)

    async def main() -> None:
        q = LocalQueue("rid", "node3")
        await q.append(Entry("a/1", {}))
        await q.append(Entry("a/1", {}))
        with pytest.raises(QueueUnavailable, match="waited for the replay"):
            await q.reserve()
        # The replay stops at once, not after the backlog it could no longer keep.
        with pytest.raises(QueueUnavailable, match="waited for the replay"):
            await q.take(1, timeout=1)

    asyncio.run(main())


def test_the_queue_gives_up_rather_than_hold_too_many_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_module, "MAX_BYTES", 10_000)
    big = Entry("a/1", {}, [Unit(b"x" * 4000, [], [], copy=b"y" * 2000)])

    async def main() -> None:
        q = LocalQueue("rid", "node3")
        assert await q.append(big) == 1
        assert await q.take(1, timeout=1) == big and q.bytes == 0  # replayed: freed
        await q.append(big)
        with pytest.raises(QueueUnavailable, match="took more than"):
            await q.append(big)
        # The replay stops at once, not after the backlog it could no longer keep.
        with pytest.raises(QueueUnavailable, match="took more than"):
            await q.take(2, timeout=1)

    asyncio.run(main())


def test_the_queue_spools_what_its_memory_does_not_hold(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(queue_module, "MEMORY_BYTES", 10_000)
    entries = [
        Entry(f"a/{i}", {"user": "u"}, [Unit(bytes([i]) * 4000, [], ["INSERT 0 1"])])
        for i in range(6)
    ]

    async def main() -> None:
        q = LocalQueue("rid", "node3", spool_dir=str(tmp_path))
        late = await q.reserve()  # settled last: its place in the order stays
        for e in entries[1:]:
            await q.append(e)
        q.settle(late, entries[0])
        assert q.memory <= 10_000 < q.bytes  # the rest waits on disk
        assert not list(tmp_path.iterdir())  # unlinked: a crash leaves nothing behind
        got = [await q.take(i, timeout=1) for i in range(1, 7)]
        assert got == entries
        assert (q.bytes, q.memory, q._spool.count) == (0, 0, 0)
        assert q._spool._file is not None and os.fstat(q._spool._file.fileno()).st_size == 0
        await q.append(entries[1])  # fits in memory again
        assert q._spool.count == 0
        q.close()

    asyncio.run(main())


def test_the_queue_remembers_which_two_phase_commits_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_module, "GID_MEMORY", 2)

    async def main() -> None:
        q = LocalQueue("rid", "node3")
        for i in range(3):
            await q.append(Entry("a/1", {}, gid=f"pgq/a/1.{i}"))
        await q.append(Entry("a/1", {}))  # a one-phase commit has none
        assert not await q.holds("pgq/a/1.0")  # the oldest was let go: not known
        assert await q.holds("pgq/a/1.1") and await q.holds("pgq/a/1.2")
        await q.take(2, timeout=1)  # replayed: still held (its resolver may ask later)
        asked = [{"op": "holds", "gid": "pgq/a/1.2"}, {"op": "holds", "gid": "x"}]
        assert q.apply_batch(asked) == [1, 0]  # what a peer's resolver asks

    asyncio.run(main())


def test_an_entrys_footprint_covers_its_python_objects() -> None:
    """The memory budget counts what entries really take, not only their bytes: measured
    here on transactions like pgbench's (one to eight statements)."""
    for units in (1, 4, 8):
        tracemalloc.start()
        kept = [
            Entry(
                f"r/{i}",
                {"user": "postgres", "database": "db", "application_name": "pgbench"},
                [
                    Unit(
                        m.encode_query(f"UPDATE t SET v = v + {i} WHERE id = {j}"), [], ["UPDATE 1"]
                    )
                    for j in range(units)
                ],
                gid=f"pgq/r/1795281284886.{i}",
            )
            for i in range(2000)
        ]
        real = tracemalloc.get_traced_memory()[0] / len(kept)
        tracemalloc.stop()
        assert 0.6 * real < kept[0].footprint < 1.5 * real, (units, real, kept[0].footprint)


def test_the_spool_index_keeps_to_the_entries_not_replayed() -> None:
    spool = queue_module._Spool(None)
    entry = [Entry(f"a/{i}", {}, [Unit(bytes([i % 256]) * 10, [], [])]) for i in range(2001)]
    spool.put(3, entry[3], low=1)  # settled out of order
    spool.put(1, entry[1], low=1)
    assert not spool.holds(2) and spool.holds(3)
    assert spool.take(1) == entry[1] and spool.take(3) == entry[3]
    taken = 3
    for serial in range(4, 2001):  # the replay follows 10 behind
        spool.put(serial, entry[serial], low=taken + 1)
        if serial - taken > 10:
            taken += 1
            assert spool.take(taken) == entry[taken]
    assert len(spool._at) < 100  # not one slot for every serial ever spooled
    while taken < 2000:
        taken += 1
        assert spool.take(taken) == entry[taken]
    assert spool.count == 0
    spool.close()


def test_a_queue_that_cannot_spool_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "MEMORY_BYTES", 100)

    def full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queue_module.os, "pwrite", full)

    async def main() -> None:
        q = LocalQueue("rid", "node3")
        with pytest.raises(QueueUnavailable, match=r"on disk: .*No space left"):
            await q.append(Entry("a/1", {}, [Unit(b"x" * 500, [], [])]))
        # The replay stops at once, and nothing more is queued.
        with pytest.raises(QueueUnavailable, match="No space left"):
            await q.take(1, timeout=1)
        with pytest.raises(QueueUnavailable, match="No space left"):
            await q.reserve()

    asyncio.run(main())


def test_a_peer_gives_up_rather_than_pile_up_what_it_cannot_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_module, "MAX_WAITING_BYTES", 1200)
    entry = Entry("a/1", {}, [Unit(b"x" * 300, [], ["INSERT 0 1"])])

    async def run() -> None:
        queue = RemoteQueue("r/1", "node3", ("127.0.0.1", 1), ("postgres", None))
        reserved = asyncio.ensure_future(queue.reserve())
        await asyncio.sleep(0)  # (the reserve is on its way)
        queue.post(entry)
        queue.post(entry)  # both wait while the coordinator is being reached
        with pytest.raises(QueueUnavailable, match="MiB of transactions waited to be sent"):
            queue.post(entry)
        with pytest.raises(QueueUnavailable, match="waited"):
            await reserved  # every caller still waiting learns it
        with pytest.raises(QueueUnavailable, match="waited"):
            await queue.flush()
        queue.close()

    asyncio.run(run())


def test_closing_a_remote_queue_ends_the_batch_in_flight() -> None:
    """A session waiting for its place in a batch being sent when the recovery ends gets
    QueueUnavailable, not a wait without end (it holds a commit slot meanwhile)."""

    async def run() -> None:
        queue = RemoteQueue("r/1", "node3", ("127.0.0.1", 1), ("postgres", None))
        sent = asyncio.Event()

        async def exchange(ops: list[object], batch: int) -> list[int]:
            sent.set()
            await asyncio.Event().wait()  # the coordinator never answers
            return []

        queue._exchange = exchange  # type: ignore[method-assign]
        waiting = asyncio.create_task(queue.reserve())
        await asyncio.wait_for(sent.wait(), 1)
        queue.close()
        with pytest.raises(QueueUnavailable):
            await asyncio.wait_for(waiting, 1)
        # Nothing more is sent once it is closed (a late settle would open a new link).
        with pytest.raises(QueueUnavailable):
            queue.settle(1, None)

    asyncio.run(run())


def test_a_remote_queue_closed_with_nothing_on_its_way_flushes() -> None:
    """A router that stops closes its queue; a peer's HOLD WRITES that flushes it then has
    lost nothing and must not fail the node (it did, in CI). One closed while an operation
    was on its way has lost a commit: its flush says so."""

    async def run() -> None:
        idle = RemoteQueue("r/1", "node3", ("127.0.0.1", 1), ("postgres", None))
        idle.close()
        await asyncio.wait_for(idle.flush(), 1)
        with pytest.raises(QueueUnavailable):
            idle.settle(1, None)  # a commit after the close is refused, to its caller

        busy = RemoteQueue("r/1", "node3", ("127.0.0.1", 1), ("postgres", None))

        async def exchange(ops: list[object], batch: int) -> list[int]:
            await asyncio.Event().wait()  # the coordinator never answers
            return []

        busy._exchange = exchange  # type: ignore[method-assign]
        busy.settle(1, None)
        await asyncio.sleep(0)  # (on its way)
        busy.close()
        with pytest.raises(QueueUnavailable, match="ended"):
            await asyncio.wait_for(busy.flush(), 1)

    asyncio.run(run())


LOST = NodeLost(Node("router", "/tmp", 1), "connection reset")  # after the batch left
REFUSED = OSError("connection refused")  # before it left


def _remote(answers: list[object], monkeypatch: pytest.MonkeyPatch) -> RemoteQueue:
    """A RemoteQueue whose coordinator gives ``answers`` in turn (an exception is raised,
    and once they are used up every attempt is refused). ``sent`` has each attempt's
    operations, ``batches`` its batch number."""
    monkeypatch.setattr(queue_module, "RECONNECT_PAUSE_S", 0.01)
    monkeypatch.setattr(queue_module, "RECONNECT_S", 0.5)
    queue = RemoteQueue("r/1", "node3", ("127.0.0.1", 1), ("postgres", None))
    sent: list[list[str]] = []
    batches: list[int] = []

    async def exchange(ops: list[str], batch: int) -> list[int]:
        sent.append(ops)
        batches.append(batch)
        answer = answers.pop(0) if answers else REFUSED
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[return-value]

    queue._exchange = exchange  # type: ignore[method-assign]
    queue.sent = sent  # type: ignore[attr-defined]
    queue.batches = batches  # type: ignore[attr-defined]
    return queue


RESERVE = '{"op":"reserve"}'


def test_a_peer_waits_for_a_restarted_coordinator_and_lets_the_lost_recovery_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The coordinator dies with a batch on its way and comes back without the recovery:
    the batch's senders learn that it is gone (nothing to fail), not that it broke."""
    gone = PgError(UNDEFINED_OBJECT, "no recovery 'r/1' is queueing")

    async def run() -> None:
        queue = _remote([LOST, REFUSED, gone], monkeypatch)
        with pytest.raises(QueueGone):
            await queue.reserve()
        assert queue.sent == [[RESERVE]] * 3  # the same batch each time
        assert queue.batches == [1, 1, 1]  # type: ignore[attr-defined]
        with pytest.raises(QueueGone):
            queue.settle(1, None)

    asyncio.run(run())


def test_a_batch_that_never_left_is_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        queue = _remote([REFUSED, REFUSED, [7]], monkeypatch)
        assert await queue.reserve() == 7
        assert queue.sent == [[RESERVE]] * 3

    asyncio.run(run())


def test_a_batch_whose_answer_was_lost_is_applied_once() -> None:
    """The link to a coordinator that still runs the recovery breaks after it took a batch:
    the peer sends the batch again, and the coordinator answers it again instead of applying
    it twice (a transaction replayed twice, or a serial no one settles)."""

    async def run() -> None:
        coordinator = LocalQueue("r/1", "node3")
        queue = RemoteQueue("r/1", "node3", ("127.0.0.1", 1), ("postgres", None))
        answers_lost = 1
        sent: list[int] = []

        async def exchange(ops: list[str], batch: int) -> list[int]:
            nonlocal answers_lost
            sent.append(batch)
            request = {"ops": [json.loads(op) for op in ops]}
            serials = coordinator.apply_batch(request["ops"], queue._peer, batch)
            if answers_lost:
                answers_lost -= 1
                raise LOST  # it arrived; the answer did not
            return serials

        queue._exchange = exchange  # type: ignore[method-assign]
        first = await queue.reserve()
        second = await queue.append(Entry("a/2", {}))
        assert (first, second) == (1, 2) and sent == [1, 1, 2]
        assert coordinator.depth == 2  # one place each, not three
        queue.settle(first, Entry("a/1", {}))
        await queue.flush()
        assert (await coordinator.take(1, timeout=1)).session == "a/1"  # type: ignore[union-attr]
        assert (await coordinator.take(2, timeout=1)).session == "a/2"  # type: ignore[union-attr]
        # A late copy of an earlier batch (on the link that broke) is not applied again.
        with pytest.raises(QueueUnavailable, match="applied already"):
            coordinator.apply_batch([{"op": "reserve"}], queue._peer, 1)
        assert coordinator.depth == 2
        # Another peer's batch of the same number is its own.
        assert coordinator.apply_batch([{"op": "reserve"}], "other", 1) == [3]

    asyncio.run(run())


def test_a_queue_that_gave_up_is_not_taken_for_one_that_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gave_up = PgError(OBJECT_NOT_IN_PREREQUISITE_STATE, "more than 1000000 transactions")

    async def run() -> None:
        queue = _remote([gave_up], monkeypatch)
        with pytest.raises(QueueUnavailable, match="more than") as e:
            await queue.reserve()
        assert not isinstance(e.value, QueueGone)

    asyncio.run(run())


def test_a_coordinator_that_stays_away_ends_the_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        queue = _remote([LOST], monkeypatch)
        with pytest.raises(QueueUnavailable, match="did not come back") as e:
            await queue.reserve()
        assert not isinstance(e.value, QueueGone)
        with pytest.raises(QueueUnavailable):
            await queue.flush()

    asyncio.run(run())


def test_batches_fit_the_coordinators_message_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch is one admin console query: cut by size, and an operation too big for one
    is refused at once (its recovery fails) rather than sent."""
    entry = Entry("a/1", {}, [Unit(b"x" * 30, [], [])])
    size = len(json.dumps({"op": "append", "entry": entry.to_json()}, separators=(",", ":")))
    monkeypatch.setattr(queue_module, "BATCH_BYTES", 2 * size + 2)  # two operations a batch
    monkeypatch.setattr(queue_module, "MAX_OP_BYTES", 1000)

    async def run() -> None:
        queue = _remote([[0, 0], [0]], monkeypatch)
        for _ in range(3):
            queue.post(entry)
        await queue.flush()
        assert [len(ops) for ops in queue.sent] == [2, 1]
        with pytest.raises(QueueUnavailable, match="more than a peer can send"):
            queue.post(Entry("a/1", {}, [Unit(b"x" * 1000, [], [])]))

    asyncio.run(run())
