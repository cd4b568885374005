"""The `pgquorum` command line: up / down / status / router, run as real subprocesses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
from cli_harness import (
    CliProcess,
    cli_env,
    dsn,
    local_nodes,
    port_open,
    run_cli,
    start,
    start_up,
    state_node_ports,
    write_router_config,
)

from helpers import assert_nodes_identical
from pgquorum.local.binaries import PgBinaries
from pgquorum.local.instance import LocalNode, free_port


def node_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("node*") if (p / "PG_VERSION").exists())


def running_nodes(d: Path, binaries: PgBinaries) -> list[str]:
    return [p.name for p in node_dirs(d) if LocalNode(p.name, p, 0, binaries).is_running()]


# -- pgquorum up / status / down ---------------------------------------------------------------


def test_up_serves_status_and_sigterm_stops_everything_then_reuse(
    cluster_dir: Path, procs: list[CliProcess], tmp_path: Path, pg_binaries: PgBinaries
) -> None:
    port = free_port()
    up = start_up(procs, tmp_path, cluster_dir, 2, port)
    assert [p.name for p in node_dirs(cluster_dir)] == ["node1", "node2"]
    assert running_nodes(cluster_dir, pg_binaries) == ["node1", "node2"]

    with psycopg.connect(dsn(port), autocommit=True) as conn:
        conn.execute("CREATE TABLE cli_t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO cli_t VALUES (1, 'kept across restarts')")
        assert conn.execute("SELECT v FROM cli_t").fetchall() == [("kept across restarts",)]

    psql = str(pg_binaries.path("psql"))
    res = subprocess.run(
        [
            psql,
            "-X",
            "-A",
            "-t",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            dsn(port),
            "-c",
            "INSERT INTO cli_t VALUES (2, 'via psql')",
            "-c",
            "SELECT count(*) FROM cli_t",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "2"

    status = run_cli("status", "--port", str(port))
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    for name in ("node1", "node2"):
        line = next((ln for ln in lines if name in ln), None)
        assert line is not None, status.stdout
        assert "ONLINE" in line, status.stdout
    assert "lead" in status.stdout and "replica" in status.stdout

    rc = up.terminate()
    assert rc == 0, up.output()
    assert "pgquorum stopped" in up.output()
    assert not port_open(port)
    assert running_nodes(cluster_dir, pg_binaries) == []
    for p in node_dirs(cluster_dir):
        assert not (p / "postmaster.pid").exists(), p

    # Second run on the same directory: the data directories are reused, not re-created.
    port2 = free_port()
    up2 = start_up(procs, tmp_path, cluster_dir, 2, port2)
    with psycopg.connect(dsn(port2), autocommit=True) as conn:
        rows = conn.execute("SELECT id, v FROM cli_t ORDER BY id").fetchall()
        assert rows == [(1, "kept across restarts"), (2, "via psql")]
    # Both nodes hold the same rows (the router spreads reads, so compare the nodes).
    assert_nodes_identical(local_nodes(cluster_dir, pg_binaries), "postgres")
    status = run_cli("status", "--port", str(port2))
    assert status.returncode == 0 and status.stdout.count("ONLINE") == 2, status.stdout
    assert up2.terminate() == 0, up2.output()
    assert running_nodes(cluster_dir, pg_binaries) == []


def test_down_stops_a_cluster_left_running(
    cluster_dir: Path, procs: list[CliProcess], tmp_path: Path, pg_binaries: PgBinaries
) -> None:
    port = free_port()
    up = start_up(procs, tmp_path, cluster_dir, 2, port)
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    # SIGKILL: the router dies, the PostgreSQL servers (own processes) stay up.
    up.kill()
    assert running_nodes(cluster_dir, pg_binaries) == ["node1", "node2"]

    res = run_cli("down", "--dir", str(cluster_dir), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stopped node1" in res.stdout and "stopped node2" in res.stdout, res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    assert running_nodes(cluster_dir, pg_binaries) == []
    for p in node_dirs(cluster_dir):
        assert not (p / "postmaster.pid").exists(), p

    # Nothing left: a second `down` says so.
    again = run_cli("down", "--dir", str(cluster_dir), timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "stopped node" not in again.stdout


def test_up_with_password_requires_it(
    cluster_dir: Path, procs: list[CliProcess], tmp_path: Path, pg_binaries: PgBinaries
) -> None:
    port = free_port()
    up = start(
        procs,
        tmp_path,
        "up",
        "--nodes",
        "2",
        "--port",
        str(port),
        "--dir",
        str(cluster_dir),
        "--password",
        "secret",
    )
    up.wait_port(port)

    with pytest.raises(psycopg.OperationalError) as no_pw:
        psycopg.connect(dsn(port, passfile="/dev/null"), autocommit=True)
    msg = str(no_pw.value)
    assert "password" in msg, msg

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn(port, password="wrong", passfile="/dev/null"), autocommit=True)

    with psycopg.connect(dsn(port, password="secret"), autocommit=True) as conn:
        conn.execute("CREATE TABLE pw_t (id int)")
        conn.execute("INSERT INTO pw_t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM pw_t").fetchone() == (1,)

    # The nodes themselves require the password too (SCRAM in pg_hba.conf).
    node_ports = state_node_ports(cluster_dir)
    assert len(node_ports) == 2
    for node_port in node_ports:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn(node_port, password="wrong", passfile="/dev/null"))
        with psycopg.connect(dsn(node_port, password="secret"), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pw_t").fetchone() == (1,)

    bad = run_cli("status", "--port", str(port))
    assert bad.returncode != 0
    assert "Traceback" not in bad.stdout + bad.stderr
    good = run_cli("status", "--port", str(port), "--password", "secret")
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.count("ONLINE") == 2, good.stdout
    good_env = run_cli("status", "--port", str(port), PGQUORUM_PASSWORD="secret")
    assert good_env.returncode == 0, good_env.stdout + good_env.stderr

    assert up.terminate() == 0, up.output()
    assert running_nodes(cluster_dir, pg_binaries) == []


def test_status_without_a_router_fails_cleanly() -> None:
    res = run_cli("status", "--port", str(free_port()))
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "cannot reach the router" in out, out
    assert "Traceback" not in out


def test_up_without_postgresql_binaries(tmp_path: Path) -> None:
    res = run_cli(
        "up",
        "--nodes",
        "1",
        "--port",
        str(free_port()),
        "--dir",
        str(tmp_path / "c"),
        PGQUORUM_PG_BINDIR="/nonexistent",
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out
    flat = " ".join(out.split())
    assert "not found" in flat, out
    assert "PGQUORUM_PG_BINDIR=/nonexistent" in flat, out
    if shutil.which("apt-get"):
        assert "apt-get install" in flat, out
    assert not list((tmp_path / "c").glob("node*/PG_VERSION"))


# -- pgquorum router --config -----------------------------------------------------------------


BAD_CONFIG = """\
[router]
listen = "127.0.0.1:abc"
read_policy = "sometimes"
auth_method = "trust"
lisen = "127.0.0.1:6432"

[group]
name = "default"
"""


def test_router_invalid_config_reports_every_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD_CONFIG)
    res = run_cli("router", "--config", str(cfg), timeout=30)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out
    assert "invalid configuration" in out
    assert "router.listen" in out and "abc" in out
    assert "router.read_policy" in out and "sometimes" in out
    assert "balance, all, lead" in out
    assert "router.lisen" in out and "did you mean 'listen'" in out
    assert "group.nodes" in out


def test_router_invalid_config_keeps_bracketed_text(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[group]\nname = "default"\n')
    res = run_cli("router", "--config", str(cfg), timeout=30)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "missing required table [router]" in out, out
    assert "at least one [[group.nodes]] is required" in out, out


def test_router_invalid_config_with_markup_like_value(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD_CONFIG.replace('"sometimes"', '"[/x]"'))
    res = run_cli("router", "--config", str(cfg), timeout=30)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == 2, out
    assert "'[/x]'" in out, out


def test_router_missing_config_file(tmp_path: Path) -> None:
    res = run_cli("router", "--config", str(tmp_path / "nope.toml"), timeout=30)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Traceback" not in out
    assert "cannot read the file" in out, out


def test_router_with_valid_config_serves_queries(
    pg_nodes: list[LocalNode], procs: list[CliProcess], tmp_path: Path
) -> None:
    port = free_port()
    cfg = write_router_config(tmp_path / "router.toml", port, pg_nodes, tcp=True)
    r = start(procs, tmp_path, "router", "--config", str(cfg))
    r.wait_port(port, timeout=30)
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        conn.execute("SELECT pg_sleep(0)")
    status = run_cli("status", "--port", str(port))
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("ONLINE") == len(pg_nodes), status.stdout
    assert r.terminate() == 0, r.output()
    assert not port_open(port)
    # The router does not own the nodes: they keep running.
    assert all(n.is_running() for n in pg_nodes)
