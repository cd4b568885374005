"""The bank test: transfers through two routers while nodes are killed at random."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from router_harness import RouterThread, router_config

from helpers import assert_nodes_identical
from pgquorum.cluster.model import NodeState
from pgquorum.local.instance import LocalNode, free_port

ACCOUNTS = 20
START_BALANCE = 1000
TOTAL = ACCOUNTS * START_BALANCE
RUN_SECONDS = 10


@pytest.mark.slow
def test_bank_transfers_survive_random_kills(make_nodes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes: list[LocalNode] = make_nodes(4)
    pa, pb = free_port(), free_port()
    routers = [
        RouterThread(
            router_config(
                nodes,
                name=name,
                listen_port=port,
                peers=(("127.0.0.1", peer),),
                state_db=tmp_path / f"{name}.db",
            )
        )
        for name, port, peer in (("a", pa, pb), ("b", pb, pa))
    ]
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    try:
        with psycopg.connect(routers[0].dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE account (id int PRIMARY KEY, balance int NOT NULL)")
            conn.execute(
                "INSERT INTO account SELECT g, %s FROM generate_series(1, %s) g",
                (START_BALANCE, ACCOUNTS),
            )
        stop = threading.Event()
        failures: list[str] = []
        transfers = [0]
        sums: list[int] = []

        def transfer_loop(rt: RouterThread, worker: int) -> None:
            wrng = random.Random(seed + worker)
            try:
                with psycopg.connect(rt.dsn()) as conn:
                    while not stop.is_set():
                        src, dst = wrng.sample(range(1, ACCOUNTS + 1), 2)
                        amount = wrng.randint(1, 50)
                        first, second = sorted((src, dst))  # one lock order: no deadlocks
                        delta = {src: -amount, dst: amount}
                        try:
                            for acct in (first, second):
                                conn.execute(
                                    "UPDATE account SET balance = balance + %s WHERE id = %s",
                                    (delta[acct], acct),
                                )
                            conn.commit()
                            transfers[0] += 1
                        except (errors.DeadlockDetected, errors.SerializationFailure):
                            conn.rollback()
            except Exception as e:
                failures.append(f"worker {worker} via {rt.router.settings.name}: {e!r}")

        def audit_loop(rt: RouterThread) -> None:
            try:
                with psycopg.connect(rt.dsn(), autocommit=True) as conn:
                    while not stop.is_set():
                        sums.append(conn.execute("SELECT sum(balance) FROM account").fetchone()[0])  # type: ignore[index]
                        time.sleep(0.05)
            except Exception as e:
                failures.append(f"auditor via {rt.router.settings.name}: {e!r}")

        threads = [
            threading.Thread(target=transfer_loop, args=(routers[i % 2], i)) for i in range(8)
        ] + [threading.Thread(target=audit_loop, args=(rt,)) for rt in routers]
        for t in threads:
            t.start()
        victims = rng.sample(nodes, 2)
        for victim in victims:
            time.sleep(rng.uniform(2, RUN_SECONDS / 2 - 0.5))
            victim.kill()
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(60)
        assert not failures, f"seed {seed}: {failures}"
        assert transfers[0] > 100, transfers
        assert sums and all(s == TOTAL for s in sums), f"seed {seed}: {sorted(set(sums))}"
        survivors = [n for n in nodes if n not in victims]
        for rt in routers:
            states = {name: st.state for name, st in rt.router.cluster.status.items()}
            for v in victims:
                assert states[v.name] is NodeState.FAILED, (rt.router.settings.name, states)
            for s in survivors:
                assert states[s.name] is NodeState.ONLINE, (rt.router.settings.name, states)
        for n in survivors:
            assert n.psql("SELECT sum(balance) FROM account") == str(TOTAL)
            assert n.psql("SELECT count(*) FROM pg_prepared_xacts") == "0"
        assert_nodes_identical(survivors, "postgres")
    finally:
        for rt in routers:
            rt.stop()
