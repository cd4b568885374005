"""TLS between clients and the router (self-signed certificate made with openssl)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from router_harness import RouterThread, router_config

from pgquorum.local.instance import LocalNode


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "server.key", d / "server.crt"
    res = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    return crt, key


@pytest.fixture(scope="module")
def tls_router(pg_nodes: list[LocalNode], cert: tuple[Path, Path]) -> Iterator[RouterThread]:
    crt, key = cert
    rt = RouterThread(router_config(pg_nodes, tls_cert=crt, tls_key=key))
    yield rt
    rt.stop()


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_psycopg_sslmode_require(tls_router: RouterThread) -> None:
    with psycopg.connect(
        tls_router.dsn(sslmode="require"), autocommit=True, connect_timeout=10
    ) as conn:
        assert conn.pgconn.ssl_in_use is True
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)


def test_psycopg_verifies_the_certificate(
    tls_router: RouterThread, cert: tuple[Path, Path]
) -> None:
    crt, _ = cert
    dsn = tls_router.dsn(sslmode="verify-full", sslrootcert=str(crt)).replace(
        "host=127.0.0.1", "host=localhost hostaddr=127.0.0.1"
    )
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use is True
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_writes_over_tls(tls_router: RouterThread, pg_nodes: list[LocalNode]) -> None:
    with psycopg.connect(tls_router.dsn(sslmode="require"), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS tls_t")
        conn.execute("CREATE TABLE tls_t (id int PRIMARY KEY, v text)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO tls_t VALUES (%s, %s)", [(i, "x" * 1000) for i in range(50)]
            )
        assert conn.execute("SELECT count(*) FROM tls_t").fetchone() == (50,)
        conn.execute("DROP TABLE tls_t")
    for node in pg_nodes:
        assert node.psql("SELECT to_regclass('tls_t') IS NULL") == "t"


def test_psycopg_sslmode_disable(tls_router: RouterThread) -> None:
    with psycopg.connect(
        tls_router.dsn(sslmode="disable"), autocommit=True, connect_timeout=10
    ) as conn:
        assert conn.pgconn.ssl_in_use is False
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_admin_console_over_tls(tls_router: RouterThread) -> None:
    with psycopg.connect(
        tls_router.dsn("pgquorum", sslmode="require"), autocommit=True, connect_timeout=10
    ) as conn:
        assert conn.pgconn.ssl_in_use is True
        rows = conn.execute("SHOW NODES").fetchall()
        assert [r[0] for r in rows] == ["node1", "node2", "node3"]


def test_asyncpg_ssl(tls_router: RouterThread) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=tls_router.port,
            user="postgres",
            database="postgres",
            ssl=client_ctx(),
            timeout=10,
        )
        try:
            assert conn.get_settings() is not None
            assert await conn.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        finally:
            await conn.close()
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=tls_router.port,
            user="postgres",
            database="postgres",
            ssl="require",
            timeout=10,
        )
        try:
            assert await conn.fetchval("SELECT 2") == 2
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_sslmode_require_without_tls_is_refused(router: RouterThread) -> None:
    """The plain router (no certificate) answers N: sslmode=require fails, prefer works."""
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(router.dsn(sslmode="require"), connect_timeout=10)
    with psycopg.connect(router.dsn(sslmode="prefer"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use is False
        assert conn.execute("SELECT 1").fetchone() == (1,)
