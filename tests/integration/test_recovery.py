"""Online recovery of a FAILED node: RECOVER NODE / pgquorum recover, under load."""

from __future__ import annotations

import contextlib
import glob
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cli_harness import run_cli
from recovery_harness import (
    fail_by_killing,
    recover,
    recover_held_open,
    recovery,
    wait_recovery,
)
from router_harness import (
    RouterThread,
    eventually,
    finish_pgbench,
    pgbench,
    router_config,
    start_pgbench,
    wait_pgbench_commits,
)

from helpers import Transfers, assert_nodes_identical, balanced
from pgquorum.cluster.model import NodeState
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode
from pgquorum.recovery import journal as journal_module
from pgquorum.recovery import queue as queue_module


@pytest.fixture
def three(make_nodes, tmp_path: Path) -> Iterator[tuple[RouterThread, list[LocalNode]]]:  # type: ignore[no-untyped-def]
    """A router with a state database on disk, as in production: its recoveries keep their
    queue on disk too (recovery/queue_log.py)."""
    nodes = make_nodes(3)
    rt = RouterThread(router_config(nodes, state_db=tmp_path / "router.db"))
    try:
        yield rt, nodes
    finally:
        rt.stop()


def longest_latency_ms(prefix: Path) -> float:
    """The longest transaction in pgbench's per-transaction logs (-l): the longest pause a
    client saw."""
    longest = 0
    for path in glob.glob(f"{prefix}*"):
        for line in Path(path).read_text().splitlines():
            longest = max(longest, int(line.split()[2]))
    return longest / 1000


def create_tables(rt: RouterThread) -> None:
    """t for the test's rows, h for recover_held_open's."""
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE h (v text)")


def held_in_replay(rt: RouterThread, nodes: list[LocalNode]) -> psycopg.Connection:
    """node3 killed, failed and being recovered, kept in the replay by the returned
    connection's open transaction (see recover_held_open)."""
    create_tables(rt)
    fail_by_killing(rt, nodes[2])
    return recover_held_open(rt)


def assert_failed_at_once(
    rt: RouterThread, nodes: list[LocalNode], holder: psycopg.Connection, why: str
) -> None:
    """The recovery failed while ``holder`` still kept it in its replay (at once, not when
    the replay got there), node3 stays FAILED, and the others agree."""
    info = wait_recovery(rt)
    holder.commit()
    holder.close()
    assert info["phase"] == "failed", info
    assert why in info["error"], info
    assert rt.router.cluster.status["node3"].state is NodeState.FAILED
    assert_nodes_identical(nodes[:2], "postgres")


@pytest.mark.slow
def test_killed_node_is_recovered_under_pgbench(
    three: tuple[RouterThread, list[LocalNode]], pg_binaries: PgBinaries, tmp_path: Path
) -> None:
    rt, nodes = three
    pgbench(pg_binaries, rt, "-i", "-s", "2", "-q")
    prefix = tmp_path / "tx"
    load = ("-c", "8", "-j", "2", "-T", "25", "-n", "-l", f"--log-prefix={prefix}")
    bench = start_pgbench(pg_binaries, rt, *load, cwd=tmp_path)
    try:
        wait_pgbench_commits(rt, bench, 100)
        fail_by_killing(rt, nodes[2])
        wait_pgbench_commits(rt, bench, 50)  # transactions the recovered node missed
        recover(rt, "node3")
        info = wait_recovery(rt)
        assert info["phase"] == "done", info
        assert finish_pgbench(bench) > 100
    finally:
        with contextlib.suppress(Exception):
            bench.kill()
    assert int(info["replayed"]) > 0, info  # commits were queued and replayed
    print(
        f"\nrecovery: {info}\nlongest client-visible pause: "
        f"{longest_latency_ms(prefix):.0f} ms (pgbench -l), barriers {info['pauses_ms']} ms"
    )
    assert all(st.state is NodeState.ONLINE for st in rt.router.cluster.status.values())
    res = run_cli("verify", "--port", str(rt.port))
    assert res.returncode == 0, res.stdout + res.stderr
    for n in nodes:
        assert balanced(n), n.name
    assert_nodes_identical(nodes, "postgres")


def test_ddl_and_writes_during_a_recovery_reach_the_node(
    three: tuple[RouterThread, list[LocalNode]],
) -> None:
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t (v) SELECT 'old' || g FROM generate_series(1, 50) g ORDER BY g")
        conn.execute("CREATE TABLE h (v text)")
    fail_by_killing(rt, nodes[2])
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO t (v) VALUES ('while failed')")
    holder = recover_held_open(rt)
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE made_during (id int PRIMARY KEY, at timestamptz DEFAULT now())")
        conn.execute("ALTER TABLE t ADD COLUMN w int DEFAULT 7")
        conn.execute("INSERT INTO made_during (id) VALUES (1), (2)")
        conn.execute("UPDATE t SET w = id * 2 WHERE id % 3 = 0")
        conn.execute("SET search_path = public, pg_catalog")
        with conn.transaction():
            conn.execute("INSERT INTO t (v) VALUES ('in a block')")
            conn.execute("DELETE FROM t WHERE id = 5")
        with conn.cursor() as cur:  # the extended protocol, prepared
            for i in range(3):
                cur.execute("INSERT INTO t (v, w) VALUES (%s, %s)", (f"p{i}", i), prepare=True)
            # A prepared statement re-parsed with its own serial value for each execution,
            # in one transaction: the replay must run each execution's own text.
            with conn.transaction():
                for i in range(3, 6):
                    cur.execute("INSERT INTO made_during (id) VALUES (%s)", (i,), prepare=True)
                    cur.execute("INSERT INTO t (v) VALUES (%s)", (f"b{i}",), prepare=True)
    holder.commit()
    holder.close()
    info = wait_recovery(rt)
    assert info["phase"] == "done", info
    assert rt.router.cluster.status["node3"].state is NodeState.ONLINE
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:  # every node takes writes again
        conn.execute("INSERT INTO t (v) VALUES ('after')")
    assert nodes[2].psql("SELECT count(*) FROM made_during") == "5"
    assert nodes[2].psql("SELECT count(*) FROM h") == "1"  # the transaction held open
    assert_nodes_identical(nodes, "postgres")


def test_a_replay_that_fails_leaves_the_node_failed(
    three: tuple[RouterThread, list[LocalNode]],
) -> None:
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE h (id int)")
    fail_by_killing(rt, nodes[2])
    holder = recover_held_open(rt)
    nodes[2].kill()  # mid-replay
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        for i in range(1, 20):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))
    holder.commit()
    holder.close()
    info = wait_recovery(rt)
    assert info["phase"] == "failed" and info["error"], info
    st = rt.router.cluster.status["node3"]
    assert st.state is NodeState.FAILED and "recovery failed" in st.reason, st
    assert rt.router.recovery_sink is None
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:  # the others go on
        conn.execute("INSERT INTO t VALUES (100)")
    assert_nodes_identical(nodes[:2], "postgres")


def test_a_fourth_node_joins_a_group_under_load(
    three: tuple[RouterThread, list[LocalNode]],
    make_nodes,  # type: ignore[no-untyped-def]
) -> None:
    rt, nodes = three
    (empty,) = make_nodes(1)
    Transfers.create(rt.dsn(), 200)
    with Transfers(rt.dsn(), clients=4, accounts=200) as load:
        load.wait_commits(50)
        res = run_cli(
            "add-node", "node4", f"{empty.router_host}:{empty.port}", "--port", str(rt.port)
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "node4 is ONLINE" in res.stdout, res.stdout
        load.wait_commits(50)  # load on four nodes
    assert not load.errors, load.errors
    status = rt.router.cluster.status
    assert [n.name for n in rt.router.cluster.group.nodes] == [
        "node1",
        "node2",
        "node3",
        "node4",
    ]
    assert all(st.state is NodeState.ONLINE for st in status.values())
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT sum(balance) FROM acct").fetchone() == (Transfers.total(200),)
    assert_nodes_identical([*nodes, empty], "postgres")
    # Taken out again: the others go on without it.
    res = run_cli("remove-node", "node4", "--port", str(rt.port))
    assert res.returncode == 0, res.stdout + res.stderr
    assert [n.name for n in rt.router.cluster.group.nodes] == ["node1", "node2", "node3"]
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = 1")
    assert nodes[0].psql("SELECT balance FROM acct WHERE id = 1") != empty.psql(
        "SELECT balance FROM acct WHERE id = 1"
    )
    assert_nodes_identical(nodes, "postgres")


def test_recover_refuses_what_it_cannot_do(three: tuple[RouterThread, list[LocalNode]]) -> None:
    rt, _ = three
    with psycopg.connect(rt.dsn("pgquorum"), autocommit=True) as admin:
        with pytest.raises(psycopg.errors.UndefinedObject):
            admin.execute("RECOVER NODE nosuch")
        with pytest.raises(psycopg.errors.UndefinedObject):  # as `pgquorum recover` quotes
            admin.execute('RECOVER NODE "no such"')
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="ONLINE"):
            admin.execute("RECOVER NODE node2")
        with pytest.raises(psycopg.errors.DuplicateObject):
            admin.execute("ADD NODE node2 '127.0.0.1' 5432")
        assert admin.execute("SHOW RECOVERY").fetchall() == []


def test_settings_from_before_the_recovery_and_copy_during_it_replay(
    three: tuple[RouterThread, list[LocalNode]],
) -> None:
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA s1; CREATE SCHEMA s2")
        for table in ("s1.t", "s2.t", "public.t"):
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE h (v text)")
    fail_by_killing(rt, nodes[2])
    # Sessions that changed a setting long before the recovery, and write during it: one
    # through the extended protocol (as JDBC and asyncpg send everything), one in a string
    # of several statements.
    worker = psycopg.connect(rt.dsn(), autocommit=True)
    worker.execute("SET search_path = s1, public", prepare=True)
    for i in range(150):  # a pool setting a timeout per use: the search_path must stay
        worker.execute(f"SET statement_timeout = {60_000 + i}")
    with worker.transaction():  # undone with the block: never for the recovered node
        worker.execute("SET search_path = public")
        worker.execute("SET search_path = public", prepare=True)
        worker.execute("SET LOCAL search_path = public")
        raise psycopg.Rollback()
    with worker.transaction():  # a rollback to a savepoint undoes a SET, a release keeps it
        worker.execute("SAVEPOINT keep; SET search_path = public")
        worker.execute("ROLLBACK TO SAVEPOINT keep", prepare=True)
        worker.execute("SAVEPOINT gone")
        worker.execute("SET statement_timeout = 70000", prepare=True)
        worker.execute("RELEASE gone")
    assert worker.execute("SHOW statement_timeout").fetchone() == ("70s",)
    other = psycopg.connect(rt.dsn(), autocommit=True)
    other.execute("SET search_path = public; SELECT 1; SET search_path = s2, public")
    # A setting made with set_config() and a bound value, as row level security does.
    other.execute("SELECT set_config('app.tenant', %s, false)", ("acme's",))
    holder = recover_held_open(rt)
    worker.execute("INSERT INTO t VALUES (1, 'goes to s1')")
    other.execute("INSERT INTO t VALUES (1, current_setting('app.tenant'))")
    with worker.cursor().copy("COPY t (id, v) FROM STDIN") as copy:
        for i in range(2, 200):
            copy.write_row((i, f"copied {i}"))
    holder.commit()
    holder.close()
    info = wait_recovery(rt)
    assert info["phase"] == "done", info
    # The sessions go on, now on the recovered node too, with their settings (the values
    # written make any difference there a difference in the data).
    worker.execute("INSERT INTO t VALUES (200, current_setting('statement_timeout'))")
    other.execute("INSERT INTO t VALUES (2, current_setting('app.tenant'))")
    worker.close()
    other.close()
    assert nodes[2].psql("SELECT count(*) FROM s1.t") == "200"
    assert nodes[2].psql("SELECT count(*) FROM s2.t") == "2"
    assert nodes[2].psql("SELECT v FROM s2.t WHERE id = 1") == "acme's"
    assert nodes[2].psql("SELECT count(*) FROM public.t") == "0"
    assert_nodes_identical(nodes, "postgres")


def test_reads_spread_again_over_a_recovered_node(
    three: tuple[RouterThread, list[LocalNode]],
) -> None:
    """Sessions keep their reads on a home node; when a node comes back, they connect to it
    (sessions that only read too) and choose their home again, and it gets its share."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE marks (id int)")
    fail_by_killing(rt, nodes[2])
    sessions = [psycopg.connect(rt.dsn(), autocommit=True) for _ in range(6)]
    port = "SELECT current_setting('port')::int"
    try:
        homes = {c.execute(port).fetchone()[0] for c in sessions}  # type: ignore[index]
        assert homes == {nodes[0].port, nodes[1].port}
        recover(rt, "node3")
        assert wait_recovery(rt)["phase"] == "done"
        for c in sessions[:2]:
            c.execute("INSERT INTO marks VALUES (1)")
        homes = {c.execute(port).fetchone()[0] for c in sessions}  # type: ignore[index]
        assert homes == {n.port for n in nodes}
        # The sessions that only read use it too (the extended protocol here).
        readers = {
            c.execute(port, prepare=True).fetchone()[0]  # type: ignore[index]
            for c in sessions[2:]
        }
        assert nodes[2].port in readers
    finally:
        for c in sessions:
            c.close()
    assert_nodes_identical(nodes, "postgres")


def test_a_copy_too_big_to_keep_fails_the_recovery_not_the_load(
    three: tuple[RouterThread, list[LocalNode]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk load during a recovery would be kept in memory for the replay: past the limit
    the recovery fails at once (the node stays FAILED, to recover again) and the COPY goes on."""
    rt, nodes = three
    monkeypatch.setattr(journal_module, "MAX_KEPT_BYTES", 64 * 1024)
    holder = held_in_replay(rt, nodes)
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        with conn.cursor().copy("COPY t (id, v) FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row((i, "x" * 100))
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (5000,)
    assert_failed_at_once(
        rt, nodes, holder, "COPY FROM STDIN sent more than a transaction keeps (0.0625 MiB)"
    )


def test_a_transaction_too_big_to_keep_fails_the_recovery_not_the_transaction(
    three: tuple[RouterThread, list[LocalNode]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every session keeps its transaction's statements for a recovery that may queue it:
    past the byte bound it lets them go, and a recovery the transaction commits into fails
    (the node stays FAILED, to recover again), while the transaction itself commits."""
    rt, nodes = three
    monkeypatch.setattr(journal_module, "MAX_KEPT_BYTES", 64 * 1024)
    holder = held_in_replay(rt, nodes)
    with psycopg.connect(rt.dsn()) as conn:
        for i in range(4):  # 4 x 20 kB statements, one transaction begun during the recovery
            conn.execute(f"INSERT INTO t VALUES ({i}, '{'x' * 20_000}')")
        conn.commit()
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (4,)
    assert_failed_at_once(rt, nodes, holder, "the transaction sent more than 0.0625 MiB")


def test_a_queue_spooled_to_disk_replays_in_order(
    three: tuple[RouterThread, list[LocalNode]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the coordinator's queue cannot hold in memory waits in its spool file; the replay
    reads it back in commit order (prepared statements, COPY, a session setting)."""
    rt, nodes = three
    monkeypatch.setattr(queue_module, "MEMORY_BYTES", 4096)
    holder = held_in_replay(rt, nodes)
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("SET application_name = 'spooled'")
        for i in range(60):
            conn.execute(
                "INSERT INTO t VALUES (%s, %s || current_setting('application_name'))",
                (i, "x" * 200),
                prepare=True,
            )
            conn.execute("UPDATE t SET v = v || '!' WHERE id = %s", (i // 2,), prepare=True)
        with conn.cursor().copy("COPY t (id, v) FROM STDIN") as copy:
            for i in range(100, 150):
                copy.write_row((i, "copied"))
    # The replay goes on down to 20 entries while the holder is open: more than the 4 kB in
    # memory hold, so some of those left wait on disk.
    assert int(recovery(rt)["queue_bytes"]) > 0  # (SHOW RECOVERY)
    assert rt.router.recovery.queue._spool.count > 0  # type: ignore[union-attr]
    holder.commit()
    holder.close()
    info = wait_recovery(rt)
    assert info["phase"] == "done", info
    assert int(info["replayed"]) >= 121, info
    assert_nodes_identical(nodes, "postgres")


def test_a_copy_begun_before_the_recovery_fails_it_when_it_commits(
    three: tuple[RouterThread, list[LocalNode]],
) -> None:
    """The router keeps COPY data only while a node recovers: a COPY already streaming when
    the recovery began cannot be replayed, so its commit fails the recovery at once."""
    rt, nodes = three
    create_tables(rt)
    fail_by_killing(rt, nodes[2])
    with psycopg.connect(rt.dsn()) as conn:
        with conn.cursor().copy("COPY t (id, v) FROM STDIN") as copy:
            copy.write_row((1, "before"))
            holder = recover_held_open(rt)
            copy.write_row((2, "during"))
        conn.commit()
    assert_failed_at_once(rt, nodes, holder, "its COPY FROM STDIN began before the recovery")


def test_a_snapshot_barrier_that_cannot_drain_in_time_is_tried_again(
    three: tuple[RouterThread, list[LocalNode]], caplog: pytest.LogCaptureFixture
) -> None:
    """A one-phase commit waits in its commit slot for a row lock that an open transaction
    holds: the snapshot's commit barrier cannot drain. The recovery tries the barrier again
    instead of failing, and goes through once the lock is let go."""
    rt, nodes = three
    with psycopg.connect(rt.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int)")
        conn.execute("INSERT INTO acct VALUES (1, 100)")
    fail_by_killing(rt, nodes[2])
    with (
        psycopg.connect(rt.dsn()) as holder,
        psycopg.connect(rt.dsn(), autocommit=True) as waiter,
    ):
        holder.execute("UPDATE acct SET balance = balance + 1 WHERE id = 1")  # the row lock
        waiter.execute("CREATE TEMP TABLE scratch (v int)")  # its commits are one-phase now
        blocked = threading.Thread(
            target=waiter.execute, args=("UPDATE acct SET balance = balance + 2 WHERE id = 1",)
        )
        blocked.start()
        eventually(
            lambda: (
                nodes[0].psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                == "1"
            )
        )
        recover(rt, "node3")
        eventually(lambda: "trying again (1 of 3)" in caplog.text, timeout=20)
        holder.commit()
        blocked.join(10)
        assert not blocked.is_alive()
        info = wait_recovery(rt)
    assert info["phase"] == "done", info
    assert nodes[2].psql("SELECT balance FROM acct WHERE id = 1") == "103"
    assert_nodes_identical(nodes, "postgres")
