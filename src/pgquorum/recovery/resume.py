"""Resuming a recovery whose coordinator restarted, from its queue's log (queue_log.py).

Read back in order, the log's changes rebuild the queue with its serial numbers and each
peer's last batch, so the peers' commits go on into the same recovery. What the node already
has follows from the replay's records (replay.py): every entry up to the last "applied", and
the one the replay was in at the crash is decided by its transaction's status on the node
(committed: skipped; aborted: replayed again). The replay connections died with the process:
each session gets a new one, started with the settings of its next entry (each carries the
session's settings as its transaction began) and the statements its earlier entries
prepared there (SessionState).

A recovery is resumed only when that is exact, and begins again from a fresh snapshot, as
before, when:
- the machine or the node restarted since: replayed commits are not flushed one by one, so
  some may be gone (the boot id in the log's header, the node's start time);
- the restore had not finished;
- the replay was in an entry whose outcome it cannot learn (no transaction id);
- a commit of this router's own sessions had a place in the queue and no entry yet: it may
  have committed on the nodes;
- a session that may go on made session state that a new connection cannot get back
  (temporary objects, LISTEN, cursors WITH HOLD, SQL PREPARE, session advisory locks, a
  set_config() the router does not keep as a setting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgquorum.protocol import messages as m
from pgquorum.protocol.errors import ProtocolViolation
from pgquorum.protocol.framing import Framer
from pgquorum.sql.analyze import Analyzer

from .journal import Entry
from .queue import LocalQueue
from .queue_log import LogCorrupt, QueueLog, boot_id, read_header, records


class Unresumable(Exception):
    """Why the recovery cannot be resumed (it begins again)."""


# Statements and calls whose effect outlives the transaction on the connection, beyond the
# settings each entry carries and the prepared statements rebuilt here. A false alarm only
# costs a fresh snapshot.
_STICKY_WORDS = re.compile(r"\b(PREPARE|DEALLOCATE|DECLARE|DISCARD|LOAD|LISTEN)\b", re.IGNORECASE)
_STICKY_CALLS = frozenset(
    (
        "set_config",
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    )
)


@dataclass
class SessionState:
    """What a session's replay connection held after the entries replayed before the
    restart."""

    parses: dict[str, bytes] = field(default_factory=dict)  # statement -> Parse message
    sticky: str = ""  # state a new connection cannot get back, if any

    def replayed(self, entry: Entry, analyzer: Analyzer) -> None:
        framer = Framer()
        for unit in entry.units:
            framer.feed(unit.data)
            while (message := framer.next_message()) is not None:
                mtype, payload = message
                if mtype == m.PARSE:
                    parse = m.parse_parse(payload)
                    if parse.name:
                        self.parses[parse.name] = m.frame(m.PARSE, payload)
                    sql = parse.query
                elif mtype == m.QUERY:
                    sql = m.parse_query(payload)
                else:
                    if mtype == m.CLOSE:
                        close = m.parse_close(payload)
                        if close.kind == "S":
                            self.parses.pop(close.name, None)
                    continue
                if not self.sticky:
                    self.sticky = _sticky(sql, analyzer)


def _sticky(sql: str, analyzer: Analyzer) -> str:
    a = analyzer.analyze(sql)
    if a.error:
        return "a statement the router could not parse"
    if a.temp:
        return "a temporary object"
    calls = {name.rsplit(".", 1)[-1] for name in a.calls}
    if a.settings:  # SET, RESET, a lone set_config(): the session keeps them
        calls.discard("set_config")
    found = sorted(calls & _STICKY_CALLS)
    if found:
        return f"{found[0]}()"
    word = _STICKY_WORDS.search(sql)
    return word[1].upper() if word else ""


@dataclass
class Resumable:
    """A recovery's queue rebuilt from its log."""

    header: dict[str, Any]
    queue: LocalQueue
    sessions: dict[str, SessionState]
    # ("restored", the node's start time, databases, bytes, the snapshot's pause in ms)
    restored: tuple[Any, ...]
    in_doubt: tuple[int, int] | None  # (serial, transaction id) the replay was in
    times: int = 0  # it was resumed before


def load(path: Path, rid: str, node: str, spool_dir: str | None = None) -> Resumable:
    """The queue of recovery ``rid`` from its log at ``path``, writing on to it (Unresumable
    if it cannot be resumed exactly)."""
    try:
        header = read_header(path)
        if header.get("rid") != rid or header.get("node") != node:
            raise Unresumable("its queue was not kept on disk")
        boot = boot_id()
        if not boot or header.get("boot") != boot:
            raise Unresumable("the machine restarted since (replayed commits may be lost)")
        done, step, restored, end, times = _position(path)
        if restored is None:
            raise Unresumable("the node's restore had not finished")
        in_doubt = None
        if step is not None and step[1] > done:
            if step[0] != "xid":
                raise Unresumable(
                    f"the replay was in entry {step[1]}, whose outcome on the node cannot be known"
                )
            in_doubt = (int(step[1]), int(step[2]))
        queue, sessions = _rebuild(path, rid, node, done, spool_dir)
        queue.log = QueueLog.reopen(path, end)
    except (OSError, LogCorrupt) as e:
        raise Unresumable(f"its queue cannot be read back: {e}") from None
    except (ProtocolViolation, KeyError, TypeError, ValueError, IndexError) as e:
        raise Unresumable(f"its queue cannot be read back: {e!r}") from None
    return Resumable(header, queue, sessions, restored, in_doubt, times)


def _position(
    path: Path,
) -> tuple[int, tuple[Any, ...] | None, tuple[Any, ...] | None, int, int]:
    """(the last entry applied, the last step begun, the restore's record, the end of the
    whole records, the times it was resumed)."""
    done = times = end = 0
    step = restored = None
    for record, at in records(path):
        end = at
        kind = record[0]
        if kind == "applied":
            done = max(done, int(record[1]))
        elif kind in ("start", "xid"):
            step = record
        elif kind == "restored":
            restored = record
        elif kind == "resumed":
            times += 1
    return done, step, restored, end, times


def _rebuild(
    path: Path, rid: str, node: str, done: int, spool_dir: str | None
) -> tuple[LocalQueue, dict[str, SessionState]]:
    queue = LocalQueue(rid, node, spool_dir)
    queue.applied = done
    sessions: dict[str, SessionState] = {}
    analyzer = Analyzer()

    def replayed(entry: Entry) -> None:
        if entry.end:
            sessions.pop(entry.session, None)
        else:
            sessions.setdefault(entry.session, SessionState()).replayed(entry, analyzer)

    queue.replayed_hook = replayed
    own: set[int] = set()  # places this router's sessions reserved and did not fill
    for record, _ in records(path):
        kind = record[0]
        if kind == "reserve":
            own.add(queue.redo(record))
        elif kind in ("settle", "add", "end", "batch"):
            if kind == "settle":
                own.discard(record[1])
            queue.redo(record)
    queue.replayed_hook = None
    if queue.closed:
        raise Unresumable(queue.error or "its queue had given up")
    waiting = sorted(s for s in own if s > done)
    if waiting:
        raise Unresumable(
            f"a commit of this router had place {waiting[0]} in the queue and no entry: it "
            "may have committed on the nodes"
        )
    check_sessions(sessions)
    return queue, sessions


def check_sessions(sessions: dict[str, SessionState]) -> None:
    for name, state in sorted(sessions.items()):
        if state.sticky:
            raise Unresumable(
                f"session {name} made session state during the recovery ({state.sticky}) "
                "that a new replay connection cannot get back"
            )
