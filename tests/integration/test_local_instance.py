"""Local PostgreSQL servers: finding binaries, init/start/stop/kill, SCRAM, node comparison."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import assert_nodes_identical, fresh_database, node_dump
from pgquorum.local import binaries as binaries_mod
from pgquorum.local.binaries import PgBinaries, PostgresNotFound, find_binaries
from pgquorum.local.instance import LocalNode, PsqlError, free_port, run_as_postgres_kwargs


def test_find_binaries(pg_binaries: PgBinaries) -> None:
    b = find_binaries()
    assert b.version >= 13
    for tool in ("initdb", "pg_ctl", "postgres", "psql", "pg_dump"):
        assert b.path(tool).is_file()
    assert b == pg_binaries


def test_find_binaries_explicit_candidates(pg_binaries: PgBinaries, tmp_path: Path) -> None:
    # An empty dir is skipped; the real one is found.
    assert find_binaries([tmp_path, pg_binaries.bindir]) == pg_binaries


def test_find_binaries_follows_symlinked_path_entries(
    pg_binaries: PgBinaries, tmp_path: Path
) -> None:
    # Like /usr/local/bin holding only symlinks: the real bindir is reported,
    # so psql/pg_dump come from the same installation.
    for tool in ("initdb", "pg_ctl", "postgres"):
        (tmp_path / tool).symlink_to(pg_binaries.bindir / tool)
    assert find_binaries([tmp_path]).bindir == pg_binaries.bindir.resolve()


def test_postgres_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PGQUORUM_PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # also hides pg_config
    monkeypatch.setattr(binaries_mod, "FIXED_SEARCH_DIRS", ())
    with pytest.raises(PostgresNotFound) as exc:
        find_binaries()
    msg = str(exc.value)
    assert "initdb" in msg and "not found" in msg
    assert "Install" in msg or "install" in msg
    with pytest.raises(PostgresNotFound):
        find_binaries(candidates=[])


def test_install_hint_uses_apt_when_available(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    apt = tmp_path / "apt-get"
    apt.write_text("#!/bin/sh\n")
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "apt-get install -y postgresql" in str(PostgresNotFound())


def test_pinned_bindir_env_wins_and_is_checked(
    monkeypatch: pytest.MonkeyPatch, pg_binaries: PgBinaries, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGQUORUM_PG_BINDIR", str(pg_binaries.bindir))
    assert find_binaries() == pg_binaries
    monkeypatch.setenv("PGQUORUM_PG_BINDIR", str(tmp_path / "nowhere"))
    with pytest.raises(PostgresNotFound, match="PGQUORUM_PG_BINDIR"):
        find_binaries()


def test_run_as_postgres_kwargs() -> None:
    kw = run_as_postgres_kwargs()
    if os.geteuid() == 0:
        assert kw["user"] != 0 and "HOME" in kw["env"]
        out = subprocess.run(["id", "-u"], capture_output=True, text=True, cwd="/", **kw)
        assert out.stdout.strip() != "0"
    else:
        assert kw == {}


def test_free_port_distinct() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20


def test_init_start_psql_stop_restart(pg_binaries: PgBinaries) -> None:
    # A node built by hand under a fresh 0700 mkdtemp() dir, which the postgres
    # user cannot enter until init() grants it search permission.
    base = Path(tempfile.mkdtemp(prefix="pgquorum-solo-"))
    node = LocalNode("solo", base / "data", free_port(), pg_binaries)
    assert not node.initialized()
    assert not node.is_running()
    assert node.postmaster_pid() is None
    node.init()
    assert node.initialized()
    try:
        node.start()
        assert node.is_running()
        assert node.postmaster_pid() is not None
        assert node.psql("SELECT 1") == "1"
        assert node.psql("SHOW max_prepared_transactions") == "300"
        assert node.psql("SHOW max_connections") == "300"
        assert node.psql("SHOW unix_socket_directories") == str(node.datadir)
        assert node.psql("SHOW server_encoding") == "UTF8"
        assert node.psql("SHOW fsync") == "on"
        node.psql("CREATE TABLE t(a int); INSERT INTO t VALUES (1), (2)")
        assert node.psql("SELECT a FROM t ORDER BY a") == "1\n2"
        with pytest.raises(PsqlError, match="no_such_table"):
            node.psql("SELECT * FROM no_such_table")
        node.start()  # idempotent when already running on the same port

        node.stop()
        assert not node.is_running()
        node.stop()  # no error when not running

        # Restart on a different port: data survives, the new port is used and stored.
        node.port = free_port()
        node.start()
        assert node.psql("SELECT count(*) FROM t") == "2"
        assert node.psql("SHOW port") == str(node.port)
        assert f"port = {node.port}" in node.conf_path.read_text()
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_start_failure_reports_server_log(make_nodes) -> None:
    (node,) = make_nodes(1)
    node.stop()
    with node.conf_path.open("a") as f:
        f.write("shared_buffers = 'not-a-size'\n")
    try:
        with pytest.raises(RuntimeError, match="shared_buffers"):
            node.start(timeout=20)
    finally:
        text = node.conf_path.read_text().replace("shared_buffers = 'not-a-size'\n", "")
        node.conf_path.write_text(text)
    node.start()
    assert node.psql("SELECT 1") == "1"


def test_password_scram(make_nodes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (node,) = make_nodes(1, password="s3cret pw")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    no_pw = dataclasses.replace(node, password=None)
    with pytest.raises(PsqlError, match="password"):
        no_pw.psql("SELECT 1")
    with pytest.raises(PsqlError, match="password authentication failed"):
        no_pw.psql("SELECT 1", password="wrong")
    monkeypatch.setenv("PGPASSWORD", "s3cret pw")
    assert no_pw.psql("SELECT 1") == "1"
    monkeypatch.delenv("PGPASSWORD")
    # The node remembers the password for psql() and dsn().
    assert node.psql("SELECT current_user") == "postgres"
    assert "password=" in node.dsn()
    assert node.psql("SHOW password_encryption") == "scram-sha-256"
    assert (
        node.psql(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postgres'"
        )
        == "t"
    )


def test_kill_then_restart(make_nodes) -> None:
    (node,) = make_nodes(1)
    node.psql("CREATE TABLE k(a int); INSERT INTO k VALUES (42)")
    pid = node.postmaster_pid()
    node.kill()
    assert not node.is_running()
    assert node.postmaster_pid() == pid  # stale pidfile left behind, as after a crash
    node.kill()  # no-op now
    node.stop()  # no error either
    node.start()  # crash recovery
    assert node.psql("SELECT a FROM k") == "42"


def test_dsn(pg_nodes: list[LocalNode]) -> None:
    node = pg_nodes[0]
    assert node.dsn("db1") == f"host=127.0.0.1 port={node.port} dbname=db1 user=postgres"
    assert node.dsn(user="bob").endswith("user=bob")


def test_pg_nodes_running(pg_nodes: list[LocalNode]) -> None:
    assert [n.name for n in pg_nodes] == ["node1", "node2", "node3"]
    assert len({n.port for n in pg_nodes}) == 3
    for n in pg_nodes:
        assert n.is_running()
        assert n.psql("SELECT 1") == "1"


def test_assert_nodes_identical(pg_nodes: list[LocalNode]) -> None:
    fresh_database(pg_nodes, "ident_test")
    for n in pg_nodes:
        n.psql(
            "CREATE TABLE items(id int PRIMARY KEY, label text);"
            "INSERT INTO items VALUES (1, 'a'), (2, E'multi\\nline');"
            'CREATE SCHEMA "Other"; CREATE TABLE "Other"."T"(x int);',
            database="ident_test",
        )
    assert_nodes_identical(pg_nodes, "ident_test")
    dump = node_dump(pg_nodes[0], "ident_test")
    assert dump['"Other"."T"'] == []
    assert dump["public.items"] == ["(1,a)", '(2,"multi\nline")']

    pg_nodes[1].psql("INSERT INTO items VALUES (3, 'only here')", database="ident_test")
    with pytest.raises(AssertionError) as exc:
        assert_nodes_identical(pg_nodes, "ident_test")
    msg = str(exc.value)
    assert "public.items" in msg and "node2" in msg and "only here" in msg
    assert "node3" not in msg

    pg_nodes[2].psql('DROP TABLE "Other"."T"', database="ident_test")
    with pytest.raises(AssertionError, match=r'node3: missing tables .*"Other"."T"'):
        assert_nodes_identical(pg_nodes, "ident_test")

    # fresh_database really starts over.
    fresh_database(pg_nodes, "ident_test")
    assert_nodes_identical(pg_nodes, "ident_test")
    assert node_dump(pg_nodes[0], "ident_test") == {}
