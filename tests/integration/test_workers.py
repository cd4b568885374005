"""Several router processes on one port: sessions spread, cancels and failures cross over."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from cli_harness import CliProcess, dsn, start_workers, worker_dsn, worker_states
from psycopg import errors
from router_harness import eventually

from helpers import Transfers, assert_nodes_identical
from pgquorum.local.instance import LocalNode


@pytest.mark.slow
def test_two_workers(pg_nodes: list[LocalNode], procs: list[CliProcess], tmp_path: Path) -> None:
    router, port, cfg = start_workers(procs, tmp_path, pg_nodes)
    clients = [psycopg.connect(dsn(port), autocommit=True) for _ in range(20)]
    try:
        for c in clients:
            assert c.execute("SELECT 1").fetchone() == (1,)
        served = []
        for i in (0, 1):
            with psycopg.connect(worker_dsn(port, i), autocommit=True) as admin:
                served.append(len(admin.execute("SHOW SESSIONS").fetchall()) - 1)
        assert sum(served) == 20 and min(served) > 0, served  # the kernel spread them
        # A cancel reaches the session whichever worker the kernel hands it to.
        outcomes: list[BaseException | None] = []

        def sleeper(c: psycopg.Connection) -> None:
            try:
                c.execute("SELECT pg_sleep(20)")
                outcomes.append(None)
            except BaseException as e:
                outcomes.append(e)

        threads = [threading.Thread(target=sleeper, args=(c,)) for c in clients[:6]]
        for t in threads:
            t.start()
        sleeping = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'"
        )
        deadline = time.monotonic() + 10  # a cancel before its sleep began would be lost
        while sum(int(n.psql(sleeping)) for n in pg_nodes) < 6:
            assert time.monotonic() < deadline, "the sleeps did not start"
            time.sleep(0.05)
        began = time.monotonic()
        for c in clients[:6]:
            c.cancel_safe()
        for t in threads:
            t.join(15)
        assert time.monotonic() - began < 10
        assert len(outcomes) == 6 and all(isinstance(e, errors.QueryCanceled) for e in outcomes)
        # A node failed on one worker is failed on the other.
        with psycopg.connect(worker_dsn(port, 0), autocommit=True) as admin:
            admin.execute("FAIL NODE node3 REASON 'worker test'")
        eventually(lambda: worker_states(port, 1)[2] == "FAILED")
    finally:
        for c in clients:
            c.close()
    assert router.terminate() == 0, router.output()
    # The other worker went with it.
    left = subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


@pytest.mark.slow
def test_verify_holds_every_workers_commits(
    make_nodes,  # type: ignore[no-untyped-def]
    procs: list[CliProcess],
    tmp_path: Path,
) -> None:
    nodes = make_nodes(3)
    router, port, _ = start_workers(procs, tmp_path, nodes)
    Transfers.create(dsn(port), 200)
    with Transfers(dsn(port), clients=6, accounts=200) as load:  # spread over both workers
        for i in (0, 1, 0):
            load.wait_commits(20)  # whichever worker runs it, the others hold their commits
            with psycopg.connect(worker_dsn(port, i), autocommit=True) as admin:
                assert admin.execute("VERIFY").fetchall() == []
    assert not load.errors
    assert_nodes_identical(nodes, "postgres")
    assert router.terminate() == 0, router.output()


def test_workers_do_not_outlive_the_first(
    pg_nodes: list[LocalNode], procs: list[CliProcess], tmp_path: Path
) -> None:
    router, _, cfg = start_workers(procs, tmp_path, pg_nodes)
    router.proc.kill()  # SIGKILL: no chance to stop its workers itself
    router.proc.wait(10)
    deadline = time.monotonic() + 15
    while subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a worker outlived the first process"
        time.sleep(0.2)
