"""The recovery queue's log (queue_log.py) and rebuilding a queue from it (resume.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pgquorum.protocol import messages as m
from pgquorum.recovery.journal import COMMIT, Entry, Unit
from pgquorum.recovery.queue import LocalQueue
from pgquorum.recovery.queue_log import QueueLog, boot_id, read_header, records
from pgquorum.recovery.resume import SessionState, Unresumable, load
from pgquorum.sql.analyze import Analyzer


def unit(sql: str, tag: str = "UPDATE 1") -> Unit:
    return Unit(m.encode_query(sql), [(m.QUERY, None, False, 0)], [tag])


def entry(session: str, *sqls: str, prelude: list[bytes] | None = None) -> Entry:
    return Entry(session, {"user": "u", "database": "d"}, [*map(unit, sqls), COMMIT], prelude)


def logged_queue(path: Path, **header: Any) -> LocalQueue:
    queue = LocalQueue("a/1", "node3")
    queue.log = QueueLog.create(path, {"rid": "a/1", "node": "node3", "boot": boot_id(), **header})
    return queue


def test_a_record_cut_short_ends_the_log(tmp_path: Path) -> None:
    path = tmp_path / "q"
    log = QueueLog.create(path, {"rid": "a/1"})
    log.write(("applied", 1))
    log.write(("applied", 2))
    log.close()
    whole = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\x00\x00\x00\x30\x00")  # the head of a record the crash cut
    assert read_header(path) == {"rid": "a/1"}
    got = [r for r, _ in records(path)][1:]
    assert got == [("applied", 1), ("applied", 2)]
    assert [end for _, end in records(path)][-1] == whole
    again = QueueLog.reopen(path, whole)  # writes on after the last whole record
    again.write(("applied", 3))
    again.close()
    assert [r for r, _ in records(path)][1:] == [("applied", 1), ("applied", 2), ("applied", 3)]


def test_the_queue_is_rebuilt_as_it_was(tmp_path: Path) -> None:
    """Serials, entries not replayed yet, each peer's last batch (sent again, it is answered
    again, not applied twice) and the two-phase commits queued all come back."""
    path = tmp_path / "q"
    settled = entry("a/1", "UPDATE t SET v = 1")
    later = entry("a/1", "UPDATE t SET v = 2")

    async def run() -> tuple[LocalQueue, list[int]]:
        queue = logged_queue(path)
        first = await queue.reserve()
        queue.settle(first, settled)
        queue.note(("restored", "t0", 1, 100, [5.0]))
        queue.note(("applied", first))
        queue.applied = first
        batch = [{"op": "reserve"}, {"op": "append", "entry": later.to_json()}]
        answer = queue.apply_batch(batch, "peer1", 1)
        queue.post(Entry("b/2", {"user": "u"}, [unit("UPDATE t SET v = 3")], gid="g1"))
        queue.end_session("a/1", {"user": "u"})
        return queue, answer

    before, answer = asyncio.run(run())
    resumed = load(path, "a/1", "node3")
    queue = resumed.queue
    assert queue.applied == 1
    assert queue.depth == before.depth == 4
    assert resumed.in_doubt is None
    assert queue.apply_batch([{"op": "reserve"}], "peer1", 1) == answer  # not applied again
    assert queue.depth == 4

    async def taken() -> list[Entry | None]:
        with pytest.raises(TimeoutError):  # the peer's reservation: it settles it again
            await queue.take(2, 0.01)
        return [await queue.take(s, 1) for s in range(3, 6)]

    got = asyncio.run(taken())
    assert got[0] == later
    assert got[1] is not None and got[1].gid == "g1"
    assert got[2] is not None and got[2].end
    assert asyncio.run(queue.holds("g1"))
    queue.close()


def test_the_transaction_the_replay_was_in_is_in_doubt(tmp_path: Path) -> None:
    path = tmp_path / "q"

    async def run() -> None:
        queue = logged_queue(path)
        queue.post(entry("a/1", "UPDATE t SET v = 1"))
        queue.note(("restored", "t0", 1, 100, [5.0]))
        queue.note(("resumed",))  # (an earlier restart)
        queue.note(("xid", 1, 742))

    asyncio.run(run())
    resumed = load(path, "a/1", "node3")
    assert resumed.in_doubt == (1, 742)
    assert resumed.times == 1


def write_and_load(path: Path, fill: Any, rid: str = "a/1", **header: Any) -> None:
    async def run() -> None:
        queue = logged_queue(path, **header)
        await fill(queue)

    asyncio.run(run())
    load(path, rid, "node3")


async def restored(queue: LocalQueue) -> None:
    queue.note(("restored", "t0", 1, 100, [5.0]))


async def nothing(queue: LocalQueue) -> None:
    pass


async def in_a_step(queue: LocalQueue) -> None:
    await restored(queue)
    queue.post(entry("a/1", "UPDATE t SET v = 1"))
    queue.note(("start", 1))  # (no transaction id: not a commit the replay made)


async def own_commit_in_flight(queue: LocalQueue) -> None:
    await restored(queue)
    await queue.reserve()


async def session_state(queue: LocalQueue) -> None:
    await restored(queue)
    queue.post(entry("a/1", "SET search_path = s"))  # (each entry carries the settings)
    queue.post(entry("a/1", "CREATE TEMP TABLE t (v int)"))
    queue.note(("applied", 2))


@pytest.mark.parametrize(
    ("fill", "why"),
    [
        (nothing, "restore had not finished"),
        (in_a_step, "outcome on the node cannot be known"),
        (own_commit_in_flight, "no entry"),
        (session_state, "temporary object"),
    ],
)
def test_what_cannot_be_resumed_exactly_begins_again(tmp_path: Path, fill: Any, why: str) -> None:
    with pytest.raises(Unresumable, match=why):
        write_and_load(tmp_path / "q", fill)


def test_a_log_from_another_boot_or_recovery_is_not_resumed(tmp_path: Path) -> None:
    with pytest.raises(Unresumable, match="machine restarted"):
        write_and_load(tmp_path / "q", restored, boot="another boot")
    with pytest.raises(Unresumable, match="not kept"):
        write_and_load(tmp_path / "r", restored, rid="a/2")


def test_a_session_gets_back_its_prepared_statements() -> None:
    parse = m.frame(m.PARSE, m.cstr("s1") + m.cstr("UPDATE t SET v = $1") + b"\0\0")
    gone = m.frame(m.PARSE, m.cstr("s2") + m.cstr("SELECT 1") + b"\0\0")
    close = m.encode_close("S", "s2")
    state = SessionState()
    analyzer = Analyzer()
    state.replayed(Entry("a/1", {}, [Unit(parse + gone, [], [])]), analyzer)
    state.replayed(Entry("a/1", {}, [Unit(close, [], [])]), analyzer)
    assert state.parses == {"s1": parse}
    lone = "SELECT pg_catalog.set_config('a.b', 'c', false)"
    state.replayed(Entry("a/1", {}, [unit("SET x = 1"), unit(lone)]), analyzer)
    assert state.sticky == ""  # (settings: the next entry carries them)
    state.replayed(Entry("a/1", {}, [unit("SELECT pg_advisory_lock(1)")]), analyzer)
    assert state.sticky == "pg_advisory_lock()"
