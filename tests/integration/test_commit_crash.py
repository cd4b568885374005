"""A router that dies between the phases of a commit: the restarted router finishes the
prepared transactions by its decision log (commit if decided, else roll back)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from cli_harness import CliProcess, dsn, start, write_router_config
from router_harness import prepared, wait_resolved

from helpers import assert_nodes_identical
from pgquorum import failpoints
from pgquorum.local.instance import free_port


@pytest.mark.parametrize(
    ("point", "committed", "left_prepared"),
    [
        # Every node prepared, no decision recorded: presumed abort.
        (failpoints.AFTER_PREPARE, False, [1, 1, 1]),
        # The decision is durable, nothing committed yet: the restarted router commits.
        (failpoints.AFTER_DECISION, True, [1, 1, 1]),
        # The replicas committed, the lead not yet.
        (failpoints.AFTER_FIRST_COMMIT, True, [1, 0, 0]),
    ],
)
@pytest.mark.parametrize("block", [True, False], ids=["block", "autocommit"])
def test_router_crash_between_phases(
    make_nodes,  # type: ignore[no-untyped-def]
    procs: list[CliProcess],
    tmp_path: Path,
    point: str,
    committed: bool,
    left_prepared: list[int],
    block: bool,
) -> None:
    nodes = make_nodes(3)
    for n in nodes:
        n.psql("CREATE TABLE acct (id int PRIMARY KEY, balance int)")
        n.psql("INSERT INTO acct VALUES (1, 100), (2, 100)")
    port = free_port()
    cfg = write_router_config(
        tmp_path / "router.toml", port, nodes, name="crashy", state_db="state.db"
    )
    crashy = start(procs, tmp_path, "router", "--config", str(cfg), PGQUORUM_FAILPOINTS=point)
    crashy.wait_port(port, timeout=30)
    with (
        psycopg.connect(dsn(port), autocommit=not block) as conn,
        pytest.raises(psycopg.OperationalError),
    ):
        if block:
            conn.execute("UPDATE acct SET balance = balance - 10 WHERE id = 1")
            conn.execute("UPDATE acct SET balance = balance + 10 WHERE id = 2")
            conn.commit()
        else:
            conn.execute("UPDATE acct SET balance = balance - 10 WHERE id = 1")
    assert crashy.proc.wait(10) == 70, crashy.output()
    assert f"fail point {point} hit" in crashy.output()
    assert [prepared(n) for n in nodes] == left_prepared
    # The prepared transactions hold their row locks until resolved.
    router = start(procs, tmp_path, "router", "--config", str(cfg))
    router.wait_port(port, timeout=30)
    wait_resolved(nodes)
    want = ["90", "110"] if committed else ["100", "100"]
    if not block:
        want[1] = "100"
    for n in nodes:
        assert n.psql("SELECT balance FROM acct ORDER BY id").split("\n") == want, n.name
    with psycopg.connect(dsn(port), autocommit=True) as conn:  # and it serves as before
        conn.execute("UPDATE acct SET balance = balance + 1")
    assert router.terminate() == 0, router.output()
    assert "in-doubt transaction" in router.output()
    assert_nodes_identical(nodes, "postgres")
