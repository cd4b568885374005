"""Several router processes on one port: sessions spread, cancels and failures cross over."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from cli_harness import CliProcess, dsn, start
from psycopg import errors

from pgquorum.local.instance import LocalNode, free_port


def worker_dsn(port: int, index: int) -> str:
    return f"host=/tmp/pgquorum-{port}-w{index} port={port} dbname=pgquorum user=postgres"


@pytest.mark.slow
def test_two_workers(pg_nodes: list[LocalNode], procs: list[CliProcess], tmp_path: Path) -> None:
    port = free_port()
    listed = "".join(
        f'\n[[group.nodes]]\nname = "{n.name}"\nhost = "{n.router_host}"\nport = {n.port}\n'
        for n in pg_nodes
    )
    cfg = tmp_path / "router.toml"
    cfg.write_text(
        f'[router]\nlisten = "127.0.0.1:{port}"\nname = "multi"\nauth_method = "trust"\n'
        f'workers = 2\nstate_db = "state.db"\n\n[group]\nname = "default"\n{listed}'
    )
    router = start(procs, tmp_path, "router", "--config", str(cfg))
    router.wait_port(port, timeout=30)
    deadline = time.monotonic() + 20
    while not Path(f"/tmp/pgquorum-{port}-w1/.s.PGSQL.{port}").exists():
        assert time.monotonic() < deadline, router.output()
        time.sleep(0.1)
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
        time.sleep(0.5)
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
        with psycopg.connect(worker_dsn(port, 1), autocommit=True) as admin:
            deadline = time.monotonic() + 10
            while True:
                rows = {r[0]: r[4] for r in admin.execute("SHOW NODES").fetchall()}
                if rows["node3"] == "FAILED":
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.1)
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
    port = free_port()
    listed = "".join(
        f'\n[[group.nodes]]\nname = "{n.name}"\nhost = "{n.router_host}"\nport = {n.port}\n'
        for n in nodes
    )
    cfg = tmp_path / "router.toml"
    cfg.write_text(
        f'[router]\nlisten = "127.0.0.1:{port}"\nname = "multi"\nauth_method = "trust"\n'
        f'workers = 2\nstate_db = "state.db"\n\n[group]\nname = "default"\n{listed}'
    )
    router = start(procs, tmp_path, "router", "--config", str(cfg))
    router.wait_port(port, timeout=30)
    deadline = time.monotonic() + 20
    while not Path(f"/tmp/pgquorum-{port}-w1/.s.PGSQL.{port}").exists():
        assert time.monotonic() < deadline, router.output()
        time.sleep(0.1)
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL)")
        conn.execute("INSERT INTO acct SELECT g, 100 FROM generate_series(1, 200) g")
    stop = threading.Event()
    errors_seen: list[BaseException] = []

    def transfers(n: int) -> None:
        try:
            with psycopg.connect(dsn(port)) as conn:  # spread over both workers
                i = n
                while not stop.is_set():
                    a, b = sorted((i % 200 + 1, (i * 7 + 3) % 200 + 1))
                    if a != b:
                        conn.execute("UPDATE acct SET balance = balance - 1 WHERE id = %s", (a,))
                        conn.execute("UPDATE acct SET balance = balance + 1 WHERE id = %s", (b,))
                        conn.commit()
                    i += 1
        except BaseException as e:
            errors_seen.append(e)

    workers = [threading.Thread(target=transfers, args=(n,)) for n in range(6)]
    for w in workers:
        w.start()
    try:
        for i in (0, 1, 0):  # whichever worker runs it, the others hold their commits
            with psycopg.connect(worker_dsn(port, i), autocommit=True) as admin:
                assert admin.execute("VERIFY").fetchall() == []
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not errors_seen
    assert router.terminate() == 0, router.output()
