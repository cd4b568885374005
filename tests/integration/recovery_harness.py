"""Helpers for tests of online recovery: start one, follow it, fail a node first."""

from __future__ import annotations

import time

import psycopg
from router_harness import RouterThread

from pgquorum.cluster.model import NodeState
from pgquorum.local.instance import LocalNode


def admin_dsn(where: RouterThread | str) -> str:
    """A router's admin console: a RouterThread's, or a DSN as given."""
    return where if isinstance(where, str) else where.dsn("pgquorum")


def recovery(where: RouterThread | str) -> dict[str, str]:
    """SHOW RECOVERY at a router (see admin_dsn), as a dict; {} if none ran."""
    with psycopg.connect(admin_dsn(where), autocommit=True) as admin:
        cur = admin.execute("SHOW RECOVERY")
        cols = [d.name for d in cur.description or ()]
        rows = cur.fetchall()
    return dict(zip(cols, rows[0], strict=True)) if rows else {}


def recover(where: RouterThread | str, node: str) -> None:
    with psycopg.connect(admin_dsn(where), autocommit=True) as admin:
        admin.execute(f"RECOVER NODE {node}")


def wait_recovery(where: RouterThread | str, timeout: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = recovery(where)
        if info.get("phase") in ("done", "failed"):
            return info
        time.sleep(0.1)
    raise AssertionError(f"the recovery did not end in {timeout}s: {recovery(where)}")


def recover_held_open(rt: RouterThread, node: str = "node3") -> psycopg.Connection:
    """Start recovering ``node`` while a transaction that wrote (into table ``h``) stays open:
    the recovery stays in its replay phase until the returned connection ends it, so what
    the test runs meanwhile certainly runs during the recovery."""
    holder = psycopg.connect(rt.dsn())
    holder.execute("INSERT INTO h VALUES (NULL)")
    recover(rt, node)
    deadline = time.monotonic() + 30
    while recovery(rt)["phase"] not in ("replay", "switch"):
        assert time.monotonic() < deadline, recovery(rt)
        time.sleep(0.05)
    return holder


def fail_by_killing(rt: RouterThread, node: LocalNode) -> None:
    """Kill a node's server and make the router notice (a write), then start it again."""
    node.kill()
    deadline = time.monotonic() + 30
    while rt.router.cluster.status[node.name].state is not NodeState.FAILED:
        assert time.monotonic() < deadline, "the router did not fail the killed node"
        with psycopg.connect(rt.dsn(), autocommit=True) as conn:
            conn.execute("SELECT 1 FROM pg_catalog.pg_class LIMIT 1 FOR UPDATE")
        time.sleep(0.05)
    node.start()
