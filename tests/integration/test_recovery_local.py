"""Recovery in a local cluster: `pgquorum recover` starts a killed node's server first, and
`pgquorum up --nodes` with more nodes makes the new ones join by recovery."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
from cli_harness import CliProcess, dsn, local_nodes, run_cli, start_up, state_node_ports

from helpers import assert_nodes_identical
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import free_port


def node_rows(port: int) -> int:
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM r").fetchone()
        assert row is not None
        return int(row[0])


def status_states(port: int) -> list[str]:
    res = run_cli("status", "--port", str(port))
    assert res.returncode == 0, res.stdout + res.stderr
    return [w for w in res.stdout.split() if w in ("ONLINE", "FAILED", "RECOVERING")]


def test_recover_starts_a_killed_local_node_and_up_grows_the_cluster(
    cluster_dir: Path,
    procs: list[CliProcess],
    tmp_path: Path,
    pg_binaries: PgBinaries,
) -> None:
    port = free_port()
    up = start_up(procs, tmp_path, cluster_dir, 2, port)
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        conn.execute("CREATE TABLE r (id serial PRIMARY KEY, v text)")
        conn.execute("INSERT INTO r (v) VALUES ('a'), ('b')")
        local_nodes(cluster_dir, pg_binaries)[1].kill()
        conn.execute("INSERT INTO r (v) VALUES ('while node2 was down')")  # fails node2
    assert status_states(port) == ["ONLINE", "FAILED"]
    res = run_cli("recover", "node2", "--port", str(port), "--dir", str(cluster_dir), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started the server of node2" in res.stdout and "node2 is ONLINE" in res.stdout
    assert status_states(port) == ["ONLINE", "ONLINE"]
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        conn.execute("INSERT INTO r (v) VALUES ('after')")
    assert [node_rows(p) for p in state_node_ports(cluster_dir)] == [4, 4]
    assert run_cli("verify", "--port", str(port)).returncode == 0
    assert_nodes_identical(local_nodes(cluster_dir, pg_binaries), "postgres")
    assert up.terminate() == 0, up.output()

    # A third node: created empty, it joins by recovery before it takes any traffic.
    up3 = start_up(procs, tmp_path, cluster_dir, 3, port)
    deadline = time.monotonic() + 60
    while status_states(port) != ["ONLINE"] * 3:
        assert time.monotonic() < deadline, up3.output()
        time.sleep(0.2)
    assert "node3 is new: it joins the group by recovery" in up3.output()
    assert [node_rows(p) for p in state_node_ports(cluster_dir)] == [4, 4, 4]
    assert run_cli("verify", "--port", str(port)).returncode == 0
    assert_nodes_identical(local_nodes(cluster_dir, pg_binaries), "postgres")
    assert up3.terminate() == 0, up3.output()
