"""read_policy: balance spreads reads (tested in test_psycopg), lead and all."""

from __future__ import annotations

import psycopg
from router_harness import RouterThread, router_config

from pgquorum.local.instance import LocalNode


def _served(rt: RouterThread) -> dict[str, int]:
    return {name: st.statements for name, st in rt.router.cluster.status.items()}


def test_read_policy_lead(pg_nodes: list[LocalNode]) -> None:
    rt = RouterThread(router_config(pg_nodes, read_policy="lead"))
    try:
        conns = [psycopg.connect(rt.dsn(), autocommit=True) for _ in range(3)]
        ports = {
            c.execute("SELECT current_setting('port')::int").fetchone()[0]  # type: ignore[index]
            for c in conns
            for _ in range(5)
        }
        for c in conns:
            c.close()
        assert ports == {pg_nodes[0].port}
    finally:
        rt.stop()


def test_read_policy_all(pg_nodes: list[LocalNode]) -> None:
    rt = RouterThread(router_config(pg_nodes, read_policy="all"))
    try:
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            before = _served(rt)
            for _ in range(10):
                assert conn.execute("SELECT 1").fetchone() == (1,)
            after = _served(rt)
        # Every read ran on every node (under "balance" each would get about a third).
        assert all(after[n] - before[n] >= 10 for n in after), (before, after)
    finally:
        rt.stop()
